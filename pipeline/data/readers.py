"""Readers for the raw formats: each turns a source into `RawTables` of strings, with row numbers.

Readers only parse. Every later decision (what is valid, what is kept, which index an item gets) is made once,
for all formats, in `pipeline.data.canonical`. Rows a reader cannot parse at all become rejected rows here.
Row numbers are 1-based data rows (a header line is not counted).
"""

from __future__ import annotations

import ast
import codecs
import contextlib
import csv
import functools
import gzip
import io
import json
import multiprocessing
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import UserError, where

REJECTED_SCHEMA = {
    "table": pl.String,
    "file": pl.String,
    "row": pl.Int64,
    "column": pl.String,
    "value": pl.String,
    "reason": pl.String,
}

MOVIELENS_100K_GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
    "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western",
)  # fmt: skip


@dataclass
class RawTables:
    """What a reader hands to the canonical builder. All id and text columns are strings."""

    interactions: pl.LazyFrame
    """Columns: row (Int64), user_id, item_id, timestamp (all String; timestamp still unparsed), and rating where
    the source has one."""
    interactions_file: str
    items: pl.LazyFrame
    """Columns: row (Int64), item_id, then one String column per text field."""
    items_file: str
    text_fields: tuple[str, ...]
    """The text columns present in `items`, in file order."""
    rejected: list[pl.LazyFrame] = field(default_factory=list)
    """Rows that could not be parsed at all, in REJECTED_SCHEMA."""
    inputs: list[Path] = field(default_factory=list)
    """Every file read, for fingerprints."""


# --------------------------------------------------------------------------------------------------------------
# Low-level helpers


def _require_file(path: Path) -> Path:
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    if path.stat().st_size == 0:
        raise UserError(f"{path}: file is empty")
    return path


def check_utf8(path: Path, chunk_size: int = 1 << 24) -> None:
    """Raise a one-line UserError naming the line if `path` is not valid UTF-8 (streamed, C-speed decode)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with open(path, "rb") as f:
        while True:
            chunk = f.read(chunk_size)
            final = not chunk
            try:
                decoder.decode(chunk, final=final)
            except UnicodeDecodeError as e:
                bad = e.start  # position inside chunk + pending bytes from the previous chunk
                pending = len(e.object) - len(chunk)
                pos = offset - pending + bad
                with open(path, "rb") as g:
                    head = g.read(pos)
                line = head.count(b"\n") + 1
                column = pos - (head.rfind(b"\n") + 1) + 1
                raise UserError(
                    f"{path}: line {line}, byte {column}: text is not valid UTF-8; "
                    "if the file is Latin-1, set encoding=latin-1"
                ) from None
            if final:
                return
            offset += len(chunk)


def as_utf8_file(path: Path, encoding: str, workdir: Path) -> Path:
    """A UTF-8, uncompressed version of `path` that polars can scan: the file itself when it already is one."""
    _require_file(path)
    gz = path.suffix == ".gz"
    if not gz and encoding.lower().replace("-", "").replace("_", "") in ("utf8", "utf8sig"):
        check_utf8(path)
        return path
    fd, name = tempfile.mkstemp(prefix=path.name.removesuffix(".gz") + ".", suffix=".utf8", dir=workdir)
    os.close(fd)
    out = Path(name)
    opener = gzip.open if gz else open
    try:
        with opener(path, "rb") as src, open(out, "w", encoding="utf-8", newline="") as dst:
            reader = io.TextIOWrapper(src, encoding=encoding, newline="")
            shutil.copyfileobj(reader, dst, 1 << 22)
    except UnicodeDecodeError as e:
        raise UserError(
            f"{path}: text is not valid {encoding} ({e.reason}); set encoding= to the file's encoding"
        ) from None
    except (OSError, EOFError) as e:
        raise UserError(f"{path}: cannot read ({e})") from None
    except LookupError:
        raise UserError(f"unknown encoding '{encoding}'; use e.g. utf-8 or latin-1") from None
    if out.stat().st_size == 0:
        raise UserError(f"{path}: file is empty")
    return out


def _ragged_row(path: Path, separator: str, quote_char: str | None, has_header: bool, expected: int
                ) -> tuple[int, int]:
    """Find the first data row whose field count differs from `expected` (slow path, only after a failure)."""
    quoting = {"quotechar": quote_char} if quote_char else {"quoting": csv.QUOTE_NONE}
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter=separator, **quoting)
        if has_header:
            next(reader, None)
        for row_number, fields in enumerate(reader, start=1):
            if fields and len(fields) != expected:
                return row_number, len(fields)
    return -1, -1


def scan_delimited(
    path: Path,
    display: Path,
    *,
    separator: str,
    columns: list[str] | None,
    quote_char: str | None = '"',
) -> pl.LazyFrame:
    """Scan a delimited UTF-8 file as all-String columns plus a 1-based `row` (header not counted).

    `columns=None` means the file has a header, which names the columns (a column of the file called `row` is
    dropped: the name is taken by the row number). A row with more fields than the header is a UserError
    naming that row; a row with fewer reads as missing values for the fields it lacks.
    """
    has_header = columns is None
    lf = pl.scan_csv(
        path,
        has_header=has_header,
        separator=separator,
        quote_char=quote_char,
        new_columns=columns,
        infer_schema=False,
        row_index_name="__row__",
        row_index_offset=1,
        raise_if_empty=False,
    )
    try:
        header = lf.collect_schema().names()[1:]
        # Parsing every column is what detects a ragged row (a bare row count does not look at fields).
        pl.scan_csv(
            path, has_header=has_header, separator=separator, quote_char=quote_char, infer_schema=False,
            new_columns=columns, raise_if_empty=False,
        ).select(pl.all().null_count()).collect()
    except pl.exceptions.ComputeError as e:
        if "more fields" in str(e) or "ragged" in str(e).lower():
            expected = len(columns) if columns else len(_header(path, separator))
            row, got = _ragged_row(path, separator, quote_char, has_header, expected)
            raise UserError(f"{where(display, row)}: has {got} fields, expected {expected}") from None
        raise UserError(f"{display}: cannot parse as '{separator}'-separated text ({str(e).splitlines()[0]})") from None
    if not header:
        raise UserError(f"{display}: file is empty")
    if "row" in header:
        lf = lf.drop("row")
    return lf.rename({"__row__": "row"}).with_columns(pl.col("row").cast(pl.Int64))


def _header(path: Path, separator: str) -> list[str]:
    with open(path, encoding="utf-8", newline="") as f:
        return next(csv.reader(f, delimiter=separator), [])


def require_columns(lf: pl.LazyFrame, display: Path, required: list[str]) -> None:
    names = lf.collect_schema().names()
    missing = [c for c in required if c not in names]
    if missing:
        found = [n for n in names if n != "row"]
        raise UserError(
            f"{display}: missing column '{missing[0]}'; expected columns {', '.join(required)}, "
            f"found {', '.join(found) or 'none'}"
        )


def split_lines(path: Path, table: str, encoding: str, sep: str, columns: list[str]
                ) -> tuple[pl.LazyFrame, pl.LazyFrame]:
    """Read a small file of `sep`-separated lines without quoting (GroupLens u.data, u.item, *.dat).

    Returns (rows with exactly len(columns) fields, the other lines as rejected rows).
    """
    _require_file(path)
    try:
        text = path.read_bytes().decode(encoding)
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: text is not valid {encoding} ({e.reason}); set encoding=") from None
    except LookupError:
        raise UserError(f"unknown encoding '{encoding}'; use e.g. utf-8 or latin-1") from None
    lines = re.split(r"\r?\n", text)  # not str.splitlines: Latin-1 0x85 and 0x1c-0x1e are not line ends
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        raise UserError(f"{path}: file is empty")
    frame = pl.DataFrame({"row": pl.Series(range(1, len(lines) + 1), dtype=pl.Int64), "line": lines})
    parts = pl.col("line").str.split(sep)
    frame = frame.with_columns(parts.alias("_parts"), parts.list.len().alias("_n"))
    good = frame.filter(pl.col("_n") == len(columns)).select(
        "row", *[pl.col("_parts").list.get(i).alias(name) for i, name in enumerate(columns)]
    )
    good = good.with_columns([pl.when(pl.col(c) == "").then(None).otherwise(pl.col(c)).alias(c) for c in columns])
    bad = frame.filter(pl.col("_n") != len(columns)).select(
        pl.lit(table).alias("table"),
        pl.lit(str(path)).alias("file"),
        "row",
        pl.lit(None, dtype=pl.String).alias("column"),
        pl.col("line").alias("value"),
        pl.format("malformed_line: {} fields, expected {}", pl.col("_n"), pl.lit(len(columns))).alias("reason"),
    )
    return good.lazy(), bad.lazy()


# --------------------------------------------------------------------------------------------------------------
# MovieLens: GroupLens ML-100K and ML-1M layouts, and RecBole atomic files


def read_movielens(source: Path, encoding: str | None, workdir: Path) -> RawTables:
    """GroupLens ML-100K (u.data, u.item), ML-1M (ratings.dat, movies.dat) or RecBole (*.inter, *.item)."""
    if not source.is_dir():
        raise UserError(f"{source}: expected a directory holding a MovieLens dataset")
    if (source / "u.data").exists() or (source / "u.item").exists():
        return _read_ml100k(source, encoding or "latin-1")
    if (source / "ratings.dat").exists() or (source / "movies.dat").exists():
        return _read_ml1m(source, encoding or "latin-1")
    inter = sorted(source.glob("*.inter"))
    item = sorted(source.glob("*.item"))
    if inter or item:
        if len(inter) != 1 or len(item) != 1:
            raise UserError(f"{source}: expected exactly one *.inter and one *.item file, found "
                            f"{len(inter)} and {len(item)}")
        return _read_recbole_movielens(inter[0], item[0], encoding or "utf-8", workdir)
    raise UserError(
        f"{source}: no MovieLens files found; expected u.data and u.item (ML-100K), ratings.dat and movies.dat "
        "(ML-1M), or a RecBole *.inter and *.item pair"
    )


def _genre_names(path: Path, encoding: str) -> list[str]:
    """u.genre: 'name|index' lines."""
    pairs = []
    for number, line in enumerate(path.read_bytes().decode(encoding, "replace").split("\n"), start=1):
        if line.strip():
            name, _, index = line.strip().partition("|")
            if not index.isdigit():
                raise UserError(f"{path}: line {number}: expected 'genre|number', got {line.strip()!r}")
            pairs.append((int(index), name))
    return [name for _, name in sorted(pairs)]


def _read_ml100k(source: Path, encoding: str) -> RawTables:
    data_path, item_path = source / "u.data", source / "u.item"
    inter, bad_inter = split_lines(data_path, "interactions", "utf-8", "\t",
                                   ["user_id", "item_id", "rating", "timestamp"])
    genres = list(MOVIELENS_100K_GENRES)
    if (source / "u.genre").exists():
        genres = _genre_names(source / "u.genre", encoding)
    item_cols = ["item_id", "title", "release_date", "video_release_date", "imdb_url"] + [
        f"g{i}" for i in range(len(genres))]
    items, bad_items = split_lines(item_path, "items", encoding, "|", item_cols)
    flags = [pl.when(pl.col(f"g{i}") == "1").then(pl.lit(g)) for i, g in enumerate(genres)]
    items = items.select(
        "row", "item_id", "title",
        pl.concat_list(flags).list.drop_nulls().list.join("|").alias("genres"),
    ).with_columns(pl.when(pl.col("genres") == "").then(None).otherwise(pl.col("genres")).alias("genres"))
    return RawTables(
        interactions=interaction_columns(inter),
        interactions_file=str(data_path),
        items=items,
        items_file=str(item_path),
        text_fields=("title", "genres"),
        rejected=[bad_inter, bad_items],
        inputs=[data_path, item_path],
    )


def _read_ml1m(source: Path, encoding: str) -> RawTables:
    ratings_path, movies_path = source / "ratings.dat", source / "movies.dat"
    inter, bad_inter = split_lines(ratings_path, "interactions", encoding, "::",
                                   ["user_id", "item_id", "rating", "timestamp"])
    items, bad_items = split_lines(movies_path, "items", encoding, "::", ["item_id", "title", "genres"])
    return RawTables(
        interactions=interaction_columns(inter),
        interactions_file=str(ratings_path),
        items=items,
        items_file=str(movies_path),
        text_fields=("title", "genres"),
        rejected=[bad_inter, bad_items],
        inputs=[ratings_path, movies_path],
    )


def interaction_columns(inter: pl.LazyFrame) -> pl.LazyFrame:
    """The columns the canonical tables keep: row, ids, timestamp, and the rating where the file has one."""
    rating = ["rating"] if "rating" in inter.collect_schema().names() else []
    return inter.select("row", "user_id", "item_id", "timestamp", *rating)


def scan_recbole(path: Path, encoding: str, workdir: Path) -> pl.LazyFrame:
    """A RecBole atomic file: tab-separated with a 'name:type' header. CRLF line ends are accepted."""
    utf8 = as_utf8_file(path, encoding, workdir)
    lf = scan_delimited(utf8, path, separator="\t", quote_char=None, columns=None)
    names = lf.collect_schema().names()
    renamed = {n: n.split(":", 1)[0].strip() for n in names}
    lf = lf.rename(renamed)
    # polars keeps a trailing '\r' of CRLF files in the last column
    last = renamed[names[-1]]
    return lf.with_columns(pl.col(last).str.strip_suffix("\r"))


def _read_recbole_movielens(inter_path: Path, item_path: Path, encoding: str, workdir: Path) -> RawTables:
    inter = scan_recbole(inter_path, encoding, workdir)
    require_columns(inter, inter_path, ["user_id", "item_id", "timestamp"])
    items = scan_recbole(item_path, encoding, workdir)
    require_columns(items, item_path, ["item_id", "movie_title"])
    names = items.collect_schema().names()
    genre_col = next((c for c in ("genre", "class", "genres") if c in names), None)
    year = pl.col("release_year").cast(pl.Float64, strict=False).cast(pl.Int64, strict=False).cast(pl.String) \
        if "release_year" in names else pl.lit(None, dtype=pl.String)
    # RecBole splits "Toy Story (1995)" into title and year and joins genres with spaces: restore GroupLens text.
    title = pl.when(year.is_not_null()).then(pl.format("{} ({})", pl.col("movie_title"), year)) \
        .otherwise(pl.col("movie_title"))
    genres = pl.col(genre_col).str.strip_chars().str.replace_all(r"\s+", "|") if genre_col else pl.lit(None)
    items = items.select("row", "item_id", title.alias("title"), genres.cast(pl.String).alias("genres"))
    return RawTables(
        interactions=interaction_columns(inter),
        interactions_file=str(inter_path),
        items=items,
        items_file=str(item_path),
        text_fields=("title", "genres"),
        inputs=[inter_path, item_path],
    )


# --------------------------------------------------------------------------------------------------------------
# Official HLLM CSV layout and PixelRec


def resolve_csv_pair(source: Path, items: Path | None) -> tuple[Path, Path]:
    """Find (interactions CSV, item CSV): explicit paths, or the official `dataset/` + `information/` layout."""
    if source.is_dir():
        found = sorted((source / "dataset").glob("*.csv")) if (source / "dataset").is_dir() else []
        if len(found) != 1:
            raise UserError(
                f"{source}: expected the official layout dataset/<name>.csv + information/<name>.csv with exactly "
                f"one interactions file (found {len(found)}); or pass the interactions CSV as --source and the "
                "item CSV as items=PATH"
            )
        source = found[0]
    if items is None:
        items = source.parent.parent / "information" / source.name
        if not items.exists():
            raise UserError(f"{source}: no item file given; set items=PATH (looked for {items})")
    return source, items


def read_hllm_csv(source: Path, items_path: Path | None, text_keys: tuple[str, ...] | None, encoding: str,
                  workdir: Path, default_keys: tuple[str, ...] = ("title", "tag", "description")) -> RawTables:
    """Interactions CSV (item_id, user_id, timestamp) and item CSV (item_id + text fields), with headers."""
    inter_path, items_path = resolve_csv_pair(source, items_path)
    inter = scan_delimited(as_utf8_file(inter_path, encoding, workdir), inter_path, separator=",", columns=None)
    require_columns(inter, inter_path, ["item_id", "user_id", "timestamp"])
    items = scan_delimited(as_utf8_file(items_path, encoding, workdir), items_path, separator=",", columns=None)
    require_columns(items, items_path, ["item_id"])
    names = items.collect_schema().names()
    if text_keys is None:
        text_keys = tuple(k for k in default_keys if k in names)
        if not text_keys:
            raise UserError(f"{items_path}: none of the text columns {', '.join(default_keys)} found; "
                            "set text_keys= to the columns that describe an item")
    require_columns(items, items_path, ["item_id", *text_keys])
    return RawTables(
        interactions=interaction_columns(inter),
        interactions_file=str(inter_path),
        items=items.select("row", "item_id", *text_keys),
        items_file=str(items_path),
        text_fields=tuple(text_keys),
        inputs=[inter_path, items_path],
    )


# --------------------------------------------------------------------------------------------------------------
# Amazon Books: ratings_Books.csv + meta_Books.json(.gz)


def resolve_amazon(source: Path, items: Path | None) -> tuple[Path, Path]:
    if source.is_dir():
        ratings = source / "ratings_Books.csv"
        if not ratings.exists() and (source / "ratings_Books.csv.gz").exists():
            ratings = source / "ratings_Books.csv.gz"
        if items is None:
            items = next((p for p in (source / "meta_Books.json", source / "meta_Books.json.gz") if p.exists()),
                         source / "meta_Books.json.gz")
        source = ratings
    if items is None:
        raise UserError(f"{source}: no metadata file given; set items=PATH to meta_Books.json(.gz)")
    return _require_file(source), _require_file(items)


def parse_record(line: str) -> dict | None:
    """One metadata line: JSON, or a Python literal as in the 2014 dump (parsed safely, never eval'd)."""
    if line.lstrip().startswith('{"'):  # looks like JSON: the fast parser first
        try:
            obj = json.loads(line)
            return obj if isinstance(obj, dict) else None
        except json.JSONDecodeError:
            pass
    try:
        obj = ast.literal_eval(line)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return None
    return obj if isinstance(obj, dict) else None


def _text_value(value: object) -> str | None:
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        return " ".join(str(v) for v in value if v is not None) or None
    return str(value)


def iter_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            yield from enumerate(f, start=1)
    except (OSError, EOFError) as e:
        raise UserError(f"{path}: cannot read ({e})") from None


def _batches(path: Path, size: int) -> Iterator[list[tuple[int, bytes]]]:
    batch: list[tuple[int, bytes]] = []
    for number, raw in iter_lines(path):
        if raw.strip():
            batch.append((number, raw))
            if len(batch) == size:
                yield batch
                batch = []
    if batch:
        yield batch


def parse_metadata_batch(batch: list[tuple[int, bytes]], fields: tuple[str, ...], id_key: str,
                         file: str) -> tuple[dict[str, list], dict[str, list]]:
    """Parse lines into columns (row, item_id, fields...) and rejected rows (REJECTED_SCHEMA columns)."""
    rows: dict[str, list] = {"row": [], "item_id": [], **{f: [] for f in fields}}
    bad: dict[str, list] = {name: [] for name in REJECTED_SCHEMA}
    for number, raw in batch:
        try:
            record = parse_record(raw.decode("utf-8"))
            reason = "malformed_line: not a JSON object or Python dict literal"
        except UnicodeDecodeError:
            record, reason = None, "undecodable_text: not valid UTF-8"
        if record is None:
            for key, value in (("table", "items"), ("file", file), ("row", number), ("column", None),
                               ("value", raw[:200].decode("utf-8", "replace").rstrip()), ("reason", reason)):
                bad[key].append(value)
            continue
        rows["row"].append(number)
        rows["item_id"].append(_text_value(record.get(id_key)))
        for f in fields:
            rows[f].append(_text_value(record.get(f)))
    return rows, bad


def convert_metadata(meta_path: Path, out_path: Path, fields: tuple[str, ...], id_key: str = "asin",
                     batch_lines: int = 20_000, workers: int | None = None, log=None) -> Path:
    """Stream one-record-per-line metadata into Parquet: (row, item_id, fields...) and a .rejected.parquet.

    Parsing Python literals is the slow part (tens of microseconds a line), so batches go to a process pool;
    results come back in file order and are written as they arrive.
    """
    schema = pa.schema([("row", pa.int64()), ("item_id", pa.string())] + [(f, pa.string()) for f in fields])
    rej_schema = pa.schema([(k, pa.int64() if k == "row" else pa.string()) for k in REJECTED_SCHEMA])
    rejected_path = out_path.with_suffix(".rejected.parquet")
    workers = workers or min(4, os.cpu_count() or 1)
    parse = functools.partial(parse_metadata_batch, fields=fields, id_key=id_key, file=str(meta_path))
    start, done, last_log = time.perf_counter(), 0, time.perf_counter()
    with pq.ParquetWriter(out_path, schema) as writer, pq.ParquetWriter(rejected_path, rej_schema) as rej_writer, \
            multiprocessing.get_context("spawn").Pool(workers) if workers > 1 else contextlib.nullcontext() as pool:
        results = pool.imap(parse, _batches(meta_path, batch_lines)) if pool else map(parse, _batches(
            meta_path, batch_lines))
        for rows, bad in results:
            writer.write_table(pa.table(rows, schema=schema))
            rej_writer.write_table(pa.table(bad, schema=rej_schema))
            done += len(rows["row"]) + len(bad["row"])
            if log and time.perf_counter() - last_log > 10:
                last_log = time.perf_counter()
                log(f"  {meta_path.name}: {done:,} records parsed ({done / (last_log - start):,.0f}/s)")
    if done == 0:
        raise UserError(f"{meta_path}: file is empty")
    return out_path


def read_amazon_books(source: Path, items_path: Path | None, text_keys: tuple[str, ...] | None,
                      workdir: Path, log=None) -> RawTables:
    ratings_path, meta_path = resolve_amazon(source, items_path)
    text_keys = text_keys or ("title", "description")
    ratings_utf8 = as_utf8_file(ratings_path, "utf-8", workdir)
    inter = scan_delimited(ratings_utf8, ratings_path, separator=",", columns=["user_id", "item_id", "rating",
                                                                                 "timestamp"])
    meta_parquet = convert_metadata(meta_path, workdir / "meta.parquet", text_keys, log=log)
    rejected_meta = pl.scan_parquet(meta_parquet.with_suffix(".rejected.parquet"))
    return RawTables(
        interactions=interaction_columns(inter),
        interactions_file=str(ratings_path),
        items=pl.scan_parquet(meta_parquet),
        items_file=str(meta_path),
        text_fields=tuple(text_keys),
        rejected=[rejected_meta],
        inputs=[ratings_path, meta_path],
    )


def read_table(path: Path, expected: str) -> pl.DataFrame:
    """A Parquet or CSV file of new input (CSV columns as strings: ids stay text, as the canonical tables keep
    them); `expected`: what it should hold, for the errors."""
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise UserError(f"{path}: file is empty; expected {expected}")
    try:
        if path.suffix == ".parquet":
            return pl.read_parquet(path)
        return pl.read_csv(path, infer_schema=False)
    except (pl.exceptions.PolarsError, OSError) as e:
        raise UserError(f"{path}: not a readable {'Parquet' if path.suffix == '.parquet' else 'CSV'} file "
                        f"({' '.join(str(e).split())[:160]})") from None
