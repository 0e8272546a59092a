"""Discriminative HLLM: a sequence model that scores (user, candidate) pairs with a click-style logit.

The paper's ranking half (its equations 2 and 3). Every labelled interaction is an example: the user's history
before it, the candidate (the item), and a 0/1 label (e.g. rating >= 4). One causal pass over a training
sequence of L+1 items scores every position at once, since position p's output has read items 0..p and nothing
later:

  early fusion  the candidate is the last input: a head on the output at the candidate's own position p gives the
                logit, so the User LLM reads history and candidate together;
  late fusion   a user embedding that cannot depend on the candidate (the output at p-1, the last history item:
                causal attention has read the history and nothing after it, the place of the paper's appended
                [USER] token) and the candidate's embedding meet only in a head on (u, c, u*c);
  none          no fusion, the baseline: the generative User LLM's score of the candidate (its cosine with the
                next-item prediction at p-1, times the logit scale) through a learned affine map.

Loss per labelled position: binary cross-entropy + generative_weight x the next-item loss of stage two (0 turns it
off). Shapes: B sequences, L+1 items, D the User LLM's width, D_item the item embedding size, P positions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.models.sequence_model import SequenceModel, gather_rows

if TYPE_CHECKING:
    from pipeline.batches import StepBatch

Fusion = Literal["early", "late", "none"]
FUSIONS = ("early", "late", "none")


@dataclass
class RankingOutput:
    """One step's terms, in the loop's per-position form (positions: the labelled (history, candidate) pairs)."""

    loss_per_position: torch.Tensor
    """(P,) fp32 at each labelled position: BCE, plus generative_weight x the next-item loss."""
    surviving_negatives: torch.Tensor
    """(P,) the next-item loss's negatives kept (0 without it)."""
    top1_correct: torch.Tensor
    """(P,) bool: the logit on the label's side of 0."""
    logits: torch.Tensor
    """(P,) the candidate logits."""
    labels: torch.Tensor
    """(P,) 1 or 0."""


class RankingModel(SequenceModel):
    def __init__(self, *args, fusion: Fusion = "early", generative_weight: float = 0.0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {FUSIONS}, got {fusion!r}")
        dim, item_dim = self.user_llm.dim, self.items.dim
        self.fusion, self.generative_weight = fusion, generative_weight
        if fusion == "early":
            self.rank_head = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, 1))
        elif fusion == "late":
            self.user_head = nn.Linear(dim, dim)
            self.candidate_head = nn.Linear(item_dim, dim)
            self.rank_head = nn.Sequential(nn.Linear(3 * dim, dim), nn.GELU(), nn.Linear(dim, 1))
        else:
            self.calibration = nn.Parameter(torch.tensor([1.0, 0.0]))  # logit = a * scale * cosine + b

    def forward(self, batch: StepBatch, gather=None) -> RankingOutput:
        rows = self.step_rows(batch)  # (U, D_item)
        hidden = self.hidden_states(batch, rows)  # (B, L+1, D) every item an input
        seq_ids = batch.seq_ids  # (B, L+1)
        valid = (seq_ids[:, :-1] > 0) & (seq_ids[:, 1:] > 0)  # (B, L) pair (p-1, p) for p = 1..L
        labels = batch.labels[:, 1:][valid]  # (P,) the candidate at p
        candidates = gather_rows(rows, batch.seq_index[:, 1:][valid])  # (P, D_item)
        logits = self.logits(hidden[:, :-1][valid], hidden[:, 1:][valid], candidates)  # (P,)
        with torch.autocast(logits.device.type, enabled=False):
            loss = F.binary_cross_entropy_with_logits(logits.float(), labels.clamp(min=0).float(), reduction="none")
        surviving = torch.zeros_like(loss)
        if self.generative_weight > 0:
            nce = self.next_item_loss(batch, rows, hidden[:, :-1], gather)
            loss, surviving = loss + self.generative_weight * nce.loss_per_position, nce.surviving_negatives
        labelled = labels >= 0  # the loss is over the labelled positions (StepBatch.positions counts them)
        correct = (logits > 0) == (labels == 1)
        return RankingOutput(loss[labelled], surviving[labelled], correct[labelled], logits.detach()[labelled],
                             labels[labelled])

    def logits(self, before: torch.Tensor, at: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """(P,) logits from the outputs at p-1 (`before`, (P, D): the history only) and at p (`at`, (P, D): history
        and candidate) and the candidates' embeddings (P, D_item)."""
        if self.fusion == "early":
            return self.rank_head(at).squeeze(-1)
        if self.fusion == "late":
            user, item = self.user_embeddings(before), self.candidate_head(candidates)  # (P, D) each
            return self.rank_head(torch.cat([user, item, user * item], dim=-1)).squeeze(-1)
        cosine = F.cosine_similarity(self.outputs(before), candidates, dim=-1)  # (P,)
        return self.calibration[0] * self.logit_scale.exp() * cosine + self.calibration[1]

    @torch.no_grad()
    def score_sequences(self, table: torch.Tensor, ids: torch.Tensor, times: torch.Tensor | None = None,
                        stamps: torch.Tensor | None = None) -> torch.Tensor:
        """(B, W) the logit of each item of left-padded sequences `ids` (B, W) given the items before it (column
        0: NaN, no history), items looked up in `table` (N+1, D_item) = items.table()."""
        hidden = self.user_llm(self.inputs(table, ids, ids, times), (ids > 0).long(), stamps)  # (B, W, D)
        b, w, d = hidden.shape
        logits = self.logits(hidden[:, :-1].reshape(-1, d), hidden[:, 1:].reshape(-1, d),
                             table[ids[:, 1:]].reshape(b * (w - 1), -1)).view(b, w - 1)
        return torch.cat([torch.full_like(logits[:, :1], float("nan")), logits], dim=1)

    @torch.no_grad()
    def user_vectors(self, table: torch.Tensor, histories: torch.Tensor, times: torch.Tensor | None = None,
                     stamps: torch.Tensor | None = None) -> torch.Tensor:
        """Late fusion: (U, D) each history's user embedding, the one every candidate's logit reads (what
        `refresh users` exports for this model); the other fusions: the next-item vector, as SequenceModel's."""
        if self.fusion != "late":
            return super().user_vectors(table, histories, times, stamps)
        out = self.user_llm(self.inputs(table, histories, histories, times), (histories > 0).long(), stamps)
        return self.user_embeddings(out[:, -1])  # (U, D) the last position is a real item (left padding)

    def user_embeddings(self, before: torch.Tensor) -> torch.Tensor:
        """Late fusion: (..., D) user embeddings from User LLM outputs that have read the history only."""
        return self.user_head(before)
