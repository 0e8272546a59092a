"""Build the canonical tables (DESIGN.md "Contracts") from a reader's raw tables, for every format alike.

Decisions, in order; each unusable row is kept in `rejected` with its reason, never dropped silently:
  items:        missing item id, duplicate item id (the first row wins)
  interactions: missing user/item id, missing or non-integer timestamp, raw count filters (Amazon's 5-core),
                unknown item id, users too short for leave-one-out
  items again:  items without interactions, when the config drops them
Then items get `item_idx` 1..N in file order (0 is padding), users get `user_idx` 0..U-1 in order of first
appearance, and interactions are sorted per user by (timestamp, source row): a stable, explicit tie-break.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import polars as pl

from pipeline.data.readers import REJECTED_SCHEMA, RawTables
from pipeline.data.text import item_text_expr
from pipeline.errors import UserError, where


@dataclass(frozen=True)
class CanonicalRules:
    """The row-level rules the builder applies (resolved from PrepareConfig and the format's defaults)."""

    text_keys: tuple[str, ...]
    item_prompt: str
    min_user_interactions: int
    raw_min_item_count: int
    raw_min_user_count: int
    min_user_count_after_filter: int
    unknown_items: str  # "reject" | "keep"
    keep_items_without_interactions: bool
    strict: bool


@dataclass
class CanonicalTables:
    items: pl.DataFrame
    interactions: pl.DataFrame
    users: pl.DataFrame
    rejected: pl.DataFrame
    stats: dict


REASON_TEXT = {
    "missing_item_id": "item id is missing",
    "duplicate_item_id": "item id already appeared on an earlier row",
    "missing_user_id": "user id is missing",
    "missing_timestamp": "timestamp is missing",
    "bad_timestamp": "timestamp is not an integer number of seconds",
    "unknown_item": "item id is not in the item file",
    "user_too_short": "user has too few interactions to split leave-one-out",
    "item_without_interactions": "item has no interactions",
}


def _rejected(lf: pl.LazyFrame, file: str, column: str | None, value: pl.Expr | None, reason: pl.Expr | str
              ) -> pl.LazyFrame:
    return lf.select(
        pl.lit(file, dtype=pl.String).alias("file"),
        pl.col("row").cast(pl.Int64),
        pl.lit(column, dtype=pl.String).alias("column"),
        (value if value is not None else pl.lit(None)).cast(pl.String).alias("value"),
        (pl.lit(reason) if isinstance(reason, str) else reason).cast(pl.String).alias("reason"),
    )


def _parse_timestamp() -> pl.Expr:
    """Integer seconds; a float that is integral (as pandas writes '978300760.0') is accepted too."""
    text = pl.col("timestamp").str.strip_chars()
    as_int = text.str.to_integer(strict=False)
    as_float = text.cast(pl.Float64, strict=False)
    integral = as_float.is_finite() & (as_float == as_float.floor()) & (as_float.abs() < 2**53)
    return pl.coalesce(as_int, pl.when(integral).then(as_float.cast(pl.Int64))).alias("ts")


def build_canonical(raw: RawTables, rules: CanonicalRules) -> CanonicalTables:
    inter_file, items_file = raw.interactions_file, raw.items_file
    missing_keys = [k for k in rules.text_keys if k not in raw.text_fields]
    if missing_keys:
        raise UserError(f"{items_file}: text key '{missing_keys[0]}' is not a column of the item file; "
                        f"available: {', '.join(raw.text_fields)} (set text_keys=...)")
    rejected: list[pl.LazyFrame] = list(raw.rejected)

    # ---- items: missing and duplicate ids
    items = raw.items.with_columns(pl.col("item_id").str.strip_chars())
    rejected.append(_rejected(items.filter(pl.col("item_id").is_null() | (pl.col("item_id") == "")),
                              items_file, "item_id", None, "missing_item_id"))
    items = items.filter(pl.col("item_id").is_not_null() & (pl.col("item_id") != "")).sort("row")
    first = pl.col("row") == pl.col("row").min().over("item_id")
    rejected.append(_rejected(items.filter(~first), items_file, "item_id", pl.col("item_id"), "duplicate_item_id"))
    items = items.filter(first).collect()

    # ---- interactions: ids and timestamps
    inter = raw.interactions.with_columns(pl.col("user_id").str.strip_chars(), pl.col("item_id").str.strip_chars())
    inter = inter.with_columns(_parse_timestamp())
    problem = (
        pl.when(pl.col("user_id").is_null()).then(pl.lit("missing_user_id"))
        .when(pl.col("item_id").is_null()).then(pl.lit("missing_item_id"))
        .when(pl.col("timestamp").is_null()).then(pl.lit("missing_timestamp"))
        .when(pl.col("ts").is_null()).then(pl.lit("bad_timestamp"))
    )
    inter = inter.with_columns(problem.alias("_problem"))
    column_of = {"missing_user_id": "user_id", "missing_item_id": "item_id", "missing_timestamp": "timestamp",
                 "bad_timestamp": "timestamp"}
    bad = inter.filter(pl.col("_problem").is_not_null())
    rejected.append(bad.select(
        pl.lit(inter_file, dtype=pl.String).alias("file"),
        pl.col("row").cast(pl.Int64),
        pl.col("_problem").replace_strict(column_of, return_dtype=pl.String).alias("column"),
        pl.when(pl.col("_problem") == "bad_timestamp").then(pl.col("timestamp")).cast(pl.String).alias("value"),
        pl.col("_problem").alias("reason"),
    ))
    inter = inter.filter(pl.col("_problem").is_null()).select("row", "user_id", "item_id", "ts").collect()

    # ---- raw count filters (the official Amazon Books preprocessing: item >= 5 and user >= 5, then user >= 5)
    if rules.raw_min_item_count > 1 or rules.raw_min_user_count > 1:
        n = rules.raw_min_item_count
        inter = inter.with_columns(pl.len().over("item_id").alias("_ic"), pl.len().over("user_id").alias("_uc"))
        reason = (pl.when(pl.col("_ic") < rules.raw_min_item_count).then(pl.lit(f"item_count_below_{n}"))
                  .when(pl.col("_uc") < rules.raw_min_user_count)
                  .then(pl.lit(f"user_count_below_{rules.raw_min_user_count}")))
        inter = inter.with_columns(reason.alias("_problem"))
        rejected.append(_rejected(inter.lazy().filter(pl.col("_problem").is_not_null()), inter_file, None, None,
                                  pl.col("_problem")))
        inter = inter.filter(pl.col("_problem").is_null()).drop("_ic", "_uc", "_problem")
    if rules.min_user_count_after_filter > 1:
        m = rules.min_user_count_after_filter
        short = pl.len().over("user_id") < m
        rejected.append(_rejected(inter.lazy().filter(short), inter_file, "user_id", pl.col("user_id"),
                                  f"user_count_after_filter_below_{m}"))
        inter = inter.filter(~short)

    # ---- unknown items
    known = inter["item_id"].is_in(items["item_id"].implode())
    if rules.unknown_items == "keep":
        # As the official code: an item missing from the item file joins the catalogue with no text.
        extra = inter.filter(~known).group_by("item_id").agg(pl.col("row").min()).sort("row")
        extra = extra.select(pl.lit(None, dtype=pl.Int64).alias("row"), "item_id",
                             *[pl.lit(None, dtype=pl.String).alias(f) for f in raw.text_fields])
        items = pl.concat([items, extra.select(items.columns)], how="vertical_relaxed")
    else:
        rejected.append(_rejected(inter.lazy().filter(~known), inter_file, "item_id", pl.col("item_id"),
                                  "unknown_item"))
        inter = inter.filter(known)

    # ---- users too short for leave-one-out
    short = pl.len().over("user_id") < rules.min_user_interactions
    rejected.append(_rejected(inter.lazy().filter(short), inter_file, "user_id", pl.col("user_id"),
                              "user_too_short"))
    inter = inter.filter(~short)
    if inter.height == 0:
        raise UserError(f"{inter_file}: no usable interactions remain after the rules above; see the reasons "
                        "with strict=true")

    # ---- items without interactions
    counts = inter.group_by("item_id").agg(pl.len().alias("n_interactions"))
    items = items.join(counts, on="item_id", how="left").with_columns(pl.col("n_interactions").fill_null(0))
    if not rules.keep_items_without_interactions:
        rejected.append(_rejected(items.lazy().filter(pl.col("n_interactions") == 0), items_file, "item_id",
                                  pl.col("item_id"), "item_without_interactions"))
        items = items.filter(pl.col("n_interactions") > 0)

    rejected_df = pl.concat([r.select(list(REJECTED_SCHEMA)).cast(REJECTED_SCHEMA) for r in rejected]).collect()
    rejected_df = rejected_df.sort(["file", "row"], nulls_last=True)
    if rules.strict and rejected_df.height:
        raise UserError(strict_message(rejected_df.row(0, named=True)))

    # ---- indices, text, order
    items = items.with_row_index("item_idx", offset=1).with_columns(pl.col("item_idx").cast(pl.Int32))
    items = items.with_columns(item_text_expr(rules.text_keys, rules.item_prompt).alias("text"))
    items = items.with_columns(
        pl.Series("text_sha256", [hashlib.sha256(t.encode("utf-8")).hexdigest() for t in items["text"]])
    )
    users = (inter.group_by("user_id").agg(
        pl.col("row").min().alias("_first"), pl.len().cast(pl.Int64).alias("n_interactions"),
        pl.col("ts").min().alias("first_timestamp"), pl.col("ts").max().alias("last_timestamp"),
    ).sort("_first").with_row_index("user_idx").with_columns(pl.col("user_idx").cast(pl.Int32)).drop("_first"))
    interactions = (
        inter.join(users.select("user_id", "user_idx"), on="user_id")
        .join(items.select("item_id", "item_idx"), on="item_id")
        .select("user_idx", "item_idx", pl.col("ts").alias("timestamp"), pl.col("row").alias("source_row"))
        .sort(["user_idx", "timestamp", "source_row"])
    )
    items = items.select("item_idx", "item_id", *raw.text_fields, "text", "text_sha256",
                         pl.col("n_interactions").cast(pl.Int64), pl.col("row").alias("source_row"))
    return CanonicalTables(items=items, interactions=interactions, users=users.select(
        "user_idx", "user_id", "n_interactions", "first_timestamp", "last_timestamp"), rejected=rejected_df,
        stats={})


def strict_message(row: dict) -> str:
    reason = row["reason"]
    base = reason.split(":", 1)[0]
    text = REASON_TEXT.get(base, reason.replace("_", " "))
    value = f" (got {row['value']!r})" if row["value"] is not None else ""
    return f"{where(row['file'], row['row'], row['column'])}: {text}{value}"
