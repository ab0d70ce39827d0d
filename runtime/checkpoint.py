"""Artifacts beside checkpoints: declare one in a checkpoint folder's config.json, find it, load both, and save
a patched model as such a checkpoint."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from torch import nn

from ..artifacts import FORMAT_VERSION, Artifact, ArtifactError, load_artifact, save_artifact, write_atomic

ARTIFACT_FILENAME = "clada.safetensors"
CONFIG_KEY = "clada"  # config.json entry declaring the artifact
CARD_BEGIN, CARD_END = "<!-- clada:begin -->", "<!-- clada:end -->"
MODEL_CARD = f"""{CARD_BEGIN}
## CLADA adaptive activation sparsity

This checkpoint carries a CLADA threshold artifact, `{ARTIFACT_FILENAME}`, declared under `"{CONFIG_KEY}"` in
`config.json`. transformers alone ignores it: `AutoModelForCausalLM.from_pretrained` gives the dense model. With the
`clada` package installed, one line loads the model with the artifact applied (sparse decoding in `generate`):

```python
from clada import runtime

model = runtime.from_pretrained("path/to/this/folder")  # AutoModelForCausalLM.from_pretrained + the artifact
```

A model already loaded with `AutoModelForCausalLM.from_pretrained` gets it with `runtime.apply(model)`.
{CARD_END}
"""


def find_declared_artifact(model: nn.Module) -> Path:
    """The artifact stored beside the model's checkpoint (config ``clada.file`` or clada.safetensors)."""
    folder = getattr(model.config, "_name_or_path", "") or getattr(model, "name_or_path", "")
    declared = getattr(model.config, CONFIG_KEY, None)
    name = declared.get("file", ARTIFACT_FILENAME) if isinstance(declared, dict) else ARTIFACT_FILENAME
    path = Path(folder) / name
    if not folder or not path.is_file():
        raise ArtifactError(f"no artifact path given and none found beside the checkpoint ({path})")
    return path


def declaration() -> dict:
    """The config.json entry (under ``CONFIG_KEY``) declaring the artifact beside a checkpoint."""
    return {"file": ARTIFACT_FILENAME, "format_version": FORMAT_VERSION}


def write_model_card(folder: str | os.PathLike) -> Path:
    """Put the ``MODEL_CARD`` section into the folder's README.md: replaced if there, appended to a card without
    it, or a new card (with a ``clada`` tag) where there is none."""
    path = Path(folder) / "README.md"
    text = path.read_text(encoding="utf-8") if path.is_file() else "---\ntags:\n- clada\n---\n\n"
    section = re.compile(re.escape(CARD_BEGIN) + ".*?" + re.escape(CARD_END) + "\n?", re.S)
    text = section.sub(lambda _: MODEL_CARD, text) if section.search(text) else text.rstrip("\n") + "\n\n" + MODEL_CARD
    write_atomic(path, text.lstrip("\n").encode("utf-8"))
    return path


def save_with_artifact(model: nn.Module, save_directory: str | os.PathLike, artifact: Artifact, **kwargs) -> None:
    """The model's own ``save_pretrained(save_directory, **kwargs)`` (its config declares the artifact), then the
    artifact beside the weights and the model card section."""
    type(model).save_pretrained(model, save_directory, **kwargs)
    if kwargs.get("is_main_process", True):
        save_artifact(artifact, Path(save_directory) / ARTIFACT_FILENAME)
        write_model_card(save_directory)


def declare_in_checkpoint(artifact_path: str | os.PathLike, checkpoint: str | os.PathLike) -> Path:
    """Copy an artifact into a checkpoint folder, declare it in that folder's config.json and add a section on
    loading it to the folder's model card (README.md).

    The declaration is a small ``"clada": {"file": ..., "format_version": ...}`` entry, the way quantisation
    configs travel; every file is written atomically (config.json keeps its mode). Returns the artifact's new path.
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
    config[CONFIG_KEY] = declaration()
    write_atomic(config_path, (json.dumps(config, indent=2) + "\n").encode())
    write_model_card(folder)
    return target


def from_pretrained(checkpoint: str | os.PathLike, *, force: bool = False, backend: str = "auto", **kwargs) -> nn.Module:
    """``AutoModelForCausalLM.from_pretrained(checkpoint, **kwargs)`` with the declared artifact applied."""
    from transformers import AutoModelForCausalLM

    from .patch import apply

    model = AutoModelForCausalLM.from_pretrained(checkpoint, **kwargs)
    apply(model, force=force, backend=backend)  # no path: apply finds the declared artifact
    return model
