"""Full-ranking evaluation: rank every catalogue item for each user, mask history, Recall@K and NDCG@K.

Recall@K = 1 if the target's rank <= K; NDCG@K = 1 / log2(rank + 1) if rank <= K, else 0; both averaged
over users. Scores are cosine similarities. Equal scores are ordered by item_idx (as a top-K search returns
them), so ranks are deterministic. Item 0 (padding) is never ranked; history items are removed as the mask
mode says: `full` (every history item), `window` (the last `window` history items) or `none`.
A target removed by the mask (it is in the masked history) counts as a miss.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

MISS = np.iinfo(np.int64).max


def history_mask(histories: Sequence[np.ndarray], num_rows: int, mode: str, window: int = 200
                 ) -> tuple[np.ndarray, np.ndarray]:
    """(row, item) pairs to remove from the scores of `histories` under `mode`."""
    if mode not in ("full", "window", "none"):
        raise ValueError(f"mask mode must be full, window or none, got {mode!r}")
    rows, cols = [], []
    if mode != "none":
        for row, history in enumerate(histories):
            kept = history if mode == "full" else history[-window:]
            rows.append(np.full(len(kept), row))
            cols.append(np.asarray(kept))
    if not rows:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    return np.concatenate(rows).astype(np.int64), np.concatenate(cols).astype(np.int64)


def ranks_from_scores(scores: torch.Tensor, targets: np.ndarray, histories: Sequence[np.ndarray],
                      mode: str = "full", window: int = 200) -> np.ndarray:
    """1-based rank of each row's target among items 1..N given scores (b, N+1); MISS if the mask removed it."""
    scores = torch.nan_to_num(scores, nan=-math.inf, posinf=math.inf, neginf=-math.inf)  # NaN never outranks
    scores[:, 0] = -math.inf
    rows, cols = history_mask(histories, scores.shape[0], mode, window)
    scores[torch.from_numpy(rows), torch.from_numpy(cols)] = -math.inf
    tgt = torch.from_numpy(np.asarray(targets, dtype=np.int64))
    tgt_score = scores.gather(1, tgt[:, None])  # (b, 1)
    index = torch.arange(scores.shape[1])[None, :]
    ahead = (scores > tgt_score) | ((scores == tgt_score) & (index < tgt[:, None]))  # (b, N+1)
    ranks = ahead.sum(1).numpy().astype(np.int64) + 1
    ranks[torch.isinf(tgt_score[:, 0]).numpy()] = MISS  # masked (or NaN) target: a miss
    return ranks


def target_ranks(user_vecs: torch.Tensor, item_table: torch.Tensor, targets: np.ndarray,
                 histories: Sequence[np.ndarray], mode: str = "full", window: int = 200,
                 batch_size: int = 1024) -> np.ndarray:
    """Ranks under cosine scoring: user_vecs (U, D) against item_table (N+1, D), row 0 = padding."""
    items = F.normalize(item_table.float(), dim=-1)  # (N+1, D)
    ranks = np.empty(len(targets), dtype=np.int64)
    for start in range(0, len(targets), batch_size):
        stop = min(start + batch_size, len(targets))
        scores = F.normalize(user_vecs[start:stop].float(), dim=-1) @ items.T  # (b, N+1)
        ranks[start:stop] = ranks_from_scores(scores, targets[start:stop], histories[start:stop], mode, window)
    return ranks


def popularity_ranks(train_counts: np.ndarray, targets: np.ndarray, histories: Sequence[np.ndarray],
                     mode: str = "full", window: int = 200, batch_size: int = 1024) -> np.ndarray:
    """Ranks under the popularity baseline: every user sees items ordered by training interaction count."""
    counts = torch.as_tensor(train_counts, dtype=torch.float64)[None, :]  # (1, N+1), exact for any count
    ranks = np.empty(len(targets), dtype=np.int64)
    for start in range(0, len(targets), batch_size):
        stop = min(start + batch_size, len(targets))
        scores = counts.expand(stop - start, -1)
        ranks[start:stop] = ranks_from_scores(scores, targets[start:stop], histories[start:stop], mode, window)
    return ranks


def per_user_metrics(ranks: np.ndarray, ks: Sequence[int] = (10, 50, 200)) -> dict[str, np.ndarray]:
    """{'recall@K': (U,), 'ndcg@K': (U,)}: each user's value of each metric."""
    out = {}
    for k in ks:
        hit = ranks <= k
        gains = np.zeros(len(ranks))
        gains[hit] = 1.0 / np.log2(ranks[hit].astype(np.float64) + 1.0)
        out[f"recall@{k}"], out[f"ndcg@{k}"] = hit.astype(np.float64), gains
    return out


def metrics_from_ranks(ranks: np.ndarray, ks: Sequence[int] = (10, 50, 200)) -> dict[str, float]:
    """{'recall@K': ..., 'ndcg@K': ...} averaged over users."""
    return {key: float(values.mean()) if len(ranks) else 0.0 for key, values in per_user_metrics(ranks, ks).items()}


def metrics_by_target_kind(ranks: np.ndarray, targets: np.ndarray, new_items: np.ndarray,
                           ks: Sequence[int] = (10, 50, 200)) -> dict[str, dict]:
    """Metrics of the warm targets and of the new-item targets (items held out of training) apart, with their
    counts; a kind without targets has no metrics."""
    is_new = np.isin(targets, new_items)
    return {kind: {"targets": int(rows.sum()), **(metrics_from_ranks(ranks[rows], ks) if rows.any() else {})}
            for kind, rows in (("warm", ~is_new), ("new", is_new))}


# ---- the rankers' metrics: (score, 0/1 label) pairs, not ranks


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve: the chance that a random positive outscores a random negative (ties count one
    half), by the rank-sum formula with average ranks for ties. NaN without both labels."""
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels).astype(bool)
    positives, negatives = int(labels.sum()), int((~labels).sum())
    if positives == 0 or negatives == 0:
        return float("nan")
    order = np.argsort(scores, kind="stable")
    sorted_scores = scores[order]
    ranks = np.empty(len(scores))
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])  # each run of equal scores
    ends = np.r_[starts[1:], len(scores)]
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)  # 1-based average rank of each run
    return float((ranks[labels].sum() - positives * (positives + 1) / 2.0) / (positives * negatives))


def user_aucs(users: np.ndarray, scores: np.ndarray, labels: np.ndarray) -> dict[int, float]:
    """Each user's AUC over their own examples, for the users that have both labels."""
    users, scores, labels = np.asarray(users), np.asarray(scores), np.asarray(labels)
    order = np.argsort(users, kind="stable")
    bounds = np.flatnonzero(np.r_[True, users[order][1:] != users[order][:-1], True])
    values = {int(users[order[lo]]): auc(scores[order[lo:hi]], labels[order[lo:hi]])
              for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)}
    return {user: value for user, value in values.items() if not math.isnan(value)}


def gauc(users: np.ndarray, scores: np.ndarray, labels: np.ndarray) -> tuple[float, int]:
    """Group AUC: each user's AUC over their own examples, averaged over the users that have both labels (each
    user counts once); and how many users that is. NaN when none has."""
    values = list(user_aucs(users, scores, labels).values())
    return (float(np.mean(values)) if values else float("nan")), len(values)


def log_loss(logits: np.ndarray, labels: np.ndarray) -> float:
    """Mean binary cross-entropy of sigmoid(logits) against the 0/1 labels (natural log), computed stably."""
    x, y = np.asarray(logits, dtype=np.float64), np.asarray(labels, dtype=np.float64)
    return float(np.mean(np.maximum(x, 0) - x * y + np.log1p(np.exp(-np.abs(x))))) if len(x) else float("nan")


def ranking_metrics(users: np.ndarray, logits: np.ndarray, labels: np.ndarray) -> dict:
    """AUC, GAUC (with its user count), log loss and the example counts of one set of scored examples."""
    value, grouped_users = gauc(users, logits, labels)
    return {"auc": auc(logits, labels), "gauc": value, "gauc_users": grouped_users,
            "log_loss": log_loss(logits, labels), "examples": int(len(labels)),
            "positives": int(np.asarray(labels).sum()), "users": int(len(np.unique(users)))}
