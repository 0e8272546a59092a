"""User vectors for serving: `refresh users` writes them, `recommend` reads them.

A user's vector is what evaluation scores with: the User LLM's output at the last position of the user's history
(its last max_len items), L2-normalised. `refresh users --since T` recomputes the vectors of the users with an
interaction at or after T (the canonical interactions plus an optional file of newer ones) and carries every
other user's vector over bit-identical from the current version; `--all` computes everyone's (the first export).

Writes run/users/<version>/ (published by run/users/CURRENT, switched only once the version is complete):
  vectors.safetensors   embedding (U, D) float32, row r = users.parquet row r
  users.parquet         user_id, last_timestamp, n_interactions, refreshed (this run computed it), seen (item_idx
                        list: what recommend leaves out)
  rejected.parquet      rows of the new-interactions file that could not be used, with the reason
  manifest.json         the User LLM and embeddings version used, counts, every file's sha256; written last
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import numpy as np
import polars as pl
import torch
from safetensors.torch import load_file, save_file

from pipeline import versions
from pipeline.batches import user_vectors
from pipeline.data.readers import read_table
from pipeline.data.sequences import EvalExamples
from pipeline.data.text import text_recipe
from pipeline.embeddings import store
from pipeline.errors import ConfigError, UserError
from pipeline.io import (
    atomic_dir,
    fingerprint,
    folder_sha256,
    remove_leftover_temporaries,
    sha256_file,
    write_json_atomic,
)
from pipeline.lock import job_lock
from pipeline.models import build
from pipeline.run_dir import RunDir
from pipeline.runtime import device_of, distributed_state, gather_rows, my_share, on_main
from pipeline.search import normalise


def parse_since(value: str, now: float | None = None) -> int:
    """Unix seconds, or an ISO date/time (UTC unless it says otherwise) -> unix seconds; the future is refused."""
    text = str(value).strip()
    try:
        seconds = int(text)
    except ValueError:
        try:
            moment = datetime.fromisoformat(text)
        except ValueError:
            raise ConfigError(f"since={value!r}: expected unix seconds (e.g. 1700000000) or an ISO date "
                              "(e.g. 2026-11-22 or 2026-11-22T06:00)") from None
        seconds = int((moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp())
    if seconds > (now if now is not None else time.time()):
        raise ConfigError(f"since={value!r} is in the future; give the time of the last refresh")
    return seconds


@dataclass(frozen=True)
class RefreshUsersConfig:
    run: Path
    """Run folder with a trained User LLM (user_llm/ or user_llm_stage1/) and, where it reads them, embeddings/."""
    since: str | None = None
    """Recompute the users with an interaction at or after this time: unix seconds or an ISO date (UTC)."""
    all: bool = False
    """Compute every user's vector (the first export); instead of `since`."""
    interactions: Path | None = None
    """Interactions newer than the canonical tables: a Parquet/CSV file with user_id, item_id and timestamp (unix
    seconds) columns. Unknown items are set aside in rejected.parquet with the reason."""
    data: Path | None = None
    """Canonical tables of the run; null: the folder its stages recorded, else run/data."""
    user_llm: Literal["auto", "stage-two", "stage-one", "ranker-late"] = "auto"
    """Which User LLM: stage-two, stage-one, auto (stage two where it was trained), or ranker-late: the
    late-fusion ranker's user embeddings (what its head reads, not normalised; for downstream models), into
    run/ranker-late/users/ instead of run/users/."""
    max_len: int | None = None
    """History items read per user; null: the length the User LLM was trained with."""
    wait: float = 0
    """Seconds to wait for another job on the users store to finish (0: give up at once)."""
    device: str = "auto"
    """auto (cuda when available), cpu or cuda."""

    def __post_init__(self) -> None:
        if self.all == (self.since is not None):
            raise ConfigError("give exactly one of since=<time> (users active since then) and all=true (everyone)")
        if self.since is not None:
            parse_since(self.since)
        if self.max_len is not None and self.max_len < 1:
            raise ConfigError(f"max_len={self.max_len}: must be >= 1")


def _new_interactions(path: Path, item_ids: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(usable rows: user_id, item_idx, timestamp, order; rejected rows with a reason) of a new-interactions file."""
    raw = read_table(path, "user_id, item_id, timestamp columns")
    missing = [c for c in ("user_id", "item_id", "timestamp") if c not in raw.columns]
    if missing:
        raise UserError(f"{path}: no column {', '.join(missing)} (columns: {', '.join(raw.columns)})")
    rows = raw.with_row_index("row", offset=1).select(
        "row", pl.col("user_id").cast(pl.String).str.strip_chars(), pl.col("item_id").cast(pl.String).str.strip_chars(),
        pl.col("timestamp").cast(pl.String).str.strip_chars().cast(pl.Int64, strict=False).alias("timestamp"))
    rows = rows.join(item_ids, on="item_id", how="left")
    reason = (pl.when(pl.col("user_id").is_null() | (pl.col("user_id") == "")).then(pl.lit("missing_user_id"))
              .when(pl.col("timestamp").is_null()).then(pl.lit("bad_timestamp"))
              .when(pl.col("item_idx").is_null()).then(pl.lit("unknown_item_id")))
    rows = rows.with_columns(reason.alias("reason"))
    rejected = rows.filter(pl.col("reason").is_not_null()).select("row", "user_id", "item_id", "reason")
    usable = rows.filter(pl.col("reason").is_null()).select("user_id", "item_idx", "timestamp", pl.col("row")
                                                             .alias("order"))
    return usable, rejected


def _histories(data: Path, new: pl.DataFrame | None) -> pl.DataFrame:
    """Every user's items in order: user_id, seen (item_idx list), times (list), last_timestamp. `new`: the
    interactions added since the canonical tables (user_id, item_idx, timestamp, order)."""
    for name in ("users.parquet", "interactions.parquet"):
        if not (data / name).is_file():
            raise UserError(f"{data / name}: not found; pass data=<the run's canonical tables>")
    users = pl.read_parquet(data / "users.parquet", columns=["user_idx", "user_id"])
    old = pl.read_parquet(data / "interactions.parquet", columns=["user_idx", "item_idx", "timestamp", "source_row"])
    old = old.join(users, on="user_idx").select("user_id", pl.col("item_idx").cast(pl.Int64), "timestamp",
                                                pl.lit(0).alias("batch"),
                                                pl.col("source_row").cast(pl.Int64).alias("order"))
    parts = [old]
    if new is not None and new.height:
        parts.append(new.select("user_id", pl.col("item_idx").cast(pl.Int64), "timestamp", pl.lit(1).alias("batch"),
                                pl.col("order").cast(pl.Int64)))
    every = pl.concat(parts).sort("user_id", "timestamp", "batch", "order")  # the newer file after ties
    return every.group_by("user_id", maintain_order=True).agg(
        pl.col("item_idx").alias("seen"), pl.col("timestamp").alias("times"),
        pl.col("timestamp").max().alias("last_timestamp"))


def _examples(histories: pl.DataFrame) -> EvalExamples:
    lengths = histories["seen"].list.len().to_numpy()
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    items = histories["seen"].explode().to_numpy().astype(np.int64)
    stamps = histories["times"].explode().to_numpy().astype(np.int64)
    n = len(lengths)
    return EvalExamples("test", np.arange(n, dtype=np.int32), np.zeros(n, np.int32), np.zeros(n, np.int64), offsets,
                        items, stamps)


def load_scorer(run: Path, path: Path, embeddings: str | None = None):
    """The User LLM in `path` over the run's item source, the item table it scores with (N+1, D), which items are
    live (N+1,) bool, its metadata and the embeddings version folder (None for ID models)."""
    root, cached, live = None, None, None
    if "cached" in build.saved_item_source(path):
        root = store.version_root(run, embeddings)
        loaded = store.load_embeddings(root)
        cached, live = loaded.embeddings, loaded.present
    model, meta = build.load_user_model(path, cached)
    table = model.items.table()
    if live is None:
        live = torch.ones(table.shape[0], dtype=torch.bool)
        live[0] = False
    return model, table, live, meta, root


def run_users(config: RefreshUsersConfig, log=print) -> dict:
    """Refresh the user vectors; returns the summary (also logged)."""
    started = time.perf_counter()
    since = parse_since(config.since) if config.since is not None else None
    data = RunDir(config.run).data(config.data)
    ranker = config.user_llm == "ranker-late"
    base = RunDir(config.run).trained_user_llm("ranker-late").parent / "users" if ranker else RunDir(config.run).users
    device = device_of(config.device)
    state = distributed_state(device)  # under torchrun: each process computes a share of the vectors
    log = log if state.is_main_process else (lambda _: None)
    with job_lock(base, config.wait, log=log, state=state):
        if state.is_main_process:  # what a killed run left behind (the lock says none is running)
            remove_leftover_temporaries(base)
        path = RunDir(config.run).trained_user_llm(config.user_llm)
        model, table, _, meta, root = load_scorer(config.run, path)
        model.to(device)
        table = table.to(device)
        known = (store.version_items(root, data) if root is not None else
                 pl.read_parquet(data / "items.parquet", columns=["item_idx", "item_id"]))
        known = known.select("item_id", pl.col("item_idx").cast(pl.Int64))
        new, rejected = (_new_interactions(config.interactions, known) if config.interactions is not None
                         else (None, None))
        max_len = config.max_len or int(meta.get("max_len", 200))
        inputs = {"user_llm": folder_sha256(path), "embeddings": root.name if root else None,
                  "data": sha256_file(data / "interactions.parquet"), "since": since, "max_len": max_len,
                  "interactions": sha256_file(config.interactions) if config.interactions else None}
        parent, previous = _previous_version(base, config.all, log)
        # the interactions added so far (every earlier run's file, kept in the version) and this run's
        added = pl.concat([p for p in (previous[3] if previous is not None else None,
                                       new.select("user_id", "item_idx", "timestamp") if new is not None else None)
                           if p is not None and p.height] or [ADDED_SCHEMA.clear()])
        added = added.unique(maintain_order=True).with_row_index("order")  # an event delivered twice counts once
        histories = _histories(data, added)
        if previous is not None and previous[2].get("inputs") == inputs:
            log(f"nothing to do: user vectors {parent} were made from these interactions and this model")
            return {"parent": parent, "version": parent, "changed_version": False}
        active = _active_users(histories, previous, inputs, since, new, log)
        version = "u-" + fingerprint({"parent": parent, **inputs})[:12]
        summary = {"parent": parent, "version": version, "users": histories.height, "refreshed": int(active.sum()),
                   "carried": int((~active).sum()), "rejected_rows": rejected.height if rejected is not None else 0}
        chosen = np.flatnonzero(active)
        log(f"user vectors: {len(chosen):,} users with histories of up to {max_len} items")
        width = model.user_llm.dim if ranker else table.shape[1]  # a ranker's user embeddings: its width
        vectors = torch.zeros(histories.height, width)
        vectors[torch.from_numpy(chosen)] = _compute_vectors(model, table, histories, chosen, max_len, state, width,
                                                             normalised=not ranker)
        manifest = {"inputs": inputs, "parent": parent, "version": version, "user_llm": path.name,
                    "max_len": max_len, "dim": int(width), "normalised": not ranker,
                    "since_iso": datetime.fromtimestamp(since, UTC).isoformat() if since else None,
                    **{k: summary[k] for k in ("users", "refreshed", "carried", "rejected_rows")}}
        on_main(state, lambda: _write_version(base, version, vectors, histories, active, previous, added, rejected,
                                              manifest))
        if not state.is_main_process:
            return {**summary, "changed_version": True}
    summary.update(changed_version=True, seconds=round(time.perf_counter() - started, 2))
    log(f"user vectors {version}: {summary['refreshed']:,} refreshed, {summary['carried']:,} carried over, "
        f"{summary['rejected_rows']:,} rejected rows; {summary['seconds']:.1f}s")
    return summary


def _previous_version(base: Path, recompute_all: bool, log) -> tuple[str | None, tuple | None]:
    """The current users version and its contents (None, None before the first); a damaged one is an error,
    unless every vector is recomputed anyway (`recompute_all`)."""
    parent = versions.current_version(base, hint=USERS_HINT) if (base / "CURRENT").is_file() else None
    try:
        return parent, (_load_users(base / parent) if parent else None)
    except UserError as e:
        if not recompute_all:
            raise
        log(f"note: {e}; computing every user's vector anew")
        return parent, None


def _active_users(histories: pl.DataFrame, previous, inputs: dict, since: int | None, new: pl.DataFrame | None,
                  log) -> np.ndarray:
    """(U,) bool: the users whose vector is computed anew; the others keep the previous version's. Everyone,
    unless `since` is given and the previous vectors come from the same User LLM, embeddings and length."""
    same_scorer = previous is not None and all(previous[2]["inputs"].get(k) == inputs[k]
                                               for k in ("user_llm", "embeddings", "max_len"))
    if since is None or not same_scorer:
        if since is not None:
            log("no earlier user vectors from this User LLM, embeddings and length: computing every user's")
        return np.ones(histories.height, dtype=bool)
    known_users = histories["user_id"].is_in(previous[0]["user_id"].implode()).to_numpy()
    in_file = histories["user_id"].is_in(new["user_id"].implode()).to_numpy() if new is not None else \
        np.zeros(histories.height, dtype=bool)  # late events too (their time may be before `since`)
    return (histories["last_timestamp"].to_numpy() >= since) | ~known_users | in_file


def _compute_vectors(model, table: torch.Tensor, histories: pl.DataFrame, chosen: np.ndarray, max_len: int,
                     state, width: int, normalised: bool = True) -> torch.Tensor:
    """The (normalised) vectors of the `chosen` users (rows of `histories`), each process a share, gathered."""
    from tqdm import tqdm

    mine = chosen[my_share(len(chosen), state)]
    computed = np.zeros((len(mine), width), dtype=np.float32)
    with tqdm(total=len(mine), unit="user", desc="user vectors", disable=None if state.is_main_process
              else True) as bar:
        for start in range(0, len(mine), 4096):
            raw = user_vectors(model, table, _examples(histories[mine[start:start + 4096]]), max_len)
            computed[start:start + 4096] = normalise(raw) if normalised else raw.numpy()
            bar.update(min(4096, len(mine) - start))
    return torch.from_numpy(gather_rows(computed, state))


def _write_version(base: Path, version: str, vectors: torch.Tensor, histories: pl.DataFrame, active: np.ndarray,
                   previous, added: pl.DataFrame, rejected: pl.DataFrame | None, manifest: dict) -> None:
    """users/<version>/ (carried-over users keep their earlier vectors bit for bit), manifest last, then CURRENT."""
    if previous is not None and (~active).any():
        old_rows = dict(zip(previous[0]["user_id"].to_list(), range(previous[0].height), strict=True))
        keep = np.flatnonzero(~active)
        source = torch.tensor([old_rows[u] for u in histories["user_id"].gather(keep).to_list()])
        vectors[torch.from_numpy(keep)] = previous[1][source]  # bit-identical
    users = histories.select("user_id", "last_timestamp", pl.col("seen").list.len().alias("n_interactions"),
                             pl.Series("refreshed", active), pl.col("seen").cast(pl.List(pl.Int32)))
    with atomic_dir(base / version) as out:
        save_file({"embedding": vectors.contiguous()}, str(out / "vectors.safetensors"))
        users.write_parquet(out / "users.parquet")
        added.drop("order").write_parquet(out / "interactions.parquet")
        files = ["vectors.safetensors", "users.parquet", "interactions.parquet"]
        if rejected is not None:
            rejected.write_parquet(out / "rejected.parquet")
            files.append("rejected.parquet")
        write_json_atomic(out / "manifest.json", {
            **manifest, "files": {name: sha256_file(out / name) for name in files},
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    versions.publish(base, version)


ADDED_SCHEMA = pl.DataFrame(schema={"user_id": pl.String, "item_idx": pl.Int64, "timestamp": pl.Int64})
USERS_HINT = ("roll back to another version (`hllm-pipeline refresh rollback --store users --run RUN`), or rerun "
              "`hllm-pipeline refresh users --all`")


def _load_users(root: Path) -> tuple[pl.DataFrame, torch.Tensor, dict, pl.DataFrame]:
    """A users version: its users.parquet, vectors (U, D), manifest and the interactions added since the
    canonical tables, checksums verified."""
    manifest = versions.read_manifest(root, required=("inputs", "files"), hint=USERS_HINT)
    for name, sha in manifest["files"].items():
        if not (root / name).is_file() or sha256_file(root / name) != sha:
            raise UserError(f"{root / name}: missing or its checksum does not match the manifest; {USERS_HINT}")
    added = (pl.read_parquet(root / "interactions.parquet") if (root / "interactions.parquet").is_file()
             else ADDED_SCHEMA.clear())
    return (pl.read_parquet(root / "users.parquet"), load_file(str(root / "vectors.safetensors"))["embedding"],
            manifest, added.select(pl.col("user_id").cast(pl.String), pl.col("item_idx").cast(pl.Int64),
                                   pl.col("timestamp").cast(pl.Int64)))


@dataclass(frozen=True)
class RecommendConfig:
    user: str
    """The user's original id (user_id in the data), as `refresh users` exported it."""
    run: Path
    """Run folder with users/ (from `refresh users`) and the model and embeddings the vectors were made with."""
    k: int = 10
    """How many items."""
    data: Path | None = None
    """Canonical tables of the run (for item texts); null: the folder its stages recorded, else run/data."""

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ConfigError(f"k={self.k}: must be >= 1")


def recommend(config: RecommendConfig, log=print) -> pl.DataFrame:
    """The user's top-k items (rank, item_id, score, text) from their stored vector, over the current item
    version: items the user has seen and retired items left out."""
    base = RunDir(config.run).users
    version = versions.current_version(base, hint=USERS_HINT,
                                       first=f"run `hllm-pipeline refresh users all=true --run {config.run}` first")
    users, vectors, manifest, _ = _load_users(base / version)
    row = users.with_row_index("row").filter(pl.col("user_id") == str(config.user).strip())
    if row.height == 0:
        raise UserError(f"{base / version}: no user {config.user!r} among its {users.height:,} users (ids like "
                        f"{users['user_id'][0]!r}); refresh users exports every user with interactions")
    path = config.run / manifest["user_llm"]
    if not (path / "user_llm.json").is_file() or folder_sha256(path) != manifest["inputs"]["user_llm"]:
        raise UserError(f"{path}: not the User LLM that made user vectors {version} (retrained or gone); run "
                        f"`hllm-pipeline refresh users --all --run {config.run}`")
    model, table, live, _, root = load_scorer(config.run, path)
    if root is not None and root.name != manifest["inputs"]["embeddings"]:
        log(f"note: these vectors were made with embeddings {manifest['inputs']['embeddings']}; ranking the items "
            f"of {root.name} (run `refresh users` to update them)")
    items = torch.from_numpy(normalise(table))  # (N+1, D)
    scores = (items @ vectors[int(row["row"][0])]).double()  # (N+1,)
    hidden = ~live.clone()
    seen = torch.tensor(row["seen"][0].to_list(), dtype=torch.long)
    hidden[seen[seen < len(hidden)]] = True
    scores[hidden] = -np.inf
    k = min(config.k, int((~hidden).sum()))
    order = np.lexsort((np.arange(len(scores)), -scores.numpy()))[:k]  # score desc, ties by item_idx
    idx = pl.DataFrame({"item_idx": order.astype(np.int64), "score": scores.numpy()[order]})
    data_items = RunDir(config.run).data(config.data) / "items.parquet"
    names = pl.read_parquet(root / "items.parquet") if root is not None else pl.read_parquet(data_items)
    if "text" not in names.columns and data_items.is_file():  # versions written before texts were kept
        names = names.join(pl.read_parquet(data_items, columns=["item_idx", "text"]), on="item_idx", how="left")
    if "text" in names.columns and (data_items.parent / "stats.json").is_file():  # show the text without its prompt
        prompt = text_recipe(data_items.parent).item_prompt
        names = names.with_columns(pl.col("text").str.strip_prefix(prompt))
    columns = [c for c in ("item_id", "text") if c in names.columns]
    out = idx.join(names.select(pl.col("item_idx").cast(pl.Int64), *columns), on="item_idx", how="left",
                   maintain_order="left")
    return out.with_row_index("rank", offset=1).select("rank", *columns, "score", "item_idx")
