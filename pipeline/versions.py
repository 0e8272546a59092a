"""Versioned folders: the one protocol item embeddings (run/embeddings) and user vectors (run/users) share.

    <base>/<version>/     a version's files; manifest.json is written last: a version exists once it has one
    <base>/CURRENT        the version in use, switched atomically, and only ever to a finished version
    <base>/.lock          one job at a time (pipeline.lock)

A job writes its version in place, resumably (progress files list what is done and go once the manifest is
durable), or as a whole (io.atomic_dir); then it `publish`es it. `rollback` points CURRENT back at the parent the
manifest names, or at a named version; `prune` deletes all but the newest versions, never the current one. Under
the lock a job first removes what a killed writer left (`.NAME.*.tmp`). Nothing here knows what a version holds.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from pipeline.errors import UserError
from pipeline.io import write_text_atomic
from pipeline.lock import JobLock

MANIFEST = "manifest.json"
CURRENT = "CURRENT"
ROLL_BACK = "roll back to another version (`hllm-pipeline refresh rollback --run RUN`) or rerun the job that wrote it"


def read_manifest(root: Path, required: tuple[str, ...] = (), hint: str = ROLL_BACK) -> dict:
    """A finished version's manifest, checked for its `required` keys, so that a damaged one is an error naming
    it, not a traceback; `hint`: what to do then."""
    path = root / MANIFEST
    if not root.is_dir():
        raise UserError(f"{root}: no such version")
    if not path.is_file():
        raise UserError(f"{path}: missing: the job that writes this version did not finish (rerun it to resume)")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise UserError(f"{path}: damaged, not readable JSON ({type(e).__name__}); {hint}") from None
    missing = [k for k in required if not isinstance(manifest, dict) or k not in manifest]
    if missing or not isinstance(manifest, dict):
        raise UserError(f"{path}: damaged, lacks {', '.join(missing) or 'its fields'}; {hint}")
    return manifest


def drop_progress(root: Path) -> None:
    """Remove a version's progress files: the finish's last step, once its manifest is durable."""
    for progress in root.glob("progress*.json"):
        progress.unlink(missing_ok=True)


def is_finished(root: Path) -> bool:
    """Whether a version's manifest exists. A finish interrupted after writing its manifest is completed here (its
    progress files removed), so a rerun leaves exactly the files of an uninterrupted run."""
    if not (root / MANIFEST).is_file():
        return False
    drop_progress(root)
    return True


def finished_versions(base: Path) -> list[str]:
    """The versions under `base` whose manifest exists, oldest first (by the manifest's mtime)."""
    if not base.is_dir():
        return []
    done = [p for p in base.iterdir() if p.is_dir() and not p.name.startswith(".") and (p / MANIFEST).is_file()]
    return [p.name for p in sorted(done, key=lambda p: ((p / MANIFEST).stat().st_mtime_ns, p.name))]


def current_version(base: Path, hint: str = "point it at one with `hllm-pipeline refresh rollback VERSION --run RUN`",
                    first: str = "run `make embed-items` (stage one) first") -> str:
    """The version base/CURRENT names, checked to exist and be finished; `hint`: what to do when it does not;
    `first`: how the first version is made, when there is none yet."""
    current = base / CURRENT
    if not current.is_file():
        raise UserError(f"{current}: no {base.name} yet; {first}")
    try:
        version = current.read_text().strip()
    except (OSError, UnicodeDecodeError):
        version = ""
    if not version or "/" in version or version.startswith("."):
        raise UserError(f"{current}: damaged (expected one version name); {hint}")
    if not (base / version / MANIFEST).is_file():
        state = "did not finish" if (base / version).is_dir() else "does not exist"
        available = ", ".join(finished_versions(base)) or "none"
        raise UserError(f"{current}: names {version}, which {state} (finished versions: {available}); {hint}")
    return version


def finished_root(base: Path, version: str) -> Path:
    """base/<version>, checked to be finished (else a one-line error listing the versions that are)."""
    if not (base / version / MANIFEST).is_file():
        state = "did not finish" if (base / version).is_dir() else "does not exist"
        available = ", ".join(finished_versions(base)) or "none"
        raise UserError(f"{base / version}: {base.name} version {version} {state} (finished versions: {available})")
    return base / version


def publish(base: Path, version: str) -> None:
    """Point base/CURRENT at a finished version (atomically: readers see the old name or the new)."""
    read_manifest(base / version)
    write_text_atomic(base / CURRENT, version + "\n")


def rollback(base: Path, version: str | None = None, wait: float = 0, log=print) -> str:
    """Point CURRENT back at `version` (default: the current version's parent); returns the version now current."""
    with JobLock(base, wait, log=log):
        current = current_version(base)
        if version is None:
            version = read_manifest(base / current).get("parent")
            if not version:
                raise UserError(f"{base / current}: has no parent version to roll back to; name one: "
                                f"{', '.join(finished_versions(base))}")
        finished_root(base, version)
        publish(base, version)
    log(f"{base.name} CURRENT: {current} -> {version}")
    return version


def prune(base: Path, keep: int, log=print) -> list[str]:
    """Delete all but the `keep` newest finished versions (never the current one), and unfinished leftovers
    that no job is writing (the caller holds the lock). Returns the names deleted."""
    keep_names = set(finished_versions(base)[-keep:]) | {current_version(base)}
    gone = []
    for path in sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if path.name in keep_names:
            continue
        trash = base / f".{path.name}.deleting"
        path.rename(trash)  # gone from view at once; the files go after
        shutil.rmtree(trash, ignore_errors=True)
        gone.append(path.name)
    if gone:
        log(f"pruned {len(gone)} old version(s): {', '.join(gone)}")
    return gone
