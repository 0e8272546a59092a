"""What a training run reports and decides between steps: the metrics log, the throughput window, early stopping."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from pipeline.io import write_text_atomic


class MetricsLog:
    """Every log line as JSON in `metrics.jsonl`, and the same numbers to accelerate's trackers (TensorBoard:
    `train/<key>` per log line, `valid/<metric>` per validation). Only the main process writes."""

    def __init__(self, run_dir: Path, accelerator, trackers: bool) -> None:
        self.path = run_dir / "metrics.jsonl"
        self.accelerator = accelerator
        self.main = accelerator.is_main_process
        self.trackers = trackers
        if trackers:
            accelerator.init_trackers("tensorboard")  # writes under run_dir/tensorboard

    def write(self, line: dict) -> None:
        if self.main:
            with open(self.path, "a") as f:
                f.write(json.dumps(line) + "\n")
        if self.trackers:
            section, values = ("valid", line["valid"]) if "valid" in line else ("train", line)
            self.accelerator.log({f"{section}/{key}": value for key, value in values.items()
                                  if isinstance(value, (int, float)) and key not in ("step", "epoch")},
                                 step=line["step"])

    def close(self) -> None:
        for tracker in self.accelerator.trackers:  # not end_training(): that also ends the process group
            tracker.finish()


def cut_log_after(path: Path, step: int) -> None:
    """Cut a run's metrics.jsonl back to a resumed state at `step`: the interrupted part (later steps, and a line
    torn by a kill) is about to be trained and logged again."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line + "\n")
        except json.JSONDecodeError:
            continue
    write_text_atomic(path, "".join(kept))


class StepWindow:
    """Sums of the loss terms and the work done since the last log line (this process's share)."""

    KEYS = ("loss", "surviving", "top1", "n", "items", "tokens", "positions")

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.sums = dict.fromkeys(self.KEYS, 0.0)

    def add(self, out, batch) -> None:
        for key, value in (("loss", out.loss_per_position.detach().sum()), ("surviving", out.surviving_negatives),
                           ("top1", out.top1_correct)):
            self.sums[key] += float(value.float().sum())
        self.sums["n"] += int(out.loss_per_position.numel())
        for key in ("items", "tokens", "positions"):
            self.sums[key] += getattr(batch, key)

    def totals(self, accelerator) -> tuple[dict, float]:
        """The window's sums over every process (a log line describes the global batch), and its seconds."""
        seconds = time.perf_counter() - self.start
        values = torch.tensor([self.sums[k] for k in self.KEYS], dtype=torch.float64, device=accelerator.device)
        if accelerator.num_processes > 1:
            values = accelerator.reduce(values, reduction="sum")
        return dict(zip(self.KEYS, values.tolist(), strict=True)), seconds


class EarlyStopping:
    """Keeps the best validation score; says stop after `patience` epochs without a better one. Its state lives
    in the run's progress dict (best, bad_epochs), so it resumes with the run."""

    def __init__(self, progress: dict, patience: int) -> None:
        self.progress, self.patience = progress, patience

    def improved(self, score: float | None, epoch: int, step: int) -> bool:
        best = self.progress["best"]
        if score is None or best is None or score > best["score"]:
            self.progress["best"] = {"score": score, "epoch": epoch, "step": step}
            self.progress["bad_epochs"] = 0
            return True
        self.progress["bad_epochs"] += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.progress["bad_epochs"] >= self.patience
