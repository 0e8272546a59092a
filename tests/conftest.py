"""Shared helpers: fixture files written by the tests, and running the real CLI in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

REPO = Path(__file__).resolve().parents[1]


def write(path: Path, text: str, encoding: str = "utf-8", newline: str = "\n") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.replace("\n", newline).encode(encoding))
    return path


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `hllm-pipeline ARGS` as a user would (a fresh process, real exit code and streams)."""
    env = dict(os.environ, PYTHONPATH=str(REPO), **(env or {}))
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True,
                          cwd=cwd or REPO, env=env, timeout=300)


def read(out: Path, name: str) -> pl.DataFrame:
    return pl.read_parquet(out / f"{name}.parquet")


@pytest.fixture
def ml1m_dir(tmp_path: Path) -> Path:
    """A tiny GroupLens ML-1M layout: '::' separated, Latin-1 titles, same-second ties."""
    src = tmp_path / "ml-1m"
    write(src / "movies.dat", "\n".join([
        "1::Toy Story (1995)::Animation|Children's|Comedy",
        "2::Jumanji (1995)::Adventure|Children's|Fantasy",
        "3::Café au lait (1993)::Comedy",
        "4::Heat (1995)::Action|Crime|Thriller",
        "5::Never Rated (1999)::Drama",
    ]) + "\n", encoding="latin-1")
    # user 10: the last two ratings share a second; the file order decides (row 4 before row 5).
    write(src / "ratings.dat", "\n".join([
        "10::3::4::100",
        "10::1::5::50",
        "10::2::3::200",
        "10::4::4::300",
        "10::1::2::300",
        "20::2::5::10",
        "20::4::1::10",
        "20::3::2::10",
        "20::1::3::5",
    ]) + "\n")
    return src
