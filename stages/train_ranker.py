"""`train-ranker`: the discriminative HLLM (the paper's ranking half) on stage two's item sources.

A User LLM over cached item embeddings, item IDs or both (as stage two) learns a 0/1 label for each
(history, candidate) pair with early fusion, late fusion, or none (the generative score, the baseline): see
pipeline.models.ranker. Labels come from ratings (label = rating >= label_threshold); the split holds each user's
last `holdout` examples out for test and the `holdout` before them for validation (pipeline.ranking). The best
epoch is chosen on validation AUC. Writes into `run` (e.g. artifacts/ml-1m):
  ranker-<fusion>/train/   state.pt (resumable), metrics.jsonl, config.yaml, best/
  ranker-<fusion>/model/   the best model: a Hugging Face User LLM + its heads (user_llm.json names the fusion)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from pipeline import config as cfg
from pipeline import loop
from pipeline.batches import ExampleBatches
from pipeline.embeddings.store import load_embeddings, read_manifest, version_root
from pipeline.errors import ConfigError, UserError
from pipeline.io import atomic_path, sha256_file
from pipeline.loop import LoopConfig
from pipeline.models import build
from pipeline.models.build import UserModelConfig
from pipeline.models.ranker import Fusion
from pipeline.ranking import ranking_data, training_part, validate_ranker
from pipeline.runtime import device_of, distributed_state


@dataclass(frozen=True)
class TrainRankerConfig:
    data: Path
    """Canonical tables (from `data prepare`, with ratings), e.g. artifacts/ml-1m/data."""
    run: Path
    """A run folder with embeddings/ (stage one's), e.g. artifacts/ml-1m; ranker-<fusion>/ is written into it."""
    fusion: Fusion = "early"
    """early: the candidate is the User LLM's last input; late: a candidate-free user embedding meets the
    candidate in a head; none: the generative score of the candidate (the baseline)."""
    items: Literal["cached", "id", "cached+id"] = "cached"
    """What the model reads for an item, as in stage two: cached embeddings, a trainable ID table, or both."""
    embeddings: str | None = None
    """Embeddings version under run/embeddings/; null: the one in run/embeddings/CURRENT."""
    labels: str = "rating"
    """Where labels come from. rating: each interaction's rating (label_threshold); sampled: every interaction is
    a positive with negative_ratio sampled negatives (items the user never touched) beside it, for data without
    ratings; or the path of a labelled file (CSV/Parquet with user_id, item_id, timestamp, label 0/1), whose
    candidates need not be interactions (e.g. impressions; unusable rows go to ranker-<fusion>/rejected.parquet
    with their reason). With a file or sampled negatives each example is scored with its candidate appended to
    the user's interactions before it."""
    label_threshold: float = 4.0
    """labels=rating: an interaction's label is 1 when its rating is at least this (MovieLens: 4 of 5), else 0."""
    negative_ratio: int = 1
    """labels=sampled: negatives per positive."""
    holdout: int = 1
    """Each user's last `holdout` interactions are test examples, the `holdout` before them validation ones. 1:
    the leave-one-out split; more gives users several test examples, as a per-user AUC (GAUC) needs."""
    generative_weight: float = 0.0
    """λ of loss = BCE + λ x the next-item loss (stage two's, over the same positions); 0 turns it off."""
    user: UserModelConfig = UserModelConfig(init="scratch", name="llama-tiny")
    """The User LLM and its extra inputs (trained from scratch, or stage one's with init=stage-one)."""
    train: LoopConfig = LoopConfig(epochs=20, batch_size=64, max_len=50, loss="softmax", lr=1e-3, patience=3,
                                   eval_users=1000, early_stopping_metric="auc", checkpoint_every=500,
                                   log_every=20)
    """The training loop; the best epoch by validation AUC (or gauc)."""
    seed: int = 42
    """Seed of every random choice."""
    device: str = "auto"
    """auto (cuda when available), cpu or cuda."""
    resume: bool = True
    """Continue from ranker-<fusion>/train/state.pt when it exists and was made with the same settings."""

    def __post_init__(self) -> None:
        if not 1 <= self.holdout <= self.train.max_len:
            raise ConfigError(f"holdout={self.holdout}: must be >= 1 (1 is the leave-one-out split) and at most "
                              f"train.max_len={self.train.max_len} (a user's held-out examples are read in one pass)")
        if self.generative_weight < 0:
            raise ConfigError(f"generative_weight={self.generative_weight}: must be >= 0 (0 turns it off)")
        if self.negative_ratio < 1:
            raise ConfigError(f"negative_ratio={self.negative_ratio}: must be >= 1")
        if self.labels not in ("rating", "sampled") and not Path(self.labels).is_file():
            raise ConfigError(f"labels={self.labels}: use rating, sampled, or the path of a labelled file "
                              "(user_id, item_id, timestamp, label); no such file")
        if self.labels != "rating" and self.generative_weight > 0:
            raise ConfigError(f"generative_weight={self.generative_weight} needs labels=rating, where every example "
                              "is an interaction of the sequence; set generative_weight=0 with labels="
                              f"{self.labels}")
        if self.train.early_stopping_metric not in loop.RANKING_METRICS:
            raise ConfigError(f"train.early_stopping_metric={self.train.early_stopping_metric}: a ranker picks its "
                              f"best epoch by {' or '.join(loop.RANKING_METRICS)}")

    @property
    def out(self) -> Path:
        return self.run / f"ranker-{self.fusion}"


def run(config: TrainRankerConfig, log=print) -> Path:
    """Train the ranker; returns the folder of the best model (ranker-<fusion>/model)."""
    data = ranking_data(config.data, config.labels, config.holdout, config.label_threshold, config.negative_ratio,
                        config.seed, log=log)
    seqs = data.seqs
    table, root = None, None
    if "cached" in config.items:
        root = version_root(config.run, config.embeddings)
        table = load_embeddings(root).embeddings
        if table.shape[0] != seqs.num_items + 1:
            raise UserError(f"{root}: holds {table.shape[0] - 1} items but {config.data} has {seqs.num_items}; "
                            "embed this data's catalogue first")
    torch.manual_seed(config.seed)
    device = device_of(config.device)
    user_llm = build.user_llm_from(config.user, config.run / "user_llm_stage1", log=log)
    items = build.item_source(config.items, table, seqs.num_items, user_llm.dim)
    ranker = {"fusion": config.fusion, "generative_weight": config.generative_weight}
    model = build.sequence_model(items, user_llm, config.user, ranker=ranker).to(device)
    build.zero_item_id_rows(model, seqs.new_items)
    identity = {"model": {"user": cfg.to_dict(config.user), "items": config.items, **ranker},
                "labels": {"source": config.labels, "threshold": config.label_threshold, "holdout": config.holdout,
                           "negative_ratio": config.negative_ratio,
                           "file": sha256_file(Path(config.labels)) if Path(config.labels).is_file() else None},
                "embeddings": read_manifest(root)["shards"] if root else None,
                "interactions": sha256_file(config.data / "interactions.parquet")}
    fusion = "no fusion" if config.fusion == "none" else f"{config.fusion} fusion"
    meta = {"source": f"ranker, {fusion}", "model": "hllm" if root else config.user.name,
            "embeddings": str(root) if root else None, "init": config.user.init, "max_len": config.train.max_len,
            "ranker": {**ranker, "holdout": config.holdout, "labels": config.labels,
                       "label_threshold": config.label_threshold, "negative_ratio": config.negative_ratio,
                       "seed": config.seed}}
    train_dir = config.out / "train"
    train_dir.mkdir(parents=True, exist_ok=True)
    if data.rejected is not None:
        with atomic_path(config.out / "rejected.parquet") as tmp:
            data.rejected.write_parquet(tmp)
    labels = data.appended.labels if data.appended is not None else seqs.labels[seqs.labels >= 0]
    log(f"ranker ({config.fusion} fusion): {len(labels):,} labelled examples ({config.labels}), "
        f"{float(labels.mean()):.1%} positive; each user's last {config.holdout} for test, the {config.holdout} "
        "before for validation")
    batches = None
    if data.appended is not None:  # candidates appended to the histories
        batches = ExampleBatches(seqs, data.examples("train"), config.train.max_len, config.train.batch_size,
                                 config.seed)
    model = loop.train(model, training_part(seqs, config.holdout) if batches is None else seqs, config.train,
                       train_dir, identity, seed=config.seed, device_name=config.device, resume=config.resume,
                       save_best=lambda m, folder: build.save_model(m, folder, meta),
                       load_best=build.load_model_weights, name="ranker", log=log,
                       save_config=lambda path: cfg.save(config, path), batches=batches,
                       validation=lambda m: validate_ranker(m, data, config.train.max_len, config.train.eval_users,
                                                            config.seed))
    out = config.out / "model"
    if distributed_state(device).is_main_process:
        build.save_user_llm(model, out, meta)
        cfg.save(config, out / "config.yaml")
        log(f"ranker written to {out}")
    return out
