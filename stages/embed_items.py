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

import contextlib
import hashlib
import json
import math
import time
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
from pipeline.io import atomic_path, sha256_file, write_text_atomic
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

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "grad_accum", "max_len", "num_negatives", "token_budget", "patience",
                     "checkpoint_every", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name}={getattr(self, name)}: must be >= 1")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"train.warmup_ratio={self.warmup_ratio}: must be in [0, 1)")
        name, _, k = self.early_stopping_metric.partition("@")
        if name not in ("ndcg", "recall") or k not in ("10", "50", "200"):
            raise ConfigError(f"train.early_stopping_metric={self.early_stopping_metric}: use ndcg@K or recall@K "
                              "with K one of 10, 50, 200")


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


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={name}: no CUDA device here; use device=cpu")
    return torch.device(name)


def _fingerprint(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _load_data(data: Path) -> tuple[UserSequences, pl.DataFrame]:
    seqs = UserSequences.load(data)
    items = pl.read_parquet(data / "items.parquet", columns=["item_idx", "text", "text_sha256"]).sort("item_idx")
    if items["item_idx"].to_list() != list(range(1, items.height + 1)):
        raise UserError(f"{data / 'items.parquet'}: item_idx must run 1..N; re-run `data prepare`")
    return seqs, items


def _lr_lambda(total: int, warmup: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return f


def train(config: EmbedItemsConfig, model: HLLM, catalogue: TokenizedCatalogue, seqs: UserSequences,
          tokenizer, log=print) -> HLLM:
    """The end-to-end loop: AdamW + warm-up/cosine, shared negatives, validation each epoch, early stopping,
    resumable from stage1/state.pt. Returns the model with the best epoch's weights."""
    from accelerate import Accelerator

    t = config.train
    run_dir = config.out / "stage1"
    device = _device(config.device)
    mixed = t.mixed_precision if t.mixed_precision != "auto" else ("bf16" if device.type == "cuda" else "no")
    accelerator = Accelerator(mixed_precision=mixed, cpu=device.type == "cpu")
    rank, world = accelerator.process_index, accelerator.num_processes
    main = accelerator.is_main_process
    say = log if main else (lambda _: None)

    if t.batch_size % world:
        raise ConfigError(f"train.batch_size={t.batch_size} must be a multiple of the {world} processes")
    windows = training_windows(seqs, t.max_len, t.chunking)
    if len(windows) == 0:
        raise UserError(f"{config.data}: no training sequence has two items; nothing to train on")
    batches = SequenceBatches(windows, t.batch_size, config.seed, rank, world)
    negatives = t.num_negatives + (-t.num_negatives) % world  # every process encodes an equal share
    steps_per_epoch = math.ceil(len(batches) / t.grad_accum)
    total_steps = min(steps_per_epoch * t.epochs, t.max_steps or 10**12)

    if config.model.gradient_checkpointing:
        for backbone in (model.item_llm.backbone, model.user_llm.backbone):
            backbone.gradient_checkpointing_enable()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": t.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=t.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(total_steps, int(t.warmup_ratio *
                                                                                        total_steps)))
    # what decides the trajectory (not how often it is logged or saved)
    trajectory = {k: v for k, v in cfg.to_dict(config.train).items()
                  if k not in ("log_every", "checkpoint_every", "peak_tflops")}
    fingerprint = _fingerprint({"model": cfg.to_dict(config.model), "train": trajectory, "seed": config.seed,
                                "interactions": sha256_file(config.data / "interactions.parquet"),
                                "items": sha256_file(config.data / "items.parquet"), "world": world})
    state = {"step": 0, "epoch": 0, "batch": 0, "best": None, "bad_epochs": 0, "history": [], "done": False}
    state_path = run_dir / "state.pt"
    if config.resume and state_path.is_file():
        saved = torch.load(state_path, map_location="cpu", weights_only=False)
        if saved.get("fingerprint") != fingerprint:
            raise UserError(f"{state_path}: made with other settings or data; delete {run_dir} or set resume=false")
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        state = saved["state"]
        say(f"resuming from {state_path}: epoch {state['epoch']}, step {state['step']}")
    model, optimizer = accelerator.prepare(model, optimizer)
    unwrapped = accelerator.unwrap_model(model)
    gather = None
    if world > 1:
        import torch.distributed.nn.functional as dist_fn

        def gather(t_):
            return torch.cat(dist_fn.all_gather(t_), dim=0)

    def save_state() -> None:
        """All resumable state in one dict (single process and DDP; sharded FSDP/ZeRO state is not covered)."""
        if main:
            payload = {"model": unwrapped.state_dict(), "optimizer": optimizer.state_dict(),
                       "scheduler": scheduler.state_dict(), "state": state, "fingerprint": fingerprint}
            with atomic_path(state_path) as tmp:
                torch.save(payload, tmp)
        accelerator.wait_for_everyone()

    def save_best() -> None:
        if main:
            build.save_item_llm(unwrapped.item_llm, tokenizer, run_dir / "best" / "item_llm", _item_meta(config))
            build.save_user_llm(unwrapped.user_llm, run_dir / "best" / "user_llm",
                                {"source": "stage one", "logit_scale": unwrapped.logit_scale.item()})
        accelerator.wait_for_everyone()

    metrics_path = run_dir / "metrics.jsonl"
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        cfg.save(config, run_dir / "config.yaml")
    n_params = sum(p.numel() for p in unwrapped.parameters())
    # FLOPs per step ~ 6 x (weights a token passes through) x tokens, embedding tables excluded
    item_flop_params = sum(p.numel() for n, p in unwrapped.item_llm.named_parameters() if "embed" not in n)
    user_flop_params = sum(p.numel() for n, p in unwrapped.user_llm.named_parameters() if "embed" not in n)
    say(f"stage one: {len(windows):,} training sequences, {len(batches)} batches of {t.batch_size} per epoch, "
        f"{total_steps} steps, {negatives} shared negatives, {n_params / 1e6:.1f}M parameters, {world} process(es)")

    model.train()
    window_start, items_seen, tokens_seen, positions_seen = time.perf_counter(), 0, 0, 0
    sums = {"loss": 0.0, "surviving": 0.0, "top1": 0.0, "n": 0}
    while not state["done"] and state["epoch"] < t.epochs:
        epoch = state["epoch"]
        while state["batch"] < len(batches) and state["step"] < total_steps:
            step = state["step"]
            n_micro = min(t.grad_accum, len(batches) - state["batch"])  # the epoch's last step may be short
            for micro in range(n_micro):
                index = state["batch"] + micro
                # dropout: a distinct stream per (step, micro-step, process), the same after a resume
                torch.manual_seed(int(np.random.SeedSequence([config.seed, step, micro, rank]).generate_state(1)[0]))
                seq_ids = batches.item_ids(epoch, index)
                negs = sample_negatives(catalogue.num_items, negatives, config.seed, step, micro)
                batch = make_batch(seq_ids, negs, rank, world, catalogue, unwrapped.item_llm.n_item_tokens,
                                   config.model.positions, t.token_budget)
                valid_local = torch.tensor(float(((seq_ids[:, :-1] > 0) & (seq_ids[:, 1:] > 0)).sum()),
                                           device=accelerator.device)
                valid_global = accelerator.reduce(valid_local, reduction="sum") if world > 1 else valid_local
                sync = contextlib.nullcontext() if micro == n_micro - 1 or world == 1 \
                    else accelerator.no_sync(model)
                with sync:
                    out = model(to_device(batch, accelerator.device), gather)
                    # mean over every valid position of the global batch (DDP averages gradients over processes)
                    loss = out.loss_per_position.sum() * world / valid_global.clamp(min=1) / n_micro
                    accelerator.backward(loss)
                sums["loss"] += float(out.loss_per_position.detach().sum())
                sums["surviving"] += float(out.surviving_negatives.float().sum())
                sums["top1"] += float(out.top1_correct.float().sum())
                sums["n"] += int(out.loss_per_position.numel())
                items_seen += batch["n_unique"]
                tokens_seen += batch["n_tokens"]
                positions_seen += int(valid_local.item())
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state["batch"] += n_micro
            state["step"] += 1
            if state["step"] % t.log_every == 0 or state["step"] == total_steps:
                seconds = time.perf_counter() - window_start
                totals = torch.tensor([sums["loss"], sums["surviving"], sums["top1"], sums["n"], items_seen,
                                       tokens_seen, positions_seen], dtype=torch.float64, device=accelerator.device)
                if world > 1:  # the log line describes the global batch, not this process's share
                    totals = accelerator.reduce(totals, reduction="sum")
                loss_sum, surviving, top1, n, items_all, tokens_all, positions_all = totals.tolist()
                line = {"step": state["step"], "epoch": epoch, "loss": loss_sum / max(n, 1),
                        "surviving_negatives": surviving / max(n, 1), "top1_accuracy": top1 / max(n, 1),
                        "lr": scheduler.get_last_lr()[0], "logit_scale": unwrapped.logit_scale.exp().item(),
                        "items_per_s": items_all / seconds, "tokens_per_s": tokens_all / seconds}
                if t.peak_tflops:
                    flops = 6 * (item_flop_params * tokens_all + user_flop_params * positions_all) / seconds
                    line["mfu"] = flops / (t.peak_tflops * 1e12 * world)
                if main:
                    with open(metrics_path, "a") as f:
                        f.write(json.dumps(line) + "\n")
                say(f"step {line['step']}/{total_steps} epoch {epoch} loss {line['loss']:.4f} "
                    f"negatives kept {line['surviving_negatives']:.1f} lr {line['lr']:.2e} "
                    f"{line['items_per_s']:.0f} items/s {line['tokens_per_s']:.0f} tokens/s")
                window_start, items_seen, tokens_seen, positions_seen = time.perf_counter(), 0, 0, 0
                sums = {"loss": 0.0, "surviving": 0.0, "top1": 0.0, "n": 0}
            if state["step"] % t.checkpoint_every == 0:
                save_state()
        # ---- end of epoch (or of max_steps): validate, keep the best, maybe stop
        finished_epoch = state["batch"] >= len(batches)
        if t.eval_users > 0:
            metrics = validate(unwrapped, catalogue, seqs, t.max_len, t.eval_users, config.seed, t.token_budget,
                               config.model.positions)
            score = metrics[t.early_stopping_metric]
            state["history"].append({"epoch": epoch, "step": state["step"], "valid": metrics})
            if main:
                with open(metrics_path, "a") as f:
                    f.write(json.dumps({"epoch": epoch, "step": state["step"], "valid": metrics}) + "\n")
            say(f"epoch {epoch} valid ({metrics['users']} users): recall@10 {metrics['recall@10']:.4f} "
                f"ndcg@10 {metrics['ndcg@10']:.4f} {t.early_stopping_metric} {score:.4f} "
                f"(popularity {metrics['popularity'][t.early_stopping_metric]:.4f})")
            if state["best"] is None or score > state["best"]["score"]:
                state["best"] = {"score": score, "epoch": epoch, "step": state["step"]}
                state["bad_epochs"] = 0
                save_best()
            else:
                state["bad_epochs"] += 1
                if state["bad_epochs"] >= t.patience:
                    say(f"early stopping: no better {t.early_stopping_metric} for {t.patience} epoch(s)")
                    state["done"] = True
        else:
            state["best"] = {"score": None, "epoch": epoch, "step": state["step"]}
            save_best()
        if finished_epoch:
            state["epoch"] += 1
            state["batch"] = 0
        if state["step"] >= total_steps:
            state["done"] = True
        save_state()
    accelerator.wait_for_everyone()
    best = build.load_item_llm(run_dir / "best" / "item_llm", config.model.attn_implementation)[0]
    unwrapped.item_llm.load_state_dict(best.state_dict())
    unwrapped.user_llm.load_state_dict(build.load_user_llm(run_dir / "best" / "user_llm").state_dict())
    best_scale = json.loads((run_dir / "best" / "user_llm" / "user_llm.json").read_text())["logit_scale"]
    with torch.no_grad():
        unwrapped.logit_scale.fill_(best_scale)
    say(f"best epoch {state['best']['epoch']} (step {state['best']['step']})")
    return unwrapped


def _item_meta(config: EmbedItemsConfig) -> dict:
    m = config.model
    return {"source_model": m.item_model, "positions": m.positions, "max_text_tokens": m.max_text_tokens}


def _model_fingerprint(item_dir: Path) -> str:
    """Hash of what decides the embeddings: weights, head, settings and tokenizer (not the run's config.yaml)."""
    digest = hashlib.sha256()
    for path in sorted(item_dir.rglob("*")):
        if path.is_file() and path.name != "config.yaml":
            digest.update(path.relative_to(item_dir).as_posix().encode())
            digest.update(sha256_file(path).encode())
    return digest.hexdigest()


def embed_catalogue(config: EmbedItemsConfig, item_llm, catalogue: TokenizedCatalogue, items: pl.DataFrame,
                    log=print) -> Path:
    """Run the Item LLM over every catalogue item into embeddings/<version>/ (resumable, manifest last)."""
    e, m = config.embed, config.model
    model_fp = _model_fingerprint(config.out / "item_llm")
    data_fp = hashlib.sha256("".join(items["text_sha256"].to_list()).encode()).hexdigest()
    fingerprint = {"model_fingerprint": model_fp, "data_fingerprint": data_fp, "max_text_tokens": m.max_text_tokens,
                   "pooling": m.pooling, "positions": m.positions, "shard_rows": e.shard_rows, "format": e.format,
                   "dtype": e.dtype}
    version = e.version or f"v-{_fingerprint(fingerprint)[:12]}"
    root = config.out / "embeddings" / version
    if (root / "manifest.json").is_file():
        log(f"embeddings {version} already complete in {root}")
        write_text_atomic(config.out / "embeddings" / "CURRENT", version + "\n")
        return root
    writer = ShardWriter(root, e.format, e.dtype, fingerprint)
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
    device = _device(config.device)
    if config.train.finetune:
        model = train(config, model, catalogue, seqs, tokenizer, log=log)
    from accelerate import PartialState

    state = PartialState()
    if state.is_main_process:  # the catalogue pass runs once, on the main process
        build.save_item_llm(model.item_llm, tokenizer, config.out / "item_llm", _item_meta(config))
        build.save_user_llm(model.user_llm, config.out / "user_llm_stage1",
                            {"source": "stage one", "logit_scale": model.logit_scale.item(),
                             "trained": config.train.finetune})
        cfg.save(config, config.out / "item_llm" / "config.yaml")
        embed_catalogue(config, model.item_llm.to(device), catalogue, items, log=log)
    state.wait_for_everyone()
    return config.out / "embeddings" / (config.out / "embeddings" / "CURRENT").read_text().strip()
