"""Read, write and validate CLADA artifacts (safetensors; no pickle, no code execution on load).

Tensors (L = decoder layers, D = hidden size, I = intermediate size):
- ``tau_base_in``  (L,) float32: base threshold on input-channel scores |x_i| * channel_weight_in[l, i].
- ``tau_base_mid`` (L,) float32: base threshold on intermediate scores |h_j| * channel_weight_mid[l, j].
- ``channel_weight_in``  (L, D) float32, ``channel_weight_mid`` (L, I) float32: per-channel score weights
  (format 1 named them ``channel_scale_in`` / ``channel_scale_mid``).
- ``lam``, ``gam``, ``tau_s``, ``tau_H``: 0-dim float32 adaptation parameters.
- ``fingerprint`` (L, P) float64: Frobenius norms of each layer's P MLP projection weights.
- (format 4, optional) ``center_in`` (L, D), ``center_mid`` (L, I) float32: compensation. Where present, scores are
  |x - center| * channel_weight and a skipped channel counts as ``center`` instead of 0 (a row of zeros: none).
- (format 5, optional, all four or none) attention projections: ``tau_base_attn_in`` (L,) and
  ``channel_weight_attn_in`` (L, D) on the attention input (the columns of q/k/v), ``tau_base_attn_out`` (L,) and
  ``channel_weight_attn_out`` (L, A) on the attention output (the columns of o; A = heads x head size), float32.
- (format 6, optional, both or none) prefix-driven sparsity: ``prefix_in`` and ``prefix_mid`` (L,) float32 exponents
  alpha >= 0. While decoding, a sequence's scores on an MLP side are multiplied by its prompt prior ``p ** alpha``
  (normalised to mean 1 over the channels), where ``p`` is the column norm of the dense prefill's row-normalised
  activations (GRIFFIN's statistic); alpha = 0: the base rule.
Metadata: ``format``, ``format_version`` and JSON strings ``model``, ``recipe``, ``data``, ``figures``, ``signals``,
(format 2) ``rule``: the sparsity rule, ``{"name": ..., <its parameters>}`` (format 1: the threshold rule), and
(format 3) ``sha256``: ``{tensor name: hex sha256 of its bytes in the data section}``, checked on load.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from .atomic import write_atomic

FORMAT_NAME = "clada"
FORMAT_VERSION = 6
DIGEST_KEY = "sha256"  # metadata key (format 3): {tensor name: hex sha256 of the tensor's bytes in the file}
SCALAR_KEYS = ("lam", "gam", "tau_s", "tau_H")
JSON_METADATA_KEYS = ("model", "recipe", "data", "figures", "signals", "rule")
TENSOR_KEYS = ("tau_base_in", "tau_base_mid", "channel_weight_in", "channel_weight_mid", "fingerprint") + SCALAR_KEYS
CENTER_KEYS = ("center_in", "center_mid")  # optional (format 4): compensation of skipped channels
ATTENTION_KEYS = ("tau_base_attn_in", "tau_base_attn_out", "channel_weight_attn_in", "channel_weight_attn_out")  # format 5
PREFIX_KEYS = ("prefix_in", "prefix_mid")  # optional (format 6): per-layer exponents of the prompt prior
FORMAT1_TENSOR_NAMES = {"channel_scale_in": "channel_weight_in", "channel_scale_mid": "channel_weight_mid"}
DEFAULT_RULE = {"name": "threshold"}
NEGATIVE_MID_RULES = ("predictor", "mixed")  # rules whose tau_base_mid < 0 has a meaning (the layer skips nothing)


class ArtifactError(ValueError):
    """An artifact file is missing, corrupt, of an unknown version, or does not fit the model."""


@dataclass
class Artifact:
    """In-memory artifact. Thresholds are compared against scores in the units described in the module doc."""

    tau_base_in: torch.Tensor
    tau_base_mid: torch.Tensor
    channel_weight_in: torch.Tensor
    channel_weight_mid: torch.Tensor
    fingerprint: torch.Tensor
    lam: float = 0.0
    gam: float = 0.0
    tau_s: float = 1.0
    tau_H: float = 1.0
    model: dict[str, Any] = field(default_factory=dict)
    recipe: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    figures: dict[str, Any] = field(default_factory=dict)
    signals: dict[str, Any] = field(default_factory=dict)
    rule: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_RULE))  # the sparsity rule and its parameters
    center_in: torch.Tensor | None = None  # (L, D) float32: value a skipped input channel stands for (None: 0)
    center_mid: torch.Tensor | None = None  # (L, I) float32: the same for intermediate neurons
    tau_base_attn_in: torch.Tensor | None = None  # (L,) float32: attention input thresholds (None: attention dense)
    tau_base_attn_out: torch.Tensor | None = None  # (L,) float32: attention output thresholds
    channel_weight_attn_in: torch.Tensor | None = None  # (L, D) float32: score weights of the attention input
    channel_weight_attn_out: torch.Tensor | None = None  # (L, A) float32: score weights of the attention output
    prefix_in: torch.Tensor | None = None  # (L,) float32: exponent of the prompt prior on the input side (None: 0)
    prefix_mid: torch.Tensor | None = None  # (L,) float32: the same on the intermediate side
    source: str = field(default="artifact", compare=False)  # where it was loaded from, for error messages

    @property
    def num_layers(self) -> int:
        return int(self.tau_base_in.shape[0])

    @property
    def has_attention(self) -> bool:
        """Whether the artifact sparsifies the attention projections too (format 5 tensors present)."""
        return self.tau_base_attn_in is not None

    @property
    def has_prefix(self) -> bool:
        """Whether decode-step scores follow each sequence's prompt prior (format 6 exponents, one of them > 0)."""
        return self.prefix_in is not None and bool((self.prefix_in > 0).any() or (self.prefix_mid > 0).any())

    def prefix(self, side: str) -> torch.Tensor | None:
        """(L,) prompt-prior exponents of an MLP side, or None where the artifact has none."""
        return {"in": self.prefix_in, "mid": self.prefix_mid}.get(side)

    def tau_base(self, side: str) -> torch.Tensor | None:
        """(L,) base thresholds of ``side`` (``in``, ``mid``, ``attn_in``, ``attn_out``); None if absent."""
        return getattr(self, f"tau_base_{side}")

    def channel_weight(self, side: str) -> torch.Tensor | None:
        """(L, C) channel score weights of ``side``; None if absent."""
        return getattr(self, f"channel_weight_{side}")

    def center(self, side: str) -> torch.Tensor | None:
        """(L, C) compensation of ``side``, or None where the artifact has none (attention sides never have)."""
        return {"in": self.center_in, "mid": self.center_mid}.get(side)

    def decode_digest(self) -> str:
        """Hex sha256 of what decides a decode step's kept channels: every tensor, the rule, and the adaptation
        scalars that take effect (``tau_s`` only where ``lam`` != 0, ``tau_H`` only where ``gam`` != 0). Two
        artifacts with the same digest decode alike; metadata (model, recipe, data, figures, signals) is left out."""
        h = hashlib.sha256(json.dumps(self.rule, sort_keys=True).encode())
        scalars = (self.lam, self.gam, self.tau_s if self.lam else 0.0, self.tau_H if self.gam else 0.0)
        h.update(json.dumps(scalars).encode())
        for name in TENSOR_KEYS + CENTER_KEYS + ATTENTION_KEYS + PREFIX_KEYS:
            value = getattr(self, name)
            if isinstance(value, torch.Tensor):
                t = value.detach().cpu().contiguous()
                h.update(f"{name}:{t.dtype}:{tuple(t.shape)}:".encode())
                h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        return h.hexdigest()

    def validate(self, source: str = "artifact") -> None:
        """Raise ArtifactError if shapes, dtypes or values are inconsistent."""
        L = self.tau_base_in.shape[0] if self.tau_base_in.dim() == 1 else -1
        expect = {
            "tau_base_in": (torch.float32, (L,)),
            "tau_base_mid": (torch.float32, (L,)),
            "channel_weight_in": (torch.float32, (L, None)),
            "channel_weight_mid": (torch.float32, (L, None)),
            "fingerprint": (torch.float64, (L, None)),
        }
        for name, (dtype, shape) in expect.items():
            _check_tensor(getattr(self, name), name, shape, source, dtype,
                          negative=name == "tau_base_mid" and self.rule.get("name") in NEGATIVE_MID_RULES)
        for name, weights in (("center_in", self.channel_weight_in), ("center_mid", self.channel_weight_mid)):
            t = getattr(self, name)
            if t is None:
                continue
            if t.dtype != torch.float32 or t.shape != weights.shape:
                raise ArtifactError(f"{source}: tensor {name} has shape {tuple(t.shape)} and dtype {t.dtype}, "
                                    f"expected {tuple(weights.shape)} float32")
            if not torch.isfinite(t).all():
                raise ArtifactError(f"{source}: tensor {name} holds NaN or inf values")
        self._validate_attention(L, source)
        present = [name for name in PREFIX_KEYS if getattr(self, name) is not None]
        if present and len(present) < len(PREFIX_KEYS):
            raise ArtifactError(f"{source}: prefix tensors must come together; missing "
                                f"{[n for n in PREFIX_KEYS if n not in present]}")
        for name in present:
            _check_tensor(getattr(self, name), name, (L,), source)
        for name in ("lam", "gam"):
            value = getattr(self, name)
            if not (-1.0 <= value <= 0.0):
                raise ArtifactError(f"{source}: {name}={value} is outside [-1, 0]")
        for name in ("tau_s", "tau_H"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ArtifactError(f"{source}: {name}={value} must be finite and >= 0")
        if not isinstance(self.rule.get("name"), str):
            raise ArtifactError(f"{source}: metadata 'rule' has no rule name")

    def _validate_attention(self, L: int, source: str) -> None:
        """The format-5 attention tensors: all four or none, (L,) thresholds and (L, C) weights."""
        present = [name for name in ATTENTION_KEYS if getattr(self, name) is not None]
        if not present:
            return
        if len(present) < len(ATTENTION_KEYS):
            missing = [name for name in ATTENTION_KEYS if name not in present]
            raise ArtifactError(f"{source}: attention tensors must come together; missing {missing}")
        for name in ATTENTION_KEYS:
            _check_tensor(getattr(self, name), name, (L,) if name.startswith("tau") else (L, None), source)
        if self.channel_weight_attn_in.shape != self.channel_weight_in.shape:  # both read the hidden state
            raise ArtifactError(f"{source}: tensor channel_weight_attn_in has shape "
                                f"{tuple(self.channel_weight_attn_in.shape)}, expected {tuple(self.channel_weight_in.shape)}")


def _check_tensor(t: torch.Tensor, name: str, shape: tuple, source: str, dtype: torch.dtype = torch.float32,
                  negative: bool = False) -> None:
    """ArtifactError unless ``t`` is a finite tensor of ``dtype`` and ``shape`` (None: any size; the first dimension,
    the layers, at least 1), non-negative unless ``negative``."""
    if t.dtype != dtype:
        raise ArtifactError(f"{source}: tensor {name} has dtype {t.dtype}, expected {dtype}")
    if shape[0] < 1 or t.dim() != len(shape) or any(s is not None and t.shape[i] != s for i, s in enumerate(shape)):
        raise ArtifactError(f"{source}: tensor {name} has shape {tuple(t.shape)}, expected {shape}")
    if not torch.isfinite(t).all() or (not negative and (t < 0).any()):
        raise ArtifactError(f"{source}: tensor {name} holds NaN, inf or negative values")


def _scalar(value: float) -> torch.Tensor:
    return torch.tensor(float(value), dtype=torch.float32)


def save_artifact(artifact: Artifact, path: str | os.PathLike) -> Path:
    """Validate and write ``artifact`` atomically (temp file, fsync, rename); return the path."""
    artifact.validate()
    path = Path(path)
    tensors = {name: getattr(artifact, name).contiguous() for name in TENSOR_KEYS if name not in SCALAR_KEYS}
    tensors.update({name: getattr(artifact, name).contiguous() for name in CENTER_KEYS
                    if getattr(artifact, name) is not None})
    tensors.update({name: _scalar(getattr(artifact, name)) for name in SCALAR_KEYS})
    tensors.update({name: getattr(artifact, name).contiguous() for name in ATTENTION_KEYS if artifact.has_attention})
    tensors.update({name: getattr(artifact, name).contiguous() for name in PREFIX_KEYS
                    if getattr(artifact, name) is not None})
    # the oldest format that holds it, so that older readers read what they can (and refuse what they would run
    # differently): 3 plain, 4 compensated, 5 attention, 6 prompt prior
    version = (6 if artifact.prefix_in is not None else 5 if artifact.has_attention
               else 4 if any(name in tensors for name in CENTER_KEYS) else 3)
    metadata = {"format": FORMAT_NAME, "format_version": str(version)}
    metadata.update({key: json.dumps(getattr(artifact, key), sort_keys=True) for key in JSON_METADATA_KEYS})
    header, data = _split(save(tensors), path)  # the digests are those of the bytes as safetensors lays them out
    metadata[DIGEST_KEY] = json.dumps(_digests(header, data), sort_keys=True)
    write_atomic(path, save(tensors, metadata=metadata))
    return path


def _split(blob: bytes, path: Path) -> tuple[dict, bytes]:
    """A safetensors file's parsed JSON header and its data section; ArtifactError instead of a crash."""
    if len(blob) < 8:
        raise ArtifactError(f"{path}: not a safetensors file (too short)")
    size = int.from_bytes(blob[:8], "little")
    if size <= 0 or size > 100_000_000 or size > len(blob) - 8:
        raise ArtifactError(f"{path}: not a safetensors file (bad header length {size})")
    try:
        header = json.loads(blob[8 : 8 + size])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{path}: header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise ArtifactError(f"{path}: header is not a JSON object; not a CLADA artifact")
    return header, blob[8 + size :]


def _digests(header: dict, data: bytes) -> dict[str, str]:
    """{tensor name: hex sha256 of its bytes} of a well-formed header (as safetensors checked it) and data."""
    return {name: hashlib.sha256(data[entry["data_offsets"][0] : entry["data_offsets"][1]]).hexdigest()
            for name, entry in header.items() if name != "__metadata__"}


def _check_digests(meta: dict[str, str], header: dict, data: bytes, path: Path) -> None:
    """ArtifactError unless every tensor's bytes match the sha256 the metadata states for it."""
    try:
        stated = json.loads(meta[DIGEST_KEY])
    except (KeyError, json.JSONDecodeError):
        raise ArtifactError(f"{path}: metadata {DIGEST_KEY!r} is missing or not valid JSON") from None
    actual = _digests(header, data)
    if not isinstance(stated, dict) or set(stated) != set(actual):
        raise ArtifactError(f"{path}: metadata {DIGEST_KEY!r} does not name exactly the file's tensors")
    for name in sorted(actual):
        if stated[name] != actual[name]:
            raise ArtifactError(f"{path}: tensor {name} does not match its sha256 digest (corrupt data)")


def load_artifact(path: str | os.PathLike) -> Artifact:
    """Read and validate an artifact. Raises ArtifactError with a one-line message on any problem."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path}: artifact file not found")
    blob = path.read_bytes()
    header, data = _split(blob, path)
    meta = header.get("__metadata__")
    if not isinstance(meta, dict):
        raise ArtifactError(f"{path}: no metadata; not a CLADA artifact")
    if meta.get("format") != FORMAT_NAME:
        raise ArtifactError(f"{path}: metadata 'format' is {meta.get('format')!r}, expected {FORMAT_NAME!r}")
    try:
        version = int(meta.get("format_version", ""))
    except ValueError:
        raise ArtifactError(f"{path}: metadata 'format_version' is not an integer") from None
    if version > FORMAT_VERSION:
        raise ArtifactError(f"{path}: format_version {version} is newer than this reader ({FORMAT_VERSION}); upgrade clada")
    try:
        tensors = load(blob)
    except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
        raise ArtifactError(f"{path}: corrupt tensor data ({exc})") from None
    if version >= 3:  # formats 1 and 2 carry no digests
        _check_digests(meta, header, data, path)
    if version < 2:
        tensors = {FORMAT1_TENSOR_NAMES.get(k, k): v for k, v in tensors.items()}
    missing = sorted(set(TENSOR_KEYS) - set(tensors))
    optional = ((set(CENTER_KEYS) if version >= 4 else set()) | (set(ATTENTION_KEYS) if version >= 5 else set())
                | (set(PREFIX_KEYS) if version >= 6 else set()))
    extra = sorted(set(tensors) - set(TENSOR_KEYS) - optional)
    if missing or extra:
        raise ArtifactError(f"{path}: tensors missing {missing} / unexpected {extra}")
    fields: dict[str, Any] = {}
    for key in JSON_METADATA_KEYS:
        try:
            value = json.loads(meta.get(key, json.dumps(DEFAULT_RULE) if key == "rule" else "{}"))
        except json.JSONDecodeError:
            raise ArtifactError(f"{path}: metadata {key!r} is not valid JSON") from None
        if not isinstance(value, dict):
            raise ArtifactError(f"{path}: metadata {key!r} must be a JSON object")
        fields[key] = value
    for key in SCALAR_KEYS:
        t = tensors.pop(key)
        if t.dim() != 0 or t.dtype != torch.float32:
            raise ArtifactError(f"{path}: tensor {key} must be a 0-dim float32 scalar")
        fields[key] = float(t)
    artifact = Artifact(**tensors, **fields, source=str(path))
    artifact.validate(str(path))
    return artifact
