"""Stage two: the User LLM on cached item embeddings."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import crash_on_call, quiet, stage_two_settings
from safetensors.torch import load_file

from pipeline import config as cfg
from pipeline import loop
from pipeline.data.sequences import UserSequences
from pipeline.errors import ConfigError, UserError
from pipeline.loop import LoopConfig
from pipeline.models import build
from pipeline.models.sequence_model import SequenceModel, time_features
from pipeline.validation import validate
from stages import train_user as stage

pytestmark = pytest.mark.slow  # trains models: the full tier (make test), not make test-fast


def settings(cached, run: Path, *extra: str) -> stage.TrainUserConfig:
    return stage_two_settings(cached, run, "user.name=llama-tiny", "train.eval_users=120", "train.log_every=5",
                              *extra)



def test_planted_pattern_is_learned_from_cached_embeddings(cached, tmp_path):
    conf = settings(cached, tmp_path / "run", "train.epochs=20", "train.patience=30")
    untrained = validate(_fresh(conf), UserSequences.load(conf.data), conf.train.max_len, conf.train.eval_users,
                         conf.seed)
    stage.run(conf, log=quiet)
    history = [json.loads(line) for line in open(tmp_path / "run" / "stage2" / "metrics.jsonl") if "valid" in line]
    best = max(h["valid"]["recall@10"] for h in history)
    assert best >= untrained["popularity"]["recall@10"] + 0.3, (best, untrained)
    assert best >= untrained["recall@10"] + 0.3, (best, untrained)
    assert (tmp_path / "run" / "user_llm" / "config.json").is_file()
    assert (tmp_path / "run" / "user_llm" / "user_head.safetensors").is_file()


def _fresh(conf: stage.TrainUserConfig) -> SequenceModel:
    from pipeline.embeddings.store import load_embeddings

    torch.manual_seed(conf.seed)
    return stage.build_model(conf, load_embeddings(stage.embeddings_root(conf)).embeddings, log=quiet)


def test_resume_gives_the_same_loss_trajectory(cached, tmp_path, monkeypatch):
    extra = ("train.max_steps=12", "train.checkpoint_every=4", "train.eval_users=0", "train.log_every=1")
    stage.run(settings(cached, tmp_path / "a", *extra), log=quiet)
    real = loop.sample_negatives
    monkeypatch.setattr(loop, "sample_negatives", crash_on_call(real, 8))
    with pytest.raises(KeyboardInterrupt):
        stage.run(settings(cached, tmp_path / "b", *extra), log=quiet)
    monkeypatch.setattr(loop, "sample_negatives", real)
    stage.run(settings(cached, tmp_path / "b", *extra), log=quiet)

    def losses(run: Path) -> list[tuple[int, float]]:
        lines = [json.loads(line) for line in open(run / "stage2" / "metrics.jsonl") if '"loss"' in line]
        return [(line["step"], line["loss"]) for line in lines]

    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert [step for step, _ in a] == list(range(1, 13))
    assert a == b  # the steps after the last state (5-7), logged before the crash, are not in the log twice
    wa, wb = load_file(tmp_path / "a" / "user_llm" / "model.safetensors"), load_file(
        tmp_path / "b" / "user_llm" / "model.safetensors")
    for key in wa:
        assert torch.equal(wa[key], wb[key])


def test_a_refused_resume_leaves_the_run_folder_as_it_was(cached, tmp_path):
    stage.run(settings(cached, tmp_path / "r", "train.max_steps=2", "train.eval_users=0"), log=quiet)
    before = {p.name: p.read_bytes() for p in (tmp_path / "r" / "stage2").iterdir() if p.is_file()}
    assert {"config.yaml", "state.pt", "metrics.jsonl"} <= set(before)
    with pytest.raises(UserError, match="made with other settings or data .*train.lr"):
        stage.run(settings(cached, tmp_path / "r", "train.max_steps=2", "train.eval_users=0", "train.lr=5e-4"),
                  log=quiet)
    after = {p.name: p.read_bytes() for p in (tmp_path / "r" / "stage2").iterdir() if p.is_file()}
    assert after == before  # config.yaml still describes the state beside it


def test_time_and_id_inputs_change_the_output_and_train(cached, tmp_path):
    conf = settings(cached, tmp_path / "t", "user.time_embedding=true", "user.item_id_embedding=true",
                    "train.max_steps=6", "train.eval_users=0")
    model = _fresh(conf).eval()
    ids = torch.tensor([[0, 3, 4, 5]])
    early = torch.from_numpy(time_features(np.array([[0, 1_000_000_000, 1_000_000_100, 1_000_000_200]])))
    late = torch.from_numpy(time_features(np.array([[0, 1_500_000_000, 1_500_000_100, 1_500_000_200]])))
    table = model.items.table()
    assert not torch.allclose(model.user_vectors(table, ids, early), model.user_vectors(table, ids, late))
    other_ids = ids.clone()
    with torch.no_grad():
        model.item_ids.weight[5] += 1.0
    assert not torch.allclose(_fresh(conf).eval().user_vectors(table, ids, early),
                              model.user_vectors(table, other_ids, early))
    before = {k: v.clone() for k, v in _fresh(conf).state_dict().items() if k.startswith(("time.", "item_ids."))}
    stage.run(conf, log=quiet)
    after = load_file(tmp_path / "t" / "user_llm" / "user_head.safetensors")
    assert any(not torch.allclose(before[k], after[k]) for k in before if k.startswith("time."))
    assert any(not torch.allclose(before[k], after[k]) for k in before if k.startswith("item_ids."))


def test_time_features_by_hand():
    fields = time_features(np.array([0, 978300760]))  # 2000-12-31 22:12:40 UTC
    assert fields.tolist() == [[0, 0, 0, 0, 0, 0], [100, 12, 31, 22, 12, 40]]
    assert time_features(np.array([978300760]), "day").tolist() == [[100, 12, 31, 0, 0, 0]]


def test_stage_two_never_builds_the_item_llm(cached, tmp_path, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("stage two built an Item LLM")

    monkeypatch.setattr(build, "build_item_llm", forbidden)
    monkeypatch.setattr(build, "load_item_llm", forbidden)
    monkeypatch.setattr("pipeline.models.llm.ItemLLM.__init__", forbidden)
    stage.run(settings(cached, tmp_path / "n", "train.max_steps=2", "train.eval_users=10"), log=quiet)


def test_adapter_starts_as_identity_and_width_mismatch_is_refused(cached, tmp_path):
    conf = settings(cached, tmp_path / "ad", "adapter=true")
    model = _fresh(conf)
    torch.testing.assert_close(model.items.table(), model.items.cached)
    bad = settings(cached, tmp_path / "w", "user.name=llama-small")
    with pytest.raises(UserError, match="hidden size is 384 but the cached embeddings have 64"):
        stage.run(bad, log=quiet)
    missing = settings(cached, tmp_path / "s", "user.init=stage-one")
    with pytest.raises(UserError, match="no stage-one User LLM"):
        stage.run(missing, log=quiet)


def test_stage_one_user_llm_is_trained_further_only_on_inputs_of_its_scale(cached, tmp_path):
    from pipeline.embeddings.store import load_embeddings

    table = load_embeddings(stage.embeddings_root(settings(cached, tmp_path / "r"))).embeddings
    build.save_user_llm(_fresh(settings(cached, tmp_path / "r", "user.scale_inputs=true")),
                        tmp_path / "r" / "user_llm_stage1", {})
    with pytest.raises(ConfigError, match="user.scale_inputs=true; set user.scale_inputs=true"):
        stage.build_model(settings(cached, tmp_path / "r", "user.init=stage-one"), table, log=quiet)
    further = stage.build_model(settings(cached, tmp_path / "r", "user.init=stage-one", "user.scale_inputs=true"),
                                table, log=quiet)
    assert further.input_scale == pytest.approx(further.user_llm.dim ** 0.5)


def test_train_benchmark_runs_and_writes_json(tmp_path):
    from conftest import run_cli

    done = run_cli("bench", "train", "--shape", "tiny", "--out", str(tmp_path / "t.json"), "--length", "16",
                   "--batch-positions", "64", "--steps", "1")
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((tmp_path / "t.json").read_text())
    assert [(r["length"], r["attn_implementation"]) for r in result["results"]] == [(16, "sdpa"), (16, "eager")]
    assert all(r["tokens_per_s"] > 0 and r["peak_memory_mb"] > 0 for r in result["results"])
    assert set(result["sdpa_speedup_over_eager"]) == {"16"}


def test_two_processes_match_one_process(cached, tmp_path):
    """Stage two under DDP (two CPU processes, gloo): same global batch, same weights as one process."""
    import os
    import subprocess
    import sys

    from conftest import REPO

    script = tmp_path / "launch.py"
    script.write_text("import sys\n"
                      f"sys.path.insert(0, {str(REPO)!r})\n"
                      "from pipeline import config as cfg\n"
                      "from stages import train_user as stage\n"
                      "from pipeline.runtime import leave_process_group\n"
                      "stage.run(cfg.load(stage.TrainUserConfig, sys.argv[1]), log=lambda _: None)\n"
                      "leave_process_group()\n")
    weights = {}
    for procs in (1, 2):
        conf = settings(cached, tmp_path / f"p{procs}", "train.max_steps=6", "train.eval_users=0", "train.lr=3e-4",
                        "user.time_embedding=true")
        cfg.save(conf, tmp_path / f"p{procs}.yaml")
        done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                               f"--nproc_per_node={procs}", str(script), str(tmp_path / f"p{procs}.yaml")],
                              capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"),
                              timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        weights[procs] = {**load_file(tmp_path / f"p{procs}" / "user_llm" / "model.safetensors"),
                          **load_file(tmp_path / f"p{procs}" / "user_llm" / "user_head.safetensors")}
    for key, value in weights[1].items():
        diff = (value.float() - weights[2][key].float()).abs()
        assert diff.max() < 3e-4 and diff.mean() < 1e-6, (key, diff.max(), diff.mean())


def test_tensorboard_log_holds_the_metrics_log_numbers(cached, tmp_path):
    pytest.importorskip("tensorboard", reason="the tensorboard extra is part of the dev install")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "tb"
    stage.run(settings(cached, run, "train.max_steps=10", "train.tensorboard=true"), log=quiet)
    lines = [json.loads(line) for line in open(run / "stage2" / "metrics.jsonl")]
    events = EventAccumulator(str(run / "stage2" / "tensorboard"))
    events.Reload()
    losses = {e.step: e.value for e in events.Scalars("train/loss")}
    assert losses == pytest.approx({line["step"]: line["loss"] for line in lines if "loss" in line}, rel=1e-6)
    valid = [line for line in lines if "valid" in line]
    assert [e.value for e in events.Scalars("valid/ndcg@200")] == pytest.approx(
        [line["valid"]["ndcg@200"] for line in valid], rel=1e-6)


def test_tensorboard_without_the_package_is_a_clear_config_error(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name == "tensorboard":
            raise ImportError("No module named 'tensorboard'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    with pytest.raises(UserError, match="pip install tensorboard"):
        LoopConfig(tensorboard=True)


def test_a_resumed_log_is_cut_back_to_the_state_including_a_torn_last_line(tmp_path):
    from pipeline.tracking import cut_log_after

    log = tmp_path / "metrics.jsonl"
    log.write_text('{"step": 1, "loss": 2.0}\n{"epoch": 0, "step": 2, "valid": {}}\n{"step": 3, "loss": 1.5}\n'
                   '{"step": 4, "lo')
    cut_log_after(log, 2)
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [1, 2]
    cut_log_after(tmp_path / "missing.jsonl", 2)  # nothing to cut
    assert not (tmp_path / "missing.jsonl").exists()
