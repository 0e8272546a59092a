"""Batch refresh of the item embeddings (`refresh items`): made to run from cron, unattended.

`refresh items` compares the catalogue as it is now with the run's current embeddings version: items whose text
(text_sha256) and Item LLM are unchanged are carried over bit-identical, new and edited items are embedded with
the run's Item LLM (item_llm/), retired items are dropped. The result is a new version, embeddings/<version>/,
whose manifest records its parent; embeddings/CURRENT switches to it only once it is complete and durable, so a
reader sees the old version or the new one, never a part. Existing items keep their item_idx (trained User LLMs
and ID tables stay valid); new items get values above every one used so far.

A second run with the same catalogue finds nothing to do. A run killed at any point leaves CURRENT on the old
version; the rerun continues the new version from its last complete shard and ends as an uninterrupted run
would. One job at a time holds embeddings/.lock (pipeline.lock). Versions follow pipeline.versions, which
`refresh rollback` and `--keep` use.
"""

from __future__ import annotations

import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import torch

from pipeline import versions
from pipeline.data.readers import read_table
from pipeline.data.text import TextRecipe, item_text_expr, text_recipe, text_sha256
from pipeline.embeddings import store
from pipeline.embeddings.encode import Throughput, embed_items
from pipeline.errors import ConfigError, UserError
from pipeline.io import atomic_path, fingerprint, folder_sha256
from pipeline.lock import job_lock
from pipeline.models import build
from pipeline.models.tokens import TokenizedCatalogue
from pipeline.run_dir import RunDir
from pipeline.runtime import device_of, distributed_state, on_main


@dataclass(frozen=True)
class RefreshItemsConfig:
    catalog: Path
    """The catalogue as it is now: what `data prepare` read the items from (a MovieLens folder, the items CSV,
    the Amazon folder), or a Parquet/CSV file with an item_id column and the text fields."""
    run: Path
    """Run folder with item_llm/ and embeddings/ (from `embed-items`), e.g. artifacts/ml-100k."""
    data: Path | None = None
    """Canonical tables the run was made from (they say how an item's text is built); null: the folder stage
    one recorded in item_llm/config.yaml, else run/data."""
    keep: int | None = None
    """After publishing, delete all but this many finished versions (the current one is always kept); null
    keeps every version, so that any can be rolled back to."""
    wait: float = 0
    """Seconds to wait for another refresh of this run to finish before giving up (0: give up at once)."""
    token_budget: int = 32768
    """Item tokens per Item LLM forward batch (batch rows x longest text)."""
    device: str = "auto"
    """auto (cuda when available), cpu or cuda."""

    def __post_init__(self) -> None:
        if self.keep is not None and self.keep < 1:
            raise ConfigError(f"keep={self.keep}: must be >= 1 (the current version), or null to keep all")
        if self.wait < 0:
            raise ConfigError(f"wait={self.wait}: must be >= 0 seconds")
        if self.token_budget < 1:
            raise ConfigError(f"token_budget={self.token_budget}: must be >= 1")


# ---------------------------------------------------------------------------------------------------------------
# The catalogue as it is now


def _read_source(path: Path, recipe: TextRecipe, workdir: Path) -> pl.DataFrame:
    """The items of a raw source in the run's format (through the readers `data prepare` uses)."""
    from pipeline.data import readers
    from pipeline.data.canonical import strict_message

    if recipe.format == "movielens":
        raw = readers.read_movielens(path, recipe.encoding, workdir)
    elif recipe.format == "amazon-books":
        raw = readers.read_amazon_books(path, None, recipe.text_keys, workdir, log=lambda _: None)
    else:
        raise UserError(f"{path}: a folder, but {recipe.format} items come as a file; pass the items CSV/Parquet")
    # A catalogue line the reader could not parse would otherwise retire its item silently.
    for rejected in raw.rejected:
        bad = rejected.filter(pl.col("table") == "items").sort("row").head(1).collect()
        if bad.height:
            raise UserError(strict_message(bad.row(0, named=True)))
    return raw.items.collect()


def read_catalog(path: Path, recipe: TextRecipe) -> pl.DataFrame:
    """item_id (String), text, text_sha256 of every catalogue item, in file order. Bad input is a one-line
    error naming the file: no items, no item_id column, ids that are not integers or strings, a missing or blank
    id, a duplicate id, a missing text field."""
    if not path.exists():
        raise UserError(f"{path}: no such file or folder")
    with tempfile.TemporaryDirectory(prefix="hllm-refresh-") as tmp:
        table = _read_source(path, recipe, Path(tmp)) if path.is_dir() else \
            read_table(path, "the items with an item_id column and their text fields")
    if table.height == 0:
        raise UserError(f"{path}: holds no items")
    if "item_id" not in table.columns:
        raise UserError(f"{path}: no item_id column (columns: {', '.join(table.columns)})")
    kind = table.schema["item_id"]
    if not (kind == pl.String or kind.is_integer()):
        raise UserError(f"{path}: column item_id holds {kind} values; expected integer or string ids (the run's "
                        "ids are text, e.g. '1' or 'B00012'); a float column loses them")
    missing = [k for k in recipe.text_keys if k not in table.columns]
    if missing:
        raise UserError(f"{path}: no column {', '.join(missing)} (the run builds item texts from "
                        f"{', '.join(recipe.text_keys)}; columns here: {', '.join(table.columns)})")
    if "row" not in table.columns:  # the raw readers number rows themselves
        table = table.with_row_index("row", offset=1)
    table = table.with_columns(
        pl.col("item_id").cast(pl.String).str.strip_chars().replace("", None))
    blank = table.filter(pl.col("item_id").is_null())
    if blank.height:
        raise UserError(f"{path}: row {blank['row'][0]}: item_id is missing")
    repeated = table.filter(pl.col("item_id").is_duplicated())
    if repeated.height:
        first = repeated["item_id"][0]
        rows = repeated.filter(pl.col("item_id") == first)["row"].to_list()
        raise UserError(f"{path}: item_id {first!r} appears more than once (rows {', '.join(map(str, rows))}); "
                        "ids must be unique")
    table = table.with_columns(item_text_expr(recipe.text_keys, recipe.item_prompt).alias("text"))
    return table.select("item_id", "text").with_columns(pl.Series("text_sha256", text_sha256(table["text"])))


# ---------------------------------------------------------------------------------------------------------------
# What changed


@dataclass(frozen=True)
class RefreshPlan:
    items: pl.DataFrame
    """The new version's items: item_idx, item_id, text, text_sha256, status (unchanged, changed, new)."""
    retired: pl.DataFrame
    """The parent's items the catalogue no longer has: item_idx, item_id."""

    def count(self, status: str) -> int:
        return int((self.items["status"] == status).sum())

    @property
    def counts(self) -> dict[str, int]:
        return {**{s: self.count(s) for s in ("new", "changed", "unchanged")}, "retired": self.retired.height}

    @property
    def is_noop(self) -> bool:
        return self.count("unchanged") == self.items.height and self.retired.height == 0


REGISTRY = "item_ids.parquet"
"""embeddings/item_ids.parquet: every (item_id, item_idx) pair the run has ever used, so a value is never given
to another item (after a rollback, say) and an item that comes back gets its old value."""


def id_registry(base: Path, data: Path) -> pl.DataFrame:
    """item_id, item_idx of every item the run has used: the registry, or (before the first refresh wrote one)
    the canonical tables' and every finished version's items."""
    if (base / REGISTRY).is_file():
        return pl.read_parquet(base / REGISTRY)
    parts = [pl.read_parquet(data / "items.parquet", columns=["item_id", "item_idx"])]
    parts += [store.version_items(base / v, data).select("item_id", "item_idx")
              for v in versions.finished_versions(base)]
    return pl.concat([p.select(pl.col("item_id").cast(pl.String), pl.col("item_idx").cast(pl.Int64)) for p in parts]
                     ).unique(subset="item_id", keep="first", maintain_order=True)


def plan_refresh(old: pl.DataFrame, catalog: pl.DataFrame, registry: pl.DataFrame, same_model: bool
                 ) -> RefreshPlan:
    """Compare the catalogue with the parent version. A new item takes the item_idx the registry holds for it
    (an item that comes back) or the next unused one, in catalogue order; every item is re-embedded when the
    Item LLM changed."""
    joined = catalog.join(old.rename({"text_sha256": "old_sha"}), on="item_id", how="left", maintain_order="left")
    status = (pl.when(pl.col("item_idx").is_null()).then(pl.lit("new"))
              .when((pl.col("old_sha") == pl.col("text_sha256")) & same_model).then(pl.lit("unchanged"))
              .otherwise(pl.lit("changed")))
    joined = joined.with_columns(status.alias("status")).join(
        registry.rename({"item_idx": "known_idx"}), on="item_id", how="left", maintain_order="left")
    unseen = ((pl.col("status") == "new") & pl.col("known_idx").is_null()).cast(pl.Int64)
    next_idx = max(int(registry["item_idx"].max() or 0), int(old["item_idx"].max() or 0)) + 1
    joined = joined.with_columns(
        pl.when(pl.col("status") != "new").then(pl.col("item_idx"))
        .when(pl.col("known_idx").is_not_null()).then(pl.col("known_idx"))
        .otherwise(next_idx - 1 + unseen.cum_sum()).cast(pl.Int64).alias("item_idx"))
    items = joined.select("item_idx", "item_id", "text", "text_sha256", "status").sort("item_idx")
    retired = old.join(catalog.select("item_id"), on="item_id", how="anti").select("item_idx", "item_id")
    return RefreshPlan(items, retired.sort("item_idx"))


# ---------------------------------------------------------------------------------------------------------------
# The job


def _embed(item_llm, tokenizer, meta: dict, todo: pl.DataFrame, token_budget: int, meter: Throughput,
           bar) -> torch.Tensor:
    """Embeddings (m, D) float32 of the items in `todo` (text), in its order."""
    device = next(item_llm.parameters()).device
    catalogue = TokenizedCatalogue.build(tokenizer, todo["text"].to_list(), int(meta["max_text_tokens"]))
    autocast = torch.bfloat16 if device.type == "cuda" else None
    emb = embed_items(item_llm, catalogue, np.arange(1, todo.height + 1), token_budget, meta.get("positions", "right"),
                      autocast, progress=lambda i, t: (meter(i, t), bar.update(i)))
    if not torch.isfinite(emb).all():
        raise RuntimeError("the Item LLM produced NaN or infinite embeddings")
    return emb


def _version_identity(parent: store.EmbeddingTable, plan: RefreshPlan, model_fp: str) -> dict:
    pm = parent.manifest
    return {"model_fingerprint": model_fp, "data_fingerprint": fingerprint(plan.items["text_sha256"].to_list()),
            "parent": parent.root.name, **{k: pm[k] for k in ("max_text_tokens", "pooling", "positions") if k in pm},
            "shard_rows": pm.get("shard_rows", 100_000), "format": pm["format"], "dtype": pm["dtype"]}


def _write_shards(run: Path, writer: store.ShardWriter, parent: store.EmbeddingTable, plan: RefreshPlan,
                  token_budget: int, device: torch.device, rank: int = 0, world: int = 1) -> dict:
    """This process's shards of the new version (every world-th, from rank): carried rows copied from the parent
    as stored (bit-identical), new and changed items embedded (only those of these shards) and converted to the
    stored dtype. Returns the embedding throughput."""
    idx = plan.items["item_idx"].to_numpy(writable=True)
    changed = (plan.items["status"] != "unchanged").to_numpy()
    per_shard = int(writer.fingerprint["shard_rows"])
    mine = [(k, start) for k, start in enumerate(range(0, len(idx), per_shard))
            if k % world == rank and not writer.is_done(k)]
    todo = sum(int(changed[start:start + per_shard].sum()) for _, start in mine)
    if todo:
        item_llm, tokenizer, meta = build.load_item_llm(RunDir(run).item_llm)
        item_llm.to(device).eval()
    meter = Throughput()  # embedding time: from here
    from tqdm import tqdm

    with tqdm(total=todo, unit="item", desc="embedding new and changed items",
              disable=None if rank == 0 else True) as bar:
        for k, start in mine:
            end = min(start + per_shard, len(idx))
            # the parent's stored rows (a new item beyond the parent's table reads its last row, overwritten below)
            block = parent.embeddings[torch.from_numpy(np.minimum(idx[start:end], parent.embeddings.shape[0] - 1))]
            block = block.clone()
            fresh = np.flatnonzero(changed[start:end])
            if len(fresh):  # embedded shard by shard: the same batches whichever process or rerun does it
                emb = _embed(item_llm, tokenizer, meta, plan.items[start + fresh], token_budget, meter, bar)
                block[torch.from_numpy(fresh)] = emb.to(block.dtype)
            writer.write(k, idx[start:end], block)
    return meter.rates()


def _publish(base: Path, registry: pl.DataFrame, plan: RefreshPlan, version: str, keep: int | None, log) -> None:
    """Record the version's item_idx values, switch CURRENT to it, prune."""
    known = pl.concat([registry, plan.items.select("item_id", "item_idx")]).unique(
        subset="item_id", keep="first", maintain_order=True)
    with atomic_path(base / REGISTRY) as tmp:  # before CURRENT moves: no value is ever handed out twice
        known.write_parquet(tmp)
    versions.publish(base, version)
    if keep is not None:
        versions.prune(base, keep, log=log)


def run_items(config: RefreshItemsConfig, log=print) -> dict:
    """Refresh the run's item embeddings from the catalogue; returns the summary (also logged). Under a
    multi-process launch each process embeds and writes every num_processes-th shard of the new version."""
    started = time.perf_counter()
    base = RunDir(config.run).embeddings
    data = RunDir(config.run).data(config.data)
    catalog = read_catalog(config.catalog, text_recipe(data))
    device = device_of(config.device)
    state = distributed_state(device)
    rank, world = state.process_index, state.num_processes
    log = log if rank == 0 else (lambda _: None)
    with job_lock(base, config.wait, log=log, state=state):
        parent_name = versions.current_version(base)
        parent = store.load_embeddings(base / parent_name)
        model_dir = RunDir(config.run).item_llm
        if not (model_dir / "item_llm.json").is_file():
            raise UserError(f"{model_dir}: no Item LLM to embed new items with; run `embed-items` for this run")
        model_fp = folder_sha256(model_dir)
        old = store.version_items(parent.root, data)
        if old.join(catalog, on="item_id", how="semi").height == 0 and old.height:
            raise UserError(f"{config.catalog}: shares no item_id with version {parent_name} ({old.height:,} items, "
                            f"ids like {old['item_id'][0]!r}); every item would be retired: is it the right file?")
        same_model = model_fp == parent.manifest.get("model_fingerprint")
        registry = id_registry(base, data)
        plan = plan_refresh(old, catalog, registry, same_model=same_model)
        summary = {"parent": parent_name, **plan.counts}
        if plan.is_noop:
            summary.update(version=parent_name, changed_version=False, seconds=round(time.perf_counter() - started, 2))
            log(f"nothing to do: version {parent_name} already holds this catalogue ({plan.count('unchanged'):,} "
                f"items, none new, changed or retired)")
            return summary
        version = "v-" + fingerprint({"parent": parent_name, "model": model_fp,
                                      "items": plan.items.select("item_idx", "item_id", "text_sha256").rows()}
                              )[:12]
        root = base / version
        if not versions.is_finished(root):
            if not same_model:
                log("the Item LLM differs from the one that made the current version: re-embedding every item")
            writer = store.ShardWriter(root, parent.manifest["format"], parent.manifest["dtype"],
                                       _version_identity(parent, plan, model_fp), rank=rank)
            rates = _write_shards(config.run, writer, parent, plan, config.token_budget, device, rank, world)
            state.wait_for_everyone()
            max_idx = max(int(registry["item_idx"].max() or 0), int(plan.items["item_idx"].max() or 0))
            on_main(state, lambda: writer.finish(
                plan.items, int(parent.manifest["dim"]),
                {"max_item_idx": max_idx, "version": version, "item_llm": str(model_dir), "refresh": plan.counts,
                 "throughput": rates, "processes": world},
                shards=math.ceil(plan.items.height / int(writer.fingerprint["shard_rows"]))))
        on_main(state, lambda: _publish(base, registry, plan, version, config.keep, log))
    summary.update(version=version, changed_version=True, seconds=round(time.perf_counter() - started, 2))
    log(f"refreshed {parent_name} -> {version}: {summary['new']:,} new, {summary['changed']:,} changed, "
        f"{summary['unchanged']:,} unchanged (carried over), {summary['retired']:,} retired; "
        f"{summary['seconds']:.1f}s")
    return summary
