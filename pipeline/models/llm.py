"""The two LLMs of HLLM: an Item LLM turns item text into one embedding; a User LLM reads a sequence of item
embeddings and predicts the next one.

Shapes: B items or users in a batch, T tokens per item, L positions per user sequence, H a backbone's hidden size,
D the item embedding size (the Item LLM projects to it when its own hidden size differs).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from pipeline.errors import UserError


class ItemLLM(nn.Module):
    """Any Hugging Face base model (decoder or encoder), no vocabulary head; one embedding per item.

    pooling="item_token" (official): a placeholder position appended after the text has its input embedding
    replaced by a learnable [ITEM] vector; the item embedding is the last layer's hidden state there.
    pooling="mean": the mean of the last layer's hidden states over the text tokens.

    train_layers=K (partial depth) splits the model: the word embeddings and the lower blocks are frozen and read
    the text alone (`lower`: their per-token outputs, which can be computed once per item and kept); the top K blocks
    read those outputs, plus the [ITEM] vector, which enters there (at the first trained block), and are trained.
    """

    def __init__(self, backbone: nn.Module, pooling: str = "item_token", out_dim: int | None = None,
                 train_layers: int | None = None) -> None:
        super().__init__()
        if pooling not in ("item_token", "mean"):
            raise ValueError(f"pooling must be 'item_token' or 'mean', got {pooling!r}")
        self.backbone = backbone
        self.pooling = pooling
        hidden = backbone.config.hidden_size
        self.item_token = nn.Parameter(torch.empty(1, 1, hidden).normal_(0.0, 0.02)) if pooling == "item_token" \
            else None
        self.proj = nn.Linear(hidden, out_dim) if out_dim is not None and out_dim != hidden else None
        self.dim = out_dim or hidden
        self.train_layers = train_layers
        if train_layers is not None:
            self.split = BlockSplit(backbone, train_layers)
            self.split.freeze_lower()

    @property
    def n_item_tokens(self) -> int:
        return 1 if self.pooling == "item_token" else 0

    def weights_per_token(self) -> int:
        """Weights a training token passes through (for FLOP counts; embedding tables excluded): the top K blocks
        with partial depth (the frozen lower blocks' outputs are read from disk), else every layer, LoRA-wrapped
        ones included (frozen, they still run forward and backward)."""
        scope = self.split.blocks[self.split.cut:] if self.train_layers is not None else self.backbone
        return sum(p.numel() for n, p in scope.named_parameters() if "embed" not in n and ".lora_" not in n)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                lower: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids, attention_mask, position_ids: (B, T), left-padded; with item_token pooling the last
        position of every row is the [ITEM] slot (its id is ignored). With partial depth, `lower` (B, T - slots, H)
        is the frozen part's output at the text positions when kept; it is computed here otherwise. Returns (B, D)."""
        if self.train_layers is None:
            embeds = self.backbone.get_input_embeddings()(input_ids)  # (B, T, H)
            if self.item_token is not None:
                embeds = torch.cat([embeds[:, :-1], self._slot(embeds)], dim=1)  # (B, T, H)
            hidden = self.backbone(inputs_embeds=embeds, attention_mask=attention_mask,
                                   position_ids=position_ids).last_hidden_state  # (B, T, H)
        else:
            text = input_ids.shape[1] - self.n_item_tokens
            if lower is None:
                lower = self.lower(input_ids[:, :text], attention_mask[:, :text], position_ids[:, :text])
            x = lower if self.item_token is None else torch.cat([lower, self._slot(lower)], dim=1)  # (B, T, H)
            hidden = self.split.upper(x, attention_mask, position_ids)  # (B, T, H)
        if self.item_token is not None:
            emb = hidden[:, -1]  # (B, H)
        else:
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
            emb = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)  # (B, H)
        return self.proj(emb) if self.proj is not None else emb  # (B, D)

    def _slot(self, like: torch.Tensor) -> torch.Tensor:
        return self.item_token.to(like.dtype).expand(like.shape[0], 1, -1)  # (B, 1, H)

    @torch.no_grad()
    def lower(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor
              ) -> torch.Tensor:
        """Partial depth: the frozen part's per-token output (B, T, H) for text-only chunks, always without dropout
        (what is kept on disk and what is recomputed must be the same)."""
        was_training = self.backbone.training
        self.backbone.eval()
        try:
            return self.split.lower(input_ids, attention_mask, position_ids)
        finally:
            self.backbone.train(was_training)


FINAL_NORMS = ("norm", "ln_f", "final_layer_norm", "final_layernorm")
"""What decoders call the norm after their last block (Llama, Qwen, Mistral: norm; GPT-2: ln_f; OPT ...)."""


class _PassThrough(nn.Module):
    """Stands in for an encoder's embedding module (word + position + type embeddings and a norm) when the blocks
    are fed states that already went through it."""

    def forward(self, input_ids=None, inputs_embeds=None, **_) -> torch.Tensor:
        return inputs_embeds


class BlockSplit:
    """A backbone cut between its frozen lower blocks and its top `k` trained blocks. Each part runs through the
    model's own forward (its masks, rotary positions and kernels) with the block list cut to that part's blocks:
    the upper part skips the embedding module (its input is the lower part's output), the lower part skips the
    final norm. `check` proves the two parts together compute what the whole model does."""

    def __init__(self, backbone: nn.Module, k: int) -> None:
        self.backbone = backbone
        self.parent, self.name = _block_list(backbone)
        self.blocks = getattr(self.parent, self.name)
        if not 1 <= k <= len(self.blocks):
            raise UserError(f"item.train_layers={k}: the Item LLM has {len(self.blocks)} layers; use 1 to "
                            f"{len(self.blocks)}, or null to train every layer and the word embeddings")
        self.cut = len(self.blocks) - k
        self.final_norm = next((n for n in FINAL_NORMS if isinstance(getattr(backbone, n, None), nn.Module)), None)
        self.check()

    def freeze_lower(self) -> None:
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        for block in self.blocks[self.cut:]:
            for p in block.parameters():
                p.requires_grad_(True)
        if self.final_norm is not None:
            getattr(self.backbone, self.final_norm).requires_grad_(True)

    def lower(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor
              ) -> torch.Tensor:
        embeds = self.backbone.get_input_embeddings()(input_ids)  # (B, T, H)
        with self._swapped(self.blocks[:self.cut], upper=False):
            return self.backbone(inputs_embeds=embeds, attention_mask=attention_mask,
                                 position_ids=position_ids).last_hidden_state

    def upper(self, states: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        with self._swapped(self.blocks[self.cut:], upper=True):
            return self.backbone(inputs_embeds=states, attention_mask=attention_mask,
                                 position_ids=position_ids).last_hidden_state

    @contextlib.contextmanager
    def _swapped(self, blocks: nn.ModuleList, upper: bool):
        saved = {(self.parent, self.name): self.blocks}
        setattr(self.parent, self.name, blocks)
        if upper and isinstance(getattr(self.backbone, "embeddings", None), nn.Module):
            saved[(self.backbone, "embeddings")] = self.backbone.embeddings
            self.backbone.embeddings = _PassThrough()
        if not upper and self.final_norm is not None:
            saved[(self.backbone, self.final_norm)] = getattr(self.backbone, self.final_norm)
            setattr(self.backbone, self.final_norm, nn.Identity())
        try:
            yield
        finally:
            for (module, name), original in saved.items():
                setattr(module, name, original)

    @torch.no_grad()
    def check(self) -> None:
        """Refuse an architecture whose split does not reproduce the whole model (one that adds positions to
        inputs_embeds inside its forward, such as GPT-2, would add them twice)."""
        was_training = self.backbone.training
        self.backbone.eval()
        vocab = self.backbone.get_input_embeddings().num_embeddings
        ids = torch.arange(10).remainder(vocab).view(2, 5).to(next(self.backbone.parameters()).device)
        mask = torch.ones_like(ids)
        mask[1, :2] = 0
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        whole = self.backbone(input_ids=ids, attention_mask=mask, position_ids=positions).last_hidden_state
        split = self.upper(self.lower(ids, mask, positions), mask, positions)
        self.backbone.train(was_training)
        if not torch.allclose(whole[mask.bool()], split[mask.bool()], atol=1e-4, rtol=1e-3):
            raise UserError(f"item.train_layers: {type(self.backbone).__name__} cannot be cut between its layers "
                            "here (its parts do not reproduce the whole model); set item.train_layers=null")


def _block_list(backbone: nn.Module) -> tuple[nn.Module, str]:
    """The module holding the backbone's list of transformer blocks, and that list's attribute name."""
    n = backbone.config.num_hidden_layers
    for module in backbone.modules():
        for name, child in module.named_children():
            if isinstance(child, nn.ModuleList) and len(child) == n:
                return module, name
    raise UserError(f"item.train_layers: found no list of {n} layers in {type(backbone).__name__}; set "
                    "item.train_layers=null")


def add_lora(item_llm: ItemLLM, rank: int, alpha: float, targets: tuple[str, ...] = ()) -> int:
    """LoRA through peft: low-rank adapters on the Item LLM's linear layers (with partial depth, those of its trained
    top layers only), whose own weights then stay as loaded. `targets`: names or name endings of the layers to wrap
    (empty: every linear layer in scope). Returns the number of wrapped layers."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError:
        raise UserError("item.lora_rank: LoRA needs peft; pip install 'hllm-pipeline[lora]'") from None
    from transformers.pytorch_utils import Conv1D

    backbone = item_llm.backbone
    scope = item_llm.split.blocks[item_llm.split.cut:] if item_llm.train_layers is not None else backbone
    in_scope = {id(m) for m in scope.modules()}
    names = [name for name, m in backbone.named_modules()
             if isinstance(m, (nn.Linear, Conv1D)) and id(m) in in_scope
             and (not targets or any(name == t or name.endswith("." + t) for t in targets))]
    if not names:
        raise UserError(f"item.lora_targets={','.join(targets) or '(every linear layer)'}: no linear layer of "
                        f"{type(backbone).__name__} matches, so LoRA has nothing to wrap; name some of its layers "
                        "(e.g. query,value or q_proj,v_proj) or set item.lora_rank=null")
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=names)
    try:
        inject_adapter_in_model(config, backbone)
    except (ValueError, TypeError, NotImplementedError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"item.lora_rank: peft cannot wrap {type(backbone).__name__}: {first}; "
                        "set item.lora_rank=null") from None
    for name, p in backbone.named_parameters():
        p.requires_grad_(".lora_" in name)
    return len(names)


def has_lora(module: nn.Module) -> bool:
    return any(".lora_" in name for name, _ in module.named_parameters())


def merge_lora(item_llm: ItemLLM) -> None:
    """Fold every adapter into its layer's weight and put the plain layer back: the model is an ordinary one again,
    which the embedding job, `refresh items` and `eval` load without peft."""
    if not has_lora(item_llm.backbone):
        return
    from peft.tuners.tuners_utils import BaseTunerLayer

    backbone = item_llm.backbone
    for name, module in list(backbone.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge()
            parent, _, child = name.rpartition(".")
            setattr(backbone.get_submodule(parent), child, module.get_base_layer())


def lora_merged_state(backbone: nn.Module) -> dict[str, torch.Tensor] | None:
    """The weights merge_lora would leave, under the plain model's names, computed without changing the model
    (checkpoints mid-training are plain models too); None when the backbone has no adapter."""
    if not has_lora(backbone):
        return None
    from peft.tuners.tuners_utils import BaseTunerLayer

    state = {key: value for key, value in backbone.state_dict().items() if ".lora_" not in key}
    for name, module in backbone.named_modules():
        if isinstance(module, BaseTunerLayer):
            for adapter in module.active_adapters:  # what merge() adds, in the same order
                state[f"{name}.base_layer.weight"] = state[f"{name}.base_layer.weight"] + \
                    module.get_delta_weight(adapter).detach()
            for part in ("weight", "bias"):
                if f"{name}.base_layer.{part}" in state:
                    state[f"{name}.{part}"] = state.pop(f"{name}.base_layer.{part}")
    return state


class UserLLM(nn.Module):
    """A causal decoder over item embeddings (its word embeddings are unused): output i predicts item i+1."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.dim = backbone.config.hidden_size
        self.reads_time = getattr(backbone, "accepts_timestamps", False)
        """The decoder takes each position's unix time (HSTU's time bias); others never see it."""
        config = backbone.config
        self.max_positions = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
        """Positions the decoder has (learned position tables end there); None where it does not say."""

    def forward(self, item_embs: torch.Tensor, attention_mask: torch.Tensor, timestamps: torch.Tensor | None = None
                ) -> torch.Tensor:
        """item_embs (B, L, D) left-padded, attention_mask (B, L) 1 on real items, timestamps (B, L) unix seconds
        (read only by a decoder that takes them). Returns (B, L, D)."""
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, L): each user starts at 0
        extra = {"timestamps": timestamps} if self.reads_time else {}
        return self.backbone(inputs_embeds=item_embs, attention_mask=attention_mask, position_ids=position_ids,
                             **extra).last_hidden_state


def drop_word_embeddings(backbone: nn.Module) -> None:
    """The User LLM never looks tokens up: replace its (vocab, H) table by a (1, H) stub to save memory."""
    hidden = backbone.config.hidden_size
    stub = nn.Embedding(1, hidden)
    stub.weight.requires_grad_(False)  # never used, so never trained (DDP insists every trained weight is used)
    backbone.set_input_embeddings(stub)
    backbone.config.vocab_size = 1
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
        if hasattr(backbone.config, name):
            setattr(backbone.config, name, None)


@torch.no_grad()
def assert_causal(backbone: nn.Module, where: str) -> None:
    """Refuse a User LLM whose output at position 0 depends on position 1 (an encoder such as BERT)."""
    was_training = backbone.training
    backbone.eval()
    param = next(backbone.parameters())
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, 2, backbone.config.hidden_size, generator=generator).to(param.device, param.dtype)
    y = x.clone()
    y[:, 1] = 10 * torch.randn(backbone.config.hidden_size, generator=generator).to(param.device, param.dtype)
    mask = torch.ones(1, 2, dtype=torch.long, device=param.device)
    a = backbone(inputs_embeds=x, attention_mask=mask).last_hidden_state[:, 0].float()
    b = backbone(inputs_embeds=y, attention_mask=mask).last_hidden_state[:, 0].float()
    backbone.train(was_training)
    # a causal model computes position 0 from position 0 alone: equal up to rounding
    if (a - b).abs().max() > 1e-6 * (1 + a.abs().max()):
        raise UserError(f"{where}: the User LLM must be a causal decoder (Llama, Qwen, Mistral, SmolLM2 ...); "
                        f"this {type(backbone).__name__} lets a position see the future")
