"""Top-K retrieval over the item table, with the user's history masked: FAISS indexes or an exact torch path.

Item vectors are L2-normalised, so inner product = cosine. Row r of an index holds item r + 1 (item 0 is padding
and is never indexed). The items a user must not be shown (their history, as the protocol says) are removed
after the search: each batch of users searches `k + 1 + (most masked items of a user in the batch)` deep, so a
history longer than k is fully masked, never truncated. Users are batched in order of their masked count to keep
that depth small. Results are ordered by (score desc, item_idx asc), the order metrics.ranks_from_scores uses;
for exact searchers that holds across the cut too: where items tie with the last one returned (which a
top-K routine keeps in no particular order), the batch is searched again deeper.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.data.sequences import concat_ranges
from pipeline.io import atomic_path, fingerprint, write_json_atomic
from pipeline.metrics import MISS

INDEX_KINDS = ("flat", "ivf", "hnsw")
GPU_MAX_K = 2048  # faiss' GPU indexes return at most this many neighbours per query


def import_faiss():
    """faiss, or None where it is not installed (the torch path then serves exact search)."""
    try:
        import faiss
    except ImportError:
        return None
    return faiss


def normalise(vectors: np.ndarray | torch.Tensor) -> np.ndarray:
    """(n, d) float32, C-contiguous, every row of unit length (zero rows stay zero)."""
    x = torch.as_tensor(vectors).float()
    return torch.nn.functional.normalize(x, dim=-1).contiguous().numpy()


@dataclass(frozen=True)
class Masked:
    """The items removed from each user's results, as CSR: user u's are items[offsets[u]:offsets[u+1]]."""

    offsets: np.ndarray
    items: np.ndarray

    @property
    def counts(self) -> np.ndarray:
        return np.diff(self.offsets)

    @classmethod
    def from_histories(cls, offsets: np.ndarray, items: np.ndarray, mode: str, window: int = 200) -> Masked:
        """Mask `full` history, the last `window` items of it, or `none`, from CSR histories."""
        if mode not in ("full", "window", "none"):
            raise ValueError(f"mask mode must be full, window or none, got {mode!r}")
        if mode == "full":
            return cls(np.asarray(offsets, np.int64), np.asarray(items, np.int64))
        lengths = np.diff(offsets)
        keep = np.minimum(lengths, window) if mode == "window" else np.zeros_like(lengths)
        new_offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(keep, out=new_offsets[1:])
        positions = np.repeat(offsets[1:] - keep, keep) + concat_ranges(keep)
        return cls(new_offsets, np.asarray(items, np.int64)[positions])

    def plus(self, items: np.ndarray) -> Masked:
        """The same masks with `items` removed for every user too (e.g. items that are not candidates)."""
        items = np.asarray(items, np.int64)
        counts = self.counts + len(items)
        offsets = np.zeros(len(counts) + 1, dtype=np.int64)
        np.cumsum(counts, out=offsets[1:])
        own = np.split(self.items, self.offsets[1:-1])
        return Masked(offsets, np.concatenate([np.concatenate([mine, items]) for mine in own]) if len(own) else
                      self.items)

    def subset(self, users: np.ndarray) -> Masked:
        """The masks of `users` only, in that order."""
        counts = self.counts[users]
        offsets = np.zeros(len(users) + 1, dtype=np.int64)
        np.cumsum(counts, out=offsets[1:])
        return Masked(offsets, self.items[np.repeat(self.offsets[users], counts) + concat_ranges(counts)])

    def rows(self, users: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(row in `users`, item) of every masked pair of those users, vectorised."""
        counts = self.counts[users]
        positions = np.repeat(self.offsets[users], counts) + concat_ranges(counts)
        return np.repeat(np.arange(len(users)), counts), self.items[positions]


class TorchSearch:
    """Exact search: one matmul and one top-K per batch of users, on CPU or GPU (no faiss needed)."""

    kind, backend, exact, ties_ordered = "flat", "torch", True, False

    def __init__(self, items: np.ndarray, device: str | torch.device = "cpu", ids: np.ndarray | None = None) -> None:
        """items (N, d) normalised; ids: their item_idx (default 1..N)."""
        self.items = torch.from_numpy(np.ascontiguousarray(items, np.float32)).to(device)  # (N, d)
        self.num_items = items.shape[0]
        self.ids = np.arange(1, self.num_items + 1, dtype=np.int64) if ids is None else np.asarray(ids, np.int64)
        self.max_id = int(self.ids.max(initial=0))

    def search(self, queries: np.ndarray, depth: int) -> tuple[np.ndarray, np.ndarray]:
        """queries (b, d) -> scores (b, depth) float32, item_idx (b, depth) int64, best first."""
        queries = torch.from_numpy(np.ascontiguousarray(queries, np.float32)).to(self.items.device)
        scores = queries @ self.items.T  # (b, N)
        top = torch.topk(scores, depth, dim=1)
        return top.values.cpu().numpy(), self.ids[top.indices.cpu().numpy()]


class FaissSearch:
    """A FAISS index over the normalised items, labelled by item_idx (an id map); with use_gpu, a GPU copy too
    when faiss has a GPU (used for the depths and probe counts that faiss' GPU indexes support, the CPU index
    otherwise)."""

    backend, ties_ordered = "faiss", False

    def __init__(self, index, kind: str, ivf_probe: int = 16, hnsw_ef_search: int = 256,
                 use_gpu: bool = False, max_id: int | None = None) -> None:
        """max_id: the largest item_idx in the index (read from the id map where there is one; an IVF index keeps
        its ids in its lists, so give it, or 1..ntotal is assumed)."""
        faiss = import_faiss()
        self.index, self.kind, self.exact = index, kind, kind == "flat"
        self.num_items = index.ntotal
        if max_id is None and hasattr(index, "id_map"):
            max_id = int(faiss.vector_to_array(index.id_map).max(initial=0))
        self.max_id = max_id if max_id is not None else self.num_items
        self.hnsw_ef_search = hnsw_ef_search
        self.hnsw = faiss.downcast_index(index.index).hnsw if kind == "hnsw" else None
        if kind == "ivf":
            index.nprobe = ivf_probe
        self.gpu_index = None
        gpu_ok = kind == "flat" or (kind == "ivf" and ivf_probe <= GPU_MAX_K)  # no HNSW on GPU
        if use_gpu and gpu_ok and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
            self.gpu_resources = faiss.StandardGpuResources()
            gpu = torch.cuda.current_device() if torch.cuda.is_available() else 0  # this process's GPU
            self.gpu_index = faiss.index_cpu_to_gpu(self.gpu_resources, gpu, index)

    def search(self, queries: np.ndarray, depth: int) -> tuple[np.ndarray, np.ndarray]:
        index = self.gpu_index if self.gpu_index is not None and depth <= GPU_MAX_K else self.index
        if self.hnsw is not None:
            self.hnsw.efSearch = max(self.hnsw_ef_search, depth)  # HNSW finds at most efSearch results
        scores, labels = index.search(np.ascontiguousarray(queries, np.float32), depth)
        return scores, np.maximum(labels.astype(np.int64), 0)  # label -1 (nothing found) becomes 0, dropped later


class PopularitySearch:
    """The popularity baseline as a search: every user gets the items by training count (ties by item_idx)."""

    kind, backend, exact, ties_ordered = "popularity", "numpy", True, True  # the order already breaks ties

    def __init__(self, counts: np.ndarray, ids: np.ndarray | None = None) -> None:
        """counts (N+1,) per item_idx; ids: the items that may be recommended (default 1..N)."""
        counts = np.asarray(counts, dtype=np.int64)
        ids = np.arange(1, len(counts), dtype=np.int64) if ids is None else np.asarray(ids, np.int64)
        self.num_items, self.max_id = len(ids), int(ids.max(initial=0))
        self.order = ids[np.lexsort((ids, -counts[ids]))]  # item_idx, most popular first
        self.scores = counts[self.order].astype(np.float64)  # exact for any count

    def search(self, queries: np.ndarray, depth: int) -> tuple[np.ndarray, np.ndarray]:
        b = len(queries)
        return (np.broadcast_to(self.scores[:depth], (b, depth)).copy(),
                np.broadcast_to(self.order[:depth], (b, depth)).copy())


def row_digests(items: np.ndarray) -> np.ndarray:
    """(N,) uint64: a hash of each row's bytes (which rows changed between two item tables)."""
    words = np.ascontiguousarray(items, np.float32).view(np.uint32).astype(np.uint64)  # (N, d)
    weights = (np.arange(words.shape[1], dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)) | np.uint64(1)
    with np.errstate(over="ignore"):
        return (words * weights).sum(axis=1, dtype=np.uint64) ^ (words.sum(axis=1, dtype=np.uint64) << np.uint64(32))


def _row_keys(ids: np.ndarray, digests: np.ndarray) -> np.ndarray:
    """One uint64 per (item_idx, row digest) pair."""
    with np.errstate(over="ignore"):
        return digests ^ (np.asarray(ids).astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15))


def build_faiss_index(items: np.ndarray, kind: str, ivf_lists: int, hnsw_m: int, seed: int,
                      ids: np.ndarray | None = None):
    """An index over normalised items (N, d) by inner product, labelled by `ids` (their item_idx; default
    1..N): flat (exact) and hnsw behind an id map, ivf with its own ids (approximate)."""
    faiss = import_faiss()
    dim = items.shape[1]
    ids = np.arange(1, len(items) + 1, dtype=np.int64) if ids is None else np.ascontiguousarray(ids, np.int64)
    if kind == "flat":
        index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
    elif kind == "ivf":
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, ivf_lists, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = seed
        index.train(items)
    elif kind == "hnsw":
        index = faiss.IndexIDMap2(faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT))
    else:
        raise ValueError(f"index kind must be one of {INDEX_KINDS}, got {kind!r}")
    index.add_with_ids(items, ids)
    return index


def patch_faiss_index(index, kind: str, old: tuple[np.ndarray, np.ndarray], new: tuple[np.ndarray, np.ndarray],
                      items: np.ndarray) -> tuple[object, dict] | None:
    """The index of an earlier item table brought to a new one by id: rows removed or changed come out, rows
    added or changed go in. old/new: (ids, row_digests); items: the new table's rows, in `new` order. None for
    an index that cannot remove ids (HNSW): rebuild it."""
    if kind == "hnsw":
        return None
    faiss = import_faiss()
    old_ids, old_digests = old
    new_ids, new_digests = new
    before = dict(zip(old_ids.tolist(), old_digests.tolist(), strict=True))
    is_new = np.array([before.get(i) != d for i, d in zip(new_ids.tolist(), new_digests.tolist(), strict=True)],
                      dtype=bool)
    gone = np.setdiff1d(old_ids, new_ids[~is_new])  # retired, or changed (re-added below)
    if len(gone):
        index.remove_ids(faiss.IDSelectorBatch(len(gone), faiss.swig_ptr(np.ascontiguousarray(gone, np.int64))))
    if is_new.any():
        index.add_with_ids(np.ascontiguousarray(items[is_new]), np.ascontiguousarray(new_ids[is_new], np.int64))
    return index, {"removed": int(len(gone)), "added": int(is_new.sum())}


def cached_faiss_index(items: np.ndarray, kind: str, folder: Path, key: dict, ivf_lists: int, hnsw_m: int,
                       seed: int, save: bool = True, log=print, ids: np.ndarray | None = None,
                       parent_folder: Path | None = None) -> tuple[object, dict]:
    """Load the index saved under `folder` for exactly `key` (the item vectors and build settings), or patch the
    one saved for the parent version's table with the same settings (`parent_folder`: a refresh changed a few
    rows), or build it; save it atomically. Returns (index, {"path", "reused"/"patched_from", "seconds"})."""
    faiss = import_faiss()
    ids = np.arange(1, len(items) + 1, dtype=np.int64) if ids is None else np.asarray(ids, np.int64)
    key = {**key, "labels": "item_idx"}  # indexes saved before id maps were used are not reused
    name = f"{kind}-{fingerprint(key)}"
    path = folder / f"{name}.faiss"
    start = time.perf_counter()
    if path.is_file():
        index = faiss.read_index(str(path))
        if index.ntotal == items.shape[0] and index.d == items.shape[1]:
            log(f"index: reusing {path}")
            return index, {"path": str(path), "reused": True, "seconds": round(time.perf_counter() - start, 3)}
    digests = row_digests(items)
    settings = {k: v for k, v in key.items() if k not in ("items_sha256", "shape")}
    index, info = None, {}
    # the parent's index with the same settings that shares the most rows (the same model scored them); one that
    # shares fewer than half is not worth patching
    best, shared = None, len(ids) // 2
    for meta_path in sorted(parent_folder.glob(f"{kind}-*.json")) if parent_folder and parent_folder.is_dir() else []:
        meta = json.loads(meta_path.read_text())
        old_path, rows_path = meta_path.with_suffix(".faiss"), meta_path.with_suffix(".rows.npz")
        if meta.get("settings") != settings or not old_path.is_file() or not rows_path.is_file():
            continue
        rows = np.load(rows_path)
        same = len(np.intersect1d(_row_keys(rows["ids"], rows["digests"]), _row_keys(ids, digests)))
        if same > shared:
            best, shared = (old_path, rows["ids"], rows["digests"]), same
    if best is not None:
        patched = patch_faiss_index(faiss.read_index(str(best[0])), kind, (best[1], best[2]), (ids, digests), items)
        if patched is not None:
            index, info = patched[0], {"patched_from": str(best[0]), **patched[1]}
            log(f"index: patched {best[0]} ({info['removed']:,} removed, {info['added']:,} added)")
    if index is None:
        index = build_faiss_index(items, kind, ivf_lists, hnsw_m, seed, ids)
        log(f"index: built faiss {kind} over {items.shape[0]:,} items x {items.shape[1]} in "
            f"{time.perf_counter() - start:.1f}s")
    seconds = time.perf_counter() - start
    if save:
        with atomic_path(path) as tmp:
            faiss.write_index(index, str(tmp))
        with atomic_path(path.with_suffix(".rows.npz")) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, ids=ids, digests=digests)
        write_json_atomic(folder / f"{name}.json", {"kind": kind, "key": key, "settings": settings,
                                                     "items": int(items.shape[0]), "dim": int(items.shape[1]),
                                                     "faiss": faiss.__version__, **info})
    return index, {"path": str(path) if save else None, "reused": False, "seconds": round(seconds, 3), **info}


def masked_topk(searcher, queries: np.ndarray, masked: Masked, k: int, batch_size: int = 1024
                ) -> tuple[np.ndarray, np.ndarray]:
    """Each user's top-k items with padding and their masked items removed, best first.

    Returns scores (U, k) and item_idx (U, k) int64; slots with no item (k > what is left) hold 0 and -inf.
    One search call per batch of users (two or more only where ties straddle the cut), never one per user.
    """
    n_users, n_items = len(queries), searcher.num_items
    # (user row, item_idx) -> one key
    stride = max(getattr(searcher, "max_id", n_items), int(masked.items.max(initial=0))) + 1
    counts = masked.counts
    if len(counts) != n_users:
        raise ValueError(f"{n_users} queries but masked items for {len(counts)} users")
    out_scores = np.full((n_users, k), -np.inf)
    out_items = np.zeros((n_users, k), dtype=np.int64)
    order = np.argsort(counts, kind="stable")  # similar masked counts share a batch, so depth stays small
    for start in range(0, n_users, batch_size):
        users = order[start:start + batch_size]
        rows, masked_items = masked.rows(users)
        masked_keys = rows * stride + masked_items
        # one more than k + masked, so that without ties the last result returned is never one of the k kept
        depth = min(n_items, k + int(counts[users].max(initial=0)) + 1)
        while True:
            scores, items = searcher.search(queries[users], depth)  # (b, depth)
            hidden = np.isin(np.arange(len(users))[:, None] * stride + items, masked_keys)
            keep = (items > 0) & ~hidden
            # kept results first, by (score desc, item_idx asc); masked and empty slots last
            best = np.lexsort((items, -scores, ~keep), axis=1)[:, :k]  # (b, min(k, depth))
            taken = np.take_along_axis(keep, best, 1)
            best_scores = np.where(taken, np.take_along_axis(scores, best, 1), -np.inf)
            if not searcher.exact or searcher.ties_ordered or depth >= n_items:
                break
            # items scoring the same as the last one returned may have been cut in any order: when that score
            # reaches into the kept top k (or fewer than k were kept), look deeper
            lowest_returned = scores[:, -1]
            unsure = (taken.sum(1) < min(k, depth)) | (best_scores[:, -1] <= lowest_returned)
            if not unsure.any():
                break
            depth = min(n_items, 2 * depth)
        width = best.shape[1]
        out_scores[users, :width] = best_scores
        out_items[users, :width] = np.where(taken, np.take_along_axis(items, best, 1), 0)
    return out_scores, out_items


def ranks_in_topk(topk_items: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """1-based position of each target in its row of top-K items; metrics.MISS when it is not there."""
    hit = topk_items == np.asarray(targets, dtype=np.int64)[:, None]
    return np.where(hit.any(axis=1), hit.argmax(axis=1) + 1, MISS).astype(np.int64)


def recall_against_exact(approx_items: np.ndarray, exact_items: np.ndarray, ks) -> dict[str, float]:
    """Per K: the share of the exact top-K items that the approximate index also returns in its top-K."""
    out = {}
    stride = int(max(approx_items.max(initial=0), exact_items.max(initial=0))) + 1
    rows = np.arange(len(exact_items))[:, None] * stride
    for k in ks:
        exact, approx = exact_items[:, :k], approx_items[:, :k]
        found = np.isin(rows + exact, (rows + approx)[approx > 0]) & (exact > 0)
        out[f"recall@{k}"] = float(found.sum() / max(int((exact > 0).sum()), 1))
    return out
