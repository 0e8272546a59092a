"""Stage one (`embed-items`): fine-tune the Item LLM end to end with a User LLM on short sequences (the paper's
Stage I), then run it over the whole catalogue into embedding shards.

Writes into `out` (e.g. artifacts/ml-100k):
  stage1/            training run: state.pt (everything needed to resume), metrics.jsonl, config.yaml,
                     best/ (the best checkpoint's Item and User LLM)
  item_llm/          the Item LLM used for the embeddings (fine-tuned best, or the pretrained one)
  user_llm_stage1/   the User LLM trained with it (stage two can start from it)
  embeddings/<version>/  shards + manifest (pipeline.embeddings.store); embeddings/CURRENT names the latest

Runs as one process or under `accelerate launch` (DDP; see stages/configs/accelerate/).
"""

from __future__ import annotations

import hashlib
import json
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import polars as pl
import torch

from pipeline import config as cfg
from pipeline.data.sequences import UserSequences, training_windows
from pipeline.embeddings.encode import Throughput, embed_items
from pipeline.embeddings.store import ShardWriter
from pipeline.errors import ConfigError, UserError
from pipeline.io import fingerprint, folder_sha256, sha256_file, write_text_atomic
from pipeline.loop import (
    LoopTask,
    StepBatch,
    check_loop_settings,
    device_of,
    distributed_state,
    train_loop,
)
from pipeline.models import build
from pipeline.models.hllm import HLLM
from pipeline.models.tokens import TokenizedCatalogue
from pipeline.training import SequenceBatches, make_batch, sample_negatives, to_device, validate


@dataclass(frozen=True)
class ModelConfig:
    item_model: str = "minilm-l6"
    """Item LLM: a preset (minilm-l6, smollm2-135m), a Hugging Face directory, or a hub name."""
    item_init: Literal["pretrained", "scratch"] = "pretrained"
    """pretrained weights, or the same architecture with random weights."""
    pooling: Literal["item_token", "mean"] = "item_token"
    """item_token: the learnable [ITEM] position after the text (official); mean: mean of the text's states."""
    positions: Literal["right", "left"] = "right"
    """Token positions of an item text: right-aligned as the official code (the [ITEM] slot always at
    max_text_tokens), or from 0 (what a frozen encoder saw in pre-training)."""
    max_text_tokens: int = 256
    """Keep the first this many tokens of each item text (special tokens included)."""
    user_model: str = "llama-small"
    """User LLM: a decoder preset (llama-tiny, llama-small, smollm2-135m), directory or hub name."""
    user_init: Literal["pretrained", "scratch"] = "scratch"
    """pretrained weights (paper: better) or random; config-only presets are always scratch."""
    user_layers: int | None = None
    """With user_init=scratch: keep only this many decoder layers of the architecture."""
    attn_implementation: str = "sdpa"
    """Attention kernel for both LLMs: sdpa, eager, or flash_attention_2 where installed."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""

    def __post_init__(self) -> None:
        if self.max_text_tokens < 2:
            raise ConfigError(f"model.max_text_tokens={self.max_text_tokens}: must be >= 2")
        if self.user_layers is not None and self.user_layers < 1:
            raise ConfigError(f"model.user_layers={self.user_layers}: must be >= 1")


@dataclass(frozen=True)
class TrainConfig:
    finetune: bool = True
    """Train end to end before embedding; false embeds with the pretrained Item LLM (quick, much worse)."""
    epochs: int = 5
    """Passes over the training sequences (official: 5)."""
    max_steps: int | None = None
    """Stop after this many optimizer steps (for smoke runs); null runs every epoch."""
    batch_size: int = 16
    """Sequences per optimizer micro-step, over all processes (global)."""
    grad_accum: int = 1
    """Micro-steps per optimizer step."""
    max_len: int = 10
    """User LLM positions per training sequence (official MAX_ITEM_LIST_LENGTH: 10 on PixelRec, 50 on Books)."""
    chunking: Literal["last", "chunks"] = "chunks"
    """last: each user's most recent max_len+1 training items; chunks: the official non-overlapping chunks."""
    num_negatives: int = 512
    """Negatives per micro-step, shared by every position of every sequence (global count)."""
    lr: float = 1e-4
    """Peak learning rate of AdamW (official 1e-4)."""
    weight_decay: float = 0.01
    """AdamW weight decay (official 0.01)."""
    warmup_ratio: float = 0.1
    """Fraction of steps of linear warm-up before the cosine decay."""
    token_budget: int = 16384
    """Item tokens per Item LLM forward chunk (batch rows x longest text)."""
    eval_users: int = 1000
    """Users sampled (fixed) for the validation metrics after each epoch; 0 turns validation off."""
    early_stopping_metric: str = "ndcg@200"
    """Validation metric that picks the best epoch."""
    patience: int = 2
    """Stop after this many epochs without improvement."""
    checkpoint_every: int = 200
    """Save the resumable state every this many optimizer steps (and after each epoch)."""
    log_every: int = 10
    """Write a metrics line every this many optimizer steps."""
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    """auto: bf16 on GPU, none on CPU."""
    peak_tflops: float | None = None
    """Accelerator peak for the MFU in the log (e.g. 989 for an H100 in bf16); null leaves MFU out."""
    tensorboard: bool = False
    """Also write the metrics as TensorBoard scalars under stage1/tensorboard (needs `pip install tensorboard`)."""

    def __post_init__(self) -> None:
        check_loop_settings(self, positive=("max_len", "num_negatives", "token_budget"))


@dataclass(frozen=True)
class EmbedConfig:
    shard_rows: int = 100_000
    """Items per shard."""
    format: Literal["safetensors", "parquet"] = "safetensors"
    """Shard file format."""
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    """Stored precision of the embeddings."""
    token_budget: int = 32768
    """Item tokens per forward batch (batch rows x longest text)."""
    version: str | None = None
    """Name of the embeddings version; null derives one from the model and data fingerprints."""

    def __post_init__(self) -> None:
        if self.shard_rows < 1 or self.token_budget < 1:
            raise ConfigError("embed.shard_rows and embed.token_budget must be >= 1")
        if self.format == "parquet" and self.dtype == "bfloat16":
            raise ConfigError("embed.dtype=bfloat16: Parquet has no bfloat16; use float16 or float32, or "
                              "embed.format=safetensors")


@dataclass(frozen=True)
class EmbedItemsConfig:
    data: Path
    """Folder of the canonical tables (from `data prepare`), e.g. artifacts/ml-100k/data."""
    out: Path
    """Run folder, e.g. artifacts/ml-100k (stage1/, item_llm/, embeddings/ go inside)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The Item and User LLMs."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """End-to-end fine-tuning."""
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    """The embedding job over the catalogue."""
    seed: int = 42
    """Seed of every random choice (initialisation, data order, negatives, dropout)."""
    device: str = "auto"
    """auto (cuda when available), cpu or cuda."""
    resume: bool = True
    """Continue from stage1/state.pt when it exists and was made with the same settings."""


# ---------------------------------------------------------------------------------------------------------------


def _load_data(data: Path) -> tuple[UserSequences, pl.DataFrame]:
    seqs = UserSequences.load(data)
    items = pl.read_parquet(data / "items.parquet", columns=["item_idx", "text", "text_sha256"]).sort("item_idx")
    if items["item_idx"].to_list() != list(range(1, items.height + 1)):
        raise UserError(f"{data / 'items.parquet'}: item_idx must run 1..N; re-run `data prepare`")
    return seqs, items


def train(config: EmbedItemsConfig, model: HLLM, catalogue: TokenizedCatalogue, seqs: UserSequences,
          tokenizer, log=print) -> HLLM:
    """End-to-end training of both LLMs on short sequences (pipeline.loop); returns the best epoch's model."""
    t, m = config.train, config.model
    run_dir = config.out / "stage1"
    windows = training_windows(seqs, t.max_len, t.chunking)
    if len(windows) == 0:
        raise UserError(f"{config.data}: no training sequence has two items; nothing to train on")
    batches = SequenceBatches(windows, t.batch_size, config.seed)
    n_slots = model.item_llm.n_item_tokens

    def make_step_batch(epoch: int, index: int, step: int, micro: int, rank: int, world: int) -> StepBatch:
        seq_ids = batches.item_ids(epoch, index, rank, world)
        negatives = t.num_negatives + (-t.num_negatives) % world  # every process encodes an equal share
        negs = sample_negatives(catalogue.num_items, negatives, config.seed, step, micro)
        batch = make_batch(seq_ids, negs, rank, world, catalogue, n_slots, m.positions, t.token_budget)
        positions = int(((seq_ids[:, :-1] > 0) & (seq_ids[:, 1:] > 0)).sum())
        return StepBatch(to_device(batch, next(model.parameters()).device), positions, batch["n_unique"],
                         batch["n_tokens"])

    def validate_model(unwrapped: HLLM) -> dict:
        return validate(unwrapped, catalogue, seqs, t.max_len, t.eval_users, config.seed, t.token_budget,
                        m.positions)

    def save_best(unwrapped: HLLM) -> None:
        build.save_item_llm(unwrapped.item_llm, tokenizer, run_dir / "best" / "item_llm", _item_meta(config))
        build.save_user_llm(unwrapped.user_llm, run_dir / "best" / "user_llm",
                            {"source": "stage one", "logit_scale": unwrapped.logit_scale.item()})

    def load_best(unwrapped: HLLM) -> None:
        best = build.load_item_llm(run_dir / "best" / "item_llm", m.attn_implementation)[0]
        unwrapped.item_llm.load_state_dict(best.state_dict())
        unwrapped.user_llm.load_state_dict(build.load_user_llm(run_dir / "best" / "user_llm").state_dict())
        scale = json.loads((run_dir / "best" / "user_llm" / "user_llm.json").read_text())["logit_scale"]
        with torch.no_grad():
            unwrapped.logit_scale.fill_(scale)

    # FLOPs ~ 6 x (weights a token passes through) x tokens, embedding tables excluded
    item_params = sum(p.numel() for n, p in model.item_llm.named_parameters() if "embed" not in n)
    user_params = sum(p.numel() for n, p in model.user_llm.named_parameters() if "embed" not in n)
    task = LoopTask(
        num_batches=len(batches), make_batch=make_step_batch,
        validate=validate_model if t.eval_users > 0 else None, save_best=save_best, load_best=load_best,
        flops=lambda items, tokens, positions: 6 * (item_params * tokens + user_params * positions),
        summary=f"stage one: {len(windows):,} training sequences, {len(batches)} batches of {t.batch_size} per "
                f"epoch, {t.num_negatives} shared negatives")
    if config.model.gradient_checkpointing:
        for backbone in (model.item_llm.backbone, model.user_llm.backbone):
            backbone.gradient_checkpointing_enable()
    run_dir.mkdir(parents=True, exist_ok=True)
    if distributed_state(device_of(config.device)).is_main_process:
        cfg.save(config, run_dir / "config.yaml")
    identity = {"model": cfg.to_dict(config.model), "interactions": sha256_file(config.data / "interactions.parquet"),
                "items": sha256_file(config.data / "items.parquet")}
    return train_loop(model, task, t, run_dir, identity, config.seed, config.device, config.resume, log=log)


def _item_meta(config: EmbedItemsConfig) -> dict:
    m = config.model
    return {"source_model": m.item_model, "positions": m.positions, "max_text_tokens": m.max_text_tokens}


def embed_catalogue(config: EmbedItemsConfig, item_llm, catalogue: TokenizedCatalogue, items: pl.DataFrame,
                    log=print) -> Path:
    """Run the Item LLM over every catalogue item into embeddings/<version>/ (resumable, manifest last)."""
    e, m = config.embed, config.model
    model_fp = folder_sha256(config.out / "item_llm")
    data_fp = hashlib.sha256("".join(items["text_sha256"].to_list()).encode()).hexdigest()
    identity = {"model_fingerprint": model_fp, "data_fingerprint": data_fp, "max_text_tokens": m.max_text_tokens,
                   "pooling": m.pooling, "positions": m.positions, "shard_rows": e.shard_rows, "format": e.format,
                   "dtype": e.dtype}
    version = e.version or f"v-{fingerprint(identity)[:12]}"
    root = config.out / "embeddings" / version
    if (root / "manifest.json").is_file():
        log(f"embeddings {version} already complete in {root}")
        write_text_atomic(config.out / "embeddings" / "CURRENT", version + "\n")
        return root
    writer = ShardWriter(root, e.format, e.dtype, identity)
    device = next(item_llm.parameters()).device
    autocast = torch.bfloat16 if device.type == "cuda" else None
    n = catalogue.num_items
    n_shards = math.ceil(n / e.shard_rows)
    meter = Throughput()
    from tqdm import tqdm

    bar = tqdm(total=n, unit="item", desc=f"embedding {version}", disable=None)
    item_llm.eval()
    with ThreadPoolExecutor(max_workers=1) as pool:  # writing a shard overlaps the next shard's compute
        pending = None
        for k in range(n_shards):
            idx = np.arange(k * e.shard_rows + 1, min((k + 1) * e.shard_rows, n) + 1)
            if writer.is_done(k):
                bar.update(len(idx))
                continue
            emb = embed_items(item_llm, catalogue, idx, e.token_budget, m.positions, autocast,
                              progress=lambda i, t: (meter(i, t), bar.update(i)))
            if not torch.isfinite(emb).all():
                raise RuntimeError(f"shard {k}: the Item LLM produced NaN or infinite embeddings")
            if pending is not None:
                pending.result()
            pending = pool.submit(writer.write, k, idx, emb)
        if pending is not None:
            pending.result()
    bar.close()
    rates = meter.rates()
    manifest = writer.finish(items, item_llm.dim, {"version": version, "max_item_idx": n, "item_llm":
                                                   str(config.out / "item_llm"), "throughput": rates})
    write_text_atomic(config.out / "embeddings" / "CURRENT", version + "\n")
    log(f"embeddings {version}: {manifest['rows']:,} items x {manifest['dim']} ({e.dtype}, {e.format}) in {root}; "
        f"{rates['items_per_s']:.0f} items/s, {rates['tokens_per_s']:.0f} tokens/s")
    return root


def run(config: EmbedItemsConfig, log=print) -> Path:
    """Stage one: (fine-tune and) embed. Returns the embeddings version folder."""
    torch.manual_seed(config.seed)
    seqs, items = _load_data(config.data)
    m = config.model
    user_llm = build.build_user_llm(m.user_model, m.user_init, m.attn_implementation, m.user_layers, log=log)
    item_llm, tokenizer = build.build_item_llm(m.item_model, m.item_init, m.pooling, user_llm.dim,
                                               m.attn_implementation, m.max_text_tokens, log=log)
    model = HLLM(item_llm, user_llm)
    log(f"tokenizing {items.height:,} item texts (first {m.max_text_tokens} tokens)")
    catalogue = TokenizedCatalogue.build(tokenizer, items["text"].to_list(), m.max_text_tokens)
    device = device_of(config.device)
    if config.train.finetune:
        model = train(config, model, catalogue, seqs, tokenizer, log=log)
    state = distributed_state(device)
    if state.is_main_process:  # the catalogue pass runs once, on the main process
        build.save_item_llm(model.item_llm, tokenizer, config.out / "item_llm", _item_meta(config))
        build.save_user_llm(model.user_llm, config.out / "user_llm_stage1",
                            {"source": "stage one", "logit_scale": model.logit_scale.item(),
                             "max_len": config.train.max_len, "trained": config.train.finetune})
        cfg.save(config, config.out / "item_llm" / "config.yaml")
        embed_catalogue(config, model.item_llm.to(device), catalogue, items, log=log)
    state.wait_for_everyone()
    return config.out / "embeddings" / (config.out / "embeddings" / "CURRENT").read_text().strip()
