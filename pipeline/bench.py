"""Benchmarks that back speed claims with numbers: each writes a JSON file naming the machine it ran on.

`bench embed`: the embedding job's fast path (length-sorted batches under a token budget) against a plain
padded loop over the catalogue in file order and against sentence-transformers' `encode`, on the same model
and texts, checking that all three give the same embeddings.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import polars as pl
import torch
import torch.nn.functional as F

from pipeline.embeddings.encode import embed_items, embed_items_reference
from pipeline.errors import UserError
from pipeline.io import write_json_atomic
from pipeline.models import build
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
