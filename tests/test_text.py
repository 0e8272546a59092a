"""Item text: the official prompt and `key: value` format, and truncation that keeps the first tokens."""

from __future__ import annotations

import polars as pl
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from pipeline.data.text import DEFAULT_ITEM_PROMPT, build_item_text, encode_item_text, item_text_expr


def test_known_item_character_for_character():
    fields = {"title": "Toy Story (1995)", "genres": "Animation|Children's|Comedy"}
    assert build_item_text(fields, ["title", "genres"]) == (
        "Compress the following sentence into embedding: title: Toy Story (1995)genres: Animation|Children's|Comedy"
    )


def test_missing_values_are_skipped_and_order_follows_the_keys():
    fields = {"title": "T", "tag": None, "description": "nan", "extra": ""}
    assert build_item_text(fields, ["description", "tag", "title", "extra"]) == DEFAULT_ITEM_PROMPT + "title: T"
    assert build_item_text({}, ["title"]) == DEFAULT_ITEM_PROMPT
    assert build_item_text({"title": "x"}, ["title"], prompt="") == "title: x"


def test_vectorised_text_agrees_with_the_reference():
    values = ["A", None, "", "nan", "NaN", "x: y", "ünï", " spaced ", "0"]
    rows = [{"title": a, "tag": b, "description": c} for a in values for b in values[:4] for c in values[::2]]
    frame = pl.DataFrame(rows, schema={"title": pl.String, "tag": pl.String, "description": pl.String})
    keys = ["title", "tag", "description"]
    got = frame.select(item_text_expr(keys).alias("t"))["t"].to_list()
    assert got == [build_item_text(r, keys) for r in rows]


@pytest.fixture
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer with BOS/EOS templates, built here (no download)."""
    words = ["[UNK]", "[PAD]", "<s>", "</s>"] + [f"w{i}" for i in range(20)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 2), ("</s>", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", bos_token="<s>",
                                   eos_token="</s>")


def test_truncation_keeps_the_first_tokens_then_appends_item_slots(tiny_tokenizer):
    text = " ".join(f"w{i}" for i in range(10))
    ids = encode_item_text(tiny_tokenizer, [text, "w5"], max_text_tokens=5, n_item_tokens=2, placeholder_id=0)
    # <s> w0 w1 w2 w3 | cut | then two [ITEM] placeholders
    assert ids[0] == [2, 4, 5, 6, 7, 0, 0]
    assert ids[1] == [2, 9, 3, 0, 0]  # short text: special tokens kept, nothing cut


def test_truncation_setting_is_validated(tiny_tokenizer):
    with pytest.raises(ValueError):
        encode_item_text(tiny_tokenizer, ["w1"], max_text_tokens=0)
