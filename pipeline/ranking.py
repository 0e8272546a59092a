"""The rankers' data and scoring: labels, the hold-out split, and the logits of held-out examples.

Two kinds of labelled data (RankingData):
  ratings       every interaction is an example with label = rating >= a threshold (MovieLens keeps ratings
                1-5); a user's sequence holds their examples, so one causal pass scores all of them
                (example_logits);
  appended      (user, time, candidate, label) examples whose candidate need not be an interaction: the rows of
                a labelled file (e.g. impressions), or every interaction with sampled negatives beside it; each is
                scored with its candidate appended to the user's interactions strictly before its time
                (appended_logits, also the reference path the one-pass scoring is tested against).
The split keeps the order by time: each user's last `holdout` examples (events: a positive and its sampled
negatives are one) are the test set, the `holdout` before them validation, everything earlier training
(holdout=1 is next-item evaluation's leave-one-out split; more gives every user several test examples, so that a
per-user AUC exists). In one-pass scoring the last max_len + 1 items up to the split's end are read at once, so the
earliest of a user's held-out examples sees holdout - 1 fewer history items.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import polars as pl
import torch

from pipeline.batches import left_pad
from pipeline.data.sequences import UserSequences, concat_ranges, training_sequences
from pipeline.errors import UserError
from pipeline.metrics import auc, gauc, ranking_metrics
from pipeline.models.sequence_model import time_features


def rating_labels(seqs: UserSequences, data: Path, threshold: float) -> UserSequences:
    """`seqs` with label = rating >= threshold for every interaction (-1 where the rating is missing)."""
    path = Path(data) / "interactions.parquet"
    if "rating" not in pl.read_parquet_schema(path):
        raise UserError(f"{path}: has no rating column to label by (labels=rating); prepare the data again with "
                        "this version (ratings are kept where the source has them), or give labels=FILE")
    ratings = pl.read_parquet(path, columns=["rating"])["rating"].to_numpy()
    labels = np.where(np.isnan(ratings.astype(np.float64)), -1, ratings >= threshold).astype(np.int8)
    return replace(seqs, labels=labels)


@dataclass(frozen=True)
class HeldOut:
    """One split's examples: every user's last `holdout` positions of the sequence up to the split's end."""

    upto: UserSequences
    """Every user's sequence up to the split's last example."""
    users: np.ndarray
    """(E,) user_idx of each example."""
    positions: np.ndarray
    """(E,) index into upto.items of each example's candidate."""

    def __len__(self) -> int:
        return len(self.users)

    def subset(self, rows: np.ndarray) -> HeldOut:
        return HeldOut(self.upto, self.users[rows], self.positions[rows])

    @property
    def candidates(self) -> np.ndarray:
        return self.upto.items[self.positions]

    @property
    def labels(self) -> np.ndarray:
        return self.upto.labels[self.positions]


def training_part(seqs: UserSequences, holdout: int) -> UserSequences:
    """The sequences to hand the training loop: its training part (all but each user's last two) is then every
    interaction before the validation and test examples."""
    return seqs.prefix(2 * holdout - 2)


def held_out(seqs: UserSequences, split: str, holdout: int) -> HeldOut:
    """The labelled examples of `split` (valid or test): each user's last `holdout` positions up to the split's
    end that have a history and a label."""
    upto = seqs.prefix(holdout if split == "valid" else 0)
    lengths = upto.lengths
    first = np.maximum(lengths - holdout, 1)  # an example needs one history item
    count = np.maximum(lengths - first, 0)
    users = np.repeat(np.arange(upto.num_users), count)
    positions = np.repeat(upto.offsets[:-1] + first, count) + concat_ranges(count)
    keep = upto.labels[positions] >= 0
    return HeldOut(upto, users[keep].astype(np.int64), positions[keep])


@torch.no_grad()
def example_logits(model, examples: HeldOut, max_len: int, batch_size: int = 256) -> np.ndarray:
    """(E,) float64 logits of the examples: per user, one causal pass over the last max_len + 1 items up to the
    split's end scores each of that user's examples."""
    was_training = model.training
    model.eval()
    table = model.items.table()  # (N+1, D_item)
    device = table.device
    seqs = examples.upto
    users = np.unique(examples.users)
    starts = np.maximum(seqs.offsets[users], seqs.offsets[users + 1] - (max_len + 1))
    stops = seqs.offsets[users + 1]
    out = np.full(len(examples), np.nan)
    example_row = np.searchsorted(users, examples.users)  # each example's user, as a row of `users`
    for lo in range(0, len(users), batch_size):
        rows = np.arange(lo, min(lo + batch_size, len(users)))
        width = int((stops[rows] - starts[rows]).max())
        ids = left_pad([seqs.items[starts[r]:stops[r]] for r in rows], width).to(device)  # (b, W)
        stamps = times = None
        if model.reads_time:
            stamps = left_pad([seqs.timestamps[starts[r]:stops[r]] for r in rows], width)
            if model.time is not None:
                times = torch.from_numpy(time_features(stamps.numpy(), model.time_precision)).to(device)
            stamps = stamps.to(device)
        logits = model.score_sequences(table, ids, times, stamps).float().cpu().numpy()  # (b, W)
        mine = np.flatnonzero((example_row >= rows[0]) & (example_row <= rows[-1]))
        owner = example_row[mine]
        column = width - (stops[owner] - examples.positions[mine])  # left-padded: the last item is column W-1
        out[mine] = logits[owner - lo, column]
    model.train(was_training)
    return out


def popularity_scores(seqs: UserSequences, holdout: int, examples: HeldOut) -> np.ndarray:
    """The popularity baseline's scores: log(1 + each candidate's count in the training part)."""
    counts = np.bincount(training_sequences(training_part(seqs, holdout)).items, minlength=seqs.num_items + 1)
    return np.log1p(counts[examples.candidates].astype(np.float64))


def validate_ranker(model, data: RankingData, max_len: int, n_users: int, seed: int) -> dict:
    """AUC, GAUC and log loss of the validation examples of `n_users` users drawn with `seed` (the same users
    every epoch), with popularity's AUC and GAUC on the same examples."""
    examples = data.examples("valid")
    users = np.unique(examples.users)
    chosen = np.sort(np.random.default_rng([seed, 104729]).choice(users, size=min(n_users, len(users)),
                                                                  replace=False))
    sample = examples.subset(np.flatnonzero(np.isin(examples.users, chosen)))
    logits = data.logits(model, sample, max_len)
    popular = data.popularity(sample)
    return {**ranking_metrics(sample.users, logits, sample.labels),
            "popularity": {"auc": auc(popular, sample.labels), "gauc": gauc(sample.users, popular, sample.labels)[0]}}


@dataclass(frozen=True)
class RankingData:
    """A ranker's labelled data: ratings on the sequences themselves (every interaction an example, scored in
    one pass per sequence), or examples with an appended candidate (a labelled file, sampled negatives)."""

    seqs: UserSequences
    """The sequences; with rating labels, labelled."""
    holdout: int
    appended: LabelledExamples | None = None
    """The examples of a labelled file or of sampled negatives (None: the rating labels of `seqs`)."""
    rejected: pl.DataFrame | None = None
    """A labelled file's unusable rows, each with its reason."""

    def examples(self, split: str):
        if self.appended is None:
            return held_out(self.seqs, split, self.holdout)
        return split_examples(self.appended, split, self.holdout)

    def logits(self, model, examples, max_len: int) -> np.ndarray:
        if self.appended is None:
            return example_logits(model, examples, max_len)
        return appended_logits(model, self.seqs, examples, max_len)

    def popularity(self, examples) -> np.ndarray:
        """log(1 + count) of each candidate: in the training interactions, or among the training examples'
        positives."""
        if self.appended is None:
            return popularity_scores(self.seqs, self.holdout, examples)
        train = self.examples("train")
        counts = np.bincount(train.candidates[train.labels == 1], minlength=self.seqs.num_items + 1)
        return np.log1p(counts[examples.candidates].astype(np.float64))


def ranking_data(data: Path, labels: str, holdout: int, threshold: float = 4.0, negative_ratio: int = 1,
                 seed: int = 42, log=print) -> RankingData:
    """The labelled data `labels` names: `rating` (rating >= threshold), `sampled` (every interaction positive,
    `negative_ratio` sampled negatives beside it) or a labelled file's path (its unusable rows set aside with
    their reasons in `rejected`, as `data prepare` does, and counted in the log)."""
    seqs = UserSequences.load(data)
    if labels == "rating":
        return RankingData(rating_labels(seqs, data, threshold), holdout)
    rejected = None
    if labels == "sampled":
        examples = sampled_examples(seqs, negative_ratio, seed)
    else:
        examples, rejected = labelled_file(Path(labels), data)
        if rejected.height:
            first = rejected.row(0, named=True)
            log(f"{labels}: {rejected.height:,} rows set aside (first: row {first['row']}, {first['reason']}); "
                f"{len(examples):,} used")
    kept = with_history(seqs, examples)
    if len(kept) < len(examples):
        log(f"{len(examples) - len(kept):,} examples without an earlier interaction left out (no history to score)")
    return RankingData(seqs, holdout, kept, rejected)


# ---- labelled examples with an appended candidate: a labelled file, or sampled negatives


@dataclass(frozen=True)
class LabelledExamples:
    """(user, time, candidate, label) examples whose candidate need not be in the user's sequence; the history of
    an example is the user's interactions strictly before its time."""

    users: np.ndarray
    """(E,) int64 user_idx."""
    times: np.ndarray
    """(E,) int64 unix seconds."""
    candidates: np.ndarray
    """(E,) int64 item_idx."""
    labels: np.ndarray
    """(E,) int8, 0 or 1."""
    events: np.ndarray
    """(E,) int64 the example's event number within its user (0 = the earliest): a split holds out each user's
    last events (a positive and its sampled negatives share one)."""

    def __len__(self) -> int:
        return len(self.users)

    def subset(self, rows: np.ndarray) -> LabelledExamples:
        return LabelledExamples(self.users[rows], self.times[rows], self.candidates[rows], self.labels[rows],
                                self.events[rows])


def labelled_file(path: Path, data: Path) -> tuple[LabelledExamples, pl.DataFrame]:
    """The usable rows of a labelled file (user_id, item_id, timestamp, label; CSV or Parquet) as examples, and
    the rows that are not, each with its reason (unknown user or item, a label other than 0/1, a timestamp that is
    not whole seconds, a missing id)."""
    from pipeline.data.readers import read_table

    raw = read_table(path, "user_id, item_id, timestamp, label columns")
    missing = [c for c in ("user_id", "item_id", "timestamp", "label") if c not in raw.columns]
    if missing:
        raise UserError(f"{path}: no column {', '.join(missing)} (columns: {', '.join(raw.columns)}); expected "
                        "user_id, item_id, timestamp, label")
    text = [pl.col(c).cast(pl.String).str.strip_chars().alias(c) for c in ("user_id", "item_id", "timestamp", "label")]
    rows = raw.with_row_index("row", offset=1).select("row", *text).with_columns(
        pl.col("timestamp").cast(pl.Int64, strict=False).alias("time"),
        pl.col("label").replace_strict({"0": 0, "1": 1, "0.0": 0, "1.0": 1}, default=None, return_dtype=pl.Int8)
        .alias("value"))
    users = pl.read_parquet(Path(data) / "users.parquet", columns=["user_id", "user_idx"])
    items = pl.read_parquet(Path(data) / "items.parquet", columns=["item_id", "item_idx"])
    rows = rows.join(users, on="user_id", how="left").join(items, on="item_id", how="left")
    reason = (pl.when(pl.col("user_id").is_null() | (pl.col("user_id") == "")).then(pl.lit("missing_user_id"))
              .when(pl.col("item_id").is_null() | (pl.col("item_id") == "")).then(pl.lit("missing_item_id"))
              .when(pl.col("user_idx").is_null()).then(pl.lit("unknown_user_id"))
              .when(pl.col("item_idx").is_null()).then(pl.lit("unknown_item_id"))
              .when(pl.col("time").is_null()).then(pl.lit("bad_timestamp"))
              .when(pl.col("value").is_null()).then(pl.lit("label_not_0_or_1")))
    rows = rows.with_columns(reason.alias("reason"))
    rejected = rows.filter(pl.col("reason").is_not_null()).select(
        pl.lit(str(path)).alias("file"), "row", "user_id", "item_id", "timestamp", "label", "reason")
    usable = rows.filter(pl.col("reason").is_null()).sort("user_idx", "time", "row")
    if usable.height == 0:
        first = rejected.row(0, named=True) if rejected.height else None
        raise UserError(f"{path}: no usable row" + (f" (row {first['row']}: {first['reason']})" if first else ""))
    users_of = usable["user_idx"].to_numpy().astype(np.int64)
    events = np.arange(len(users_of)) - np.searchsorted(users_of, users_of)  # 0.. within each user
    return LabelledExamples(users_of, usable["time"].to_numpy(), usable["item_idx"].to_numpy().astype(np.int64),
                            usable["value"].to_numpy().astype(np.int8), events.astype(np.int64)), rejected


def sampled_examples(seqs: UserSequences, ratio: int, seed: int) -> LabelledExamples:
    """Every interaction as a positive example and `ratio` negatives at the same time: items drawn uniformly
    (seeded) from those the user never interacted with (and no held-out new item)."""
    pool = seqs.trainable_items()
    users = np.repeat(np.arange(seqs.num_users), seqs.lengths)
    events = concat_ranges(seqs.lengths)
    rng = np.random.default_rng([seed, 6007])
    negatives = pool[rng.integers(0, len(pool), size=(len(seqs.items), ratio))]  # (M, r)
    width = seqs.num_items + 1
    seen = np.unique(users * width + seqs.items)  # (user, item) pairs the data holds
    owners = np.repeat(users[:, None], ratio, axis=1)
    clash = np.isin(owners * width + negatives, seen)
    while clash.any():  # redraw the items a user has seen (a user who has seen every item would never end)
        negatives[clash] = pool[rng.integers(0, len(pool), size=int(clash.sum()))]
        clash = np.isin(owners * width + negatives, seen)
    count = 1 + ratio
    return LabelledExamples(np.repeat(users, count), np.repeat(seqs.timestamps, count),
                            np.column_stack([seqs.items, negatives]).ravel().astype(np.int64),
                            np.tile(np.r_[1, np.zeros(ratio)], len(seqs.items)).astype(np.int8),
                            np.repeat(events, count))


def with_history(seqs: UserSequences, examples: LabelledExamples) -> LabelledExamples:
    """The examples with at least one interaction before them (the others have no user to score)."""
    starts, stops = history_windows(seqs, examples.users, examples.times, 1)
    return examples.subset(np.flatnonzero(stops > starts))


def split_examples(examples: LabelledExamples, split: str, holdout: int) -> LabelledExamples:
    """Each user's last `holdout` events are test, the `holdout` before them validation, the rest training."""
    last = np.zeros(int(examples.users.max()) + 1, dtype=np.int64)
    np.maximum.at(last, examples.users, examples.events)
    from_end = last[examples.users] - examples.events  # 0 for a user's last event
    part = np.where(from_end < holdout, 2, np.where(from_end < 2 * holdout, 1, 0))
    return examples.subset(np.flatnonzero(part == {"train": 0, "valid": 1, "test": 2}[split]))


def history_windows(seqs: UserSequences, users: np.ndarray, times: np.ndarray, max_len: int
                    ) -> tuple[np.ndarray, np.ndarray]:
    """(starts, stops) into seqs.items of each example's history: the user's last `max_len` interactions
    strictly before its time."""
    stops = np.array([seqs.offsets[u] + np.searchsorted(seqs.timestamps[seqs.offsets[u]:seqs.offsets[u + 1]], t)
                      for u, t in zip(users, times, strict=True)], dtype=np.int64)
    return np.maximum(seqs.offsets[users], stops - max_len), stops


def appended_rows(seqs: UserSequences, examples: LabelledExamples, rows: np.ndarray, max_len: int
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(b, max_len + 1) item_idx and unix seconds of the examples `rows`: history then candidate, left-padded."""
    starts, stops = history_windows(seqs, examples.users[rows], examples.times[rows], max_len)
    ids = np.zeros((len(rows), max_len + 1), dtype=np.int64)
    stamps = np.zeros_like(ids)
    for i, (lo, hi, row) in enumerate(zip(starts, stops, rows, strict=True)):
        ids[i, max_len - (hi - lo):max_len] = seqs.items[lo:hi]
        stamps[i, max_len - (hi - lo):max_len] = seqs.timestamps[lo:hi]
        ids[i, max_len], stamps[i, max_len] = examples.candidates[row], examples.times[row]
    return ids, stamps


@torch.no_grad()
def appended_logits(model, seqs: UserSequences, examples: LabelledExamples, max_len: int, batch_size: int = 256
                    ) -> np.ndarray:
    """(E,) logits of examples whose candidate is appended to the history (one sequence per example; for
    rating labels, the reference path of example_logits)."""
    was_training = model.training
    model.eval()
    table = model.items.table()
    out = np.empty(len(examples))
    for lo in range(0, len(examples), batch_size):
        rows = np.arange(lo, min(lo + batch_size, len(examples)))
        ids, stamps = appended_rows(seqs, examples, rows, max_len)
        times = torch.from_numpy(time_features(stamps, model.time_precision)).to(table.device) \
            if model.time is not None else None
        stamps = torch.from_numpy(stamps).to(table.device) if model.reads_time else None
        logits = model.score_sequences(table, torch.from_numpy(ids).to(table.device), times, stamps)
        out[rows] = logits[:, -1].float().cpu().numpy()
    model.train(was_training)
    return out
