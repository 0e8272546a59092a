"""Benchmarks that back speed claims with numbers: each writes a JSON file naming the machine it ran on.

`bench embed`: the embedding job's fast path (length-sorted batches under a token budget) against a plain
padded loop over the catalogue in file order and against sentence-transformers' `encode`, on the same model
and texts, checking that all three give the same embeddings.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import time
from functools import partial
from pathlib import Path

import numpy as np
import polars as pl
import torch
import torch.nn.functional as F

from pipeline.embeddings.encode import embed_items, embed_items_reference
from pipeline.errors import UserError
from pipeline.io import write_json_atomic
from pipeline.models import build
from pipeline.models.presets import PRESETS
from pipeline.models.tokens import TokenizedCatalogue


def machine() -> dict:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _timed(fn, repeats: int):
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def bench_embed(data: Path, model: str, out: Path, max_items: int | None = None, token_budget: int = 4096,
                batch_size: int = 32, max_text_tokens: int = 256, repeats: int = 2, log=print) -> dict:
    if repeats < 1 or (max_items is not None and max_items < 1) or token_budget < 1:
        raise UserError("bench embed: --repeats, --max-items and --token-budget must be >= 1")
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        raise UserError("bench embed compares against sentence-transformers: pip install -e '.[bench]'") from None
    texts = pl.read_parquet(data / "items.parquet", columns=["item_idx", "text"]).sort("item_idx")["text"].to_list()
    texts = texts[:max_items] if max_items is not None else texts
    item_llm, tokenizer = build.build_item_llm(model, "pretrained", "mean", None, "sdpa", log=log)
    item_llm.eval()
    location = build.presets.resolve(model, log=log)
    idx = np.arange(1, len(texts) + 1)
    log(f"bench embed: {len(texts):,} item texts, {model}, {torch.get_num_threads()} threads")

    def fast():
        catalogue = TokenizedCatalogue.build(tokenizer, texts, max_text_tokens)
        return catalogue, embed_items(item_llm, catalogue, idx, token_budget, alignment="left")

    def reference():
        catalogue = TokenizedCatalogue.build(tokenizer, texts, max_text_tokens)
        return embed_items_reference(item_llm, catalogue, idx, batch_size, alignment="left")

    st_model = SentenceTransformer(str(location), device="cpu")
    st_model.max_seq_length = max_text_tokens

    def sentence_transformers():
        return st_model.encode(texts, batch_size=batch_size, convert_to_tensor=True, show_progress_bar=False)

    warm = TokenizedCatalogue.build(tokenizer, texts[:64], max_text_tokens)
    embed_items(item_llm, warm, idx[:len(texts[:64])], alignment="left")  # warm-up
    fast_s, (catalogue, fast_emb) = _timed(fast, repeats)
    ref_s, ref_emb = _timed(reference, repeats)
    st_s, st_emb = _timed(sentence_transformers, repeats)
    tokens = int(catalogue.lengths(idx).sum())

    def rates(seconds: float) -> dict:
        return {"seconds": round(seconds, 3), "items_per_s": round(len(texts) / seconds, 1),
                "tokens_per_s": round(tokens / seconds, 1)}

    result = {
        "benchmark": "embed",
        "machine": machine(),
        "model": model,
        "pooling": "mean (as sentence-transformers' all-MiniLM-L6-v2)",
        "data": str(data),
        "items": len(texts),
        "tokens": tokens,
        "settings": {"token_budget": token_budget, "batch_size": batch_size, "max_text_tokens": max_text_tokens,
                     "repeats": repeats, "timing": "best of repeats, tokenization included"},
        "reference_loop": "file order, batches of batch_size, each padded to its longest text",
        "results": {"fast_sorted_budget": rates(fast_s), "padded_file_order": rates(ref_s),
                    "sentence_transformers_encode": rates(st_s)},
        "speedup": {"vs_padded_file_order": round(ref_s / fast_s, 2),
                    "vs_sentence_transformers": round(st_s / fast_s, 2)},
        "min_cosine": {"fast_vs_padded": float(F.cosine_similarity(fast_emb, ref_emb).min()),
                       "fast_vs_sentence_transformers": float(F.cosine_similarity(fast_emb, st_emb.cpu().float())
                                                              .min())},
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out, result)
    log(json.dumps(result["results"], indent=1))
    log(f"speedup: {result['speedup']}; min cosine: {result['min_cosine']}; written to {out}")
    return result


# Real shapes (randomly initialised: only speed is measured). FLOPs use the non-embedding parameters.
SHAPES = {
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152),
    "tinyllama-1.1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                           num_key_value_heads=4, vocab_size=32000),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1000),
    # the User LLM of the CPU configs, from the preset table
    "llama-small": {k: v for k, v in PRESETS["llama-small"].config.items()
                    if k not in ("model_type", "max_position_embeddings", "rms_norm_eps")},
}
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense, SXM


def bench_embed_mfu(shape: str, out: Path, text_tokens: int = 256, batch_tokens: int = 65536, iterations: int = 10,
                    peak_tflops: float | None = None, attn_implementation: str = "sdpa", log=print) -> dict:
    """Tokens/s and MFU of the Item LLM forward (the embedding job's work) for a model of a real shape."""
    from transformers import AutoConfig, AutoModel

    from pipeline.models.llm import ItemLLM

    if shape not in SHAPES:
        raise UserError(f"unknown shape '{shape}'; available: {', '.join(SHAPES)}")
    if iterations < 1 or text_tokens < 1 or batch_tokens < text_tokens + 1:
        raise UserError("bench embed-mfu: --iterations >= 1 and --batch-tokens > --text-tokens are required")
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    config = AutoConfig.for_model("llama", max_position_embeddings=max(2048, text_tokens + 1), bos_token_id=None,
                                  eos_token_id=None, pad_token_id=0, **SHAPES[shape])
    torch.manual_seed(0)
    backbone = AutoModel.from_config(config, attn_implementation=attn_implementation, dtype=dtype)
    backbone.config.use_cache = False
    item_llm = ItemLLM(backbone).to(device=device, dtype=dtype).eval()
    width = text_tokens + 1
    rows = max(1, batch_tokens // width)
    ids = torch.randint(1, config.vocab_size, (rows, width), device=device)
    mask = torch.ones_like(ids)
    positions = torch.arange(width, device=device).expand(rows, -1)
    non_embedding = sum(p.numel() for n, p in item_llm.named_parameters() if "embed" not in n)
    # forward FLOPs per item: 2 x weights x tokens + attention (QK^T and AV: 4 x layers x T^2 x hidden)
    flops_per_batch = rows * (2 * non_embedding * width + 4 * config.num_hidden_layers * width * width
                              * config.hidden_size)

    def run_once():
        with torch.inference_mode():
            item_llm(input_ids=ids, attention_mask=mask, position_ids=positions)
        if cuda:
            torch.cuda.synchronize()

    run_once()  # warm-up
    start = time.perf_counter()
    for _ in range(iterations):
        run_once()
    seconds = (time.perf_counter() - start) / iterations
    info = machine()
    if peak_tflops is None and cuda:
        peak_tflops = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in info.get("gpu", "")), None)
    result = {
        "benchmark": "embed-mfu",
        "machine": info,
        "shape": shape,
        "config": SHAPES[shape],
        "non_embedding_params": non_embedding,
        "dtype": str(dtype).replace("torch.", ""),
        "attn_implementation": attn_implementation,
        "text_tokens": text_tokens,
        "items_per_batch": rows,
        "seconds_per_batch": round(seconds, 4),
        "items_per_s": round(rows / seconds, 1),
        "tokens_per_s": round(rows * width / seconds, 1),
        "tflops_per_s": round(flops_per_batch / seconds / 1e12, 3),
        "peak_tflops": peak_tflops,
        "mfu": round(flops_per_batch / seconds / (peak_tflops * 1e12), 4) if peak_tflops else None,
        "weights": "random (speed only)",
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out, result)
    log(f"{shape} ({result['dtype']}, {attn_implementation}): {result['items_per_s']} items/s, "
        f"{result['tokens_per_s']} tokens/s, {result['tflops_per_s']} TFLOP/s, MFU {result['mfu']}; written to {out}")
    return result


def _peak_rss_mb() -> tuple[float, float]:
    """(current, peak) resident memory of this process in MB (Linux /proc)."""
    values = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(("VmRSS", "VmHWM")):
            values[line.split(":")[0]] = int(line.split()[1]) / 1024
    return values.get("VmRSS", 0.0), values.get("VmHWM", 0.0)


def _train_one(shape: str, length: int, attn: str, batch_positions: int, steps: int, negatives: int, queue) -> None:
    """One configuration in a fresh process: forward + backward of the stage-two loss on random inputs."""
    from transformers import AutoConfig, AutoModel

    from pipeline.models.llm import UserLLM, drop_word_embeddings
    from pipeline.models.loss import nce_loss

    torch.manual_seed(0)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    config = AutoConfig.for_model("llama", max_position_embeddings=max(4096, length), bos_token_id=None,
                                  eos_token_id=None, pad_token_id=None, **SHAPES[shape])
    backbone = AutoModel.from_config(config, attn_implementation=attn)
    drop_word_embeddings(backbone)
    backbone.config.use_cache = False
    model = UserLLM(backbone).to(device)
    rows = max(1, batch_positions // length)
    x = torch.randn(rows, length, config.hidden_size, device=device)
    mask = torch.ones(rows, length, dtype=torch.long, device=device)
    table = torch.randn(negatives, config.hidden_size, device=device)
    scale = torch.tensor(2.0, device=device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()

    def step():
        with autocast:
            out = model(x, mask)
        loss = nce_loss(out.reshape(-1, out.shape[-1]), x.reshape(-1, x.shape[-1]), torch.zeros(rows * length),
                        table, torch.arange(1, negatives + 1), scale).loss_per_position.mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()

    step()  # warm-up (and optimizer state)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    base_rss, _ = _peak_rss_mb()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    seconds = (time.perf_counter() - start) / steps
    _, peak_rss = _peak_rss_mb()
    params = sum(p.numel() for n, p in model.named_parameters() if "embed" not in n)
    queue.put({"length": length, "attn_implementation": attn, "sequences_per_step": rows,
               "seconds_per_step": round(seconds, 4), "tokens_per_s": round(rows * length / seconds, 1),
               "peak_memory_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1) if cuda else round(peak_rss, 1),
               "memory_measure": "cuda max_memory_allocated" if cuda else "process peak RSS (VmHWM)",
               "rss_before_steps_mb": None if cuda else round(base_rss, 1),
               "train_flops_per_s": 6 * params * rows * length / seconds
               + 12 * config.num_hidden_layers * rows * length * length * config.hidden_size / seconds})


def bench_train(shape: str, out: Path, lengths: tuple[int, ...] = (256, 1024, 4096), batch_positions: int = 8192,
                steps: int = 3, negatives: int = 1024, peak_tflops: float | None = None, log=print) -> dict:
    """Training throughput and peak memory of the User LLM at several sequence lengths, SDPA against eager."""
    import multiprocessing

    if shape not in SHAPES:
        raise UserError(f"unknown shape '{shape}'; available: {', '.join(SHAPES)}")
    if steps < 1 or batch_positions < 1 or any(length < 2 for length in lengths):
        raise UserError("bench train: --steps, --batch-positions >= 1 and lengths >= 2 are required")
    info = machine()
    if peak_tflops is None and "gpu" in info:
        peak_tflops = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in info["gpu"]), None)
    context = multiprocessing.get_context("spawn")  # a fresh process per configuration: honest peak memory
    rows = []
    for length in lengths:
        for attn in ("sdpa", "eager"):
            queue = context.Queue()
            child = context.Process(target=_train_one, args=(shape, length, attn, batch_positions, steps, negatives,
                                                             queue))
            child.start()
            result = queue.get()
            child.join()
            if peak_tflops:
                result["mfu"] = round(result["train_flops_per_s"] / (peak_tflops * 1e12), 4)
            result["train_flops_per_s"] = round(result["train_flops_per_s"], 1)
            rows.append(result)
            log(f"length {length:5d} {attn:5s}: {result['tokens_per_s']:10.1f} tokens/s, "
                f"peak {result['peak_memory_mb']:.0f} MB")
    speedups = {str(length): round(next(r["tokens_per_s"] for r in rows if r["length"] == length
                                        and r["attn_implementation"] == "sdpa")
                                   / next(r["tokens_per_s"] for r in rows if r["length"] == length
                                          and r["attn_implementation"] == "eager"), 2) for length in lengths}
    result = {"benchmark": "train", "machine": info, "shape": shape, "config": SHAPES[shape],
              "batch_positions": batch_positions, "negatives": negatives, "steps": steps,
              "dtype": "bfloat16 autocast" if "gpu" in info else "float32", "peak_tflops": peak_tflops,
              "weights": "random (speed only)", "results": rows, "sdpa_speedup_over_eager": speedups}
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out, result)
    log(f"SDPA over eager: {speedups}; written to {out}")
    return result


def _topk_differences(a: np.ndarray, b: np.ndarray, items: np.ndarray, queries: np.ndarray) -> dict:
    """How two top-K lists (U, K) of item_idx differ: identical rows, and the largest float64 score gap between
    items that sit at the same position in the two lists (tiny gaps = float rounding between near-ties)."""
    differ = a != b
    gap = 0.0
    if differ.any():
        rows, cols = np.nonzero(differ)
        q = queries[rows].astype(np.float64)
        score_a = np.einsum("ij,ij->i", items[a[rows, cols] - 1].astype(np.float64), q)
        score_b = np.einsum("ij,ij->i", items[b[rows, cols] - 1].astype(np.float64), q)
        gap = float(np.abs(score_a - score_b).max())
    return {"identical_rows": float((~differ).all(axis=1).mean()),
            "identical_sets": float(np.mean([set(x) == set(y) for x, y in zip(a, b, strict=True)])),
            "max_score_gap_where_different": gap}


def bench_search(out: Path, users: int = 10_000, items: int = 200_000, dim: int = 384, k: int = 200,
                 batch_size: int = 1024, loop_users: int = 500, seed: int = 0, log=print) -> dict:
    """Users/s of exact top-K search over synthetic normalised vectors: FAISS IndexFlatIP and torch matmul+top-K
    (both through the eval path, masked_topk), against a per-user numpy loop, checking they return the same top-K."""
    from pipeline.search import (
        FaissSearch,
        Masked,
        TorchSearch,
        build_faiss_index,
        import_faiss,
        masked_topk,
        normalise,
    )

    if min(users, items, dim, k, batch_size, loop_users) < 1 or k > items:
        raise UserError("bench search: --users, --items, --dim, --k, --batch-size and --loop-users must be >= 1, "
                        "and --k at most --items")
    rng = np.random.default_rng(seed)
    item_vecs = normalise(rng.standard_normal((items, dim), dtype=np.float32))
    queries = normalise(rng.standard_normal((users, dim), dtype=np.float32))
    no_mask = Masked(np.zeros(users + 1, dtype=np.int64), np.zeros(0, dtype=np.int64))
    paths: dict[str, dict] = {}
    tops: dict[str, np.ndarray] = {}

    faiss = import_faiss()
    if faiss is not None:
        start = time.perf_counter()
        index = build_faiss_index(item_vecs, "flat", 1, 32, seed)
        build_s = time.perf_counter() - start
        start = time.perf_counter()
        tops["faiss"] = masked_topk(FaissSearch(index, "flat"), queries, no_mask, k, batch_size)[1]
        seconds = time.perf_counter() - start
        paths["faiss"] = {"what": f"faiss IndexFlatIP, {batch_size} users per search call", "users": users,
                          "seconds": round(seconds, 3), "users_per_s": round(users / seconds, 1),
                          "index_build_s": round(build_s, 3)}
        log(f"faiss flat: {users / seconds:,.0f} users/s")
    start = time.perf_counter()
    tops["torch"] = masked_topk(TorchSearch(item_vecs), queries, no_mask, k, batch_size)[1]
    seconds = time.perf_counter() - start
    paths["torch"] = {"what": f"torch matmul + topk, {batch_size} users per batch", "users": users,
                      "seconds": round(seconds, 3), "users_per_s": round(users / seconds, 1)}
    log(f"torch matmul+topk: {users / seconds:,.0f} users/s")

    n_loop = min(loop_users, users)
    loop = np.empty((n_loop, k), dtype=np.int64)
    start = time.perf_counter()
    for user in range(n_loop):  # the reference: one user at a time
        scores = item_vecs @ queries[user]
        top = np.argpartition(-scores, k - 1)[:k]
        loop[user] = top[np.lexsort((top, -scores[top]))] + 1
    seconds = time.perf_counter() - start
    paths["per_user_loop"] = {"what": "numpy matrix-vector + argpartition, one user per call", "users": n_loop,
                              "seconds": round(seconds, 3), "users_per_s": round(n_loop / seconds, 1)}
    log(f"per-user loop: {n_loop / seconds:,.0f} users/s (first {n_loop} users)")

    agreement = {f"{name}_vs_per_user_loop": _topk_differences(top[:n_loop], loop, item_vecs, queries[:n_loop])
                 for name, top in tops.items()}
    if "faiss" in tops:
        agreement["faiss_vs_torch"] = _topk_differences(tops["faiss"], tops["torch"], item_vecs, queries)
    base = paths["per_user_loop"]["users_per_s"]
    result = {"benchmark": "search", "machine": machine(), "faiss": getattr(faiss, "__version__", None),
              "users": users, "items": items, "dim": dim, "k": k, "data": f"synthetic N(0, 1) vectors, L2-normalised, "
              f"seed {seed}", "paths": paths,
              "speedup_over_per_user_loop": {name: round(p["users_per_s"] / base, 1) for name, p in paths.items()},
              "agreement": agreement}
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out, result)
    log(f"agreement: {json.dumps(agreement)}; written to {out}")
    return result


def bench_refresh(run: Path, out: Path, fraction: float = 0.01, token_budget: int = 32768, log=print) -> dict:
    """`refresh items` after editing `fraction` of the item texts (first in the process, cold, as a cron job
    runs), against the full catalogue pass's embedding time (the same Item LLM over every item, the embedding
    job's batching), on a copy of `run` (item_llm/ and the current embeddings version); checks that only the
    edited items went through the Item LLM and that every other row was carried over bit-identical."""
    import shutil
    import tempfile

    from pipeline import config as cfg
    from pipeline.data.text import text_recipe
    from pipeline.embeddings import store
    from pipeline.models.llm import ItemLLM
    from pipeline.run_dir import RunDir
    from stages import refresh

    if not 0 < fraction <= 1:
        raise UserError(f"bench refresh: --fraction {fraction}: must be in (0, 1]")
    version = store.version_root(run)
    data = RunDir(run).data()
    recipe = text_recipe(data)
    items = pl.read_parquet(data / "items.parquet").sort("item_idx")
    n = items.height
    step = max(1, round(1 / fraction))
    edited = items["item_idx"].to_numpy() % step == 0
    with tempfile.TemporaryDirectory(prefix="hllm-bench-refresh-") as tmp:
        copy = Path(tmp) / "run"
        source, target = RunDir(run), RunDir(copy)
        target.embeddings.mkdir(parents=True)
        shutil.copytree(source.item_llm, target.item_llm)
        shutil.copytree(version, target.embeddings / version.name)
        (target.embeddings / "CURRENT").write_text(version.name + "\n")
        key = recipe.text_keys[0]
        catalog = items.select("item_id", *recipe.text_keys).with_columns(
            pl.when(pl.Series(edited)).then(pl.col(key).cast(pl.String) + " (edited)").otherwise(pl.col(key))
            .alias(key))
        catalog.write_parquet(Path(tmp) / "catalog.parquet")
        calls = []
        forward = ItemLLM.forward
        ItemLLM.forward = lambda self, input_ids, *a, **k: (calls.append(int(input_ids.shape[0])),
                                                            forward(self, input_ids, *a, **k))[1]
        try:
            conf = cfg.load(refresh.RefreshItemsConfig, None, [f"catalog={Path(tmp) / 'catalog.parquet'}",
                                                               f"run={copy}", f"data={data}", "device=cpu",
                                                               f"token_budget={token_budget}"])
            start = time.perf_counter()
            summary = refresh.run_items(conf, log=log)
            refresh_s = time.perf_counter() - start
        finally:
            ItemLLM.forward = forward
        # the full pass second, in a process the refresh has warmed up: the comparison is not in the refresh's favour
        item_llm, tokenizer, meta = build.load_item_llm(target.item_llm)
        catalogue = TokenizedCatalogue.build(tokenizer, items["text"].to_list(), int(meta["max_text_tokens"]))
        log(f"full pass: embedding {n:,} items")
        full_s, _ = _timed(lambda: embed_items(item_llm.eval(), catalogue, np.arange(1, n + 1), token_budget,
                                               meta.get("positions", "right")), 1)
        new = store.load_embeddings(store.version_root(copy))
        old = store.load_embeddings(version)
        kept = torch.from_numpy(items["item_idx"].to_numpy()[~edited])
        identical = bool(torch.equal(new.embeddings[kept], old.embeddings[kept]))
        embed_s = store.read_manifest(new.root)["throughput"]["seconds"]
    result = {"benchmark": "refresh items", "machine": machine(), "run": str(run), "version": version.name,
              "items": n, "edited": int(edited.sum()), "fraction": round(float(edited.mean()), 4),
              "item_llm_rows": sum(calls), "carried_rows_bit_identical": identical, "summary": summary,
              "full_pass_embedding_s": round(full_s, 3), "refresh_embedding_s": round(embed_s, 3),
              "refresh_job_s": round(refresh_s, 3),
              "refresh_embedding_vs_full_pass": round(embed_s / full_s, 4),
              "refresh_job_vs_full_pass": round(refresh_s / full_s, 4),
              "note": "the job's time beyond embedding: reading the catalogue, loading and checking the parent "
                      "version, loading the Item LLM, writing and hashing the new shards"}
    write_json_atomic(out, result)
    log(f"refresh of {result['edited']:,}/{n:,} items: embedding {embed_s:.2f}s = "
        f"{result['refresh_embedding_vs_full_pass']:.1%} of the full pass's {full_s:.1f}s; whole job {refresh_s:.1f}s")
    return result


STAGE_ONE_PATHS = {
    "official": (),
    "table": ("item.negatives=table",),
    "top-layer": ("item.train_layers=1",),
    "top-layer+table": ("item.train_layers=1", "item.negatives=table"),
    "lora-r8": ("item.lora_rank=8",),
}
"""Stage-one paths timed by `bench stage-one` (settings on top of the common ones); official: every distinct item
of the step, each shared negative included, through the whole Item LLM with gradients."""


def bench_stage_one(data: Path, model: str, out: Path, negatives: tuple[int, ...] = (512, 0), batch_size: int = 128,
                    max_len: int = 50, steps: int = 2, refresh_every: int = 5, paths: tuple[str, ...] = (),
                    log=print) -> dict:
    """Seconds per stage-one step of the official path against each cheaper one, on the same batches and
    negatives (0: the whole catalogue; a softmax for table paths, every item encoded with gradients otherwise).
    A table path's refresh is timed on its own and spread over `refresh_every` steps."""
    import tempfile

    from pipeline import config as cfg
    from pipeline import loop
    from pipeline.batches import SequenceBatches, make_step_batch, sample_negatives
    from pipeline.data.sequences import training_windows
    from stages import embed_items as stage

    unknown = [p for p in paths if p not in STAGE_ONE_PATHS]
    if unknown:
        raise UserError(f"bench stage-one: unknown path {unknown[0]!r}; available: {', '.join(STAGE_ONE_PATHS)}")
    if steps < 1 or batch_size < 1 or refresh_every < 1 or any(n < 0 for n in negatives):
        raise UserError("bench stage-one: --steps, --batch-size, --refresh-every >= 1 and --negatives >= 0 "
                        "(0: the whole catalogue) are required")
    seqs, items = stage._load_data(data)
    batches = SequenceBatches(training_windows(seqs, max_len, "chunks"), batch_size, 0)
    rows = []
    result = {"benchmark": "stage-one", "machine": machine(), "data": str(data), "model": model,
              "batch_size": batch_size, "max_len": max_len, "item_max_text_tokens": 32, "refresh_every": refresh_every,
              "timed_steps": steps, "dtype": "float32",
              "flops": "6 x (Item LLM weights a token passes through x item tokens + User LLM weights x positions); "
                       "a table refresh's forward is not counted",
              "complete": False, "results": rows}
    out.parent.mkdir(parents=True, exist_ok=True)
    for count in negatives:
        for name in paths or STAGE_ONE_PATHS:
            extra = STAGE_ONE_PATHS[name]
            table = "item.negatives=table" in extra
            if count == 0 and any(s.startswith("item.lora_rank=") for s in extra):  # ML-1M: ~20 GB, killed for memory
                rows.append({"path": name, "settings": list(extra), "negatives": seqs.num_items,
                             "whole_catalogue": True, "skipped": "LoRA keeps every layer's activations for the "
                             "whole catalogue (about 20 GB on ML-1M with MiniLM): not run"})
                log(f" all negatives, {name:16s}: skipped (LoRA over the whole catalogue needs about 20 GB)")
                continue
            with tempfile.TemporaryDirectory() as tmp:
                conf = cfg.load(stage.EmbedItemsConfig, None, [
                    f"data={data}", f"out={tmp}", f"item.model={model}", "item.pooling=mean", "item.positions=left",
                    "item.max_text_tokens=32", "item.token_budget=8192", "user.name=hstu", "user.projection=true",
                    "user.scale_inputs=true", f"train.batch_size={batch_size}", f"train.max_len={max_len}",
                    "train.lr=1e-3", f"item.table_refresh_every={refresh_every}", "device=cpu", *extra])
                torch.manual_seed(0)
                seq_model, _, _ = stage.build_model(conf, items, log=lambda _: None)
                optimizer = loop.make_optimizer(seq_model, conf.train)
                refresh_s = None
                if table:
                    refresh_s, _ = _timed(partial(seq_model.items.before_step, 0), 1)  # step 0: the first table
                everything = count == 0
                times, work = [], []
                for step in range(steps + 1):  # the first step warms up (and makes the optimizer's state)
                    sampled = np.arange(1, seqs.num_items + 1) if everything else \
                        sample_negatives(seqs.trainable_items(), count, 0, step, 0)
                    start = time.perf_counter()
                    batch = make_step_batch(seq_model.items, batches.item_ids(0, step), sampled, 0, 1,
                                            full_catalogue=everything and table)
                    seq_model(batch).loss_per_position.mean().backward()
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    if step > 0:
                        times.append(time.perf_counter() - start)
                        work.append((batch.items, batch.tokens, batch.positions))
            seconds = float(np.mean(times))
            items_per_step, tokens, positions = (float(np.mean(w)) for w in zip(*work, strict=True))
            user_weights = sum(p.numel() for n, p in seq_model.user_llm.named_parameters() if "embed" not in n)
            flops = 6 * (seq_model.items.item_llm.weights_per_token() * tokens + user_weights * positions)
            amortized = seconds + (refresh_s / refresh_every if refresh_s is not None else 0.0)
            row = {"path": name, "settings": list(extra), "negatives": count or seqs.num_items,
                   "whole_catalogue": everything, "seconds_per_step": round(seconds, 3),
                   "table_refresh_seconds": None if refresh_s is None else round(refresh_s, 3),
                   "seconds_per_step_with_refresh": round(amortized, 3),
                   "items_through_item_llm_per_step": round(items_per_step, 1),
                   "items_per_s": round(items_per_step / amortized, 1), "item_tokens_per_step": round(tokens),
                   "train_flops_per_s": round(flops / seconds, 1)}
            rows.append(row)
            write_json_atomic(out, result)  # after every path: a run stopped later keeps what it measured
            log(f"{count or 'all':>4} negatives, {name:16s}: {amortized:7.2f} s/step"
                + (f" ({seconds:.2f} + a {refresh_s:.1f} s refresh / {refresh_every})" if refresh_s else "")
                + f", {items_per_step:.0f} items through the Item LLM")
    for row in (r for r in rows if "skipped" not in r):
        official = next((r for r in rows if r["path"] == "official" and r["negatives"] == row["negatives"]), None)
        row["speedup_over_official"] = None if official is None else \
            round(official["seconds_per_step_with_refresh"] / row["seconds_per_step_with_refresh"], 2)
    result["complete"] = True
    write_json_atomic(out, result)
    log(f"written to {out}")
    return result
