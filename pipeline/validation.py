"""Validation while training: Recall/NDCG on a fixed sample of users' validation targets.

Full ranking over the whole catalogue with the user's full history masked (the reference ranking of
pipeline.metrics), user vectors batched as eval batches them, and the popularity floor on the same users.
"""

from __future__ import annotations

import numpy as np
import torch

from pipeline.batches import user_vectors
from pipeline.data.sequences import UserSequences, eval_examples, training_sequences
from pipeline.metrics import metrics_by_target_kind, metrics_from_ranks, popularity_ranks, target_ranks
from pipeline.models.sequence_model import SequenceModel


@torch.no_grad()
def validate(model: SequenceModel, seqs: UserSequences, max_len: int, n_users: int, seed: int,
             split: str = "valid", ks=(10, 50, 200)) -> dict:
    """Metrics of the `split` targets of `n_users` users drawn with `seed` (the same users every epoch)."""
    was_training = model.training
    model.eval()
    examples = eval_examples(seqs, split)
    rng = np.random.default_rng([seed, 104729])
    sample = examples.subset(np.sort(rng.choice(len(examples), size=min(n_users, len(examples)), replace=False)))
    histories = [sample.history(i) for i in range(len(sample))]
    table = model.items.table()  # (N+1, D)
    ranks = target_ranks(user_vectors(model, table, sample, max_len), table.float().cpu(), sample.targets, histories,
                         mode="full")
    train_counts = np.bincount(training_sequences(seqs).items, minlength=seqs.num_items + 1)
    model.train(was_training)
    result = {"users": len(sample), **metrics_from_ranks(ranks, ks),
              "popularity": metrics_from_ranks(popularity_ranks(train_counts, sample.targets, histories), ks)}
    if len(seqs.new_items):  # the new-item split: both kinds, so settings can be chosen for either
        kinds = metrics_by_target_kind(ranks, sample.targets, seqs.new_items, ks)
        result.update({kind: values for kind, values in kinds.items()})
    return result
