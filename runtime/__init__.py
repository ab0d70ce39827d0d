"""Lightweight CLADA runtime: load a threshold artifact into a transformers model.

Imports only torch, safetensors and transformers-compatible modules (no optuna, datasets, click, yaml)::

    from clada import runtime
    runtime.apply(model, "out/clada.safetensors")
    model.generate(input_ids, max_new_tokens=64)
    runtime.stats(model)
    runtime.remove(model)
"""

from clada.artifacts import Artifact, ArtifactError, load_artifact
from clada.runtime.adapters import UnsupportedModelError, adapter_for, supported_model_types
from clada.runtime.patch import (
    apply,
    declare_in_checkpoint,
    from_pretrained,
    mlp_fingerprint,
    model_identity,
    remove,
    reset_stats,
    state,
    stats,
    tracker,
)

__all__ = [
    "Artifact", "ArtifactError", "UnsupportedModelError", "adapter_for", "apply", "declare_in_checkpoint", "from_pretrained", "load_artifact",
    "mlp_fingerprint", "model_identity", "remove", "reset_stats", "state", "stats", "supported_model_types", "tracker",
]
