"""Shared helpers: fixture files written by the tests, and running the real CLI in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

REPO = Path(__file__).resolve().parents[1]


def pytest_configure(config) -> None:
    """Under pytest-xdist (make test runs one worker per core), each worker and the CLI processes it starts get an
    equal share of the cores: torch's default of one thread per core in every worker would oversubscribe them."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        threads = str(max(1, (os.cpu_count() or 1) // workers))
        os.environ.setdefault("OMP_NUM_THREADS", threads)
        import torch

        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(scope="module")
def cached(tmp_path_factory) -> dict:
    """Planted data (users walk items 1 -> 2 -> ...) and a cached embedding version of random, distinct vectors,
    made once per test module."""
    return make_cached_run(tmp_path_factory.mktemp("cached"))


def quiet(_) -> None:
    """A `log` that prints nothing."""


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> dict:
    """Planted data and two tiny Item LLMs (a llama decoder, a bert encoder), made once per test module."""
    root = tmp_path_factory.mktemp("planted")
    return {"data": make_planted_data(root), "llama": make_tiny_item_model(root / "tiny-llama", "llama"),
            "bert": make_tiny_item_model(root / "tiny-bert", "bert"), "root": root}


def stage_one_settings(planted: dict, out: Path, *overrides: str, kind: str = "llama"):
    """A tiny stage-one run on the planted data with the `kind` Item LLM (bert: mean pooling) into `out`, then
    `overrides` (later ones win)."""
    from pipeline import config as cfg
    from stages.embed_items import EmbedItemsConfig

    base = [f"data={planted['data']}", f"out={out}", f"item.model={planted[kind]}", "user.name=llama-tiny",
            "item.max_text_tokens=16", "train.batch_size=16", "train.max_len=5", "train.num_negatives=16",
            "train.lr=3e-3", "train.eval_users=120", "train.log_every=50", "train.checkpoint_every=1000",
            "embed.shard_rows=7", "device=cpu"] + (["item.pooling=mean"] if kind == "bert" else [])
    return cfg.load(EmbedItemsConfig, None, base + list(overrides))


def stage_two_settings(cached: dict, run: Path, *overrides: str):
    """A tiny stage-two run on the planted data (make_cached_run) in `run`, a copy of the cached run folder: the
    settings every stage-two test shares, then `overrides` (later ones win)."""
    import shutil

    from pipeline import config as cfg
    from stages.train_user import TrainUserConfig

    if not run.exists():
        shutil.copytree(cached["run"], run)
    base = [f"data={cached['data']}", f"run={run}", "user.init=scratch", "train.batch_size=16", "train.max_len=8",
            "train.num_negatives=16", "train.lr=3e-3", "train.checkpoint_every=1000", "device=cpu"]
    return cfg.load(TrainUserConfig, None, base + list(overrides))


def crash_on_call(real, n: int):
    """`real`, except that its n-th call raises KeyboardInterrupt (a run killed mid-training)."""
    calls = {"n": 0}

    def wrapped(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt("killed")
        return real(*args, **kwargs)

    return wrapped


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


# ---------------------------------------------------------------------------------------------------------------
# Tiny models and a planted-pattern dataset for the model tests


def make_tiny_tokenizer(words: list[str]):
    """A word-level tokenizer with [CLS]/[SEP] templates and a pad token, built here (no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"] + sorted(set(words))
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2),
                                                                                                ("[SEP]", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]")


PLANTED_ITEMS = 40


def planted_words() -> list[str]:
    prompt = "Compress the following sentence into embedding : title"
    return prompt.split() + [f"w{i}" for i in range(PLANTED_ITEMS)] + [f"g{i}" for i in range(5)]


def make_tiny_item_model(path: Path, kind: str = "bert", hidden: int = 32) -> Path:
    """A randomly initialised tiny encoder (bert) or decoder (llama) directory with its tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModel

    tokenizer = make_tiny_tokenizer(planted_words())
    if kind == "bert":
        config = AutoConfig.for_model("bert", vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=2,
                                      num_attention_heads=2, intermediate_size=2 * hidden,
                                      max_position_embeddings=128, hidden_dropout_prob=0.0,
                                      attention_probs_dropout_prob=0.0)
    else:
        config = AutoConfig.for_model("llama", vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=2, intermediate_size=2 * hidden,
                                      max_position_embeddings=128, bos_token_id=None, eos_token_id=None,
                                      pad_token_id=0)
    torch.manual_seed(0)
    model = AutoModel.from_config(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def make_planted_data(root: Path, n_users: int = 120, length: int = 12, seed: int = 0, prompt: str = "") -> Path:
    """Users walk the item cycle 1 -> 2 -> ... -> 40 -> 1 from a random start: next item = current + 1.

    Prepared through the real `data prepare` (hllm-csv format) into root/data."""
    import numpy as np

    from pipeline import config as cfg
    from stages import prepare

    rng = np.random.default_rng(seed)
    rows = ["item_id,user_id,timestamp"]
    for u in range(n_users):
        start = int(rng.integers(0, PLANTED_ITEMS))
        for t in range(length):
            rows.append(f"i{(start + t) % PLANTED_ITEMS},u{u},{1000 + t}")
    write(root / "raw" / "inter.csv", "\n".join(rows) + "\n")
    items = ["item_id,title"] + [f"i{k},w{k} g{k % 5}" for k in range(PLANTED_ITEMS)]
    write(root / "raw" / "items.csv", "\n".join(items) + "\n")
    out = root / "data"
    conf = cfg.load(prepare.PrepareConfig, format="hllm-csv", source=root / "raw" / "inter.csv",
                    items=root / "raw" / "items.csv", out=out, item_prompt=prompt)
    prepare.run(conf, log=lambda _: None)
    return out


def make_cached_run(root: Path, dim: int = 64) -> dict:
    """Planted data and a cached embedding version of random, distinct item vectors in root/run/embeddings."""
    import numpy as np
    import torch

    from pipeline.embeddings.store import ShardWriter

    data = make_planted_data(root)
    items = pl.read_parquet(data / "items.parquet")
    vectors = torch.randn(PLANTED_ITEMS, dim, generator=torch.Generator().manual_seed(0))
    writer = ShardWriter(root / "run" / "embeddings" / "v-test", "safetensors", "float32", {"model_fingerprint": "t"})
    writer.write(0, np.arange(1, PLANTED_ITEMS + 1), vectors)
    writer.finish(items, dim, {"max_item_idx": PLANTED_ITEMS})
    (root / "run" / "embeddings" / "CURRENT").write_text("v-test\n")
    return {"data": data, "run": root / "run"}
