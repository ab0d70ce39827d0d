"""Lightweight CLADA runtime: load a threshold artifact into a transformers model.

Imports only torch, safetensors and transformers-compatible modules (no optuna, datasets, click, yaml)::

    from clada import runtime
    runtime.apply(model, "out/clada.safetensors")   # backend="auto" | "native" | "embedding_bag" | "masked" | "triton"
    # auto: per projection shape, the dense product or the first gathering backend, whichever this machine runs
    # faster at the prompt's density (measured at the first decode call, cached per machine; runtime.selection)
    model.generate(input_ids, max_new_tokens=64)
    runtime.stats(model)
    runtime.remove(model)

Driving a patched model (what calibration and the benchmarks use): ``is_patched``, ``set_thresholds``,
``dense(model)`` and ``fixed_multiplier(model, m)`` (context managers), ``multiplier``, ``applied_artifact``,
``observes_prefill(artifact)`` (its decode steps depend on each sequence's dense prefill).
"""

from ..artifacts import Artifact, ArtifactError, load_artifact
from .adapters import UnsupportedModelError, adapter_for, supported_model_types
from .backends import BACKEND_NAMES, BackendError, first_gathering
from .checkpoint import declare_in_checkpoint, from_pretrained
from .identity import mlp_fingerprint, model_identity
from .patch import (applied_artifact, apply, dense, fixed_multiplier, is_patched, multiplier, remove, reset_stats,
                    set_thresholds, stats)
from .predictor import BITS as PREDICTOR_BITS
from .predictor import GROUP as PREDICTOR_GROUP
from .predictor import SCALES as PREDICTOR_SCALES
from .predictor import UNNAMED_SCALES as PREDICTOR_UNNAMED_SCALES
from .rules import RULES, SPARSITY_FIGURES, check_rule, observes_prefill

__all__ = [
    "Artifact", "ArtifactError", "BACKEND_NAMES", "BackendError", "PREDICTOR_BITS", "PREDICTOR_GROUP",
    "PREDICTOR_SCALES", "PREDICTOR_UNNAMED_SCALES", "RULES", "SPARSITY_FIGURES", "UnsupportedModelError",
    "adapter_for",
    "applied_artifact", "apply", "check_rule", "declare_in_checkpoint", "dense", "first_gathering", "fixed_multiplier",
    "from_pretrained",
    "is_patched", "load_artifact", "mlp_fingerprint", "model_identity", "multiplier", "observes_prefill", "remove", "reset_stats",
    "set_thresholds", "stats", "supported_model_types",
]
