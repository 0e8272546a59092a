"""Smoke tests on the real MovieLens data (fetched from GroupLens or, failing that, PyPI)."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest
import torch
from conftest import REPO, run_cli

from pipeline.data.fetch import fetch
from pipeline.data.sequences import UserSequences, eval_examples
from pipeline.embeddings.store import load_embeddings

pytestmark = pytest.mark.smoke

EXPECTED = {  # users, catalogue items, items with interactions, interactions
    "ml-100k": (943, 1682, 1682, 100_000),
    "ml-1m": (6040, 3883, 3706, 1_000_209),
}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """Fetch (cached under artifacts/raw, verified) and prepare through the real CLI."""
    outs = {}
    for name in EXPECTED:
        raw = REPO / "artifacts" / "raw" / name
        fetch(name, raw, log=lambda _: None)
        out = tmp_path_factory.mktemp(name) / "data"
        done = run_cli("data", "prepare", "--format", "movielens", "--source", str(raw), "--out", str(out))
        assert done.returncode == 0, done.stderr
        outs[name] = (raw, out, done.stdout)
    return outs


@pytest.mark.parametrize("name", list(EXPECTED))
def test_counts(prepared, name):
    _, out, stdout = prepared[name]
    users, items, with_inter, interactions = EXPECTED[name]
    assert pl.read_parquet(out / "users.parquet").height == users
    items_df = pl.read_parquet(out / "items.parquet")
    assert items_df.height == items
    assert int((items_df["n_interactions"] > 0).sum()) == with_inter
    assert pl.read_parquet(out / "interactions.parquet").height == interactions
    assert pl.read_parquet(out / "rejected.parquet").height == 0
    assert f"{users:,} users" in stdout


def raw_rows(raw: Path) -> list[tuple[str, str, int, int]]:
    """(user, item, timestamp, row) straight from the raw file with plain Python: an independent reader.

    Handles both sources: GroupLens (u.data, ratings.dat) and the RecBole copies (*.inter)."""
    if (raw / "ratings.dat").exists():
        path, sep, header = raw / "ratings.dat", "::", False
    elif (raw / "u.data").exists():
        path, sep, header = raw / "u.data", "\t", False
    else:
        path, sep, header = next(raw.glob("*.inter")), "\t", True
    rows = []
    with open(path, encoding="utf-8", newline="") as f:
        lines = f.read().split("\n")
    for number, line in enumerate(lines[1:] if header else lines, start=1):
        line = line.rstrip("\r")
        if line:
            user, item, _, ts = line.split(sep)
            rows.append((user, item, int(float(ts)), number))
    return rows


@pytest.mark.parametrize("name", list(EXPECTED))
def test_targets_follow_the_stable_tie_break(prepared, name):
    raw, out, _ = prepared[name]
    by_user: dict[str, list[tuple[int, int, str]]] = {}
    for user, item, ts, row in raw_rows(raw):
        by_user.setdefault(user, []).append((ts, row, item))
    expected_test = {u: max(v)[2] for u, v in by_user.items()}
    expected_valid = {u: sorted(v)[-2][2] for u, v in by_user.items()}

    seqs = UserSequences.load(out)
    user_ids = pl.read_parquet(out / "users.parquet").sort("user_idx")["user_id"].to_list()
    item_ids = ["<pad>"] + pl.read_parquet(out / "items.parquet").sort("item_idx")["item_id"].to_list()
    for split, expected in (("test", expected_test), ("valid", expected_valid)):
        examples = eval_examples(seqs, split)
        got = {user_ids[u]: item_ids[t] for u, t in zip(examples.users, examples.targets, strict=True)}
        assert got == expected
    if name == "ml-1m":
        # the tie-break matters here: many users' last two interactions share a second
        ties = sum(1 for v in by_user.values() if sorted(v)[-1][0] == sorted(v)[-2][0])
        assert ties > 100


def test_real_minilm_embeds_every_ml100k_item_once(prepared, tmp_path):
    """The pretrained all-MiniLM-L6-v2 (from its PyPI package) over the real ML-100K catalogue."""
    _, data, _ = prepared["ml-100k"]
    out = tmp_path / "run"
    done = run_cli("embed-items", "--config", str(REPO / "stages/configs/embed-ml-100k-cpu.yaml"), f"data={data}",
                   f"out={out}", "finetune=false", "device=cpu")
    assert done.returncode == 0, done.stderr[-2000:]
    version = (out / "embeddings" / "CURRENT").read_text().strip()
    table = load_embeddings(out / "embeddings" / version)
    assert table.manifest["rows"] == 1682 and table.embeddings.shape == (1683, 384)
    assert torch.isfinite(table.embeddings).all()
    assert table.embeddings[1:].norm(dim=1).min() > 0
    ids = pl.read_parquet(out / "embeddings" / version / "items.parquet")["item_idx"].to_list()
    assert sorted(ids) == list(range(1, 1683))


@pytest.mark.parametrize("mode", ["full", "window"])
def test_eval_popularity_on_real_ml1m_matches_the_full_ranking_reference(prepared, tmp_path, mode):
    """The eval command's top-K path against metrics.py's full ranking, on real histories (up to 2,314 items)."""
    import json

    import numpy as np

    from pipeline.metrics import metrics_from_ranks, popularity_ranks

    _, data, _ = prepared["ml-1m"]
    done = run_cli("eval", "--model", "popularity", "--k", "10", "50", "200", "--mask-history", mode,
                   "--run", str(tmp_path / "run"), f"data={data}")
    assert done.returncode == 0, done.stderr
    report = json.loads(Path(done.stdout.splitlines()[-1].split()[1]).read_text())
    assert report["users"] == 6040 and report["protocol"]["items"] == 3883
    seqs = UserSequences.load(data)
    examples = eval_examples(seqs, "test")
    counts = np.bincount(seqs.prefix(2).items, minlength=seqs.num_items + 1)
    reference = popularity_ranks(counts, examples.targets, [examples.history(i) for i in range(len(examples))],
                                 mode, window=200)
    assert report["metrics"] == pytest.approx(metrics_from_ranks(reference, (10, 50, 200)))


def test_the_readmes_own_data_commands_reach_an_eval_report(tmp_path):
    """The README's "Your own data" commands, run as written from a folder holding stages/ and a small CSV pair."""
    import re
    import shlex

    import numpy as np

    rng = np.random.default_rng(0)
    rows = ["item_id,user_id,timestamp"]
    for u in range(60):
        start = int(rng.integers(0, 40))
        rows += [f"m{(start + t) % 40},u{u},{1000 + t}" for t in range(int(rng.integers(5, 9)))]
    (tmp_path / "mydata").mkdir()
    (tmp_path / "mydata" / "interactions.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "mydata" / "items.csv").write_text(
        "item_id,title\n" + "".join(f"m{k},Movie {k} of kind {k % 5}\n" for k in range(40)))
    (tmp_path / "stages").symlink_to(REPO / "stages")
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Your own data"):readme.index("## Commands")]
    block = re.findall(r"It runs these.*?```bash\n(.*?)```", section, re.S)[0]
    commands = [part.strip() for line in block.splitlines() for part in line.split("&&") if part.strip()]
    assert len(commands) == 6 and all(c.startswith("hllm-pipeline ") for c in commands)
    outputs = []
    for command in commands:
        done = run_cli(*shlex.split(command)[1:], cwd=tmp_path)
        assert done.returncode == 0, (command, done.stderr[-2000:])
        outputs.append(done.stdout)
    assert "Recall@K" in outputs[3] and (tmp_path / "artifacts" / "mydata" / "reports").is_dir()
    assert outputs[5].splitlines()[0].split() == ["rank", "item_id", "score", "text"]
