"""Stage two (`train-user`): train only the User LLM on the cached item embeddings (the paper's Stage II).

The Item LLM is never loaded: item embeddings come from stage one's shards, so sequences can be long (hundreds
of items) and negatives cost a table lookup. Writes into `run` (stage one's folder, e.g. artifacts/ml-100k):
  stage2/     state.pt (resumable state), metrics.jsonl, config.yaml, best/
  user_llm/   the best User LLM: a Hugging Face directory + user_head.safetensors (time and ID embeddings,
              adapter, logit scale) + user_llm.json + config.yaml
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from pipeline import config as cfg
from pipeline.data.sequences import UserSequences, eval_examples, training_windows
from pipeline.embeddings.store import load_embeddings, version_root
from pipeline.errors import UserError
from pipeline.io import sha256_file
from pipeline.loop import LoopTask, StepBatch, check_loop_settings, device_of, distributed_state, train_loop
from pipeline.metrics import metrics_from_ranks, popularity_ranks, target_ranks
from pipeline.models import build
from pipeline.models.cached import TIME_FIELDS, CachedUserModel, time_features
from pipeline.training import SequenceBatches, left_pad, sample_negatives


@dataclass(frozen=True)
class UserModelConfig:
    init: Literal["stage-one", "pretrained", "scratch"] = "stage-one"
    """stage-one: the User LLM trained with the Item LLM (run/user_llm_stage1); pretrained: `name`'s weights;
    scratch: `name`'s architecture with random weights."""
    name: str = "llama-small"
    """For init=pretrained|scratch: a decoder preset (llama-tiny, llama-small, smollm2-135m), directory or hub
    name. Its hidden size must equal the embedding size."""
    layers: int | None = None
    """With init=scratch: keep only this many decoder layers."""
    attn_implementation: str = "sdpa"
    """sdpa, eager, or flash_attention_2 where installed."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (long sequences on a small GPU)."""
    time_embedding: bool = False
    """Add the paper's timestamp embedding (Algorithm 1) to each position's input."""
    time_precision: Literal["year", "month", "day", "hour", "minute", "second"] = "second"
    """Finest calendar field the time embedding sees."""
    item_id_embedding: bool = False
    """Add a learned item-ID embedding to each position's input (slightly negative in the paper)."""
    adapter: bool = False
    """A small trainable residual MLP on the cached embeddings (inputs, targets and negatives)."""


@dataclass(frozen=True)
class UserTrainConfig:
    epochs: int = 20
    """Passes over the training sequences."""
    max_steps: int | None = None
    """Stop after this many optimizer steps; null runs every epoch."""
    batch_size: int = 64
    """Sequences per micro-step, over all processes."""
    grad_accum: int = 1
    """Micro-steps per optimizer step."""
    max_len: int = 200
    """User LLM positions per training sequence (and the history length at validation)."""
    chunking: Literal["last", "chunks"] = "chunks"
    """last: each user's most recent max_len+1 training items; chunks: non-overlapping chunks of all of them."""
    num_negatives: int = 4096
    """Negatives per micro-step from the cache, shared by every position (global count)."""
    in_batch_negatives: bool = False
    """Also use the batch's other target items as negatives."""
    lr: float = 1e-3
    """Peak AdamW learning rate."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    warmup_ratio: float = 0.1
    """Fraction of steps of linear warm-up before the cosine decay."""
    eval_users: int = 1000
    """Users sampled (fixed) for validation after each epoch; 0 turns validation off."""
    early_stopping_metric: str = "ndcg@200"
    """Validation metric that picks the best epoch (ndcg@K or recall@K, K in 10, 50, 200)."""
    patience: int = 3
    """Stop after this many epochs without improvement."""
    checkpoint_every: int = 500
    """Save the resumable state every this many optimizer steps (and after each epoch)."""
    log_every: int = 20
    """Write a metrics line every this many optimizer steps."""
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    """auto: bf16 on GPU, none on CPU."""
    peak_tflops: float | None = None
    """Accelerator peak for the MFU in the log; null leaves MFU out."""
    tensorboard: bool = False
    """Also write the metrics as TensorBoard scalars under stage2/tensorboard (needs `pip install tensorboard`)."""

    def __post_init__(self) -> None:
        check_loop_settings(self, positive=("max_len", "num_negatives"))


@dataclass(frozen=True)
class TrainUserConfig:
    data: Path
    """Canonical tables (from `data prepare`), e.g. artifacts/ml-100k/data."""
    run: Path
    """Stage one's folder (embeddings/, user_llm_stage1/), e.g. artifacts/ml-100k; stage2/ and user_llm/ go here."""
    embeddings: str | None = None
    """Embeddings version under run/embeddings/; null takes the one named in run/embeddings/CURRENT."""
    model: UserModelConfig = field(default_factory=UserModelConfig)
    """The User LLM and its extra inputs."""
    train: UserTrainConfig = field(default_factory=UserTrainConfig)
    """Training."""
    seed: int = 42
    """Seed of every random choice."""
    device: str = "auto"
    """auto (cuda when available), cpu or cuda."""
    resume: bool = True
    """Continue from stage2/state.pt when it exists and was made with the same settings."""


def embeddings_root(config: TrainUserConfig) -> Path:
    return version_root(config.run, config.embeddings)


def build_model(config: TrainUserConfig, table: torch.Tensor, log=print) -> CachedUserModel:
    m = config.model
    if m.init == "stage-one":
        path = config.run / "user_llm_stage1"
        if not path.is_dir():
            raise UserError(f"{path}: no stage-one User LLM; run stage one or set model.init=scratch|pretrained")
        user_llm = build.load_user_llm(path, m.attn_implementation)
    else:
        user_llm = build.build_user_llm(m.name, m.init, m.attn_implementation, m.layers, log=log)
    if user_llm.dim != table.shape[1]:
        raise UserError(f"the User LLM's hidden size is {user_llm.dim} but the cached embeddings have "
                        f"{table.shape[1]} dimensions; choose a User LLM of that width (or init=stage-one)")
    model = CachedUserModel(table, user_llm, m.time_embedding, m.item_id_embedding, m.adapter)
    if m.init == "stage-one":
        meta = json.loads((config.run / "user_llm_stage1" / "user_llm.json").read_text())
        if "logit_scale" in meta:
            with torch.no_grad():
                model.logit_scale.fill_(meta["logit_scale"])
    return model


def load_user_model(model: CachedUserModel, path: Path) -> None:
    model.user_llm.load_state_dict(build.load_user_llm(path).state_dict())
    build.load_user_head(model, path)


def _times(timestamps: np.ndarray, precision: str) -> torch.Tensor:
    return torch.from_numpy(time_features(timestamps, precision))


@torch.no_grad()
def validate(model: CachedUserModel, seqs: UserSequences, config: TrainUserConfig, split: str = "valid") -> dict:
    """Recall/NDCG of the `split` targets of a fixed user sample (full ranking, full history masked),
    with the popularity baseline on the same users."""
    t, m = config.train, config.model
    was_training = model.training
    model.eval()
    device = model.table.device
    examples = eval_examples(seqs, split)
    rng = np.random.default_rng([config.seed, 104729])
    pick = np.sort(rng.choice(len(examples), size=min(t.eval_users, len(examples)), replace=False))
    histories = [examples.history(i) for i in pick]
    hist_times = [examples.history_timestamps[examples.history_offsets[i]:examples.history_offsets[i + 1]]
                  for i in pick]
    vecs = []
    for start in range(0, len(pick), 256):
        ids = left_pad(histories[start:start + 256], t.max_len).to(device)
        times = _times(left_pad(hist_times[start:start + 256], t.max_len).numpy(), m.time_precision).to(device) \
            if m.time_embedding else None
        vecs.append(model.user_vectors(ids, times).float().cpu())
    table = model.item_table().float().cpu()
    ranks = target_ranks(torch.cat(vecs), table, examples.targets[pick], histories, mode="full")
    counts = np.bincount(seqs.prefix(2).items, minlength=table.shape[0])
    model.train(was_training)
    return {"users": len(pick), **metrics_from_ranks(ranks),
            "popularity": metrics_from_ranks(popularity_ranks(counts, examples.targets[pick], histories))}


def run(config: TrainUserConfig, log=print) -> Path:
    """Stage two: train the User LLM on cached embeddings; returns run/user_llm."""
    t, m = config.train, config.model
    root = embeddings_root(config)
    embeddings = load_embeddings(root)
    seqs = UserSequences.load(config.data)
    if embeddings.embeddings.shape[0] != seqs.num_items + 1:
        raise UserError(f"{root}: holds {embeddings.embeddings.shape[0] - 1} items but {config.data} has "
                        f"{seqs.num_items}; embed this data's catalogue first")
    torch.manual_seed(config.seed)
    device = device_of(config.device)
    model = build_model(config, embeddings.embeddings, log=log).to(device)
    windows = training_windows(seqs, t.max_len, t.chunking)
    if len(windows) == 0:
        raise UserError(f"{config.data}: no training sequence has two items; nothing to train on")
    batches = SequenceBatches(windows, t.batch_size, config.seed)
    run_dir = config.run / "stage2"

    def make_step_batch(epoch: int, index: int, step: int, micro: int, rank: int, world: int) -> StepBatch:
        seq_ids = batches.item_ids(epoch, index, rank, world)
        device_now = model.table.device
        inputs = {"seq_ids": torch.from_numpy(seq_ids).to(device_now),
                  "negative_ids": torch.from_numpy(sample_negatives(seqs.num_items, t.num_negatives, config.seed,
                                                                    step, micro)).to(device_now),
                  "in_batch": t.in_batch_negatives}
        if m.time_embedding:
            inputs["times"] = _times(batches.timestamps(epoch, index, rank, world), m.time_precision).to(device_now)
        positions = int(((seq_ids[:, :-1] > 0) & (seq_ids[:, 1:] > 0)).sum())
        return StepBatch(inputs, positions, items=int((seq_ids > 0).sum()) + t.num_negatives)

    meta = {"source": "stage two", "embeddings": str(root), "init": m.init, "time_embedding": m.time_embedding,
            "time_precision": m.time_precision, "item_id_embedding": m.item_id_embedding, "adapter": m.adapter,
            "max_len": t.max_len}

    def save_best(unwrapped: CachedUserModel) -> None:
        build.save_user_head(unwrapped, run_dir / "best", {**meta, "logit_scale": unwrapped.logit_scale.item()})

    user_params = sum(p.numel() for n, p in model.user_llm.named_parameters() if "embed" not in n)
    task = LoopTask(
        num_batches=len(batches), make_batch=make_step_batch,
        validate=(lambda unwrapped: validate(unwrapped, seqs, config)) if t.eval_users > 0 else None,
        save_best=save_best, load_best=lambda unwrapped: load_user_model(unwrapped, run_dir / "best"),
        flops=lambda items, tokens, positions: 6 * user_params * positions,
        summary=f"stage two: {len(windows):,} training sequences of up to {t.max_len + 1} items, {len(batches)} "
                f"batches of {t.batch_size} per epoch, {t.num_negatives} shared negatives from the cache "
                f"({root.name})")
    if m.gradient_checkpointing:
        model.user_llm.backbone.gradient_checkpointing_enable()
    run_dir.mkdir(parents=True, exist_ok=True)
    if distributed_state(device).is_main_process:
        cfg.save(config, run_dir / "config.yaml")
    identity = {"model": cfg.to_dict(m), "embeddings": json.loads((root / "manifest.json").read_text())["shards"],
                "interactions": sha256_file(config.data / "interactions.parquet")}
    model = train_loop(model, task, t, run_dir, identity, config.seed, config.device, config.resume, log=log)
    out = config.run / "user_llm"
    state = distributed_state(device)
    if state.is_main_process:  # one writer: every process holds the same weights
        build.save_user_head(model, out, {**meta, "logit_scale": model.logit_scale.item(), "time_fields": TIME_FIELDS})
        cfg.save(config, out / "config.yaml")
        log(f"User LLM written to {out}")
    state.wait_for_everyone()
    return out
