"""`eval --task ranking`: a ranker's AUC, GAUC and log loss on the held-out labelled examples.

The examples are those `train-ranker` held out (each user's last `holdout` labelled interactions; its settings
are read from the ranker), scored one causal pass per user. GAUC averages each user's AUC over the users with
both labels (each user once). `model=popularity` scores a candidate by log(1 + its training count) (AUC and GAUC
only: it gives no probability). Writes run/reports/ranking-<timestamp>.json and .md (and with per_user_ranks the
per-example scores, reports/scores-<timestamp>.parquet).
"""

from __future__ import annotations

import json
import time
from datetime import datetime

import numpy as np
import polars as pl

from pipeline.embeddings.store import load_embeddings, version_root
from pipeline.errors import UserError
from pipeline.io import atomic_path, folder_sha256, write_json_atomic, write_text_atomic
from pipeline.metrics import ranking_metrics
from pipeline.models import build
from pipeline.ranking import ranking_data
from pipeline.run_dir import RunDir
from pipeline.runtime import device_of


def run(config, log=print) -> dict:
    """config: stages.evaluate.EvalConfig with task=ranking."""
    started = time.perf_counter()
    folder = config.run / f"ranker-{config.fusion}" / "model"
    if not (folder / "user_llm.json").is_file():
        raise UserError(f"{folder}: no trained ranker; run `hllm-pipeline train-ranker fusion={config.fusion} "
                        f"run={config.run}` first")
    meta = json.loads((folder / "user_llm.json").read_text())
    settings = meta["ranker"]
    data = RunDir(config.run).data(config.data)
    source = ranking_data(data, settings.get("labels", "rating"), settings["holdout"], settings["label_threshold"],
                          settings.get("negative_ratio", 1), settings.get("seed", 42), log=log)
    examples = source.examples(config.split)
    if not len(examples):
        raise UserError(f"{data}: no labelled {config.split} example (holdout={settings['holdout']})")
    max_len = config.max_len or int(meta.get("max_len", 50))
    if config.model == "popularity":
        scores = source.popularity(examples)
        metrics = ranking_metrics(examples.users, scores, examples.labels)
        del metrics["log_loss"]  # a count is no probability
        model_card = {"name": "popularity", "scores": "log(1 + training count of the candidate)"}
    elif config.model == "hllm":
        table = None
        if "cached" in build.saved_item_source(folder):
            table = load_embeddings(version_root(config.run, config.embeddings)).embeddings
        model, _ = build.load_user_model(folder, table)
        model.to(device_of(config.device))
        scores = source.logits(model, examples, max_len)
        metrics = ranking_metrics(examples.users, scores, examples.labels)
        model_card = {"name": f"hllm ({meta['source']})", "fusion": settings["fusion"], "ranker": str(folder),
                      "fingerprint": folder_sha256(folder)[:16], "max_len": max_len,
                      "generative_weight": settings["generative_weight"]}
    else:
        raise UserError(f"model={config.model}: task=ranking evaluates model=hllm (a ranker) or model=popularity")
    labels = settings.get("labels", "rating")
    protocol = {"task": "ranking", "data": str(data), "split": config.split, "holdout": settings["holdout"],
                "label": {"rating": f"rating >= {settings['label_threshold']:g}",
                          "sampled": f"interaction 1, {settings.get('negative_ratio', 1)} sampled negative(s) 0"}
                .get(labels, f"file {labels}"), "model": model_card,
                "examples": "each user's last holdout labelled events of the split, history = every earlier "
                            "interaction" + (" (the last max_len + 1 items read at once)" if labels == "rating"
                                             else " (the last max_len, then the candidate)"),
                "gauc": "mean over users with both labels of the user's AUC"}
    return _write(config, protocol, metrics, examples, scores, started)


def _write(config, protocol: dict, metrics: dict, examples, scores: np.ndarray, started: float) -> dict:
    run_dir = RunDir(config.run)
    reports, stamp = run_dir.reports, run_dir.report_stamp("ranking")
    report = {"created": datetime.now().isoformat(timespec="seconds"), "task": "ranking", "metrics": metrics,
              "protocol": protocol, "scores_file": None}
    if config.per_user_ranks:
        path = reports / f"scores-{stamp}.parquet"
        with atomic_path(path) as tmp:
            pl.DataFrame({"user_idx": examples.users, "item_idx": examples.candidates, "label": examples.labels,
                          "score": scores}).write_parquet(tmp)
        report["scores_file"] = str(path)
    report["timings"] = {"total_s": round(time.perf_counter() - started, 3)}
    write_json_atomic(reports / f"ranking-{stamp}.json", report)
    write_text_atomic(reports / f"ranking-{stamp}.md", format_table(report) + "\n")
    report["report_file"] = str(reports / f"ranking-{stamp}.json")
    return report


def format_table(report: dict) -> str:
    m, p = report["metrics"], report["protocol"]
    rows = [("AUC", m["auc"]), ("GAUC", m["gauc"]), ("log loss", m.get("log_loss"))]
    lines = [f"{p['model']['name']} on {p['split']} ({m['examples']:,} examples of {m['users']:,} users, "
             f"{m['positives']:,} positive; label {p['label']}; GAUC over {m['gauc_users']:,} users)",
             "| metric | value |", "|---|---|"]
    lines += [f"| {name} | {value:.4f} |" for name, value in rows if value is not None]
    return "\n".join(lines)
