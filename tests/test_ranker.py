"""The discriminative rankers: early and late fusion against the generative score, AUC/GAUC/log loss, resume.

A planted fixture: 40 items of 5 genres with random 16-d cached embeddings (so a genre is not a direction of the
embedding space); user u's taste is genre u % 5, and 60% of their interactions are items of it, rated 5, the rest
items of other genres, rated 2. The label (rating >= 4) is whether the candidate is of the genre that dominates
the history: early and late fusion can learn that, the generative score (a cosine with the candidate) only
roughly, and popularity not at all.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from conftest import crash_on_call, quiet, run_cli, write

from pipeline import config as cfg
from pipeline import loop
from pipeline.data.sequences import UserSequences
from pipeline.embeddings.store import ShardWriter, load_embeddings, version_root
from pipeline.metrics import auc, gauc, log_loss
from pipeline.models import build
from pipeline.ranking import example_logits, held_out, rating_labels
from stages import prepare, train_ranker

pytestmark = pytest.mark.slow  # trains models: the full tier (make test), not make test-fast


def make_taste_data(root: Path, n_users: int = 300, length: int = 20, dim: int = 16) -> dict:
    rng = np.random.default_rng(0)
    rows = ["item_id,user_id,rating,timestamp"]
    for u in range(n_users):
        for t in range(length):
            liked = rng.random() < 0.6
            k = int(rng.choice([k for k in range(40) if (k % 5 == u % 5) == liked]))
            rows.append(f"i{k},u{u},{5 if liked else 2},{1000 + t}")
    write(root / "raw" / "inter.csv", "\n".join(rows) + "\n")
    write(root / "raw" / "items.csv", "item_id,title\n" + "".join(f"i{k},w{k}\n" for k in range(40)))
    prepare.run(cfg.load(prepare.PrepareConfig, format="hllm-csv", source=root / "raw" / "inter.csv",
                         items=root / "raw" / "items.csv", out=root / "data", item_prompt=""), log=quiet)
    items = pl.read_parquet(root / "data" / "items.parquet")
    writer = ShardWriter(root / "run" / "embeddings" / "v-test", "safetensors", "float32", {"model_fingerprint": "t"})
    writer.write(0, np.arange(1, 41), torch.randn(40, dim, generator=torch.Generator().manual_seed(0)))
    writer.finish(items, dim, {"max_item_idx": 40})
    (root / "run" / "embeddings" / "CURRENT").write_text("v-test\n")
    return {"data": root / "data", "run": root / "run"}


@pytest.fixture(scope="module")
def taste(tmp_path_factory) -> dict:
    return make_taste_data(tmp_path_factory.mktemp("taste"))


def ranker_settings(case: dict, *extra: str) -> train_ranker.TrainRankerConfig:
    return cfg.load(train_ranker.TrainRankerConfig, None, [
        f"data={case['data']}", f"run={case['run']}", "user.init=scratch", "user.name=llama-tiny",
        "user.projection=true", "holdout=3", "train.epochs=12", "train.batch_size=32", "train.max_len=16",
        "train.lr=3e-3", "train.eval_users=300", "train.patience=12", "train.log_every=1000", "device=cpu", *extra])


def test_ranking_metrics_equal_an_independent_computation():
    rng = np.random.default_rng(1)
    scores = rng.integers(0, 6, size=60).astype(float)  # many ties
    labels = rng.integers(0, 2, size=60)
    users = rng.integers(0, 7, size=60)
    pairs = [(1.0 if p > n else 0.5 if p == n else 0.0) for p, n in
             itertools.product(scores[labels == 1], scores[labels == 0])]
    assert auc(scores, labels) == pytest.approx(np.mean(pairs))
    per_user = [auc(scores[users == u], labels[users == u]) for u in np.unique(users)
                if 0 < labels[users == u].sum() < (users == u).sum()]
    value, counted = gauc(users, scores, labels)
    assert value == pytest.approx(np.mean(per_user)) and counted == len(per_user) > 0
    logits = rng.normal(size=60) * 5
    expected = torch.nn.functional.binary_cross_entropy_with_logits(torch.tensor(logits),
                                                                    torch.tensor(labels, dtype=torch.float64))
    assert log_loss(logits, labels) == pytest.approx(float(expected))
    assert np.isnan(auc(scores, np.ones(60))) and np.isnan(gauc([0, 0], [1.0, 2.0], [1, 1])[0])


def test_both_fusions_learn_the_planted_fixture_and_beat_the_generative_score(taste):
    seqs = rating_labels(UserSequences.load(taste["data"]), taste["data"], 4.0)
    examples = held_out(seqs, "test", 3)
    assert len(examples) == 900 and set(np.unique(examples.labels)) == {0, 1}
    table = load_embeddings(version_root(taste["run"])).embeddings
    scores = {}
    for fusion in ("early", "late", "none"):
        out = train_ranker.run(ranker_settings(taste, f"fusion={fusion}"), log=quiet)
        model, meta = build.load_user_model(out, table)
        assert meta["ranker"]["fusion"] == fusion
        scores[fusion] = auc(example_logits(model, examples, 16), examples.labels)
    assert scores["early"] > 0.9 and scores["late"] > 0.85, scores
    assert min(scores["early"], scores["late"]) > scores["none"] + 0.1, scores
    # the command line: the report has AUC, GAUC and log loss; popularity is at chance here
    done = run_cli("eval", "--task", "ranking", "--fusion", "early", "--run", str(taste["run"]),
                   f"data={taste['data']}", "--per-user-ranks", "device=cpu")
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(Path(done.stdout.splitlines()[-1].split()[1]).read_text())
    assert report["metrics"]["auc"] == pytest.approx(scores["early"]) and report["protocol"]["holdout"] == 3
    frame = pl.read_parquet(report["scores_file"])
    assert auc(frame["score"].to_numpy(), frame["label"].to_numpy()) == pytest.approx(scores["early"])
    assert report["metrics"]["gauc"] == pytest.approx(gauc(frame["user_idx"], frame["score"], frame["label"])[0])
    done = run_cli("eval", "--task", "ranking", "--model", "popularity", "--run", str(taste["run"]),
                   f"data={taste['data']}", "device=cpu")
    popularity = json.loads(Path(done.stdout.splitlines()[-1].split()[1]).read_text())["metrics"]
    assert abs(popularity["auc"] - 0.5) < 0.08 and "log_loss" not in popularity
    # the comparison page: a ranking table, and each fusion paired against the generative score per user
    for fusion in ("late", "none"):
        done = run_cli("eval", "--task", "ranking", "--fusion", fusion, "--run", str(taste["run"]),
                       f"data={taste['data']}", "--per-user-ranks", "device=cpu")
        assert done.returncode == 0, done.stderr[-2000:]
    done = run_cli("report", str(taste["run"]), "--out", str(taste["run"] / "page.md"))
    assert done.returncode == 0, done.stderr[-2000:]
    page = (taste["run"] / "page.md").read_text()
    assert "## Ranking" in page and "Paired against hllm (ranker, no fusion)" in page
    row = next(line for line in page.splitlines() if line.startswith("| hllm (ranker, early fusion) | +"))
    assert float(row.split("|")[2].split("±")[0]) > 0.1, row  # early fusion's users gain over the baseline
    assert f"| {scores['early']:.4f} |" in page


def test_late_fusion_user_embeddings_do_not_depend_on_the_candidate(taste, tmp_path):
    torch.manual_seed(0)
    case = {"data": taste["data"], "run": tmp_path / "run"}
    import shutil

    shutil.copytree(taste["run"] / "embeddings", case["run"] / "embeddings")
    out = train_ranker.run(ranker_settings(case, "fusion=late", "train.epochs=1"), log=quiet)
    model, _ = build.load_user_model(out, load_embeddings(version_root(case["run"])).embeddings)
    table = model.items.table()
    history = torch.tensor([[3, 7, 12, 5]])
    users = [model.user_vectors(table, history)]
    logits = []
    for candidate in (1, 2, 30):
        ids = torch.cat([history, torch.tensor([[candidate]])], dim=1)
        hidden = model.user_llm(model.inputs(table, ids, ids, None), torch.ones_like(ids), None)
        users.append(model.user_embeddings(hidden[:, -2]))
        logits.append(model.score_sequences(table, ids)[0, -1])
        # the logit is the head on (the user embedding, the candidate): nothing else of the candidate enters
        item = model.candidate_head(table[candidate][None])
        head = model.rank_head(torch.cat([users[0], item, users[0] * item], dim=-1))[0, 0]
        assert torch.allclose(head, logits[-1], atol=1e-5)
    assert all(torch.allclose(users[0], u, atol=1e-6) for u in users[1:])
    assert len({round(float(v), 5) for v in logits}) == 3  # the candidates are told apart
    # `refresh users` exports them (unnormalised, the ranker's width) into ranker-late/users/, once per user
    done = run_cli("refresh", "users", "--all", "--run", str(case["run"]), f"data={case['data']}",
                   "user_llm=ranker-late", "device=cpu")
    assert done.returncode == 0, done.stderr[-2000:]
    from safetensors.torch import load_file

    store = case["run"] / "ranker-late" / "users"
    version = store / (store / "CURRENT").read_text().strip()
    vectors = load_file(version / "vectors.safetensors")["embedding"]
    exported = pl.read_parquet(version / "users.parquet")
    row = exported["user_id"].to_list().index("u7")
    seen = torch.tensor([exported["seen"][row].to_list()[-16:]])
    assert vectors.shape == (300, model.user_llm.dim)
    assert torch.allclose(vectors[row], model.user_vectors(table, seen)[0], atol=1e-5)
    assert not (case["run"] / "users").exists()  # the next-item store is untouched


@pytest.mark.parametrize("fusion, labels", [("late", ("generative_weight=0.5",)),  # rated sequences, one pass
                                            ("early", ("labels=sampled", "negative_ratio=2"))],  # appended rows
                         ids=["rating", "sampled"])
def test_a_resumed_ranker_trains_exactly_as_an_uninterrupted_one(taste, tmp_path, monkeypatch, fusion, labels):
    import shutil

    runs = {}
    for name in ("straight", "resumed"):
        runs[name] = {"data": taste["data"], "run": tmp_path / name}
        shutil.copytree(taste["run"] / "embeddings", tmp_path / name / "embeddings")
    extra = (f"fusion={fusion}", *labels, "train.epochs=2", "train.checkpoint_every=3", "train.log_every=1",
             "train.eval_users=50")
    train_ranker.run(ranker_settings(runs["straight"], *extra), log=quiet)
    real = loop.make_step_batch
    monkeypatch.setattr(loop, "make_step_batch", crash_on_call(real, 5))
    with pytest.raises(KeyboardInterrupt):
        train_ranker.run(ranker_settings(runs["resumed"], *extra), log=quiet)
    monkeypatch.setattr(loop, "make_step_batch", real)
    said = []
    train_ranker.run(ranker_settings(runs["resumed"], *extra), log=said.append)
    assert any("resuming" in line and "step 3" in line for line in said)
    a, b = (torch.load(tmp_path / name / f"ranker-{fusion}" / "train" / "state.pt", weights_only=True)
            for name in ("straight", "resumed"))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    logs = [(tmp_path / name / f"ranker-{fusion}" / "train" / "metrics.jsonl").read_text().splitlines()
            for name in ("straight", "resumed")]
    strip = [[{k: v for k, v in json.loads(line).items() if not k.endswith("_per_s") and k != "wall_seconds"}
              for line in log] for log in logs]
    assert strip[0] == strip[1]


@pytest.mark.parametrize("args, message", [
    (["fusion=middle"], "fusion: got 'middle'; expected one of early, late, none"),
    (["holdout=0"], "holdout=0: must be >= 1"),
    (["holdout=80", "train.max_len=50"], "at most train.max_len=50"),
    (["generative_weight=-1"], "generative_weight=-1.0: must be >= 0"),
    (["train.early_stopping_metric=ndcg@10"], "a ranker picks its best epoch by auc or gauc"),
    (["labels=nowhere.csv"], "labels=nowhere.csv: use rating, sampled, or the path of a labelled file"),
    (["labels=sampled", "generative_weight=0.5"], "generative_weight=0.5 needs labels=rating"),
])
def test_bad_ranker_settings_are_one_line_errors(args, message, tmp_path):
    done = run_cli("train-ranker", "--run", str(tmp_path / "run"), "--data", str(tmp_path / "data"), *args)
    assert done.returncode == 2 and message in done.stderr and len(done.stderr.strip().splitlines()) == 1, \
        done.stderr
    assert not (tmp_path / "run").exists()


def test_the_one_pass_scoring_of_rated_sequences_agrees_with_scoring_each_example_alone(taste, tmp_path):
    """example_logits scores a user's held-out examples in one causal pass; appended_logits (the reference)
    builds one sequence per example. With histories shorter than max_len they must agree."""
    import shutil

    from pipeline.ranking import LabelledExamples, appended_logits

    case = {"data": taste["data"], "run": tmp_path / "run"}
    shutil.copytree(taste["run"] / "embeddings", case["run"] / "embeddings")
    table = load_embeddings(version_root(case["run"])).embeddings
    seqs = rating_labels(UserSequences.load(taste["data"]), taste["data"], 4.0)
    for fusion in ("early", "late", "none"):
        out = train_ranker.run(ranker_settings(case, f"fusion={fusion}", "train.epochs=1", "train.max_len=24"),
                               log=quiet)
        model, _ = build.load_user_model(out, table)
        examples = held_out(seqs, "test", 3)
        fast = example_logits(model, examples, 24)
        alone = LabelledExamples(examples.users, examples.upto.timestamps[examples.positions], examples.candidates,
                                 examples.labels, np.zeros(len(examples), dtype=np.int64))
        np.testing.assert_allclose(fast, appended_logits(model, seqs, alone, 24), rtol=1e-4, atol=1e-4)


def test_a_labelled_file_trains_a_ranker_and_its_bad_rows_are_set_aside_with_reasons(taste, tmp_path):
    import shutil

    inter = pl.read_parquet(taste["data"] / "interactions.parquet").join(
        pl.read_parquet(taste["data"] / "users.parquet"), on="user_idx").join(
        pl.read_parquet(taste["data"] / "items.parquet").select("item_idx", "item_id"), on="item_idx")
    good = inter.select("user_id", "item_id", pl.col("timestamp").cast(pl.String),
                        (pl.col("rating") >= 4).cast(pl.Int8).cast(pl.String).alias("label"))
    bad = pl.DataFrame({"user_id": ["nobody", "u1", "u1", "u1"], "item_id": ["i1", "i999", "i1", "i1"],
                        "timestamp": ["1005", "1005", "soon", "1005"], "label": ["1", "1", "1", "2"]})
    path = tmp_path / "labels.csv"
    pl.concat([good, bad]).write_csv(path)
    case = {"data": taste["data"], "run": tmp_path / "run"}
    shutil.copytree(taste["run"] / "embeddings", case["run"] / "embeddings")
    said = []
    out = train_ranker.run(ranker_settings(case, "fusion=early", f"labels={path}"), log=said.append)
    assert any("4 rows set aside" in line for line in said), said
    rejected = pl.read_parquet(case["run"] / "ranker-early" / "rejected.parquet")
    assert sorted(rejected["reason"]) == ["bad_timestamp", "label_not_0_or_1", "unknown_item_id", "unknown_user_id"]
    done = run_cli("eval", "--task", "ranking", "--run", str(case["run"]), f"data={taste['data']}", "device=cpu")
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(Path(done.stdout.splitlines()[-1].split()[1]).read_text())
    assert report["metrics"]["auc"] > 0.9 and report["protocol"]["label"] == f"file {path}", report["metrics"]
    assert out.name == "model"
    # a file without a label column: one line, exit 2, nothing written
    good.drop("label").write_csv(tmp_path / "unlabelled.csv")
    done = run_cli("train-ranker", "--run", str(tmp_path / "other"), "--data", str(taste["data"]),
                   f"labels={tmp_path / 'unlabelled.csv'}", "device=cpu")
    assert done.returncode == 2 and "no column label" in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "other" / "ranker-early").exists()


def test_sampled_negatives_never_hit_a_seen_item_and_teach_a_ranker_the_planted_walk(tmp_path):
    """Users walk the item cycle 1 -> 2 -> ... (conftest's planted data): with sampled negatives, a ranker learns
    that the next item is the successor of the last one."""
    from conftest import make_cached_run

    from pipeline.ranking import sampled_examples

    case = make_cached_run(tmp_path)
    seqs = UserSequences.load(case["data"])
    examples = sampled_examples(seqs, 3, seed=0)
    assert len(examples) == 4 * len(seqs.items) and examples.labels.sum() == len(seqs.items)
    negatives = examples.subset(np.flatnonzero(examples.labels == 0))
    seen = {(int(u), int(i)) for u in range(seqs.num_users) for i in seqs.user(u)[0]}
    assert not any((int(u), int(i)) in seen for u, i in zip(negatives.users, negatives.candidates, strict=True))
    train_ranker.run(ranker_settings(case, "fusion=early", "labels=sampled", "negative_ratio=3", "holdout=2",
                                     "train.epochs=6"), log=quiet)
    done = run_cli("eval", "--task", "ranking", "--run", str(case["run"]), f"data={case['data']}", "device=cpu")
    report = json.loads(Path(done.stdout.splitlines()[-1].split()[1]).read_text())
    assert report["metrics"]["auc"] > 0.9 and report["metrics"]["gauc_users"] > 100, report["metrics"]
