"""The one training loop: a sequence model over user sequences, as a recipe in plain sight.

  setup   accelerate (one process or DDP), AdamW with warm-up and cosine, the checkpoint to resume from
  train   micro-steps of shared-negative batches, gradient accumulation, a log line every `log_every` steps,
          validation after each epoch, the best weights kept, early stopping
  save    the state after every epoch and every `checkpoint_every` steps; at the end the best weights

Everything random is derived from (seed, epoch, step, micro-step, process), never from a generator carried
along, so a run resumed at step s continues exactly as the uninterrupted run would have. Both stages train
through `train`; they differ only in the item source of their model and in their loop settings.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from pipeline.batches import SequenceBatches, make_step_batch, sample_negatives
from pipeline.checkpoint import Checkpoint
from pipeline.data.sequences import UserSequences, training_windows
from pipeline.errors import ConfigError, UserError
from pipeline.models import build
from pipeline.models.sequence_model import SequenceModel
from pipeline.runtime import device_of, distributed_state
from pipeline.tracking import EarlyStopping, MetricsLog, StepWindow, cut_log_after
from pipeline.validation import validate

RANKING_METRICS = ("auc", "gauc")
"""The rankers' validation metrics that can pick the best epoch (higher is better)."""


@dataclass(frozen=True)
class LoopConfig:
    epochs: int = 5
    """Passes over the training sequences."""
    max_steps: int | None = None
    """Stop after this many optimizer steps (smoke runs); null runs every epoch."""
    batch_size: int = 16
    """Sequences per micro-step, over all processes (global)."""
    grad_accum: int = 1
    """Micro-steps per optimizer step."""
    max_len: int = 10
    """User LLM positions per training sequence (and the history length at validation)."""
    chunking: Literal["last", "chunks"] = "chunks"
    """last: each user's most recent max_len+1 training items; chunks: the official non-overlapping chunks of all
    of them."""
    loss: Literal["nce", "softmax"] = "nce"
    """nce: the official sampled softmax over `num_negatives` shared negatives (collisions masked by id);
    softmax: full cross-entropy over the whole catalogue (every item a negative; for ID and cached items, whose
    whole table costs a lookup, not for the Item LLM)."""
    num_negatives: int = 512
    """With loss=nce: negatives per micro-step, shared by every position of every sequence (global count)."""
    in_batch_negatives: bool = False
    """Also use the batch's other target items as negatives."""
    lr: float = 1e-4
    """Peak AdamW learning rate."""
    adam_beta2: float = 0.999
    """AdamW's second-moment decay (the generative-recommenders recipes use 0.98)."""
    weight_decay: float = 0.01
    """AdamW weight decay (not applied to biases, norms and the logit scale)."""
    warmup_ratio: float = 0.1
    """Fraction of the schedule's steps of linear warm-up before the cosine decay."""
    schedule_steps: int | None = None
    """Length of the warm-up + cosine schedule in optimizer steps; null: the run's total steps. Set it to extend a
    finished run later with more epochs or steps (the schedule then does not depend on them); past it the
    learning rate stays 0."""
    eval_users: int = 1000
    """Users sampled (fixed) for validation after each epoch; 0 turns validation off."""
    early_stopping_metric: str = "ndcg@200"
    """Validation metric that picks the best epoch: ndcg@K or recall@K, K in 10, 50, 200; with a new-item split
    `new:ndcg@10` or `warm:ndcg@10` picks it on one kind of target; auc or gauc for a ranker."""
    patience: int = 2
    """Stop after this many epochs without improvement. Resuming a run that stopped early with more patience
    trains on from where it stopped."""
    checkpoint_every: int = 200
    """Save the resumable state every this many optimizer steps (and after each epoch)."""
    log_every: int = 10
    """Write a metrics line every this many optimizer steps."""
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    """auto: bf16 on GPU, none on CPU. fp16 (with a gradient scaler) needs a CUDA GPU."""
    peak_tflops: float | None = None
    """Accelerator peak for the MFU in the log (e.g. 989 for an H100 in bf16); null leaves MFU out."""
    tensorboard: bool = False
    """Also write the metrics as TensorBoard scalars under <run>/tensorboard (needs `pip install tensorboard`)."""

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "grad_accum", "max_len", "num_negatives", "patience",
                     "checkpoint_every", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name}={getattr(self, name)}: must be >= 1")
        for name in ("max_steps", "schedule_steps"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"train.{name}={getattr(self, name)}: must be >= 1, or null")
        if self.eval_users < 0:
            raise ConfigError(f"train.eval_users={self.eval_users}: must be >= 0 (0 turns validation off)")
        if not 0.5 <= self.adam_beta2 < 1:
            raise ConfigError(f"train.adam_beta2={self.adam_beta2}: must be in [0.5, 1) (0.98 or 0.999 are usual)")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"train.warmup_ratio={self.warmup_ratio}: must be in [0, 1)")
        if self.tensorboard:
            try:
                import tensorboard  # noqa: F401  (accelerate's TensorBoard tracker needs it)
            except ImportError:
                raise ConfigError("train.tensorboard=true needs the tensorboard package: pip install tensorboard "
                                  "(or pip install -e '.[tensorboard]'), or set train.tensorboard=false") from None
        if self.loss == "softmax" and self.in_batch_negatives:
            raise ConfigError("train.in_batch_negatives=true adds nothing to train.loss=softmax (every item is a "
                              "negative already) and would count the batch's targets twice; set it to false")
        kind, _, name = self.early_stopping_metric.rpartition(":")
        metric, _, k = name.partition("@")
        ranking = self.early_stopping_metric in RANKING_METRICS
        if not ranking and (metric not in ("ndcg", "recall") or k not in ("10", "50", "200")
                            or kind not in ("", "new", "warm")):
            raise ConfigError(f"train.early_stopping_metric={self.early_stopping_metric}: use ndcg@K or recall@K "
                              "with K one of 10, 50, 200 (new:ndcg@10 or warm:ndcg@10 for one kind of target; auc "
                              "or gauc for a ranker)")

    def trajectory(self) -> dict:
        """The settings that decide the weights after a given step. Logging, saving and patience (when to stop)
        never do; the budget (epochs, max_steps) does only while the schedule spans the whole run (schedule_steps
        null)."""
        skip = {"log_every", "checkpoint_every", "peak_tflops", "tensorboard", "patience"}
        if self.schedule_steps is not None:
            skip |= {"epochs", "max_steps"}
        return {k: v for k, v in asdict(self).items() if k not in skip}


def lr_lambda(total: int, warmup: int):
    """Linear warm-up over `warmup` steps, then cosine decay to 0 at `total`."""
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return f


def _mixed_precision(setting: str, device: torch.device) -> str:
    if setting == "auto":
        return "bf16" if device.type == "cuda" else "no"
    if setting == "fp16" and device.type != "cuda":
        raise ConfigError("train.mixed_precision=fp16 needs a CUDA GPU (on CPU, accelerate would silently run "
                          "fp32); use no or bf16")
    return setting


def make_optimizer(model: SequenceModel, t: LoopConfig) -> torch.optim.Optimizer:
    """AdamW; an item source with its own learning rate (`items.lr`, e.g. a pretrained Item LLM fine-tuned beside
    a User LLM trained from scratch) gets its own parameter groups."""
    parts = [(list(model.parameters()), t.lr)]
    if getattr(model.items, "lr", None) is not None:
        own = {id(p) for p in model.items.parameters()}
        parts = [([p for p in model.parameters() if id(p) not in own], t.lr), (list(model.items.parameters()),
                                                                              model.items.lr)]
    groups = []
    for params, lr in parts:
        groups += [{"params": [p for p in params if p.requires_grad and p.ndim >= 2], "weight_decay": t.weight_decay,
                    "lr": lr},
                   {"params": [p for p in params if p.requires_grad and p.ndim < 2], "weight_decay": 0.0, "lr": lr}]
    return torch.optim.AdamW(groups, lr=t.lr, betas=(0.9, t.adam_beta2))


def _flops_per_work(model: SequenceModel) -> Callable[[dict], float]:
    """Training FLOPs ~ 6 x (weights a token or position passes through) x tokens, embedding tables excluded."""
    text = build.text_source(model)  # only an Item LLM reads tokens
    item_params = text.item_llm.weights_per_token() if text is not None else 0
    user_params = sum(p.numel() for n, p in model.user_llm.named_parameters() if "embed" not in n)
    return lambda w: 6 * (item_params * w["tokens"] + user_params * w["positions"])


@dataclass
class Run:
    """What the loop works with, made by `setup`."""

    accelerator: Any
    model: torch.nn.Module
    """The model as accelerate prepared it (DDP-wrapped under several processes)."""
    unwrapped: SequenceModel
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    checkpoint: Checkpoint
    progress: dict
    """All the loop's resumable progress: step, epoch, batch (in the epoch), best, bad_epochs, stopped_early,
    wall_seconds (training and validation so far, over every resume)."""
    batches: SequenceBatches
    total_steps: int
    num_negatives: int
    """Shared negatives per micro-step (a multiple of the processes where they are embedded in shares)."""
    gather: Callable | None
    """Concatenates every process's rows with their gradients (None with one process)."""
    log: MetricsLog

    def save_state(self) -> None:
        if self.accelerator.is_main_process:
            self.checkpoint.save(self.unwrapped, self.optimizer, self.scheduler, self.accelerator.scaler,
                                 self.progress)
        self.accelerator.wait_for_everyone()


def setup(model: SequenceModel, seqs: UserSequences, t: LoopConfig, run_dir: Path, identity: dict, seed: int,
          device_name: str, resume: bool, say=print, save_config: Callable[[Path], None] | None = None,
          batches: SequenceBatches | None = None) -> Run:
    """accelerate, the batches, AdamW with warm-up + cosine, and the saved state when resuming; `save_config`
    writes the run's settings, once the state beside them is known to match them."""
    from accelerate import Accelerator

    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true"):
        # FSDP2 shards each weight across processes; the checkpoint, the best weights, the negative table and
        # validation read whole weights here (and on CPU accelerate would run plain DDP without a word)
        raise ConfigError("accelerate FSDP is not supported by this training loop (its checkpoints, negative table "
                          "and validation need whole weights); launch with stages/configs/accelerate/ddp.yaml")
    device = device_of(device_name)
    distributed_state(device)
    accelerator = Accelerator(mixed_precision=_mixed_precision(t.mixed_precision, device), cpu=device.type == "cpu",
                              log_with="tensorboard" if t.tensorboard else None, project_dir=run_dir)
    world = accelerator.num_processes
    if t.batch_size % world:
        raise ConfigError(f"train.batch_size={t.batch_size} must be a multiple of the {world} processes")
    limit = model.user_llm.max_positions
    if limit is not None and t.max_len > limit:
        raise ConfigError(f"train.max_len={t.max_len}: the User LLM has {limit} positions; lower train.max_len or "
                          "choose a User LLM with more")
    if ":" in t.early_stopping_metric and not len(seqs.new_items):
        raise ConfigError(f"train.early_stopping_metric={t.early_stopping_metric}: the data has no new-item split "
                          "(data prepare new_item_fraction=...); use a metric without a kind")
    if batches is None:  # the training windows of the sequences (else: given, e.g. a ranker's labelled examples)
        windows = training_windows(seqs, t.max_len, t.chunking)
        if len(windows) == 0:
            raise UserError("no training sequence has two items; nothing to train on")
        batches = SequenceBatches(windows, t.batch_size, seed)
    total_steps = min(math.ceil(len(batches) / t.grad_accum) * t.epochs, t.max_steps or 10**12)
    horizon = t.schedule_steps or total_steps
    optimizer = make_optimizer(model, t)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(horizon, int(t.warmup_ratio * horizon)))
    checkpoint = Checkpoint(run_dir / "state.pt", {"identity": identity, "train": t.trajectory(), "seed": seed,
                                                   "world": world})
    progress = {"step": 0, "epoch": 0, "batch": 0, "best": None, "bad_epochs": 0, "stopped_early": False,
                "wall_seconds": 0.0}
    saved = checkpoint.load() if resume else None
    if save_config is not None and accelerator.is_main_process:  # after load(): a refused resume changes nothing
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(run_dir / "config.yaml")
    if saved is None and accelerator.is_main_process:  # a fresh start: the log of any earlier run goes with it
        (run_dir / "metrics.jsonl").unlink(missing_ok=True)
    if saved is not None:
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        progress = saved["state"]
        # a run that stopped early goes on when resumed with more patience, as if it had had it from the start
        progress["stopped_early"] = progress["bad_epochs"] >= t.patience
        if accelerator.is_main_process:
            cut_log_after(run_dir / "metrics.jsonl", progress["step"])
        say(f"resuming from {checkpoint.path}: epoch {progress['epoch']}, step {progress['step']}")
    prepared, optimizer = accelerator.prepare(model, optimizer)
    if saved is not None and saved["scaler"] is not None and accelerator.scaler is not None:
        accelerator.scaler.load_state_dict(saved["scaler"])
    gather = None
    if world > 1:
        import torch.distributed.nn.functional as dist_fn

        def gather(x):  # every process's rows, with gradients flowing back to their owners
            return torch.cat(dist_fn.all_gather(x), dim=0)

    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
    if t.loss == "softmax" and model.items.shard_negatives:
        raise ConfigError(f"train.loss=softmax would run the {model.items.kind} item source over the whole catalogue "
                          "every step; use train.loss=nce with it")
    negatives = t.num_negatives + (-t.num_negatives) % world if model.items.shard_negatives else t.num_negatives
    return Run(accelerator, prepared, accelerator.unwrap_model(prepared), optimizer, scheduler, checkpoint, progress,
               batches, total_steps, negatives, gather, MetricsLog(run_dir, accelerator, trackers=t.tensorboard))


def train(model: SequenceModel, seqs: UserSequences, t: LoopConfig, run_dir: Path, identity: dict, *, seed: int,
          device_name: str, resume: bool, save_best: Callable[[SequenceModel, Path], None],
          load_best: Callable[[SequenceModel, Path], None], name: str, log=print,
          save_config: Callable[[Path], None] | None = None,
          validation: Callable[[SequenceModel], dict] | None = None,
          batches: SequenceBatches | None = None) -> SequenceModel:
    """Train `model` on the training part of `seqs` as `t` says; returns the unwrapped model with the best
    weights. `identity` names what the run depends on besides `t` (model settings, data checksums): a saved
    state is resumed only when it matches. `save_best`/`load_best` keep the best weights under run_dir/best;
    `save_config` writes the resolved settings to run_dir/config.yaml once the saved state is accepted;
    `validation` replaces the next-item validation (a ranker's AUC); `batches` the training windows of `seqs`
    (a ranker's labelled examples)."""
    say = log if distributed_state(device_of(device_name)).is_main_process else (lambda _: None)
    run = setup(model, seqs, t, run_dir, identity, seed, device_name, resume, say, save_config, batches)
    accelerator, progress, batches, unwrapped = run.accelerator, run.progress, run.batches, run.unwrapped
    rank, world = accelerator.process_index, accelerator.num_processes
    stopping = EarlyStopping(progress, t.patience)
    n_params = sum(p.numel() for p in unwrapped.parameters() if p.requires_grad)
    pool = seqs.trainable_items()  # the items a step may use: no held-out new item
    loss = f"{t.num_negatives} shared negatives" if t.loss == "nce" else f"softmax over {len(pool):,} items"
    if len(seqs.new_items):
        loss += f" ({len(seqs.new_items):,} new items held out)"
    say(f"{name}: {len(batches.windows):,} training sequences of up to {t.max_len + 1} items, {len(batches)} "
        f"batches of {t.batch_size} per epoch, {loss}; {run.total_steps} steps, "
        f"{n_params / 1e6:.1f}M trained parameters, {world} process(es)")

    run.model.train()
    window = StepWindow()
    clock = time.perf_counter()
    while not progress["stopped_early"] and progress["epoch"] < t.epochs and progress["step"] < run.total_steps:
        epoch = progress["epoch"]
        while progress["batch"] < len(batches) and progress["step"] < run.total_steps:
            step = progress["step"]
            unwrapped.items.before_step(step)  # e.g. recompute a negative table that is due
            n_micro = min(t.grad_accum, len(batches) - progress["batch"])  # the epoch's last step may be short
            for micro in range(n_micro):
                # dropout: a distinct stream per (step, micro-step, process), the same after a resume
                torch.manual_seed(int(np.random.SeedSequence([seed, step, micro, rank]).generate_state(1)[0]))
                index = progress["batch"] + micro
                stamps = batches.timestamps(epoch, index, rank, world) if unwrapped.reads_time else None
                negatives = sample_negatives(pool, run.num_negatives, seed, step, micro) \
                    if t.loss == "nce" else pool  # softmax: the whole catalogue (but new items)
                batch = make_step_batch(unwrapped.items, batches.item_ids(epoch, index, rank, world), negatives,
                                        rank, world, stamps,
                                        unwrapped.time_precision if unwrapped.time is not None else None,
                                        t.in_batch_negatives, full_catalogue=t.loss == "softmax",
                                        labels=batches.labels(epoch, index, rank, world)
                                        if batches.labelled else None).to(accelerator.device)
                valid_global = torch.tensor(float(batch.positions), device=accelerator.device)
                if world > 1:
                    valid_global = accelerator.reduce(valid_global, reduction="sum")
                last = micro == n_micro - 1 or world == 1
                with contextlib.nullcontext() if last else accelerator.no_sync(run.model):
                    out = run.model(batch, run.gather)
                    # mean over every valid position of the global batch (DDP averages gradients over processes)
                    loss = out.loss_per_position.sum() * world / valid_global.clamp(min=1) / n_micro
                    accelerator.backward(loss)
                window.add(out, batch)
            run.optimizer.step()
            run.scheduler.step()
            run.optimizer.zero_grad(set_to_none=True)
            progress["batch"] += n_micro
            progress["step"] += 1
            if progress["step"] % t.log_every == 0 or progress["step"] == run.total_steps:
                _log_step(run, window, t, epoch, say)
                window = StepWindow()
            if progress["step"] % t.checkpoint_every == 0:
                run.save_state()
        # ---- end of an epoch (or of max_steps): validate, keep the best, maybe stop, save
        score = None
        metrics = None
        if t.eval_users > 0:
            metrics = validation(unwrapped) if validation is not None else \
                validate(unwrapped, seqs, t.max_len, t.eval_users, seed)
        progress["wall_seconds"] = progress.get("wall_seconds", 0.0) + time.perf_counter() - clock
        clock = time.perf_counter()
        if metrics is not None:
            kind, _, name = t.early_stopping_metric.rpartition(":")
            score = (metrics[kind] if kind else metrics).get(name, float("-inf"))  # a kind without targets: none
            run.log.write({"epoch": epoch, "step": progress["step"], "wall_seconds": round(progress["wall_seconds"], 1),
                           "valid": metrics})
            say(f"epoch {epoch} valid ({metrics['users']} users): {_validation_line(metrics, t, name, score)}")
        if stopping.improved(score, epoch, progress["step"]):
            if accelerator.is_main_process:
                save_best(unwrapped, run_dir / "best")
            accelerator.wait_for_everyone()
        elif stopping.should_stop:
            say(f"early stopping: no better {t.early_stopping_metric} for {t.patience} epoch(s)")
            progress["stopped_early"] = True
        if progress["batch"] >= len(batches):
            progress["epoch"] += 1
            progress["batch"] = 0
        run.save_state()

    accelerator.wait_for_everyone()
    run.log.close()
    load_best(unwrapped, run_dir / "best")
    say(f"best epoch {progress['best']['epoch']} (step {progress['best']['step']})")
    return unwrapped


def _validation_line(metrics: dict, t: LoopConfig, name: str, score: float) -> str:
    if "auc" in metrics:  # a ranker
        return (f"auc {metrics['auc']:.4f} gauc {metrics['gauc']:.4f} log loss {metrics['log_loss']:.4f} "
                f"({metrics['examples']} examples; popularity auc {metrics['popularity']['auc']:.4f})")
    also = f" {t.early_stopping_metric} {score:.4f}" if t.early_stopping_metric not in ("recall@10", "ndcg@10") \
        else ""
    kinds = "".join(f"; {k} targets ({metrics[k]['targets']}) ndcg@10 {metrics[k].get('ndcg@10', 0):.4f}"
                    for k in ("warm", "new") if k in metrics)
    return (f"recall@10 {metrics['recall@10']:.4f} ndcg@10 {metrics['ndcg@10']:.4f}{also} "
            f"(popularity {metrics['popularity'][name]:.4f}){kinds}")


def _log_step(run: Run, window: StepWindow, t: LoopConfig, epoch: int, say) -> None:
    """One metrics line for the steps since the last one, over every process."""
    w, seconds = window.totals(run.accelerator)
    line = {"step": run.progress["step"], "epoch": epoch, "loss": w["loss"] / max(w["n"], 1),
            "surviving_negatives": w["surviving"] / max(w["n"], 1), "top1_accuracy": w["top1"] / max(w["n"], 1),
            "lr": run.scheduler.get_last_lr()[0], "logit_scale": run.unwrapped.logit_scale.exp().item(),
            "items_per_s": w["items"] / seconds, "tokens_per_s": w["tokens"] / seconds,
            "positions_per_s": w["positions"] / seconds}
    if getattr(run.unwrapped.items, "lr", None) is not None:  # make_optimizer: its own groups come last
        line["item_lr"] = run.scheduler.get_last_lr()[-1]
    age = run.unwrapped.items.table_age(run.progress["step"] - 1)
    if age is not None:
        line["table_age"] = age
    if t.peak_tflops:
        peak_flops = t.peak_tflops * 1e12 * run.accelerator.num_processes
        line["mfu"] = _flops_per_work(run.unwrapped)(w) / seconds / peak_flops
    run.log.write(line)
    say(f"step {line['step']}/{run.total_steps} epoch {epoch} loss {line['loss']:.4f} "
        f"negatives kept {line['surviving_negatives']:.1f} lr {line['lr']:.2e} "
        + (f"item lr {line['item_lr']:.2e} " if "item_lr" in line else "")
        + (f"{line['tokens_per_s']:.0f} tokens/s" if w["tokens"] else f"{line['positions_per_s']:.0f} positions/s")
        + (f" table age {age}" if age is not None else ""))
