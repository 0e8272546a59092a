"""The sequence model every stage trains: an item source, a User LLM over its embeddings, one loss.

Position i of a user's sequence reads the embedding of item i (from the item source: the Item LLM over text,
cached embeddings, an ID table, or a sum), plus optional additive inputs: a time embedding (the HLLM paper's
Algorithm 1: year, month, day, hour, minute, second -> embeddings -> MLP) and an item-ID embedding. The User
LLM's output at position i predicts item i+1; targets and negatives are embedded by the same item source.

Shapes: B users, L positions (L+1 items: L inputs, each predicting the next), D the User LLM's width, D_item the
item embedding size (equal to D unless a projection maps between them), U distinct items of a step, P valid
positions, K negatives.
"""

from __future__ import annotations

import datetime as dt
import math
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.models.item_sources import ItemSource
from pipeline.models.llm import UserLLM
from pipeline.models.loss import (
    LOGIT_SCALE_INIT,
    LOGIT_SCALE_MAX,
    NCEOutput,
    nce_loss,
    projected_softmax_loss,
    softmax_loss,
)

if TYPE_CHECKING:
    from pipeline.batches import StepBatch

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


def gather_rows(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """table[index] with a deterministic backward. Plain indexing accumulates the gradient of repeated rows with
    a multithreaded CPU kernel whose float sums depend on thread timing (for 32,768+ elements), which made
    training differ from run to run; the embedding backward sums in a fixed order."""
    return F.embedding(index, table)


class SequenceModel(nn.Module):
    def __init__(self, items: ItemSource, user_llm: UserLLM, time_embedding: bool = False,
                 item_id_embedding: bool = False, time_precision: str = "second", projection: bool = False,
                 scale_inputs: bool = False, temperature: float | None = None) -> None:
        super().__init__()
        if items.dim != user_llm.dim and not projection:
            raise ValueError(f"item embeddings have size {items.dim}, the User LLM {user_llm.dim}")
        dim = user_llm.dim
        self.items = items
        self.user_llm = user_llm
        # item space (D_item) -> the User LLM's width (D) and back: scores stay in the item space
        self.project_in = nn.Linear(items.dim, dim) if projection else None
        self.project_out = nn.Linear(dim, items.dim) if projection else None
        self.time = TimeEmbedding(dim) if time_embedding else None
        self.time_precision = time_precision
        self.item_ids = nn.Embedding(items.num_items + 1, dim, padding_idx=0) if item_id_embedding else None
        if self.item_ids is not None:
            nn.init.normal_(self.item_ids.weight, std=0.02)
            with torch.no_grad():
                self.item_ids.weight[0].zero_()
        # SASRec and the Transformer multiply the item embeddings by sqrt(D) before positions are added: a table
        # initialised small (std 0.02) is otherwise drowned by the positions and the blocks' outputs
        self.input_scale = math.sqrt(dim) if scale_inputs else 1.0
        # learned from 1/0.07, or fixed at 1/temperature (generative-recommenders: 0.05)
        init = LOGIT_SCALE_INIT if temperature is None else math.log(1 / temperature)
        self.logit_scale = nn.Parameter(torch.tensor(init), requires_grad=temperature is None)

    def inputs(self, rows: torch.Tensor, index: torch.Tensor, ids: torch.Tensor, times: torch.Tensor | None
               ) -> torch.Tensor:
        """User LLM inputs (B, L, D): item embedding (rows (R, D_item) at index (B, L), projected, scaled) + time
        embedding + item-ID embedding."""
        if self.project_in is None:
            x = gather_rows(rows, index)
        elif rows.shape[0] < index.numel():  # fewer rows than positions: project each row once, then gather
            x = gather_rows(self.project_in(rows), index)
        else:
            x = self.project_in(gather_rows(rows, index))
        x = x * self.input_scale if self.input_scale != 1.0 else x
        if self.time is not None and times is not None:
            x = x + self.time(times)
        if self.item_ids is not None:
            x = x + self.item_ids(ids)
        return x

    def forward(self, batch: StepBatch, gather=None) -> NCEOutput:
        """One step's loss terms (pipeline.batches.StepBatch). `gather` concatenates every process's rows (with
        gradients) under DDP, for sources whose negatives are embedded in shares."""
        rows = self.step_rows(batch)  # (U, D_item)
        hidden = self.hidden_states(batch, rows, upto=-1)  # (B, L, D): inputs 0..L-1, each predicting the next
        return self.next_item_loss(batch, rows, hidden, gather)

    def step_rows(self, batch: StepBatch) -> torch.Tensor:
        """(U, D_item) the step's distinct items as the item source embeds them."""
        with torch.no_grad():
            self.logit_scale.clamp_(0.0, LOGIT_SCALE_MAX)
        rows = self.items(batch.item_inputs)  # (U, D_item) the step's distinct items
        if self.items.negatives_from_table:
            # every score reads the table's values, the step's own items with the fresh rows' gradient: an item
            # encoded since the table was made must not stand out from the negatives by its newness alone
            rows = self.items.negative_table[batch.row_ids] + (rows - rows.detach())
        return rows

    def hidden_states(self, batch: StepBatch, rows: torch.Tensor, upto: int | None = None) -> torch.Tensor:
        """(B, L', D) User LLM outputs over the sequence items [:upto] (upto=-1: all but the last, the next-item
        inputs; None: all L+1, as a ranker reads them). Causal: position p has read items 0..p only."""
        cut = slice(None, upto)
        ids = batch.seq_ids[:, cut]  # (B, L') item_idx, left-padded with 0
        times = batch.times[:, cut] if batch.times is not None else None  # (B, L', 6)
        stamps = batch.stamps[:, cut] if batch.stamps is not None else None  # (B, L')
        inputs = self.inputs(rows, batch.seq_index[:, cut], ids, times)  # (B, L', D)
        return self.user_llm(inputs, (ids > 0).long(), stamps)

    def next_item_loss(self, batch: StepBatch, rows: torch.Tensor, hidden: torch.Tensor, gather=None
                       ) -> NCEOutput:
        """The next-item loss of each valid position, from the outputs `hidden` (B, L, D) at inputs 0..L-1."""
        seq_ids = batch.seq_ids  # (B, L+1) item_idx, left-padded with 0
        input_ids, target_ids = seq_ids[:, :-1], seq_ids[:, 1:]  # (B, L)
        valid = (input_ids > 0) & (target_ids > 0)  # (B, L)
        valid_target_ids = target_ids[valid]  # (P,)
        if self.items.negatives_from_table:  # rows of a table the Item LLM recomputes every few steps
            negatives = self.items.negative_table[batch.negative_ids]  # (K, D_item)
            # a negative that is one of the step's own items is also pushed away, through its fresh row's gradient
            own = (batch.neg_index >= 0)[:, None]  # (K, 1)
            negatives = torch.where(own, gather_rows(rows, batch.neg_index.clamp(min=0)), negatives)
        else:
            negatives = gather_rows(rows, batch.neg_index)  # (k, D_item) this process's negatives
        if batch.full_catalogue and not self.items.negatives_from_table:
            # negatives = the trainable catalogue in item_idx order (1..N, or without held-out new items): plain
            # cross-entropy, the fast way (the targets' own rows are the positives, which a table's stale rows
            # must not be); a target's class is its row in that catalogue
            target_rows = torch.searchsorted(batch.negative_ids, valid_target_ids) + 1  # (P,) in 1..N'
            if self.project_out is not None:
                return projected_softmax_loss(hidden[valid], self.project_out, target_rows, negatives,
                                              self.logit_scale)
            return softmax_loss(hidden[valid], target_rows, negatives, self.logit_scale)
        out = self.outputs(hidden)  # (B, L, D_item)
        targets = gather_rows(rows, batch.seq_index[:, 1:][valid])  # (P, D_item)
        if gather is not None and self.items.shard_negatives:
            negatives = gather(negatives)  # (K, D)
        negative_ids = batch.negative_ids  # (K,)
        if batch.in_batch_negatives:
            # the other positions' targets are free extra negatives (collisions are masked by id as usual)
            negatives = torch.cat([negatives, targets])
            negative_ids = torch.cat([negative_ids, valid_target_ids])
        return nce_loss(out[valid], targets, valid_target_ids, negatives, negative_ids, self.logit_scale)

    @torch.no_grad()
    def user_vectors(self, table: torch.Tensor, histories: torch.Tensor, times: torch.Tensor | None = None,
                     stamps: torch.Tensor | None = None) -> torch.Tensor:
        """(U, D) next-item predictions from left-padded histories (U, L) of item_idx (and their time fields
        (U, L, 6) and unix seconds (U, L), for the models that read them), looking items up in `table` (N+1, D) =
        items.table()."""
        mask = (histories > 0).long()  # (U, L)
        out = self.user_llm(self.inputs(table, histories, histories, times), mask, stamps)  # (U, L, D)
        return self.outputs(out[:, -1])  # the last position is always a real item (left padding)

    @property
    def reads_time(self) -> bool:
        """Whether the model needs the interactions' timestamps (a time embedding, or a User LLM such as HSTU
        whose attention is biased by the time between interactions)."""
        return self.time is not None or self.user_llm.reads_time

    def outputs(self, out: torch.Tensor) -> torch.Tensor:
        """User LLM outputs (..., D) -> predictions in the item space (..., D_item)."""
        return self.project_out(out) if self.project_out is not None else out
