"""Stage one (`embed-items`): fine-tune the Item LLM end to end with a User LLM on short sequences (the paper's
Stage I), then run it over the whole catalogue into embedding shards.

Writes into `out` (e.g. artifacts/ml-100k):
  stage1/            training run: state.pt (everything needed to resume), metrics.jsonl, config.yaml,
                     best/ (the best checkpoint's Item and User LLM)
  item_llm/          the Item LLM used for the embeddings (fine-tuned best, or the pretrained one)
  user_llm_stage1/   the User LLM trained with it (stage two can start from it)
  embeddings/<version>/  shards + manifest (pipeline.embeddings.store); embeddings/CURRENT names the latest

Runs as one process or under `accelerate launch` (DDP; see stages/configs/accelerate/).
"""

from __future__ import annotations

import hashlib
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
import polars as pl
import torch

from pipeline import config as cfg
from pipeline import loop, versions
from pipeline.data.sequences import UserSequences
from pipeline.embeddings.encode import Throughput, embed_items
from pipeline.embeddings.store import ShardWriter, version_root
from pipeline.errors import ConfigError, UserError
from pipeline.io import fingerprint, folder_sha256, sha256_file
from pipeline.lock import job_lock
from pipeline.loop import LoopConfig
from pipeline.models import build, llm
from pipeline.models.build import UserModelConfig
from pipeline.models.item_sources import TextItems
from pipeline.models.lower_states import kept_lower_states
from pipeline.models.sequence_model import SequenceModel
from pipeline.models.tokens import TokenizedCatalogue
from pipeline.run_dir import RunDir
from pipeline.runtime import device_of, distributed_state, on_main


@dataclass(frozen=True)
class ItemModelConfig:
    model: str = "minilm-l6"
    """Item LLM: a preset (minilm-l6, smollm2-135m), a Hugging Face directory, or a hub name."""
    init: Literal["pretrained", "scratch"] = "pretrained"
    """pretrained weights, or the same architecture with random weights."""
    pooling: Literal["item_token", "mean"] = "item_token"
    """item_token: the learnable [ITEM] position after the text (official); mean: mean of the text's states."""
    positions: Literal["right", "left"] = "right"
    """Token positions of an item text: right-aligned as the official code (the [ITEM] slot always at
    max_text_tokens), or from 0 (what a frozen encoder saw in pre-training)."""
    max_text_tokens: int = 256
    """Keep the first this many tokens of each item text (special tokens included)."""
    token_budget: int = 16384
    """Item tokens per Item LLM forward chunk while training and validating (batch rows x longest text)."""
    attn_implementation: str = "sdpa"
    """Attention kernel: sdpa, eager, or flash_attention_2 where installed."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""
    negatives: Literal["encoded", "table"] = "encoded"
    """Where fine-tuning takes the negatives from. encoded (official): each step encodes its negatives with the
    Item LLM, with gradients, alongside its own items. table: rows of a table of every item's embedding that the
    current Item LLM recomputes every `table_refresh_every` steps without gradients; only the step's own items
    (histories and targets) go through the Item LLM, with gradients (also where they are negatives), every score
    reads the table's values, and train.loss=softmax makes the whole catalogue negatives."""
    table_refresh_every: int = 50
    """With negatives=table: recompute the table every this many optimizer steps (1: before every step)."""
    train_layers: int | None = None
    """Partial depth: fine-tune only the top this many layers of the Item LLM (with the [ITEM] vector, which then
    enters at the first trained layer, and the projection); the word embeddings and lower layers stay as loaded.
    null: every layer and the word embeddings (official)."""
    lr: float | None = None
    """Peak learning rate of the Item LLM's trained weights (a pretrained model fine-tuned beside a User LLM
    trained from scratch may want a smaller one); null: train.lr, as every other weight."""
    lower_outputs: Literal["disk", "recompute"] = "disk"
    """With train_layers: keep the frozen layers' per-token outputs, computed once, in a checksummed file under
    stage1/ (4 bytes x hidden size x catalogue tokens), or recompute them without gradients at every step."""
    lora_rank: int | None = None
    """LoRA (peft; pip install 'hllm-pipeline[lora]'): train low-rank adapters of this rank on the Item LLM's linear
    layers (with train_layers, those of the trained top layers only) instead of their weights, and merge them into
    plain weights when training ends. null: no adapters, the weights themselves are trained."""
    lora_alpha: float = 32.0
    """LoRA: an adapter's update is scaled by lora_alpha / lora_rank."""
    lora_targets: tuple[str, ...] = ()
    """LoRA: names or name endings of the linear layers to wrap (e.g. query,value or q_proj,v_proj); empty: every
    linear layer in scope."""

    def __post_init__(self) -> None:
        if self.max_text_tokens < 2:
            raise ConfigError(f"item.max_text_tokens={self.max_text_tokens}: must be >= 2")
        if self.token_budget < 1:
            raise ConfigError(f"item.token_budget={self.token_budget}: must be >= 1")
        if self.table_refresh_every < 1:
            raise ConfigError(f"item.table_refresh_every={self.table_refresh_every}: must be >= 1 (1 recomputes the "
                              "negative table before every step)")
        if self.lr is not None and not 0 < self.lr < 1:
            raise ConfigError(f"item.lr={self.lr}: must be in (0, 1) (e.g. 1e-4), or null for train.lr")
        if self.lora_rank is not None and self.lora_rank < 1:
            raise ConfigError(f"item.lora_rank={self.lora_rank}: must be >= 1 (e.g. 8), or null for no adapters")
        if self.train_layers is not None and self.train_layers < 1:
            raise ConfigError(f"item.train_layers={self.train_layers}: must be >= 1 (the top layers to fine-tune), "
                              "or null for every layer")


@dataclass(frozen=True)
class EmbedConfig:
    shard_rows: int = 100_000
    """Items per shard."""
    format: Literal["safetensors", "parquet"] = "safetensors"
    """Shard file format."""
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    """Stored precision of the embeddings."""
    token_budget: int = 32768
    """Item tokens per forward batch (batch rows x longest text)."""
    version: str | None = None
    """Name of the embeddings version; null derives one from the model and data fingerprints."""

    def __post_init__(self) -> None:
        if self.shard_rows < 1 or self.token_budget < 1:
            raise ConfigError("embed.shard_rows and embed.token_budget must be >= 1")
        if self.format == "parquet" and self.dtype == "bfloat16":
            raise ConfigError("embed.dtype=bfloat16: Parquet has no bfloat16; use float16 or float32, or "
                              "embed.format=safetensors")


@dataclass(frozen=True)
class EmbedItemsConfig:
    RENAMED: ClassVar[dict[str, str]] = {
        "model.item_model": "item.model", "model.item_init": "item.init", "model.pooling": "item.pooling",
        "model.positions": "item.positions", "model.max_text_tokens": "item.max_text_tokens",
        "model.user_model": "user.name", "model.user_init": "user.init", "model.user_layers": "user.layers",
        "model.attn_implementation": "item.attn_implementation and user.attn_implementation",
        "model.gradient_checkpointing": "item.gradient_checkpointing and user.gradient_checkpointing",
        "train.finetune": "finetune", "train.token_budget": "item.token_budget"}

    data: Path
    """Folder of the canonical tables (from `data prepare`), e.g. artifacts/ml-100k/data."""
    out: Path
    """Run folder, e.g. artifacts/ml-100k (stage1/, item_llm/, embeddings/ go inside)."""
    item: ItemModelConfig = ItemModelConfig()
    """The Item LLM."""
    user: UserModelConfig = UserModelConfig(init="scratch")
    """The User LLM trained with it (init pretrained or scratch)."""
    finetune: bool = True
    """Train end to end before embedding; false embeds with the pretrained Item LLM (quick, much worse)."""
    train: LoopConfig = LoopConfig(epochs=5, batch_size=16, max_len=10, num_negatives=512, lr=1e-4, patience=2,
                                   checkpoint_every=200, log_every=10)
    """End-to-end fine-tuning on short sequences (official: 5 epochs, lr 1e-4; max_len 10 on PixelRec, 50 on
    Books)."""
    embed: EmbedConfig = EmbedConfig()
    """The embedding job over the catalogue."""
    seed: int = 42
    """Seed of every random choice (initialisation, data order, negatives, dropout)."""
    device: str = "auto"
    """auto (cuda when available), cpu or cuda."""
    resume: bool = True
    """Continue from stage1/state.pt when it exists and was made with the same settings."""

    def __post_init__(self) -> None:
        if self.item.lora_rank is not None and not self.finetune:
            raise ConfigError(f"item.lora_rank={self.item.lora_rank}: adapters are trained by fine-tuning; set "
                              "finetune=true or item.lora_rank=null")
        if self.user.init == "stage-one":
            raise ConfigError("user.init=stage-one is for stage two; stage one trains its User LLM from "
                              "user.init=pretrained or scratch")


# ---------------------------------------------------------------------------------------------------------------


def _load_data(data: Path) -> tuple[UserSequences, pl.DataFrame]:
    seqs = UserSequences.load(data)
    items = pl.read_parquet(data / "items.parquet", columns=["item_idx", "item_id", "text", "text_sha256"])
    items = items.sort("item_idx")
    if items["item_idx"].to_list() != list(range(1, items.height + 1)):
        raise UserError(f"{data / 'items.parquet'}: item_idx must run 1..N; re-run `data prepare`")
    return seqs, items


def train(config: EmbedItemsConfig, model: SequenceModel, seqs: UserSequences, log=print) -> SequenceModel:
    """End-to-end training of both LLMs on short sequences (pipeline.loop); returns the best epoch's model."""
    run_dir = RunDir(config.out).stage1
    run_dir.mkdir(parents=True, exist_ok=True)
    identity = {"model": {"item": cfg.to_dict(config.item), "user": cfg.to_dict(config.user)},
                "interactions": sha256_file(config.data / "interactions.parquet"),
                "items": sha256_file(config.data / "items.parquet")}
    if len(seqs.new_items):  # the same interactions with another new-item split are another run
        identity["new_items"] = fingerprint(seqs.new_items.tolist())
    return loop.train(model, seqs, config.train, run_dir, identity, seed=config.seed, device_name=config.device,
                      resume=config.resume, save_best=lambda m, folder: build.save_model(m, folder, STAGE_META),
                      load_best=build.load_model_weights, name="stage one", log=log,
                      save_config=lambda path: cfg.save(config, path))


STAGE_META = {"source": "stage one"}


def _item_meta(config: EmbedItemsConfig) -> dict:
    i = config.item
    return {"source_model": i.model, "positions": i.positions, "max_text_tokens": i.max_text_tokens,
            "train_layers": i.train_layers}


def embed_catalogue(config: EmbedItemsConfig, item_llm, catalogue: TokenizedCatalogue, items: pl.DataFrame,
                    log=print, state=None, new_items: np.ndarray | None = None) -> Path:
    """Run the Item LLM over every catalogue item into embeddings/<version>/ (resumable, manifest last). Under a
    multi-process launch (accelerate `state`), each process embeds and writes every num_processes-th shard (a
    disjoint slice by item_idx) and the main process writes the manifest once all are done. Held-out `new_items`
    are left out of the version (`refresh items` adds them, as it adds items that arrive later)."""
    e, m = config.embed, config.item
    new_items = np.zeros(0, dtype=np.int64) if new_items is None else np.asarray(new_items, dtype=np.int64)
    items = items.filter(~pl.col("item_idx").is_in(new_items.tolist()))
    model_fp = folder_sha256(RunDir(config.out).item_llm)
    data_fp = hashlib.sha256("".join(items["text_sha256"].to_list()).encode()).hexdigest()
    identity = {"model_fingerprint": model_fp, "data_fingerprint": data_fp, "max_text_tokens": m.max_text_tokens,
                   "pooling": m.pooling, "positions": m.positions, "shard_rows": e.shard_rows, "format": e.format,
                   "dtype": e.dtype}
    if len(new_items):  # another version than the whole catalogue's
        identity["held_out_new_items"] = fingerprint(new_items.tolist())
    version = e.version or f"v-{fingerprint(identity)[:12]}"
    root = RunDir(config.out).embeddings / version
    rank, world = (state.process_index, state.num_processes) if state is not None else (0, 1)
    log = log if rank == 0 else (lambda _: None)
    with job_lock(RunDir(config.out).embeddings, wait=0, log=log, state=state):  # no refresh job may meet this one
        current = RunDir(config.out).embeddings / "CURRENT"
        if versions.is_finished(root):
            log(f"embeddings {version} already complete in {root}")
            if current.is_file() and current.read_text().strip() != version:
                log(f"note: CURRENT stays at {current.read_text().strip()} (a refresh made it from this version); "
                    f"`hllm-pipeline refresh rollback {version} --run {config.out}` goes back to it")
                return root
        else:
            writer = ShardWriter(root, e.format, e.dtype, identity, rank=rank)
            rates = _write_shards(config, item_llm, catalogue, writer, rank, world, new_items)
            if state is not None:
                state.wait_for_everyone()
            manifest = on_main(state, lambda: writer.finish(
                items, item_llm.dim, shards=math.ceil(catalogue.num_items / e.shard_rows),
                extra={"version": version, "parent": None, "max_item_idx": catalogue.num_items,
                       "item_llm": str(RunDir(config.out).item_llm), "throughput": rates, "processes": world}))
            if manifest is not None:
                log(f"embeddings {version}: {manifest['rows']:,} items x {manifest['dim']} ({e.dtype}, {e.format}) "
                    f"in {root}; {rates['items_per_s']:.0f} items/s, {rates['tokens_per_s']:.0f} tokens/s"
                    + (f" on the main process of {world}" if world > 1 else ""))
        on_main(state, lambda: versions.publish(RunDir(config.out).embeddings, version))
    return root


def _write_shards(config: EmbedItemsConfig, item_llm, catalogue: TokenizedCatalogue, writer: ShardWriter,
                  rank: int = 0, world: int = 1, left_out: np.ndarray | None = None) -> dict:
    """This process's shards (every world-th, from rank), writing each while the next one is computed; items in
    `left_out` are in none."""
    e, m = config.embed, config.item
    device = next(item_llm.parameters()).device
    autocast = torch.bfloat16 if device.type == "cuda" else None
    n = catalogue.num_items
    mine = [k for k in range(math.ceil(n / e.shard_rows)) if k % world == rank]
    meter = Throughput()
    from tqdm import tqdm

    ranges = {k: np.arange(k * e.shard_rows + 1, min((k + 1) * e.shard_rows, n) + 1) for k in mine}
    if left_out is not None and len(left_out):
        ranges = {k: np.setdiff1d(idx, left_out) for k, idx in ranges.items()}
    bar = tqdm(total=sum(len(r) for r in ranges.values()), unit="item", desc=f"embedding {writer.root.name}",
               disable=None if rank == 0 else True)
    item_llm.eval()
    with ThreadPoolExecutor(max_workers=1) as pool:  # writing a shard overlaps the next shard's compute
        pending = None
        for k, idx in ranges.items():
            if writer.is_done(k):
                bar.update(len(idx))
                continue
            emb = embed_items(item_llm, catalogue, idx, e.token_budget, m.positions, autocast,
                              progress=lambda i, t: (meter(i, t), bar.update(i)))
            if not torch.isfinite(emb).all():
                raise RuntimeError(f"shard {k}: the Item LLM produced NaN or infinite embeddings")
            if pending is not None:
                pending.result()
            pending = pool.submit(writer.write, k, idx, emb)
        if pending is not None:
            pending.result()
    bar.close()
    return meter.rates()


def build_model(config: EmbedItemsConfig, items: pl.DataFrame, log=print
                ) -> tuple[SequenceModel, object, TokenizedCatalogue]:
    """The stage-one model `config` asks for: the User LLM, and the Item LLM (with partial depth and LoRA where
    set) over the tokenized catalogue (with the negative table and the kept lower-layer outputs where set)."""
    i = config.item
    user_llm = build.user_llm_from(config.user, log=log)
    # with user.projection the User LLM maps the Item LLM's own width; otherwise the Item LLM projects to the User's
    out_dim = None if config.user.projection else user_llm.dim
    item_llm, tokenizer = build.build_item_llm(i.model, i.init, i.pooling, out_dim, i.attn_implementation,
                                               i.max_text_tokens, log=log, train_layers=i.train_layers)
    if i.gradient_checkpointing:
        item_llm.backbone.gradient_checkpointing_enable()
    log(f"tokenizing {items.height:,} item texts (first {i.max_text_tokens} tokens)")
    catalogue = TokenizedCatalogue.build(tokenizer, items["text"].to_list(), i.max_text_tokens)
    lower = None
    if config.finetune and i.train_layers is not None and i.lower_outputs == "disk":
        lower = kept_lower_states(RunDir(config.out).stage1, item_llm.to(device_of(config.device)), catalogue,
                                  i.positions, config.embed.token_budget, log=log)
    if i.lora_rank is not None:  # after the kept outputs, whose key is the frozen weights as loaded
        wrapped = llm.add_lora(item_llm, i.lora_rank, i.lora_alpha, i.lora_targets)
        log(f"LoRA rank {i.lora_rank} on {wrapped} linear layers of the Item LLM: "
            f"{sum(p.numel() for p in item_llm.parameters() if p.requires_grad):,} trained parameters")
        if i.negatives == "table":
            log("note: LoRA with table negatives stayed at chance on our planted fixture, where it learns with "
                "item.negatives=encoded (docs/stage-one.md)")
    source = TextItems(item_llm, catalogue, tokenizer, i.positions, i.token_budget, _item_meta(config),
                       table_every=i.table_refresh_every if i.negatives == "table" else None, lower_states=lower)
    source.lr = i.lr
    return build.sequence_model(source, user_llm, config.user), tokenizer, catalogue


def run(config: EmbedItemsConfig, log=print) -> Path:
    """Stage one: (fine-tune and) embed. Returns the embeddings version folder."""
    torch.manual_seed(config.seed)
    seqs, items = _load_data(config.data)
    model, tokenizer, catalogue = build_model(config, items, log=log)
    if config.finetune:
        model = train(config, model, seqs, log=log)
    device = device_of(config.device)
    state = distributed_state(device)
    item_llm = model.items.item_llm
    llm.merge_lora(item_llm)  # with LoRA: every later reader (embedding job, refresh, eval) sees an ordinary model
    if state.is_main_process:  # one writer: every process holds the same weights
        build.save_item_llm(item_llm, tokenizer, RunDir(config.out).item_llm, _item_meta(config))
        build.save_user_llm(model, RunDir(config.out).user_llm_stage1,
                            {**STAGE_META, "max_len": config.train.max_len, "trained": config.finetune})
        cfg.save(config, RunDir(config.out).item_llm / "config.yaml")
    state.wait_for_everyone()
    embed_catalogue(config, item_llm.to(device), catalogue, items, log=log, state=state,  # in slices, all processes
                    new_items=seqs.new_items)
    return version_root(config.out)
