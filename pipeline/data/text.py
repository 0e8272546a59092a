"""Item text exactly as the official HLLM code builds it, and its tokenization.

    text = prompt + "".join(f"{key}: {value}" for key in text_keys if value is not missing)

No separator between fields. A missing value is skipped: null, empty, or one of the strings pandas reads as
NaN (the official code reads item files with pandas and tests `value and str(value) != 'nan'`).
Tokens: the tokenizer's own special tokens, the first `max_text_tokens` kept, then `n_item_tokens`
placeholder positions whose input embeddings the Item LLM replaces with learnable `[ITEM]` vectors.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from pipeline.errors import UserError

DEFAULT_ITEM_PROMPT = "Compress the following sentence into embedding: "
DEFAULT_TEXT_KEYS = {
    "movielens": ("title", "genres"),
    "amazon-books": ("title", "description"),
    "pixelrec": ("title", "tag", "description"),
    "hllm-csv": ("title", "tag", "description"),  # those of them the item file has
}
# pandas.read_csv's default NA strings: the official pipeline never sees these as text
PANDAS_NA = ("", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN", "<NA>",
             "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null")


def is_missing(value: object) -> bool:
    return value is None or str(value) in PANDAS_NA


def build_item_text(fields: dict[str, object], text_keys: Sequence[str], prompt: str = DEFAULT_ITEM_PROMPT) -> str:
    """Reference implementation for one item (the vectorised `item_text_expr` must agree with it)."""
    return prompt + "".join(f"{key}: {fields.get(key)}" for key in text_keys if not is_missing(fields.get(key)))


def item_text_expr(text_keys: Sequence[str], prompt: str = DEFAULT_ITEM_PROMPT) -> pl.Expr:
    """The same text as `build_item_text`, as a polars expression over the item table."""
    parts = [pl.lit(prompt)]
    for key in text_keys:
        value = pl.col(key).cast(pl.String)
        missing = value.is_null() | value.is_in(list(PANDAS_NA))
        parts.append(pl.when(missing).then(pl.lit("")).otherwise(pl.lit(f"{key}: ") + value))
    return pl.concat_str(parts)


def text_sha256(texts: Sequence[str]) -> list[str]:
    """The hex sha256 of each item text's UTF-8 bytes: how a text change is recognised (data prepare, refresh)."""
    return [hashlib.sha256(t.encode("utf-8")).hexdigest() for t in texts]


def encode_item_text(tokenizer, texts: Sequence[str], max_text_tokens: int = 256, n_item_tokens: int = 1,
                     placeholder_id: int = 0) -> list[list[int]]:
    """Token ids per item: special tokens included, first `max_text_tokens` kept, then the [ITEM] slots."""
    if max_text_tokens < 1:
        raise ValueError("max_text_tokens must be >= 1")
    # The official code encodes the whole text and keeps the first tokens; slicing does the same (tokenizer
    # truncation would keep the closing special token instead). Very long texts are cut first, in characters.
    encoded = tokenizer([t[:max_text_tokens * 64] for t in texts], add_special_tokens=True,
                        truncation=False, verbose=False)["input_ids"]
    return [ids[:max_text_tokens] + [placeholder_id] * n_item_tokens for ids in encoded]


@dataclass(frozen=True)
class TextRecipe:
    """How `data prepare` built the item texts of a run: the same recipe must build the refreshed ones."""

    format: str
    text_keys: tuple[str, ...]
    item_prompt: str
    encoding: str | None


def text_recipe(data: Path) -> TextRecipe:
    stats_path, config_path = data / "stats.json", data / "config.yaml"
    try:
        stats = json.loads(stats_path.read_text())
        rules = stats["rules"]
        import yaml

        prepared = yaml.safe_load(config_path.read_text()) or {}
        return TextRecipe(stats["format"], tuple(rules["text_keys"]), rules["item_prompt"], prepared.get("encoding"))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{data}: not the canonical tables of a `data prepare` run (stats.json and config.yaml "
                        f"are needed to build item texts: {type(e).__name__}); pass data=<the run's data folder>"
                        ) from None
