"""Pieces of the end-to-end training loop: batches of user sequences, shared negatives, validation.

Everything random is derived from (seed, epoch) or (seed, step), never from a generator carried along, so a
run resumed from a checkpoint at step s continues exactly as the uninterrupted run would have.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from pipeline.data.sequences import TrainingWindows, UserSequences, eval_examples
from pipeline.embeddings.encode import embed_items
from pipeline.metrics import metrics_from_ranks, popularity_ranks, target_ranks
from pipeline.models.hllm import HLLM
from pipeline.models.tokens import TokenizedCatalogue, budget_batches


class SequenceBatches:
    """Each epoch: a seeded permutation of the training windows cut into global batches of `batch_size`;
    process `rank` of `world` takes its contiguous share. The last batch wraps around to stay full."""

    def __init__(self, windows: TrainingWindows, batch_size: int, seed: int) -> None:
        self.windows, self.batch_size, self.seed = windows, batch_size, seed
        self.width = int((windows.stops - windows.starts).max()) if len(windows) else 2

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

    def _rows(self, values: np.ndarray, epoch: int, index: int, rank: int, world: int) -> np.ndarray:
        if self.batch_size % world:
            raise ValueError(f"batch_size {self.batch_size} must be a multiple of the number of processes {world}")
        share = self.batch_size // world
        picks = self.global_indices(epoch, index)[rank * share:(rank + 1) * share]
        out = np.zeros((len(picks), self.width), dtype=np.int64)
        for row, w in enumerate(picks):
            seq = values[self.windows.starts[w]:self.windows.stops[w]]
            out[row, self.width - len(seq):] = seq
        return out


def sample_negatives(num_items: int, count: int, seed: int, step: int, micro: int) -> np.ndarray:
    """`count` item_idx drawn uniformly from 1..num_items, the same on every process for a given step."""
    return np.random.default_rng([seed, 7919, step, micro]).integers(1, num_items + 1, size=count)


def make_batch(seq_ids: np.ndarray, negatives: np.ndarray, rank: int, world: int, catalogue: TokenizedCatalogue,
               n_slots: int, alignment: str, token_budget: int) -> dict:
    """The tensors HLLM.forward needs. Items are deduplicated: each distinct item is encoded once per step.

    seq_ids (b, L+1) this process's sequences; negatives (K,) the step's shared negatives, of which this process
    encodes negatives[rank::world]; after the gather their order is that of `negative_ids`.
    """
    local_negs = negatives[rank::world]
    unique = np.unique(np.concatenate([seq_ids[seq_ids > 0], local_negs]))  # (U,)
    groups = budget_batches(catalogue.lengths(unique) + n_slots, token_budget)
    order = np.concatenate(groups)  # position in `unique` of each encoded row
    row_of = np.empty(len(unique), dtype=np.int64)
    row_of[order] = np.arange(len(order))
    seq_index = np.where(seq_ids > 0, row_of[np.searchsorted(unique, seq_ids)], 0)
    return {
        "chunks": [catalogue.chunk(unique[g], n_slots, alignment) for g in groups],
        "seq_index": torch.from_numpy(seq_index),
        "seq_ids": torch.from_numpy(seq_ids),
        "neg_index": torch.from_numpy(row_of[np.searchsorted(unique, local_negs)]),
        "negative_ids": torch.from_numpy(np.concatenate([negatives[r::world] for r in range(world)])),
        "n_unique": len(unique),
        "n_tokens": int((catalogue.lengths(unique) + n_slots).sum()),
    }


def to_device(batch: dict, device: torch.device) -> dict:
    out = dict(batch)
    out["chunks"] = [{k: v.to(device) for k, v in c.items()} for c in batch["chunks"]]
    for key in ("seq_index", "seq_ids", "neg_index", "negative_ids"):
        out[key] = batch[key].to(device)
    return out


def left_pad(histories: list[np.ndarray], width: int) -> torch.Tensor:
    out = np.zeros((len(histories), width), dtype=np.int64)
    for row, h in enumerate(histories):
        h = h[-width:]
        out[row, width - len(h):] = h
    return torch.from_numpy(out)


@torch.no_grad()
def validate(model: HLLM, catalogue: TokenizedCatalogue, seqs: UserSequences, max_len: int, n_users: int,
             seed: int, token_budget: int, alignment: str, ks=(10, 50, 200), batch_size: int = 256) -> dict:
    """Recall/NDCG on validation targets of a fixed user sample (full ranking, full history masked),
    with the popularity baseline on the same users for comparison."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    all_items = np.arange(1, catalogue.num_items + 1)
    table = torch.zeros(catalogue.num_items + 1, model.item_llm.dim)
    table[1:] = embed_items(model.item_llm, catalogue, all_items, token_budget, alignment)
    examples = eval_examples(seqs, "valid")
    rng = np.random.default_rng([seed, 104729])
    pick = np.sort(rng.choice(len(examples), size=min(n_users, len(examples)), replace=False))
    histories = [examples.history(i) for i in pick]
    targets = examples.targets[pick]
    vecs = []
    for start in range(0, len(pick), batch_size):
        padded = left_pad(histories[start:start + batch_size], max_len).to(device)
        vecs.append(model.user_vectors(table.to(device), padded).float().cpu())
    ranks = target_ranks(torch.cat(vecs), table, targets, histories, mode="full")
    train_counts = np.bincount(seqs.prefix(2).items, minlength=catalogue.num_items + 1)
    model.train(was_training)
    return {"users": len(pick), **metrics_from_ranks(ranks, ks),
            "popularity": metrics_from_ranks(popularity_ranks(train_counts, targets, histories), ks)}
