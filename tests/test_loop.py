"""The training spine: one loop config with per-stage defaults, extending finished runs, fp16, renamed settings,
the parser's errors, and new item sources trained through the same loop."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import crash_on_call, quiet, run_cli, stage_two_settings
from safetensors.torch import load_file

from pipeline import config as cfg
from pipeline import loop
from pipeline.data.sequences import UserSequences
from pipeline.embeddings.store import load_embeddings
from pipeline.errors import ConfigError, UserError
from pipeline.io import fingerprint
from pipeline.models import build
from pipeline.models.item_sources import CachedItems, IdItems, SumItems
from pipeline.validation import validate
from stages import embed_items as stage_one
from stages import train_user as stage_two

pytestmark = pytest.mark.slow  # trains models: the full tier (make test), not make test-fast


def settings(cached, run: Path, *extra: str) -> stage_two.TrainUserConfig:
    return stage_two_settings(cached, run, "user.name=llama-tiny", "train.eval_users=40", "train.log_every=1", *extra)



def losses(run: Path) -> dict[int, float]:
    return {line["step"]: line["loss"] for line in map(json.loads, open(run / "stage2" / "metrics.jsonl"))
            if "loss" in line}


def resumed_and_straight(cached, tmp_path, first: tuple, later: tuple, before_resume=None) -> tuple[dict, dict, dict]:
    """Losses of a run made with `first`, then resumed with `later` (after `before_resume(state_path)`), and of a
    run made with `later` from the start: (first part, resumed, straight)."""
    stage_two.run(settings(cached, tmp_path / "resumed", *first), log=quiet)
    stopped = losses(tmp_path / "resumed")
    if before_resume is not None:
        before_resume(tmp_path / "resumed" / "stage2" / "state.pt")
    said = []
    stage_two.run(settings(cached, tmp_path / "resumed", *later), log=said.append)
    assert any("resuming" in line for line in said)
    stage_two.run(settings(cached, tmp_path / "straight", *later), log=quiet)
    return stopped, losses(tmp_path / "resumed"), losses(tmp_path / "straight")


def rewrite_saved_settings(path: Path, edit) -> None:
    """Make the state at `path` look as older code wrote it: `edit(settings)` changes its recorded settings."""
    saved = torch.load(path, weights_only=True)
    old = json.loads(saved["settings"])
    edit(old)
    saved["settings"], saved["fingerprint"] = json.dumps(old), fingerprint(old)
    torch.save(saved, path)


def test_a_finished_run_extended_with_more_epochs_matches_the_longer_run(cached, tmp_path):
    """With a fixed schedule length the budget is not part of the run's identity: a finished 2-epoch run resumed
    with epochs=4 continues exactly as a 4-epoch run made from the start."""
    fixed = ("train.schedule_steps=40", "train.patience=10")
    first, extended, straight = resumed_and_straight(cached, tmp_path, (*fixed, "train.epochs=2"),
                                                     (*fixed, "train.epochs=4"))
    assert len(straight) == 2 * len(first) and extended == straight
    for name in ("model.safetensors", "user_head.safetensors"):
        a = load_file(tmp_path / "resumed" / "user_llm" / name)
        b = load_file(tmp_path / "straight" / "user_llm" / name)
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_extending_a_run_whose_schedule_spans_it_is_refused_with_the_reason(cached, tmp_path):
    stage_two.run(settings(cached, tmp_path / "r", "train.epochs=1", "train.eval_users=0"), log=quiet)
    with pytest.raises(UserError, match=r"made with other settings .*train\.epochs: 1 -> 2.*train\.schedule_steps"):
        stage_two.run(settings(cached, tmp_path / "r", "train.epochs=2", "train.eval_users=0"), log=quiet)


def test_a_state_saved_before_a_setting_existed_resumes_at_its_old_value(cached, tmp_path):
    """A state written before user.scale_inputs and train.adam_beta2 existed (its settings lack them) resumes
    while they keep the values that behave as the code did then; other values are refused."""
    run = tmp_path / "old"
    stage_two.run(settings(cached, run, "train.max_steps=2", "train.epochs=3", "train.eval_users=0",
                           "train.schedule_steps=30"), log=quiet)

    def drop_new_settings(old: dict) -> None:
        del old["identity"]["model"]["user"]["scale_inputs"], old["train"]["adam_beta2"]

    rewrite_saved_settings(run / "stage2" / "state.pt", drop_new_settings)
    later = ("train.max_steps=4", "train.epochs=3", "train.eval_users=0", "train.schedule_steps=30")
    with pytest.raises(UserError, match=r"train\.adam_beta2: 0\.999 -> 0\.98"):
        stage_two.run(settings(cached, run, *later, "train.adam_beta2=0.98"), log=quiet)
    said = []
    stage_two.run(settings(cached, run, *later), log=said.append)
    assert any("resuming" in line and "step 2" in line for line in said)


def test_a_run_stopped_early_goes_on_when_resumed_with_more_patience(cached, tmp_path, monkeypatch):
    """Patience only says when to stop: a run that stopped early, resumed with more of it, trains on exactly as a
    run given that patience from the start. Validation is held flat, so every epoch after the first is a bad one;
    the stopped run's state records its patience, as states saved before patience left the run's identity did."""
    real = loop.validate
    monkeypatch.setattr(loop, "validate", lambda *a, **k: {**real(*a, **k), "ndcg@10": 0.1})
    common = ("train.epochs=6", "train.early_stopping_metric=ndcg@10")

    def stopped_by_old_patience(path: Path) -> None:
        saved = torch.load(path, weights_only=True)
        assert saved["state"]["stopped_early"] and saved["state"]["epoch"] == 2
        rewrite_saved_settings(path, lambda old: old["train"].update(patience=1))

    stopped, resumed, straight = resumed_and_straight(cached, tmp_path, (*common, "train.patience=1"),
                                                      (*common, "train.patience=3"), stopped_by_old_patience)
    assert len(straight) == 2 * len(stopped) and resumed == straight
    a, b = (torch.load(tmp_path / run / "stage2" / "state.pt", weights_only=True) for run in ("resumed", "straight"))
    assert a["state"]["epoch"] == b["state"]["epoch"] == 4 and a["state"]["stopped_early"]
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_checkpoint_is_plain_tensors_and_values(cached, tmp_path):
    stage_two.run(settings(cached, tmp_path / "c", "train.max_steps=2", "train.eval_users=0"), log=quiet)
    saved = torch.load(tmp_path / "c" / "stage2" / "state.pt", weights_only=True)
    assert saved["state"]["step"] == 2 and saved["scaler"] is None
    assert set(saved) == {"model", "optimizer", "scheduler", "scaler", "state", "fingerprint", "settings"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU fp16 runs (see the next test)")
def test_fp16_without_a_gpu_is_a_clear_error(cached, tmp_path):
    with pytest.raises(ConfigError, match="fp16 needs a CUDA GPU"):
        stage_two.run(settings(cached, tmp_path / "f", "train.mixed_precision=fp16", "train.max_steps=1"), log=quiet)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 with a gradient scaler needs a CUDA GPU")
def test_fp16_resume_is_exact_on_a_gpu(cached, tmp_path, monkeypatch):
    extra = ("train.mixed_precision=fp16", "train.max_steps=8", "train.checkpoint_every=3", "train.eval_users=0",
             "device=cuda")
    stage_two.run(settings(cached, tmp_path / "a", *extra), log=quiet)
    real = loop.sample_negatives
    monkeypatch.setattr(loop, "sample_negatives", crash_on_call(real, 6))
    with pytest.raises(KeyboardInterrupt):
        stage_two.run(settings(cached, tmp_path / "b", *extra), log=quiet)
    assert torch.load(tmp_path / "b" / "stage2" / "state.pt", weights_only=True)["scaler"] is not None
    monkeypatch.setattr(loop, "sample_negatives", real)
    stage_two.run(settings(cached, tmp_path / "b", *extra), log=quiet)
    assert losses(tmp_path / "a") == losses(tmp_path / "b")


def test_each_stage_lays_its_settings_on_its_own_loop_defaults():
    two = cfg.load(stage_two.TrainUserConfig, None, ["data=d", "run=r", "train.lr=0.5"])
    assert (two.train.lr, two.train.batch_size, two.train.max_len, two.train.num_negatives) == (0.5, 64, 200, 4096)
    one = cfg.load(stage_one.EmbedItemsConfig, None, ["data=d", "out=o", "train.epochs=1"])
    assert (one.train.epochs, one.train.batch_size, one.train.max_len, one.train.lr) == (1, 16, 10, 1e-4)
    assert type(one.train) is type(two.train) and type(one.user) is type(two.user)
    assert "train.max_len (int, default 200)" in cfg.describe(stage_two.TrainUserConfig)
    assert "train.max_len (int, default 10)" in cfg.describe(stage_one.EmbedItemsConfig)


@pytest.mark.parametrize("cls, old, new", [
    (stage_one.EmbedItemsConfig, "model.user_model=x", "use user.name"),
    (stage_one.EmbedItemsConfig, "train.token_budget=8", "use item.token_budget"),
    (stage_two.TrainUserConfig, "model.init=scratch", "use user.init"),
    (stage_two.TrainUserConfig, "model.adapter=true", "use adapter"),
])
def test_old_setting_names_say_the_new_name(cls, old, new, tmp_path):
    with pytest.raises(ConfigError, match=f"setting '{old.split('=')[0]}' was renamed: {new}"):
        cfg.load(cls, None, [old])
    section, _, rest = old.partition(".")
    key, _, value = rest.partition("=")
    (tmp_path / "old.yaml").write_text(f"{section}:\n  {key}: {value}\n")
    with pytest.raises(ConfigError, match=f"in {tmp_path / 'old.yaml'} was renamed: {new}"):
        cfg.load(cls, tmp_path / "old.yaml")


@pytest.mark.parametrize("args, message", [
    (["--k", "abc"], "k: got 'abc'; expected an integer"),
    (["--k"], "Option '--k' requires an argument"),
    (["--bogus"], "No such option '--bogus'"),
    (["--split", "train"], "split: got 'train'; expected one of test, valid"),
    (["bogus=1"], "unknown setting 'bogus'"),
])
def test_parser_errors_are_one_line(args, message):
    done = run_cli("eval", *args)
    assert done.returncode == 2 and message in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr


@pytest.mark.parametrize("args, message", [
    (["bogus"], "No such command 'bogus'"),
    (["bench", "--bogus"], "No such option: --bogus"),
    (["data", "fetch"], "Missing argument 'name'"),
])
def test_errors_of_the_other_commands_are_one_line_too(args, message):
    done = run_cli(*args)
    assert done.returncode == 2 and message in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr


@pytest.mark.parametrize("args, code, expected", [
    ([], 2, "Usage: hllm-pipeline"),  # no command: the help, as a usage error
    (["--help"], 0, "Usage: hllm-pipeline"),
    (["eval", "--help"], 0, "--mask-history"),
    (["train-user", "--help"], 0, "--show-settings"),
    (["train-user", "--show-settings"], 0, "train.num_negatives"),
])
def test_help_and_settings_exit_cleanly(args, code, expected):
    done = run_cli(*args)
    assert done.returncode == code and expected in done.stdout and done.stderr == "", done.stderr


def test_an_old_key_on_the_command_line_names_the_new_one():
    done = run_cli("train-user", "data=d", "run=r", "model.time_embedding=true")
    assert done.returncode == 2 and "setting 'model.time_embedding' was renamed: use user.time_embedding" in \
        done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_cached_text_plus_ids_trains_through_the_same_loop(cached, tmp_path):
    """A new item source is a small addition: the sum of the cached table and a trainable ID table learns the
    planted pattern (next item = current + 1) through the one loop and validation."""
    seqs = UserSequences.load(cached["data"])
    table = load_embeddings(cached["run"] / "embeddings" / "v-test").embeddings
    torch.manual_seed(0)
    user = build.UserModelConfig(name="llama-tiny", init="scratch")
    items = SumItems(CachedItems(table), IdItems(seqs.num_items, table.shape[1]))
    model = build.sequence_model(items, build.user_llm_from(user, log=quiet), user)
    untrained = validate(model, seqs, 8, 120, 0)
    t = loop.LoopConfig(epochs=12, batch_size=16, max_len=8, num_negatives=16, lr=3e-3, eval_users=120,
                        patience=30, log_every=50)
    trained = loop.train(model, seqs, t, tmp_path / "sum", {"test": "sum"}, seed=0, device_name="cpu", resume=False,
                         save_best=build.save_model, load_best=build.load_model_weights, name="sum", log=quiet)
    after = validate(trained, seqs, 8, 120, 0)
    assert after["recall@10"] >= untrained["popularity"]["recall@10"] + 0.3, (after, untrained)
    assert after["recall@10"] >= untrained["recall@10"] + 0.3, (after, untrained)
    ids = items.sources[1].embedding.weight
    assert ids[1:].abs().sum() > 0 and torch.equal(ids[0], torch.zeros_like(ids[0]))
    head = load_file(tmp_path / "sum" / "best" / "user_llm" / "user_head.safetensors")
    assert "items.sources.1.embedding.weight" in head  # the trained ID table is saved with the User LLM


def test_summed_sources_agree_with_adding_their_tables():
    torch.manual_seed(0)
    table = torch.randn(11, 8)
    table[0] = 0
    items = SumItems(CachedItems(table), IdItems(10, 8))
    ids = np.array([3, 1, 7])
    inputs, order, _ = items.prepare(ids)
    rows = items(inputs)
    torch.testing.assert_close(rows, items.table()[torch.from_numpy(ids[order])])
