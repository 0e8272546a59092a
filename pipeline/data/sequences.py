"""User sequences, the leave-one-out split, training windows and evaluation (history, target) pairs.

Split, as the official code: per user, the last item is the test target, the second to last the validation
target, everything before is training. The history of an evaluation example is every item before its target
(so the test history includes the validation item).

New items (`data prepare` with a new-item split, data/new_items.parquet): every interaction with them leaves the
training part, so no training sequence, negative or popularity count sees them; evaluation keeps them as targets
and in histories, as items that arrived after training.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np
import polars as pl

from pipeline.errors import UserError

Split = Literal["train", "valid", "test"]


@dataclass(frozen=True)
class UserSequences:
    """Every user's items in order, as CSR arrays: user u owns positions offsets[u]:offsets[u+1]."""

    offsets: np.ndarray
    """(U+1,) int64."""
    items: np.ndarray
    """(M,) int32 item_idx, 1..num_items."""
    timestamps: np.ndarray
    """(M,) int64 seconds."""
    num_items: int
    """Catalogue size N (item_idx runs 1..N; 0 is padding)."""
    new_items: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int32))
    """(K,) sorted item_idx held out as new: training never sees them."""
    labels: np.ndarray | None = None
    """(M,) int8 per interaction, for the rankers: 1, 0, or -1 where it has no label; None: unlabelled data."""

    @property
    def num_users(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def trainable_items(self) -> np.ndarray:
        """item_idx a training step may use (targets, negatives, a softmax's catalogue): 1..N but the new items."""
        return np.setdiff1d(np.arange(1, self.num_items + 1, dtype=np.int64), self.new_items)

    def user(self, user_idx: int) -> tuple[np.ndarray, np.ndarray]:
        lo, hi = self.offsets[user_idx], self.offsets[user_idx + 1]
        return self.items[lo:hi], self.timestamps[lo:hi]

    @classmethod
    def from_frame(cls, interactions: pl.DataFrame, num_items: int) -> UserSequences:
        """From canonical interactions (sorted by user_idx, timestamp, source_row; users 0..U-1 all present)."""
        users = interactions["user_idx"].to_numpy()
        if len(users) and (np.any(np.diff(users) < 0) or users[0] != 0):
            raise UserError("interactions are not sorted by user_idx starting at 0; re-run `data prepare`")
        counts = np.bincount(users, minlength=int(users.max()) + 1 if len(users) else 0)
        offsets = np.zeros(len(counts) + 1, dtype=np.int64)
        np.cumsum(counts, out=offsets[1:])
        return cls(offsets=offsets, items=interactions["item_idx"].to_numpy().astype(np.int32),
                   timestamps=interactions["timestamp"].to_numpy().astype(np.int64), num_items=num_items)

    @classmethod
    def load(cls, data_dir: str | Path) -> UserSequences:
        data_dir = Path(data_dir)
        for name in ("interactions.parquet", "items.parquet"):
            if not (data_dir / name).is_file():
                raise UserError(f"{data_dir / name}: not found; run `hllm-pipeline data prepare` first")
        num_items = pl.scan_parquet(data_dir / "items.parquet").select(pl.col("item_idx").max()).collect().item()
        interactions = pl.read_parquet(data_dir / "interactions.parquet",
                                       columns=["user_idx", "item_idx", "timestamp"])
        seqs = cls.from_frame(interactions, int(num_items))
        if (data_dir / NEW_ITEMS).is_file():
            new = np.sort(pl.read_parquet(data_dir / NEW_ITEMS, columns=["item_idx"])["item_idx"].to_numpy())
            seqs = replace(seqs, new_items=new.astype(np.int32))
        return seqs

    def prefix(self, drop_last: int) -> UserSequences:
        """Every user's sequence without its last `drop_last` items (users keep their index, possibly empty)."""
        lengths = np.maximum(self.lengths - drop_last, 0)
        keep = np.repeat(self.offsets[:-1], lengths) + concat_ranges(lengths)
        offsets = np.zeros_like(self.offsets)
        np.cumsum(lengths, out=offsets[1:])
        return UserSequences(offsets, self.items[keep], self.timestamps[keep], self.num_items, self.new_items,
                             self.labels[keep] if self.labels is not None else None)

    def without(self, items: np.ndarray) -> UserSequences:
        """Every user's sequence without the interactions with `items` (users keep their index, possibly empty)."""
        keep = ~np.isin(self.items, items)
        owner = np.repeat(np.arange(self.num_users), self.lengths)
        lengths = np.bincount(owner[keep], minlength=self.num_users)
        offsets = np.zeros_like(self.offsets)
        np.cumsum(lengths, out=offsets[1:])
        return UserSequences(offsets, self.items[keep], self.timestamps[keep], self.num_items, self.new_items,
                             self.labels[keep] if self.labels is not None else None)


def concat_ranges(lengths: np.ndarray) -> np.ndarray:
    """[0..l0-1, 0..l1-1, ...] for all lengths, vectorised."""
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    starts = np.cumsum(lengths) - lengths
    return np.arange(total, dtype=np.int64) - np.repeat(starts, lengths)


NEW_ITEMS = "new_items.parquet"


def training_sequences(seqs: UserSequences) -> UserSequences:
    """The training part of the split: every item but each user's last two, and none of the new items."""
    train = seqs.prefix(2)
    return train.without(seqs.new_items) if len(seqs.new_items) else train


@dataclass(frozen=True)
class TrainingWindows:
    """Training sequences as (user, start, stop) windows into a UserSequences' arrays."""

    source: UserSequences
    users: np.ndarray
    starts: np.ndarray
    stops: np.ndarray

    def __len__(self) -> int:
        return len(self.users)

    def __getitem__(self, i: int) -> tuple[int, np.ndarray, np.ndarray]:
        lo, hi = self.starts[i], self.stops[i]
        return int(self.users[i]), self.source.items[lo:hi], self.source.timestamps[lo:hi]

    def __iter__(self) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        for i in range(len(self)):
            yield self[i]


def training_windows(seqs: UserSequences, max_len: int, chunking: Literal["last", "chunks"] = "last"
                     ) -> TrainingWindows:
    """Windows of at most `max_len` + 1 items (max_len inputs, each predicting the next item).

    `last` keeps each user's most recent max_len + 1 training items (the official loader's truncation).
    `chunks` is the official non-overlapping chunking: a sequence longer than max_len + 1 loses its oldest
    `len % (max_len + 1)` items and the rest is cut into windows of exactly max_len + 1.
    Windows with fewer than 2 items train nothing and are left out.
    """
    if max_len < 1:
        raise ValueError("max_len must be >= 1")
    train = training_sequences(seqs)
    size = max_len + 1
    lengths = train.lengths
    user_ids = np.arange(train.num_users)
    if chunking == "last":
        stops = train.offsets[1:]
        starts = np.maximum(train.offsets[:-1], stops - size)
        users = user_ids
    elif chunking == "chunks":
        long = lengths > size
        n_chunks = np.where(long, lengths // size, 1)
        users = np.repeat(user_ids, n_chunks)
        first = np.where(long, train.offsets[:-1] + lengths % size, train.offsets[:-1])
        starts = np.repeat(first, n_chunks) + concat_ranges(n_chunks) * size
        stops = np.where(np.repeat(long, n_chunks), starts + size, np.repeat(train.offsets[1:], n_chunks))
    else:
        raise ValueError(f"chunking must be 'last' or 'chunks', got {chunking!r}")
    keep = (stops - starts) >= 2
    return TrainingWindows(train, users[keep], starts[keep], stops[keep])


@dataclass(frozen=True)
class EvalExamples:
    """One (history, target) pair per user for a split; histories as CSR into `history_items`."""

    split: Split
    users: np.ndarray
    """(E,) int32 user_idx."""
    targets: np.ndarray
    """(E,) int32 item_idx."""
    target_timestamps: np.ndarray
    history_offsets: np.ndarray
    """(E+1,) int64."""
    history_items: np.ndarray
    history_timestamps: np.ndarray

    def __len__(self) -> int:
        return len(self.users)

    def history(self, i: int) -> np.ndarray:
        return self.history_items[self.history_offsets[i]:self.history_offsets[i + 1]]

    def keeping(self, known: np.ndarray) -> EvalExamples:
        """The examples with every history item `known[item]` is False for left out, as if it had never been
        seen; a user left with no history keeps the whole one (a model needs at least one input)."""
        user_of = np.repeat(np.arange(len(self)), np.diff(self.history_offsets))
        keep = known[self.history_items]
        keep |= (np.bincount(user_of, weights=keep, minlength=len(self)) == 0)[user_of]
        offsets = np.zeros(len(self) + 1, dtype=np.int64)
        np.cumsum(np.bincount(user_of[keep], minlength=len(self)), out=offsets[1:])
        return EvalExamples(self.split, self.users, self.targets, self.target_timestamps, offsets,
                            self.history_items[keep], self.history_timestamps[keep])

    def subset(self, rows: np.ndarray) -> EvalExamples:
        """The examples at positions `rows`, in that order."""
        lengths = np.diff(self.history_offsets)[rows]
        offsets = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        pos = np.repeat(self.history_offsets[rows], lengths) + concat_ranges(lengths)
        return EvalExamples(self.split, self.users[rows], self.targets[rows], self.target_timestamps[rows], offsets,
                            self.history_items[pos], self.history_timestamps[pos])


def eval_examples(seqs: UserSequences, split: Literal["valid", "test"]) -> EvalExamples:
    """Validation (second to last item) or test (last item) targets with every earlier item as history."""
    if split not in ("valid", "test"):
        raise ValueError(f"split must be 'valid' or 'test', got {split!r}")
    drop = 1 if split == "valid" else 0
    upto = seqs.prefix(drop)  # sequences ending at the target
    lengths = upto.lengths
    users = np.nonzero(lengths >= 2)[0].astype(np.int32)
    target_pos = upto.offsets[users + 1] - 1
    history = upto.prefix(1)
    hist_len = history.lengths[users]
    hist_offsets = np.zeros(len(users) + 1, dtype=np.int64)
    np.cumsum(hist_len, out=hist_offsets[1:])
    pos = np.repeat(history.offsets[users], hist_len) + concat_ranges(hist_len)
    return EvalExamples(split, users, upto.items[target_pos], upto.timestamps[target_pos], hist_offsets,
                        history.items[pos], history.timestamps[pos])
