"""Bad input: a one-line error naming file/row/column with exit code 2, or a rejected row with its reason.

Every error case also checks that nothing was written (the output folder does not appear).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import read, run_cli, write


def prepare_cli(tmp_path: Path, fmt: str, source: Path, *extra: str):
    out = tmp_path / "out" / "data"
    done = run_cli("data", "prepare", "--format", fmt, "--source", str(source), "--out", str(out), *extra)
    return done, out


def assert_user_error(done, out: Path, *fragments: str) -> str:
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr  # one line, no traceback
    assert lines[0].startswith("error: ")
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert not out.exists(), "nothing may be written when preparation fails"
    return lines[0]


def csv_pair(tmp_path: Path, interactions: str, items: str = "item_id,title\na,A\nb,B\nc,C\n"):
    inter = write(tmp_path / "raw" / "inter.csv", interactions)
    items_path = write(tmp_path / "raw" / "items.csv", items)
    return inter, items_path


GOOD = "item_id,user_id,timestamp\na,u1,1\nb,u1,2\nc,u1,3\n"


def test_missing_column(tmp_path):
    inter, items = csv_pair(tmp_path, "item_id,user_id\na,u1\n")
    done, out = prepare_cli(tmp_path, "hllm-csv", inter, f"items={items}")
    assert_user_error(done, out, str(inter), "missing column 'timestamp'", "found item_id, user_id")


def test_misnamed_column(tmp_path):
    inter, items = csv_pair(tmp_path, "item,user_id,timestamp\na,u1,1\n")
    done, out = prepare_cli(tmp_path, "hllm-csv", inter, f"items={items}")
    assert_user_error(done, out, "inter.csv", "missing column 'item_id'")


def test_misnamed_text_key(tmp_path):
    inter, items = csv_pair(tmp_path, GOOD)
    done, out = prepare_cli(tmp_path, "hllm-csv", inter, f"items={items}", "text_keys=title,tag")
    assert_user_error(done, out, "items.csv", "missing column 'tag'")


@pytest.mark.parametrize("which", ["interactions", "items"])
def test_empty_file(tmp_path, which):
    inter, items = csv_pair(tmp_path, "" if which == "interactions" else GOOD,
                            "" if which == "items" else "item_id,title\na,A\n")
    done, out = prepare_cli(tmp_path, "hllm-csv", inter, f"items={items}")
    assert_user_error(done, out, "inter.csv" if which == "interactions" else "items.csv", "empty")


def test_header_only_file_has_no_usable_rows(tmp_path):
    inter, items = csv_pair(tmp_path, "item_id,user_id,timestamp\n")
    done, out = prepare_cli(tmp_path, "hllm-csv", inter, f"items={items}")
    assert_user_error(done, out, "inter.csv", "no usable interactions")


def test_non_integer_and_missing_timestamps_are_rejected_with_reason(tmp_path):
    inter, items = csv_pair(tmp_path, GOOD + "a,u1,12.5\nb,u1,\nc,u1,yesterday\na,u1,40.0\n")
    done, out = prepare_cli(tmp_path, "hllm-csv", inter, f"items={items}")
    assert done.returncode == 0, done.stderr
    rejected = read(out, "rejected").sort("row")
    assert rejected.select("row", "column", "value", "reason").rows() == [
        (4, "timestamp", "12.5", "bad_timestamp"),
        (5, "timestamp", None, "missing_timestamp"),
        (6, "timestamp", "yesterday", "bad_timestamp"),
    ]
    assert read(out, "interactions")["timestamp"].to_list() == [1, 2, 3, 40]


def test_strict_mode_turns_the_first_bad_row_into_an_error(tmp_path):
    inter, items = csv_pair(tmp_path, GOOD + "a,u1,12.5\n")
    done, out = prepare_cli(tmp_path, "hllm-csv", inter, f"items={items}", "strict=true")
    assert_user_error(done, out, f"{inter}, row 4, column 'timestamp'", "not an integer", "'12.5'")


def test_unknown_item_ids_are_rejected(tmp_path):
    inter, items = csv_pair(tmp_path, GOOD + "zzz,u1,9\n")
    done, out = prepare_cli(tmp_path, "hllm-csv", inter, f"items={items}")
    assert done.returncode == 0, done.stderr
    assert read(out, "rejected").select("row", "column", "value", "reason").rows() == [
        (4, "item_id", "zzz", "unknown_item")]
    done, out2 = prepare_cli(tmp_path / "s", "hllm-csv", inter, f"items={items}", "strict=true")
    assert_user_error(done, out2, "row 4, column 'item_id'", "not in the item file", "'zzz'")


def test_duplicate_item_ids_keep_the_first_row(tmp_path):
    inter, items = csv_pair(tmp_path, GOOD, "item_id,title\na,First\nb,B\na,Second\nc,C\n")
    done, out = prepare_cli(tmp_path, "hllm-csv", inter, f"items={items}")
    assert done.returncode == 0, done.stderr
    assert read(out, "items").filter(item_id="a")["title"].item() == "First"
    assert read(out, "rejected").select("file", "row", "reason").rows() == [(str(items), 3, "duplicate_item_id")]


def test_undecodable_text_names_the_line(tmp_path):
    inter, _ = csv_pair(tmp_path, GOOD)
    items = tmp_path / "raw" / "items.csv"
    items.write_bytes(b"item_id,title\na,A\nb,Caf\xe9\nc,C\n")
    done, out = prepare_cli(tmp_path, "hllm-csv", inter, f"items={items}")
    assert_user_error(done, out, str(items), "line 3", "not valid UTF-8", "encoding=latin-1")
    done, out = prepare_cli(tmp_path / "l", "hllm-csv", inter, f"items={items}", "encoding=latin-1")
    assert done.returncode == 0, done.stderr
    assert read(out, "items").filter(item_id="b")["title"].item() == "Café"


def test_users_too_short_to_split_are_rejected(tmp_path):
    inter, items = csv_pair(tmp_path, GOOD + "a,u2,1\nb,u2,2\n")
    done, out = prepare_cli(tmp_path, "hllm-csv", inter, f"items={items}")
    assert done.returncode == 0, done.stderr
    assert read(out, "rejected").select("row", "value", "reason").rows() == [
        (4, "u2", "user_too_short"), (5, "u2", "user_too_short")]
    assert read(out, "users")["user_id"].to_list() == ["u1"]


def test_missing_ids_are_rejected(tmp_path):
    inter, items = csv_pair(tmp_path, GOOD + ",u1,5\na,,6\n")
    done, out = prepare_cli(tmp_path, "hllm-csv", inter, f"items={items}")
    assert done.returncode == 0, done.stderr
    assert read(out, "rejected").select("row", "column", "reason").rows() == [
        (4, "item_id", "missing_item_id"), (5, "user_id", "missing_user_id")]


def test_ragged_row_is_an_error_naming_the_row(tmp_path):
    inter, items = csv_pair(tmp_path, GOOD + "a,u1,4,extra\n")
    done, out = prepare_cli(tmp_path, "hllm-csv", inter, f"items={items}")
    assert_user_error(done, out, f"{inter}, row 4", "4 fields, expected 3")


def test_malformed_grouplens_line_is_rejected(tmp_path, ml1m_dir):
    with open(ml1m_dir / "ratings.dat", "a") as f:
        f.write("10::2\n")
    done, out = prepare_cli(tmp_path, "movielens", ml1m_dir)
    assert done.returncode == 0, done.stderr
    row = read(out, "rejected").row(0, named=True)
    assert (row["row"], row["value"], row["reason"]) == (10, "10::2", "malformed_line: 2 fields, expected 4")


def test_every_input_row_is_accounted_for(tmp_path):
    inter, items = csv_pair(tmp_path, GOOD + "zzz,u1,9\na,u1,x\na,u2,1\n", "item_id,title\na,A\nb,B\nc,C\na,dup\nd,D\n")
    done, out = prepare_cli(tmp_path, "hllm-csv", inter, f"items={items}", "keep_items_without_interactions=false")
    assert done.returncode == 0, done.stderr
    stats = json.loads((out / "stats.json").read_text())
    inter_stats, item_stats = stats["tables"]["interactions"], stats["tables"]["items"]
    assert (inter_stats["file"], item_stats["file"]) == (str(inter), str(items))
    assert (inter_stats["rows_read"], inter_stats["rows_used"], inter_stats["rows_rejected"]) == (6, 3, 3)
    assert (item_stats["rows_read"], item_stats["rows_used"], item_stats["rows_rejected"]) == (5, 3, 2)
    assert item_stats["rejected_by_reason"] == {"duplicate_item_id": 1, "item_without_interactions": 1}


def test_bad_setting_is_a_one_line_error(tmp_path, ml1m_dir):
    done, out = prepare_cli(tmp_path, "movielens", ml1m_dir, "min_user_interactions=2")
    assert_user_error(done, out, "min_user_interactions=2", "must be >= 3")
    done, out = prepare_cli(tmp_path, "movielens", ml1m_dir, "no_such_key=1")
    assert_user_error(done, out, "unknown setting 'no_such_key'", "valid settings:")
    done, out = prepare_cli(tmp_path, "nonsense", ml1m_dir)
    assert_user_error(done, out, "format", "movielens")


def test_missing_source_and_unrecognised_folder(tmp_path):
    done, out = prepare_cli(tmp_path, "movielens", tmp_path / "nope")
    assert_user_error(done, out, "no such file or folder")
    (tmp_path / "empty").mkdir()
    done, out = prepare_cli(tmp_path, "movielens", tmp_path / "empty")
    assert_user_error(done, out, "no MovieLens files found")


def test_failed_run_leaves_previous_output_untouched(tmp_path):
    inter, items = csv_pair(tmp_path, GOOD)
    done, out = prepare_cli(tmp_path, "hllm-csv", inter, f"items={items}")
    assert done.returncode == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    write(inter, "item_id,user_id\n")
    done, _ = prepare_cli(tmp_path, "hllm-csv", inter, f"items={items}")
    assert done.returncode == 2
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in out.parent.iterdir()] == ["data"]  # no temporary folders left behind


def test_blank_ids_and_timestamps_are_missing(tmp_path):
    inter, items = csv_pair(tmp_path, GOOD + 'a,"  ",5\n ,u1,6\nb,u1,""\n')
    done, out = prepare_cli(tmp_path, "hllm-csv", inter, f"items={items}")
    assert done.returncode == 0, done.stderr
    assert read(out, "rejected").select("row", "reason").rows() == [
        (4, "missing_user_id"), (5, "missing_item_id"), (6, "missing_timestamp")]
    assert read(out, "users")["user_id"].to_list() == ["u1"]


def test_output_folder_may_not_replace_inputs_or_unrelated_folders(tmp_path, ml1m_dir):
    done = run_cli("data", "prepare", "--format", "movielens", "--source", str(ml1m_dir), "--out", str(ml1m_dir))
    assert done.returncode == 2 and "overlaps the input" in done.stderr
    assert (ml1m_dir / "ratings.dat").is_file()
    done = run_cli("data", "prepare", "--format", "movielens", "--source", str(ml1m_dir), "--out",
                   str(ml1m_dir.parent))
    assert done.returncode == 2 and "overlaps the input" in done.stderr
    unrelated = tmp_path / "mine"
    write(unrelated / "precious.txt", "keep me")
    done = run_cli("data", "prepare", "--format", "movielens", "--source", str(ml1m_dir), "--out", str(unrelated))
    assert done.returncode == 2 and "non-empty folder" in done.stderr
    assert (unrelated / "precious.txt").read_text() == "keep me"
    a_file = write(tmp_path / "afile", "x")
    done = run_cli("data", "prepare", "--format", "movielens", "--source", str(ml1m_dir), "--out", str(a_file))
    assert done.returncode == 2 and "existing file" in done.stderr


def test_official_layout_with_latin1_and_gzip(tmp_path):
    import gzip

    root = tmp_path / "official"
    (root / "dataset").mkdir(parents=True)
    (root / "information").mkdir()
    (root / "dataset" / "x.csv").write_bytes("item_id,user_id,timestamp\na,u,1\nb,u,2\na,u,3\n".encode("latin-1"))
    (root / "information" / "x.csv").write_bytes("item_id,title\na,Café\nb,Noël\n".encode("latin-1"))
    done, out = prepare_cli(tmp_path, "hllm-csv", root, "encoding=latin-1")
    assert done.returncode == 0, done.stderr
    assert read(out, "items")["title"].to_list() == ["Café", "Noël"]
    gz = tmp_path / "gz"
    (gz / "dataset").mkdir(parents=True)
    (gz / "information").mkdir()
    (gz / "dataset" / "x.csv.gz").write_bytes(gzip.compress(b"item_id,user_id,timestamp\na,u,1\nb,u,2\na,u,3\n"))
    (gz / "information" / "x.csv").write_bytes(b"item_id,title\na,A\nb,B\n")
    done, out = prepare_cli(tmp_path / "g", "hllm-csv", gz / "dataset" / "x.csv.gz",
                            f"items={gz / 'information' / 'x.csv'}")
    assert done.returncode == 0, done.stderr
    assert read(out, "interactions").height == 3


def test_reserved_names_in_input_files(tmp_path):
    inter, items = csv_pair(tmp_path, "row,item_id,user_id,timestamp\n9,a,u1,1\n9,b,u1,2\n9,c,u1,3\n",
                            "item_id,title,text\na,A,x\nb,B,y\nc,C,z\n")
    done, out = prepare_cli(tmp_path, "hllm-csv", inter, f"items={items}")
    assert done.returncode == 0, done.stderr  # a 'row' column is ignored; rows are numbered by position
    assert read(out, "interactions")["source_row"].to_list() == [1, 2, 3]
    done, out = prepare_cli(tmp_path / "r", "hllm-csv", inter, f"items={items}", "text_keys=title,text")
    assert_user_error(done, out, "text key 'text'", "reserved")


def test_grouplens_encoding_and_genre_problems(tmp_path, ml1m_dir):
    done, out = prepare_cli(tmp_path, "movielens", ml1m_dir, "encoding=bogus")
    assert_user_error(done, out, "unknown encoding 'bogus'")
    src = tmp_path / "ml-100k"
    write(src / "u.item", "1|A (1990)|||x|" + "|".join(["0"] * 19) + "\n")
    write(src / "u.data", "1\t1\t5\t1\n")
    write(src / "u.genre", "Action|x\n")
    done, out = prepare_cli(tmp_path / "g", "movielens", src)
    assert_user_error(done, out, "u.genre: line 1", "expected 'genre|number'")


def test_latin1_bytes_that_python_treats_as_line_breaks(tmp_path, ml1m_dir):
    # 0x85 is '…' in cp1252 and NEL in Latin-1: it is part of a title, not a line end
    (ml1m_dir / "movies.dat").write_bytes(b"1::Toy\x85Story (1995)::Comedy\n2::B (1990)::Drama\n3::C (1991)::Drama\n"
                                          b"4::D (1992)::Drama\n5::E (1993)::Drama\n")
    done, out = prepare_cli(tmp_path, "movielens", ml1m_dir)
    assert done.returncode == 0, done.stderr
    items = read(out, "items")
    assert items.height == 5 and items["title"][0] == "Toy\x85Story (1995)"


def test_short_grouplens_rows_are_rejected_not_padded(tmp_path):
    src = tmp_path / "ml-100k"
    write(src / "u.item", "1|A (1990)|||x|" + "|".join(["0"] * 19) + "\n" + "2|B (1990)|||x|" + "|".join(["0"] * 18)
          + "\n")
    write(src / "u.data", "1\t1\t5\t1\n1\t1\t4\t2\n1\t1\t3\t3\n")
    done, out = prepare_cli(tmp_path, "movielens", src)
    assert done.returncode == 0, done.stderr
    assert read(out, "rejected").select("table", "row", "reason").rows() == [
        ("items", 2, "malformed_line: 23 fields, expected 24")]


def test_unquoted_ragged_row_is_located(tmp_path):
    src = tmp_path / "rb"
    write(src / "x.item", 'item_id:token\tmovie_title:token\na\t"Quoted\nb\tB\textra\n')
    write(src / "x.inter", "user_id:token\titem_id:token\ttimestamp:float\nu\ta\t1\n")
    done, out = prepare_cli(tmp_path, "movielens", src)
    assert_user_error(done, out, "x.item, row 2", "3 fields, expected 2")


def test_strict_when_every_row_is_rejected(tmp_path):
    inter, items = csv_pair(tmp_path, "item_id,user_id,timestamp\nzz,u1,1\n")
    done, out = prepare_cli(tmp_path, "hllm-csv", inter, f"items={items}", "strict=true")
    assert_user_error(done, out, "row 1, column 'item_id'", "not in the item file")


def test_one_file_for_both_tables_is_accounted_per_table(tmp_path):
    both = write(tmp_path / "raw" / "one.csv", "item_id,user_id,timestamp,title\na,u,1,A\nb,u,2,B\nc,u,3,C\n")
    done, out = prepare_cli(tmp_path, "hllm-csv", both, f"items={both}", "text_keys=title")
    assert done.returncode == 0, done.stderr
    tables = json.loads((out / "stats.json").read_text())["tables"]
    assert [(t["rows_read"], t["rows_used"]) for t in tables.values()] == [(3, 3), (3, 3)]
