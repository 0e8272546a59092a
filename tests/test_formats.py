"""Each raw format, written as a small fixture, prepares into the canonical tables described in the README."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import polars as pl
from conftest import read, run_cli, write

from pipeline import config as cfg
from stages import prepare

PROMPT = "Compress the following sentence into embedding: "


def run_prepare(tmp_path: Path, fmt: str, source: Path, **settings) -> Path:
    out = tmp_path / "out" / "data"
    conf = cfg.load(prepare.PrepareConfig, None, [f"{k}={v}" for k, v in settings.items()], format=fmt,
                    source=source, out=out)
    prepare.run(conf, log=lambda _: None)
    return out


def sequences(out: Path) -> dict[str, list[str]]:
    """user_id -> item_ids in the order the interactions file stores them."""
    inter = read(out, "interactions")
    inter = inter.join(read(out, "users").select("user_idx", "user_id"), on="user_idx", maintain_order="left")
    inter = inter.join(read(out, "items").select("item_idx", "item_id"), on="item_idx", maintain_order="left")
    return {u: g["item_id"].to_list() for (u,), g in inter.group_by("user_id", maintain_order=True)}


def test_grouplens_ml1m_layout(tmp_path, ml1m_dir):
    out = run_prepare(tmp_path, "movielens", ml1m_dir)
    items = read(out, "items")
    assert items["item_idx"].to_list() == [1, 2, 3, 4, 5]
    assert items["item_idx"].dtype == pl.Int32
    # Latin-1 decoded, exact official text, character for character
    assert items.filter(pl.col("item_id") == "3")["text"].item() == PROMPT + "title: Café au lait (1993)genres: Comedy"
    assert items["text"][0] == PROMPT + "title: Toy Story (1995)genres: Animation|Children's|Comedy"
    assert items["n_interactions"].to_list() == [3, 2, 2, 2, 0]  # item 5 stays in the catalogue
    # stable (timestamp, source row) order; ties keep file order
    assert sequences(out) == {"10": ["1", "3", "2", "4", "1"], "20": ["1", "2", "4", "3"]}
    users = read(out, "users")
    assert users["user_id"].to_list() == ["10", "20"] and users["user_idx"].to_list() == [0, 1]
    inter = read(out, "interactions")
    assert inter.schema == {"user_idx": pl.Int32, "item_idx": pl.Int32, "timestamp": pl.Int64,
                            "source_row": pl.Int64, "rating": pl.Float32}  # the rankers' labels
    assert inter["rating"].null_count() == 0
    stats = json.loads((out / "stats.json").read_text())
    assert (stats["users"], stats["items"], stats["items_with_interactions"], stats["interactions"]) == (2, 5, 4, 9)
    assert (out / "config.yaml").is_file() and read(out, "rejected").height == 0


def test_grouplens_ml100k_layout(tmp_path):
    src = tmp_path / "ml-100k"
    flags_toy = ["0", "0", "0", "1", "1", "1"] + ["0"] * 13
    flags_gold = ["0", "1", "1"] + ["0"] * 13 + ["1", "0", "0"]
    write(src / "u.item", "\n".join([
        "1|Toy Story (1995)|01-Jan-1995||http://x|" + "|".join(flags_toy),
        "2|GoldenEye (1995)|01-Jan-1995||http://y|" + "|".join(flags_gold),
        "3|Mémoires (1990)|01-Jan-1990||http://z|" + "|".join(["1"] + ["0"] * 18),
    ]) + "\n", encoding="latin-1")
    write(src / "u.data", "1\t2\t3\t881250949\n1\t1\t4\t881250950\n1\t3\t4\t881250951\n2\t1\t5\t5\n2\t2\t1\t6\n"
                          "2\t3\t1\t7\n")
    out = run_prepare(tmp_path, "movielens", src)
    texts = read(out, "items")["text"].to_list()
    assert texts == [
        PROMPT + "title: Toy Story (1995)genres: Animation|Children's|Comedy",
        PROMPT + "title: GoldenEye (1995)genres: Action|Adventure|Thriller",
        PROMPT + "title: Mémoires (1990)genres: unknown",
    ]
    assert sequences(out) == {"1": ["2", "1", "3"], "2": ["1", "2", "3"]}


def test_recbole_atomic_files_with_crlf(tmp_path):
    src = tmp_path / "rb"
    write(src / "ml.item", "item_id:token\tmovie_title:token\trelease_year:float\tgenre:token\n"
                           "Toy Story (1995)\tToy Story\t1995\tAnimation Children's Comedy\n"
                           "Heat (1995)\tHeat\t1995.0\tAction Crime\n"
                           "Odd\tOdd\t\t\n", newline="\r\n")
    write(src / "ml.inter", "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
                            "1m_1\tHeat (1995)\t5\t978300760\n"
                            "1m_1\tToy Story (1995)\t3\t978300761.0\n"
                            "1m_1\tOdd\t3\t978300762\n", newline="\r\n")
    out = run_prepare(tmp_path, "movielens", src)
    items = read(out, "items")
    assert items["item_id"].to_list() == ["Toy Story (1995)", "Heat (1995)", "Odd"]
    assert items["text"].to_list() == [
        PROMPT + "title: Toy Story (1995)genres: Animation|Children's|Comedy",
        PROMPT + "title: Heat (1995)genres: Action|Crime",
        PROMPT + "title: Odd",
    ]
    assert read(out, "interactions")["timestamp"].to_list() == [978300760, 978300761, 978300762]


def test_hllm_csv_official_layout(tmp_path):
    root = tmp_path / "official"
    write(root / "dataset" / "books.csv", "item_id,user_id,timestamp\nb1,u1,30\nb2,u1,10\nb3,u1,20\nb1,u2,1\n"
                                          "b2,u2,2\nb3,u2,3\n")
    write(root / "information" / "books.csv",
          'item_id,title,description\nb1,"Dune, a novel",Spice\nb2,Emma,\nb3,nan,"Multi\nline"\n')
    out = run_prepare(tmp_path, "hllm-csv", root)
    items = read(out, "items")
    assert items["text"].to_list() == [
        PROMPT + "title: Dune, a noveldescription: Spice",
        PROMPT + "title: Emma",
        PROMPT + "description: Multi\nline",
    ]
    assert sequences(out) == {"u1": ["b2", "b3", "b1"], "u2": ["b1", "b2", "b3"]}
    stats = json.loads((out / "stats.json").read_text())
    assert stats["rules"]["text_keys"] == ["title", "description"]  # 'tag' absent: not used


def test_hllm_csv_explicit_text_keys_and_items_path(tmp_path):
    inter = write(tmp_path / "i.csv", "user_id,timestamp,item_id\nu,1,a\nu,2,b\nu,3,a\n")
    items = write(tmp_path / "meta.csv", "item_id,tag,title\na,x,A\nb,y,B\n")
    out = run_prepare(tmp_path, "hllm-csv", inter, items=items, text_keys="tag,title")
    assert read(out, "items")["text"].to_list() == [PROMPT + "tag: xtitle: A", PROMPT + "tag: ytitle: B"]


def test_pixelrec(tmp_path):
    inter = write(tmp_path / "Pixel200K.csv", "item_id,user_id,timestamp\ni1,u1,1653302396\ni2,u1,1653302397\n"
                                             "i3,u1,1653302398\n")
    items = write(tmp_path / "Pixel200K_items.csv",
                  "item_id,view_number,comment_number,thumbup_number,share_number,coin_number,favorite_number,"
                  "barrage_number,title,tag,description\n"
                  "i1,1,2,3,4,5,6,7,猫,动物,可爱的猫\ni2,1,2,3,4,5,6,7,狗,,\ni3,1,2,3,4,5,6,7,鸟,动物,\n")
    out = run_prepare(tmp_path, "pixelrec", inter, items=items)
    assert read(out, "items")["text"].to_list() == [
        PROMPT + "title: 猫tag: 动物description: 可爱的猫", PROMPT + "title: 狗", PROMPT + "title: 鸟tag: 动物",
    ]


def _amazon_fixture(root: Path) -> None:
    """Five heavy users on five popular books, plus rows the official 5-core filter removes."""
    rows = []
    for u in range(5):
        for i in range(5):
            rows.append(f"U{u},B{i},5.0,{1000 + 10 * u + i}")
    rows.append("U0,RARE,4.0,1")  # item seen once: item_count_below_5
    rows += [f"LIGHT,B{i},4.0,{i}" for i in range(3)]  # user seen 3 times: user_count_below_5
    # user with 5 raw rows, 2 of them on rare items -> 3 remain -> user_count_after_filter_below_5
    rows += ["MID,B0,1.0,1", "MID,B1,1.0,2", "MID,B2,1.0,3", "MID,RARE2,1.0,4", "MID,RARE3,1.0,5"]
    write(root / "ratings_Books.csv", "\n".join(rows) + "\n")
    meta = [
        "{'asin': 'B0', 'title': 'Zero', 'description': 'First book', 'price': 1.0}",
        '{"asin": "B1", "title": "One", "description": ["Part a", "part b"]}',
        "{'asin': 'B2', 'title': 'Two'}",
        "{'asin': 'B3', 'description': 'No title'}",
        "{'asin': 'B4', 'title': \"Four's\", 'related': {'also_bought': ['B0']}}",
        "{'asin': 'NOBODY', 'title': 'Never rated'}",
        "__import__('os').system('echo pwned')",
        "{[1]: 2}",
    ]
    with gzip.open(root / "meta_Books.json.gz", "wt", encoding="utf-8") as f:
        f.write("\n".join(meta) + "\n")


def test_amazon_books_official_filter(tmp_path):
    root = tmp_path / "amazon"
    _amazon_fixture(root)
    out = run_prepare(tmp_path, "amazon-books", root)
    items = read(out, "items")
    assert items["item_id"].to_list() == ["B0", "B1", "B2", "B3", "B4"]  # NOBODY: no interactions, dropped
    assert items["text"].to_list() == [
        PROMPT + "title: Zerodescription: First book",
        PROMPT + "title: Onedescription: Part a part b",
        PROMPT + "title: Two",
        PROMPT + "description: No title",
        PROMPT + "title: Four's",
    ]
    assert read(out, "users")["user_id"].to_list() == ["U0", "U1", "U2", "U3", "U4"]
    rejected = read(out, "rejected")
    reasons = dict(rejected.group_by("reason").len().iter_rows())
    assert reasons == {"item_count_below_5": 3, "user_count_below_5": 3, "user_count_after_filter_below_5": 3,
                       "item_without_interactions": 1,
                       "malformed_line: not a JSON object or Python dict literal": 2}
    stats = json.loads((out / "stats.json").read_text())
    for info in stats["tables"].values():
        assert info["rows_read"] == info["rows_used"] + info["rows_rejected"]
    assert stats["interactions"] == 25


def test_unknown_items_keep_adds_items_without_text(tmp_path):
    inter = write(tmp_path / "i.csv", "item_id,user_id,timestamp\na,u,1\nghost,u,2\na,u,3\n")
    items = write(tmp_path / "it.csv", "item_id,title\na,A\n")
    out = run_prepare(tmp_path, "hllm-csv", inter, items=items, unknown_items="keep")
    items_df = read(out, "items")
    assert items_df["item_id"].to_list() == ["a", "ghost"]
    assert items_df["text"].to_list() == [PROMPT + "title: A", ""]  # the official code's empty text
    assert read(out, "interactions").height == 3


def test_prepare_is_deterministic_whatever_the_thread_count(tmp_path, ml1m_dir):
    outs = []
    for threads in ("1", "2"):
        out = tmp_path / threads / "data"
        done = run_cli("data", "prepare", "--format", "movielens", "--source", str(ml1m_dir), "--out", str(out),
                       env={"POLARS_MAX_THREADS": threads})
        assert done.returncode == 0, done.stderr
        outs.append(out)
    for name in ("items", "interactions", "users", "rejected"):
        assert read(outs[0], name).equals(read(outs[1], name))
