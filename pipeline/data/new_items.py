"""The new-item split: items held out of training entirely, to measure recommending items no model trained on.

Random variant: a seeded `fraction` of the items with interactions, stratified by popularity (the items sorted by
interaction count are cut into ten strata and the same share is drawn from each), so the new items are as popular
as the rest. Temporal variant: the items first seen after a date. Either way every interaction with a new item
leaves the training part (pipeline.data.sequences.training_sequences); the users' validation and test targets
stay, and a target that is a new item is a new-item target.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np
import polars as pl

from pipeline.data.sequences import UserSequences, eval_examples, training_sequences
from pipeline.errors import ConfigError, UserError

STRATA = 10


@dataclass(frozen=True)
class NewItemSplit:
    fraction: float | None = None
    """Share of the items with interactions held out as new, in (0, 1); null: no random new items."""
    after: str | None = None
    """Temporal variant: items whose first interaction is after this date (YYYY-MM-DD, UTC, or unix seconds) are
    new; null: none."""
    seed: int = 0
    """Seed of the random draw."""

    def __post_init__(self) -> None:
        if self.fraction is not None and not 0 < self.fraction < 1:
            raise ConfigError(f"new_item_fraction={self.fraction}: must be in (0, 1), e.g. 0.1 for 10% of the items")
        if self.fraction is not None and self.after is not None:
            raise ConfigError("new_item_fraction and new_items_after are two variants of the split; set one")
        if self.after is not None:
            after_seconds(self.after)

    @property
    def active(self) -> bool:
        return self.fraction is not None or self.after is not None


def after_seconds(value: str) -> int:
    text = str(value).strip()
    if text.lstrip("-").isdigit():
        return int(text)
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ConfigError(f"new_items_after={value!r}: expected a date (YYYY-MM-DD, UTC) or unix seconds") from None
    return int((moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp())


def choose_new_items(seqs: UserSequences, split: NewItemSplit) -> np.ndarray:
    """The sorted item_idx of the new items; a split that cannot work is a one-line error."""
    counts = np.bincount(seqs.items, minlength=seqs.num_items + 1)
    rated = np.flatnonzero(counts[1:]) + 1
    if split.fraction is not None:
        rng = np.random.default_rng([split.seed, 65537])
        by_popularity = rated[np.lexsort((rated, counts[rated]))]  # least to most popular, ties by item_idx
        chosen = [stratum[rng.permutation(len(stratum))[:round(split.fraction * len(stratum))]]
                  for stratum in np.array_split(by_popularity, STRATA)]
        new = np.sort(np.concatenate(chosen)).astype(np.int32)
    else:
        cutoff = after_seconds(split.after)
        if cutoff >= int(seqs.timestamps.max()):
            last = datetime.fromtimestamp(int(seqs.timestamps.max()), UTC).date()
            raise ConfigError(f"new_items_after={split.after}: no interaction comes after it (the last is on {last}); "
                              "choose an earlier date")
        first_seen = np.full(seqs.num_items + 1, np.iinfo(np.int64).max)
        np.minimum.at(first_seen, seqs.items, seqs.timestamps)
        new = (np.flatnonzero(first_seen[1:] > cutoff) + 1).astype(np.int32)
        new = new[counts[new] > 0]
    if len(new) == 0:
        raise UserError("the new-item split holds out no item; raise new_item_fraction or choose an earlier "
                        "new_items_after")
    return new


def split_summary(seqs: UserSequences, user_ids: pl.Series) -> tuple[dict, pl.DataFrame]:
    """Counts of the split for stats.json, and the users it leaves without a training item (user_id), who still
    have their validation and test targets. Raises when no validation or test target is a new item (one split
    without any is allowed: a temporal split may put every new item after the validation targets)."""
    new = seqs.new_items
    targets = {split: eval_examples(seqs, split).targets for split in ("valid", "test")}
    new_targets = {split: int(np.isin(t, new).sum()) for split, t in targets.items()}
    if not any(new_targets.values()):
        raise UserError(f"the new-item split leaves no validation or test target that is a new item ({len(new)} "
                        "items held out); hold out more items or choose an earlier new_items_after")
    before, after = seqs.prefix(2).lengths, training_sequences(seqs).lengths
    stranded = np.flatnonzero((before > 0) & (after == 0))
    counts = np.bincount(seqs.items, minlength=seqs.num_items + 1)
    summary = {
        "new_items": len(new), "items_with_interactions": int((counts[1:] > 0).sum()),
        "interactions_of_new_items": int(counts[new].sum()),
        "train_interactions_removed": int(before.sum() - after.sum()),
        "new_item_targets": new_targets,
        "warm_targets": {split: len(t) - new_targets[split] for split, t in targets.items()},
        "users_without_training_items": len(stranded),
    }
    return summary, pl.DataFrame({"user_id": user_ids.gather(stranded)})
