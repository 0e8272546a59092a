"""Stage `data prepare`: raw recommendation data -> the canonical tables (docs/data.md: "Output: the canonical tables").

Writes, into `out` (replaced as a whole, atomically):
  items.parquet, interactions.parquet, users.parquet, rejected.parquet, stats.json, config.yaml, and with a
  new-item split new_items.parquet (item_idx, item_id of the items held out of training)
"""

from __future__ import annotations

import dataclasses
import platform
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import polars as pl

from pipeline import __version__
from pipeline import config as cfg
from pipeline.data import readers
from pipeline.data.canonical import CanonicalCounts, CanonicalRules, build_canonical
from pipeline.data.new_items import NewItemSplit, choose_new_items, split_summary
from pipeline.data.readers import REJECTED_SCHEMA
from pipeline.data.sequences import NEW_ITEMS, UserSequences, eval_examples, training_sequences
from pipeline.data.text import DEFAULT_ITEM_PROMPT, DEFAULT_TEXT_KEYS
from pipeline.errors import ConfigError
from pipeline.io import atomic_dir, sha256_file, write_json_atomic

Format = Literal["movielens", "hllm-csv", "amazon-books", "pixelrec"]


@dataclass(frozen=True)
class PrepareConfig:
    format: Format
    """Raw layout: movielens (GroupLens ML-100K/ML-1M or RecBole atomic files), hllm-csv (official HLLM CSVs),
    amazon-books (ratings_Books.csv + meta_Books.json[.gz]) or pixelrec (PixelRec interaction and item CSVs)."""
    source: Path
    """The interactions file, or a folder holding the dataset (MovieLens folder, the official dataset/ +
    information/ layout, or the Amazon folder)."""
    out: Path
    """Output folder for the canonical tables, e.g. artifacts/ml-1m/data (replaced as a whole on success)."""
    items: Path | None = None
    """The item file when it is not found from `source` (item CSV, or meta_Books.json[.gz])."""
    text_keys: tuple[str, ...] | None = None
    """Item fields (columns of the item file) that make the item text, in this order. Default per format:
    movielens title,genres; amazon-books title,description; pixelrec title,tag,description; hllm-csv whichever
    of title,tag,description the item file has."""
    item_prompt: str = DEFAULT_ITEM_PROMPT
    """Prefix of every item text (the official prompt)."""
    encoding: str | None = None
    """Text encoding of the raw files. Default: latin-1 for GroupLens .dat/u.item files, utf-8 otherwise."""
    min_user_interactions: int = 3
    """Users with fewer interactions are rejected: leave-one-out needs a training, a validation and a test item."""
    raw_min_item_count: int | None = None
    """Reject interactions of items seen fewer times in the raw data. Default 5 for amazon-books (official), else 0."""
    raw_min_user_count: int | None = None
    """Reject interactions of users seen fewer times in the raw data. Default 5 for amazon-books, else 0."""
    min_user_count_after_filter: int | None = None
    """After the raw filters, reject users left with fewer interactions. Default 5 for amazon-books, else 0."""
    unknown_items: Literal["reject", "keep"] = "reject"
    """Interactions whose item is not in the item file: reject them, or keep them with an empty item text
    (what the official code does)."""
    keep_items_without_interactions: bool | None = None
    """Keep catalogue items nobody interacted with (they are still ranked at evaluation). Default: true, except
    amazon-books (false: the paper's item count covers items with interactions only)."""
    strict: bool = False
    """Stop at the first unusable row with an error naming it, instead of rejecting it into rejected.parquet."""
    new_item_fraction: float | None = None
    """The new-item split: this share of the items with interactions (in (0, 1), drawn within popularity strata)
    is held out of training entirely (new_items.parquet); their interactions stay as validation/test targets and
    in evaluation histories. null: no split."""
    new_items_after: str | None = None
    """The temporal new-item split: items first seen after this date (YYYY-MM-DD, UTC, or unix seconds) are new."""
    new_item_seed: int = 0
    """Seed of the new-item draw."""

    def new_item_split(self) -> NewItemSplit:
        return NewItemSplit(self.new_item_fraction, self.new_items_after, self.new_item_seed)

    def __post_init__(self) -> None:
        self.new_item_split()  # a setting that cannot work is refused before anything is read
        if self.min_user_interactions < 3:
            raise ConfigError(f"min_user_interactions={self.min_user_interactions}: must be >= 3 (leave-one-out "
                              "needs a training, a validation and a test item)")
        for name in ("raw_min_item_count", "raw_min_user_count", "min_user_count_after_filter"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ConfigError(f"{name}={value}: must be >= 0 (0 turns the filter off)")
        if self.text_keys is not None and not self.text_keys:
            raise ConfigError("text_keys is empty: give at least one item field, e.g. text_keys=title")
        if not self.source.exists():
            raise ConfigError(f"source={self.source}: no such file or folder")
        if self.items is not None and not self.items.exists():
            raise ConfigError(f"items={self.items}: no such file")

    def rules(self, available: tuple[str, ...]) -> CanonicalRules:
        amazon = self.format == "amazon-books"

        def pick(value, amazon_default, other_default):
            return value if value is not None else (amazon_default if amazon else other_default)

        return CanonicalRules(
            text_keys=self.text_keys or available,  # readers expose the format's default text fields
            item_prompt=self.item_prompt,
            min_user_interactions=self.min_user_interactions,
            raw_min_item_count=pick(self.raw_min_item_count, 5, 0),
            raw_min_user_count=pick(self.raw_min_user_count, 5, 0),
            min_user_count_after_filter=pick(self.min_user_count_after_filter, 5, 0),
            unknown_items=self.unknown_items,
            keep_items_without_interactions=pick(self.keep_items_without_interactions, False, True),
            strict=self.strict,
        )


def _read(config: PrepareConfig, workdir: Path, log) -> readers.RawTables:
    if config.format == "movielens":
        return readers.read_movielens(config.source, config.encoding, workdir)
    if config.format == "amazon-books":
        return readers.read_amazon_books(config.source, config.items, config.text_keys, workdir, log=log)
    return readers.read_hllm_csv(config.source, config.items, config.text_keys, config.encoding or "utf-8",
                                 workdir, default_keys=DEFAULT_TEXT_KEYS["hllm-csv"])


def _rows_read(raw: readers.RawTables) -> dict[str, int]:
    """Rows read per table: rows the reader parsed plus rows it rejected itself."""
    counts = {
        "interactions": raw.interactions.select(pl.len()).collect().item(),
        "items": raw.items.select(pl.len()).collect().item(),
    }
    for lf in raw.rejected:
        for table, n in lf.group_by("table").len().collect().iter_rows():
            counts[table] += n
    return counts


def check_output_folder(out: Path, inputs: list[Path]) -> None:
    """Refuse an output folder that would replace input data or an unrelated folder."""
    resolved = out.resolve()
    for path in inputs:
        p = path.resolve()
        if resolved == p or resolved in p.parents or p in resolved.parents:
            raise ConfigError(f"out={out} overlaps the input {path}; write the tables to a folder of their own")
    if out.exists():
        if not out.is_dir():
            raise ConfigError(f"out={out} is an existing file; give a folder")
        earlier_run = (out / "stats.json").is_file() and (out / "config.yaml").is_file()
        if not earlier_run and any(out.iterdir()):
            raise ConfigError(f"out={out} is a non-empty folder that no earlier `data prepare` wrote; it would be "
                              "replaced as a whole, so give a new or empty folder")


def run(config: PrepareConfig, log=print) -> Path:
    """Prepare the canonical tables; returns the output folder."""
    start = time.perf_counter()
    check_output_folder(config.out, [p for p in (config.source, config.items) if p is not None])
    with tempfile.TemporaryDirectory(prefix="hllm-prepare-") as tmp, atomic_dir(config.out) as out:
        workdir = Path(tmp)
        raw = _read(config, workdir, log)
        rules = config.rules(raw.text_fields)
        counts = build_canonical(raw, rules, workdir, out)
        held_out = _hold_out_new_items(config, out, raw.interactions_file)
        stats = _stats(config, rules, raw, counts, _rows_read(raw), out, time.perf_counter() - start)
        if held_out is not None:
            stats["split"]["new_items"] = held_out
            stats["rejected_rows"] += held_out["users_without_training_items"]
        cfg.save(config, out / "config.yaml")
        write_json_atomic(out / "stats.json", stats)
    log(summary(stats, config.out))
    return config.out


def _hold_out_new_items(config: PrepareConfig, out: Path, interactions_file: str) -> dict | None:
    """Write new_items.parquet (the held-out items) and add the users the split leaves without a training item to
    rejected.parquet (they keep their validation and test targets); returns the split's counts."""
    split = config.new_item_split()
    if not split.active:
        return None
    seqs = UserSequences.load(out)
    new = choose_new_items(seqs, split)
    seqs = dataclasses.replace(seqs, new_items=new)
    items = pl.read_parquet(out / "items.parquet", columns=["item_idx", "item_id"])
    items.filter(pl.col("item_idx").is_in(new.tolist())).write_parquet(out / NEW_ITEMS)
    users = pl.read_parquet(out / "users.parquet", columns=["user_idx", "user_id"]).sort("user_idx")
    summary, stranded = split_summary(seqs, users["user_id"])
    if stranded.height:
        rows = stranded.select(pl.lit("users").alias("table"), pl.lit(interactions_file).alias("file"),
                               pl.lit(None, dtype=pl.Int64).alias("row"), pl.lit("user_id").alias("column"),
                               pl.col("user_id").alias("value"),
                               pl.lit("no_training_item_after_new_item_split").alias("reason"))
        rejected = pl.concat([pl.read_parquet(out / "rejected.parquet"), rows.cast(REJECTED_SCHEMA)])
        rejected.write_parquet(out / "rejected.parquet")
    return {"method": "fraction" if split.fraction is not None else "first seen after a date",
            **cfg.to_dict(split), **summary}


def _stats(config: PrepareConfig, rules: CanonicalRules, raw: readers.RawTables, counts: CanonicalCounts,
           rows_read: dict[str, int], out: Path, seconds: float) -> dict:
    files = {"interactions": raw.interactions_file, "items": raw.items_file}
    tables = {}
    for table, file in files.items():
        reasons = counts.rejected[table]
        tables[table] = {
            "file": file,
            "rows_read": rows_read[table],
            "rows_used": counts.rows_used[table],
            "rows_rejected": sum(reasons.values()),
            "rejected_by_reason": reasons,
        }
    seqs = UserSequences.load(out)
    lengths = seqs.lengths
    return {
        "dataset": config.out.parent.name if config.out.name == "data" else config.out.name,
        "format": config.format,
        "users": counts.users,
        "items": counts.items,
        "items_with_interactions": counts.items_with_interactions,
        "interactions": counts.interactions,
        "rejected_rows": sum(t["rows_rejected"] for t in tables.values()),
        "rules": cfg.to_dict(rules),
        "split": {
            "method": "leave-one-out (test = last, valid = second to last), ties by (timestamp, source row)",
            "train_interactions": int(training_sequences(seqs).items.size),
            "valid_examples": len(eval_examples(seqs, "valid")),
            "test_examples": len(eval_examples(seqs, "test")),
        },
        "sequence_length": {
            "min": int(lengths.min()), "median": float(np.median(lengths)),
            "mean": round(float(lengths.mean()), 2), "max": int(lengths.max()),
        },
        "tables": tables,
        "inputs": {str(p): {"sha256": sha256_file(p), "bytes": p.stat().st_size} for p in raw.inputs},
        "seconds": round(seconds, 2),
        "software": {"hllm-pipeline": __version__, "polars": pl.__version__, "python": platform.python_version()},
    }


def summary(stats: dict, out: Path) -> str:
    lines = [
        f"prepared {stats['dataset']} into {out} in {stats['seconds']:.1f}s: {stats['users']:,} users, "
        f"{stats['items']:,} items ({stats['items_with_interactions']:,} with interactions), "
        f"{stats['interactions']:,} interactions, {stats['rejected_rows']:,} rejected rows",
    ]
    for table, info in stats["tables"].items():
        reasons = ", ".join(f"{k} {v:,}" for k, v in info["rejected_by_reason"].items()) or "none rejected"
        lines.append(f"  {table} ({info['file']}): {info['rows_read']:,} rows read, {info['rows_used']:,} used "
                     f"({reasons})")
    new = stats["split"].get("new_items")
    if new:
        lines.append(f"  new-item split: {new['new_items']:,} items held out of training ({new['method']}), "
                     f"{new['new_item_targets']['test']:,} new-item test targets and "
                     f"{new['warm_targets']['test']:,} warm ones; {new['users_without_training_items']:,} users left "
                     "without a training item (in rejected.parquet, still evaluated)")
    return "\n".join(lines)
