"""Partial depth's kept lower-layer outputs: the frozen part of the Item LLM (word embeddings and lower blocks) run
once over the catalogue, so that a training step runs only the trained top blocks.

Every text token's state is one float32 row of `lower-<key>.f32`, in the catalogue's token order (item i's rows are
offsets[i]:offsets[i+1], as TokenizedCatalogue's token ids), memory-mapped. `lower-<key>.json`, written last,
holds the shape and the file's sha256. The key covers what the states depend on: the frozen weights, the token
ids, the positions and the cut; a file whose checksum differs is refused, never used.

Shapes: B items, T text tokens (the longest of the chunk), H the Item LLM's hidden size.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from pipeline.errors import UserError
from pipeline.io import atomic_path, fingerprint, sha256_file
from pipeline.models.llm import ItemLLM
from pipeline.models.tokens import TokenizedCatalogue, budget_batches


class LowerStates:
    def __init__(self, states: np.ndarray, offsets: np.ndarray) -> None:
        self.states = states
        """(total tokens, H) float32, memory-mapped."""
        self.offsets = offsets
        """(N+2,) item i's rows are states[offsets[i]:offsets[i+1]]."""

    def chunk(self, items: np.ndarray, width: int) -> torch.Tensor:
        """(B, width, H) the items' states, left-padded with zeros as TokenizedCatalogue.chunk pads their tokens."""
        out = np.zeros((len(items), width, self.states.shape[1]), dtype=np.float32)
        for row, item in enumerate(items):
            rows = self.states[self.offsets[item]:self.offsets[item + 1]]
            out[row, width - len(rows):] = rows
        return torch.from_numpy(out)

    @staticmethod
    def key(item_llm: ItemLLM, catalogue: TokenizedCatalogue, alignment: str) -> str:
        """What the kept states depend on: the frozen weights, the token ids and their positions, the cut."""
        digest = hashlib.sha256()
        trained = {name for name, p in item_llm.backbone.named_parameters() if p.requires_grad}
        for name, tensor in sorted(item_llm.backbone.state_dict().items()):
            if name not in trained:
                digest.update(name.encode())
                digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        digest.update(catalogue.ids.tobytes())
        digest.update(catalogue.offsets.tobytes())
        return fingerprint({"weights": digest.hexdigest(), "alignment": alignment, "cut": item_llm.split.cut,
                            "max_text_tokens": catalogue.max_text_tokens})

    @classmethod
    def open(cls, folder: Path, key: str, offsets: np.ndarray) -> LowerStates | None:
        """The kept states for `key`, checked against their sha256; None when there are none."""
        header_path = folder / f"lower-{key}.json"
        if not header_path.is_file():
            return None
        header = json.loads(header_path.read_text())
        path = folder / f"lower-{key}.f32"
        if not path.is_file() or sha256_file(path) != header["sha256"]:
            raise UserError(f"{path}: the kept lower-layer outputs are damaged (sha256 differs from {header_path.name})"
                            f"; delete both files to compute them again")
        rows, hidden = header["shape"]
        if rows != int(offsets[-1]):
            raise UserError(f"{path}: holds {rows} token states, the catalogue has {int(offsets[-1])}; delete it")
        return cls(np.memmap(path, dtype=np.float32, mode="r", shape=(rows, hidden)), offsets)

    @classmethod
    def build(cls, folder: Path, item_llm: ItemLLM, catalogue: TokenizedCatalogue, alignment: str,
              token_budget: int, log=print) -> LowerStates:
        """Open the kept states, or compute them (length-sorted batches, no gradients) and write them atomically."""
        key = cls.key(item_llm, catalogue, alignment)
        kept = cls.open(folder, key, catalogue.offsets)
        if kept is not None:
            log(f"partial depth: kept lower-layer outputs {folder / f'lower-{key}.f32'} (sha256 checked)")
            return kept
        items = np.arange(1, catalogue.num_items + 1)
        total, hidden = int(catalogue.offsets[-1]), item_llm.backbone.config.hidden_size
        log(f"partial depth: computing the frozen layers' outputs once: {total:,} tokens x {hidden} "
            f"({total * hidden * 4 / 2**20:.0f} MiB) into {folder}")
        device = next(item_llm.parameters()).device
        path = folder / f"lower-{key}.f32"
        with atomic_path(path) as tmp:
            states = np.memmap(tmp, dtype=np.float32, mode="w+", shape=(max(total, 1), hidden))
            for batch in budget_batches(catalogue.lengths(items), token_budget):
                chunk = {k: v.to(device) for k, v in catalogue.chunk(items[batch], 0, alignment).items()}
                lower = item_llm.lower(**chunk).float().cpu().numpy()  # (B, T, H)
                for row, item in enumerate(items[batch]):
                    n = int(catalogue.offsets[item + 1] - catalogue.offsets[item])
                    states[catalogue.offsets[item]:catalogue.offsets[item + 1]] = lower[row, lower.shape[1] - n:]
            states.flush()
            del states
            digest = sha256_file(tmp)
        with atomic_path(folder / f"lower-{key}.json") as tmp:
            tmp.write_text(json.dumps({"shape": [total, hidden], "sha256": digest, "key": key}))
        return cls(np.memmap(path, dtype=np.float32, mode="r", shape=(total, hidden)), catalogue.offsets)


def kept_lower_states(folder: Path, item_llm: ItemLLM, catalogue: TokenizedCatalogue, alignment: str,
                      token_budget: int, log=print) -> LowerStates:
    """LowerStates.build, by the main process only under torchrun/accelerate (the others wait, then open it)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return LowerStates.build(folder, item_llm, catalogue, alignment, token_budget, log)
    if dist.get_rank() == 0:
        LowerStates.build(folder, item_llm, catalogue, alignment, token_budget, log)
    dist.barrier()
    return LowerStates.open(folder, LowerStates.key(item_llm, catalogue, alignment), catalogue.offsets)

