"""Baselines and recipes in the same harness: item-ID models (SASRec), the loss options, the projection of stage
two, and the candidate set of eval. Planted data: users walk the item cycle, next item = current + 1."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import make_cached_run, run_cli

from pipeline import config as cfg
from pipeline.errors import ConfigError, UserError
from pipeline.models.loss import nce_loss
from pipeline.search import Masked, TorchSearch, masked_topk
from stages import train_user as stage_two

RANDOM_RECALL_AT_5 = 5 / 30  # 40 items, 10 of them the masked history: a random ranking's recall@5


@pytest.fixture(scope="module")
def cached(tmp_path_factory) -> dict:
    return make_cached_run(tmp_path_factory.mktemp("baselines"))


def settings(cached, run: Path, *extra: str) -> stage_two.TrainUserConfig:
    if not run.exists():
        shutil.copytree(cached["run"], run)
    base = [f"data={cached['data']}", f"run={run}", "user.init=scratch", "train.batch_size=16",
            "train.max_len=8", "train.num_negatives=16", "train.lr=3e-3", "train.epochs=12", "train.patience=30",
            "train.eval_users=120", "train.log_every=50", "train.checkpoint_every=1000", "device=cpu"]
    return cfg.load(stage_two.TrainUserConfig, None, base + list(extra))


def evaluate(cached, run: Path, *extra: str) -> dict:
    done = run_cli("eval", "--k", "1", "5", "10", "--run", str(run), f"data={cached['data']}", *extra)
    assert done.returncode == 0, done.stderr
    return json.loads(Path(done.stdout.splitlines()[-1].split()[1]).read_text())


def assert_learned(report: dict) -> None:
    m, floor = report["metrics"], report["popularity"]
    assert m["recall@5"] >= floor["recall@5"] + 0.3, report
    assert m["recall@5"] >= RANDOM_RECALL_AT_5 + 0.3, report


@pytest.mark.parametrize("loss", ["nce", "softmax"])
def test_sasrec_on_item_ids_learns_the_pattern_and_eval_reads_it(cached, tmp_path, loss):
    """SASRec needs no text and no stage one: item-ID embeddings through the same loop, saved as a User LLM that
    eval loads without any cached embeddings."""
    run = tmp_path / "sasrec"
    run.mkdir()
    conf = settings(cached, run, "items=id", "user.name=sasrec", "user.dropout=0.1", f"train.loss={loss}")
    stage_two.run(conf, log=lambda _: None)
    meta = json.loads((run / "user_llm" / "user_llm.json").read_text())
    assert meta["items"] == "id" and meta["model"] == "sasrec" and meta["num_items"] == 40
    report = evaluate(cached, run)
    assert report["protocol"]["model"]["items"] == "id" and report["protocol"]["model"]["embeddings_version"] is None
    assert report["protocol"]["model"]["name"] == "sasrec (stage two)"
    assert report["protocol"]["candidates"] == "all" and report["protocol"]["candidate_items"] == 40
    assert_learned(report)


def test_projection_lets_a_narrow_user_llm_read_wide_embeddings(cached, tmp_path):
    run = tmp_path / "proj"
    with pytest.raises(UserError, match="set user.projection=true"):
        stage_two.run(settings(cached, run, "user.name=llama-tiny", "user.hidden_size=32"), log=lambda _: None)
    conf = settings(cached, run, "user.name=llama-tiny", "user.hidden_size=32", "user.projection=true")
    stage_two.run(conf, log=lambda _: None)
    meta = json.loads((run / "user_llm" / "user_llm.json").read_text())
    assert meta["projection"] is True and json.loads((run / "user_llm" / "config.json").read_text())[
        "hidden_size"] == 32
    assert_learned(evaluate(cached, run))


def test_text_plus_ids_is_a_recipe_of_stage_two(cached, tmp_path):
    run = tmp_path / "sum"
    stage_two.run(settings(cached, run, "items=cached+id", "user.name=llama-tiny"), log=lambda _: None)
    report = evaluate(cached, run)
    assert report["protocol"]["model"]["items"] == "cached+id" and report["protocol"]["model"]["embeddings_version"]
    assert_learned(report)


def test_user_model_shape_settings_are_checked():
    with pytest.raises(ConfigError, match="user.dropout=1.5"):
        cfg.load(stage_two.TrainUserConfig, None, ["data=d", "run=r", "user.init=scratch", "user.dropout=1.5"])
    with pytest.raises(ConfigError, match="with user.init=stage-one the weights fix them"):
        cfg.load(stage_two.TrainUserConfig, None, ["data=d", "run=r", "user.hidden_size=32"])


def reference_loss(user_out, targets, target_ids, negatives, negative_ids, scale) -> torch.Tensor:
    """Per position, written out one at a time: -log softmax of the positive among itself and the negatives
    that are not the target item."""
    out = []
    for p in range(len(user_out)):
        u = user_out[p] / user_out[p].norm()
        logits = [float(u @ targets[p] / targets[p].norm()) * scale]
        logits += [float(u @ n / n.norm()) * scale for n, i in zip(negatives, negative_ids, strict=True)
                   if i != target_ids[p]]
        logits = torch.tensor(logits, dtype=torch.float64)
        out.append(-(logits[0] - torch.logsumexp(logits, 0)))
    return torch.stack(out)


def test_sampled_and_full_softmax_losses_agree_with_a_reference():
    g = torch.Generator().manual_seed(0)
    table = torch.randn(8, 5, generator=g)  # rows 1..7 are items
    user_out = torch.randn(4, 5, generator=g)
    target_ids = torch.tensor([1, 3, 3, 7])
    scale = 7.0
    # sampled: shared negatives with a collision (3) and a repeat (5)
    sampled = torch.tensor([3, 5, 5, 2])
    got = nce_loss(user_out, table[target_ids], target_ids, table[sampled], sampled,
                   torch.tensor(scale).log()).loss_per_position
    want = reference_loss(user_out, table[target_ids], target_ids, table[sampled], sampled, scale)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    # full softmax: every item a negative is exactly cross-entropy over the catalogue
    every = torch.arange(1, 8)
    got = nce_loss(user_out, table[target_ids], target_ids, table[every], every,
                   torch.tensor(scale).log()).loss_per_position
    logits = F.normalize(user_out, dim=-1) @ F.normalize(table[1:], dim=-1).T * scale  # (4, 7)
    torch.testing.assert_close(got, F.cross_entropy(logits, target_ids - 1, reduction="none"))


def test_items_outside_the_candidate_set_are_never_ranked():
    g = torch.Generator().manual_seed(1)
    items = F.normalize(torch.randn(6, 4, generator=g), dim=-1).numpy()
    queries = items[[2, 4]]  # each user's best match is an excluded item
    masked = Masked.from_histories(np.array([0, 1, 2]), np.array([1, 6]), "full").plus(np.array([3, 5]))
    assert masked.counts.tolist() == [3, 3]
    _, top = masked_topk(TorchSearch(items), queries, masked, 3)
    assert not np.isin(top, [3, 5]).any() and 1 not in top[0] and 6 not in top[1]
    assert set(top[0]) == {2, 4, 6} and set(top[1]) == {1, 2, 4}
