"""The training loop both stages share: AdamW with warm-up and cosine, gradient accumulation, DDP through
accelerate, validation after each epoch with early stopping, and exact resume from one state file.

A stage describes its work as a `LoopTask` (how to build a step's batch, how to validate, how to keep the best
weights); the model's forward takes (batch, gather) and returns an NCEOutput (pipeline.models.hllm).
Everything random is derived from (seed, epoch, step, micro-step, process), never from a generator carried
along, so a run resumed at step s continues exactly as the uninterrupted run would have.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipeline.errors import ConfigError, UserError
from pipeline.io import atomic_path, fingerprint


@dataclass
class StepBatch:
    """One micro-step's input for this process."""

    inputs: dict
    """What model(inputs, gather) takes."""
    positions: int
    """Valid (input, target) positions in this process's share."""
    items: int = 0
    """Item texts encoded (stage one) or item embeddings read (stage two), for the throughput log."""
    tokens: int = 0
    """Item tokens encoded (stage one), for the throughput log."""


@dataclass
class LoopTask:
    num_batches: int
    """Global batches per epoch."""
    make_batch: Callable[[int, int, int, int, int, int], StepBatch]
    """(epoch, batch index, step, micro-step, rank, world) -> this process's StepBatch."""
    validate: Callable[[nn.Module], dict] | None
    """Metrics on validation users for the unwrapped model (None: no validation)."""
    save_best: Callable[[nn.Module], None]
    """Keep the unwrapped model's weights as the best so far (called on the main process)."""
    load_best: Callable[[nn.Module], None]
    """Load the best weights into the unwrapped model (called on every process at the end)."""
    flops: Callable[[float, float, float], float] | None = None
    """(items, tokens, positions) -> training FLOPs, for the MFU."""
    summary: str = ""
    """A line describing the data, logged at the start."""


def check_loop_settings(t, positive: tuple[str, ...] = ()) -> None:
    """Validate the settings train_loop reads (and a stage's own `positive` ones) with fix-it messages."""
    for name in ("epochs", "batch_size", "grad_accum", "patience", "checkpoint_every", "log_every", *positive):
        if getattr(t, name) < 1:
            raise ConfigError(f"train.{name}={getattr(t, name)}: must be >= 1")
    if not 0 <= t.warmup_ratio < 1:
        raise ConfigError(f"train.warmup_ratio={t.warmup_ratio}: must be in [0, 1)")
    if t.tensorboard:
        try:
            import tensorboard  # noqa: F401  (torch's SummaryWriter needs it)
        except ImportError:
            raise ConfigError("train.tensorboard=true needs the tensorboard package: pip install tensorboard "
                              "(or pip install -e '.[tensorboard]'), or set train.tensorboard=false") from None
    metric, _, k = t.early_stopping_metric.partition("@")
    if metric not in ("ndcg", "recall") or k not in ("10", "50", "200"):
        raise ConfigError(f"train.early_stopping_metric={t.early_stopping_metric}: use ndcg@K or recall@K "
                          "with K one of 10, 50, 200")


def lr_lambda(total: int, warmup: int):
    """Linear warm-up over `warmup` steps, then cosine decay to 0 at `total`."""
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return f


def device_of(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={name}: no CUDA device here; use device=cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device={name}: use auto, cpu, cuda or cuda:N") from None


def distributed_state(device: torch.device):
    """accelerate's process state. Create it through here first: on CPU it must be told so, or every process of
    a torchrun launch believes it is alone."""
    from accelerate import PartialState

    return PartialState(cpu=device.type == "cpu")


def train_loop(model: nn.Module, task: LoopTask, t, run_dir: Path, identity: dict, seed: int, device_name: str,
               resume: bool = True, log=print) -> nn.Module:
    """Train `model` as `t` (a stage's TrainConfig) says; returns the unwrapped model with the best weights.

    `identity` names what the run depends on besides the train settings (model settings, data checksums):
    a saved state is resumed only when it matches.
    """
    from accelerate import Accelerator

    device = device_of(device_name)
    distributed_state(device)
    mixed = t.mixed_precision if t.mixed_precision != "auto" else ("bf16" if device.type == "cuda" else "no")
    accelerator = Accelerator(mixed_precision=mixed, cpu=device.type == "cpu")
    rank, world = accelerator.process_index, accelerator.num_processes
    main = accelerator.is_main_process
    say = log if main else (lambda _: None)
    if t.batch_size % world:
        raise ConfigError(f"train.batch_size={t.batch_size} must be a multiple of the {world} processes")

    steps_per_epoch = math.ceil(task.num_batches / t.grad_accum)
    total_steps = min(steps_per_epoch * t.epochs, t.max_steps or 10**12)
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": t.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=t.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(total_steps, int(t.warmup_ratio * total_steps)))
    # what decides the trajectory (not how often it is logged or saved)
    logging_only = ("log_every", "checkpoint_every", "peak_tflops", "tensorboard")
    trajectory = {k: v for k, v in vars(t).items() if k not in logging_only}
    run_id = fingerprint({"identity": identity, "train": trajectory, "seed": seed, "world": world})
    state = {"step": 0, "epoch": 0, "batch": 0, "best": None, "bad_epochs": 0, "done": False}
    state_path = run_dir / "state.pt"
    if resume and state_path.is_file():
        saved = torch.load(state_path, map_location="cpu", weights_only=False)
        if saved.get("fingerprint") != run_id:
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

        def gather(x):  # every process's rows, with gradients flowing back to their owners
            return torch.cat(dist_fn.all_gather(x), dim=0)

    def save_state() -> None:
        """All resumable state in one dict (single process and DDP; sharded FSDP/ZeRO state is not covered)."""
        if main:
            payload = {"model": unwrapped.state_dict(), "optimizer": optimizer.state_dict(),
                       "scheduler": scheduler.state_dict(), "state": state, "fingerprint": run_id}
            with atomic_path(state_path) as tmp:
                torch.save(payload, tmp)
        accelerator.wait_for_everyone()

    board = None
    if main and t.tensorboard:
        from torch.utils.tensorboard import SummaryWriter

        board = SummaryWriter(str(run_dir / "tensorboard"))

    def log_line(line: dict) -> None:
        if not main:
            return
        with open(run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(line) + "\n")
        if board is not None:  # the same numbers: train/<key> per log line, valid/<metric> per epoch
            section, values = ("valid", line["valid"]) if "valid" in line else ("train", line)
            for key, value in values.items():
                if isinstance(value, (int, float)) and key not in ("step", "epoch"):
                    board.add_scalar(f"{section}/{key}", value, line["step"])
            board.flush()

    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
    n_params = sum(p.numel() for p in unwrapped.parameters() if p.requires_grad)
    say(f"{task.summary}; {total_steps} steps, {n_params / 1e6:.1f}M trained parameters, {world} process(es)")

    model.train()
    window = {"start": time.perf_counter(), "loss": 0.0, "surviving": 0.0, "top1": 0.0, "n": 0, "items": 0,
              "tokens": 0, "positions": 0}
    while not state["done"] and state["epoch"] < t.epochs:
        epoch = state["epoch"]
        while state["batch"] < task.num_batches and state["step"] < total_steps:
            step = state["step"]
            n_micro = min(t.grad_accum, task.num_batches - state["batch"])  # the epoch's last step may be short
            for micro in range(n_micro):
                # dropout: a distinct stream per (step, micro-step, process), the same after a resume
                torch.manual_seed(int(np.random.SeedSequence([seed, step, micro, rank]).generate_state(1)[0]))
                batch = task.make_batch(epoch, state["batch"] + micro, step, micro, rank, world)
                valid_local = torch.tensor(float(batch.positions), device=accelerator.device)
                valid_global = accelerator.reduce(valid_local, reduction="sum") if world > 1 else valid_local
                sync = contextlib.nullcontext() if micro == n_micro - 1 or world == 1 else accelerator.no_sync(model)
                with sync:
                    out = model(batch.inputs, gather)
                    # mean over every valid position of the global batch (DDP averages gradients over processes)
                    loss = out.loss_per_position.sum() * world / valid_global.clamp(min=1) / n_micro
                    accelerator.backward(loss)
                window["loss"] += float(out.loss_per_position.detach().sum())
                window["surviving"] += float(out.surviving_negatives.float().sum())
                window["top1"] += float(out.top1_correct.float().sum())
                window["n"] += int(out.loss_per_position.numel())
                window["items"] += batch.items
                window["tokens"] += batch.tokens
                window["positions"] += batch.positions
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state["batch"] += n_micro
            state["step"] += 1
            if state["step"] % t.log_every == 0 or state["step"] == total_steps:
                seconds = time.perf_counter() - window["start"]
                keys = ("loss", "surviving", "top1", "n", "items", "tokens", "positions")
                totals = torch.tensor([window[k] for k in keys], dtype=torch.float64, device=accelerator.device)
                if world > 1:  # the log line describes the global batch, not this process's share
                    totals = accelerator.reduce(totals, reduction="sum")
                w = dict(zip(keys, totals.tolist(), strict=True))
                line = {"step": state["step"], "epoch": epoch, "loss": w["loss"] / max(w["n"], 1),
                        "surviving_negatives": w["surviving"] / max(w["n"], 1),
                        "top1_accuracy": w["top1"] / max(w["n"], 1), "lr": scheduler.get_last_lr()[0],
                        "logit_scale": unwrapped.logit_scale.exp().item(),
                        "items_per_s": w["items"] / seconds, "tokens_per_s": w["tokens"] / seconds,
                        "positions_per_s": w["positions"] / seconds}
                if t.peak_tflops and task.flops is not None:
                    flops = task.flops(w["items"], w["tokens"], w["positions"]) / seconds
                    line["mfu"] = flops / (t.peak_tflops * 1e12 * world)
                log_line(line)
                say(f"step {line['step']}/{total_steps} epoch {epoch} loss {line['loss']:.4f} "
                    f"negatives kept {line['surviving_negatives']:.1f} lr {line['lr']:.2e} "
                    + (f"{line['tokens_per_s']:.0f} tokens/s" if w["tokens"] else
                       f"{line['positions_per_s']:.0f} positions/s"))
                window = {k: 0 for k in window} | {"start": time.perf_counter()}
            if state["step"] % t.checkpoint_every == 0:
                save_state()
        # ---- end of epoch (or of max_steps): validate, keep the best, maybe stop
        finished_epoch = state["batch"] >= task.num_batches
        if task.validate is not None:
            metrics = task.validate(unwrapped)
            score = metrics[t.early_stopping_metric]
            log_line({"epoch": epoch, "step": state["step"], "valid": metrics})
            popularity = metrics.get("popularity", {}).get(t.early_stopping_metric)
            say(f"epoch {epoch} valid ({metrics['users']} users): recall@10 {metrics['recall@10']:.4f} "
                f"ndcg@10 {metrics['ndcg@10']:.4f} {t.early_stopping_metric} {score:.4f}"
                + (f" (popularity {popularity:.4f})" if popularity is not None else ""))
            if state["best"] is None or score > state["best"]["score"]:
                state["best"] = {"score": score, "epoch": epoch, "step": state["step"]}
                state["bad_epochs"] = 0
                if main:
                    task.save_best(unwrapped)
                accelerator.wait_for_everyone()
            else:
                state["bad_epochs"] += 1
                if state["bad_epochs"] >= t.patience:
                    say(f"early stopping: no better {t.early_stopping_metric} for {t.patience} epoch(s)")
                    state["done"] = True
        else:
            state["best"] = {"score": None, "epoch": epoch, "step": state["step"]}
            if main:
                task.save_best(unwrapped)
            accelerator.wait_for_everyone()
        if finished_epoch:
            state["epoch"] += 1
            state["batch"] = 0
        if state["step"] >= total_steps:
            state["done"] = True
        save_state()
    accelerator.wait_for_everyone()
    if board is not None:
        board.close()
    task.load_best(unwrapped)
    say(f"best epoch {state['best']['epoch']} (step {state['best']['step']})")
    return unwrapped
