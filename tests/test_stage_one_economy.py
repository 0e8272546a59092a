"""Stage one's cheaper steps: negatives from a catalogue table, partial depth with kept lower-layer outputs.
(Their exact resume is tested with the official step's, in test_stage_one.py.)"""

from __future__ import annotations

import copy
import json

import numpy as np
import polars as pl
import pytest
import torch
from conftest import make_planted_data, make_tiny_item_model, run_cli

from pipeline import config as cfg
from pipeline.batches import SequenceBatches, make_step_batch, sample_negatives
from pipeline.data.sequences import UserSequences, training_windows
from pipeline.errors import UserError
from pipeline.models import build, sequence_model
from pipeline.models.item_sources import TextItems
from pipeline.models.llm import ItemLLM
from pipeline.models.lower_states import LowerStates
from pipeline.models.sequence_model import SequenceModel
from pipeline.models.tokens import TokenizedCatalogue
from stages import embed_items as stage


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("planted")
    return {"data": make_planted_data(root), "llama": make_tiny_item_model(root / "tiny-llama", "llama"),
            "bert": make_tiny_item_model(root / "tiny-bert", "bert"), "root": root}


def settings(planted, out, *extra: str, kind: str = "bert") -> stage.EmbedItemsConfig:
    base = [f"data={planted['data']}", f"out={out}", f"item.model={planted[kind]}", "user.name=llama-tiny",
            "item.max_text_tokens=16", "item.pooling=mean", "train.batch_size=16", "train.max_len=5",
            "train.num_negatives=16", "train.lr=3e-3", "train.eval_users=120", "train.log_every=50",
            "train.checkpoint_every=1000", "embed.shard_rows=7", "device=cpu"]
    return cfg.load(stage.EmbedItemsConfig, None, base + list(extra))


def quiet(_):
    pass


def item_llm_and_catalogue(planted, kind: str, pooling: str, train_layers: int | None = None):
    torch.manual_seed(0)
    item_llm, tokenizer = build.build_item_llm(str(planted[kind]), "pretrained", pooling, 64, log=quiet,
                                               train_layers=train_layers)
    items = pl.read_parquet(planted["data"] / "items.parquet").sort("item_idx")
    return item_llm, tokenizer, TokenizedCatalogue.build(tokenizer, items["text"].to_list(), 16)


def first_batch(planted, source, seed: int = 0):
    seqs = UserSequences.load(planted["data"])
    batches = SequenceBatches(training_windows(seqs, 5, "chunks"), 16, seed)
    negatives = sample_negatives(seqs.num_items, 16, seed, 0, 0)
    return make_step_batch(source, batches.item_ids(0, 0), negatives, 0, 1)


def loss_and_grads(model: SequenceModel, batch) -> tuple[torch.Tensor, dict]:
    model.zero_grad(set_to_none=True)
    out = model(batch)
    out.loss_per_position.mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.loss_per_position.detach(), grads


# ---- negatives from a catalogue table ------------------------------------------------------------------------


@pytest.mark.parametrize("kind,pooling", [("llama", "item_token"), ("bert", "mean")])
def test_table_refreshed_every_step_gives_todays_loss_and_gradients_with_detached_negatives(planted, monkeypatch,
                                                                                            kind, pooling):
    """Today's path encodes every negative with gradients; the table path encodes only the step's own items, so
    a negative that is not one of them has no gradient (one that is keeps its row's)."""
    item_llm, tokenizer, catalogue = item_llm_and_catalogue(planted, kind, pooling)
    user_llm = build.build_user_llm("llama-tiny", "scratch", log=quiet)
    today = SequenceModel(TextItems(item_llm, catalogue, tokenizer, "right", 64), user_llm)
    table = copy.deepcopy(today)
    table.items = TextItems(table.items.item_llm, catalogue, tokenizer, "right", 64, table_every=1)
    table.items.before_step(0)
    assert table.items.table_age(0) == 0
    batch = first_batch(planted, table.items)
    assert batch.items < first_batch(planted, today.items).items  # the negatives are not encoded

    loss_t, grads_t = loss_and_grads(table, batch)
    loss_full, grads_full = loss_and_grads(today, first_batch(planted, today.items))
    real = sequence_model.nce_loss
    own_items = torch.from_numpy(np.unique(first_batch(planted, today.items).seq_ids.numpy()))

    def detached_unless_own(u, t, ids, negatives, negative_ids, scale):
        own = torch.isin(negative_ids, own_items)[:, None]
        return real(u, t, ids, torch.where(own, negatives, negatives.detach()), negative_ids, scale)

    monkeypatch.setattr(sequence_model, "nce_loss", detached_unless_own)
    loss_d, grads_d = loss_and_grads(today, first_batch(planted, today.items))

    torch.testing.assert_close(loss_t, loss_full, atol=1e-5, rtol=1e-5)
    assert grads_t.keys() == grads_d.keys()
    for name in grads_d:
        torch.testing.assert_close(grads_t[name], grads_d[name], atol=1e-6, rtol=1e-4, msg=name)
    # the negatives' gradient is what the table path leaves out: today's full gradient differs
    assert any(not torch.allclose(grads_full[n], grads_d[n], atol=1e-6) for n in grads_d if "item_llm" in n)


def test_table_is_recomputed_every_n_steps_and_its_age_is_logged(planted, tmp_path):
    conf = settings(planted, tmp_path / "run", "item.negatives=table", "item.table_refresh_every=3",
                    "train.max_steps=7", "train.log_every=1", "train.eval_users=0")
    stage.run(conf, log=quiet)
    lines = [json.loads(line) for line in open(tmp_path / "run" / "stage1" / "metrics.jsonl") if '"loss"' in line]
    assert [line["table_age"] for line in lines] == [0, 1, 2, 0, 1, 2, 0]


# ---- partial depth -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind,pooling", [("llama", "item_token"), ("llama", "mean"), ("bert", "mean")])
def test_partial_depth_with_every_layer_equals_full_fine_tuning(planted, kind, pooling):
    """K = all layers: the same embeddings and the same gradient on every layer as the whole model with its
    embedding module frozen (partial depth leaves it as loaded)."""
    full, _, catalogue = item_llm_and_catalogue(planted, kind, pooling)
    split = ItemLLM(copy.deepcopy(full.backbone), pooling, 64, train_layers=full.backbone.config.num_hidden_layers)
    split.load_state_dict(full.state_dict())
    for name, parameter in full.backbone.named_parameters():  # the embedding module, BERT's positions included
        parameter.requires_grad_(not name.startswith(("embeddings.", "embed_tokens.")))
    chunk = catalogue.chunk(np.array([1, 7, 20, 33]), full.n_item_tokens, "right")
    a, b = full(**chunk), split(**chunk)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    a.pow(2).sum().backward()
    b.pow(2).sum().backward()
    trained_full = {n: p.grad for n, p in full.named_parameters() if p.requires_grad}
    trained_split = {n: p.grad for n, p in split.named_parameters() if p.requires_grad}
    assert trained_full.keys() == trained_split.keys()
    for name, grad in trained_full.items():
        torch.testing.assert_close(grad, trained_split[name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_partial_depth_trains_only_the_top_layers_and_embeds_as_the_whole_model(planted, kind):
    whole, _, catalogue = item_llm_and_catalogue(planted, kind, "mean")
    split = ItemLLM(copy.deepcopy(whole.backbone), "mean", 64, train_layers=1)
    split.load_state_dict(whole.state_dict())
    chunk = catalogue.chunk(np.arange(1, 41), 0, "left")
    torch.testing.assert_close(split(**chunk), whole(**chunk), atol=1e-5, rtol=1e-5)
    trained = {n for n, p in split.named_parameters() if p.requires_grad}
    assert trained and all(".1." in n or n.startswith("proj.") or ".norm." in n or n.startswith("backbone.norm")
                           for n in trained), trained
    assert not any("embed" in n or ".0." in n for n in trained)


def test_partial_depth_beyond_the_model_is_refused(planted):
    with pytest.raises(UserError, match=r"item.train_layers=3: the Item LLM has 2 layers"):
        item_llm_and_catalogue(planted, "llama", "mean", train_layers=3)


@pytest.mark.parametrize("kind,pooling", [("llama", "item_token"), ("bert", "mean")])
def test_kept_lower_outputs_equal_recomputed_ones(planted, tmp_path, kind, pooling):
    item_llm, tokenizer, catalogue = item_llm_and_catalogue(planted, kind, pooling, train_layers=1)
    kept = LowerStates.build(tmp_path, item_llm, catalogue, "right", 64, log=quiet)
    ids = np.array([3, 4, 9, 17, 38])
    with_kept = TextItems(item_llm, catalogue, tokenizer, "right", 64, lower_states=kept)
    recomputed = TextItems(item_llm, catalogue, tokenizer, "right", 64)
    a, b = with_kept(with_kept.prepare(ids)[0]), recomputed(recomputed.prepare(ids)[0])
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(with_kept.table(), recomputed.table(), atol=1e-5, rtol=1e-5)
    # opened again: the same file (checksum checked), not recomputed
    again = LowerStates.build(tmp_path, item_llm, catalogue, "right", 64, log=quiet)
    assert np.array_equal(np.asarray(again.states), np.asarray(kept.states))


def test_damaged_lower_outputs_are_refused_with_one_line(planted, tmp_path):
    extra = ("item.train_layers=1", "train.max_steps=1", "train.eval_users=0")
    stage.run(settings(planted, tmp_path / "run", *extra), log=quiet)
    [kept] = (tmp_path / "run" / "stage1").glob("lower-*.f32")
    data = bytearray(kept.read_bytes())
    data[100] ^= 0xFF
    kept.write_bytes(bytes(data))
    cfg.save(settings(planted, tmp_path / "run", *extra), tmp_path / "conf.yaml")
    done = run_cli("embed-items", "--config", str(tmp_path / "conf.yaml"))
    assert done.returncode == 2, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert "damaged" in last and kept.name in last and "Traceback" not in done.stderr


# ---- both together: learning, exact resume, bad settings ------------------------------------------------------


CHEAP = ("item.negatives=table", "item.table_refresh_every=3", "item.train_layers=1")


def test_cheap_stage_one_learns_the_planted_pattern(planted, tmp_path):
    """Users walk items 1 -> 2 -> 3 ...: table negatives over the whole catalogue and the top layer alone must
    beat popularity clearly."""
    conf = settings(planted, tmp_path / "run", *CHEAP, "train.loss=softmax", "train.epochs=15", "train.patience=20")
    stage.run(conf, log=quiet)
    history = [json.loads(line) for line in open(tmp_path / "run" / "stage1" / "metrics.jsonl") if "valid" in line]
    best = max(h["valid"]["recall@10"] for h in history)
    assert best >= history[0]["valid"]["popularity"]["recall@10"] + 0.3, history[-1]


def test_bad_economy_settings_are_one_line_errors_before_anything_is_written(planted, tmp_path):
    base = [f"data={planted['data']}", f"out={tmp_path / 'o'}", f"item.model={planted['llama']}",
            "user.name=llama-tiny", "item.max_text_tokens=16", "device=cpu"]
    cases = [(["item.train_layers=5"], "item.train_layers=5: the Item LLM has 2 layers"),
             (["item.table_refresh_every=0"], "item.table_refresh_every=0: must be >= 1"),
             (["item.train_layers=0"], "item.train_layers=0: must be >= 1")]
    for extra, message in cases:
        done = run_cli("embed-items", *base, *extra)
        assert done.returncode == 2, done.stderr
        lines = done.stderr.strip().splitlines()
        assert lines[-1].startswith("error: ") and message in lines[-1], done.stderr
        assert "Traceback" not in done.stderr
        assert not (tmp_path / "o").exists()
