"""The resumable state of a training run: one file, `state.pt`, holding one dict.

It holds the model's weights, the optimizer, the learning-rate schedule, the fp16 gradient scaler (when there is
one), the loop's progress (step, epoch, batch, best score, early-stopping count) and the run's settings. A run
resumes only from a state made with the same settings and data; the file is read with `weights_only=True`
(tensors and plain values only, never arbitrary pickles) and replaced atomically.
Covers one process and DDP; sharded FSDP/ZeRO state is not covered.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from pipeline.errors import UserError
from pipeline.io import atomic_path, fingerprint

ADDED_SETTINGS = {"scale_inputs": False, "temperature": None, "adam_beta2": 0.999}
"""Settings added after states were first saved, each with the value that behaves as the code did before it: a
saved state that lacks one still matches a run that has it at this value."""
DROPPED_SETTINGS = {"patience"}
"""Settings that older states recorded but that never decided the weights (patience only says when to stop): a
saved state that has one still matches a run without it."""


def _in_current_terms(old: dict, new: dict) -> dict:
    """`old` with every ADDED_SETTINGS key that `new` has at the same place and `old` lacks, at its old value, and
    without the DROPPED_SETTINGS keys that `new` lacks."""
    out = {key: value for key, value in old.items() if key in new or key not in DROPPED_SETTINGS}
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(old.get(key), dict):
            out[key] = _in_current_terms(old[key], value)
        elif key not in old and key in ADDED_SETTINGS:
            out[key] = ADDED_SETTINGS[key]
    return out


class Checkpoint:
    def __init__(self, path: Path, settings: dict) -> None:
        self.path = path
        self.settings = json.loads(json.dumps(settings, sort_keys=True, default=str))
        """What decides the run's trajectory (model and data identity, trajectory settings, seed, processes)."""
        self.run_id = fingerprint(self.settings)

    def load(self) -> dict | None:
        """The saved payload, or None when there is none; refuses one made with other settings."""
        if not self.path.is_file():
            return None
        saved = torch.load(self.path, map_location="cpu", weights_only=True)
        old = _in_current_terms(json.loads(saved.get("settings", "{}")), self.settings)
        if saved.get("fingerprint") != self.run_id and fingerprint(old) != self.run_id:
            changed = _differences(old, self.settings)
            extend = ("; runs are extended with more epochs or steps only when train.schedule_steps fixes the "
                      "learning-rate schedule from the start") if re.search(r"train\.(epochs|max_steps):", changed) \
                else ""
            raise UserError(f"{self.path}: made with other settings or data ({changed or 'an older format'}); "
                            f"delete {self.path.parent} or set resume=false{extend}")
        return saved

    def save(self, model: torch.nn.Module, optimizer, scheduler, scaler, progress: dict) -> None:
        payload = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                   "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict() if scaler is not None else None,
                   "state": progress, "fingerprint": self.run_id, "settings": json.dumps(self.settings)}
        with atomic_path(self.path) as tmp:
            torch.save(payload, tmp)


def _differences(old: dict, new: dict, prefix: str = "") -> str:
    """'key: old -> new' for the first few settings that differ."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            inner = _differences(a, b, f"{prefix}{key}.")
            out += [inner] if inner else []
        elif a != b:
            out.append(f"{prefix}{key}: {str(a)[:40]} -> {str(b)[:40]}")
    return "; ".join(out[:3])
