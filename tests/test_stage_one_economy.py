"""Stage one's cheaper steps: negatives from a catalogue table, partial depth with kept lower-layer outputs, LoRA.
(Their exact resume and bad settings are tested with the official step's, in test_stage_one.py.)"""

from __future__ import annotations

import copy
import functools
import json

import numpy as np
import polars as pl
import pytest
import torch
from conftest import quiet, run_cli, stage_one_settings
from safetensors.torch import load_file

from pipeline import config as cfg
from pipeline.batches import SequenceBatches, make_step_batch, sample_negatives
from pipeline.data.sequences import UserSequences, training_windows
from pipeline.embeddings.encode import embed_items
from pipeline.errors import UserError
from pipeline.models import build, llm, sequence_model
from pipeline.models.item_sources import TextItems
from pipeline.models.llm import ItemLLM
from pipeline.models.lower_states import LowerStates
from pipeline.models.sequence_model import SequenceModel
from pipeline.models.tokens import TokenizedCatalogue
from stages import embed_items as stage

pytestmark = pytest.mark.slow  # trains models: the full tier (make test), not make test-fast

settings = functools.partial(stage_one_settings, kind="bert")



def item_llm_and_catalogue(planted, kind: str, pooling: str, train_layers: int | None = None):
    torch.manual_seed(0)
    item_llm, tokenizer = build.build_item_llm(str(planted[kind]), "pretrained", pooling, 64, log=quiet,
                                               train_layers=train_layers)
    items = pl.read_parquet(planted["data"] / "items.parquet").sort("item_idx")
    return item_llm, tokenizer, TokenizedCatalogue.build(tokenizer, items["text"].to_list(), 16)


def first_batch(planted, source, seed: int = 0):
    seqs = UserSequences.load(planted["data"])
    batches = SequenceBatches(training_windows(seqs, 5, "chunks"), 16, seed)
    negatives = sample_negatives(seqs.trainable_items(), 16, seed, 0, 0)
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


# ---- LoRA ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind,pooling,train_layers", [("llama", "item_token", None), ("bert", "mean", None),
                                                       ("llama", "mean", 1)])
def test_lora_merged_weights_embed_exactly_as_the_unmerged_adapter(planted, tmp_path, kind, pooling, train_layers):
    item_llm, tokenizer, catalogue = item_llm_and_catalogue(planted, kind, pooling, train_layers)
    wrapped = llm.add_lora(item_llm, 4, 8.0)
    assert wrapped > 0
    with torch.no_grad():  # a trained adapter (peft starts B at zero, which would make any merge look right)
        for name, p in item_llm.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.2)
    items = np.arange(1, catalogue.num_items + 1)
    item_llm.eval()
    unmerged = embed_items(item_llm, catalogue, items, 64)
    # saved with its adapters (a checkpoint mid-training): a plain model, loaded without peft
    build.save_item_llm(item_llm, tokenizer, tmp_path / "item_llm", {"train_layers": train_layers})
    loaded, _, _ = build.load_item_llm(tmp_path / "item_llm")
    assert not llm.has_lora(loaded)
    torch.testing.assert_close(embed_items(loaded.eval(), catalogue, items, 64), unmerged, atol=1e-5, rtol=1e-5)
    # merged in place, as stage one does when training ends: the same weights as saved, bit for bit
    llm.merge_lora(item_llm)
    assert item_llm.state_dict().keys() == loaded.state_dict().keys()
    for key, value in item_llm.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
    torch.testing.assert_close(embed_items(item_llm, catalogue, items, 64), unmerged, atol=1e-5, rtol=1e-5)


def test_lora_trains_the_adapters_and_leaves_the_rest_as_loaded(planted, tmp_path):
    """Only the wrapped layers of the top layer change (through their merged adapters); the word embeddings,
    norms and lower layers stay as loaded."""
    stage.run(settings(planted, tmp_path / "run", "item.lora_rank=4", "item.train_layers=1", "train.max_steps=3",
                       "train.eval_users=0", "item.pooling=mean", kind="llama"), log=quiet)
    before = load_file(planted["llama"] / "model.safetensors")
    after = load_file(tmp_path / "run" / "item_llm" / "backbone" / "model.safetensors")
    assert after.keys() == before.keys()  # a plain model: no adapter left
    changed = {key for key in after if not torch.equal(after[key], before[key])}
    assert changed and all(key.startswith("layers.1.") and key.endswith("proj.weight") for key in changed), \
        sorted(changed)


# ---- both together: learning ------------------------------------------------------


TABLE = ("item.negatives=table", "item.table_refresh_every=3")


@pytest.mark.parametrize("cheap", [(*TABLE, "item.train_layers=1", "train.loss=softmax"),
                                   ("item.lora_rank=8", "train.loss=nce")], ids=["table-top-layer", "lora"])
def test_cheap_stage_one_learns_the_planted_pattern(planted, tmp_path, cheap):
    """Users walk items 1 -> 2 -> 3 ...: table negatives over the whole catalogue with the top layer alone, and
    LoRA adapters alone (the official step otherwise), must beat popularity clearly."""
    conf = settings(planted, tmp_path / "run", *cheap, "train.epochs=15", "train.patience=20")
    stage.run(conf, log=quiet)
    history = [json.loads(line) for line in open(tmp_path / "run" / "stage1" / "metrics.jsonl") if "valid" in line]
    best = max(h["valid"]["recall@10"] for h in history)
    assert best >= history[0]["valid"]["popularity"]["recall@10"] + 0.3, history[-1]


def test_stage_one_benchmark_times_every_path_and_writes_json(planted, tmp_path):
    from bench.benchmarks import STAGE_ONE_PATHS, bench_stage_one

    result = bench_stage_one(planted["data"], str(planted["bert"]), tmp_path / "b.json", negatives=(16, 0),
                             batch_size=16, max_len=5, steps=1, log=quiet)
    assert json.loads((tmp_path / "b.json").read_text()) == result and result["complete"]
    rows = {(r["path"], r["negatives"]): r for r in result["results"]}
    assert rows.keys() == {(p, n) for p in STAGE_ONE_PATHS for n in (16, 40)}
    assert "about 20 GB" in rows.pop(("lora-r8", 40))["skipped"]  # LoRA over a whole catalogue: not run
    for (path, n), row in rows.items():
        assert row["seconds_per_step"] > 0 and row["train_flops_per_s"] > 0
        assert (row["table_refresh_seconds"] is not None) == ("table" in path)
        official = rows[("official", n)]
        # a table path encodes only the step's own items: never more than the official step, which adds negatives
        if "table" in path:
            assert row["items_through_item_llm_per_step"] <= official["items_through_item_llm_per_step"]
    assert rows[("official", 40)]["items_through_item_llm_per_step"] == 40  # the whole catalogue, encoded
    assert rows[("official", 16)]["speedup_over_official"] == 1.0


def test_item_lr_is_the_item_llms_own_schedule_and_is_logged(planted, tmp_path):
    stage.run(settings(planted, tmp_path / "run", "item.lr=1e-4", "train.max_steps=3", "train.log_every=1",
                       "train.eval_users=0"), log=quiet)
    lines = [json.loads(line) for line in open(tmp_path / "run" / "stage1" / "metrics.jsonl") if '"loss"' in line]
    assert len(lines) == 3 and lines[0]["lr"] > 0
    for line in lines:  # the same warm-up and cosine, scaled to the Item LLM's peak
        assert line["item_lr"] == pytest.approx(line["lr"] * 1e-4 / 3e-3)


def test_weights_per_token_counts_the_layers_a_training_token_runs_through(planted):
    whole = build.build_item_llm(str(planted["bert"]), "pretrained", "mean", 64, log=quiet)[0]
    top = build.build_item_llm(str(planted["bert"]), "pretrained", "mean", 64, log=quiet, train_layers=1)[0]
    body = sum(p.numel() for n, p in whole.backbone.named_parameters() if "embed" not in n)
    last_block = sum(p.numel() for p in top.split.blocks[-1].parameters())
    assert whole.weights_per_token() == body > last_block == top.weights_per_token()
    assert llm.add_lora(whole, 4, 8.0) > 0
    assert whole.weights_per_token() == body  # the wrapped layers still run whole; the adapters are not counted
