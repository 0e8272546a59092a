"""Leave-one-out split, training windows (both chunkings) and evaluation pairs."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
from conftest import write

from pipeline import config as cfg
from pipeline.data.sequences import UserSequences, eval_examples, training_sequences, training_windows
from stages import prepare


def make_seqs(seqs: list[list[int]], num_items: int = 100) -> UserSequences:
    rows = [(u, item, t) for u, s in enumerate(seqs) for t, item in enumerate(s)]
    frame = pl.DataFrame(rows, schema={"user_idx": pl.Int32, "item_idx": pl.Int32, "timestamp": pl.Int64},
                         orient="row")
    return UserSequences.from_frame(frame, num_items)


def test_leave_one_out_split_by_hand(tmp_path, ml1m_dir):
    out = tmp_path / "data"
    prepare.run(cfg.load(prepare.PrepareConfig, format="movielens", source=ml1m_dir, out=out), log=lambda _: None)
    seqs = UserSequences.load(out)
    # item_idx == GroupLens movie id in the fixture (catalogue order 1..5)
    assert seqs.user(0)[0].tolist() == [1, 3, 2, 4, 1]
    assert seqs.user(1)[0].tolist() == [1, 2, 4, 3]
    train = training_sequences(seqs)
    assert [train.user(u)[0].tolist() for u in range(2)] == [[1, 3, 2], [1, 2]]
    valid, test = eval_examples(seqs, "valid"), eval_examples(seqs, "test")
    assert valid.targets.tolist() == [4, 4] and test.targets.tolist() == [1, 3]
    assert [valid.history(i).tolist() for i in range(2)] == [[1, 3, 2], [1, 2]]
    assert [test.history(i).tolist() for i in range(2)] == [[1, 3, 2, 4], [1, 2, 4]]  # includes the valid item
    assert test.target_timestamps.tolist() == [300, 10]


def official_chunks(seq: list[int], max_len: int) -> list[list[int]]:
    """The official loader's chunking, written out plainly: MAX_ITEM_LIST_LENGTH = max_len."""
    size = max_len + 1
    if len(seq) <= size:
        return [seq]
    start = len(seq) % size
    return [seq[i:i + size] for i in range(start, len(seq), size)]


@pytest.mark.parametrize("max_len", [1, 2, 3, 10])
def test_chunks_match_the_official_chunking(max_len):
    rng = np.random.default_rng(max_len)
    users = [list(rng.integers(1, 50, size=n)) for n in rng.integers(3, 40, size=60)]
    seqs = make_seqs(users)
    windows = training_windows(seqs, max_len=max_len, chunking="chunks")
    got = [(u, items.tolist()) for u, items, _ in windows]
    expected = [(u, [int(x) for x in chunk]) for u, s in enumerate(users) for chunk in official_chunks(s[:-2], max_len)
                if len(chunk) >= 2]
    assert got == expected


def test_last_keeps_the_most_recent_items():
    seqs = make_seqs([[1, 2, 3, 4, 5, 6, 7], [8, 9, 10], [11, 12, 13, 14]])
    windows = training_windows(seqs, max_len=2, chunking="last")
    # user 1 has a single training item: nothing to predict, no window
    assert [(u, items.tolist()) for u, items, _ in windows] == [(0, [3, 4, 5]), (2, [11, 12])]


def test_eval_skips_users_without_history():
    seqs = make_seqs([[1, 2], [3, 4, 5]])
    assert eval_examples(seqs, "test").users.tolist() == [0, 1]
    assert eval_examples(seqs, "valid").users.tolist() == [1]


def test_unsorted_interactions_are_refused():
    frame = pl.DataFrame({"user_idx": [1, 0], "item_idx": [1, 2], "timestamp": [1, 2]})
    with pytest.raises(Exception, match="not sorted"):
        UserSequences.from_frame(frame, 2)


def test_load_without_prepare_says_what_to_do(tmp_path):
    write(tmp_path / "x.txt", "")
    with pytest.raises(Exception, match="data prepare"):
        UserSequences.load(tmp_path)
