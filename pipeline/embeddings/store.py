"""The item-embedding store: `embeddings/<version>/` with shards and a manifest.

    shard-00000.safetensors   tensors item_idx int64 [n] and embedding [n, d] (or .parquet: the same columns,
                              embedding as a fixed-size list)
    items.parquet             item_idx, item_id, text_sha256 (and text) of every embedded item
    manifest.json             model fingerprint, dim, dtype, rows, per-shard sha256, parent version (a refresh's
                              starting point); written last, atomically

Versions follow pipeline.versions (manifest last, CURRENT, publish, rollback, prune), as user vectors do. While a
job runs, each finished shard is renamed into place and
listed in progress.json, so a rerun after a kill continues from the last complete shard. Readers memory-map
shards and refuse one whose sha256 differs from the manifest. item_idx values are stable across the versions of
a run: a refresh gives new items new values and leaves a retired item's value unused.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from pipeline import versions
from pipeline.errors import UserError
from pipeline.io import atomic_path, remove_leftover_temporaries, sha256_file, write_json_atomic
from pipeline.run_dir import RunDir
from pipeline.versions import MANIFEST

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def shard_name(index: int, fmt: str) -> str:
    return f"shard-{index:05d}.{fmt}"


def write_shard(path: Path, item_idx: np.ndarray, embedding: torch.Tensor, fmt: str) -> str:
    """Write one shard atomically; returns its sha256."""
    with atomic_path(path) as tmp:
        if fmt == "safetensors":
            save_file({"item_idx": torch.as_tensor(item_idx, dtype=torch.int64).contiguous(),
                       "embedding": embedding.contiguous()}, str(tmp))
        elif fmt == "parquet":
            values = embedding.float().numpy() if embedding.dtype == torch.bfloat16 else embedding.numpy()
            dim = values.shape[1]
            column = pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), dim)
            pq.write_table(pa.table({"item_idx": pa.array(item_idx, pa.int64()), "embedding": column}), tmp)
        else:
            raise ValueError(f"unknown shard format {fmt!r}")
    return sha256_file(path)


class ShardWriter:
    """Writes shards of one version as they complete, resumable, and the manifest last. Several processes may
    write the shards of one version (each its own, listed in its own progress-<rank>.json); one of them then
    writes the manifest."""

    def __init__(self, root: Path, fmt: str, dtype: str, fingerprint: dict, rank: int = 0) -> None:
        self.root, self.fmt, self.dtype = root, fmt, dtype
        self.fingerprint, self.rank = fingerprint, rank
        root.mkdir(parents=True, exist_ok=True)
        self.done: dict[str, dict] = {}
        self._collect()

    def _collect(self) -> None:
        """Every process's finished shards (progress.json: an older single-process job), intact ones only."""
        for progress in sorted(self.root.glob("progress*.json")):
            try:
                saved = json.loads(progress.read_text())
            except (OSError, ValueError):
                continue  # written atomically, so never torn; unreadable means not ours: its shards are redone
            if saved.get("fingerprint") != self.fingerprint:
                raise UserError(f"{self.root}: holds an unfinished job with other settings or another model; "
                                "delete the folder or choose another version")
            for name, info in saved["shards"].items():
                if name not in self.done and (self.root / name).is_file() and \
                        sha256_file(self.root / name) == info["sha256"]:
                    self.done[name] = info

    def is_done(self, index: int) -> bool:
        return shard_name(index, self.fmt) in self.done

    def write(self, index: int, item_idx: np.ndarray, embedding: torch.Tensor) -> None:
        name = shard_name(index, self.fmt)
        sha = write_shard(self.root / name, item_idx, embedding.to(DTYPES[self.dtype]), self.fmt)
        self.done[name] = {"rows": len(item_idx), "sha256": sha}
        mine = {k: v for k, v in self.done.items() if v.get("rank", self.rank) == self.rank}
        self.done[name]["rank"] = self.rank
        mine[name] = self.done[name]
        write_json_atomic(self.root / f"progress-{self.rank}.json", {"fingerprint": self.fingerprint,
                                                                       "shards": mine})

    def finish(self, items: pl.DataFrame, dim: int, extra: dict, shards: int | None = None) -> dict:
        """Write items.parquet (item_idx, item_id, text_sha256 of the embedded items) and, last, the manifest:
        from now on the version is visible. `shards`: how many the version must have (every process's)."""
        self._collect()  # the other processes' shards
        remove_leftover_temporaries(self.root)  # of processes killed mid-shard; every writer has finished now
        if shards is not None:
            missing = sorted({shard_name(k, self.fmt) for k in range(shards)} - set(self.done))
            if missing:
                raise UserError(f"{self.root}: shards {', '.join(missing[:5])} are not finished or not visible "
                                "here (another process's progress file?); rerun the job to complete them")
        if sum(info["rows"] for info in self.done.values()) != items.height:
            raise UserError(f"{self.root}: the shards hold {sum(i['rows'] for i in self.done.values())} rows, the "
                            f"version {items.height} items; rerun the job")
        with atomic_path(self.root / "items.parquet") as tmp:
            columns = ["item_idx", "item_id", "text_sha256"] + (["text"] if "text" in items.columns else [])
            items.select(columns).sort("item_idx").write_parquet(tmp)
        listed = [{"file": name, "rows": info["rows"], "sha256": info["sha256"]}
                  for name, info in sorted(self.done.items())]
        manifest = {
            **self.fingerprint,
            "dim": dim,
            "dtype": self.dtype,
            "format": self.fmt,
            "rows": sum(s["rows"] for s in listed),
            "shards": listed,
            "items_sha256": sha256_file(self.root / "items.parquet"),
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            **extra,
        }
        write_json_atomic(self.root / MANIFEST, manifest)
        versions.drop_progress(self.root)
        return manifest


@dataclass
class EmbeddingTable:
    """All item embeddings of one version, as row item_idx of `embeddings` (row 0 = padding, zeros)."""

    embeddings: torch.Tensor
    """(N+1, d), N = the highest item_idx of the run so far; rows of retired items are zeros."""
    present: torch.Tensor
    """(N+1,) bool: the rows this version holds (False for padding and for retired items)."""
    manifest: dict
    root: Path


def _read_shard(path: Path, fmt: str) -> tuple[np.ndarray, torch.Tensor]:
    if fmt == "safetensors":
        with safe_open(str(path), framework="pt") as f:  # memory-mapped
            return f.get_tensor("item_idx").numpy(), f.get_tensor("embedding")
    table = pq.read_table(path, memory_map=True)
    values = table.column("embedding").combine_chunks()
    dim = values.type.list_size
    emb = torch.from_numpy(values.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim).copy())
    return table.column("item_idx").to_numpy(), emb


MANIFEST_KEYS = ("dim", "dtype", "format", "rows", "shards", "items_sha256")


def read_manifest(root: Path) -> dict:
    """An embeddings version's manifest, checked for the keys every reader of its shards needs."""
    return versions.read_manifest(root, MANIFEST_KEYS)


def load_embeddings(root: Path, verify: bool = True) -> EmbeddingTable:
    """Read a finished version; every shard's sha256 is checked against the manifest."""
    manifest = read_manifest(root)
    rows = int(manifest["rows"])
    max_idx = int(manifest.get("max_item_idx", rows))
    table = torch.zeros(max_idx + 1, int(manifest["dim"]), dtype=DTYPES[manifest["dtype"]])
    filled = torch.zeros(max_idx + 1, dtype=torch.bool)
    seen = 0
    for shard in manifest["shards"]:
        path = root / shard["file"]
        if not path.is_file():
            raise UserError(f"{path}: shard listed in the manifest is missing")
        if verify and sha256_file(path) != shard["sha256"]:
            raise UserError(f"{path}: checksum does not match the manifest; the shard is corrupt, re-run the job")
        idx, emb = _read_shard(path, manifest["format"])
        index = torch.from_numpy(idx.astype(np.int64))
        if len(idx) and (index.min() < 1 or index.max() > max_idx or filled[index].any()
                         or len(torch.unique(index)) != len(index)):
            raise UserError(f"{path}: item_idx out of range or already in another shard")
        table[index] = emb.to(table.dtype)
        filled[index] = True
        seen += len(idx)
    if seen != rows:
        raise UserError(f"{root}: manifest says {rows} rows, shards hold {seen}")
    if verify and sha256_file(root / "items.parquet") != manifest["items_sha256"]:
        raise UserError(f"{root / 'items.parquet'}: checksum does not match the manifest")
    filled[0] = False
    return EmbeddingTable(table, filled, manifest, root)


def version_root(run: Path, version: str | None = None) -> Path:
    """run/embeddings/<version> of a finished version; version None takes the one run/embeddings/CURRENT names."""
    base = RunDir(Path(run)).embeddings
    return base / versions.current_version(base) if version is None else versions.finished_root(base, version)


def version_items(root: Path, data: Path) -> pl.DataFrame:
    """item_idx, item_id, text_sha256 of a version (versions written before item_id was recorded take the ids
    from the canonical tables they were made from)."""
    items = pl.read_parquet(root / "items.parquet")
    if "item_id" not in items.columns:
        ids = pl.read_parquet(data / "items.parquet", columns=["item_idx", "item_id"])
        items = items.join(ids, on="item_idx", how="left")
    return items.select("item_idx", pl.col("item_id").cast(pl.String), "text_sha256")
