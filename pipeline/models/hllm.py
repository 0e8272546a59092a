"""HLLM: an Item LLM turns item text into an embedding; a User LLM reads a user's item embeddings and predicts
the next one. Trained with the official `nce` loss (cosine x learnable scale, shared sampled negatives).

Shapes: B items or users in a batch, T tokens per item, L positions per user sequence, D embedding size
(= the User LLM's hidden size; the Item LLM projects to it when its own hidden size differs), P valid positions,
K negatives.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
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


def gather_rows(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """table[index] with a deterministic backward. Plain indexing accumulates the gradient of repeated rows with
    a multithreaded CPU kernel whose float sums depend on thread timing (for 32,768+ elements), which made stage
    one differ from run to run; the embedding backward sums in a fixed order."""
    return F.embedding(index, table)


class UserLLM(nn.Module):
    """A causal decoder over item embeddings (its word embeddings are unused): output i predicts item i+1."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.dim = backbone.config.hidden_size

    def forward(self, item_embs: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """item_embs (B, L, D) left-padded, attention_mask (B, L) 1 on real items. Returns (B, L, D)."""
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, L): each user starts at 0
        return self.backbone(inputs_embeds=item_embs, attention_mask=attention_mask,
                             position_ids=position_ids).last_hidden_state


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


LOGIT_SCALE_INIT = math.log(1 / 0.07)
LOGIT_SCALE_MAX = math.log(100.0)


@dataclass
class NCEOutput:
    loss_per_position: torch.Tensor
    """(P,) fp32."""
    surviving_negatives: torch.Tensor
    """(P,) negatives left after masking collisions with the target."""
    top1_correct: torch.Tensor
    """(P,) bool: the positive outscored every surviving negative."""


def nce_loss(user_out: torch.Tensor, targets: torch.Tensor, target_ids: torch.Tensor, negatives: torch.Tensor,
             negative_ids: torch.Tensor, logit_scale: torch.Tensor) -> NCEOutput:
    """The official `nce` loss with DESIGN.md's fixes: fp32, collisions masked by item id.

    user_out (P, D) predictions at valid positions, targets (P, D) the next items' embeddings, target_ids (P,),
    negatives (K, D) shared by every position, negative_ids (K,), logit_scale a scalar (log of the scale).
    """
    u = F.normalize(user_out.float(), dim=-1)  # (P, D)
    t = F.normalize(targets.float(), dim=-1)  # (P, D)
    n = F.normalize(negatives.float(), dim=-1)  # (K, D)
    scale = logit_scale.float().exp()
    pos = (u * t).sum(-1, keepdim=True) * scale  # (P, 1)
    neg = (u @ n.T) * scale  # (P, K)
    collide = target_ids[:, None] == negative_ids[None, :]  # (P, K)
    # mask after scaling: a -inf that reaches the product would make the scale's gradient NaN
    neg = neg.masked_fill(collide, float("-inf"))
    logits = torch.cat([pos, neg], dim=1)  # (P, 1 + K)
    labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
    loss = F.cross_entropy(logits, labels, reduction="none")  # (P,)
    return NCEOutput(loss, (~collide).sum(1), logits.argmax(1) == 0)


class HLLM(nn.Module):
    """Item LLM + User LLM + the learnable logit scale: what stage one trains end to end."""

    def __init__(self, item_llm: ItemLLM, user_llm: UserLLM) -> None:
        super().__init__()
        if item_llm.dim != user_llm.dim:
            raise ValueError(f"item embedding size {item_llm.dim} != User LLM hidden size {user_llm.dim}")
        self.item_llm = item_llm
        self.user_llm = user_llm
        self.logit_scale = nn.Parameter(torch.tensor(LOGIT_SCALE_INIT))

    def encode_items(self, chunks: list[dict[str, torch.Tensor]]) -> torch.Tensor:
        """Item embeddings for token chunks (each a dict of input_ids/attention_mask/position_ids): (sum B, D)."""
        return torch.cat([self.item_llm(**chunk) for chunk in chunks], dim=0)

    def forward(self, batch: dict, gather_negatives=None) -> NCEOutput:
        """One training step's loss terms. `batch` (see pipeline.training.collate):
          chunks: token chunks of this process's unique items (positives + its share of the negatives)
          seq_index (B, L+1): row of each sequence item in the unique-item embeddings (pad -> 0)
          seq_ids (B, L+1): item_idx (0 = padding)
          neg_index (k,): rows of this process's negatives; negative_ids (K,): all negatives, gathered order
        `gather_negatives` concatenates every process's negatives (with gradients) under DDP.
        """
        with torch.no_grad():
            self.logit_scale.clamp_(0.0, LOGIT_SCALE_MAX)
        unique = self.encode_items(batch["chunks"])  # (U, D)
        seq = gather_rows(unique, batch["seq_index"])  # (B, L+1, D)
        seq_ids = batch["seq_ids"]  # (B, L+1)
        inputs, input_mask = seq[:, :-1], (seq_ids[:, :-1] > 0)  # (B, L, D), (B, L)
        out = self.user_llm(inputs, input_mask.long())  # (B, L, D)
        valid = input_mask & (seq_ids[:, 1:] > 0)  # (B, L)
        negatives = gather_rows(unique, batch["neg_index"])  # (k, D)
        if gather_negatives is not None:
            negatives = gather_negatives(negatives)  # (K, D)
        return nce_loss(out[valid], seq[:, 1:][valid], seq_ids[:, 1:][valid], negatives, batch["negative_ids"],
                        self.logit_scale)

    @torch.no_grad()
    def user_vectors(self, item_table: torch.Tensor, histories: torch.Tensor) -> torch.Tensor:
        """(U, D) prediction of the next item from left-padded histories (U, L) of item_idx (0 = padding),
        looking item embeddings up in `item_table` (N+1, D)."""
        mask = (histories > 0).long()  # (U, L)
        out = self.user_llm(item_table[histories], mask)  # (U, L, D)
        return out[:, -1]  # (U, D): the last position is always a real item (left padding)
