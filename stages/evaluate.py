"""Evaluation (`eval`): top-K retrieval over the whole catalogue and Recall@K / NDCG@K, the paper's protocol.

For every user with a target in the split: the User LLM reads the history (its last max_len items) and gives a
user vector; a FAISS index over the L2-normalised item embeddings (or the exact torch path) returns the top K
items with padding and the history removed (`full`, `window` or `none`); the target's position in that list is
its rank. Writes into `run` (e.g. artifacts/ml-100k):
  reports/eval-<timestamp>.json   metrics, user count, protocol card, timings (and .md: the same as a table)
  reports/ranks-<timestamp>.parquet   with per_user_ranks=true: user, target, rank (null: not in the top K)
  embeddings/<version>/index/     the FAISS index, reused while the item vectors and its settings are unchanged
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Literal

import numpy as np
import polars as pl
import torch

from pipeline.batches import user_vectors
from pipeline.data.sequences import UserSequences, concat_ranges, eval_examples, training_sequences
from pipeline.embeddings.store import load_embeddings, read_manifest, version_root
from pipeline.errors import ConfigError, UserError
from pipeline.io import atomic_path, folder_sha256, write_json_atomic, write_text_atomic
from pipeline.metrics import MISS, metrics_by_target_kind, metrics_from_ranks
from pipeline.models import build
from pipeline.run_dir import RunDir
from pipeline.runtime import device_of, distributed_state, gather_rows, my_share
from pipeline.search import (
    FaissSearch,
    Masked,
    PopularitySearch,
    TorchSearch,
    cached_faiss_index,
    import_faiss,
    masked_topk,
    normalise,
    ranks_in_topk,
    recall_against_exact,
)


@dataclass(frozen=True)
class EvalConfig:
    run: Path = Path("artifacts/ml-100k")
    """The run folder (embeddings/, user_llm/, ...); reports/ is written into it."""
    data: Path | None = None
    """Canonical tables; null: those the run's stage one (else stage two) recorded, else run/data."""
    k: tuple[int, ...] = (10, 50, 200)
    """Cut-offs K of Recall@K and NDCG@K."""
    split: Literal["test", "valid"] = "test"
    """Targets: test (each user's last item) or valid (second to last; for choosing settings)."""
    mask_history: Literal["full", "window", "none"] = "full"
    """Items removed before the top K: full history (official HLLM), the last `window` items
    (generative-recommenders) or none (RecBole). A target in the removed history is a miss."""
    window: int = 200
    """History items removed under mask_history=window."""
    candidates: Literal["all", "interacted", "new"] = "all"
    """Items ranked: every catalogue item, only those with at least one interaction in the data (as the
    ID-model benchmarks rank them: e.g. 3,706 of ML-1M's 3,883 movies), or only the new items of a new-item
    split (how well a model fills a slot kept for new items; warm targets are then misses)."""
    model: Literal["hllm", "popularity", "content", "popularity-new"] = "hllm"
    """hllm: the User LLM on the cached embeddings; popularity: items by training interactions, for every user;
    content: no training, the user vector is the mean of the history's cached embeddings (the last max_len
    items, 200 by default); popularity-new: the new items of a new-item split only, by their interactions in
    the evaluation histories (training saw none)."""
    user_llm: Literal["auto", "stage-two", "stage-one"] = "auto"
    """Which User LLM: stage-two (run/user_llm), stage-one (run/user_llm_stage1), auto (stage two if trained)."""
    embeddings: str | None = None
    """Embeddings version under run/embeddings/; null: the one in run/embeddings/CURRENT."""
    max_len: int | None = None
    """History items the User LLM reads; null: the length it was trained with."""
    index: Literal["flat", "ivf", "hnsw"] = "flat"
    """flat: exact (IndexFlatIP); ivf, hnsw: approximate, reported with their recall against exact search."""
    search: Literal["auto", "faiss", "torch"] = "auto"
    """faiss, torch (exact matmul + top-K; index=flat only), or auto: faiss where installed, else torch."""
    ivf_lists: int | None = None
    """IVF clusters; null: 4 x sqrt(items), at most items / 39 (faiss' minimum training points per cluster)."""
    ivf_probe: int = 16
    """IVF clusters searched per query (more: slower, closer to exact)."""
    hnsw_m: int = 32
    """HNSW graph degree."""
    hnsw_ef_search: int = 256
    """HNSW search breadth (raised to the search depth when that is larger)."""
    save_index: bool = True
    """Keep the FAISS index under embeddings/<version>/index/ for the next eval."""
    per_user_ranks: bool = False
    """Also write reports/ranks-<timestamp>.parquet: one row per user with the target's rank."""
    batch_size: int = 1024
    """Users per search batch (and 256 per User LLM forward)."""
    device: str = "auto"
    """auto (cuda when available), cpu or cuda: where the User LLM (and torch search) run."""
    seed: int = 42
    """Seed of IVF clustering."""
    task: Literal["retrieval", "ranking"] = "retrieval"
    """retrieval: top-K over the catalogue (Recall/NDCG); ranking: a ranker's AUC, GAUC and log loss on the
    labelled examples it held out (`train-ranker`)."""
    fusion: Literal["early", "late", "none"] = "early"
    """task=ranking: which ranker of the run (run/ranker-<fusion>/)."""

    def __post_init__(self) -> None:
        if not self.k or any(k < 1 for k in self.k):
            raise ConfigError(f"k={list(self.k)}: give one or more positive cut-offs, e.g. --k 10 50 200")
        object.__setattr__(self, "k", tuple(sorted(set(self.k))))  # each K once, ascending
        for name in ("window", "batch_size", "ivf_probe", "hnsw_m", "hnsw_ef_search"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)}: must be >= 1")
        for name in ("max_len", "ivf_lists"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)}: must be >= 1, or null")
        if self.search == "torch" and self.index != "flat":
            raise ConfigError(f"search=torch serves exact search only; use index=flat, or search=faiss for "
                              f"index={self.index}")


def _ivf_lists(config: EvalConfig, n_items: int) -> int:
    if config.ivf_lists is not None:
        return min(config.ivf_lists, n_items)
    return max(1, min(int(4 * math.sqrt(n_items)), n_items // 39))


def make_searcher(config: EvalConfig, items: np.ndarray, index_folder: Path, device: torch.device, log=print,
                  ids: np.ndarray | None = None, parent_folder: Path | None = None, save: bool = True):
    """The searcher the settings ask for over `items` (their item_idx: `ids`, default 1..N), and a description
    of the index for the protocol card. A saved index of the parent version (`parent_folder`) is patched."""
    faiss = import_faiss()
    backend = config.search if config.search != "auto" else ("faiss" if faiss is not None else "torch")
    if backend == "torch":
        if config.index != "flat":
            raise ConfigError(f"index={config.index} needs faiss, which is not installed here: pip install "
                              "faiss-cpu (or faiss-gpu), or use index=flat")
        if config.search == "auto":
            log("faiss is not installed: exact search with torch instead")
        return TorchSearch(items, device, ids), {"type": "exact", "backend": "torch", "device": str(device),
                                            "description": "torch matmul + top-K (exact)"}
    if faiss is None:
        raise ConfigError("search=faiss but faiss is not installed here: pip install faiss-cpu (or faiss-gpu), or "
                          "set search=torch")
    lists = _ivf_lists(config, len(items))
    build_settings = {"ivf_lists": lists, "seed": config.seed} if config.index == "ivf" else (
        {"hnsw_m": config.hnsw_m} if config.index == "hnsw" else {})
    key = {"items_sha256": hashlib.sha256(items.tobytes()).hexdigest(), "shape": list(items.shape),
           "kind": config.index, **build_settings}
    index, info = cached_faiss_index(items, config.index, index_folder, key, lists, config.hnsw_m, config.seed,
                                     save=config.save_index and save, log=log, ids=ids,
                                     parent_folder=parent_folder)
    searcher = FaissSearch(index, config.index, config.ivf_probe, config.hnsw_ef_search,
                           use_gpu=device.type == "cuda", max_id=int(ids.max(initial=0)) if ids is not None else None)
    search_settings = {"ivf_probe": config.ivf_probe} if config.index == "ivf" else (
        {"hnsw_ef_search": f"max({config.hnsw_ef_search}, search depth)"} if config.index == "hnsw" else {})
    kind = "exact" if config.index == "flat" else "approximate"
    faiss_index = {"flat": "IndexFlatIP", "ivf": "IndexIVFFlat", "hnsw": "IndexHNSWFlat"}[config.index]
    card = {"type": kind, "backend": "faiss", "faiss_index": faiss_index,
            "description": f"faiss {faiss_index} ({kind})", "gpu": searcher.gpu_index is not None,
            **build_settings, **search_settings, **info}
    return searcher, card


def format_table(report: dict) -> str:
    """The metrics as a terminal table, with the protocol line above it."""
    p = report["protocol"]
    ranked = p.get("candidate_items", p["items"])
    items = f"{p['items']:,} items" if ranked == p["items"] else f"{ranked:,} of {p['items']:,} items ranked"
    lines = [f"{p['dataset']} · {p['split']} split · {report['users']:,} users · {items} · "
             f"history masked: {p['mask_history']} · {p['model']['name']} · {p['index']['description']}"]
    floor = report.get("popularity")
    lines.append(f"{'K':>6}  {'Recall@K':>9}  {'NDCG@K':>9}" + (f"  {'popularity R@K':>15}  {'N@K':>8}" if floor
                                                                 else ""))
    for k in p["k"]:
        row = f"{k:>6}  {report['metrics'][f'recall@{k}']:>9.4f}  {report['metrics'][f'ndcg@{k}']:>9.4f}"
        if floor:
            row += f"  {floor[f'recall@{k}']:>15.4f}  {floor[f'ndcg@{k}']:>8.4f}"
        lines.append(row)
    if "targets" in report:  # the new-item split
        parts = [f"{kind} targets ({report['targets'][kind]:,}): " + ", ".join(
            f"R@{k} {report[f'metrics_{kind}'][f'recall@{k}']:.4f} N@{k} {report[f'metrics_{kind}'][f'ndcg@{k}']:.4f}"
            for k in p["k"]) for kind in ("warm", "new") if f"metrics_{kind}" in report]
        lines += parts
    if "index_recall" in report:
        lines.append("index recall against exact search: " + ", ".join(
            f"@{k} {report['index_recall'][f'recall@{k}']:.4f}" for k in p["k"]))
    return "\n".join(lines)


def _markdown(report: dict) -> str:
    """The report as Markdown: one row per K with every metric set it holds, then the protocol card."""
    p = report["protocol"]
    sets = dict([("", report["metrics"])] + [(f"{name} ", report[key]) for name, key in (
        ("warm", "metrics_warm"), ("new-item", "metrics_new"), ("popularity", "popularity"),
        ("exact", "exact_metrics"), ("index recall vs exact", "index_recall")) if key in report])
    columns = [(label, metric) for label, values in sets.items() for metric in ("recall", "ndcg")
               if f"{metric}@{p['k'][0]}" in values]
    lines = ["| K | " + " | ".join(f"{label}{metric}@K" for label, metric in columns) + " |",
             "|---" * (len(columns) + 1) + "|"]
    for k in p["k"]:
        lines.append(f"| {k} | " + " | ".join(f"{sets[label][f'{metric}@{k}']:.4f}" for label, metric in columns)
                     + " |")
    card = "\n".join(f"- {key}: {json.dumps(value) if isinstance(value, dict) else value}" for key, value in p.items())
    return (f"# Evaluation {report['created']}\n\n{report['users']:,} users.\n\n" + "\n".join(lines)
            + f"\n\nProtocol:\n\n{card}\n")


@dataclass
class Catalogue:
    """What is ranked: the items (the data's, or the embeddings version's: a refresh adds items and retires some)
    and, per user, the items removed before the top K."""

    n_items: int
    live: np.ndarray
    """item_idx that can be recommended (retired items are in no index)."""
    retired: int
    masked: Masked
    candidates: int
    """Items a target can be ranked among (the protocol card's candidate_items)."""
    root: Path | None
    """The embeddings version read (None for a model without cached embeddings)."""
    cached: torch.Tensor | None


def _catalogue(config: EvalConfig, seqs: UserSequences, examples, data: Path, path: Path | None) -> Catalogue:
    root, cached, n_items, absent = None, None, seqs.num_items, np.zeros(0, dtype=np.int64)
    if config.model == "content" or (path is not None and "cached" in build.saved_item_source(path)):
        root = version_root(config.run, config.embeddings)
        loaded = load_embeddings(root)
        cached, n_items = loaded.embeddings, loaded.embeddings.shape[0] - 1
        if n_items < seqs.num_items:
            raise UserError(f"{root}: holds {n_items} items but {data} has {seqs.num_items}; evaluate with the "
                            "data these embeddings were made from")
        absent = np.flatnonzero(~loaded.present[1:].numpy()) + 1  # retired by a refresh: never recommended
    if config.candidates == "new" and not len(seqs.new_items):
        raise UserError(f"{data}: candidates=new ranks the new items of a new-item split, and this data has none "
                        "(data prepare new_item_fraction=... or new_items_after=...)")
    masked = Masked.from_histories(examples.history_offsets, examples.history_items, config.mask_history,
                                   config.window)
    never_seen = np.flatnonzero(np.bincount(seqs.items, minlength=n_items + 1)[1:] == 0) + 1
    live = np.setdiff1d(np.arange(1, n_items + 1), absent)
    if config.candidates == "new":
        live = np.intersect1d(live, seqs.new_items)
    if config.candidates == "interacted" and len(np.setdiff1d(never_seen, absent)):
        masked = masked.plus(np.setdiff1d(never_seen, absent))
    candidates = len(np.setdiff1d(live, never_seen)) if config.candidates == "interacted" else len(live)
    return Catalogue(n_items, live, len(absent), masked, candidates, root, cached)


def _protocol(config: EvalConfig, data: Path, catalogue: Catalogue) -> dict:
    stats_path = data / "stats.json"
    dataset = json.loads(stats_path.read_text()).get("dataset", data.name) if stats_path.is_file() else data.name
    window = {"window": config.window} if config.mask_history == "window" else {}
    protocol = {"dataset": dataset, "data": str(data), "items": catalogue.n_items, "split": config.split,
                "mask_history": config.mask_history, **window, "candidates": config.candidates,
                "candidate_items": catalogue.candidates, "k": list(config.k),
                "ranking": ("the new items only" if config.candidates == "new" else "full catalogue")
                + ", cosine similarity, ties by item_idx"}
    if catalogue.retired:
        protocol["retired_items"] = catalogue.retired
    new_split = (json.loads(stats_path.read_text()).get("split", {}).get("new_items") if stats_path.is_file()
                 else None)
    if new_split:
        protocol["new_items"] = {key: new_split[key] for key in ("method", "fraction", "after", "seed", "new_items")}
    if max(config.k) > catalogue.n_items:
        protocol["note"] = f"K above the catalogue size ({catalogue.n_items}): every item fits in the top K"
    return protocol


def _rank_with_user_llm(config: EvalConfig, path: Path, catalogue: Catalogue, examples, data: Path, state,
                        timings: dict, started: float, log=print) -> tuple[np.ndarray, dict, dict, dict] | None:
    """Each user's target rank under the User LLM (every process scores a share of the users; the main process
    gets them all, the others None), with the model's and the index's protocol cards and extra metrics."""
    device, root = device_of(config.device), catalogue.root
    model, meta = build.load_user_model(path, catalogue.cached)
    if model.items.num_items != catalogue.n_items:
        raise UserError(f"{path}: trained on {model.items.num_items} items but {data} has {catalogue.n_items}; "
                        "evaluate with the data it was trained on")
    model.to(device)
    table = model.items.table()  # (N+1, D) every item as the model embeds it (cached, IDs, adapter, sums)
    max_len = config.max_len or int(meta.get("max_len", 200))
    trained_on = Path(meta.get("embeddings") or "").name
    if root is not None and trained_on and trained_on != root.name:
        log(f"note: {path} was trained on embeddings {trained_on}; evaluating it with {root.name}")
    timings["load_s"] = time.perf_counter() - started
    log(f"evaluating {path} ({meta.get('source', 'User LLM')}) on {len(examples):,} users' {config.split} "
        f"targets, histories of up to {max_len} items")
    start = time.perf_counter()
    mine = my_share(len(examples), state)  # under torchrun: each process scores a share of the users
    vectors = user_vectors(model, table, examples.subset(mine), max_len)
    if not torch.isfinite(vectors).all():
        raise RuntimeError("the User LLM produced NaN or infinite user vectors")
    queries = normalise(vectors)
    timings["user_vectors_s"] = time.perf_counter() - start
    ids = catalogue.live
    vectors_of_items = table[torch.from_numpy(ids)].cpu()
    unknown = ~vectors_of_items.any(dim=1).numpy()  # a zero vector (an ID no training saw): never recommended
    ids, vectors_of_items = ids[~unknown], vectors_of_items[torch.from_numpy(~unknown)]
    if not len(ids):  # e.g. an ID model asked to rank only new items: none has a vector, every target misses
        ranks = gather_rows(np.full(len(mine), MISS, dtype=np.int64), state)
        extra = {"items_without_vector": int(unknown.sum())} if state.is_main_process else None
        return None if extra is None else (ranks, _model_card(meta, path, max_len, root),
                                         {"type": "exact", "description": "no candidate has a vector"}, extra)
    items = normalise(vectors_of_items)  # (N', D)
    if not np.isfinite(items).all():
        raise UserError(f"{root or path}: the item vectors hold NaN or infinite values")
    start = time.perf_counter()
    parent = read_manifest(root).get("parent") if root is not None else None
    searcher, index_card = make_searcher(config, items, (root or config.run) / "index", device, log=log, ids=ids,
                                         parent_folder=root.parent / parent / "index" if parent else None,
                                         save=state.is_main_process)
    timings["index_s"] = time.perf_counter() - start
    start = time.perf_counter()
    my_masked = catalogue.masked.subset(mine)
    k_max = max(config.k)
    _, top_items = masked_topk(searcher, queries, my_masked, k_max, config.batch_size)
    timings["search_s"] = time.perf_counter() - start
    timings["users_per_s"] = len(mine) * state.num_processes / max(timings["search_s"], 1e-9)
    ranks = gather_rows(ranks_in_topk(top_items, examples.targets[mine]), state)
    extra: dict = {}
    if not searcher.exact:
        _, exact_items = masked_topk(TorchSearch(items, device, ids), queries, my_masked, k_max, config.batch_size)
        top_items, exact_items = gather_rows(top_items, state), gather_rows(exact_items, state)
        extra["index_recall"] = recall_against_exact(top_items, exact_items, config.k)
        extra["exact_metrics"] = metrics_from_ranks(ranks_in_topk(exact_items, examples.targets), config.k)
    if state.num_processes > 1:
        timings["processes"] = state.num_processes
    if not state.is_main_process:  # the main process writes the report
        return None
    if unknown.any():
        extra["items_without_vector"] = int(unknown.sum())
    left_out = ~table.any(dim=1).cpu().numpy()[examples.history_items]  # user_vectors leaves these out of the input
    if left_out.any():
        extra["history_items_without_vector"] = int(left_out.sum())
    return ranks, _model_card(meta, path, max_len, root), index_card, extra


def _model_card(meta: dict, path: Path, max_len: int, root: Path | None) -> dict:
    return {"name": f"{meta.get('model', 'hllm')} ({meta.get('source', 'user llm')})", "user_llm": str(path),
            "items": build.saved_item_source(path), "fingerprint": folder_sha256(path)[:16],
            "max_len": max_len, "embeddings_version": root.name if root else None,
            "embeddings_model": read_manifest(root).get("model_fingerprint", "")[:16] if root else None}


def _write_report(config: EvalConfig, examples, ranks: np.ndarray, masked: Masked, protocol: dict, extra: dict,
                  timings: dict, started: float, new_items: np.ndarray) -> dict:
    """reports/eval-<stamp>.json and .md (and the per-user ranks), each written atomically."""
    run_dir = RunDir(config.run)
    reports, stamp = run_dir.reports, run_dir.report_stamp("eval")
    report = {"created": datetime.now().isoformat(timespec="seconds"), "users": len(examples),
              "metrics": metrics_from_ranks(ranks, config.k), "protocol": protocol, **extra,
              "ranks_file": None}
    if len(new_items):  # the new-item split: warm and new-item targets apart
        kinds = metrics_by_target_kind(ranks, examples.targets, new_items, config.k)
        report["targets"] = {kind: values.pop("targets") for kind, values in kinds.items()}
        report.update({f"metrics_{kind}": values for kind, values in kinds.items() if values})
    if config.per_user_ranks:
        ranks_path = reports / f"ranks-{stamp}.parquet"
        frame = pl.DataFrame({"user_idx": examples.users, "target_item_idx": examples.targets, "rank": ranks,
                              "history_length": np.diff(examples.history_offsets), "masked_items": masked.counts})
        if len(new_items):
            frame = frame.with_columns(pl.Series("target_is_new", np.isin(examples.targets, new_items)))
        frame = frame.with_columns(pl.when(pl.col("rank") == MISS).then(None).otherwise(pl.col("rank")).alias("rank"))
        with atomic_path(ranks_path) as tmp:
            frame.write_parquet(tmp)
        report["ranks_file"] = str(ranks_path)
        report["ranks_note"] = f"rank is null when the target is not in the top {max(config.k)} (a miss at every K)"
    timings["total_s"] = time.perf_counter() - started
    report["timings"] = {key: round(value, 3) for key, value in timings.items()}
    write_json_atomic(reports / f"eval-{stamp}.json", report)
    write_text_atomic(reports / f"eval-{stamp}.md", _markdown(report))
    report["report_file"] = str(reports / f"eval-{stamp}.json")
    return report


def _rank_without_training(config: EvalConfig, seqs: UserSequences, examples, catalogue: Catalogue,
                           floor_ranks: np.ndarray, log=print) -> tuple[np.ndarray, dict, dict]:
    """The baselines that need no trained model: each user's target rank, the model card and the index card."""
    exact = {"type": "exact", "backend": "numpy"}
    if config.model == "popularity":
        return floor_ranks, {"name": "popularity", "counts": "training interactions (the split's training part)"}, \
            {**exact, "description": "items by training count (exact)"}
    if config.model == "popularity-new":
        if not len(seqs.new_items):
            raise UserError("model=popularity-new ranks the new items of a new-item split, and this data has none "
                            "(data prepare new_item_fraction=...)")
        counts = np.bincount(examples.history_items, minlength=catalogue.n_items + 1)
        search = PopularitySearch(counts, np.intersect1d(catalogue.live, seqs.new_items))
        ranks = ranks_in_topk(masked_topk(search, np.zeros((len(examples), 1), np.float32), catalogue.masked,
                                          max(config.k), config.batch_size)[1], examples.targets)
        return ranks, {"name": "popularity among new items", "counts": "interactions in the evaluation histories"}, \
            {**exact, "description": "new items by their count in the evaluation histories (exact)"}
    # content: the mean of the history's normalised embeddings against every item's, no training at all
    max_len = config.max_len or 200
    table = torch.nn.functional.normalize(catalogue.cached.float(), dim=-1)  # (N+1, D), row 0 and absent rows 0
    lengths = np.minimum(np.diff(examples.history_offsets), max_len)
    last = np.repeat(examples.history_offsets[1:] - lengths, lengths) + concat_ranges(lengths)
    owner = torch.from_numpy(np.repeat(np.arange(len(examples)), lengths))
    history = torch.from_numpy(examples.history_items[last].astype(np.int64))
    sums = torch.zeros(len(examples), table.shape[1]).index_add_(0, owner, table[history])
    queries = normalise(sums)
    ids = catalogue.live
    searcher, index_card = make_searcher(config, table[torch.from_numpy(ids)].contiguous().numpy(),
                                         catalogue.root / "index", device_of(config.device), log=log, ids=ids)
    ranks = ranks_in_topk(masked_topk(searcher, queries, catalogue.masked, max(config.k), config.batch_size)[1],
                          examples.targets)
    card = {"name": "content (mean of the history's item embeddings)", "max_len": max_len,
            "embeddings_version": catalogue.root.name}
    return ranks, card, index_card


def run(config: EvalConfig, log=print) -> dict | None:
    """Evaluate the run's User LLM (or popularity) on the split; writes the report and returns it. Under a
    multi-process launch each process computes the vectors and top-K of a share of the users and the main one
    writes the report (the others return None)."""
    if config.task == "ranking":  # the eval command hands these to stages.evaluate_ranking
        raise ConfigError("task=ranking: call stages.evaluate_ranking.run (the eval command does)")
    started = time.perf_counter()
    timings: dict[str, float] = {}
    state = distributed_state(device_of(config.device))
    log = log if state.is_main_process else (lambda _: None)
    data = RunDir(config.run).data(config.data)
    seqs = UserSequences.load(data)
    examples = eval_examples(seqs, config.split)
    if len(examples) == 0:
        need = 2 if config.split == "test" else 3
        raise UserError(f"{data}: no user has a {config.split} target (a user needs {need} or more interactions)")
    path = RunDir(config.run).trained_user_llm(config.user_llm) if config.model == "hllm" else None
    catalogue = _catalogue(config, seqs, examples, data, path)
    protocol = _protocol(config, data, catalogue)
    # the popularity floor on the same users: training counts (the split's training part), history masked alike
    popularity = PopularitySearch(np.bincount(training_sequences(seqs).items, minlength=catalogue.n_items + 1),
                                  catalogue.live)
    floor_ranks = ranks_in_topk(masked_topk(popularity, np.zeros((len(examples), 1), np.float32), catalogue.masked,
                                            max(config.k), config.batch_size)[1], examples.targets)
    if config.model in ("popularity", "popularity-new", "content"):
        if not state.is_main_process:  # every process could rank them all; the main one reports
            return None
        ranks, protocol["model"], protocol["index"] = _rank_without_training(config, seqs, examples, catalogue,
                                                                           floor_ranks, log)
        extra = {"popularity": metrics_from_ranks(floor_ranks, config.k)} if config.model != "popularity" else {}
    else:
        ranked = _rank_with_user_llm(config, path, catalogue, examples, data, state, timings, started, log=log)
        if ranked is None:
            return None
        ranks, protocol["model"], protocol["index"], extra = ranked
        if protocol["index"]["type"] == "approximate":
            protocol["ranking"] += "; approximate index: see index_recall and exact_metrics"
        extra["popularity"] = metrics_from_ranks(floor_ranks, config.k)  # the floor, same users
    return _write_report(config, examples, ranks, catalogue.masked, protocol, extra, timings, started,
                         seqs.new_items)
