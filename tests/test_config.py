"""Typed configs: YAML + key=value overrides, coercion, validation with actionable messages."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import typing
from pathlib import Path
from typing import Literal

import pytest
from conftest import REPO, write

from pipeline import config as cfg
from pipeline.errors import ConfigError
from stages.prepare import PrepareConfig


@dataclasses.dataclass(frozen=True)
class Inner:
    lr: float = 1e-4
    """Learning rate."""


@dataclasses.dataclass(frozen=True)
class Demo:
    name: str
    """A name."""
    steps: int = 10
    """How many steps."""
    mode: Literal["a", "b"] = "a"
    """Which mode."""
    keys: tuple[str, ...] = ("x",)
    """Some keys."""
    path: Path | None = None
    """Somewhere."""
    flag: bool = False
    """On or off."""
    inner: Inner = dataclasses.field(default_factory=Inner)
    """A section."""


def test_yaml_then_overrides(tmp_path):
    yaml_path = write(tmp_path / "c.yaml", "name: n\nsteps: 3\ninner:\n  lr: 0.5\n")
    conf = cfg.load(Demo, yaml_path, ["steps=7", "keys=a,b", "inner.lr=2e-3", "flag=true", "path=null"])
    assert conf == Demo(name="n", steps=7, keys=("a", "b"), inner=Inner(lr=2e-3), flag=True)


def test_round_trip_through_yaml(tmp_path):
    conf = Demo(name="n", keys=("a",), path=Path("p"), inner=Inner(0.1))
    cfg.save(conf, tmp_path / "saved.yaml")
    assert cfg.load(Demo, tmp_path / "saved.yaml") == conf


@pytest.mark.parametrize("override, message", [
    ("steps=1.5", "steps: got '1.5'; expected an integer"),
    ("mode=c", "mode: got 'c'; expected one of a, b"),
    ("flag=maybe", "flag: got 'maybe'; expected true or false"),
    ("nope=1", "unknown setting 'nope'"),
    ("inner.nope=1", "unknown setting 'inner.nope'"),
    ("steps", "not of the form key=value"),
])
def test_bad_values_say_how_to_fix_them(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        cfg.load(Demo, None, ["name=x", override])


def test_missing_required_setting():
    with pytest.raises(ConfigError, match="missing required setting 'name'"):
        cfg.load(Demo, None, [])


def test_bad_yaml_names_the_line(tmp_path):
    path = write(tmp_path / "bad.yaml", "name: x\nsteps: [1,\n")
    with pytest.raises(ConfigError, match=r"bad.yaml, line \d+: not valid YAML"):
        cfg.load(Demo, path)


def test_every_config_field_is_documented():
    for cls in (Demo, PrepareConfig):
        docs = cfg.field_docs(cls)
        undocumented = [f.name for f in dataclasses.fields(cls) if not docs.get(f.name)]
        assert not undocumented, f"{cls.__name__} fields without a docstring: {undocumented}"
    assert "leave-one-out" in cfg.describe(PrepareConfig)


def test_configs_are_frozen():
    conf = Demo(name="x")
    with pytest.raises(dataclasses.FrozenInstanceError):
        conf.steps = 3  # type: ignore[misc]


def test_every_stage_setting_is_documented_down_to_its_sections():
    """Every field of every stage command's config, and of the sections nested in it, carries a docstring:
    `--show-settings` and `--help` print them."""
    from pipeline.cli import STAGES

    seen, todo = set(), [spec.config for spec in STAGES.values()]
    while todo:
        cls = todo.pop()
        if cls in seen:
            continue
        seen.add(cls)
        docs = cfg.field_docs(cls)
        undocumented = [f.name for f in dataclasses.fields(cls) if not docs.get(f.name)]
        assert not undocumented, f"{cls.__name__} fields without a docstring: {undocumented}"
        hints = typing.get_type_hints(cls)
        todo += [hints[f.name] for f in dataclasses.fields(cls) if dataclasses.is_dataclass(hints[f.name])]
    names = {cls.__name__ for cls in seen}
    assert {"LoopConfig", "UserModelConfig", "ItemModelConfig"} <= names, names


@pytest.mark.parametrize("argv", [["--help"], ["data", "prepare", "--help"], ["refresh", "--help"]])
def test_help_and_data_prepare_start_without_torch(argv):
    script = ("import sys\nfrom pipeline import cli\nsys.argv = ['hllm-pipeline', *sys.argv[1:]]\n"
              "try:\n    cli.main()\nexcept SystemExit as e:\n    code = e.code\n"
              "print('torch imported' if 'torch' in sys.modules else 'no torch', code, file=sys.stderr)\n")
    done = subprocess.run([sys.executable, "-c", script, *argv], capture_output=True, text=True, cwd=REPO,
                          env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=120)
    assert done.stderr.strip().splitlines()[-1] == "no torch 0", done.stderr[-2000:]
    assert "Usage:" in done.stdout
