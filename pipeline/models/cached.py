"""Stage two's model: the User LLM on cached item embeddings (the Item LLM is never built).

Inputs at position i are the cached embedding of item i, plus optional additive features: a time embedding
(the paper's Algorithm 1: year, month, day, hour, minute, second -> embeddings -> MLP) and an item-ID embedding.
Targets and negatives are the cached embeddings themselves (through the optional adapter, a small residual MLP
that starts as the identity). Shapes: B users, L positions, D embedding size, N catalogue items, K negatives.
"""

from __future__ import annotations

import datetime as dt

import numpy as np
import torch
from torch import nn

from pipeline.models.hllm import LOGIT_SCALE_INIT, LOGIT_SCALE_MAX, NCEOutput, UserLLM, nce_loss

TIME_FIELDS = ("year", "month", "day", "hour", "minute", "second")
TIME_SIZES = (200, 13, 32, 24, 60, 60)  # years are offset from 1900


def time_features(timestamps: np.ndarray, precision: str = "second") -> np.ndarray:
    """(..., 6) int64 calendar fields (UTC) of unix seconds; fields finer than `precision` are 0; 0 s -> all 0."""
    keep = TIME_FIELDS.index(precision) + 1
    flat = np.asarray(timestamps, dtype=np.int64).reshape(-1)
    out = np.zeros((len(flat), 6), dtype=np.int64)
    for row, ts in enumerate(flat):
        if ts == 0:
            continue
        t = dt.datetime.fromtimestamp(int(ts), dt.UTC)
        out[row] = (min(max(t.year - 1900, 0), 199), t.month, t.day, t.hour, t.minute, t.second)
    out[:, keep:] = 0
    return out.reshape(*np.shape(timestamps), 6)


class TimeEmbedding(nn.Module):
    """Algorithm 1 of the paper: one embedding table per calendar field, concatenated, then an MLP to D."""

    def __init__(self, dim: int, field_dim: int = 32) -> None:
        super().__init__()
        self.tables = nn.ModuleList(nn.Embedding(size, field_dim) for size in TIME_SIZES)
        self.mlp = nn.Sequential(nn.Linear(6 * field_dim, dim), nn.GELU(), nn.Linear(dim, dim))

    def forward(self, fields: torch.Tensor) -> torch.Tensor:
        """fields (B, L, 6) -> (B, L, D)."""
        parts = [table(fields[..., i]) for i, table in enumerate(self.tables)]  # 6 x (B, L, field_dim)
        return self.mlp(torch.cat(parts, dim=-1))


class CachedUserModel(nn.Module):
    def __init__(self, table: torch.Tensor, user_llm: UserLLM, time_embedding: bool = False,
                 item_id_embedding: bool = False, adapter: bool = False) -> None:
        super().__init__()
        if table.shape[1] != user_llm.dim:
            raise ValueError(f"cached embeddings have size {table.shape[1]}, the User LLM {user_llm.dim}")
        dim = user_llm.dim
        self.register_buffer("table", table.float(), persistent=False)  # (N+1, D), frozen, never saved
        self.user_llm = user_llm
        self.time = TimeEmbedding(dim) if time_embedding else None
        self.item_ids = nn.Embedding(table.shape[0], dim, padding_idx=0) if item_id_embedding else None
        if self.item_ids is not None:
            nn.init.normal_(self.item_ids.weight, std=0.02)
            with torch.no_grad():
                self.item_ids.weight[0].zero_()
        self.adapter = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim)) if adapter else None
        if self.adapter is not None:
            nn.init.zeros_(self.adapter[2].weight)  # starts as the identity (residual)
            nn.init.zeros_(self.adapter[2].bias)
        self.logit_scale = nn.Parameter(torch.tensor(LOGIT_SCALE_INIT))

    def items(self, ids: torch.Tensor) -> torch.Tensor:
        """Item embeddings (..., D) of item_idx `ids`, through the adapter when there is one."""
        emb = self.table[ids]
        return emb + self.adapter(emb) if self.adapter is not None else emb

    def inputs(self, ids: torch.Tensor, times: torch.Tensor | None) -> torch.Tensor:
        """User LLM inputs (B, L, D): item embedding + time embedding + item-ID embedding."""
        x = self.items(ids)
        if self.time is not None and times is not None:
            x = x + self.time(times)
        if self.item_ids is not None:
            x = x + self.item_ids(ids)
        return x

    def forward(self, batch: dict, gather=None) -> NCEOutput:
        """batch: seq_ids (B, L+1) item_idx left-padded with 0, times (B, L+1, 6) or absent, negative_ids (K,);
        in_batch: also use the batch's other target items as negatives."""
        with torch.no_grad():
            self.logit_scale.clamp_(0.0, LOGIT_SCALE_MAX)
        seq_ids = batch["seq_ids"]  # (B, L+1)
        times = batch.get("times")
        input_ids, target_ids = seq_ids[:, :-1], seq_ids[:, 1:]  # (B, L)
        mask = input_ids > 0  # (B, L)
        out = self.user_llm(self.inputs(input_ids, times[:, :-1] if times is not None else None), mask.long())
        valid = mask & (target_ids > 0)  # (B, L)
        negative_ids = batch["negative_ids"]  # (K,)
        if batch.get("in_batch"):
            # the other positions' targets are free extra negatives (collisions are masked by id as usual)
            negative_ids = torch.cat([negative_ids, target_ids[valid]])
        return nce_loss(out[valid], self.items(target_ids[valid]), target_ids[valid], self.items(negative_ids),
                        negative_ids, self.logit_scale)

    @torch.no_grad()
    def user_vectors(self, histories: torch.Tensor, times: torch.Tensor | None = None) -> torch.Tensor:
        """(U, D) next-item predictions from left-padded histories (U, L) (and their times (U, L, 6))."""
        mask = (histories > 0).long()
        return self.user_llm(self.inputs(histories, times), mask)[:, -1]

    @torch.no_grad()
    def item_table(self) -> torch.Tensor:
        """(N+1, D) the embeddings users are scored against (row 0 = padding)."""
        return self.items(torch.arange(self.table.shape[0], device=self.table.device))
