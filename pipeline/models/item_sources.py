"""Item sources: where a sequence model gets the embedding of an item.

Every source answers two questions for the training loop and for scoring:
  prepare(ids)  on the CPU, for a step's distinct item_idx (U,): what `forward` needs, the order of its output
                rows (row r embeds ids[order[r]]) and the item tokens it will encode (for the throughput log);
  forward(...)  -> (U, D) embeddings, with gradients where the source is trained;
  table()       -> (N+1, D) every item's embedding (row 0, padding, is zero), what users are scored against.

Sources: `TextItems` (the Item LLM over item text: stage one), `CachedItems` (a frozen table of cached
embeddings, optionally through a trainable adapter: stage two), `IdItems` (a trainable item-ID table, as ID-based
sequential recommenders use) and `SumItems` (the sum of several, e.g. cached text embeddings + IDs).
Shapes: U distinct items in a step, D embedding size, N catalogue items.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from pipeline.models.llm import ItemLLM
from pipeline.models.lower_states import LowerStates
from pipeline.models.tokens import TokenizedCatalogue, budget_batches


class ItemSource(nn.Module):
    dim: int
    """Embedding size D."""
    num_items: int
    """Catalogue size N (item_idx 1..N; 0 is padding)."""
    kind = "item"
    """A word for the error messages: text, cached, ID, summed."""
    shard_negatives = False
    """True where embedding an item is expensive: under DDP each process embeds a share of the shared negatives
    and the shares are gathered; otherwise every process looks all of them up itself."""
    negatives_from_table = False
    """True where the negatives are rows of `negative_table` (refreshed every few steps, no gradients) instead of
    being embedded with the step's own items."""

    lr: float | None = None
    """This source's own peak learning rate; None: the run's."""

    def before_step(self, step: int) -> None:
        """Called by the training loop on every process before optimizer step `step`."""

    def table_age(self, step: int) -> int | None:
        """At step `step`, the steps since the negative table was recomputed (None for a source without one)."""
        return None

    def prepare(self, ids: np.ndarray) -> tuple[dict, np.ndarray, int]:
        return {"ids": torch.from_numpy(np.asarray(ids, dtype=np.int64))}, np.arange(len(ids)), 0

    @torch.no_grad()
    def table(self) -> torch.Tensor:
        device = next(iter([*self.parameters(), *self.buffers()])).device
        return self({"ids": torch.arange(self.num_items + 1, device=device)}).float()


class TextItems(ItemSource):
    """The Item LLM over each item's tokenized text; items are encoded in length-sorted chunks under a token
    budget, each distinct item once per step.

    `table_every` = N takes the negatives from a table of every item's embedding that the current Item LLM
    recomputes every N steps (no gradients, the length-sorted passes of the embedding job): only the step's own
    items (histories and targets) go through the Item LLM with gradients, and the negatives can be the whole
    catalogue. `lower_states` (partial depth) are the frozen layers' kept outputs, read instead of recomputed."""

    kind, shard_negatives = "text", True

    def __init__(self, item_llm: ItemLLM, catalogue: TokenizedCatalogue, tokenizer, alignment: str = "right",
                 token_budget: int = 16384, meta: dict | None = None, table_every: int | None = None,
                 lower_states: LowerStates | None = None) -> None:
        super().__init__()
        self.item_llm = item_llm
        self.catalogue, self.tokenizer = catalogue, tokenizer
        self.alignment, self.token_budget = alignment, token_budget
        self.meta = meta or {}
        """What item_llm.json records beside the weights (source model, positions, max_text_tokens)."""
        self.dim, self.num_items = item_llm.dim, catalogue.num_items
        self.lower_states = lower_states
        self.table_every = table_every
        if table_every is not None:
            self.shard_negatives, self.negatives_from_table = False, True
            # part of the saved state: a resumed run goes on with the table the interrupted one had
            self.register_buffer("negative_table", torch.zeros(self.num_items + 1, self.dim))  # (N+1, D)
            self.register_buffer("table_step", torch.tensor(-1))

    def prepare(self, ids: np.ndarray) -> tuple[dict, np.ndarray, int]:
        n_slots = self.item_llm.n_item_tokens
        lengths = self.catalogue.lengths(ids) + n_slots
        groups = budget_batches(lengths, self.token_budget)
        chunks = [self.catalogue.chunk(ids[g], n_slots, self.alignment) for g in groups]
        if self.lower_states is not None:
            for g, chunk in zip(groups, chunks, strict=True):
                chunk["lower"] = self.lower_states.chunk(ids[g], chunk["input_ids"].shape[1] - n_slots)
        return {"chunks": chunks}, np.concatenate(groups), int(lengths.sum())

    def forward(self, inputs: dict) -> torch.Tensor:
        return torch.cat([self.item_llm(**chunk) for chunk in inputs["chunks"]], dim=0)  # (U, D)

    def before_step(self, step: int) -> None:
        if self.table_every is not None and (self.table_step < 0 or step - int(self.table_step) >= self.table_every):
            was_training = self.item_llm.training
            self.item_llm.eval()  # as the embedding job: no dropout
            self.negative_table.copy_(self.table())
            self.item_llm.train(was_training)
            self.table_step.fill_(step)

    def table_age(self, step: int) -> int | None:
        return step - int(self.table_step) if self.table_every is not None else None

    @torch.no_grad()
    def table(self) -> torch.Tensor:
        """Every item through the Item LLM. Under DDP each process encodes a slice of the catalogue and they
        exchange the rows (every process must call it, as validation does), instead of each encoding it all."""
        import torch.distributed as dist

        from pipeline.embeddings.encode import embed_items

        device = next(self.item_llm.parameters()).device
        items = np.arange(1, self.num_items + 1)
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        parts = np.array_split(items, world)
        rank = dist.get_rank() if world > 1 else 0
        mine = embed_items(self.item_llm, self.catalogue, parts[rank], self.token_budget, self.alignment,
                           lower_states=self.lower_states).to(device)
        out = torch.zeros(self.num_items + 1, self.dim, device=device)
        if world == 1:
            out[1:] = mine
            return out
        padded = torch.zeros(len(parts[0]), self.dim, device=device)  # array_split: the first part is the longest
        padded[:len(mine)] = mine
        gathered = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(gathered, padded)
        out[1:] = torch.cat([rows[:len(part)] for rows, part in zip(gathered, parts, strict=True)])
        return out


class CachedItems(ItemSource):
    """A frozen (N+1, D) table of cached item embeddings (never saved with the model), optionally through a
    small trainable residual MLP (`adapter`) that starts as the identity."""

    kind = "cached"

    def __init__(self, table: torch.Tensor, adapter: bool = False) -> None:
        super().__init__()
        self.register_buffer("cached", table.float(), persistent=False)  # (N+1, D)
        self.dim, self.num_items = table.shape[1], table.shape[0] - 1
        self.adapter = nn.Sequential(nn.Linear(self.dim, self.dim), nn.GELU(), nn.Linear(self.dim, self.dim)) \
            if adapter else None
        if self.adapter is not None:
            nn.init.zeros_(self.adapter[2].weight)  # starts as the identity (residual)
            nn.init.zeros_(self.adapter[2].bias)

    def forward(self, inputs: dict) -> torch.Tensor:
        emb = self.cached[inputs["ids"]]  # (U, D)
        return emb + self.adapter(emb) if self.adapter is not None else emb


class IdItems(ItemSource):
    """A trainable item-ID embedding table (row 0, padding, stays zero), initialised at std 0.02 and multiplied by
    `scale`: summed with cached embeddings, the scale brings the IDs to the cached vectors' size while the weights
    stay small, so AdamW changes them as fast (relative to their size) as in an ID-only model.

    `width` narrower than `dim` factorises the table: (N+1, width) rows times a learned (width -> dim) map, so each
    item has `width` free numbers instead of `dim` (a text model's width, e.g. 384).

    An ID no training saw has a zero row (items held out as new, items a refresh added). With `dropout` p > 0,
    training replaces each of a step's IDs by one shared learned `unknown` row with probability p, and scoring
    gives that row to every zero-row ID: a text + ID model learns what to do when the ID says nothing.

    `max_norm` bounds each item's output (after the map and the scale) to that length: summed with frozen text
    embeddings it is a bounded learned offset from each item's text, 0 for an ID no training saw."""

    kind = "ID"

    def __init__(self, num_items: int, dim: int, scale: float = 1.0, width: int | None = None,
                 dropout: float = 0.0, max_norm: float | None = None) -> None:
        super().__init__()
        width = width or dim
        self.embedding = nn.Embedding(num_items + 1, width, padding_idx=0)
        nn.init.normal_(self.embedding.weight, std=0.02)
        with torch.no_grad():
            self.embedding.weight[0].zero_()
        self.dropout = dropout
        self.unknown = nn.Parameter(torch.randn(width) * 0.02) if dropout > 0 else None  # (width,)
        # std 1/sqrt(width) keeps the rows' per-dimension spread (0.02) through the map
        self.widen = nn.Linear(width, dim, bias=False) if width != dim else None
        if self.widen is not None:
            nn.init.normal_(self.widen.weight, std=width ** -0.5)
        self.dim, self.num_items, self.scale, self.width = dim, num_items, scale, width
        self.max_norm = max_norm

    def forward(self, inputs: dict) -> torch.Tensor:
        ids = inputs["ids"]  # (U,)
        out = self.embedding(ids)  # (U, width)
        if self.unknown is not None:
            if self.training:  # drawn from the loop's per-step seed: the same after a resume
                unknown = (torch.rand(ids.shape, device=ids.device) < self.dropout) & (ids > 0)
            else:
                unknown = (ids > 0) & ~out.detach().any(dim=-1)  # an ID no training saw
            out = torch.where(unknown[:, None], self.unknown.expand_as(out), out)
        out = self.widen(out) if self.widen is not None else out  # (U, D)
        out = out * self.scale if self.scale != 1.0 else out
        if self.max_norm is not None:  # shrink rows longer than max_norm onto that sphere (differentiably)
            out = out * (self.max_norm / out.norm(dim=-1, keepdim=True).clamp_min(1e-12)).clamp(max=1.0)
        return out


class SumItems(ItemSource):
    """The sum of several sources' embeddings of the same items (e.g. text + ID)."""

    kind = "summed"

    def __init__(self, *sources: ItemSource) -> None:
        super().__init__()
        if len({(s.dim, s.num_items) for s in sources}) != 1:
            raise ValueError("summed item sources must have the same embedding size and catalogue")
        self.sources = nn.ModuleList(sources)
        self.dim, self.num_items = sources[0].dim, sources[0].num_items
        self.shard_negatives = any(s.shard_negatives for s in sources)

    def prepare(self, ids: np.ndarray) -> tuple[dict, np.ndarray, int]:
        first, order, tokens = self.sources[0].prepare(ids)
        parts = [first]
        for source in self.sources[1:]:  # the others follow the first one's row order
            inputs, own_order, more = source.prepare(ids[order])
            parts.append({**inputs, "rows": torch.from_numpy(np.argsort(own_order))})
            tokens += more
        return {"parts": parts}, order, tokens

    def forward(self, inputs: dict) -> torch.Tensor:
        total = self.sources[0](inputs["parts"][0])
        for source, part in zip(self.sources[1:], inputs["parts"][1:], strict=True):
            total = total + source(part)[part["rows"]]
        return total

    @torch.no_grad()
    def table(self) -> torch.Tensor:
        return sum(source.table() for source in self.sources)
