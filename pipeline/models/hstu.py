"""HSTU (Zhai et al. 2024, "Actions Speak Louder than Words"), as a Hugging Face decoder a User LLM can be.

Each block: layer-norm the input, one linear map + SiLU gives U, V, Q, K; pointwise aggregated attention
SiLU(QK^T + relative bias) / n (no softmax) over the earlier positions; the output is U * LayerNorm(attention)
through a linear map, added to the input. The relative bias of every block is its own: a learned weight per
distance between two positions plus a learned weight per bucket of the time between their interactions
(log-spaced buckets, as the reference code's ln(|dt|) / 0.301). Positions also get a learned absolute
embedding at the input, as in the reference.

One deliberate difference from the reference code: it measures time from the *next* interaction (the one being
predicted) to each earlier one, which lets the model see when the target happens; here the query's time is its
own interaction's, so a prediction uses nothing from the future.

Registered with transformers' Auto classes (model_type "hstu"), so it is built, saved and loaded like GPT-2 or
Llama. Shapes: B sequences, L positions, D hidden size, H heads, d = D / H per head.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutput


class HSTUConfig(PretrainedConfig):
    model_type = "hstu"

    def __init__(self, hidden_size: int = 50, num_hidden_layers: int = 2, num_attention_heads: int = 1,
                 max_position_embeddings: int = 256, dropout: float = 0.2, attention_weights_dropout: float = 0.0,
                 time_buckets: int = 128, relative_bias: bool = True, layer_norm_eps: float = 1e-6,
                 vocab_size: int = 1, **kwargs) -> None:
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.max_position_embeddings = max_position_embeddings
        """Learned positions and relative distances (training refuses longer sequences). Also the divisor n of
        the attention weights, which the LayerNorm of the attention output makes nearly irrelevant."""
        self.dropout = dropout
        """On the inputs and on each block's output (the reference's linear dropout; user.dropout sets it)."""
        self.attention_weights_dropout = attention_weights_dropout
        """On the attention weights (the reference: none)."""
        self.time_buckets = time_buckets
        self.relative_bias = relative_bias
        """False: no relative position or time bias (an ablation)."""
        self.layer_norm_eps = layer_norm_eps
        self.vocab_size = vocab_size
        super().__init__(**kwargs)


def bucket_of(seconds: torch.Tensor, num_buckets: int) -> torch.Tensor:
    """Log-spaced bucket of a time difference in seconds: floor(ln(max(|dt|, 1)) / 0.301), at most num_buckets."""
    return (torch.log(seconds.abs().clamp(min=1).float()) / 0.301).long().clamp(0, num_buckets)


class _Lookup(torch.autograd.Function):
    """table[index] for a small 1-D table and millions of indices. Its backward sums the gradient per entry with
    bincount: on the CPU in a fixed order (plain indexing's CPU backward adds repeated indices in thread-timing
    order, so runs would not repeat exactly) and several times faster than the embedding backward."""

    @staticmethod
    def forward(ctx, table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(index)
        ctx.size, ctx.dtype = table.shape[0], table.dtype
        return table[index]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (index,) = ctx.saved_tensors
        summed = torch.bincount(index.reshape(-1), weights=grad.reshape(-1), minlength=ctx.size)
        return summed.to(ctx.dtype), None


def lookup(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return _Lookup.apply(table, index)


class RelativeBias(nn.Module):
    """(B, L, L) attention bias: w_pos[i - j] + w_time[bucket(t_i - t_j)] for query i and key j."""

    def __init__(self, config: HSTUConfig) -> None:
        super().__init__()
        self.position_bias = nn.Parameter(torch.zeros(config.max_position_embeddings))
        self.time_bias = nn.Parameter(torch.zeros(config.time_buckets + 1))

    def forward(self, distance: torch.Tensor, buckets: torch.Tensor | None) -> torch.Tensor:
        """distance (B, L, L) i - j clamped to the table; buckets (B, L, L) time buckets, or None (no time)."""
        bias = lookup(self.position_bias, distance)
        return bias + lookup(self.time_bias, buckets) if buckets is not None else bias


class HSTUBlock(nn.Module):
    def __init__(self, config: HSTUConfig) -> None:
        super().__init__()
        d, heads = config.hidden_size, config.num_attention_heads
        if d % heads:
            raise ValueError(f"hidden_size {d} is not a multiple of num_attention_heads {heads}")
        self.heads, self.eps, self.n = heads, config.layer_norm_eps, config.max_position_embeddings
        self.uvqk = nn.Linear(d, 4 * d, bias=False)
        self.out = nn.Linear(d, d)
        self.dropout = nn.Dropout(config.dropout)
        self.attention_dropout = nn.Dropout(config.attention_weights_dropout)
        self.bias = RelativeBias(config) if config.relative_bias else None

    def forward(self, x: torch.Tensor, keep: torch.Tensor, distance: torch.Tensor, buckets: torch.Tensor | None
                ) -> torch.Tensor:
        """x (B, L, D); keep (B, L, L) bool: query i may read key j; distance, buckets: see RelativeBias."""
        B, L, D = x.shape
        h = F.layer_norm(x, (D,), eps=self.eps)
        u, v, q, k = F.silu(self.uvqk(h)).chunk(4, dim=-1)  # 4 x (B, L, D)
        q, k, v = (t.view(B, L, self.heads, D // self.heads).transpose(1, 2) for t in (q, k, v))  # (B, H, L, d)
        scores = q @ k.transpose(-1, -2)  # (B, H, L, L)
        if self.bias is not None:
            scores = scores + self.bias(distance, buckets)[:, None]
        weights = F.silu(scores) / self.n * keep[:, None]  # pointwise, not a softmax: no competition among keys
        if self.attention_dropout.p > 0:
            weights = self.attention_dropout(weights)
        attended = (weights @ v).transpose(1, 2).reshape(B, L, D)  # (B, L, D)
        return x + self.out(self.dropout(u * F.layer_norm(attended, (D,), eps=self.eps)))


class HSTUModel(PreTrainedModel):
    config_class = HSTUConfig
    base_model_prefix = "hstu"
    _supports_sdpa = True  # accepted and ignored: the pointwise attention is its own, with no kernel to choose
    accepts_timestamps = True
    """The User LLM passes each position's unix time (seconds) as `timestamps`."""

    def __init__(self, config: HSTUConfig) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)  # unused: inputs are embeddings
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(HSTUBlock(config) for _ in range(config.num_hidden_layers))
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        # as the reference: std 0.02 for U/V/Q/K and the biases, Xavier for the output maps, std 1/sqrt(D) for
        # the position embeddings
        if isinstance(module, HSTUBlock):
            nn.init.normal_(module.uvqk.weight, std=0.02)
            nn.init.xavier_uniform_(module.out.weight)
            nn.init.zeros_(module.out.bias)
        elif isinstance(module, RelativeBias):
            nn.init.normal_(module.position_bias, std=0.02)
            nn.init.normal_(module.time_bias, std=0.02)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=1 / math.sqrt(self.config.hidden_size))

    def get_input_embeddings(self) -> nn.Module:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.embed_tokens = value

    def forward(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, timestamps: torch.Tensor | None = None,
                **kwargs) -> BaseModelOutput:
        """inputs_embeds (B, L, D); attention_mask (B, L) 1 on real positions; position_ids (B, L);
        timestamps (B, L) unix seconds, or None for no time bias."""
        B, L, _ = inputs_embeds.shape
        if attention_mask is None:
            attention_mask = torch.ones(B, L, dtype=torch.long, device=inputs_embeds.device)
        if position_ids is None:
            position_ids = torch.arange(L, device=inputs_embeds.device).expand(B, L)
        last = self.config.max_position_embeddings - 1
        position_ids = position_ids.clamp(max=last)
        x = self.dropout(inputs_embeds + self.position_embeddings(position_ids))  # (B, L, D)
        causal = torch.ones(L, L, dtype=torch.bool, device=x.device).tril()
        keep = causal & attention_mask.bool()[:, None, :]  # (B, L, L)
        # the bias tables' indices, once for every block
        distance = (position_ids[:, :, None] - position_ids[:, None, :]).clamp(0, last)
        buckets = bucket_of(timestamps[:, :, None] - timestamps[:, None, :], self.config.time_buckets) \
            if timestamps is not None else None  # (B, L, L)
        for block in self.blocks:
            x = block(x, keep, distance, buckets)
        return BaseModelOutput(last_hidden_state=x)


AutoConfig.register("hstu", HSTUConfig, exist_ok=True)
AutoModel.register(HSTUConfig, HSTUModel, exist_ok=True)
