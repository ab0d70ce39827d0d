"""Artifacts beside checkpoints: declare one in a checkpoint folder's config.json, find it, load both."""

from __future__ import annotations

import json
import os
from pathlib import Path

from torch import nn

from ..artifacts import FORMAT_VERSION, ArtifactError, load_artifact, write_atomic

ARTIFACT_FILENAME = "clada.safetensors"


def find_declared_artifact(model: nn.Module) -> Path:
    """The artifact stored beside the model's checkpoint (config ``clada.file`` or clada.safetensors)."""
    folder = getattr(model.config, "_name_or_path", "") or getattr(model, "name_or_path", "")
    declared = getattr(model.config, "clada", None)
    name = declared.get("file", ARTIFACT_FILENAME) if isinstance(declared, dict) else ARTIFACT_FILENAME
    path = Path(folder) / name
    if not folder or not path.is_file():
        raise ArtifactError(f"no artifact path given and none found beside the checkpoint ({path})")
    return path


def declare_in_checkpoint(artifact_path: str | os.PathLike, checkpoint: str | os.PathLike) -> Path:
    """Copy an artifact into a checkpoint folder and declare it in that folder's config.json.

    The declaration is a small ``"clada": {"file": ..., "format_version": ...}`` entry, the way quantisation
    configs travel; both files are written atomically. Returns the artifact's new path.
    """
    artifact = load_artifact(artifact_path)  # refuse to ship a corrupt file
    folder = Path(checkpoint)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ArtifactError(f"{folder}: not a checkpoint folder (no config.json)")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError:
        raise ArtifactError(f"{config_path}: not valid JSON") from None
    model_type = config.get("model_type")
    if artifact.model.get("model_type") not in (None, model_type):
        raise ArtifactError(f"{artifact_path}: calibrated for model_type {artifact.model.get('model_type')!r}, "
                            f"checkpoint is {model_type!r}")
    target = folder / ARTIFACT_FILENAME
    if Path(artifact_path).resolve() != target.resolve():
        write_atomic(target, Path(artifact_path).read_bytes())
    config["clada"] = {"file": ARTIFACT_FILENAME, "format_version": FORMAT_VERSION}
    write_atomic(config_path, (json.dumps(config, indent=2) + "\n").encode())
    return target


def from_pretrained(checkpoint: str | os.PathLike, *, force: bool = False, backend: str = "auto", **kwargs) -> nn.Module:
    """``AutoModelForCausalLM.from_pretrained(checkpoint, **kwargs)`` with the declared artifact applied."""
    from transformers import AutoModelForCausalLM

    from .patch import apply

    model = AutoModelForCausalLM.from_pretrained(checkpoint, **kwargs)
    apply(model, force=force, backend=backend)  # no path: apply finds the declared artifact
    return model
