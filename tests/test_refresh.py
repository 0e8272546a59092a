"""Refresh jobs: only new and changed items are embedded, the rest carried over bit-identical; versions publish
atomically, survive kills, exclude each other, roll back; a damaged store and bad catalogues are one-line errors."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from conftest import REPO, make_planted_data, make_tiny_item_model, quiet, run_cli

from pipeline import config as cfg
from pipeline import versions
from pipeline.data.text import TextRecipe
from pipeline.embeddings import store
from pipeline.embeddings.encode import embed_items
from pipeline.errors import UserError
from pipeline.lock import JobLock
from pipeline.models import build
from pipeline.models.llm import ItemLLM
from pipeline.models.tokens import TokenizedCatalogue
from stages import embed_items as stage_one
from stages import refresh

pytestmark = pytest.mark.slow  # trains models: the full tier (make test), not make test-fast


@pytest.fixture(scope="module")
def base_run(tmp_path_factory) -> dict:
    """A run whose embeddings were made by a tiny Item LLM (no fine-tuning), and its catalogue as a CSV."""
    root = tmp_path_factory.mktemp("refresh")
    data = make_planted_data(root)
    model = make_tiny_item_model(root / "tiny-bert", "bert")
    conf = cfg.load(stage_one.EmbedItemsConfig, None, [
        f"data={data}", f"out={root / 'run'}", f"item.model={model}", "item.pooling=mean", "user.name=llama-tiny",
        "item.max_text_tokens=16", "finetune=false", "embed.shard_rows=7", "device=cpu"])
    stage_one.run(conf, log=quiet)
    items = pl.read_parquet(data / "items.parquet").sort("item_idx")
    catalog = root / "catalog.csv"
    items.select("item_id", "title").write_csv(catalog)
    return {"root": root, "data": data, "run": root / "run", "catalog": catalog, "items": items}


def copy_run(base_run: dict, dest: Path) -> Path:
    shutil.copytree(base_run["run"], dest)
    return dest


def changed_catalog(base_run: dict, path: Path) -> Path:
    """Edit 10 titles, add 5 items, retire 3 (i3, i17, i30)."""
    items = base_run["items"].select("item_id", "title")
    edited = {f"i{k}" for k in range(5, 15)}
    items = items.with_columns(pl.when(pl.col("item_id").is_in(list(edited)))
                               .then(pl.col("title") + " w39").otherwise(pl.col("title")).alias("title"))
    items = items.filter(~pl.col("item_id").is_in(["i3", "i17", "i30"]))
    new = pl.DataFrame({"item_id": [f"n{k}" for k in range(5)], "title": [f"w{k} w{k + 1} g2" for k in range(5)]})
    pl.concat([items, new]).write_csv(path)
    return path


def settings(run: Path, catalog: Path, *extra: str) -> refresh.RefreshItemsConfig:
    return cfg.load(refresh.RefreshItemsConfig, None, [f"catalog={catalog}", f"run={run}", "device=cpu", *extra])


def count_item_llm_rows(monkeypatch) -> list[int]:
    rows: list[int] = []
    forward = ItemLLM.forward

    def counted(self, input_ids, *args, **kwargs):
        rows.append(int(input_ids.shape[0]))
        return forward(self, input_ids, *args, **kwargs)

    monkeypatch.setattr(ItemLLM, "forward", counted)
    return rows


def version_digest(root: Path) -> dict:
    manifest = store.read_manifest(root)
    return {"files": sorted(p.name for p in root.iterdir()),
            "shards": [(s["file"], s["sha256"]) for s in manifest["shards"]], "items": manifest["items_sha256"],
            "rows": manifest["rows"], "parent": manifest["parent"], "max_item_idx": manifest["max_item_idx"]}


def test_only_new_and_changed_items_are_embedded(base_run, tmp_path, monkeypatch):
    run = copy_run(base_run, tmp_path / "run")
    parent = store.load_embeddings(store.version_root(run))
    rows = count_item_llm_rows(monkeypatch)
    summary = refresh.run_items(settings(run, changed_catalog(base_run, tmp_path / "c.csv")), log=quiet)
    assert sum(rows) == 15  # 10 edited + 5 new, nothing else went through the Item LLM
    assert {k: summary[k] for k in ("new", "changed", "unchanged", "retired")} == \
        {"new": 5, "changed": 10, "unchanged": 27, "retired": 3}
    new = store.load_embeddings(store.version_root(run))
    assert new.root.name == summary["version"] != parent.root.name
    assert new.manifest["parent"] == parent.root.name and new.manifest["rows"] == 42
    items = pl.read_parquet(new.root / "items.parquet")
    ids = dict(zip(items["item_id"], items["item_idx"], strict=True))
    old_ids = dict(zip(base_run["items"]["item_id"], base_run["items"]["item_idx"], strict=True))
    assert all(ids[i] == old_ids[i] for i in ids if i in old_ids)  # existing items keep their item_idx
    assert [ids[f"n{k}"] for k in range(5)] == [41, 42, 43, 44, 45]  # new ones get new values, in catalogue order
    retired = [old_ids[i] for i in ("i3", "i17", "i30")]
    assert not new.present[retired].any() and new.embeddings[retired].abs().sum() == 0
    assert not {"i3", "i17", "i30"} & set(ids)
    unchanged = [old_ids[f"i{k}"] for k in range(40) if k not in range(5, 15) and k not in (3, 17, 30)]
    assert torch.equal(new.embeddings[unchanged], parent.embeddings[unchanged])  # bit-identical, not recomputed
    edited = [old_ids[f"i{k}"] for k in range(5, 15)]
    assert not torch.allclose(new.embeddings[edited], parent.embeddings[edited])
    # the embedded rows are what the Item LLM makes of the new texts
    item_llm, tokenizer, meta = build.load_item_llm(run / "item_llm")
    titles = pl.read_csv(tmp_path / "c.csv").filter(pl.col("item_id").is_in(["i5", "n4"]))["title"].to_list()
    texts = [f"title: {t}" for t in titles]  # the run's text recipe: no prompt, the title field
    expected = embed_items(item_llm.eval(), TokenizedCatalogue.build(tokenizer, texts, 16), np.array([1, 2]))
    assert torch.allclose(new.embeddings[[ids["i5"], ids["n4"]]], expected, atol=1e-6)


def test_a_second_run_changes_nothing_and_says_so(base_run, tmp_path, monkeypatch):
    run = copy_run(base_run, tmp_path / "run")
    catalog = changed_catalog(base_run, tmp_path / "c.csv")
    first = refresh.run_items(settings(run, catalog), log=quiet)
    folders = sorted(p.name for p in (run / "embeddings").iterdir())
    rows = count_item_llm_rows(monkeypatch)
    said = []
    second = refresh.run_items(settings(run, catalog), log=said.append)
    assert not second["changed_version"] and second["version"] == first["version"] and rows == []
    assert sorted(p.name for p in (run / "embeddings").iterdir()) == folders
    assert any(line.startswith("nothing to do") for line in said)
    # the unchanged catalogue of the first version is a no-op too
    untouched = copy_run(base_run, tmp_path / "untouched")
    assert not refresh.run_items(settings(untouched, base_run["catalog"]), log=quiet)["changed_version"]


@pytest.mark.parametrize("dies_at", ["shard-0", "shard-3", "manifest", "after-manifest", "publish"])
def test_a_killed_refresh_is_invisible_and_resumes_to_the_same_version(base_run, tmp_path, monkeypatch, dies_at):
    catalog = changed_catalog(base_run, tmp_path / "c.csv")
    straight = copy_run(base_run, tmp_path / "straight")
    refresh.run_items(settings(straight, catalog), log=quiet)
    run = copy_run(base_run, tmp_path / "run")
    before = versions.current_version(run / "embeddings")
    real_write, real_finish, real_publish = store.ShardWriter.write, store.ShardWriter.finish, versions.publish
    real_drop_progress = versions.drop_progress

    def write(self, index, *args):
        if dies_at == f"shard-{index}":
            raise KeyboardInterrupt("killed")
        return real_write(self, index, *args)

    def finish(self, *args, **kwargs):
        if dies_at == "manifest":
            raise KeyboardInterrupt("killed")
        return real_finish(self, *args, **kwargs)

    def publish(*args):
        if dies_at == "publish":
            raise KeyboardInterrupt("killed")
        return real_publish(*args)

    def drop_progress(*args):
        if dies_at == "after-manifest":
            raise KeyboardInterrupt("killed")
        return real_drop_progress(*args)

    monkeypatch.setattr(versions, "drop_progress", drop_progress)
    monkeypatch.setattr(store.ShardWriter, "write", write)
    monkeypatch.setattr(store.ShardWriter, "finish", finish)
    monkeypatch.setattr(versions, "publish", publish)
    with pytest.raises(KeyboardInterrupt):
        refresh.run_items(settings(run, catalog), log=quiet)
    assert versions.current_version(run / "embeddings") == before  # readers still see the old version, whole
    store.load_embeddings(store.version_root(run))
    for unfinished in (p for p in (run / "embeddings").glob("v-*") if not (p / versions.MANIFEST).is_file()):
        (unfinished / ".shard-00002.safetensors.k1ll3d.tmp").write_bytes(b"torn")  # what a kill -9 leaves
    monkeypatch.undo()
    refresh.run_items(settings(run, catalog), log=quiet)
    assert version_digest(store.version_root(run)) == version_digest(store.version_root(straight))


def test_embed_items_killed_after_its_manifest_reruns_to_the_files_of_a_straight_run(base_run, tmp_path,
                                                                                     monkeypatch):
    root = base_run["root"]
    conf = cfg.load(stage_one.EmbedItemsConfig, None, [
        f"data={base_run['data']}", f"out={tmp_path / 'run'}", f"item.model={root / 'tiny-bert'}",
        "item.pooling=mean", "user.name=llama-tiny", "item.max_text_tokens=16", "finetune=false",
        "embed.shard_rows=7", "device=cpu"])

    def killed(*args):
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(versions, "drop_progress", killed)
    with pytest.raises(KeyboardInterrupt):
        stage_one.run(conf, log=quiet)
    monkeypatch.undo()
    stage_one.run(conf, log=quiet)
    assert version_digest(store.version_root(tmp_path / "run")) == version_digest(store.version_root(base_run["run"]))


def test_kill_9_at_random_points_never_shows_a_partial_version(base_run, tmp_path):
    catalog = changed_catalog(base_run, tmp_path / "c.csv")
    straight = copy_run(base_run, tmp_path / "straight")
    refresh.run_items(settings(straight, catalog), log=quiet)
    expected = version_digest(store.version_root(straight))
    run = copy_run(base_run, tmp_path / "run")
    env = dict(os.environ, PYTHONPATH=str(REPO))  # the thread count of this process: the same floats
    command = [sys.executable, "-m", "pipeline.cli", "refresh", "items", "--catalog", str(catalog), "--run", str(run),
               "device=cpu"]
    rng = random.Random(0)
    for _ in range(3):
        job = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(1.0, 6.0))
        job.send_signal(signal.SIGKILL)
        job.wait()
        current = store.version_root(run)  # always a finished version, whichever
        store.load_embeddings(current)
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert version_digest(store.version_root(run)) == expected


def test_a_concurrent_job_fails_clearly_and_a_dead_ones_lock_is_taken_over(base_run, tmp_path):
    run = copy_run(base_run, tmp_path / "run")
    catalog = changed_catalog(base_run, tmp_path / "c.csv")
    before = versions.current_version(run / "embeddings")
    with JobLock(run / "embeddings", log=quiet):
        done = run_cli("refresh", "items", "--catalog", str(catalog), "--run", str(run), "device=cpu")
        assert done.returncode == 2, done.stderr
        assert done.stderr.count("\n") == 1 and "another job holds this lock" in done.stderr
        with pytest.raises(UserError, match="waited 0.3 s"):
            refresh.run_items(settings(run, catalog, "wait=0.3"), log=quiet)
    assert versions.current_version(run / "embeddings") == before
    # a lock file left by a process that is gone: the next job says so and goes ahead
    (run / "embeddings" / ".lock").write_text(json.dumps({"pid": 2 ** 22 + 17, "host": os.uname().nodename,
                                                          "started": "yesterday", "command": "refresh items"}))
    said = []
    assert refresh.run_items(settings(run, catalog), log=said.append)["changed_version"]
    assert any("ended without releasing it" in line for line in said)


def test_rollback_and_keep(base_run, tmp_path):
    run = copy_run(base_run, tmp_path / "run")
    first = versions.current_version(run / "embeddings")
    original = store.load_embeddings(store.version_root(run)).embeddings
    second = refresh.run_items(settings(run, changed_catalog(base_run, tmp_path / "c.csv")), log=quiet)["version"]
    assert versions.rollback(run / "embeddings", log=quiet) == first  # default: the parent
    assert torch.equal(store.load_embeddings(store.version_root(run)).embeddings, original)
    assert versions.rollback(run / "embeddings", second, log=quiet) == second
    with pytest.raises(UserError, match="v-nope does not exist"):
        versions.rollback(run / "embeddings", "v-nope", log=quiet)
    # a third version, keeping two: the first goes
    shrunk = base_run["items"].select("item_id", "title").filter(pl.col("item_id") != "i1")
    shrunk.write_csv(tmp_path / "s.csv")
    third = refresh.run_items(settings(run, tmp_path / "s.csv", "keep=2"), log=quiet)["version"]
    assert sorted(versions.finished_versions(run / "embeddings")) == sorted([second, third])
    done = run_cli("refresh", "rollback", first, "--run", str(run))
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "does not exist" in done.stderr
    done = run_cli("refresh", "rollback", second)  # no run named: nothing is rolled back by default
    assert done.returncode == 2 and "--run" in done.stderr and "Traceback" not in done.stderr
    assert versions.current_version(run / "embeddings") == third


def write_manifest(root: Path, text: str) -> None:
    (root / "manifest.json").write_text(text)


def test_a_damaged_store_is_a_one_line_error(base_run, tmp_path):
    run = copy_run(base_run, tmp_path / "run")
    version = versions.current_version(run / "embeddings")
    manifest = (run / "embeddings" / version / "manifest.json").read_text()
    data = base_run["data"]
    train = ["train-user", f"data={data}", f"run={run}", "user.init=scratch", "train.epochs=1", "device=cpu"]
    evaluate = ["eval", f"--run={run}", f"data={data}", "device=cpu", "user_llm=stage-one"]
    cases = {
        "truncated": (lambda: write_manifest(run / "embeddings" / version, manifest[: len(manifest) // 2]),
                      "manifest.json: damaged, not readable JSON"),
        "not a manifest": (lambda: write_manifest(run / "embeddings" / version, "[1, 2]"),
                           "manifest.json: damaged, lacks"),
        "missing": (lambda: (run / "embeddings" / version / "manifest.json").unlink(),
                    "which did not finish"),
        "CURRENT names a missing version": (lambda: (run / "embeddings" / "CURRENT").write_text("v-gone\n"),
                                            "names v-gone, which does not exist"),
    }
    for name, (damage, message) in cases.items():
        damage()
        for command in (train, evaluate):
            done = run_cli(*command)
            assert done.returncode == 2, (name, command[0], done.stderr[-2000:])
            assert done.stderr.count("\n") == 1 and message in done.stderr, (name, command[0], done.stderr)
        write_manifest(run / "embeddings" / version, manifest)
        (run / "embeddings" / "CURRENT").write_text(version + "\n")
    done = run_cli(*train, "embeddings=v-nope")
    assert done.returncode == 2 and "embeddings version v-nope does not exist" in done.stderr


@pytest.mark.parametrize("case", ["duplicate ids", "missing text column", "float ids", "empty file", "no ids shared",
                                  "blank id"])
def test_bad_catalogues_are_one_line_errors_and_write_nothing(base_run, tmp_path, case):
    run = copy_run(base_run, tmp_path / "run")
    before = sorted(p.name for p in (run / "embeddings").iterdir())
    path = tmp_path / "catalog.csv"
    items = base_run["items"].select("item_id", "title")
    if case == "duplicate ids":
        pl.concat([items, items.head(2)]).write_csv(path)
        expected = "item_id 'i0' appears more than once (rows 1, 41)"
    elif case == "missing text column":
        items.rename({"title": "name"}).write_csv(path)
        expected = "no column title"
    elif case == "float ids":
        path = tmp_path / "catalog.parquet"
        items.with_columns(pl.col("item_id").str.slice(1).cast(pl.Float64)).write_parquet(path)
        expected = "column item_id holds Float64 values"
    elif case == "empty file":
        path.write_text("")
        expected = "file is empty"
    elif case == "no ids shared":
        items.with_columns(pl.col("item_id").str.slice(1)).write_csv(path)
        expected = "shares no item_id with version"
    else:
        path.write_text("item_id,title\ni0,w0\n ,w1\n")
        expected = "row 2: item_id is missing"
    done = run_cli("refresh", "items", "--catalog", str(path), "--run", str(run), "device=cpu")
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.count("\n") == 1 and expected in done.stderr, done.stderr
    assert sorted(p.name for p in (run / "embeddings").iterdir()) == before


def test_a_malformed_line_of_a_grouplens_catalogue_is_an_error_not_a_retired_item(ml1m_dir):
    recipe = TextRecipe("movielens", ("title", "genres"), "", "latin-1")
    assert refresh.read_catalog(ml1m_dir, recipe)["item_id"].to_list() == ["1", "2", "3", "4", "5"]
    movies = ml1m_dir / "movies.dat"
    lines = movies.read_text(encoding="latin-1").splitlines()
    lines[3] = "4::Heat (1995)"  # the genres field is missing
    movies.write_text("\n".join(lines) + "\n", encoding="latin-1")
    with pytest.raises(UserError, match=r"movies.dat.*row 4"):
        refresh.read_catalog(ml1m_dir, recipe)


def test_eval_follows_the_current_version_and_rollback_restores_its_results(base_run, tmp_path):
    from stages import evaluate

    run = copy_run(base_run, tmp_path / "run")

    def evaluate_run() -> dict:
        conf = cfg.load(evaluate.EvalConfig, None, [f"run={run}", f"data={base_run['data']}", "user_llm=stage-one",
                                                    "device=cpu", "search=torch"], k=(5, 10))
        return evaluate.run(conf, log=quiet)

    before = evaluate_run()
    version = refresh.run_items(settings(run, changed_catalog(base_run, tmp_path / "c.csv")), log=quiet)["version"]
    after = evaluate_run()
    card = after["protocol"]
    assert card["model"]["embeddings_version"] == version
    assert (card["items"], card["retired_items"], card["candidate_items"]) == (45, 3, 42)
    assert after["metrics"] != before["metrics"]
    versions.rollback(run / "embeddings", log=quiet)
    again = evaluate_run()
    assert again["protocol"]["model"]["embeddings_version"] == before["protocol"]["model"]["embeddings_version"]
    assert again["metrics"] == before["metrics"] and "retired_items" not in again["protocol"]


def test_a_text_and_id_model_scores_a_grown_catalogue_with_zero_ids_for_new_items(tmp_path):
    """A User LLM trained before a refresh added items: its learned ID rows load, new items get zero ID rows
    (they are known by their text alone), rather than the whole table silently staying at its initialisation."""
    config = build.UserModelConfig(init="scratch", name="llama-tiny", projection=True, item_id_embedding=True)
    table = torch.randn(41, 24)
    model = build.sequence_model(build.item_source("cached+id", table, 40, 24), build.user_llm_from(config, log=quiet),
                                 config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))  # "trained": nothing at its initial value
    build.save_user_llm(model, tmp_path / "user_llm", {"items": "cached+id"})
    grown, _ = build.load_user_model(tmp_path / "user_llm", torch.cat([table, torch.randn(5, 24)]))
    shrunk, _ = build.load_user_model(tmp_path / "user_llm", table[:31])  # a version with fewer items
    for name in ("items.sources.1.embedding.weight", "item_ids.weight"):
        saved, loaded = model.state_dict()[name], grown.state_dict()[name]
        assert loaded.shape[0] == 46 and torch.equal(loaded[:41], saved) and loaded[41:].abs().sum() == 0, name
        assert torch.equal(shrunk.state_dict()[name], saved[:31]), name


# ---- user vectors and recommend --------------------------------------------------------------------------------


def users_settings(run: Path, *extra: str):
    from stages import users

    return cfg.load(users.RefreshUsersConfig, None, [f"run={run}", "device=cpu", *extra])


def new_interactions(path: Path) -> Path:
    """u1 and u2 act again (at t=5000), a new user u999 arrives, one row names an item nobody knows."""
    rows = ["user_id,item_id,timestamp", "u1,i7,5000", "u2,i8,5000", "u999,i0,5001", "u999,i1,5002",
            "u1,nope,5003", "u3,i9,notatime"]
    path.write_text("\n".join(rows) + "\n")
    return path


def test_user_vectors_are_the_user_llms_output_after_the_whole_history(base_run, tmp_path):
    from pipeline.batches import user_vectors
    from pipeline.data.sequences import EvalExamples, UserSequences
    from pipeline.search import normalise
    from stages import users

    run = copy_run(base_run, tmp_path / "run")
    summary = users.run_users(users_settings(run, "all=true"), log=quiet)
    assert summary["refreshed"] == 120 and summary["carried"] == 0
    frame, vectors, manifest = users._load_users(run / "users" / summary["version"])[:3]
    # reference: the CSR sequences of the canonical tables, every item as history
    seqs = UserSequences.load(base_run["data"])
    ids = pl.read_parquet(base_run["data"] / "users.parquet").sort("user_idx")["user_id"].to_list()
    n = seqs.num_users
    examples = EvalExamples("test", np.arange(n, dtype=np.int32), np.zeros(n, np.int32), np.zeros(n, np.int64),
                            seqs.offsets, seqs.items.astype(np.int64), seqs.timestamps)
    model, table, _, meta, _ = users.load_scorer(run, run / "user_llm_stage1")
    expected = normalise(user_vectors(model, table, examples, int(meta["max_len"])))
    rows = {u: r for r, u in enumerate(frame["user_id"].to_list())}
    got = vectors[[rows[u] for u in ids]].numpy()
    np.testing.assert_allclose(got, expected, atol=1e-6)
    assert frame.filter(pl.col("user_id") == ids[0])["seen"][0].to_list() == seqs.user(0)[0].tolist()


def test_refresh_users_since_recomputes_the_active_users_only(base_run, tmp_path, monkeypatch):
    from pipeline.models.llm import UserLLM
    from stages import users

    run = copy_run(base_run, tmp_path / "run")
    first = users.run_users(users_settings(run, "all=true"), log=quiet)
    before, old_vectors, _ = users._load_users(run / "users" / first["version"])[:3]
    counted = []
    forward = UserLLM.forward
    monkeypatch.setattr(UserLLM, "forward", lambda self, x, *a, **k: (counted.append(x.shape[0]),
                                                                       forward(self, x, *a, **k))[1])
    extra = new_interactions(tmp_path / "new.csv")
    second = users.run_users(users_settings(run, "since=4000", f"interactions={extra}"), log=quiet)
    assert (second["refreshed"], second["carried"], second["rejected_rows"]) == (3, 118, 2)
    assert sum(counted) == 3  # u1, u2 and the new u999 went through the User LLM, nobody else
    after, new_vectors, manifest = users._load_users(run / "users" / second["version"])[:3]
    assert manifest["parent"] == first["version"]
    rows_before = {u: r for r, u in enumerate(before["user_id"].to_list())}
    for r, (user, refreshed) in enumerate(zip(after["user_id"], after["refreshed"], strict=True)):
        if user in ("u1", "u2", "u999"):
            assert refreshed
            if user != "u999":
                assert not torch.equal(new_vectors[r], old_vectors[rows_before[user]])
        else:
            assert not refreshed and torch.equal(new_vectors[r], old_vectors[rows_before[user]])  # bit-identical
    rejected = pl.read_parquet(run / "users" / second["version"] / "rejected.parquet")
    assert sorted(rejected["reason"].to_list()) == ["bad_timestamp", "unknown_item_id"]
    said = []
    again = users.run_users(users_settings(run, "since=4000", f"interactions={extra}"), log=said.append)
    assert not again["changed_version"] and said[-1].startswith("nothing to do")


def test_recommend_ranks_unseen_live_items_by_the_stored_vector(base_run, tmp_path):
    from stages import users

    run = copy_run(base_run, tmp_path / "run")
    refresh.run_items(settings(run, changed_catalog(base_run, tmp_path / "c.csv")), log=quiet)  # i3, i17, i30 retire
    users.run_users(users_settings(run, "all=true"), log=quiet)
    conf = cfg.load(users.RecommendConfig, None, [f"run={run}", "user=u0", "k=5"])
    top = users.recommend(conf, log=quiet)
    frame, vectors, _ = users._load_users(run / "users" / versions.current_version(run / "users"))[:3]
    row = frame["user_id"].to_list().index("u0")
    seen = set(frame["seen"][row].to_list())
    model, table, live, _, _ = users.load_scorer(run, run / "user_llm_stage1")
    scores = torch.nn.functional.normalize(table, dim=-1) @ vectors[row]
    ranked = [i for i in torch.argsort(scores, descending=True, stable=True).tolist() if live[i] and i not in seen]
    assert top["item_idx"].to_list() == ranked[:5] and top["rank"].to_list() == [1, 2, 3, 4, 5]
    assert not set(top["item_id"].to_list()) & {"i3", "i17", "i30"}
    done = run_cli("recommend", "--user", "u0", "--k", "3", "--run", str(run))
    assert done.returncode == 0 and len(done.stdout.splitlines()) == 4 and "title: w" in done.stdout
    done = run_cli("recommend", "--user", "nobody", "--run", str(run))
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "no user 'nobody'" in done.stderr


def test_user_vectors_roll_back_like_embeddings(base_run, tmp_path):
    from stages import users

    run = copy_run(base_run, tmp_path / "run")
    first = users.run_users(users_settings(run, "all=true"), log=quiet)["version"]
    second = users.run_users(users_settings(run, "since=4000", f"interactions={new_interactions(tmp_path / 'n.csv')}"),
                             log=quiet)["version"]
    assert second != first and versions.current_version(run / "users") == second
    done = run_cli("refresh", "rollback", "--store", "users", "--run", str(run))
    assert done.returncode == 0, done.stderr[-2000:]
    assert versions.current_version(run / "users") == first
    assert versions.current_version(run / "embeddings") == versions.current_version(base_run["run"] / "embeddings")
    done = run_cli("refresh", "rollback", second, "--store", "users", "--run", str(run))
    assert done.returncode == 0 and versions.current_version(run / "users") == second
    done = run_cli("refresh", "rollback", "--store", "users", "--run", str(run), "--wait", "0")
    assert versions.current_version(run / "users") == first
    done = run_cli("refresh", "rollback", "--store", "users", "--run", str(run))
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "no parent version" in done.stderr


def test_refresh_users_is_crash_safe_exclusive_and_checks_its_input(base_run, tmp_path, monkeypatch):
    from stages import users

    run = copy_run(base_run, tmp_path / "run")
    first = users.run_users(users_settings(run, "all=true"), log=quiet)
    extra = new_interactions(tmp_path / "new.csv")
    straight = copy_run(base_run, tmp_path / "straight")
    users.run_users(users_settings(straight, "all=true"), log=quiet)
    expected = users.run_users(users_settings(straight, "since=4000", f"interactions={extra}"), log=quiet)
    monkeypatch.setattr(users, "save_file", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt("killed")))
    with pytest.raises(KeyboardInterrupt):
        users.run_users(users_settings(run, "since=4000", f"interactions={extra}"), log=quiet)
    assert versions.current_version(run / "users") == first["version"]
    assert sorted(p.name for p in (run / "users").iterdir() if not p.name.startswith(".")) == \
        sorted(["CURRENT", first["version"]])  # nothing partial is visible
    monkeypatch.undo()
    killed = run / "users" / f".{expected['version']}.k1ll3d.tmp"  # what a kill -9 inside atomic_dir leaves
    (killed / "half").mkdir(parents=True)
    (killed / "half" / "vectors.safetensors").write_bytes(b"torn")
    resumed = users.run_users(users_settings(run, "since=4000", f"interactions={extra}"), log=quiet)
    assert not [p.name for p in (run / "users").iterdir() if p.name.endswith(".tmp")]
    assert resumed["version"] == expected["version"]
    a = users._load_users(run / "users" / resumed["version"])[:3]
    b = users._load_users(straight / "users" / expected["version"])[:3]
    assert a[0].equals(b[0]) and torch.equal(a[1], b[1])
    with JobLock(run / "users", log=quiet):
        done = run_cli("refresh", "users", "--run", str(run), "--all", "device=cpu")
        assert done.returncode == 2 and "another job holds this lock" in done.stderr
    for since, message in (("2999-01-01", "is in the future"), ("last tuesday", "expected unix seconds")):
        done = run_cli("refresh", "users", "--run", str(run), "--since", since)
        assert done.returncode == 2 and done.stderr.count("\n") == 1 and message in done.stderr, done.stderr
    done = run_cli("refresh", "users", "--run", str(run))
    assert done.returncode == 2 and "exactly one of since" in done.stderr


# ---- the index follows the version -----------------------------------------------------------------------------


def test_patched_indexes_equal_a_build_from_scratch():
    from pipeline.search import FaissSearch, Masked, build_faiss_index, masked_topk, patch_faiss_index, row_digests

    rng = np.random.default_rng(0)
    old = rng.standard_normal((60, 8)).astype(np.float32)
    old /= np.linalg.norm(old, axis=1, keepdims=True)
    old_ids = np.arange(1, 61)
    new_ids = np.concatenate([np.setdiff1d(old_ids, [4, 20, 33]), np.arange(61, 66)])  # 3 retired, 5 new
    new = np.concatenate([old[new_ids[:-5] - 1], rng.standard_normal((5, 8)).astype(np.float32)])
    new[[0, 7, 30]] = rng.standard_normal((3, 8))  # 3 changed
    fresh = [0, 7, 30, 57, 58, 59, 60, 61]
    new[fresh] /= np.linalg.norm(new[fresh], axis=1, keepdims=True)  # the carried rows stay bit-identical
    queries = rng.standard_normal((40, 8)).astype(np.float32)
    no_mask = Masked(np.zeros(41, np.int64), np.zeros(0, np.int64))
    for kind in ("flat", "ivf"):
        scratch = build_faiss_index(new, kind, 4, 16, 0, new_ids)
        patched, info = patch_faiss_index(build_faiss_index(old, kind, 4, 16, 0, old_ids), kind,
                                          (old_ids, row_digests(old)), (new_ids, row_digests(new)), new)
        assert info == {"removed": 6, "added": 8} and patched.ntotal == 62
        probe = {"ivf_probe": 4} if kind == "ivf" else {}  # every list: exhaustive, so comparable
        a = masked_topk(FaissSearch(patched, kind, max_id=65, **probe), queries, no_mask, 62)
        b = masked_topk(FaissSearch(scratch, kind, max_id=65, **probe), queries, no_mask, 62)
        np.testing.assert_array_equal(a[1], b[1])
        np.testing.assert_allclose(a[0], b[0], atol=1e-6)
    assert patch_faiss_index(build_faiss_index(old, "hnsw", 4, 16, 0, old_ids), "hnsw",
                             (old_ids, row_digests(old)), (new_ids, row_digests(new)), new) is None


def test_eval_after_a_refresh_patches_the_index_and_matches_a_fresh_build(base_run, tmp_path):
    from stages import evaluate

    run = copy_run(base_run, tmp_path / "run")

    def evaluate_run(*extra: str) -> dict:
        conf = cfg.load(evaluate.EvalConfig, None, [f"run={run}", f"data={base_run['data']}", "user_llm=stage-one",
                                                    "device=cpu", "search=faiss", *extra], k=(5, 10, 40))
        return evaluate.run(conf, log=quiet)

    evaluate_run()
    evaluate_run("index=hnsw")
    parent = versions.current_version(run / "embeddings")
    refresh.run_items(settings(run, changed_catalog(base_run, tmp_path / "c.csv")), log=quiet)
    patched = evaluate_run()
    card = patched["protocol"]["index"]
    assert parent in card["patched_from"] and (card["removed"], card["added"]) == (13, 15)
    assert "patched_from" not in evaluate_run("index=hnsw")["protocol"]["index"]  # HNSW is rebuilt
    shutil.rmtree(run / "embeddings" / parent / "index")
    for saved in (run / "embeddings" / versions.current_version(run / "embeddings") / "index").glob("flat-*"):
        saved.unlink()
    fresh = evaluate_run()
    assert "patched_from" not in fresh["protocol"]["index"] and fresh["metrics"] == patched["metrics"]


# ---- more than one process ---------------------------------------------------------------------------------------


def test_two_processes_write_the_same_shards_as_one(base_run, tmp_path):
    """The catalogue pass of embed-items and refresh items under torchrun (two CPU processes, gloo): each
    process writes its own shards, the main one the manifest; the files are the same as one process writes."""
    root = base_run["root"]
    catalog = changed_catalog(base_run, tmp_path / "c.csv")
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    digests = {}
    for procs in (1, 2):
        out = tmp_path / f"p{procs}"
        launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}", "-m",
                  "pipeline.cli"]
        embed = [*launch, "embed-items", f"data={base_run['data']}", f"out={out}", f"item.model={root / 'tiny-bert'}",
                 "item.pooling=mean", "user.name=llama-tiny", "item.max_text_tokens=16", "finetune=false",
                 "embed.shard_rows=7", "device=cpu"]
        # key=value settings: torchrun would take --run for one of its own options
        for command in (embed, [*launch, "refresh", "items", f"catalog={catalog}", f"run={out}", "device=cpu"]):
            done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
            assert done.returncode == 0, done.stderr[-3000:]
        refreshed = store.version_root(out)
        digests[procs] = (version_digest(refreshed.parent / refreshed.parent.joinpath(
            store.read_manifest(refreshed)["parent"]).name), version_digest(refreshed))
        assert not list(refreshed.glob("progress*.json"))
    assert digests[1] == digests[2]
    assert store.read_manifest(store.version_root(tmp_path / "p2"))["processes"] == 2


def test_eval_and_user_vectors_split_users_across_processes(base_run, tmp_path):
    """eval and refresh users under torchrun: each process scores a share of the users; the main process writes
    the same report and vectors as one process (up to float rounding from other batch compositions)."""
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    results = {}
    for procs in (1, 2):
        run = copy_run(base_run, tmp_path / f"p{procs}")
        launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}", "-m",
                  "pipeline.cli"]
        for command in ([*launch, "eval", f"run={run}", f"data={base_run['data']}", "user_llm=stage-one",
                         "device=cpu", "search=torch", "per_user_ranks=true"],
                        [*launch, "refresh", "users", f"run={run}", "all=true", "device=cpu"]):
            done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
            assert done.returncode == 0, done.stderr[-3000:]
        reports = sorted((run / "reports").glob("eval-*.json"))
        assert len(reports) == 1  # one report, from the main process
        from stages import users

        results[procs] = (json.loads(reports[0].read_text()),
                          users._load_users(run / "users" / versions.current_version(run / "users"))[:3])
    (one, (frame1, vectors1, _)), (two, (frame2, vectors2, _)) = results[1], results[2]
    assert two["users"] == one["users"] == 120 and two["timings"]["processes"] == 2
    for name, value in one["metrics"].items():
        assert abs(two["metrics"][name] - value) <= 1 / 120 + 1e-12, name  # at most one user's rank moves
    assert frame1.equals(frame2)
    torch.testing.assert_close(vectors2, vectors1, atol=1e-5, rtol=1e-5)


def test_item_idx_values_are_never_handed_out_twice(base_run, tmp_path):
    """After a rollback the next refresh does not reuse the values of the version rolled back from, an item
    that comes back gets its old value, and re-running embed-items leaves a refreshed CURRENT where it is."""
    run = copy_run(base_run, tmp_path / "run")
    first = versions.current_version(run / "embeddings")
    refresh.run_items(settings(run, changed_catalog(base_run, tmp_path / "c.csv")), log=quiet)  # n0..n4: 41..45
    versions.rollback(run / "embeddings", log=quiet)
    items = base_run["items"].select("item_id", "title")
    other = pl.DataFrame({"item_id": ["m0"], "title": ["w1 w2"]})
    pl.concat([items.filter(pl.col("item_id") != "i3"), other]).write_csv(tmp_path / "m.csv")
    second = refresh.run_items(settings(run, tmp_path / "m.csv"), log=quiet)["version"]
    ids = dict(pl.read_parquet(run / "embeddings" / second / "items.parquet").select("item_id", "item_idx").rows())
    assert ids["m0"] == 46  # not 41: that value belongs to n0
    pl.concat([items, other]).write_csv(tmp_path / "back.csv")  # i3 returns
    third = refresh.run_items(settings(run, tmp_path / "back.csv"), log=quiet)["version"]
    ids = dict(pl.read_parquet(run / "embeddings" / third / "items.parquet").select("item_id", "item_idx").rows())
    assert ids["i3"] == 4 and ids["m0"] == 46
    said = []
    conf = cfg.load(stage_one.EmbedItemsConfig, None, [
        f"data={base_run['data']}", f"out={run}", f"item.model={base_run['root'] / 'tiny-bert'}", "item.pooling=mean",
        "user.name=llama-tiny", "item.max_text_tokens=16", "finetune=false", "embed.shard_rows=7", "device=cpu"])
    stage_one.run(conf, log=said.append)
    assert versions.current_version(run / "embeddings") == third and first in "".join(said)


def test_users_keep_every_earlier_interactions_file(base_run, tmp_path):
    from stages import users

    run = copy_run(base_run, tmp_path / "run")
    users.run_users(users_settings(run, "all=true"), log=quiet)
    day1 = new_interactions(tmp_path / "day1.csv")  # u1, u2 at t=5000; the new u999
    users.run_users(users_settings(run, "since=4000", f"interactions={day1}"), log=quiet)
    (tmp_path / "day2.csv").write_text("user_id,item_id,timestamp\nu5,i11,6000\nu1,i12,3000\n")  # u1: a late event
    second = users.run_users(users_settings(run, "since=5500", f"interactions={tmp_path / 'day2.csv'}"), log=quiet)
    assert second["refreshed"] == 2  # u5 (active since) and u1 (an event arrived, though dated before `since`)
    frame = users._load_users(run / "users" / second["version"])[0]
    seen = dict(zip(frame["user_id"].to_list(), frame["seen"].to_list(), strict=True))
    assert "u999" in seen  # day 1's new user is still there
    item = dict(pl.read_parquet(base_run["data"] / "items.parquet").select("item_id", "item_idx").rows())
    assert item["i7"] in seen["u1"] and item["i12"] in seen["u1"]  # day 1's and day 2's events
    conf = cfg.load(users.RecommendConfig, None, [f"run={run}", "user=u1", "k=40"])
    assert not set(users.recommend(conf, log=quiet)["item_idx"].to_list()) & set(seen["u1"])
    longer = users.run_users(users_settings(run, "since=5500", f"interactions={tmp_path / 'day2.csv'}",
                                            "max_len=3"), log=quiet)
    assert longer["changed_version"] and longer["refreshed"] == 121  # another history length: everyone anew


def test_a_failure_on_the_main_process_stops_every_process(base_run, tmp_path):
    """Under torchrun, when a step only the main process runs (here: switching CURRENT) fails, the other process
    stops with a message instead of waiting at a barrier, and CURRENT stays on the old version."""
    run = copy_run(base_run, tmp_path / "run")
    before = versions.current_version(run / "embeddings")
    catalog = changed_catalog(base_run, tmp_path / "c.csv")
    script = tmp_path / "fail.py"
    script.write_text(f"""
import os, sys
sys.path.insert(0, {str(REPO)!r})
from pipeline import config as cfg
from stages import refresh

def broken(*args):
    raise OSError("disk full")

if os.environ.get("RANK") == "0":
    refresh.versions.publish = broken
try:
    refresh.run_items(cfg.load(refresh.RefreshItemsConfig, None, [
        "catalog={catalog}", "run={run}", "device=cpu"]), log=lambda _: None)
except Exception as e:
    print(f"rank {{os.environ.get('RANK')}}: {{type(e).__name__}}: {{e}}", file=sys.stderr)
    sys.exit(3)
""")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script)], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode != 0
    assert "rank 0: OSError: disk full" in done.stderr
    assert "rank 1: UserError: the main process failed (OSError: disk full)" in done.stderr
    assert versions.current_version(run / "embeddings") == before
