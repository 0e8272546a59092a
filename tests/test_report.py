"""The comparison report: one Markdown page with plots, a table per evaluation protocol, never mixed silently."""

from __future__ import annotations

import json
import math
import os
import shutil

import pytest
from conftest import make_cached_run, run_cli

from pipeline.errors import UserError
from stages import report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """Two run folders evaluated (popularity, the real eval) under two protocols, one with a validation log."""
    root = tmp_path_factory.mktemp("report")
    cached = make_cached_run(root)
    a, b = root / "run-a", root / "run-b"
    shutil.copytree(cached["run"], a)
    shutil.copytree(cached["run"], b)
    for run, masking in ((a, "window"), (a, "full"), (b, "window")):
        done = run_cli("eval", "--run", str(run), f"data={cached['data']}", "model=popularity", "--k", "5", "10",
                       f"mask_history={masking}", "window=3")
        assert done.returncode == 0, done.stderr
    (a / "stage2").mkdir()
    (a / "stage2" / "metrics.jsonl").write_text("\n".join(json.dumps(line) for line in [
        {"step": 5, "epoch": 0, "loss": 3.0},
        {"epoch": 0, "step": 5, "wall_seconds": 60.0, "valid": {"recall@10": 0.10, "ndcg@10": 0.05}},
        {"epoch": 1, "step": 10, "wall_seconds": 120.0, "valid": {"recall@10": 0.30, "ndcg@10": 0.20}},
        {"epoch": 2, "step": 15, "wall_seconds": 180.0, "valid": {"recall@10": 0.25, "ndcg@10": 0.21}}]) + "\n")
    return {"a": a, "b": b}


@pytest.mark.slow
def test_report_puts_each_protocol_in_its_own_table_and_says_so(runs, tmp_path):
    out = tmp_path / "cmp" / "page.md"
    done = run_cli("report", str(runs["a"]), str(runs["b"]), "--out", str(out), "--title", "Fixture runs")
    assert done.returncode == 0, done.stderr
    page = out.read_text()
    assert page.startswith("# Fixture runs")
    assert "3 evaluation(s) of 2 run(s)" in page
    assert "2 different protocols" in page and "mask_history (window vs full)" in page
    assert page.count("## Protocol ") == 2 and page.count("Protocol card:") == 2
    # protocol 1 (window masking) holds both runs, protocol 2 (full) only run-a
    first, second = page.split("## Protocol 2")
    assert "| run-a | popularity |" in first and "| run-b | popularity |" in first
    assert "| run-b |" not in second and "| run-a | popularity |" in second
    assert "- mask_history: window" in first and "- mask_history: full" in second
    # each row: the numbers of its eval report and a link to it
    for e in report.collect([runs["a"], runs["b"]])[0]:
        m = e.report["metrics"]
        cells = " | ".join(f"{m[key]:.4f}" for key in ("recall@5", "recall@10", "ndcg@5", "ndcg@10"))
        link = os.path.relpath(e.path, out.parent)
        assert f"| {e.run} | popularity | — | {cells} | — | [json]({link}) |" in page or \
            f"| {e.run} | popularity | — | {cells} | 3.0 min | [json]({link}) |" in page
    # validation curve: best epochs and the wall time
    assert "| run-a | 3 | 0.2100 (2) | 0.3000 (1) | 3.0 min |" in page
    for png in ("page-metrics-1.png", "page-metrics-2.png", "page-validation.png"):
        assert (out.parent / png).read_bytes()[:8] == PNG_MAGIC
        assert f"]({png})" in page


def test_report_of_one_protocol_has_one_table(runs, tmp_path):
    window_reports = [e.path for e in report.collect([runs["a"], runs["b"]])[0]
                      if e.report["protocol"]["mask_history"] == "window"]
    out = report.run(window_reports, tmp_path / "one.md", log=lambda _: None)
    page = out.read_text()
    assert "different protocols" not in page and page.count("## Results") == 1
    assert "| popularity (same users) |" in page


def test_report_refuses_what_is_not_an_eval_report(runs, tmp_path):
    with pytest.raises(UserError, match="no eval report under"):
        report.run([tmp_path], tmp_path / "x.md", log=lambda _: None)
    bogus = tmp_path / "bogus.json"
    bogus.write_text("{}")
    with pytest.raises(UserError, match="not an eval report"):
        report.run([bogus], tmp_path / "x.md", log=lambda _: None)
    done = run_cli("report", str(runs["a"]), "--out", str(tmp_path / "x.html"))
    assert done.returncode == 2 and "ending in .md" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "x.html").exists()


def _evaluated(root, name: str, model: str, ranks: list[int | None], users: list[int] | None = None,
               candidates: str = "all"):
    """A run folder holding an eval report (test split, K 1 and 5) and its per-user ranks; one per `candidates`."""
    import polars as pl

    folder = root / name / "reports"
    folder.mkdir(parents=True, exist_ok=True)
    users = users or list(range(len(ranks)))
    protocol = {"dataset": "fixture", "split": "test", "mask_history": "window", "k": [1, 5],
                "candidates": candidates, "model": {"name": model}}
    stamp = {"all": "20260101-000000", "new": "20260101-000100"}[candidates]
    hits = [r is not None and r <= 5 for r in ranks]
    report_json = {"users": len(ranks), "protocol": protocol, "metrics": {"recall@5": sum(hits) / len(ranks)}}
    table = pl.DataFrame({"user_idx": users, "target_item_idx": [7] * len(ranks), "rank": ranks},
                         schema={"user_idx": pl.Int32, "target_item_idx": pl.Int32, "rank": pl.Int64})
    if candidates == "new":  # a new-item split: the first half of the targets are new items
        is_new = [i < len(ranks) // 2 for i in range(len(ranks))]
        report_json["targets"] = {"warm": is_new.count(False), "new": is_new.count(True)}
        table = table.with_columns(target_is_new=pl.Series(is_new))
    (folder / f"eval-{stamp}.json").write_text(json.dumps(report_json))
    table.write_parquet(folder / f"ranks-{stamp}.parquet")
    return root / name


def test_paired_differences_are_per_user_means_with_their_standard_error(tmp_path):
    base = _evaluated(tmp_path, "base", "sasrec", [1, 3, None, 12])
    ours = _evaluated(tmp_path, "ours", "hllm", [2, 1, 5, None])
    other_users = _evaluated(tmp_path, "elsewhere", "hstu", [1, 1, 1, 1], users=[0, 1, 2, 5])
    entries, _ = report.collect([base, ours, other_users])
    by_run = {e.run: e for e in entries}
    diffs = report.paired_differences(by_run["ours"], by_run["base"], [1, 5])
    # recall@5: base hits users 0, 1; ours 0, 1, 2 -> differences 0, 0, 1, 0
    assert diffs["recall@5"] == pytest.approx((0.25, 0.5 / 2))
    # recall@1: base hits user 0, ours user 1 -> -1, 1, 0, 0 (mean 0, sample sd sqrt(2/3))
    assert diffs["recall@1"] == pytest.approx((0.0, (2 / 3) ** 0.5 / 2))
    ndcg5 = [1 / math.log2(3) - 1, 1 - 0.5, 1 / math.log2(6), 0.0]
    mean = sum(ndcg5) / 4
    sd = (sum((d - mean) ** 2 for d in ndcg5) / 3) ** 0.5
    assert diffs["ndcg@5"] == pytest.approx((mean, sd / 2))
    assert report.paired_differences(by_run["elsewhere"], by_run["base"], [1, 5]) is None  # other users

    page = report.run([base, ours, other_users], tmp_path / "page.md", baselines=["base"],
                      log=lambda _: None).read_text()
    assert "Paired against base (sasrec)" in page
    assert "| ours | hllm | +0.0000 ± 0.4082 | +0.2500 ± 0.2500 |" in page
    assert "| elsewhere | hstu | no per-user ranks on the same users |" in page
    assert "| base | sasrec | +" not in page  # the baseline is not compared with itself
    with pytest.raises(UserError, match="--baseline nope: no run of that name"):
        report.run([base, ours], tmp_path / "x.md", baselines=["base", "nope"], log=lambda _: None)


def test_each_protocol_is_paired_against_the_baselines_evaluated_under_it(tmp_path):
    base = _evaluated(tmp_path, "base", "sasrec", [1, 3, None, 12])  # whole catalogue only
    ours = _evaluated(tmp_path, "ours", "hllm", [2, 1, 5, None])
    _evaluated(tmp_path, "ours", "hllm", [1, 1, None, None], candidates="new")  # warm targets: misses for all
    floor = _evaluated(tmp_path, "floor", "popularity among new items", [3, 1, None, None], candidates="new")
    page = report.run([base, ours, floor], tmp_path / "page.md", baselines=["base", "floor"],
                      log=lambda _: None).read_text()
    first, second = page.split("## Protocol 2")
    assert "Paired against base (sasrec)" in first and "Paired against floor" not in first
    assert "Paired against floor (popularity among new items)" in second and "Paired against base" not in second
    # recall@1 on the new-item targets (users 0, 1): ours hits both, the floor user 1 -> differences 1, 0
    assert "| ours | hllm | +0.5000 ± 0.5000 |" in second
    assert "on the same users and targets" not in second  # where warm targets are misses, only the new ones
