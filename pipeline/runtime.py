"""Where a run executes: the torch device a setting names, and accelerate's process state."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from pipeline.errors import ConfigError, UserError


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


def leave_process_group() -> None:
    """Under torchrun: wait for every process, then close the process group, so that no process exits while
    another still talks to it (an unsynchronised exit can abort the one that is left). Call it last."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def my_share(n: int, state) -> np.ndarray:
    """This process's contiguous share of positions 0..n-1 (all of them in a single process)."""
    return np.array_split(np.arange(n), state.num_processes)[state.process_index]


def gather_rows(local: np.ndarray, state) -> np.ndarray:
    """Every process's `local` rows (its my_share), concatenated in process order, on every process."""
    if state.num_processes == 1:
        return local
    from accelerate.utils import gather_object

    return np.concatenate(gather_object([local]))


def on_main(state, fn: Callable, failed: str = "the main process failed ({}); rerun the job to complete it"):
    """fn() on the main process only (writing a manifest, switching CURRENT, taking a lock). Every process learns
    whether it failed and stops too, with `failed` (formatted with the main process's error) as its message,
    rather than waiting at the next barrier for a main process that is gone."""
    if state is None or state.num_processes == 1:
        return fn()
    import torch.distributed as dist

    result, outcome, failure = None, [None], None
    if state.is_main_process:
        try:
            result = fn()
        except BaseException as e:
            outcome, failure = [str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {e}"], e
    dist.broadcast_object_list(outcome, src=0)
    if failure is not None:
        raise failure
    if outcome[0] is not None:
        raise UserError(failed.format(outcome[0]))
    return result
