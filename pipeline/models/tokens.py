"""Item texts as token ids, and the padded chunks the Item LLM reads.

The catalogue is tokenized once (CSR arrays indexed by item_idx). A chunk is a left-padded (B, T) batch: the
text's first `max_text_tokens` tokens, then the [ITEM] slot when the pooling uses one.

Positions follow the official code: right-aligned, so the [ITEM] slot always sits at position
max_text_tokens (whatever the text length or the batch's padding), which makes an item's embedding independent
of the batch it is computed in. `alignment="left"` numbers each text from 0 instead (what an encoder such as
BERT saw in pre-training; better for a frozen encoder).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.data.text import encode_item_text


@dataclass(frozen=True)
class TokenizedCatalogue:
    offsets: np.ndarray
    """(N+2,) int64: item i's tokens are ids[offsets[i]:offsets[i+1]]; item 0 (padding) has none."""
    ids: np.ndarray
    """(total,) int32 token ids, special tokens included, truncated to max_text_tokens."""
    max_text_tokens: int
    pad_id: int

    @classmethod
    def build(cls, tokenizer, texts: Sequence[str], max_text_tokens: int, batch: int = 4096) -> TokenizedCatalogue:
        """`texts[i]` is the text of item_idx i+1."""
        lengths = [0]
        chunks = []
        for start in range(0, len(texts), batch):
            encoded = encode_item_text(tokenizer, texts[start:start + batch], max_text_tokens, n_item_tokens=0)
            lengths += [len(e) for e in encoded]
            chunks += [np.asarray(e, dtype=np.int32) for e in encoded]
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        ids = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int32)
        return cls(offsets, ids, max_text_tokens, int(pad))

    @property
    def num_items(self) -> int:
        return len(self.offsets) - 2

    def lengths(self, items: np.ndarray) -> np.ndarray:
        return self.offsets[items + 1] - self.offsets[items]

    def chunk(self, items: np.ndarray, n_item_tokens: int, alignment: str = "right", width: int | None = None
              ) -> dict[str, torch.Tensor]:
        """A left-padded batch for `items` (item_idx array): input_ids, attention_mask, position_ids (B, T).

        T is the longest row unless `width` asks for more (the reference path pads every batch the same)."""
        lengths = self.lengths(items) + n_item_tokens  # (B,)
        width = max(int(lengths.max()), width or 0)
        input_ids = np.full((len(items), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(items), width), dtype=np.int64)
        for row, (item, length) in enumerate(zip(items, lengths, strict=True)):
            tokens = self.ids[self.offsets[item]:self.offsets[item + 1]]
            input_ids[row, width - length:width - length + len(tokens)] = tokens
            mask[row, width - length:] = 1
        columns = np.arange(width)[None, :]
        if alignment == "right":
            positions = np.broadcast_to(columns + (self.max_text_tokens + n_item_tokens - width), mask.shape)
        elif alignment == "left":
            positions = np.maximum(columns - (width - lengths)[:, None], 0)
        else:
            raise ValueError(f"alignment must be 'right' or 'left', got {alignment!r}")
        return {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(mask),
                "position_ids": torch.from_numpy(np.array(positions, dtype=np.int64))}


def budget_batches(lengths: np.ndarray, token_budget: int, max_batch: int = 1024) -> list[np.ndarray]:
    """Split positions 0..n-1 into batches of similar length, each with (batch size x longest) <= budget.

    Sorting by length first means little padding; the budget keeps memory flat whatever the lengths.
    Returns index arrays into `lengths` (longest batches first, so an out-of-memory shows up at once).
    """
    order = np.argsort(-lengths, kind="stable")
    batches, start = [], 0
    while start < len(order):
        longest = max(int(lengths[order[start]]), 1)
        size = max(1, min(max_batch, token_budget // longest))
        batches.append(order[start:start + size])
        start += size
    return batches
