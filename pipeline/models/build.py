"""Build the Item and User LLMs from a model name, save them, and load them back.

Saved layout of an Item LLM (`item_llm/`): backbone/ (a Hugging Face directory with its tokenizer),
item_head.safetensors (the [ITEM] vector and the projection) and item_llm.json (pooling, positions, sizes).
A User LLM (`user_llm/`) is a Hugging Face directory plus user_llm.json.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from pipeline.errors import UserError
from pipeline.io import atomic_dir
from pipeline.models import presets
from pipeline.models.hllm import ItemLLM, UserLLM, assert_causal, drop_word_embeddings


def _quiet_transformers() -> None:
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


def load_backbone(name: str, init: str, attn_implementation: str, num_layers: int | None = None,
                  log=print) -> tuple[nn.Module, str | dict]:
    """A base model (no vocabulary head) from a preset, directory or hub name; random weights for init=scratch."""
    from transformers import AutoModel

    _quiet_transformers()
    location = presets.resolve(name, log=log)
    config = presets.load_config(location)
    if num_layers is not None:
        config.num_hidden_layers = num_layers
        if getattr(config, "layer_types", None) is not None:
            config.layer_types = config.layer_types[:num_layers]
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
                   log=print) -> UserLLM:
    backbone, _ = load_backbone(name, init, attn_implementation, num_layers, log=log)
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
                   max_text_tokens: int | None = None, log=print) -> tuple[ItemLLM, object]:
    backbone, location = load_backbone(name, init, attn_implementation, log=log)
    tokenizer = load_tokenizer(location, name)
    _drop_unused_heads(backbone)
    limit = getattr(backbone.config, "max_position_embeddings", None)
    slots = 1 if pooling == "item_token" else 0
    if max_text_tokens is not None and limit is not None and max_text_tokens + slots > limit:
        raise UserError(f"model.max_text_tokens={max_text_tokens}: {name} has {limit} positions, so at most "
                        f"{limit - slots} text tokens fit (with the [ITEM] slot); lower model.max_text_tokens")
    return ItemLLM(backbone, pooling=pooling, out_dim=out_dim), tokenizer


def save_item_llm(item_llm: ItemLLM, tokenizer, path: Path, meta: dict) -> None:
    """Write the Item LLM folder atomically (replacing an older one only when complete)."""
    with atomic_dir(path) as out:
        item_llm.backbone.save_pretrained(out / "backbone")
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

    _quiet_transformers()
    meta_path = path / "item_llm.json"
    if not meta_path.is_file():
        raise UserError(f"{path}: not an Item LLM folder (no item_llm.json); run `make embed-items` first")
    meta = json.loads(meta_path.read_text())
    backbone = AutoModel.from_pretrained(path / "backbone", attn_implementation=attn_implementation,
                                         dtype=torch.float32)
    _drop_unused_heads(backbone)
    item_llm = ItemLLM(backbone, pooling=meta["pooling"], out_dim=meta["dim"])
    head = load_file(str(path / "item_head.safetensors"))
    with torch.no_grad():
        if item_llm.item_token is not None:
            item_llm.item_token.copy_(head["item_token"])
        if item_llm.proj is not None:
            item_llm.proj.weight.copy_(head["proj.weight"])
            item_llm.proj.bias.copy_(head["proj.bias"])
    return item_llm, AutoTokenizer.from_pretrained(path / "backbone"), meta


def save_user_llm(user_llm: UserLLM, path: Path, meta: dict) -> None:
    with atomic_dir(path) as out:
        user_llm.backbone.save_pretrained(out)
        (out / "user_llm.json").write_text(json.dumps(meta, indent=2))


def save_user_head(model: nn.Module, path: Path, meta: dict) -> None:
    """Stage two's User LLM (a CachedUserModel) as a Hugging Face directory plus its extra inputs
    (user_head.safetensors: time/ID embeddings, adapter, logit scale) and user_llm.json, atomically."""
    with atomic_dir(path) as out:
        model.user_llm.backbone.save_pretrained(out)
        extras = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()
                  if not k.startswith("user_llm.")}
        save_file(extras, str(out / "user_head.safetensors"))
        (out / "user_llm.json").write_text(json.dumps(meta, indent=2))


def load_user_head(model: nn.Module, path: Path) -> None:
    """Load the extra inputs saved by save_user_head into a CachedUserModel (its User LLM is loaded apart)."""
    model.load_state_dict(load_file(str(path / "user_head.safetensors")), strict=False)


def load_user_llm(path: Path, attn_implementation: str = "sdpa") -> UserLLM:
    from transformers import AutoModel

    _quiet_transformers()
    if not (path / "config.json").is_file():
        raise UserError(f"{path}: not a User LLM folder (no config.json)")
    backbone = AutoModel.from_pretrained(path, attn_implementation=attn_implementation, dtype=torch.float32)
    backbone.config.use_cache = False
    return UserLLM(backbone)
