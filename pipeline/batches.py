"""Batches: training steps over user sequences, the shared negatives, and padded histories for user vectors.

Everything random is derived from (seed, epoch) or (seed, step, micro-step), never from a generator carried
along, so a run resumed from a checkpoint at step s continues exactly as the uninterrupted run would have.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import torch

from pipeline.data.sequences import EvalExamples, TrainingWindows, UserSequences
from pipeline.models.item_sources import ItemSource
from pipeline.models.sequence_model import SequenceModel, time_features


class SequenceBatches:
    """Each epoch: a seeded permutation of the training windows cut into global batches of `batch_size`;
    process `rank` of `world` takes its contiguous share. The last batch wraps around to stay full."""

    def __init__(self, windows: TrainingWindows, batch_size: int, seed: int) -> None:
        self.windows, self.batch_size, self.seed = windows, batch_size, seed
        self.width = int((windows.stops - windows.starts).max()) if len(windows) else 2
        self.labelled = windows.source.labels is not None

    def __len__(self) -> int:
        return math.ceil(len(self.windows) / self.batch_size)

    def global_indices(self, epoch: int, index: int) -> np.ndarray:
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.windows))
        picks = np.arange(index * self.batch_size, (index + 1) * self.batch_size) % len(order)
        return order[picks]

    def item_ids(self, epoch: int, index: int, rank: int = 0, world: int = 1) -> np.ndarray:
        """(batch_size / world, width) item_idx of process `rank`'s sequences, left-padded with 0."""
        return self._rows(self.windows.source.items, epoch, index, rank, world)

    def timestamps(self, epoch: int, index: int, rank: int = 0, world: int = 1) -> np.ndarray:
        """The same sequences' timestamps (0 on padding)."""
        return self._rows(self.windows.source.timestamps, epoch, index, rank, world)

    def labels(self, epoch: int, index: int, rank: int = 0, world: int = 1) -> np.ndarray:
        """The same sequences' labels (UserSequences.labels; -1 on padding)."""
        return self._rows(self.windows.source.labels, epoch, index, rank, world, pad=-1)

    def _picks(self, epoch: int, index: int, rank: int, world: int) -> np.ndarray:
        """This process's share of the batch: rows of `windows`."""
        if self.batch_size % world:
            raise ValueError(f"batch_size {self.batch_size} must be a multiple of the number of processes {world}")
        share = self.batch_size // world
        return self.global_indices(epoch, index)[rank * share:(rank + 1) * share]

    def _rows(self, values: np.ndarray, epoch: int, index: int, rank: int, world: int, pad: int = 0) -> np.ndarray:
        picks = self._picks(epoch, index, rank, world)
        out = np.full((len(picks), self.width), pad, dtype=np.int64)
        for row, w in enumerate(picks):
            seq = values[self.windows.starts[w]:self.windows.stops[w]]
            out[row, self.width - len(seq):] = seq
        return out


class ExampleBatches(SequenceBatches):
    """Batches of labelled examples whose candidate is appended to the user's history (pipeline.ranking): each
    row is the user's last `max_len` interactions before the example, then the candidate, labelled at the end."""

    def __init__(self, seqs: UserSequences, examples, max_len: int, batch_size: int, seed: int) -> None:
        self.seqs, self.windows, self.max_len = seqs, examples, max_len
        self.batch_size, self.seed, self.width = batch_size, seed, max_len + 1
        self.labelled = True
        self._last: tuple = (None, None)  # the last batch built: (its key, its ids and timestamps)

    def item_ids(self, epoch: int, index: int, rank: int = 0, world: int = 1) -> np.ndarray:
        return self._appended(epoch, index, rank, world)[0]

    def timestamps(self, epoch: int, index: int, rank: int = 0, world: int = 1) -> np.ndarray:
        return self._appended(epoch, index, rank, world)[1]

    def labels(self, epoch: int, index: int, rank: int = 0, world: int = 1) -> np.ndarray:
        rows = self._picks(epoch, index, rank, world)
        out = np.full((len(rows), self.width), -1, dtype=np.int64)
        out[:, -1] = self.windows.labels[rows]
        return out

    def _appended(self, epoch: int, index: int, rank: int, world: int) -> tuple[np.ndarray, np.ndarray]:
        """Item ids and timestamps of a batch, built once for the step's two calls (item_ids, timestamps)."""
        from pipeline.ranking import appended_rows

        key = (epoch, index, rank, world)
        if self._last[0] != key:
            self._last = (key, appended_rows(self.seqs, self.windows, self._picks(*key), self.max_len))
        return self._last[1]


def sample_negatives(pool: np.ndarray, count: int, seed: int, step: int, micro: int) -> np.ndarray:
    """`count` item_idx drawn uniformly from `pool` (the trainable items, UserSequences.trainable_items), the same
    on every process for a given step. With the pool 1..N the draws equal integers(1, N + 1)'s."""
    return pool[np.random.default_rng([seed, 7919, step, micro]).integers(0, len(pool), size=count)]


@dataclass
class StepBatch:
    """One micro-step's input for this process (what SequenceModel.forward reads)."""

    seq_ids: torch.Tensor
    """(b, L+1) item_idx of this process's sequences, left-padded with 0."""
    seq_index: torch.Tensor
    """(b, L+1) row of each sequence item in the item source's output (padding -> row 0, masked)."""
    item_inputs: dict
    """What the item source's forward takes for the step's distinct items."""
    row_ids: torch.Tensor
    """(U,) item_idx of each row of the item source's output."""
    neg_index: torch.Tensor
    """(k,) rows of this process's negatives in the item source's output (with a negative table: (K,), -1 for a
    negative that is not one of the step's own items)."""
    negative_ids: torch.Tensor
    """(K,) item_idx of every negative of the step, in the order the model sees them (gathered order)."""
    times: torch.Tensor | None
    """(b, L+1, 6) calendar fields of the sequence items, or None without a time embedding."""
    stamps: torch.Tensor | None
    """(b, L+1) unix seconds of the sequence items (0 on padding), or None for a User LLM that reads no time."""
    in_batch_negatives: bool
    """Also use the batch's other targets as negatives."""
    full_catalogue: bool
    """The negatives are every trainable item in item_idx order (loss=softmax): the loss is plain cross-entropy."""
    positions: int
    """Valid (input, target) positions in this process's share (with labels: the labelled ones)."""
    items: int
    """Distinct items embedded, for the throughput log."""
    tokens: int
    """Item tokens encoded (text sources), for the throughput log."""
    labels: torch.Tensor | None = None
    """(b, L+1) the rankers' 0/1 label of each sequence item (-1: none, and on padding); None without labels."""

    def to(self, device: torch.device) -> StepBatch:
        return replace(self, seq_ids=self.seq_ids.to(device), seq_index=self.seq_index.to(device),
                       item_inputs=_to(self.item_inputs, device), row_ids=self.row_ids.to(device),
                       neg_index=self.neg_index.to(device), negative_ids=self.negative_ids.to(device),
                       times=self.times.to(device) if self.times is not None else None,
                       stamps=self.stamps.to(device) if self.stamps is not None else None,
                       labels=self.labels.to(device) if self.labels is not None else None)


def _to(obj, device: torch.device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to(v, device) for v in obj]
    return obj


def make_step_batch(source: ItemSource, seq_ids: np.ndarray, negatives: np.ndarray, rank: int, world: int,
                    timestamps: np.ndarray | None = None, time_precision: str | None = None,
                    in_batch_negatives: bool = False, full_catalogue: bool = False,
                    labels: np.ndarray | None = None) -> StepBatch:
    """Embed each distinct item of the step once: this process's sequence items and negatives (all of them, or
    its share negatives[rank::world] where the source embeds negatives in shares, or none where they are rows of
    the source's negative table). With `timestamps`, the batch
    carries them, and their calendar fields to `time_precision` where that is given (a time embedding)."""
    local_negs = negatives[rank::world] if source.shard_negatives else negatives
    if source.negatives_from_table:  # the negatives are rows of the source's table: only the step's items are embedded
        local_negs = local_negs[:0]
    unique = np.unique(np.concatenate([seq_ids[seq_ids > 0], local_negs]))  # (U,)
    item_inputs, order, tokens = source.prepare(unique)
    row_of = np.empty(len(unique), dtype=np.int64)
    row_of[order] = np.arange(len(order))
    seq_index = np.where(seq_ids > 0, row_of[np.searchsorted(unique, seq_ids)], 0)
    if source.negatives_from_table:  # a negative's row where it is one of the step's own items, else -1
        at = np.minimum(np.searchsorted(unique, negatives), len(unique) - 1)
        neg_index = np.where(unique[at] == negatives, row_of[at], -1)
    else:
        neg_index = row_of[np.searchsorted(unique, local_negs)]
    gathered = np.concatenate([negatives[r::world] for r in range(world)]) if source.shard_negatives else negatives
    times = torch.from_numpy(time_features(timestamps, time_precision)) \
        if timestamps is not None and time_precision is not None else None
    return StepBatch(
        seq_ids=torch.from_numpy(seq_ids), seq_index=torch.from_numpy(seq_index), item_inputs=item_inputs,
        row_ids=torch.from_numpy(unique[order].astype(np.int64)),
        neg_index=torch.from_numpy(neg_index),
        negative_ids=torch.from_numpy(np.asarray(gathered, dtype=np.int64)), times=times,
        stamps=torch.from_numpy(timestamps) if timestamps is not None else None,
        in_batch_negatives=in_batch_negatives, full_catalogue=full_catalogue,
        positions=_positions(seq_ids, labels), items=len(unique), tokens=tokens,
        labels=torch.from_numpy(labels) if labels is not None else None)


def _positions(seq_ids: np.ndarray, labels: np.ndarray | None) -> int:
    """The (input, target) pairs a step trains: every valid one, or with labels the labelled ones (a ranker)."""
    valid = (seq_ids[:, :-1] > 0) & (seq_ids[:, 1:] > 0)
    return int((valid & (labels[:, 1:] >= 0)).sum()) if labels is not None else int(valid.sum())


def left_pad(histories: list[np.ndarray], width: int) -> torch.Tensor:
    out = np.zeros((len(histories), width), dtype=np.int64)
    for row, h in enumerate(histories):
        h = h[-width:]
        out[row, width - len(h):] = h
    return torch.from_numpy(out)


@torch.no_grad()
def user_vectors(model: SequenceModel, table: torch.Tensor, examples: EvalExamples, max_len: int,
                 batch_size: int = 256) -> torch.Tensor:
    """(E, D) float32 next-item vectors (on the CPU) from each example's last max_len history items, with items
    looked up in `table` (N+1, D) on the model's device (a late-fusion ranker: its user embeddings, (E, D_user)).

    Users are batched by history length and each batch is padded only to its longest history (positions start
    at 0 for every user, so the amount of left padding does not change a user's vector). A history item whose
    row in `table` is zero (an ID no training saw, such as a new item for an ID model) is left out of the input,
    as ID models treat items outside their vocabulary: the model never read a zero row while training."""
    device = table.device
    known = table.detach().any(dim=1).cpu().numpy()
    if not known[examples.history_items].all():
        examples = examples.keeping(known)
    offsets = examples.history_offsets
    lengths = np.minimum(np.diff(offsets), max_len)
    order = np.argsort(lengths, kind="stable")
    vectors = torch.zeros(len(examples), table.shape[1])  # a ranker's user embeddings are narrower: see below
    for start in range(0, len(examples), batch_size):
        rows = order[start:start + batch_size]
        width = max(int(lengths[rows].max()), 1)
        ids = left_pad([examples.history(i) for i in rows], width).to(device)
        times = stamps = None
        if model.reads_time:
            stamps = left_pad([examples.history_timestamps[offsets[i]:offsets[i + 1]] for i in rows], width)
            if model.time is not None:
                times = torch.from_numpy(time_features(stamps.numpy(), model.time_precision)).to(device)
            stamps = stamps.to(device)
        out = model.user_vectors(table, ids, times, stamps).float().cpu()
        if out.shape[1] != vectors.shape[1]:
            vectors = torch.zeros(len(examples), out.shape[1])
        vectors[torch.from_numpy(rows)] = out
    return vectors
