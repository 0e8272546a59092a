"""Build the canonical tables from a reader's raw tables, for every format alike.

Decisions, in order; each unusable row is kept in rejected.parquet with its reason, never dropped silently:
  items:        missing item id, duplicate item id (the first row wins)
  interactions: missing user/item id, missing or non-integer timestamp, raw count filters (Amazon's 5-core),
                unknown item id, users too short for leave-one-out
  items again:  items without interactions, when the rules drop them
Ids and timestamps are stripped of surrounding spaces; an empty value is a missing one.
Then items get `item_idx` 1..N in file order (0 is padding), users get `user_idx` 0..U-1 in order of first
appearance, and interactions are sorted per user by (timestamp, source row): a stable, explicit tie-break.

Interactions stay lazy: each step streams from one Parquet file in `workdir` to the next, so a file of tens of
millions of rows is never held in memory as strings; only per-user and per-item counts and the final integer
table are.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import polars as pl

from pipeline.data.readers import REJECTED_SCHEMA, RawTables
from pipeline.data.text import item_text_expr, text_sha256
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


@dataclass
class CanonicalCounts:
    """What build_canonical wrote, for stats.json."""

    users: int
    items: int
    items_with_interactions: int
    interactions: int
    rows_used: dict[str, int]
    """Per table ('interactions', 'items'): input rows that made it into the output."""
    rejected: dict[str, dict[str, int]]
    """Per table: rejected rows by reason."""


RESERVED_TEXT_KEYS = ("row", "item_id", "item_idx", "text", "text_sha256", "n_interactions", "source_row")


class _Workspace:
    """Temporary Parquet files for the intermediate steps, and the rejected rows collected along the way."""

    def __init__(self, workdir: Path, files: dict[str, str]) -> None:
        self.workdir = workdir
        self.files = files  # table -> input file
        self.rejected: list[Path] = []
        self._n = 0

    def materialize(self, lf: pl.LazyFrame, name: str) -> pl.LazyFrame:
        path = self.workdir / f"{self._n:02d}-{name}.parquet"
        self._n += 1
        lf.sink_parquet(path)
        return pl.scan_parquet(path)

    def reject(self, lf: pl.LazyFrame, table: str, column: str | None, value: pl.Expr | None,
               reason: pl.Expr | str) -> None:
        frame = lf.select(
            pl.lit(table, dtype=pl.String).alias("table"),
            pl.lit(self.files[table], dtype=pl.String).alias("file"),
            pl.col("row").cast(pl.Int64),
            pl.lit(column, dtype=pl.String).alias("column"),
            (value if value is not None else pl.lit(None)).cast(pl.String).alias("value"),
            (pl.lit(reason) if isinstance(reason, str) else reason).cast(pl.String).alias("reason"),
        )
        self.add_rejected(frame)

    def add_rejected(self, lf: pl.LazyFrame) -> None:
        path = self.workdir / f"rejected-{len(self.rejected):02d}.parquet"
        lf.select(list(REJECTED_SCHEMA)).cast(REJECTED_SCHEMA).sink_parquet(path)
        self.rejected.append(path)

    def all_rejected(self) -> pl.LazyFrame:
        """Every rejected row, in the order the rules ran (within a rule, in input order)."""
        return pl.concat([pl.scan_parquet(p) for p in self.rejected]) if self.rejected else \
            pl.LazyFrame(schema=REJECTED_SCHEMA)

    def first_rejected(self) -> dict | None:
        """The earliest input row rejected by the first rule that rejected anything."""
        for path in self.rejected:
            first = pl.scan_parquet(path).sort("row", nulls_last=True).head(1).collect()
            if first.height:
                return first.row(0, named=True)
        return None


def _parse_timestamp() -> pl.Expr:
    """Integer seconds; a float that is integral (as pandas writes '978300760.0') is accepted too."""
    text = pl.col("timestamp").str.strip_chars()
    as_int = text.str.to_integer(strict=False)
    as_float = text.cast(pl.Float64, strict=False)
    integral = as_float.is_finite() & (as_float == as_float.floor()) & (as_float.abs() < 2**53)
    return pl.coalesce(as_int, pl.when(integral).then(as_float.cast(pl.Int64))).alias("ts")


def _count(lf: pl.LazyFrame) -> int:
    return lf.select(pl.len()).collect().item()


def _blank_to_null(*names: str) -> list[pl.Expr]:
    """Strip surrounding spaces; an empty value is a missing one."""
    return [pl.col(n).str.strip_chars().replace("", None).alias(n) for n in names]


def _prepare_items(raw: RawTables, ws: _Workspace) -> pl.DataFrame:
    items = raw.items.with_columns(_blank_to_null("item_id"))
    missing = pl.col("item_id").is_null()
    ws.reject(items.filter(missing), "items", "item_id", None, "missing_item_id")
    items = items.filter(~missing).collect().sort("row")
    first = items["row"] == items.select(pl.col("row").min().over("item_id")).to_series()
    ws.reject(items.filter(~first).lazy(), "items", "item_id", pl.col("item_id"), "duplicate_item_id")
    return items.filter(first)


def _filter_interactions(raw: RawTables, rules: CanonicalRules, items: pl.DataFrame, ws: _Workspace
                         ) -> tuple[pl.LazyFrame, pl.DataFrame]:
    """Apply the interaction rules; returns the usable rows (lazy) and the catalogue (with kept unknown items)."""
    inter = raw.interactions.with_columns(_blank_to_null("user_id", "item_id", "timestamp"))
    problem = (
        pl.when(pl.col("user_id").is_null()).then(pl.lit("missing_user_id"))
        .when(pl.col("item_id").is_null()).then(pl.lit("missing_item_id"))
        .when(pl.col("timestamp").is_null()).then(pl.lit("missing_timestamp"))
        .when(pl.col("ts").is_null()).then(pl.lit("bad_timestamp"))
    )
    parsed = ws.materialize(inter.with_columns(_parse_timestamp()).with_columns(problem.alias("_problem")),
                            "parsed")
    column_of = {"missing_user_id": "user_id", "missing_item_id": "item_id", "missing_timestamp": "timestamp",
                 "bad_timestamp": "timestamp"}
    ws.add_rejected(parsed.filter(pl.col("_problem").is_not_null()).select(
        pl.lit("interactions", dtype=pl.String).alias("table"),
        pl.lit(raw.interactions_file, dtype=pl.String).alias("file"),
        "row",
        pl.col("_problem").replace_strict(column_of, return_dtype=pl.String).alias("column"),
        pl.when(pl.col("_problem") == "bad_timestamp").then(pl.col("timestamp")).cast(pl.String).alias("value"),
        pl.col("_problem").alias("reason"),
    ))
    # a rating travels along where the source has one (the ranker's labels); a value that is not a number is null
    rating = [pl.col("rating").str.strip_chars().cast(pl.Float32, strict=False).alias("rating")] \
        if "rating" in parsed.collect_schema().names() else []
    keep = ["row", "user_id", "item_id", "ts", *(["rating"] if rating else [])]
    valid = parsed.filter(pl.col("_problem").is_null()).select("row", "user_id", "item_id", "ts", *rating)

    # Raw count filters: the official Amazon Books preprocessing (item >= 5 and user >= 5, then user >= 5).
    if rules.raw_min_item_count > 1 or rules.raw_min_user_count > 1:
        item_counts = valid.group_by("item_id").agg(pl.len().alias("_ic")).collect().lazy()
        user_counts = valid.group_by("user_id").agg(pl.len().alias("_uc")).collect().lazy()
        reason = (pl.when(pl.col("_ic") < rules.raw_min_item_count)
                  .then(pl.lit(f"item_count_below_{rules.raw_min_item_count}"))
                  .when(pl.col("_uc") < rules.raw_min_user_count)
                  .then(pl.lit(f"user_count_below_{rules.raw_min_user_count}")))
        flagged = ws.materialize(valid.join(item_counts, on="item_id", maintain_order="left")
                                 .join(user_counts, on="user_id", maintain_order="left")
                                 .with_columns(reason.alias("_problem")), "count-filter")
        ws.reject(flagged.filter(pl.col("_problem").is_not_null()), "interactions", None, None,
                  pl.col("_problem"))
        valid = flagged.filter(pl.col("_problem").is_null()).select(keep)
    if rules.min_user_count_after_filter > 1:
        valid = _drop_short_users(valid, rules.min_user_count_after_filter, ws,
                                  f"user_count_after_filter_below_{rules.min_user_count_after_filter}")

    known = items.select("item_id").lazy()
    unknown = valid.join(known, on="item_id", how="anti", maintain_order="left")
    if rules.unknown_items == "keep":
        # As the official code: an item missing from the item file joins the catalogue with no text.
        extra = unknown.group_by("item_id").agg(pl.col("row").min()).collect().sort("row")
        extra = extra.select(pl.lit(None, dtype=pl.Int64).alias("row"), "item_id",
                             *[pl.lit(None, dtype=pl.String).alias(f) for f in raw.text_fields])
        items = pl.concat([items, extra.select(items.columns)], how="vertical_relaxed")
    else:
        ws.reject(unknown, "interactions", "item_id", pl.col("item_id"), "unknown_item")
        valid = ws.materialize(valid.join(known, on="item_id", how="semi", maintain_order="left"), "known-items")

    valid = _drop_short_users(valid, rules.min_user_interactions, ws, "user_too_short")
    return valid, items


def _drop_short_users(valid: pl.LazyFrame, minimum: int, ws: _Workspace, reason: str) -> pl.LazyFrame:
    counts = valid.group_by("user_id").agg(pl.len().alias("_n")).collect().lazy()
    flagged = valid.join(counts, on="user_id", maintain_order="left")
    ws.reject(flagged.filter(pl.col("_n") < minimum), "interactions", "user_id", pl.col("user_id"), reason)
    return ws.materialize(flagged.filter(pl.col("_n") >= minimum).drop("_n"), reason)


def build_canonical(raw: RawTables, rules: CanonicalRules, workdir: Path, out: Path) -> CanonicalCounts:
    """Write items/interactions/users/rejected.parquet into `out`."""
    missing_keys = [k for k in rules.text_keys if k not in raw.text_fields]
    if missing_keys:
        raise UserError(f"{raw.items_file}: text key '{missing_keys[0]}' is not a column of the item file; "
                        f"available: {', '.join(raw.text_fields)} (set text_keys=...)")
    reserved = [k for k in rules.text_keys if k in RESERVED_TEXT_KEYS]
    if reserved:
        raise UserError(f"text key '{reserved[0]}' is a name the canonical tables use themselves; rename that "
                        f"column of {raw.items_file} (reserved: {', '.join(RESERVED_TEXT_KEYS)})")
    ws = _Workspace(workdir, {"interactions": raw.interactions_file, "items": raw.items_file})
    for lf in raw.rejected:
        ws.add_rejected(lf)
    items = _prepare_items(raw, ws)
    valid, items = _filter_interactions(raw, rules, items, ws)
    if rules.strict and (first := ws.first_rejected()) is not None:
        raise UserError(strict_message(first))
    if _count(valid) == 0:
        raise UserError(f"{raw.interactions_file}: no usable interactions remain; run with strict=true to see the "
                        "first rejected row")

    counts = valid.group_by("item_id").agg(pl.len().cast(pl.Int64).alias("n_interactions")).collect()
    items = items.join(counts, on="item_id", how="left", maintain_order="left") \
        .with_columns(pl.col("n_interactions").fill_null(0))
    if not rules.keep_items_without_interactions:
        ws.reject(items.lazy().filter(pl.col("n_interactions") == 0), "items", "item_id", pl.col("item_id"),
                  "item_without_interactions")
        items = items.filter(pl.col("n_interactions") > 0)
        if rules.strict and (first := ws.first_rejected()) is not None:
            raise UserError(strict_message(first))

    # ---- indices, text, order
    items = items.with_row_index("item_idx", offset=1).with_columns(pl.col("item_idx").cast(pl.Int32))
    text = item_text_expr(rules.text_keys, rules.item_prompt)
    # An item kept from the interactions alone (unknown_items=keep) has no text at all, as in the official code.
    items = items.with_columns(pl.when(pl.col("row").is_null()).then(pl.lit("")).otherwise(text).alias("text"))
    items = items.with_columns(
        pl.Series("text_sha256", text_sha256(items["text"]))
    )
    users = (valid.group_by("user_id").agg(
        pl.col("row").min().alias("_first"), pl.len().cast(pl.Int64).alias("n_interactions"),
        pl.col("ts").min().alias("first_timestamp"), pl.col("ts").max().alias("last_timestamp"),
    ).collect().sort("_first").with_row_index("user_idx").with_columns(pl.col("user_idx").cast(pl.Int32))
        .drop("_first"))
    interactions = (
        valid.join(users.lazy().select("user_id", "user_idx"), on="user_id")
        .join(items.lazy().select("item_id", "item_idx"), on="item_id")
        .select("user_idx", "item_idx", pl.col("ts").alias("timestamp"), pl.col("row").alias("source_row"),
                *([pl.col("rating")] if "rating" in valid.collect_schema().names() else []))
        .collect()
        .sort(["user_idx", "timestamp", "source_row"])
    )
    items = items.select("item_idx", "item_id", *raw.text_fields, "text", "text_sha256",
                         pl.col("n_interactions").cast(pl.Int64), pl.col("row").alias("source_row"))
    items.write_parquet(out / "items.parquet")
    interactions.write_parquet(out / "interactions.parquet")
    users.select("user_idx", "user_id", "n_interactions", "first_timestamp", "last_timestamp") \
        .write_parquet(out / "users.parquet")
    ws.all_rejected().sink_parquet(out / "rejected.parquet")

    by_reason = pl.scan_parquet(out / "rejected.parquet").group_by("table", "reason").len().sort("reason").collect()
    rejected: dict[str, dict[str, int]] = {"interactions": {}, "items": {}}
    for table, reason, n in by_reason.iter_rows():
        rejected[table][reason] = n
    return CanonicalCounts(
        users=users.height,
        items=items.height,
        items_with_interactions=int((items["n_interactions"] > 0).sum()),
        interactions=interactions.height,
        rows_used={"interactions": interactions.height,
                   "items": items.filter(pl.col("source_row").is_not_null()).height},
        rejected=rejected,
    )


def strict_message(row: dict) -> str:
    reason = row["reason"]
    text = REASON_TEXT.get(reason.split(":", 1)[0], reason.replace("_", " "))
    value = f" (got {row['value']!r})" if row["value"] is not None else ""
    return f"{where(row['file'], row['row'], row['column'])}: {text}{value}"
