"""Evaluation: hand-computed metrics, history masking, FAISS against torch, approximate indexes, the eval command."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from conftest import make_cached_run, run_cli

from pipeline import config as cfg
from pipeline.cli import STAGES, list_option_values
from pipeline.data.sequences import UserSequences, eval_examples
from pipeline.embeddings.store import load_embeddings
from pipeline.errors import UserError
from pipeline.metrics import MISS, metrics_from_ranks, popularity_ranks, target_ranks
from pipeline.models import build
from pipeline.search import (
    FaissSearch,
    Masked,
    PopularitySearch,
    TorchSearch,
    build_faiss_index,
    masked_topk,
    normalise,
    ranks_in_topk,
    recall_against_exact,
)
from pipeline.validation import validate
from stages import evaluate
from stages import train_user as stage_two

faiss = pytest.importorskip("faiss")


def csr(histories: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    offsets = np.zeros(len(histories) + 1, dtype=np.int64)
    np.cumsum([len(h) for h in histories], out=offsets[1:])
    items = np.array([i for h in histories for i in h], dtype=np.int64)
    return offsets, items


# ---------------------------------------------------------------------------------------------------------------
# Hand-computed cases: five items on a line of scores, one user


def line_search() -> TorchSearch:
    """Items 1..5 score 0.9, 0.5, 0.5 (a tie with 2), 0.1, -0.2 against the query [1, 0]."""
    angles = np.arccos([0.9, 0.5, 0.5, 0.1, -0.2])
    return TorchSearch(np.stack([np.cos(angles), np.sin(angles)], 1).astype(np.float32))


QUERY = np.array([[1.0, 0.0]], dtype=np.float32)


def ranks_of(target: int, history: list[int], mode: str, window: int = 200, k: int = 5) -> int:
    masked = Masked.from_histories(*csr([history]), mode, window)
    _, items = masked_topk(line_search(), QUERY, masked, k)
    return int(ranks_in_topk(items, np.array([target]))[0])


def test_metrics_by_hand():
    ranks = np.array([1, 3, 11, MISS])
    m = metrics_from_ranks(ranks, ks=(1, 10, 50))
    assert m["recall@1"] == 0.25 and m["recall@10"] == 0.5 and m["recall@50"] == 0.75
    assert m["ndcg@1"] == pytest.approx(1 / 4)
    assert m["ndcg@10"] == pytest.approx((1 + 1 / math.log2(4)) / 4)  # rank 3: 1/log2(4) = 0.5
    assert m["ndcg@50"] == pytest.approx((1 + 0.5 + 1 / math.log2(12)) / 4)


def test_ties_break_by_item_idx_and_padding_is_never_ranked():
    # items 2 and 3 tie at 0.5: item 2 is ranked first
    assert ranks_of(2, [], "none") == 2
    assert ranks_of(3, [], "none") == 3
    _, items = masked_topk(line_search(), QUERY, Masked.from_histories(*csr([[]]), "none"), 8)
    assert items.tolist() == [[1, 2, 3, 4, 5, 0, 0, 0]]  # 0 only fills the slots past the catalogue


def test_history_masking_modes_by_hand():
    history = [3, 1, 4]  # oldest first
    assert ranks_of(2, history, "full") == 1  # items 1 and 3 removed
    assert ranks_of(2, history, "none") == 2
    assert ranks_of(2, history, "window", window=2) == 1  # the last two (1 and 4) removed
    assert ranks_of(3, history, "full") == MISS
    assert ranks_of(3, history, "window", window=2) == 2  # 3 is older than the window: it stays, after 2 (tie)
    assert ranks_of(3, history, "none") == 3
    assert ranks_of(5, history, "full") == 2
    assert ranks_of(5, history, "window", window=2) == 3
    assert ranks_of(5, history, "none") == 5
    # a target that is also in the history is a miss under full, found under none
    assert ranks_of(1, [1, 2], "full") == MISS
    assert ranks_of(1, [1, 2], "none") == 1
    m = metrics_from_ranks(np.array([ranks_of(2, history, "full"), ranks_of(1, [1, 2], "full")]), ks=(1,))
    assert m == {"recall@1": 0.5, "ndcg@1": 0.5}


def test_a_history_longer_than_k_is_fully_masked_not_truncated():
    rng = np.random.default_rng(0)
    items = normalise(rng.normal(size=(300, 8)))
    queries = normalise(rng.normal(size=(20, 8)))
    histories = [list(rng.choice(np.arange(1, 301), size=n, replace=False)) for n in rng.integers(40, 120, 20)]
    _, top = masked_topk(TorchSearch(items), queries, Masked.from_histories(*csr(histories), "full"), k=10,
                         batch_size=7)
    for row, history in zip(top, histories, strict=True):
        assert len(set(row)) == 10 and 0 not in row
        assert not set(row) & set(history)


# ---------------------------------------------------------------------------------------------------------------
# Fast paths against references


@pytest.fixture(scope="module")
def random_case() -> dict:
    rng = np.random.default_rng(1)
    items = normalise(rng.normal(size=(500, 16)))
    queries = normalise(rng.normal(size=(300, 16)))
    histories = [list(rng.choice(np.arange(1, 501), size=n, replace=False)) for n in rng.integers(1, 60, 300)]
    targets = rng.integers(1, 501, 300)
    return {"items": items, "queries": queries, "histories": histories, "targets": targets}


@pytest.mark.parametrize("mode", ["full", "window", "none"])
def test_faiss_and_torch_give_the_same_rankings_as_full_ranking(random_case, mode):
    c = random_case
    masked = Masked.from_histories(*csr(c["histories"]), mode, window=20)
    _, torch_items = masked_topk(TorchSearch(c["items"]), c["queries"], masked, 50, batch_size=64)
    flat = FaissSearch(build_faiss_index(c["items"], "flat", 1, 32, 0), "flat")
    _, faiss_items = masked_topk(flat, c["queries"], masked, 50, batch_size=64)
    assert np.array_equal(torch_items, faiss_items)
    # the full-ranking reference (every item scored, history set to -inf) agrees wherever rank <= 50
    table = torch.from_numpy(np.vstack([np.zeros((1, 16), np.float32), c["items"]]))
    reference = target_ranks(torch.from_numpy(c["queries"]), table, c["targets"],
                             [np.array(h) for h in c["histories"]], mode, window=20)
    topk_ranks = ranks_in_topk(torch_items, c["targets"])
    assert np.array_equal(np.where(reference <= 50, reference, MISS), topk_ranks)
    assert (topk_ranks != MISS).sum() > 10  # the comparison covered real hits


@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_ties_across_the_cut_still_go_to_the_lowest_item_idx(backend):
    """Duplicate item vectors (same text) tie exactly; top-K routines cut such ties in any order."""
    rng = np.random.default_rng(3)
    groups = normalise(rng.normal(size=(3, 8)))
    items = groups[rng.integers(0, 3, 700)]  # 700 items, three distinct vectors
    queries = normalise(rng.normal(size=(40, 8)))
    histories = [list(rng.choice(np.arange(1, 701), size=n, replace=False)) for n in rng.integers(0, 30, 40)]
    targets = rng.integers(1, 701, 40)
    masked = Masked.from_histories(*csr(histories), "full")
    searcher = TorchSearch(items) if backend == "torch" else FaissSearch(build_faiss_index(items, "flat", 1, 32, 0),
                                                                          "flat")
    table = torch.from_numpy(np.vstack([np.zeros((1, 8), np.float32), items]))
    reference = target_ranks(torch.from_numpy(queries), table, targets, [np.array(h) for h in histories], "full")
    for k in (10, 79, 250):
        _, top = masked_topk(searcher, queries, masked, k, batch_size=16)
        assert np.array_equal(np.where(reference <= k, reference, MISS), ranks_in_topk(top, targets)), k
        for row in top:  # within a tie the items run in ascending item_idx
            same = np.all(items[row - 1][1:] == items[row - 1][:-1], axis=1)
            assert np.all(row[1:][same] > row[:-1][same])


def test_popularity_search_matches_the_full_ranking_reference(random_case):
    c = random_case
    counts = np.random.default_rng(2).integers(0, 5, 501)  # many ties
    masked = Masked.from_histories(*csr(c["histories"]), "full")
    _, top = masked_topk(PopularitySearch(counts), np.zeros((300, 1), np.float32), masked, 100)
    reference = popularity_ranks(counts, c["targets"], [np.array(h) for h in c["histories"]], "full")
    assert np.array_equal(np.where(reference <= 100, reference, MISS), ranks_in_topk(top, c["targets"]))


def test_approximate_indexes_report_recall_against_exact(random_case):
    c = random_case
    masked = Masked.from_histories(*csr(c["histories"]), "full")
    _, exact = masked_topk(TorchSearch(c["items"]), c["queries"], masked, 20)
    assert recall_against_exact(exact, exact, (10, 20)) == {"recall@10": 1.0, "recall@20": 1.0}
    ivf = build_faiss_index(c["items"], "ivf", 16, 32, 0)
    _, all_lists = masked_topk(FaissSearch(ivf, "ivf", ivf_probe=16), c["queries"], masked, 20)
    assert recall_against_exact(all_lists, exact, (10, 20)) == {"recall@10": 1.0, "recall@20": 1.0}
    _, one_list = masked_topk(FaissSearch(ivf, "ivf", ivf_probe=1), c["queries"], masked, 20)
    partial = recall_against_exact(one_list, exact, (10, 20))
    assert 0.0 < partial["recall@10"] < 0.9  # one of 16 lists misses most neighbours in 16-d noise
    _, shuffled = masked_topk(TorchSearch(c["items"]), c["queries"][::-1].copy(), masked, 20)
    assert recall_against_exact(shuffled, exact, (10,))["recall@10"] < 0.2


def tiny_time_model(tmp_path: Path):
    """An untrained tiny User LLM with a time embedding over a cached run, and that run's test examples."""
    case = make_cached_run(tmp_path)
    conf = cfg.load(stage_two.TrainUserConfig, None, [f"data={case['data']}", f"run={case['run']}",
                                                        "user.init=scratch", "user.name=llama-tiny",
                                                        "user.time_embedding=true"])
    torch.manual_seed(0)
    model = stage_two.build_model(conf, load_embeddings(stage_two.embeddings_root(conf)).embeddings,
                                  log=lambda _: None).eval()
    return model, eval_examples(UserSequences.load(case["data"]), "test")


def test_user_vectors_by_length_buckets_match_fixed_padding(tmp_path):
    from pipeline.batches import left_pad, user_vectors

    model, examples = tiny_time_model(tmp_path)
    # uneven lengths: cut each history to a different length
    keep = [examples.history(i)[-(1 + i % 9):] for i in range(len(examples))]
    stamps = [examples.history_timestamps[examples.history_offsets[i]:examples.history_offsets[i + 1]][-(1 + i % 9):]
              for i in range(len(examples))]
    offsets, items = csr(keep)
    uneven = type(examples)("test", examples.users, examples.targets, examples.target_timestamps, offsets, items,
                            np.concatenate(stamps))
    table = model.items.table()
    fast = normalise(user_vectors(model, table, uneven, 8, batch_size=16))
    from pipeline.models.sequence_model import time_features

    times = torch.from_numpy(time_features(left_pad(stamps, 8).numpy()))
    reference = model.user_vectors(table, left_pad(keep, 8), times)
    assert np.allclose(fast, normalise(reference), atol=1e-5)


def test_history_items_without_a_vector_are_left_out_of_the_input(tmp_path):
    """An ID no training saw has a zero row: the user's vector is the one of the history without that item (its
    timestamp goes too), and a history of nothing but such items is read whole."""
    from pipeline.batches import left_pad, user_vectors
    from pipeline.models.sequence_model import time_features

    model, examples = tiny_time_model(tmp_path)
    table = model.items.table().clone()
    unknown = np.unique(examples.history_items)[::3]  # a third of the items that occur in histories
    table[torch.from_numpy(unknown)] = 0.0
    alone = len(examples) - 1  # this user's history becomes one unknown item
    items, stamps = [], []
    for i in range(len(examples)):
        h = examples.history(i)
        t = examples.history_timestamps[examples.history_offsets[i]:examples.history_offsets[i + 1]]
        items.append(h[-1:] if i == alone else h)
        stamps.append(t[-1:] if i == alone else t)
    items[alone] = unknown[:1]
    offsets, flat = csr(items)
    mixed = type(examples)("test", examples.users, examples.targets, examples.target_timestamps, offsets, flat,
                           np.concatenate(stamps))
    assert np.isin(mixed.history_items, unknown).sum() > len(examples) // 2  # most users lose some items
    fast = normalise(user_vectors(model, table, mixed, 8, batch_size=16))
    known = [~np.isin(h, unknown) | (i == alone) for i, h in enumerate(items)]
    kept = [h[k][-8:] for h, k in zip(items, known, strict=True)]
    kept_stamps = [t[k][-8:] for t, k in zip(stamps, known, strict=True)]
    times = torch.from_numpy(time_features(left_pad(kept_stamps, 8).numpy()))
    reference = normalise(model.user_vectors(table, left_pad(kept, 8), times))
    assert np.allclose(fast, reference, atol=1e-5)
    with_zero_rows = normalise(model.user_vectors(table, left_pad([h[-8:] for h in items], 8),
                                                  torch.from_numpy(time_features(left_pad(
                                                      [t[-8:] for t in stamps], 8).numpy()))))
    assert not np.allclose(fast, with_zero_rows, atol=1e-3)  # leaving them out changes the vectors


def test_k_option_takes_several_values():
    # what click hands over for `eval --k 10 50 200 --split valid index=hnsw`
    assert list_option_values(STAGES["eval"], ["50", "200", "index=hnsw"], {"k": ("10",), "split": "valid"}) == (
        ["index=hnsw"], {"k": ("10", "50", "200"), "split": "valid"})
    # without --k a bare value stays where it is, for the config layer to refuse
    assert list_option_values(STAGES["eval"], ["50"], {}) == (["50"], {})
    # commands without a list option are untouched
    assert list_option_values(STAGES["recommend"], ["7"], {"k": "5"}) == (["7"], {"k": "5"})
    assert evaluate.EvalConfig(k=(200, 10, 10, 50)).k == (10, 50, 200)


# ---------------------------------------------------------------------------------------------------------------
# The eval command on a trained run (planted data: next item = current + 1)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> dict:
    case = make_cached_run(tmp_path_factory.mktemp("evalrun"))
    conf = cfg.load(stage_two.TrainUserConfig, None, [
        f"data={case['data']}", f"run={case['run']}", "user.init=scratch", "user.name=llama-tiny",
        "train.batch_size=16", "train.max_len=8", "train.num_negatives=16", "train.lr=3e-3", "train.epochs=12",
        "train.patience=30", "train.eval_users=60", "train.log_every=50", "device=cpu"])
    stage_two.run(conf, log=lambda _: None)
    return case


@pytest.mark.slow
def test_eval_command_reports_metrics_protocol_and_ranks(trained_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run["run"], run)
    done = run_cli("eval", "--k", "1", "5", "10", "--run", str(run), f"data={trained_run['data']}",
                   "--per-user-ranks")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert "test split" in lines[0] and "120 users" in lines[0] and "IndexFlatIP (exact)" in lines[0]
    assert [line.split()[0] for line in lines[2:5]] == ["1", "5", "10"]
    report = json.loads(Path(lines[-1].split()[1]).read_text())
    p = report["protocol"]
    assert report["users"] == 120 and p["items"] == 40 and p["split"] == "test" and p["mask_history"] == "full"
    assert p["model"]["embeddings_version"] == "v-test" and len(p["model"]["fingerprint"]) == 16
    assert p["index"]["reused"] is False and set(report["timings"]) >= {"user_vectors_s", "search_s", "total_s"}
    # the learned pattern beats the popularity floor by far
    assert report["metrics"]["recall@1"] >= report["popularity"]["recall@1"] + 0.3, report
    # anyone can recompute the metrics from the per-user ranks
    ranks = pl.read_parquet(report["ranks_file"])
    assert ranks.columns == ["user_idx", "target_item_idx", "rank", "history_length", "masked_items"]
    recomputed = metrics_from_ranks(ranks["rank"].fill_null(MISS).to_numpy(), (1, 5, 10))
    assert recomputed == pytest.approx(report["metrics"])
    assert Path(lines[-1].split()[1]).with_suffix(".md").is_file()

    again = run_cli("eval", "--k", "1", "5", "10", "--run", str(run), f"data={trained_run['data']}")
    second = json.loads(Path(again.stdout.splitlines()[-1].split()[1]).read_text())
    assert second["protocol"]["index"]["reused"] is True and second["metrics"] == report["metrics"]
    (tmp_path / "eval.yaml").write_text("per_user_ranks: true\nsearch: torch\n")
    with_torch = run_cli("eval", "--k", "1", "5", "10", "--run", str(run), f"data={trained_run['data']}",
                         "--config", str(tmp_path / "eval.yaml"), "--no-per-user-ranks")
    third = json.loads(Path(with_torch.stdout.splitlines()[-1].split()[1]).read_text())
    assert third["protocol"]["index"]["backend"] == "torch" and third["metrics"] == report["metrics"]
    assert third["ranks_file"] is None  # the command line wins over the YAML file


def test_popularity_model_and_approximate_index_through_the_command(trained_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run["run"], run)
    conf = evaluate.EvalConfig(run=run, data=trained_run["data"], k=(1, 10), model="popularity", split="valid")
    pop = evaluate.run(conf, log=lambda _: None)
    counts = np.bincount(UserSequences.load(trained_run["data"]).prefix(2).items, minlength=41)
    examples = eval_examples(UserSequences.load(trained_run["data"]), "valid")
    reference = popularity_ranks(counts, examples.targets, [examples.history(i) for i in range(len(examples))])
    assert pop["metrics"] == pytest.approx(metrics_from_ranks(reference, (1, 10)))
    hnsw = evaluate.run(evaluate.EvalConfig(run=run, data=trained_run["data"], k=(1, 10), index="hnsw"),
                        log=lambda _: None)
    assert hnsw["protocol"]["index"]["type"] == "approximate"
    assert set(hnsw["index_recall"]) == {"recall@1", "recall@10"}
    assert 0.9 <= hnsw["index_recall"]["recall@10"] <= 1.0  # 40 items: HNSW is all but exact
    assert "index recall against exact search" in evaluate.format_table(hnsw)


def test_without_faiss_exact_search_falls_back_to_torch(trained_run, tmp_path, monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(trained_run["run"], run)
    conf = evaluate.EvalConfig(run=run, data=trained_run["data"], k=(1, 10))
    with_faiss = evaluate.run(conf, log=lambda _: None)
    monkeypatch.setattr(evaluate, "import_faiss", lambda: None)
    said = []
    without = evaluate.run(conf, log=said.append)
    assert without["protocol"]["index"]["backend"] == "torch" and any("faiss is not installed" in s for s in said)
    assert without["metrics"] == with_faiss["metrics"]
    with pytest.raises(UserError, match="needs faiss"):
        evaluate.run(evaluate.EvalConfig(run=run, data=trained_run["data"], index="hnsw"), log=lambda _: None)


@pytest.mark.parametrize("args, message", [
    (["--k", "0"], "k=[0]: give one or more positive cut-offs"),
    (["--index", "hnsw", "search=torch"], "search=torch serves exact search only"),
    (["--mask-history", "most"], "mask_history"),
    (["device=gpu"], "device=gpu: use auto, cpu, cuda or cuda:N"),
    (["candidates=new"], "candidates=new ranks the new items of a new-item split, and this data has none"),
    (["--model", "popularity-new"], "model=popularity-new ranks the new items of a new-item split"),
])
def test_bad_eval_settings_are_one_line_errors(trained_run, args, message):
    done = run_cli("eval", "--run", str(trained_run["run"]), f"data={trained_run['data']}", *args)
    assert done.returncode == 2 and message in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_eval_without_a_trained_model_says_what_to_run(tmp_path):
    case = make_cached_run(tmp_path)
    done = run_cli("eval", "--run", str(case["run"]), f"data={case['data']}")
    assert done.returncode == 2 and "make train-user" in done.stderr and "Traceback" not in done.stderr
    done = run_cli("eval", "--run", str(tmp_path / "nowhere"), f"data={case['data']}")
    assert done.returncode == 2 and "make embed-items" in done.stderr


def test_search_benchmark_paths_agree_and_write_json(tmp_path):
    from bench.benchmarks import bench_search

    result = bench_search(tmp_path / "search.json", users=64, items=600, dim=16, k=20, batch_size=16, loop_users=32,
                          log=lambda _: None)
    assert json.loads((tmp_path / "search.json").read_text())["paths"].keys() == {"faiss", "torch", "per_user_loop"}
    for name in ("faiss_vs_per_user_loop", "torch_vs_per_user_loop", "faiss_vs_torch"):
        agreement = result["agreement"][name]
        assert agreement["identical_sets"] == 1.0, (name, agreement)
        assert agreement["identical_rows"] == 1.0 or agreement["max_score_gap_where_different"] < 1e-6


@pytest.mark.slow
def test_validation_while_training_agrees_with_eval_on_the_valid_split(trained_run, tmp_path):
    """The loop's validation and `eval --split valid` batch user vectors and rank the same way: on every user
    they report the same numbers."""
    run = tmp_path / "run"
    shutil.copytree(trained_run["run"], run)
    done = run_cli("eval", "--split", "valid", "--k", "10", "50", "200", "--run", str(run),
                   f"data={trained_run['data']}", "search=torch")
    assert done.returncode == 0, done.stderr
    report = json.loads(Path(done.stdout.splitlines()[-1].split()[1]).read_text())
    table = load_embeddings(run / "embeddings" / "v-test").embeddings
    model, _ = build.load_user_model(run / "user_llm", table)
    seqs = UserSequences.load(trained_run["data"])
    validation = validate(model, seqs, 8, seqs.num_users, seed=0)
    assert validation["users"] == report["users"] == 120
    for key, value in report["metrics"].items():
        assert validation[key] == pytest.approx(value, abs=1e-12), key
    assert validation["popularity"] == pytest.approx(report["popularity"], abs=1e-12)


def test_a_run_finds_the_data_its_stages_recorded(tmp_path):
    """Stage one's record first, then stage two's (a run of ID models has only that one), else run/data."""
    from pipeline.run_dir import RunDir

    run = RunDir(tmp_path / "run")
    assert run.data() == run.root / "data" and run.data(Path("given")) == Path("given")
    (run.stage2).mkdir(parents=True)
    (run.stage2 / "config.yaml").write_text("data: somewhere/two\nitems: id\n")
    assert run.data() == Path("somewhere/two")
    run.item_llm.mkdir(parents=True)
    (run.item_llm / "config.yaml").write_text("data: somewhere/one\n")
    assert run.data() == Path("somewhere/one")
