"""Comparison report (`report`): the eval reports of several runs as one Markdown page with PNG plots.

Each run folder contributes its newest eval report per protocol (reports/eval-*.json) and its validation curve
(stage2/metrics.jsonl, else stage1/metrics.jsonl); an eval report JSON can also be named directly. Runs are
put in one table only when they were evaluated under the same protocol (dataset, split, history masking,
candidate items, exact or approximate search); otherwise the page says so and gives each protocol its own table,
with its protocol card. With baseline runs named, each table is followed by every other model's paired
difference to each baseline evaluated under its protocol (so one page can pair the whole-catalogue table against
an ID model and the new-items-only table against a baseline evaluated there): per-user metric differences on the
same users and targets (from the per-user ranks that `eval --per-user-ranks` writes beside each report), their
mean and its standard error, which says whether a gap is larger than the noise of the test users. Writes OUT
(Markdown) and, beside it, OUT-stem-metrics-<n>.png per protocol and OUT-stem-validation.png.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl

from pipeline.errors import UserError
from pipeline.io import atomic_path, write_text_atomic
from pipeline.metrics import MISS, per_user_metrics, user_aucs
from pipeline.run_dir import RunDir

PROTOCOL_KEYS = ("dataset", "items", "split", "mask_history", "window", "candidates", "candidate_items", "ranking",
                 "new_items")
"""What must be equal for two runs' numbers to share a table (K may differ: a missing K is an empty cell)."""


@dataclass
class Entry:
    folder: Path
    """The run folder (for a report named directly: the folder its reports/ is in)."""
    path: Path
    """The eval report JSON."""
    report: dict

    @property
    def run(self) -> str:
        return self.folder.name


@dataclass
class Curve:
    folder: Path
    epochs: list[int] = field(default_factory=list)
    valid: list[dict] = field(default_factory=list)
    wall_seconds: float | None = None
    """Training and validation time up to the last epoch (None for logs older than the wall-time field)."""


def protocol_key(report: dict) -> tuple:
    p = dict(report["protocol"])
    p.setdefault("candidates", "all")  # reports older than the candidate setting ranked every item
    p.setdefault("candidate_items", p.get("items"))
    hashable = {k: json.dumps(v, sort_keys=True) if isinstance(v, dict) else v for k, v in p.items()}
    return tuple((k, hashable.get(k)) for k in PROTOCOL_KEYS) + (("search", p.get("index", {}).get("type")),)


def model_key(report: dict) -> tuple:
    """Which model a report evaluated: a run folder may hold evaluations of several (popularity, either stage's
    User LLM, other embeddings or history lengths)."""
    m = report["protocol"].get("model", {})
    return tuple(m.get(k) for k in ("name", "user_llm", "fingerprint", "max_len", "embeddings_version"))


def _report_order(path: Path) -> tuple:
    """eval-<date>-<time>.json, then eval-<date>-<time>-2.json, ... (eval's names for reports of one second)."""
    parts = path.stem.split("-")  # eval, date, time[, n]
    return (*parts[1:3], int(parts[3]) if len(parts) > 3 and parts[3].isdigit() else 1)


def _load_json(path: Path) -> dict:
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: not a readable eval report ({type(e).__name__})") from None
    if not isinstance(report, dict) or not {"metrics", "protocol", "users"} <= set(report) or \
            "k" not in report.get("protocol", {}):
        raise UserError(f"{path}: not an eval report (expected metrics, users and protocol.k); pass run folders "
                        "or reports/eval-*.json files written by `hllm-pipeline eval`")
    return report


def collect(inputs: list[Path]) -> tuple[list[Entry], list[Curve]]:
    """The eval reports and validation curves the inputs hold."""
    entries: list[Entry] = []
    curves: list[Curve] = []
    for path in inputs:
        path = path.resolve()
        if path.is_file():
            entries.append(Entry(path.parent.parent, path, _load_json(path)))
            continue
        if not path.is_dir():
            raise UserError(f"{path}: no such run folder or eval report")
        reports = sorted(RunDir(path).reports.glob("eval-*.json"))
        if not reports and not any(RunDir(path).reports.glob("ranking-*.json")):
            raise UserError(f"{path}: no eval report under {path / 'reports'}; run `hllm-pipeline eval --run {path}`")
        newest: dict[tuple, Entry] = {}
        for report_path in sorted(reports, key=_report_order):  # the newest of each protocol and model wins
            report = _load_json(report_path)
            newest[protocol_key(report) + model_key(report)] = Entry(path, report_path, report)
        entries += newest.values()
        curve = _curve(path)
        if curve is not None:
            curves.append(curve)
    return entries, curves


def _curve(run: Path) -> Curve | None:
    for stage in (RunDir(run).stage2, RunDir(run).stage1):
        log = stage / "metrics.jsonl"
        if log.is_file():
            by_epoch: dict[int, dict] = {}
            for line in log.read_text().splitlines():
                try:
                    record = json.loads(line)
                except ValueError:  # a line being written while the run trains
                    continue
                if "valid" in record:  # an epoch validated again after a resume: the later line counts
                    by_epoch[record["epoch"]] = record
            if not by_epoch:
                return None
            epochs = sorted(by_epoch)
            return Curve(run, epochs, [by_epoch[e]["valid"] for e in epochs],
                         by_epoch[epochs[-1]].get("wall_seconds"))
    return None


def _ks(entries: list[Entry]) -> list[int]:
    return sorted({k for e in entries for k in e.report["protocol"]["k"]})


def _cell(metrics: dict, key: str) -> str:
    return f"{metrics[key]:.4f}" if key in metrics else "—"


def _minutes(seconds: float | None) -> str:
    return f"{seconds / 60:.1f} min" if seconds is not None else "—"


def _table(entries: list[Entry], curves: dict[Path, Curve], base: Path) -> list[str]:
    ks = _ks(entries)
    head = ["run", "model", "items"] + [f"Recall@{k}" for k in ks] + [f"NDCG@{k}" for k in ks] + \
        ["wall time (train + validation)", "report"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for e in entries:
        model = e.report["protocol"].get("model", {})
        m = e.report["metrics"]
        link = Path(os.path.relpath(e.path.resolve(), base.resolve())).as_posix()
        curve = curves.get(e.folder) if model.get("name") != "popularity" else None  # the run's training
        lines.append("| " + " | ".join([e.run, model.get("name", "?"), str(model.get("items", "—"))]
                                       + [_cell(m, f"recall@{k}") for k in ks] + [_cell(m, f"ndcg@{k}") for k in ks]
                                       + [_minutes(curve.wall_seconds if curve else None), f"[json]({link})"]) + " |")
    floor = next((e.report["popularity"] for e in entries if "popularity" in e.report), None)
    if floor is None:
        floor = next((e.report["metrics"] for e in entries
                      if e.report["protocol"].get("model", {}).get("name") == "popularity"), None)
    if floor is not None:
        lines.append("| popularity (same users) | | | " + " | ".join(
            [_cell(floor, f"recall@{k}") for k in ks] + [_cell(floor, f"ndcg@{k}") for k in ks]) + " | | |")
    return lines


def _kind_table(entries: list[Entry]) -> list[str]:
    """The new-item split: each model's metrics on the warm and on the new-item targets apart."""
    ks = _ks(entries)
    counts = next(e.report["targets"] for e in entries if "targets" in e.report)
    head = ["run", "model"] + [f"{kind} {metric}@{k}" for kind in ("warm", "new") for metric in ("Recall", "NDCG")
                               for k in ks]
    lines = [f"By target kind: {counts['warm']:,} warm targets (items every model trained on), {counts['new']:,} "
             "new-item targets (items no model trained on; ID models cannot recommend them).", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for e in entries:
        cells = [_cell(e.report.get(f"metrics_{kind}", {}), f"{metric}@{k}") for kind in ("warm", "new")
                 for metric in ("recall", "ndcg") for k in ks]
        lines.append("| " + " | ".join([e.run, e.report["protocol"].get("model", {}).get("name", "?")] + cells) + " |")
    return lines


def ranks_path(report_path: Path) -> Path:
    """Where eval wrote the per-user ranks of a report (eval-X.json -> ranks-X.parquet, same folder)."""
    return report_path.with_name("ranks-" + report_path.name.removeprefix("eval-")).with_suffix(".parquet")


def _ranked_users(ranks_file: Path, ks: list[int], new_only: bool = False
                  ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(user_idx, target_item_idx) pairs in user order, and each metric per user (a missing rank: a miss);
    `new_only`: the users whose target is a new item."""
    import polars as pl

    table = pl.read_parquet(ranks_file).sort("user_idx")
    if new_only:
        table = table.filter(pl.col("target_is_new")) if "target_is_new" in table.columns else table.clear()
    ranks = table["rank"].fill_null(MISS).to_numpy()
    return table.select("user_idx", "target_item_idx").to_numpy(), per_user_metrics(ranks, ks)


def paired_differences(entry: Entry, baseline: Entry, ks: list[int], new_only: bool = False
                       ) -> dict[str, tuple[float, float]] | None:
    """metric -> (mean per-user difference entry - baseline, its standard error); None unless both reports have
    their per-user ranks over the same users and targets. `new_only`: over the new-item targets."""
    paths = [ranks_path(entry.path), ranks_path(baseline.path)]
    if not all(path.is_file() for path in paths):
        return None
    (pairs, ours), (base_pairs, theirs) = (_ranked_users(path, ks, new_only) for path in paths)
    if not np.array_equal(pairs, base_pairs) or len(pairs) < 2:
        return None
    out = {}
    for key in ours:
        diff = ours[key] - theirs[key]
        out[key] = (float(diff.mean()), float(diff.std(ddof=1) / np.sqrt(len(diff))))
    return out


def _paired_table(entries: list[Entry], baseline: Entry, new_only: bool = False) -> list[str]:
    ks = _ks(entries)
    keys = [f"recall@{k}" for k in ks] + [f"ndcg@{k}" for k in ks]
    head = ["run", "model"] + [f"Δ {key.replace('recall', 'Recall').replace('ndcg', 'NDCG')}" for key in keys]
    which = "the new-item targets" if new_only else "the same users and targets"
    lines = [f"Paired against {baseline.run} ({baseline.report['protocol'].get('model', {}).get('name', '?')}) on "
             f"{which}: the mean of the per-user differences ± its standard error; a gap within about two standard "
             "errors is not one.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for e in entries:
        if e is baseline or e.report["protocol"].get("model", {}).get("name") == "popularity":
            continue
        diffs = paired_differences(e, baseline, ks, new_only)
        cells = [f"{diffs[key][0]:+.4f} ± {diffs[key][1]:.4f}" for key in keys] if diffs else \
            ["no per-user ranks on the same users"] + [""] * (len(keys) - 1)
        lines.append("| " + " | ".join([e.run, e.report["protocol"].get("model", {}).get("name", "?")] + cells) + " |")
    return lines


def _card(report: dict) -> list[str]:
    p = report["protocol"]
    shown = {k: p[k] for k in PROTOCOL_KEYS if k in p}
    shown["search"] = p.get("index", {}).get("description", p.get("index", {}).get("type"))
    return [f"- {k}: {v}" for k, v in shown.items()] + [f"- users: {report['users']:,}"]


def _differences(groups: list[list[Entry]]) -> str:
    keys = [dict(protocol_key(g[0].report)) for g in groups]
    differ = [k for k in keys[0] if len({json.dumps(key.get(k)) for key in keys}) > 1]
    return ", ".join(f"{k} ({' vs '.join(str(key.get(k)) for key in keys)})" for k in differ)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out: Path) -> None:
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    _pyplot().close(fig)


def _plot_metrics(entries: list[Entry], out: Path) -> None:
    import numpy as np

    plt = _pyplot()

    ks = _ks(entries)
    rows = [(f"{e.run}: {e.report['protocol'].get('model', {}).get('name', '?')}", e.report["metrics"])
            for e in entries]
    floor = next((e.report["popularity"] for e in entries if "popularity" in e.report), None)
    if floor is not None:
        rows.append(("popularity", floor))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / len(rows)
    for ax, metric in zip(axes, ("recall", "ndcg"), strict=True):
        for i, (label, m) in enumerate(rows):
            values = [m.get(f"{metric}@{k}", np.nan) for k in ks]
            ax.bar(np.arange(len(ks)) + i * width, values, width, label=label)
        ax.set_xticks(np.arange(len(ks)) + width * (len(rows) - 1) / 2, [str(k) for k in ks])
        ax.set_xlabel("K")
        ax.set_title({"recall": "Recall@K", "ndcg": "NDCG@K"}[metric])
    axes[0].legend(fontsize=7)
    _save(fig, out)


def _plot_curves(curves: list[Curve], out: Path) -> None:
    fig, axes = _pyplot().subplots(1, 2, figsize=(11, 4))
    for ax, metric in zip(axes, ("recall@10", "ndcg@10"), strict=True):
        for curve in curves:
            ax.plot(curve.epochs, [v.get(metric) for v in curve.valid], marker=".", label=curve.folder.name)
        ax.set_xlabel("epoch")
        ax.set_title(f"validation {metric}")
    axes[0].legend(fontsize=7)
    _save(fig, out)


def _baseline_of(group: list[Entry], name: str) -> Entry | None:
    """The baseline run's trained model in a protocol's group (not its popularity evaluation)."""
    return next((e for e in group if e.run == name and e.report["protocol"].get("model", {}).get("name")
                 != "popularity"), None)


def run(inputs: list[Path], out: Path, title: str = "Comparison", baselines: Sequence[str] = (), log=print) -> Path:
    """Write the comparison page for `inputs` (run folders or eval report files) to `out`; returns it. `baselines`:
    the names of runs to give every other model's paired differences against, in each protocol that has them."""
    if not inputs:
        raise UserError("report: name one or more run folders or eval report files")
    if out.suffix != ".md":
        raise UserError(f"--out {out}: the report is a Markdown file; give a path ending in .md")
    entries, curves = collect(inputs)
    rankings = collect_rankings(inputs)
    for baseline in baselines:
        if entries and _baseline_of(entries, baseline) is None:
            names = ", ".join(sorted({e.run for e in entries}))
            raise UserError(f"--baseline {baseline}: no run of that name with a trained model's eval report; the "
                            f"runs are: {names}")
    groups: dict[tuple, list[Entry]] = {}
    for e in entries:
        groups.setdefault(protocol_key(e.report), []).append(e)
    ordered = list(groups.values())
    by_run = {c.folder: c for c in curves}
    base = out.parent
    base.mkdir(parents=True, exist_ok=True)
    counts = [f"{len(entries)} evaluation(s) of {len({e.run for e in entries})} run(s)."] if entries else []
    counts += [f"{len(rankings)} ranking evaluation(s)."] if rankings else []
    lines = [f"# {title}", "", " ".join(counts)]
    if len(ordered) > 1:
        lines += ["", f"**These evaluations were made under {len(ordered)} different protocols; their numbers are "
                  f"not comparable across tables.** They differ in: {_differences(ordered)}."]
    for n, group in enumerate(ordered, 1):
        plot = out.with_name(f"{out.stem}-metrics-{n}.png")
        _plot_metrics(group, plot)
        lines += ["", f"## Protocol {n}" if len(ordered) > 1 else "## Results", ""]
        lines += _table(group, by_run, base)
        if any("targets" in e.report for e in group):
            lines += [""] + _kind_table(group)
        for reference in filter(None, (_baseline_of(group, name) for name in baselines)):
            if reference.report["protocol"].get("candidates") != "new":  # there warm targets are misses for all
                lines += [""] + _paired_table(group, reference)
            if "targets" in reference.report:
                lines += [""] + _paired_table(group, reference, new_only=True)
        lines += ["", f"![metrics at each K]({plot.name})", "", "Protocol card:", ""] + _card(group[0].report)
    if rankings:
        lines += ranking_section(rankings, base)
    curves = [c for c in curves if "ndcg@10" in c.valid[0]]  # a ranker's curve (AUC) is in its ranking table
    if curves:
        plot = out.with_name(f"{out.stem}-validation.png")
        _plot_curves(curves, plot)
        lines += ["", "## Validation over epochs", "", f"![validation curves]({plot.name})", "",
                  "| run | epochs | best valid NDCG@10 (epoch) | best valid Recall@10 (epoch) | wall time |",
                  "|---|---|---|---|---|"]
        for c in curves:
            best = {m: max(range(len(c.valid)), key=lambda i, m=m: c.valid[i].get(m, -1.0))
                    for m in ("ndcg@10", "recall@10")}
            lines.append(f"| {c.folder.name} | {len(c.epochs)} | {c.valid[best['ndcg@10']]['ndcg@10']:.4f} "
                         f"({c.epochs[best['ndcg@10']]}) | {c.valid[best['recall@10']]['recall@10']:.4f} "
                         f"({c.epochs[best['recall@10']]}) | {_minutes(c.wall_seconds)} |")
    write_text_atomic(out, "\n".join(lines) + "\n")
    ranked = f", {len(rankings)} ranking evaluation(s)" if rankings else ""
    log(f"report written to {out} ({len(entries)} evaluation(s), {len(ordered)} protocol(s){ranked})")
    return out


# ---- rankers (`eval --task ranking`): AUC, GAUC, log loss


def collect_rankings(inputs: list[Path]) -> list[Entry]:
    """The newest ranking report of each model in the run folders (or the ranking report files named)."""
    newest: dict[tuple, Entry] = {}
    for path in inputs:
        path = path.resolve()
        files = [path] if path.is_file() and path.name.startswith("ranking-") else \
            sorted(RunDir(path).reports.glob("ranking-*.json"), key=_report_order) if path.is_dir() else []
        for file in files:
            report = json.loads(file.read_text())
            p = report["protocol"]
            key = (p["data"], p["split"], p["holdout"], p["label"], p["model"]["name"], p["model"].get("fingerprint"))
            newest[key] = Entry(path if path.is_dir() else path.parent.parent, file, report)
    return list(newest.values())


def _scores_path(report_path: Path) -> Path:
    """Where eval wrote a ranking report's per-example scores (ranking-X.json -> scores-X.parquet, same folder)."""
    return report_path.with_name("scores-" + report_path.name.removeprefix("ranking-")).with_suffix(".parquet")


def _user_aucs(entry: Entry) -> dict[int, float]:
    """Each user's AUC over their examples (users with both labels), from the report's per-example scores."""
    frame = pl.read_parquet(_scores_path(entry.path))
    return user_aucs(frame["user_idx"].to_numpy(), frame["score"].to_numpy(), frame["label"].to_numpy())


def ranking_section(entries: list[Entry], base: Path) -> list[str]:
    """The rankers' table, and each model's paired per-user AUC difference against the generative score."""
    lines = ["", "## Ranking", "", "| run | model | AUC | GAUC | log loss | examples | users in GAUC | report |",
             "|---|---|---|---|---|---|---|---|"]
    for e in entries:
        m = e.report["metrics"]
        link = Path(os.path.relpath(e.path.resolve(), base.resolve())).as_posix()
        loss = f"{m['log_loss']:.4f}" if "log_loss" in m else "—"
        lines.append(f"| {e.run} | {e.report['protocol']['model']['name']} | {m['auc']:.4f} | {m['gauc']:.4f} | "
                     f"{loss} | {m['examples']:,} | {m['gauc_users']:,} | [json]({link}) |")
    reference = next((e for e in entries if e.report["protocol"]["model"].get("fusion") == "none"
                      and _scores_path(e.path).is_file()), None)
    if reference is not None:
        ref = _user_aucs(reference)
        name = reference.report["protocol"]["model"]["name"]
        lines += ["", f"Paired against {name}, the generative score: each user's AUC minus the baseline's on the "
                  "same examples, mean ± standard error over the users with both labels; a gap within about two "
                  "standard errors is not one.", "", "| model | Δ user AUC | users |",
                  "|---|---|---|"]
        for e in entries:
            if e is reference or not _scores_path(e.path).is_file():
                continue
            mine = _user_aucs(e)
            diffs = np.array([mine[u] - ref[u] for u in mine if u in ref])
            if len(diffs) > 1:
                lines.append(f"| {e.report['protocol']['model']['name']} | {diffs.mean():+.4f} ± "
                             f"{diffs.std(ddof=1) / np.sqrt(len(diffs)):.4f} | {len(diffs):,} |")
    card = {k: v for k, v in entries[0].report["protocol"].items() if k != "model"}
    return lines + ["", "Protocol card:", ""] + [f"- {k}: {v}" for k, v in card.items()]
