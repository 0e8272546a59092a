"""Stage one: the Item LLM, the nce loss, end-to-end training, the embedding job and its store."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
import torch.nn.functional as F
from conftest import REPO, crash_on_call, quiet, run_cli, stage_one_settings
from safetensors.torch import load_file

from pipeline import config as cfg
from pipeline import loop
from pipeline.embeddings import store
from pipeline.embeddings.encode import embed_items, embed_items_reference
from pipeline.errors import UserError
from pipeline.loop import lr_lambda
from pipeline.models import build
from pipeline.models.item_sources import TextItems
from pipeline.models.llm import ItemLLM
from pipeline.models.loss import nce_loss
from pipeline.models.sequence_model import SequenceModel
from pipeline.models.tokens import TokenizedCatalogue
from pipeline.validation import validate
from stages import embed_items as stage

pytestmark = pytest.mark.slow  # trains models: the full tier (make test), not make test-fast

settings = stage_one_settings



def tiny_item_llm(planted, kind: str, pooling: str, out_dim: int | None = None) -> tuple[ItemLLM, TokenizedCatalogue]:
    item_llm, tokenizer = build.build_item_llm(str(planted[kind]), "pretrained", pooling, out_dim or 32, log=quiet)
    items = pl.read_parquet(planted["data"] / "items.parquet").sort("item_idx")
    return item_llm.eval(), TokenizedCatalogue.build(tokenizer, items["text"].to_list(), 16)


# ---- the Item LLM ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_item_token_embedding_is_the_hidden_state_at_the_appended_position(planted, kind):
    """Encode one item alone, unpadded, by hand: its text tokens, then the [ITEM] vector, positions as the official
    code (right-aligned: the slot at max_text_tokens); the batched, padded path must give the same vector."""
    item_llm, catalogue = tiny_item_llm(planted, kind, "item_token")
    items = np.array([1, 5, 9, 33])
    batched = embed_items(item_llm, catalogue, items, token_budget=64)  # several lengths padded together
    for row, item in enumerate(items):
        tokens = torch.from_numpy(catalogue.ids[catalogue.offsets[item]:catalogue.offsets[item + 1]].astype(np.int64))
        with torch.no_grad():
            embeds = item_llm.backbone.get_input_embeddings()(tokens[None])  # (1, n, H)
            embeds = torch.cat([embeds, item_llm.item_token], dim=1)  # (1, n + 1, H)
            first = catalogue.max_text_tokens - len(tokens)
            positions = torch.arange(first, first + len(tokens) + 1)[None]
            hidden = item_llm.backbone(inputs_embeds=embeds, position_ids=positions).last_hidden_state
        torch.testing.assert_close(batched[row], hidden[0, -1], atol=1e-5, rtol=1e-4)
    assert not torch.allclose(batched[0], batched[1])


def test_mean_pooling_is_the_mean_over_text_tokens(planted):
    item_llm, catalogue = tiny_item_llm(planted, "bert", "mean")
    chunk = catalogue.chunk(np.array([2, 3]), n_item_tokens=0)
    with torch.no_grad():
        got = item_llm(**chunk)
        hidden = item_llm.backbone(**chunk).last_hidden_state
    for row in range(2):
        real = chunk["attention_mask"][row].bool()
        torch.testing.assert_close(got[row], hidden[row, real].mean(0))


def test_projection_when_sizes_differ(planted):
    item_llm, catalogue = tiny_item_llm(planted, "llama", "item_token", out_dim=48)
    assert item_llm.proj is not None
    assert embed_items(item_llm, catalogue, np.arange(1, 5)).shape == (4, 48)


@pytest.mark.parametrize("kind, pooling", [("llama", "item_token"), ("bert", "item_token"), ("bert", "mean")])
@pytest.mark.parametrize("alignment", ["right", "left"])
def test_sorted_budget_path_agrees_with_the_padded_reference(planted, kind, pooling, alignment):
    item_llm, catalogue = tiny_item_llm(planted, kind, pooling)
    items = np.array([40, 3, 17, 1, 22, 9, 30, 5, 11])
    fast = embed_items(item_llm, catalogue, items, token_budget=24, alignment=alignment)
    reference = embed_items_reference(item_llm, catalogue, items, batch_size=4, alignment=alignment)
    torch.testing.assert_close(fast, reference, atol=1e-5, rtol=1e-4)
    assert F.cosine_similarity(fast, reference).min() > 0.9999


# ---- the loss ----------------------------------------------------------------------------------------------


def test_nce_loss_by_hand():
    user = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    targets = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    negatives = torch.tensor([[0.0, 1.0], [1.0, 0.0], [-1.0, 0.0]])
    out = nce_loss(user, targets, torch.tensor([7, 7]), negatives, torch.tensor([3, 7, 4]), torch.tensor(0.0))
    # scale 1; row 0: positive cos 1, negatives cos 0, (id 7 = target: masked), -1
    expected0 = -torch.log_softmax(torch.tensor([1.0, 0.0, -1.0]), 0)[0]
    expected1 = -torch.log_softmax(torch.tensor([0.0, 1.0, 0.0]), 0)[0]
    torch.testing.assert_close(out.loss_per_position, torch.stack([expected0, expected1]))
    assert out.surviving_negatives.tolist() == [2, 2]
    assert out.top1_correct.tolist() == [True, False]


def test_collisions_leave_every_gradient_finite():
    torch.manual_seed(0)
    user = torch.randn(6, 8, requires_grad=True)
    targets = torch.randn(6, 8, requires_grad=True)
    scale = torch.tensor(2.0, requires_grad=True)
    ids = torch.tensor([1, 2, 3, 1, 2, 3])
    out = nce_loss(user, targets, ids, targets.detach()[:3], torch.tensor([1, 2, 3]), scale)
    out.loss_per_position.mean().backward()
    for grad in (user.grad, targets.grad, scale.grad):
        assert torch.isfinite(grad).all()
    assert out.surviving_negatives.tolist() == [2] * 6


def test_nce_loss_is_fp32_under_bf16_inputs():
    user = torch.randn(4, 8).to(torch.bfloat16)
    out = nce_loss(user, user, torch.arange(4), user, torch.arange(10, 14), torch.tensor(1.0))
    assert out.loss_per_position.dtype == torch.float32


# ---- models: bad paths and wrong kinds ----------------------------------------------------------------------


def test_encoder_as_user_llm_is_refused(planted):
    with pytest.raises(UserError, match="must be a causal decoder"):
        build.build_user_llm(str(planted["bert"]), "pretrained", log=quiet)


def test_bad_model_settings_are_one_line_errors(planted, tmp_path):
    base = [f"data={planted['data']}", f"out={tmp_path / 'o'}", "user.name=llama-tiny", "device=cpu"]
    cases = [
        (["item.model=/no/such/model"], "not a preset"),
        (["item.model=llama-tiny"], "config-only preset without a tokenizer"),
        ([f"item.model={planted['llama']}", f"user.name={planted['bert']}"], "causal decoder"),
        ([f"item.model={planted['llama']}", "train.batch_size=0"], "train.batch_size=0: must be >= 1"),
        ([f"item.model={planted['llama']}", "item.pooling=cls"], "expected one of item_token, mean"),
        # the cheaper stage-one paths
        ([f"item.model={planted['llama']}", "item.train_layers=5"], "item.train_layers=5: the Item LLM has 2 layers"),
        ([f"item.model={planted['llama']}", "item.train_layers=0"], "item.train_layers=0: must be >= 1"),
        ([f"item.model={planted['llama']}", "item.table_refresh_every=0"], "item.table_refresh_every=0: must be >= 1"),
        ([f"item.model={planted['llama']}", "item.lora_rank=0"], "item.lora_rank=0: must be >= 1"),
        ([f"item.model={planted['llama']}", "item.lora_rank=4", "finetune=false"], "trained by fine-tuning"),
        ([f"item.model={planted['llama']}", "item.lora_rank=4", "item.lora_targets=query,value"],
         "no linear layer of LlamaModel matches"),
    ]
    for extra, message in cases:
        done = run_cli("embed-items", *base, "item.max_text_tokens=16", *extra)
        assert done.returncode == 2, done.stderr
        lines = done.stderr.strip().splitlines()
        assert lines[-1].startswith("error: ") and message in lines[-1], done.stderr
        assert "Traceback" not in done.stderr
        assert not (tmp_path / "o").exists()  # refused before anything was written


# ---- training ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_planted_pattern_is_learned(planted, tmp_path, kind):
    """Users walk items 1 -> 2 -> 3 ...: the trained model must beat the untrained one and popularity."""
    conf = settings(planted, tmp_path / "run", "train.epochs=15", "train.patience=20", kind=kind)
    torch.manual_seed(conf.seed)
    user_llm = build.build_user_llm("llama-tiny", "scratch", log=quiet)
    item_llm, tokenizer = build.build_item_llm(str(planted[kind]), "pretrained", conf.item.pooling, user_llm.dim,
                                               log=quiet)
    seqs, items = stage._load_data(conf.data)
    catalogue = TokenizedCatalogue.build(tokenizer, items["text"].to_list(), 16)
    untrained = validate(SequenceModel(TextItems(item_llm, catalogue, tokenizer, conf.item.positions, 4096), user_llm),
                         seqs, 5, 120, conf.seed)
    stage.run(conf, log=quiet)
    history = [json.loads(line) for line in open(tmp_path / "run" / "stage1" / "metrics.jsonl") if "valid" in line]
    best = max(h["valid"]["recall@10"] for h in history)
    assert best >= untrained["recall@10"] + 0.3, (best, untrained)
    assert best >= untrained["popularity"]["recall@10"] + 0.3, (best, untrained)
    losses = [json.loads(line)["loss"] for line in open(tmp_path / "run" / "stage1" / "metrics.jsonl")
              if '"loss"' in line]
    assert losses[-1] < losses[0] - 0.5
    assert cfg.load(type(conf), tmp_path / "run" / "stage1" / "config.yaml", []) == conf  # the settings beside it


@pytest.mark.parametrize("paths", [(), ("item.negatives=table", "item.table_refresh_every=3", "item.train_layers=1"),
                                   ("item.lora_rank=4",)],
                         ids=["official", "table-negatives-partial-depth", "lora"])
def test_training_resumes_exactly_after_a_crash(planted, tmp_path, monkeypatch, paths):
    """A run killed at step 6 resumes from its step-4 state (with the negative table made at step 3 and the kept
    lower-layer outputs, where used) and ends with the uninterrupted run's weights."""
    extra = (*paths, "train.max_steps=9", "train.checkpoint_every=4", "train.eval_users=0")
    stage.run(settings(planted, tmp_path / "straight", *extra), log=quiet)

    real = loop.make_step_batch
    monkeypatch.setattr(loop, "make_step_batch", crash_on_call(real, 7))
    with pytest.raises(KeyboardInterrupt):
        stage.run(settings(planted, tmp_path / "resumed", *extra), log=quiet)
    saved = torch.load(tmp_path / "resumed" / "stage1" / "state.pt", weights_only=True)
    assert saved["state"]["step"] == 4
    assert int(saved["model"].get("items.table_step", 3)) == 3
    monkeypatch.setattr(loop, "make_step_batch", real)
    stage.run(settings(planted, tmp_path / "resumed", *extra), log=quiet)
    for sub in ("item_llm/backbone/model.safetensors", "item_llm/item_head.safetensors",
                "user_llm_stage1/model.safetensors"):
        a, b = load_file(tmp_path / "straight" / sub), load_file(tmp_path / "resumed" / sub)
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


def test_resume_with_other_settings_is_refused(planted, tmp_path):
    stage.run(settings(planted, tmp_path / "r", "train.max_steps=2", "train.checkpoint_every=1",
                       "train.eval_users=0"), log=quiet)
    with pytest.raises(UserError, match="made with other settings"):
        stage.run(settings(planted, tmp_path / "r", "train.max_steps=2", "train.lr=1e-2", "train.eval_users=0"),
                  log=quiet)


def test_fsdp_launch_is_refused_with_one_line(planted, tmp_path):
    """`accelerate launch` with an FSDP config sets ACCELERATE_USE_FSDP (on CPU it then runs plain DDP)."""
    done = run_cli("embed-items", f"data={planted['data']}", f"out={tmp_path / 'o'}", f"item.model={planted['llama']}",
                   "user.name=llama-tiny", "item.max_text_tokens=16", "device=cpu",
                   env={"ACCELERATE_USE_FSDP": "true"})
    assert done.returncode == 2, done.stderr
    assert "accelerate FSDP is not supported" in done.stderr.strip().splitlines()[-1]
    assert "Traceback" not in done.stderr
    assert not [path for path in (tmp_path / "o").rglob("*") if path.is_file()]


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_two_processes_match_one_process(planted, tmp_path, kind):
    """DDP over two CPU processes (gloo), same global batch, with gradient accumulation (and a short last step
    at the end of the epoch): the two processes stay bit-identical and match a one-process run."""
    script = tmp_path / "launch.py"
    script.write_text(f"""
import os, sys
sys.path.insert(0, {str(REPO)!r})
import torch
from pipeline import config as cfg
from pipeline.runtime import leave_process_group
from stages import embed_items as stage

seen = {{}}
forward = stage.SequenceModel.forward
def remember(self, *args, **kwargs):
    seen["model"] = self
    return forward(self, *args, **kwargs)
stage.SequenceModel.forward = remember
load = stage.build.load_item_llm
def dump_then_load(*args, **kwargs):  # the end of training, before the best checkpoint is reloaded
    if "model" in seen and not seen.get("dumped"):
        torch.save(seen["model"].state_dict(), sys.argv[2] + f"/rank{{os.environ.get('RANK', '0')}}.pt")
        seen["dumped"] = True
    return load(*args, **kwargs)
stage.build.load_item_llm = dump_then_load
stage.run(cfg.load(stage.EmbedItemsConfig, sys.argv[1]), log=lambda _: None)
leave_process_group()
""")
    outs = {}
    for procs in (1, 2):
        out = tmp_path / f"p{procs}"
        conf = settings(planted, out, "train.epochs=1", "train.batch_size=8", "train.grad_accum=2",
                        "train.eval_users=0", "train.lr=3e-4", kind=kind)
        cfg.save(conf, tmp_path / f"p{procs}.yaml")
        out.mkdir()
        env = dict(os.environ, OMP_NUM_THREADS="1")
        done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                               f"--nproc_per_node={procs}", str(script), str(tmp_path / f"p{procs}.yaml"), str(out)],
                              capture_output=True, text=True, env=env, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        outs[procs] = out
    rank0 = torch.load(outs[2] / "rank0.pt", weights_only=True)
    rank1 = torch.load(outs[2] / "rank1.pt", weights_only=True)
    single = torch.load(outs[1] / "rank0.pt", weights_only=True)
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), f"{key} differs between the two processes"
        # float sums in another order: Adam turns a rounding-level gradient difference on a near-zero gradient
        # into at most about one step of size lr (3e-4), so allow that on rare elements; on average they agree
        diff = (rank0[key].float() - single[key].float()).abs()
        assert diff.max() < 3e-4 and diff.mean() < 1e-6, (key, diff.max(), diff.mean())
    before = load_file(planted[kind] / "model.safetensors")
    assert any(not torch.allclose(before[k], rank0[f"items.item_llm.backbone.{k}"]) for k in before
               if f"items.item_llm.backbone.{k}" in rank0), "nothing was trained"


def test_early_stopping_keeps_the_best_epoch(planted, tmp_path, monkeypatch):
    scores = iter([0.5, 0.4, 0.3, 0.9, 0.9])
    real = loop.validate

    def declining(*args, **kwargs):
        metrics = real(*args, **kwargs)
        metrics["ndcg@200"] = next(scores)
        return metrics

    monkeypatch.setattr(loop, "validate", declining)
    out = tmp_path / "es"
    stage.run(settings(planted, out, "train.epochs=5", "train.patience=2", "train.eval_users=20"), log=quiet)
    epochs = [json.loads(line)["epoch"] for line in open(out / "stage1" / "metrics.jsonl") if "valid" in line]
    assert epochs == [0, 1, 2]  # stopped after two epochs without improvement
    last = torch.load(out / "stage1" / "state.pt", weights_only=True)["model"]
    final = load_file(out / "item_llm" / "backbone" / "model.safetensors")
    best = load_file(out / "stage1" / "best" / "item_llm" / "backbone" / "model.safetensors")
    for key in final:
        torch.testing.assert_close(final[key], best[key], rtol=0, atol=0)
    assert any(not torch.allclose(final[k], last[f"items.item_llm.backbone.{k}"]) for k in final)
    assert json.loads((out / "user_llm_stage1" / "user_llm.json").read_text())["logit_scale"] == json.loads(
        (out / "stage1" / "best" / "user_llm" / "user_llm.json").read_text())["logit_scale"]


def test_learning_rate_warms_up_then_decays():
    f = lr_lambda(total=10, warmup=2)
    values = [f(step) for step in range(10)]
    assert values[:2] == [0.5, 1.0] and values[2] == 1.0
    assert all(a > b for a, b in zip(values[2:], values[3:], strict=False)) and values[-1] < 0.1


# ---- the embedding job and the store -------------------------------------------------------------------------


def shard_digests(root: Path) -> dict[str, str]:
    manifest = json.loads((root / "manifest.json").read_text())
    return {s["file"]: s["sha256"] for s in manifest["shards"]}


def test_embeddings_cover_the_catalogue_once_without_nan(planted, tmp_path):
    root = stage.run(settings(planted, tmp_path / "e", "finetune=false"), log=quiet)
    table = store.load_embeddings(root)
    assert table.manifest["rows"] == 40 and table.embeddings.shape == (41, 64)
    assert len(table.manifest["shards"]) == 6  # 40 items in shards of 7
    ids = np.concatenate([load_file(root / s["file"])["item_idx"].numpy() for s in table.manifest["shards"]])
    assert sorted(ids.tolist()) == list(range(1, 41))
    assert torch.isfinite(table.embeddings).all() and table.embeddings[0].abs().sum() == 0
    assert (tmp_path / "e" / "embeddings" / "CURRENT").read_text().strip() == root.name
    indexed = pl.read_parquet(root / "items.parquet").select("item_idx", "item_id", "text_sha256")
    expected = pl.read_parquet(planted["data"] / "items.parquet").select("item_idx", "item_id", "text_sha256")
    assert indexed.sort("item_idx").equals(expected.sort("item_idx"))


def test_corrupt_shard_is_refused(planted, tmp_path):
    root = stage.run(settings(planted, tmp_path / "c", "finetune=false"), log=quiet)
    shard = root / "shard-00002.safetensors"
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(UserError, match="shard-00002.safetensors: checksum does not match"):
        store.load_embeddings(root)


def test_embedding_job_resumes_with_identical_shards(planted, tmp_path, monkeypatch):
    straight = stage.run(settings(planted, tmp_path / "a", "finetune=false"), log=quiet)
    real_write = store.ShardWriter.write

    def die_after_three(self, index, *args):
        if index == 3:
            raise KeyboardInterrupt("killed")
        return real_write(self, index, *args)

    monkeypatch.setattr(store.ShardWriter, "write", die_after_three)
    with pytest.raises(KeyboardInterrupt):
        stage.run(settings(planted, tmp_path / "b", "finetune=false"), log=quiet)
    partial = next(p for p in (tmp_path / "b" / "embeddings").iterdir() if p.is_dir())
    assert not (partial / "manifest.json").exists()  # not visible before it is complete
    assert sorted(p.name for p in partial.glob("shard-*")) == [f"shard-0000{i}.safetensors" for i in range(3)]
    monkeypatch.setattr(store.ShardWriter, "write", real_write)
    written = []
    monkeypatch.setattr(store.ShardWriter, "write", lambda self, index, *a: (written.append(index),
                                                                             real_write(self, index, *a)))
    resumed = stage.run(settings(planted, tmp_path / "b", "finetune=false"), log=quiet)
    assert written == [3, 4, 5]  # only the missing shards were computed
    assert resumed.name == straight.name
    assert shard_digests(resumed) == shard_digests(straight)


def test_duplicate_item_in_two_shards_is_refused(tmp_path):
    writer = store.ShardWriter(tmp_path / "v", "safetensors", "float32", {"model_fingerprint": "x"})
    writer.write(0, np.array([1, 2]), torch.ones(2, 4))
    writer.write(1, np.array([2, 3]), torch.ones(2, 4))
    items = pl.DataFrame({"item_idx": [1, 2, 3], "item_id": ["x", "y", "z"], "text_sha256": ["a", "b", "c"]})
    with pytest.raises(UserError, match="the shards hold 4 rows, the version 3 items"):
        writer.finish(items, 4, {"max_item_idx": 3})
    four = pl.DataFrame({"item_idx": [1, 2, 3, 4], "item_id": list("wxyz"), "text_sha256": list("abcd")})
    writer.finish(four, 4, {"max_item_idx": 4})  # the row count agrees, but item 2 is in both shards
    with pytest.raises(UserError, match="already in another shard"):
        store.load_embeddings(tmp_path / "v")


def test_parquet_shards_hold_the_same_embeddings(planted, tmp_path):
    a = store.load_embeddings(stage.run(settings(planted, tmp_path / "s", "finetune=false"), log=quiet))
    b = store.load_embeddings(stage.run(settings(planted, tmp_path / "p", "finetune=false",
                                                 "embed.format=parquet"), log=quiet))
    torch.testing.assert_close(a.embeddings, b.embeddings)
    c = store.load_embeddings(stage.run(settings(planted, tmp_path / "h", "finetune=false",
                                                 "embed.dtype=float16"), log=quiet))
    assert c.embeddings.dtype == torch.float16
    torch.testing.assert_close(c.embeddings.float(), a.embeddings, atol=1e-2, rtol=1e-2)


def test_embed_mfu_benchmark_runs_and_writes_json(tmp_path):
    done = run_cli("bench", "embed-mfu", "--shape", "tiny", "--out", str(tmp_path / "b.json"), "--text-tokens", "16",
                   "--batch-tokens", "170", "--iterations", "2", "--peak-tflops", "1")
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((tmp_path / "b.json").read_text())
    assert result["items_per_batch"] == 10 and result["tokens_per_s"] > 0 and 0 < result["mfu"] < 1
    assert result["machine"]["cores"] >= 1
    done = run_cli("bench", "embed-mfu", "--shape", "huge")
    assert done.returncode == 2 and "unknown shape 'huge'" in done.stderr


def test_gathering_item_rows_has_a_deterministic_gradient():
    """Stage one gathers each batch's unique item embeddings into sequences with many repeats; the gradient must
    not depend on thread timing (plain indexing's multithreaded backward made runs differ by ~1e-5)."""
    from pipeline.models.sequence_model import gather_rows

    torch.manual_seed(0)
    table = torch.randn(60, 64, requires_grad=True)
    index = torch.randint(0, 60, (64, 21))  # 86,016 elements: over the parallel kernel's threshold
    weights = torch.randn(64, 21, 64)
    grads = []
    for _ in range(30):
        table.grad = None
        rows = gather_rows(table, index)
        (rows * weights).sum().backward()
        grads.append(table.grad.clone())
    assert all(torch.equal(grads[0], g) for g in grads[1:])
    assert torch.allclose(grads[0], torch.zeros_like(table).index_add_(0, index.flatten(), weights.reshape(-1, 64)),
                          atol=1e-4)


def test_validation_table_is_encoded_in_slices_across_processes(planted, tmp_path):
    """Under DDP each process runs the Item LLM over its slice of the catalogue for validation's item table, and
    every process ends with the whole table (the one a single process computes)."""
    script = tmp_path / "table.py"
    script.write_text(f"""
import os, sys
sys.path.insert(0, {str(REPO)!r})
import numpy as np, polars as pl, torch
import torch.distributed as dist
from pipeline.models import build
from pipeline.models.item_sources import TextItems
from pipeline.models.llm import ItemLLM
from pipeline.models.tokens import TokenizedCatalogue
from pipeline.runtime import leave_process_group
if "RANK" in os.environ:
    dist.init_process_group("gloo")
rows = []
forward = ItemLLM.forward
def counted(self, input_ids, *args, **kwargs):
    rows.append(input_ids.shape[0])
    return forward(self, input_ids, *args, **kwargs)
ItemLLM.forward = counted
item_llm, tokenizer = build.build_item_llm({str(planted['bert'])!r}, "pretrained", "mean", 32, log=lambda _: None)
texts = pl.read_parquet({str(planted['data'] / 'items.parquet')!r}).sort("item_idx")["text"].to_list()
source = TextItems(item_llm.eval(), TokenizedCatalogue.build(tokenizer, texts, 16), tokenizer, "right", 4096)
table = source.table()
torch.save({{"table": table, "rows": sum(rows)}}, sys.argv[1] + f"/rank{{os.environ.get('RANK', 'single')}}.pt")
leave_process_group()
""")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for command in ([sys.executable, str(script), str(tmp_path)],
                    [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
                     str(tmp_path)]):
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
    single, *ranks = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in ("single", "0", "1"))
    assert single["rows"] == 40 and [r["rows"] for r in ranks] == [20, 20]
    assert torch.equal(ranks[0]["table"], ranks[1]["table"])
    torch.testing.assert_close(ranks[0]["table"], single["table"], atol=1e-5, rtol=1e-5)
