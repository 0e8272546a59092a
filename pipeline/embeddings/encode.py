"""Run the Item LLM over items: a fast path (length-sorted batches under a token budget) beside a simple
reference path (fixed-size batches in file order, padded to the longest possible text). A test checks that
they agree; `hllm-pipeline bench embed` measures them.
"""

from __future__ import annotations

import contextlib
import time

import numpy as np
import torch

from pipeline.models.llm import ItemLLM
from pipeline.models.lower_states import LowerStates
from pipeline.models.tokens import TokenizedCatalogue, budget_batches


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@torch.inference_mode()
def embed_items(item_llm: ItemLLM, catalogue: TokenizedCatalogue, items: np.ndarray, token_budget: int = 16384,
                alignment: str = "right", autocast_dtype: torch.dtype | None = None, progress=None,
                lower_states: LowerStates | None = None) -> torch.Tensor:
    """Embeddings (len(items), D) in the order of `items` (item_idx), float32 on the CPU. With partial depth,
    `lower_states` are the frozen layers' kept outputs, read instead of recomputed."""
    device = next(item_llm.parameters()).device
    n_slots = item_llm.n_item_tokens
    lengths = catalogue.lengths(items) + n_slots
    out = torch.empty(len(items), item_llm.dim, dtype=torch.float32)
    for batch in budget_batches(lengths, token_budget):
        chunk = catalogue.chunk(items[batch], n_slots, alignment)
        if lower_states is not None:
            chunk["lower"] = lower_states.chunk(items[batch], chunk["input_ids"].shape[1] - n_slots)
        chunk = {k: v.to(device) for k, v in chunk.items()}
        with _autocast(device, autocast_dtype):
            emb = item_llm(**chunk)
        out[torch.from_numpy(batch)] = emb.float().cpu()
        if progress is not None:
            progress(len(batch), int(chunk["attention_mask"].sum()))
    return out


@torch.inference_mode()
def embed_items_reference(item_llm: ItemLLM, catalogue: TokenizedCatalogue, items: np.ndarray,
                          batch_size: int = 32, alignment: str = "right", pad_to_max: bool = False) -> torch.Tensor:
    """The plain loop: items in the given order, a fixed batch size, each batch padded to its longest text
    (or, with pad_to_max, to max_text_tokens: what a fixed-shape loop does)."""
    device = next(item_llm.parameters()).device
    n_slots = item_llm.n_item_tokens
    width = catalogue.max_text_tokens + n_slots if pad_to_max else None
    out = []
    for start in range(0, len(items), batch_size):
        chunk = catalogue.chunk(items[start:start + batch_size], n_slots, alignment, width=width)
        out.append(item_llm(**{k: v.to(device) for k, v in chunk.items()}).float().cpu())
    return torch.cat(out) if out else torch.empty(0, item_llm.dim)


class Throughput:
    """Counts items and tokens for progress bars and logs."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.items = 0
        self.tokens = 0

    def __call__(self, items: int, tokens: int) -> None:
        self.items += items
        self.tokens += tokens

    def rates(self) -> dict[str, float]:
        seconds = max(time.perf_counter() - self.start, 1e-9)
        return {"seconds": seconds, "items_per_s": self.items / seconds, "tokens_per_s": self.tokens / seconds}
