"""The new-item split: items held out of training entirely, added by `refresh items`, ranked by text models only.

A planted genre fixture: 40 items in 5 genres (item k is in genre k % 5, its title repeats the genre word), users
keep to one genre. Items i35..i39 (one per genre) first appear after t=3000: the temporal split makes them new.
Even users end with their genre's new item (their test target) after the 7 older items of the genre; odd users
meet the new item in the middle of their history, so without the split it would be in their training part.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from conftest import make_tiny_item_model, quiet, run_cli, write

from pipeline import config as cfg
from pipeline import loop
from pipeline.data.sequences import UserSequences, training_sequences
from pipeline.embeddings import store
from pipeline.errors import ConfigError
from pipeline.metrics import MISS, metrics_from_ranks
from pipeline.models import build
from stages import embed_items as stage_one
from stages import prepare
from stages import train_user as stage_two

pytestmark = pytest.mark.slow  # trains models: the full tier (make test), not make test-fast

NEW = [35, 36, 37, 38, 39]


def make_genre_data(root: Path, *extra: str, new_target: str = "test") -> Path:
    """new_target=valid: even users meet one more older item of their genre after the new one, which makes the new
    item their validation target."""
    rng = np.random.default_rng(0)
    rows = ["item_id,user_id,timestamp"]
    for u in range(100):
        genre = u % 5
        warm = rng.permutation([k for k in range(35) if k % 5 == genre])  # the genre's 7 older items
        if u % 2 == 0:
            events = [(k, 1000 + t) for t, k in enumerate(warm)] + [(35 + genre, 5000)]
            if new_target == "valid":
                events = [(k, 1000 + t) for t, k in enumerate(warm[1:])] + [(35 + genre, 5000), (warm[0], 5001)]
        else:
            events = [(k, 1000 + t) for t, k in enumerate(warm[:4])] + [(35 + genre, 5000)] + \
                     [(k, 5001 + t) for t, k in enumerate(warm[4:])]
        rows += [f"i{k},u{u},{t}" for k, t in events]
    write(root / "raw" / "inter.csv", "\n".join(rows) + "\n")
    titles = ["item_id,title"] + [f"i{k},g{k % 5} g{k % 5} g{k % 5} w{k}" for k in range(40)]
    write(root / "raw" / "items.csv", "\n".join(titles) + "\n")
    conf = cfg.load(prepare.PrepareConfig, None, ["format=hllm-csv", f"source={root / 'raw' / 'inter.csv'}",
                                                  f"items={root / 'raw' / 'items.csv'}", f"out={root / 'data'}",
                                                  "item_prompt=", *extra])
    prepare.run(conf, log=quiet)
    return root / "data"


@pytest.fixture(scope="module")
def genre_run(tmp_path_factory) -> dict:
    """The genre data with the temporal split, and stage one's (untrained) embeddings of the warm items."""
    root = tmp_path_factory.mktemp("new-items")
    data = make_genre_data(root, "new_items_after=3000")
    model = make_tiny_item_model(root / "tiny-bert", "bert", hidden=64)
    conf = cfg.load(stage_one.EmbedItemsConfig, None, [
        f"data={data}", f"out={root / 'run'}", f"item.model={model}", "item.pooling=mean", "user.name=llama-tiny",
        "item.max_text_tokens=16", "finetune=false", "device=cpu"])
    stage_one.run(conf, log=quiet)
    return {"root": root, "data": data, "run": root / "run", "catalog": root / "raw" / "items.csv"}


def stage_two_settings(genre_run: dict, run: Path, *extra: str) -> stage_two.TrainUserConfig:
    if not run.exists():
        shutil.copytree(genre_run["run"], run)
    return cfg.load(stage_two.TrainUserConfig, None, [
        f"data={genre_run['data']}", f"run={run}", "user.init=scratch", "user.name=llama-tiny", "train.epochs=15",
        "train.batch_size=16", "train.max_len=8", "train.loss=softmax", "train.lr=3e-3", "train.eval_users=100",
        "train.patience=30", "train.checkpoint_every=1000", "train.log_every=1000", "device=cpu", *extra])


def test_the_split_holds_the_late_items_out_and_counts_what_it_did(genre_run):
    seqs = UserSequences.load(genre_run["data"])
    assert seqs.new_items.tolist() == [k + 1 for k in NEW]  # item_idx = file order + 1
    train = training_sequences(seqs)
    assert not np.isin(train.items, seqs.new_items).any()
    # even users train on their first 6 items; odd users on their first 6 but the new one among them
    assert train.items.size == 50 * 6 + 50 * 5 and seqs.prefix(2).items.size == 100 * 6
    stats = json.loads((genre_run["data"] / "stats.json").read_text())["split"]["new_items"]
    assert stats["new_items"] == 5 and stats["new_item_targets"] == {"valid": 0, "test": 50}
    assert stats["warm_targets"] == {"valid": 100, "test": 50} and stats["users_without_training_items"] == 0
    # the embeddings version stage one wrote holds the warm items only
    version = store.load_embeddings(store.version_root(genre_run["run"]))
    assert version.present[1:36].all() and not version.present[36:].any()


def test_no_new_item_reaches_a_training_step_or_an_id_row(genre_run, tmp_path, monkeypatch):
    seen: list[np.ndarray] = []
    real = loop.make_step_batch

    def recording(source, seq_ids, negatives, *args, **kwargs):
        seen.extend([seq_ids.ravel(), np.asarray(negatives)])
        return real(source, seq_ids, negatives, *args, **kwargs)

    monkeypatch.setattr(loop, "make_step_batch", recording)
    new_idx = [k + 1 for k in NEW]
    for items, loss in (("cached+id", "softmax"), ("id", "nce")):
        run = tmp_path / items
        stage_two.run(stage_two_settings(genre_run, run, f"items={items}", f"train.loss={loss}",
                                         "train.num_negatives=64", "train.epochs=2"), log=quiet)
        model, _ = build.load_user_model(run / "user_llm", store.load_embeddings(store.version_root(run)).embeddings
                                         if "cached" in items else None)
        table = next(m for m in model.items.modules() if isinstance(m, build.IdItems)).embedding.weight
        assert not table[new_idx].any(), items  # never learned: still zero
        assert table[1:36].abs().sum(dim=1).gt(0).all()
    assert seen and not any(np.isin(ids, new_idx).any() for ids in seen)


def test_after_refresh_a_text_model_ranks_the_new_item_first_and_an_id_model_cannot(genre_run, tmp_path):
    results = {}
    for items in ("cached", "id"):
        run = tmp_path / items
        stage_two.run(stage_two_settings(genre_run, run, f"items={items}"), log=quiet)
        done = run_cli("refresh", "items", "--catalog", str(genre_run["catalog"]), "--run", str(run), "device=cpu")
        assert done.returncode == 0 and "5 new" in done.stderr, done.stderr[-2000:]
        done = run_cli("eval", "--k", "1", "5", "10", "--run", str(run), f"data={genre_run['data']}",
                       "--per-user-ranks", "device=cpu")
        assert done.returncode == 0, done.stderr[-2000:]
        results[items] = json.loads(Path(done.stdout.splitlines()[-1].split()[1]).read_text())
    text, ids = results["cached"], results["id"]
    assert text["targets"] == {"warm": 50, "new": 50} == ids["targets"]
    assert text["metrics_new"]["recall@1"] >= 0.8, text["metrics_new"]  # the genre's one unseen item, by its text
    assert ids["metrics_new"]["recall@10"] == 0.0 and ids["items_without_vector"] == 5  # never recommended
    assert ids["metrics_warm"]["recall@10"] > 0.5
    # the warm and new-item metrics are the per-user ranks' metrics, recomputed
    for report in (text, ids):
        ranks = pl.read_parquet(report["ranks_file"])
        for kind, rows in (("warm", ~ranks["target_is_new"]), ("new", ranks["target_is_new"])):
            part = ranks.filter(rows)["rank"].fill_null(MISS).to_numpy()
            assert metrics_from_ranks(part, (1, 5, 10)) == pytest.approx(report[f"metrics_{kind}"])
    # the comparison page shows both kinds, and the paired differences on the new-item targets alone
    done = run_cli("report", str(tmp_path / "cached"), str(tmp_path / "id"), "--out", str(tmp_path / "page.md"),
                   "--baseline", "id")
    assert done.returncode == 0, done.stderr[-2000:]
    page = (tmp_path / "page.md").read_text()
    row = next(line for line in page.splitlines() if line.startswith("| cached |") and "0.0000 |" not in line[:20])
    assert "50 new-item targets" in page and "on the new-item targets" in page
    assert f"{text['metrics_new']['recall@1']:.4f}" in row, row
    # candidates=new ranks the new items only: a new-item target can only climb, a warm one misses
    only_new = {}
    for items in ("cached", "id"):
        done = run_cli("eval", "--k", "1", "5", "10", "--run", str(tmp_path / items), f"data={genre_run['data']}",
                       "--per-user-ranks", "candidates=new", "device=cpu")
        assert done.returncode == 0, done.stderr[-2000:]
        only_new[items] = json.loads(Path(done.stdout.splitlines()[-1].split()[1]).read_text())
    assert only_new["cached"]["protocol"]["candidate_items"] == 5
    assert only_new["cached"]["protocol"]["ranking"].startswith("the new items only")
    assert only_new["cached"]["metrics_warm"]["recall@10"] == 0.0 == only_new["id"]["metrics_new"]["recall@10"]
    ranks_all, ranks_new = (pl.read_parquet(r["ranks_file"]).filter(pl.col("target_is_new"))["rank"]
                            .fill_null(MISS).to_numpy() for r in (text, only_new["cached"]))
    assert (ranks_new <= ranks_all).all() and (ranks_new < 5).all()


def test_split_settings_that_cannot_work_are_one_line_errors(tmp_path):
    make_genre_data(tmp_path / "ok")  # the raw files
    for extra, message in ((("new_item_fraction=1.5",), "must be in (0, 1)"),
                           (("new_items_after=99999",), "no interaction comes after it"),
                           (("new_item_fraction=0.1", "new_items_after=3000"), "set one"),
                           (("new_items_after=last tuesday",), "expected a date")):
        raw = tmp_path / "ok" / "raw"
        done = run_cli("data", "prepare", "--format", "hllm-csv", "--source", str(raw / "inter.csv"),
                       f"items={raw / 'items.csv'}", "--out", str(tmp_path / "out"), *extra)
        assert done.returncode == 2 and done.stderr.count("\n") == 1 and message in done.stderr, done.stderr
        assert not (tmp_path / "out").exists()
    # a split whose one new item is never a validation or test target: i9 is only in u0's training part
    rows = ["item_id,user_id,timestamp"] + [f"i{k},u{u},{1000 + k}" for u in range(1, 10) for k in range(4)]
    rows += ["i0,u0,1000", "i9,u0,2000", "i1,u0,3000", "i2,u0,3001"]
    write(tmp_path / "few" / "inter.csv", "\n".join(rows) + "\n")
    write(tmp_path / "few" / "items.csv", "item_id,title\n" + "".join(f"i{k},w{k}\n" for k in range(10)))
    done = run_cli("data", "prepare", "--format", "hllm-csv", "--source", str(tmp_path / "few" / "inter.csv"),
                   f"items={tmp_path / 'few' / 'items.csv'}", "--out", str(tmp_path / "out"), "new_items_after=1500")
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "no validation or test target that is a new item (1 items held out)" in done.stderr
    assert not (tmp_path / "out").exists()


def test_users_the_split_leaves_without_a_training_item_are_rejected_with_a_reason_and_still_evaluated(tmp_path):
    # u0 trains on i9 alone, and i9 is new (first seen at 2000); u10's test target is i9
    rows = ["item_id,user_id,timestamp"] + [f"i{k},u{u},{1000 + k}" for u in range(1, 10) for k in range(4)]
    rows += ["i9,u0,2000", "i1,u0,3000", "i2,u0,3001", "i0,u10,1000", "i1,u10,1001", "i9,u10,2500"]
    write(tmp_path / "raw" / "inter.csv", "\n".join(rows) + "\n")
    write(tmp_path / "raw" / "items.csv", "item_id,title\n" + "".join(f"i{k},w{k}\n" for k in range(10)))
    done = run_cli("data", "prepare", "--format", "hllm-csv", "--source", str(tmp_path / "raw" / "inter.csv"),
                   f"items={tmp_path / 'raw' / 'items.csv'}", "--out", str(tmp_path / "data"), "new_items_after=1500")
    assert done.returncode == 0, done.stderr
    assert "1 users left without a training item" in done.stdout
    rejected = pl.read_parquet(tmp_path / "data" / "rejected.parquet").filter(pl.col("table") == "users")
    assert rejected.select("value", "reason").rows() == [("u0", "no_training_item_after_new_item_split")]
    stats = json.loads((tmp_path / "data" / "stats.json").read_text())
    assert stats["split"]["new_items"]["users_without_training_items"] == 1 and stats["rejected_rows"] == 1
    seqs = UserSequences.load(tmp_path / "data")
    assert len(seqs.new_items) == 1 and "u0" in pl.read_parquet(tmp_path / "data" / "users.parquet")["user_id"]


def test_id_dropout_and_the_bounded_offset():
    from pipeline.models.item_sources import IdItems

    torch.manual_seed(0)
    ids = IdItems(200, 8, dropout=0.3)
    with torch.no_grad():
        ids.embedding.weight[150:].zero_()  # items no training saw
    every = torch.arange(1, 201)
    out = ids({"ids": every})  # training: about 30% of the IDs replaced by the one unknown row
    replaced = (out == ids.unknown).all(dim=1)
    assert 0.2 < replaced.float().mean() < 0.4
    ids.eval()
    out = ids({"ids": every})  # scoring: exactly the zero rows get it
    assert torch.equal((out == ids.unknown).all(dim=1), every >= 150)
    assert not ids({"ids": torch.tensor([0])}).any()  # padding stays zero
    bounded = IdItems(20, 8, scale=50.0, max_norm=0.25)
    with torch.no_grad():
        bounded.embedding.weight[5].zero_()
    norms = bounded.table().norm(dim=1)
    assert torch.allclose(norms[[1, 2, 10]], torch.tensor(0.25)) and norms[5] == 0 and norms[0] == 0
    for bad, message in ((["items=cached", "id_dropout=0.2"], "id_dropout=0.2"),
                         (["items=id", "id_dropout=1.0"], "id_dropout=1.0"),
                         (["items=id", "id_max_norm=0.3"], "id_max_norm=0.3")):
        with pytest.raises(ConfigError, match=message):
            cfg.load(stage_two.TrainUserConfig, None, ["data=d", "run=r", *bad])


def test_a_text_and_id_model_with_id_dropout_scores_new_items_with_its_unknown_row(genre_run, tmp_path):
    run = tmp_path / "dropout"
    stage_two.run(stage_two_settings(genre_run, run, "items=cached+id", "id_dropout=0.3", "train.epochs=3"),
                  log=quiet)
    done = run_cli("refresh", "items", "--catalog", str(genre_run["catalog"]), "--run", str(run), "device=cpu")
    assert done.returncode == 0, done.stderr[-2000:]
    model, meta = build.load_user_model(run / "user_llm", store.load_embeddings(store.version_root(run)).embeddings)
    assert meta["id_dropout"] == 0.3
    id_part = model.items.sources[1]
    new_idx = torch.tensor([k + 1 for k in NEW])
    assert not id_part.embedding.weight[new_idx].any()  # never trained
    unknown = id_part.unknown * id_part.scale
    assert torch.allclose(id_part({"ids": new_idx}), unknown.expand(5, -1))


def test_new_item_rows_from_a_refreshed_version_serve_validation_and_change_no_training_step(tmp_path):
    """Stage two with new_item_embeddings: the new items get their text rows for validation, so their validation
    targets are scored; the training steps are the same as without (nothing in training reads a new item)."""
    data = make_genre_data(tmp_path, "new_items_after=3000", new_target="valid")
    stats = json.loads((data / "stats.json").read_text())["split"]["new_items"]
    assert stats["new_item_targets"] == {"valid": 50, "test": 0}
    model = make_tiny_item_model(tmp_path / "tiny-bert", "bert", hidden=64)
    stage_one.run(cfg.load(stage_one.EmbedItemsConfig, None, [
        f"data={data}", f"out={tmp_path / 'run'}", f"item.model={model}", "item.pooling=mean", "user.name=llama-tiny",
        "item.max_text_tokens=16", "finetune=false", "device=cpu"]), log=quiet)
    warm_only = (tmp_path / "run" / "embeddings" / "CURRENT").read_text().strip()
    done = run_cli("refresh", "items", "--catalog", str(tmp_path / "raw" / "items.csv"), "--run",
                   str(tmp_path / "run"), "device=cpu")
    assert done.returncode == 0, done.stderr[-2000:]
    every_item = (tmp_path / "run" / "embeddings" / "CURRENT").read_text().strip()
    case = {"data": data, "run": tmp_path / "run"}
    logs = {}
    for name, extra in (("without", ()), ("with", (f"new_item_embeddings={every_item}",))):
        run = tmp_path / name
        stage_two.run(stage_two_settings(case, run, "items=cached+id", "id_dropout=0.3", f"embeddings={warm_only}",
                                         "train.epochs=4", "train.log_every=1", *extra), log=quiet)
        logs[name] = [json.loads(line) for line in (run / "stage2" / "metrics.jsonl").read_text().splitlines()]
    steps = {name: [(r["step"], r["loss"]) for r in lines if "loss" in r] for name, lines in logs.items()}
    assert steps["with"] == steps["without"] and len(steps["with"]) >= 4
    valid = {name: [r["valid"]["new"] for r in lines if "valid" in r] for name, lines in logs.items()}
    assert all(v["targets"] == 50 and v["ndcg@10"] == 0 for v in valid["without"])  # no row: never ranked
    assert max(v["recall@10"] for v in valid["with"]) > 0.5, valid["with"]  # the genre's new item, by its text
    with pytest.raises(ConfigError, match="only a model that reads cached embeddings"):
        stage_two_settings(case, tmp_path / "ids", "items=id", f"new_item_embeddings={every_item}")


def _rank_of(target: int, candidates: np.ndarray, scores: np.ndarray, k: int) -> int | None:
    """1-based rank of target among candidates by score, ties by item_idx; None when not in the top k."""
    if target not in candidates:
        return None
    score = scores[candidates == target][0]
    rank = 1 + int(((scores > score) | ((scores == score) & (candidates < target))).sum())
    return rank if rank <= k else None


def test_the_untrained_baselines_rank_as_their_definitions_say(genre_run, tmp_path):
    # random histories over 30 items; items 25..29 arrive after t=3000, each with its own popularity
    rng = np.random.default_rng(1)
    rows = ["item_id,user_id,timestamp"]
    for u in range(60):
        old = rng.choice(25, size=rng.integers(4, 8), replace=False)
        late = rng.choice(np.arange(25, 30), size=rng.integers(1, 4), replace=False, p=[.4, .25, .15, .12, .08])
        rows += [f"i{k},u{u},{1000 + t}" for t, k in enumerate(old)]
        rows += [f"i{k},u{u},{5000 + t}" for t, k in enumerate(late)]
    write(tmp_path / "inter.csv", "\n".join(rows) + "\n")
    genres = rng.integers(0, 5, size=(30, 2))  # titles in the tiny tokenizer's words: two genre words and its own
    write(tmp_path / "items.csv", "item_id,title\n" + "".join(f"i{k},g{a} g{b} w{k}\n" for k, (a, b) in
                                                                enumerate(genres)))
    prepare.run(cfg.load(prepare.PrepareConfig, None, [
        "format=hllm-csv", f"source={tmp_path / 'inter.csv'}", f"items={tmp_path / 'items.csv'}",
        f"out={tmp_path / 'data'}", "item_prompt=", "new_items_after=3000"]), log=quiet)
    run = tmp_path / "run"
    stage_one.run(cfg.load(stage_one.EmbedItemsConfig, None, [
        f"data={tmp_path / 'data'}", f"out={run}", f"item.model={genre_run['root'] / 'tiny-bert'}",
        "item.pooling=mean", "user.name=llama-tiny", "item.max_text_tokens=16", "finetune=false", "device=cpu"]),
        log=quiet)
    done = run_cli("refresh", "items", "--catalog", str(tmp_path / "items.csv"), "--run", str(run), "device=cpu")
    assert done.returncode == 0, done.stderr[-2000:]
    reports = {}
    for model in ("content", "popularity-new"):
        done = run_cli("eval", "--k", "1", "5", "10", "--run", str(run), f"data={tmp_path / 'data'}",
                       "--model", model, "--per-user-ranks", "device=cpu", "max_len=3")
        assert done.returncode == 0, done.stderr[-2000:]
        report = json.loads(Path(done.stdout.splitlines()[-1].split()[1]).read_text())
        reports[model] = pl.read_parquet(report["ranks_file"]).sort("user_idx")["rank"].to_list()
    # the definitions, user by user: test target = the last item, its history masked (mask_history=full)
    seqs = UserSequences.load(tmp_path / "data")
    table = store.load_embeddings(store.version_root(run)).embeddings.float().numpy()
    unit = table / np.maximum(np.linalg.norm(table, axis=1, keepdims=True), 1e-12)
    everything = np.arange(1, seqs.num_items + 1)
    histories = [seqs.user(u)[0][:-1] for u in range(seqs.num_users)]
    counts = np.bincount(np.concatenate(histories), minlength=seqs.num_items + 1)  # as the evaluation sees them
    assert len(seqs.new_items) == 5 and len(set(counts[seqs.new_items])) > 2
    content, popular = [], []
    for u, history in enumerate(histories):
        target = seqs.user(u)[0][-1]
        query = unit[history[-3:]].mean(axis=0)  # the last max_len=3 items
        candidates = np.setdiff1d(everything, history)
        content.append(_rank_of(target, candidates, unit[candidates] @ query, 10))
        candidates = np.setdiff1d(seqs.new_items, history)
        popular.append(_rank_of(target, candidates, counts[candidates].astype(float), 10))
    assert reports["content"] == content
    assert reports["popularity-new"] == popular
    assert len({r for r in popular if r is not None}) > 1 and len({r for r in content if r is not None}) > 3
