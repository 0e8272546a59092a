"""The two LLMs of HLLM: an Item LLM turns item text into one embedding; a User LLM reads a sequence of item
embeddings and predicts the next one.

Shapes: B items or users in a batch, T tokens per item, L positions per user sequence, H a backbone's hidden size,
D the item embedding size (the Item LLM projects to it when its own hidden size differs).
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.errors import UserError


class ItemLLM(nn.Module):
    """Any Hugging Face base model (decoder or encoder), no vocabulary head; one embedding per item.

    pooling="item_token" (official): a placeholder position appended after the text has its input embedding
    replaced by a learnable [ITEM] vector; the item embedding is the last layer's hidden state there.
    pooling="mean": the mean of the last layer's hidden states over the text tokens.
    """

    def __init__(self, backbone: nn.Module, pooling: str = "item_token", out_dim: int | None = None) -> None:
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

    @property
    def n_item_tokens(self) -> int:
        return 1 if self.pooling == "item_token" else 0

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor
                ) -> torch.Tensor:
        """input_ids, attention_mask, position_ids: (B, T), left-padded; with item_token pooling the last
        position of every row is the [ITEM] slot (its id is ignored). Returns (B, D)."""
        embeds = self.backbone.get_input_embeddings()(input_ids)  # (B, T, H)
        if self.item_token is not None:
            slot = self.item_token.to(embeds.dtype).expand(embeds.shape[0], 1, -1)  # (B, 1, H)
            embeds = torch.cat([embeds[:, :-1], slot], dim=1)  # (B, T, H)
        hidden = self.backbone(inputs_embeds=embeds, attention_mask=attention_mask,
                               position_ids=position_ids).last_hidden_state  # (B, T, H)
        if self.item_token is not None:
            emb = hidden[:, -1]  # (B, H)
        else:
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
            emb = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)  # (B, H)
        return self.proj(emb) if self.proj is not None else emb  # (B, D)


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
