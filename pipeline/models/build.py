"""Build the Item and User LLMs from a model name or a settings section, save them, and load them back.

Saved layout of an Item LLM (`item_llm/`): backbone/ (a Hugging Face directory with its tokenizer),
item_head.safetensors (the [ITEM] vector and the projection) and item_llm.json (pooling, positions, sizes).
Every User LLM, whichever stage trained it, is saved one way (`user_llm/`, `user_llm_stage1/`): a Hugging Face
directory of the decoder, user_head.safetensors (the logit scale and the model's other small trained pieces:
time and item-ID embeddings, the adapter of cached embeddings) and user_llm.json (how to rebuild it).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from pipeline.errors import ConfigError, UserError
from pipeline.io import atomic_dir
from pipeline.models import presets
from pipeline.models.item_sources import CachedItems, IdItems, ItemSource, SumItems, TextItems
from pipeline.models.llm import ItemLLM, UserLLM, assert_causal, drop_word_embeddings, lora_merged_state, merge_lora
from pipeline.models.ranker import RankingModel
from pipeline.models.sequence_model import TIME_FIELDS, SequenceModel
from pipeline.run_dir import RunDir


@dataclass(frozen=True)
class UserModelConfig:
    init: Literal["stage-one", "pretrained", "scratch"] = "scratch"
    """stage-one (stage two only): the User LLM trained with the Item LLM (run/user_llm_stage1); pretrained:
    `name`'s weights; scratch: `name`'s architecture with random weights."""
    name: str = "llama-small"
    """For init=pretrained|scratch: a decoder preset (llama-tiny, llama-small, smollm2-135m), directory or hub
    name. Its hidden size must equal the item embedding size."""
    layers: int | None = None
    """With init=scratch: keep only this many decoder layers of the architecture."""
    hidden_size: int | None = None
    """With init=scratch: the width of the architecture (e.g. 50 for the generative-recommenders SASRec);
    null: the preset's."""
    heads: int | None = None
    """With init=scratch: attention heads (must divide hidden_size); null: the preset's."""
    dropout: float | None = None
    """With init=scratch: dropout on the inputs, attention and residual paths (SASRec recipes use 0.2);
    null: the preset's."""
    projection: bool = False
    """A learned linear map from the item embeddings to the User LLM's width and back, so a small User LLM can
    read wide item embeddings (e.g. a 64-wide model over 384-d MiniLM vectors)."""
    attn_implementation: str = "sdpa"
    """Attention kernel: sdpa, eager, or flash_attention_2 where installed."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (long sequences on a small GPU)."""
    time_embedding: bool = False
    """Add the paper's timestamp embedding (Algorithm 1) to each position's input."""
    time_precision: Literal["year", "month", "day", "hour", "minute", "second"] = "second"
    """Finest calendar field the time embedding sees."""
    item_id_embedding: bool = False
    """Add a learned item-ID embedding to each position's input (slightly negative in the paper)."""
    scale_inputs: bool = False
    """Multiply the item embeddings by sqrt(width) before the User LLM adds its positions (SASRec and the
    Transformer do, so that an ID table initialised small is not drowned by the position embeddings)."""
    temperature: float | None = None
    """A fixed softmax temperature for the cosine scores (the generative-recommenders recipes use 0.05);
    null: a learned one, starting at 0.07."""

    def __post_init__(self) -> None:
        for name in ("layers", "hidden_size", "heads"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"user.{name}={getattr(self, name)}: must be >= 1, or null")
        if self.temperature is not None and not 0.01 <= self.temperature <= 1:
            raise ConfigError(f"user.temperature={self.temperature}: must be in [0.01, 1] (0.05 is usual), or null "
                              "for a learned one")
        if self.dropout is not None and not 0 <= self.dropout < 1:
            raise ConfigError(f"user.dropout={self.dropout}: must be in [0, 1), or null")
        if self.init != "scratch" and (self.hidden_size, self.heads, self.dropout) != (None, None, None):
            raise ConfigError(f"user.hidden_size, user.heads and user.dropout shape a model built from scratch; "
                              f"with user.init={self.init} the weights fix them: leave them null")


def _prepare_transformers() -> None:
    """Quiet transformers' logging and register this project's own architectures (HSTU) with its Auto classes."""
    from transformers.utils import logging

    from pipeline.models import hstu  # noqa: F401  (registers model_type "hstu")

    logging.set_verbosity_error()
    logging.disable_progress_bar()


DROPOUT_FIELDS = ("embd_pdrop", "resid_pdrop", "attn_pdrop", "attention_dropout", "hidden_dropout_prob",
                  "attention_probs_dropout_prob", "hidden_dropout", "dropout")
"""The names transformers configs give their dropout rates (GPT-2, Llama, BERT, ...)."""


def load_backbone(name: str, init: str, attn_implementation: str, num_layers: int | None = None,
                  log=print, hidden_size: int | None = None, heads: int | None = None,
                  dropout: float | None = None) -> tuple[nn.Module, str | dict]:
    """A base model (no vocabulary head) from a preset, directory or hub name; random weights for init=scratch
    (optionally reshaped: layers, width, heads, dropout)."""
    from transformers import AutoModel

    _prepare_transformers()
    location = presets.resolve(name, log=log)
    config = presets.load_config(location)
    if num_layers is not None:
        config.num_hidden_layers = num_layers
        if getattr(config, "layer_types", None) is not None:
            config.layer_types = config.layer_types[:num_layers]
    if hidden_size is not None or heads is not None:
        width = hidden_size or config.hidden_size
        n_heads = heads or config.num_attention_heads
        if width % n_heads:
            raise ConfigError(f"user.hidden_size={width} is not a multiple of the {n_heads} attention heads; "
                              "set user.heads to a divisor of it")
        config.hidden_size, config.num_attention_heads = width, n_heads
        if hasattr(config, "num_key_value_heads"):
            config.num_key_value_heads = n_heads
        if hasattr(config, "head_dim"):
            config.head_dim = width // n_heads
    if dropout is not None:
        for field in DROPOUT_FIELDS:
            if isinstance(getattr(config, field, None), float):
                setattr(config, field, dropout)
    if isinstance(location, dict) or init == "scratch":
        return AutoModel.from_config(config, attn_implementation=attn_implementation), location
    if num_layers is not None:
        raise UserError(f"{name}: num_layers only applies to init=scratch (pretrained weights keep every layer)")
    try:
        model = AutoModel.from_pretrained(location, config=config, attn_implementation=attn_implementation,
                                          dtype=torch.float32)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot load model weights from '{location}': {first}") from None
    return model, location


def load_tokenizer(location: str | dict, name: str):
    from transformers import AutoTokenizer

    if isinstance(location, dict):
        raise UserError(f"'{name}' is a config-only preset without a tokenizer; the Item LLM needs a model "
                        "directory or hub name with one (e.g. minilm-l6 or smollm2-135m)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(location)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot load a tokenizer from '{location}': {first}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


def build_user_llm(name: str, init: str, attn_implementation: str = "sdpa", num_layers: int | None = None,
                   log=print, hidden_size: int | None = None, heads: int | None = None,
                   dropout: float | None = None) -> UserLLM:
    backbone, _ = load_backbone(name, init, attn_implementation, num_layers, log=log, hidden_size=hidden_size,
                                heads=heads, dropout=dropout)
    backbone.config.use_cache = False
    drop_word_embeddings(backbone)
    assert_causal(backbone, f"user model '{name}'")
    return UserLLM(backbone)


def _drop_unused_heads(backbone: nn.Module) -> None:
    """Encoders such as BERT carry a pooler the item embedding never uses (DDP insists every weight is used)."""
    if getattr(backbone, "pooler", None) is not None:
        backbone.pooler = None
    if hasattr(backbone.config, "use_cache"):
        backbone.config.use_cache = False


def build_item_llm(name: str, init: str, pooling: str, out_dim: int | None, attn_implementation: str = "sdpa",
                   max_text_tokens: int | None = None, log=print, train_layers: int | None = None
                   ) -> tuple[ItemLLM, object]:
    backbone, location = load_backbone(name, init, attn_implementation, log=log)
    tokenizer = load_tokenizer(location, name)
    _drop_unused_heads(backbone)
    limit = getattr(backbone.config, "max_position_embeddings", None)
    slots = 1 if pooling == "item_token" else 0
    if max_text_tokens is not None and limit is not None and max_text_tokens + slots > limit:
        raise UserError(f"item.max_text_tokens={max_text_tokens}: {name} has {limit} positions, so at most "
                        f"{limit - slots} text tokens fit (with the [ITEM] slot); lower item.max_text_tokens")
    return ItemLLM(backbone, pooling=pooling, out_dim=out_dim, train_layers=train_layers), tokenizer


def save_item_llm(item_llm: ItemLLM, tokenizer, path: Path, meta: dict) -> None:
    """Write the Item LLM folder atomically (replacing an older one only when complete)."""
    with atomic_dir(path) as out:
        # with LoRA adapters, the weights they give (so every reader loads a plain model)
        item_llm.backbone.save_pretrained(out / "backbone", state_dict=lora_merged_state(item_llm.backbone))
        tokenizer.save_pretrained(out / "backbone")
        head = {}
        if item_llm.item_token is not None:
            head["item_token"] = item_llm.item_token.detach().cpu().contiguous()
        if item_llm.proj is not None:
            head["proj.weight"] = item_llm.proj.weight.detach().cpu().contiguous()
            head["proj.bias"] = item_llm.proj.bias.detach().cpu().contiguous()
        save_file(head, str(out / "item_head.safetensors"))
        (out / "item_llm.json").write_text(json.dumps({"pooling": item_llm.pooling, "dim": item_llm.dim, **meta},
                                                      indent=2))


def load_item_llm(path: Path, attn_implementation: str = "sdpa") -> tuple[ItemLLM, object, dict]:
    from transformers import AutoModel, AutoTokenizer

    _prepare_transformers()
    meta_path = path / "item_llm.json"
    if not meta_path.is_file():
        raise UserError(f"{path}: not an Item LLM folder (no item_llm.json); run `make embed-items` first")
    meta = json.loads(meta_path.read_text())
    backbone = AutoModel.from_pretrained(path / "backbone", attn_implementation=attn_implementation,
                                         dtype=torch.float32)
    _drop_unused_heads(backbone)
    # partial depth: the [ITEM] vector enters at the first trained layer, so the split is part of the model
    item_llm = ItemLLM(backbone, pooling=meta["pooling"], out_dim=meta["dim"], train_layers=meta.get("train_layers"))
    head = load_file(str(path / "item_head.safetensors"))
    with torch.no_grad():
        if item_llm.item_token is not None:
            item_llm.item_token.copy_(head["item_token"])
        if item_llm.proj is not None:
            item_llm.proj.weight.copy_(head["proj.weight"])
            item_llm.proj.bias.copy_(head["proj.bias"])
    return item_llm, AutoTokenizer.from_pretrained(path / "backbone"), meta


def user_llm_from(config: UserModelConfig, stage_one: Path | None = None, log=print) -> UserLLM:
    """The User LLM a settings section asks for (init=stage-one reads `stage_one`, a saved User LLM folder)."""
    if config.init != "stage-one":
        return build_user_llm(config.name, config.init, config.attn_implementation, config.layers, log=log,
                              hidden_size=config.hidden_size, heads=config.heads, dropout=config.dropout)
    if stage_one is None or not (stage_one / "user_llm.json").is_file():
        raise UserError(f"{stage_one}: no stage-one User LLM; run stage one or set user.init=scratch|pretrained")
    # its weights were trained on inputs scaled and projected as stage one was set: other settings would feed them
    # inputs of another size or skip a map they rely on
    saved = json.loads((stage_one / "user_llm.json").read_text())
    for key in ("scale_inputs", "projection"):
        if key in saved and saved[key] != getattr(config, key):
            raise ConfigError(f"{stage_one}: stage one trained its User LLM with user.{key}="
                              f"{str(saved[key]).lower()}; set user.{key}={str(saved[key]).lower()} to train it "
                              "further (user.init=stage-one)")
    return load_user_llm(stage_one, config.attn_implementation)


def sequence_model(items: ItemSource, user_llm: UserLLM, config: UserModelConfig, ranker: dict | None = None
                   ) -> SequenceModel:
    """The sequence model the settings describe; with `ranker` ({"fusion": ..., "generative_weight": ...}) the
    ranking model of pipeline.models.ranker."""
    if user_llm.dim != items.dim and not config.projection:
        raise UserError(f"the User LLM's hidden size is {user_llm.dim} but the {items.kind} embeddings have "
                        f"{items.dim} dimensions; choose a User LLM of that width (or user.init=stage-one), or set "
                        "user.projection=true")
    model = (RankingModel if ranker else SequenceModel)(
        items, user_llm, config.time_embedding, config.item_id_embedding, config.time_precision,
        projection=config.projection, scale_inputs=config.scale_inputs, temperature=config.temperature,
        **(ranker or {}))
    if config.gradient_checkpointing:
        if not user_llm.backbone.supports_gradient_checkpointing:
            raise ConfigError(f"user.gradient_checkpointing=true: {type(user_llm.backbone).__name__} does not "
                              "support it; set user.gradient_checkpointing=false")
        user_llm.backbone.gradient_checkpointing_enable()
    return model


ITEM_SOURCES = ("cached", "id", "cached+id")
"""What a stage-two model reads for an item: the cached embeddings, a trainable item-ID table, or their sum."""


def item_source(kind: str, table: torch.Tensor | None, num_items: int, id_dim: int, adapter: bool = False,
                id_scale: float | None = None, id_width: int | None = None, id_dropout: float = 0.0,
                id_max_norm: float | None = None) -> ItemSource:
    """The item source `kind` names (one of ITEM_SOURCES); an ID-only table is `id_dim` wide, an ID table
    summed with the cached one as wide as it (through a learned map from `id_width` numbers per item, where given),
    and scaled to start at the cached vectors' per-dimension spread (`id_scale`: that factor; None computes it,
    for a new model). `id_dropout`, `id_max_norm`: IdItems' item-ID dropout and bound on an item's ID vector."""
    if kind not in ITEM_SOURCES:
        raise ConfigError(f"items={kind}: use one of {', '.join(ITEM_SOURCES)}")
    if kind == "id":
        return IdItems(num_items, id_dim, dropout=id_dropout, max_norm=id_max_norm)
    if table is None:
        raise UserError(f"items={kind} reads cached item embeddings, and none were given")
    cached = CachedItems(table, adapter)
    if kind == "cached":
        return cached
    if id_scale is None:
        id_scale = float(table[1:].float().std()) / 0.02
    return SumItems(cached, IdItems(num_items, cached.dim, id_scale, id_width, id_dropout, id_max_norm))


def source_name(items: ItemSource) -> str:
    """The name of a model's item source as user_llm.json records it: text, cached, id, or a sum like cached+id."""
    if isinstance(items, SumItems):
        return "+".join(source_name(s) for s in items.sources)
    return {TextItems: "text", CachedItems: "cached", IdItems: "id"}[type(items)]


def text_source(model: SequenceModel) -> TextItems | None:
    """The model's Item LLM source, if it reads item text."""
    return next((m for m in model.items.modules() if isinstance(m, TextItems)), None)


def head_state(model: SequenceModel) -> dict[str, torch.Tensor]:
    """The weights of a User LLM's head: every weight of the model but the decoder's and the Item LLM's."""
    return {k: v for k, v in model.state_dict().items()
            if not k.startswith("user_llm.") and ".item_llm." not in f".{k}"}


def save_user_llm(model: SequenceModel, path: Path, meta: dict) -> None:
    """The User LLM as a Hugging Face directory + user_head.safetensors + user_llm.json, atomically. The head
    holds every weight of the model but the decoder's and the Item LLM's (saved on its own as item_llm/)."""
    with atomic_dir(path) as out:
        model.user_llm.backbone.save_pretrained(out)
        head = {k: v.detach().cpu().contiguous() for k, v in head_state(model).items()}
        save_file(head, str(out / "user_head.safetensors"))
        described = {"time_embedding": model.time is not None, "time_precision": model.time_precision,
                     "time_fields": TIME_FIELDS, "item_id_embedding": model.item_ids is not None,
                     "adapter": any(getattr(m, "adapter", None) is not None for m in model.items.modules()),
                     "items": source_name(model.items), "num_items": model.items.num_items,
                     "projection": model.project_in is not None, "scale_inputs": model.input_scale != 1.0,
                     "id_scale": next((m.scale for m in model.items.modules() if isinstance(m, IdItems)), None),
                     "id_width": next((m.width for m in model.items.modules() if isinstance(m, IdItems)), None),
                     "id_dropout": next((m.dropout for m in model.items.modules() if isinstance(m, IdItems)), 0.0),
                     "id_max_norm": next((m.max_norm for m in model.items.modules() if isinstance(m, IdItems)), None),
                     "logit_scale": model.logit_scale.item()}
        (out / "user_llm.json").write_text(json.dumps({**meta, **described}, indent=2))


def _item_id_tables(model: SequenceModel) -> set[str]:
    """Names of the item-ID tables: the only head weights whose row count follows the catalogue."""
    names = {f"{name}.embedding.weight" for name, m in model.named_modules() if isinstance(m, IdItems)}
    return names | ({"item_ids.weight"} if model.item_ids is not None else set())


def zero_item_id_rows(model: SequenceModel, item_idx) -> None:
    """Set the rows of `item_idx` to zero in every item-ID table: items held out of training stay unknown (a row
    that gets no gradient keeps its value, and AdamW's decay keeps a zero at zero), so an ID model never
    recommends them and a text + ID model scores them by their text alone."""
    own = model.state_dict()
    index = torch.as_tensor(item_idx, dtype=torch.long)
    with torch.no_grad():
        for key in _item_id_tables(model):
            own[key][index] = 0


def load_user_head(model: SequenceModel, path: Path, partial: bool = False) -> None:
    """Load a saved User LLM's head into `model`. Every head weight of `model` must be in the file with its shape,
    except an item-ID table of a catalogue that `refresh items` grew or shrank since training (the rows learned for
    the items this catalogue has, zeros for items added since: they are known by their text alone). With
    `partial` (stage two starting from stage one's model) the weights the file lacks keep their initial values and
    the file's weights the model has no place for are left out. A folder of an older version without a head file
    has only the logit scale, in user_llm.json."""
    file = path / "user_head.safetensors"
    if not file.is_file():
        if not model.logit_scale.requires_grad:
            return
        with torch.no_grad():
            model.logit_scale.fill_(json.loads((path / "user_llm.json").read_text())["logit_scale"])
        return
    head = load_file(str(file))
    head = {("items." + k if k.startswith("adapter.") else k): v for k, v in head.items()}  # older name
    own = head_state(model)
    if not model.logit_scale.requires_grad:  # a fixed temperature (user.temperature) stays as set
        head.pop("logit_scale", None)
        own.pop("logit_scale")
    if not partial:
        missing, unexpected = sorted(own.keys() - head.keys()), sorted(head.keys() - own.keys())
        if missing or unexpected:
            what = f"lacks {missing[0]}" if missing else f"holds {unexpected[0]}, which this model has no place for"
            raise UserError(f"{file}: {what}; it was saved by a User LLM of other settings than its user_llm.json "
                            "describes (re-train it, or evaluate the folder it came from)")
    id_tables = _item_id_tables(model)
    for key in sorted(head.keys() & own.keys()):
        saved, wanted = head[key], own[key]
        if saved.shape == wanted.shape:
            continue
        if key in id_tables and saved.shape[1:] == wanted.shape[1:]:
            fitted = torch.zeros_like(wanted)
            rows = min(wanted.shape[0], saved.shape[0])
            fitted[:rows] = saved[:rows]
            head[key] = fitted
            continue
        raise UserError(f"{file}: {key} has shape {tuple(saved.shape)} but this model's is {tuple(wanted.shape)}; "
                        "the head was saved by a User LLM of other settings (re-train it with these settings)")
    model.load_state_dict({k: v for k, v in head.items() if k in own}, strict=False)


def load_user_llm(path: Path, attn_implementation: str = "sdpa") -> UserLLM:
    from transformers import AutoModel

    _prepare_transformers()
    if not (path / "config.json").is_file():
        raise UserError(f"{path}: not a User LLM folder (no config.json)")
    backbone = AutoModel.from_pretrained(path, attn_implementation=attn_implementation, dtype=torch.float32)
    backbone.config.use_cache = False
    return UserLLM(backbone)


def saved_item_source(path: Path) -> str:
    """What a saved User LLM reads for an item (ITEM_SOURCES); one trained with the Item LLM reads the cached
    embeddings that Item LLM wrote."""
    kind = json.loads((path / "user_llm.json").read_text()).get("items", "cached")
    return "cached" if kind == "text" else kind


def load_user_model(path: Path, table: torch.Tensor | None) -> tuple[SequenceModel, dict]:
    """A saved User LLM (of either stage) over its item source, ready to score users; and its metadata. `table`:
    the cached embeddings, for a model that reads them (saved_item_source)."""
    meta = json.loads((path / "user_llm.json").read_text())
    user_llm = load_user_llm(path)
    kind = saved_item_source(path)
    projection = meta.get("projection", False)
    if table is not None and user_llm.dim != table.shape[1] and not projection:
        raise UserError(f"{path}: the User LLM is {user_llm.dim} wide but the embeddings have {table.shape[1]} "
                        "dimensions; evaluate it with the embeddings it was trained on (embeddings=<version>)")
    num_items = table.shape[0] - 1 if table is not None else int(meta["num_items"])
    items = item_source(kind, table, num_items, user_llm.dim, meta.get("adapter", False),
                        meta.get("id_scale") or 1.0, meta.get("id_width"),  # older folders: unscaled IDs
                        meta.get("id_dropout", 0.0), meta.get("id_max_norm"))
    ranker = {key: meta["ranker"][key] for key in ("fusion", "generative_weight")} if "ranker" in meta else {}
    model = (RankingModel if ranker else SequenceModel)(
        items, user_llm, meta.get("time_embedding", False), meta.get("item_id_embedding", False),
        meta.get("time_precision", "second"), projection=projection, scale_inputs=meta.get("scale_inputs", False),
        **ranker)
    load_user_head(model, path)
    return model.eval(), meta


def save_model(model: SequenceModel, folder: Path, meta: dict | None = None) -> None:
    """The trained weights under `folder`: user_llm/ and, for a model that reads text, item_llm/."""
    text = text_source(model)
    if text is not None:
        save_item_llm(text.item_llm, text.tokenizer, RunDir(folder).item_llm, text.meta)
    save_user_llm(model, RunDir(folder).user_llm, meta or {})


def load_model_weights(model: SequenceModel, folder: Path) -> None:
    """Load what save_model wrote into `model`."""
    text = text_source(model)
    if text is not None:
        merge_lora(text.item_llm)  # what was saved is the plain model the adapters give
        text.item_llm.load_state_dict(load_item_llm(RunDir(folder).item_llm)[0].state_dict())
    model.user_llm.load_state_dict(load_user_llm(RunDir(folder).user_llm).state_dict())
    load_user_head(model, RunDir(folder).user_llm)
