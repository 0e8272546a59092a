"""Stage two (`train-user`): train only the User LLM on the cached item embeddings (the paper's Stage II).

The Item LLM is never loaded: item embeddings come from stage one's shards, so sequences can be long (hundreds
of items) and negatives cost a table lookup. Writes into `run` (stage one's folder, e.g. artifacts/ml-100k):
  stage2/     state.pt (resumable state), metrics.jsonl, config.yaml, best/user_llm/
  user_llm/   the best User LLM: a Hugging Face directory + user_head.safetensors (logit scale, time and ID
              embeddings, adapter) + user_llm.json + config.yaml
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

import torch

from pipeline import config as cfg
from pipeline import loop
from pipeline.data.sequences import UserSequences
from pipeline.embeddings.store import load_embeddings, read_manifest, version_root
from pipeline.errors import ConfigError, UserError
from pipeline.io import fingerprint, sha256_file
from pipeline.loop import LoopConfig
from pipeline.models import build
from pipeline.models.build import UserModelConfig
from pipeline.models.sequence_model import SequenceModel
from pipeline.run_dir import RunDir
from pipeline.runtime import device_of, distributed_state


@dataclass(frozen=True)
class TrainUserConfig:
    RENAMED: ClassVar[dict[str, str]] = {"model.adapter": "adapter", "model.": "user."}

    data: Path
    """Canonical tables (from `data prepare`), e.g. artifacts/ml-100k/data."""
    run: Path
    """Stage one's folder (embeddings/, user_llm_stage1/), e.g. artifacts/ml-100k; stage2/ and user_llm/ go here."""
    embeddings: str | None = None
    """Embeddings version under run/embeddings/; null takes the one named in run/embeddings/CURRENT."""
    items: Literal["cached", "id", "cached+id"] = "cached"
    """What the model reads for an item: the cached embeddings (HLLM stage two), a trainable item-ID table (the ID
    baselines: SASRec, no stage one needed) or the sum of both (text + ID)."""
    id_width: int | None = None
    """items=cached+id: numbers per item in the ID table. null: as many as the cached embeddings have (e.g. 384);
    fewer (e.g. the User LLM's width) through one learned map up to the cached width: fewer weights per item."""
    id_dropout: float = 0.0
    """items=id or cached+id: the probability that training replaces an item's ID by one shared learned
    "unknown" row (per step); scoring gives that row to IDs no training saw (new items), so a text + ID model
    learns to rely on the text where the ID is unknown. 0: off."""
    id_max_norm: float | None = None
    """items=cached+id: the longest an item's ID vector may be (in the cached embeddings' units; they have length
    1): each item is its frozen text embedding plus a learned offset of at most this length, 0 for a new item.
    null: unbounded."""
    new_item_embeddings: str | None = None
    """With a new-item split and cached embeddings: an embeddings version under run/embeddings/ that holds the
    new items (the one `refresh items` made from their text); their rows are used by validation only, so settings
    can be chosen on new-item validation targets. Training never reads a new item's row (tested: the same
    losses with and without). null: new items have no row until a refresh, and their validation is 0."""
    adapter: bool = False
    """A small trainable residual MLP on the cached embeddings (inputs, targets and negatives)."""
    user: UserModelConfig = UserModelConfig(init="stage-one")
    """The User LLM and its extra inputs."""
    train: LoopConfig = LoopConfig(epochs=20, batch_size=64, max_len=200, num_negatives=4096, lr=1e-3, patience=3,
                                   checkpoint_every=500, log_every=20)
    """Training on long sequences; negatives are table lookups."""
    seed: int = 42
    """Seed of every random choice."""
    device: str = "auto"
    """auto (cuda when available), cpu or cuda."""
    resume: bool = True
    """Continue from stage2/state.pt when it exists and was made with the same settings."""

    def __post_init__(self) -> None:
        if not 0 <= self.id_dropout < 1 or (self.id_dropout and "id" not in self.items):
            raise ConfigError(f"id_dropout={self.id_dropout}: a probability in [0, 1) for items=id or cached+id "
                              f"(items={self.items}); 0 turns it off")
        if self.id_max_norm is not None and (self.items != "cached+id" or self.id_max_norm <= 0):
            raise ConfigError(f"id_max_norm={self.id_max_norm}: a positive length for items=cached+id "
                              f"(items={self.items}); null: unbounded")
        if self.new_item_embeddings is not None and "cached" not in self.items:
            raise ConfigError(f"new_item_embeddings={self.new_item_embeddings}: only a model that reads cached "
                              f"embeddings has rows to fill (items={self.items}); set it to null")
        if self.id_width is not None and (self.items != "cached+id" or self.id_width < 1):
            raise ConfigError(f"id_width={self.id_width}: a positive width for items=cached+id (items={self.items}); "
                              "set id_width=null otherwise")


def embeddings_root(config: TrainUserConfig) -> Path:
    return version_root(config.run, config.embeddings)


def build_model(config: TrainUserConfig, table: torch.Tensor | None, num_items: int | None = None, log=print
                ) -> SequenceModel:
    """The User LLM over the item source (`table`: the cached embeddings, where it reads them; `num_items`:
    the catalogue size, where it does not); init=stage-one also takes stage one's logit scale (and any time or
    ID embedding it trained)."""
    num_items = num_items if num_items is not None else table.shape[0] - 1
    stage_one = RunDir(config.run).user_llm_stage1
    user_llm = build.user_llm_from(config.user, stage_one, log=log)
    items = build.item_source(config.items, table, num_items, user_llm.dim, config.adapter, id_width=config.id_width,
                              id_dropout=config.id_dropout, id_max_norm=config.id_max_norm)
    model = build.sequence_model(items, user_llm, config.user)
    if config.user.init == "stage-one":
        build.load_user_head(model, stage_one, partial=True)
    return model


def _fill_new_item_rows(model: SequenceModel, config: TrainUserConfig, new_items, log=print) -> None:
    """Give the held-out new items their rows from another embeddings version, for validation (after the model
    is built: nothing it derives from the training table, such as the ID scale, sees them)."""
    if not len(new_items):
        raise ConfigError(f"new_item_embeddings={config.new_item_embeddings}: {config.data} has no new-item split; "
                          "set it to null")
    loaded = load_embeddings(version_root(config.run, config.new_item_embeddings))
    ids = torch.from_numpy(new_items.astype("int64"))
    present = ids[ids < loaded.present.shape[0]]
    present = present[loaded.present[present]]
    cached = next(m for m in model.items.modules() if isinstance(m, build.CachedItems))
    with torch.no_grad():
        cached.cached[present] = loaded.embeddings[present].float().to(cached.cached.device)
    log(f"validation: {len(present):,} of {len(new_items):,} new items embedded from {config.new_item_embeddings}")


def run(config: TrainUserConfig, log=print) -> Path:
    """Stage two: train the User LLM on its item source; returns run/user_llm."""
    seqs = UserSequences.load(config.data)
    root, table, source = None, None, "item-ID embeddings trained from scratch (no cached embeddings)"
    if "cached" in config.items:
        root = embeddings_root(config)
        table = load_embeddings(root).embeddings
        if table.shape[0] != seqs.num_items + 1:
            raise UserError(f"{root}: holds {table.shape[0] - 1} items but {config.data} has {seqs.num_items}; "
                            "embed this data's catalogue first")
        source = f"item embeddings from the cache ({root.name})" + (" + item-ID embeddings" if config.items ==
                                                                    "cached+id" else "")
    torch.manual_seed(config.seed)
    device = device_of(config.device)
    model = build_model(config, table, seqs.num_items, log=log).to(device)
    build.zero_item_id_rows(model, seqs.new_items)  # held-out new items: no ID row is ever learned
    if config.new_item_embeddings is not None:
        _fill_new_item_rows(model, config, seqs.new_items, log)
    run_dir = RunDir(config.run).stage2
    run_dir.mkdir(parents=True, exist_ok=True)
    state = distributed_state(device)
    model_identity = {"user": cfg.to_dict(config.user), "adapter": config.adapter, "items": config.items}
    if config.id_width is not None:  # only where set: runs made before the setting existed still resume
        model_identity["id_width"] = config.id_width
    for name in ("id_dropout", "id_max_norm", "new_item_embeddings"):  # only where set, as id_width
        if getattr(config, name):
            model_identity[name] = getattr(config, name)
    identity = {"model": model_identity,
                "embeddings": read_manifest(root)["shards"] if root else None,
                "interactions": sha256_file(config.data / "interactions.parquet")}
    if len(seqs.new_items):  # the same interactions with another new-item split are another run
        identity["new_items"] = fingerprint(seqs.new_items.tolist())
    meta = {"source": "stage two", "model": "hllm" if root else config.user.name,
            "embeddings": str(root) if root else None, "init": config.user.init,
            "max_len": config.train.max_len}
    log(f"stage two: {source}")
    model = loop.train(model, seqs, config.train, run_dir, identity, seed=config.seed, device_name=config.device,
                       resume=config.resume, save_best=lambda m, folder: build.save_model(m, folder, meta),
                       load_best=build.load_model_weights, name="stage two", log=log,
                       save_config=lambda path: cfg.save(config, path))
    out = RunDir(config.run).user_llm
    if state.is_main_process:  # one writer: every process holds the same weights
        build.save_user_llm(model, out, meta)
        cfg.save(config, out / "config.yaml")
        log(f"User LLM written to {out}")
    state.wait_for_everyone()
    return out
