"""The method registry: every sparsity method by name, each an artifact applied through ``runtime.apply``.

A method turns (model, sparsity level, CLADA artifact, calibration activations) into the artifact it applies.
The CLI's choices and validation, ``clada eval --method``, ``clada bench --method`` and the quality benchmark's
levels are all built from ``METHODS``. Adding a method: one ``register(MethodSpec(...))`` call here (and, if it
needs a new keep rule, a rule in ``runtime/rules.py``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from .. import runtime
from ..artifacts import ATTENTION_KEYS, PREFIX_KEYS, Artifact
from .baselines import (CalibrationActivations, MethodError, baseline_artifacts, cats_artifact, check_levels,
                        griffin_artifact, rule_artifact)
from .evaluate import QUALITY_BACKEND, Sparsifier

Build = Callable[[nn.Module, "float | None", "Artifact | None", "CalibrationActivations | None"], Artifact]


@dataclass(frozen=True)
class MethodSpec:
    """A named method: what it needs and how it builds its artifact.

    ``needs``: ``"sparsity"`` (a level, ``--sparsity``), ``"artifact"`` (a CLADA artifact) or ``"nothing"``;
    ``calibrated``: it needs calibration activations; ``levels``: the sparsity levels the quality benchmark
    sweeps (spanning reads saved ~0.05 .. 0.4 on SmolLM2-135M).
    """

    name: str
    summary: str
    needs: str
    build: Build
    calibrated: bool = False
    levels: tuple[float, ...] = ()


METHODS: dict[str, MethodSpec] = {}


def register(spec: MethodSpec) -> MethodSpec:
    if spec.name in METHODS:
        raise ValueError(f"method {spec.name!r} is registered twice")
    METHODS[spec.name] = spec
    return spec


def _threshold(name: str) -> Build:
    return lambda model, q, artifact, calibration: baseline_artifacts(name, model, calibration, [q])[0]


def _ablation(keep_lam: bool, keep_gam: bool, keep_compensation: bool = True, keep_attention: bool = True,
              keep_prefix: bool = True) -> Build:
    def build(model, q, artifact, calibration):
        centers = {} if keep_compensation else {"center_in": None, "center_mid": None}
        attention = {} if keep_attention else dict.fromkeys(ATTENTION_KEYS)
        prefix = {} if keep_prefix else dict.fromkeys(PREFIX_KEYS)
        return dataclasses.replace(artifact, lam=artifact.lam if keep_lam else 0.0,
                                   gam=artifact.gam if keep_gam else 0.0, **centers, **attention, **prefix)
    return build


register(MethodSpec("dense", "nothing skipped", "nothing",
                    lambda model, q, artifact, calibration: rule_artifact(model, {"name": "dense"}, baseline="dense")))
register(MethodSpec("uniform", "|h| below the same quantile of every layer's down input", "sparsity",
                    _threshold("uniform"), calibrated=True, levels=(0.45, 0.6, 0.7, 0.8)))
register(MethodSpec("teal", "TEAL: |x| and |h| below the same quantile in every layer", "sparsity",
                    _threshold("teal"), calibrated=True, levels=(0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4)))
register(MethodSpec("teal-greedy", "TEAL's block-wise greedy allocation of the MLP's sparsity", "sparsity",
                    _threshold("teal-greedy"), calibrated=True, levels=(0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4)))
register(MethodSpec("cats", "CATS: |act(gate(x))| below a per-layer quantile", "sparsity",
                    lambda model, q, artifact, calibration: cats_artifact(model, calibration, q), calibrated=True,
                    levels=(0.3, 0.4, 0.5, 0.6)))
register(MethodSpec("griffin", "GRIFFIN: each prompt's top neurons, fixed while decoding", "sparsity",
                    lambda model, q, artifact, calibration: griffin_artifact(model, q),
                    levels=(0.05, 0.1, 0.2)))
register(MethodSpec("clada", "the CLADA artifact as calibrated", "artifact", _ablation(True, True)))
register(MethodSpec("clada-noadapt", "the CLADA artifact without adaptation (lam = gam = 0)", "artifact",
                    _ablation(False, False)))
register(MethodSpec("clada-surprisal", "the CLADA artifact, surprisal only (gam = 0)", "artifact",
                    _ablation(True, False)))
register(MethodSpec("clada-entropy", "the CLADA artifact, entropy only (lam = 0)", "artifact",
                    _ablation(False, True)))
register(MethodSpec("clada-nocomp", "the CLADA artifact without compensation (skipped channels count as 0)",
                    "artifact", _ablation(True, True, keep_compensation=False)))
register(MethodSpec("clada-noprefix", "the CLADA artifact without its prompt prior (the same thresholds for every "
                    "sequence)", "artifact", _ablation(True, True, keep_prefix=False)))
register(MethodSpec("clada-noattention", "the CLADA artifact with its attention projections dense (its MLP part)",
                    "artifact", _ablation(True, True, keep_attention=False)))


def check_method(name: str, sparsity: float | None, has_artifact: bool) -> MethodSpec:
    """The method ``name``; MethodError unless it gets what it needs (a sparsity level xor an artifact)."""
    spec = METHODS.get(name)
    if spec is None:
        raise MethodError(f"unknown method {name!r}; expected one of {', '.join(METHODS)}")
    if spec.needs == "artifact" and not has_artifact:
        raise MethodError(f"method {name!r} needs an artifact (--artifact)")
    if spec.needs == "sparsity":
        if sparsity is None:
            raise MethodError(f"method {name!r} needs a sparsity level (--sparsity)")
        check_levels(name, [sparsity])
    elif sparsity is not None:
        takes = ", ".join(n for n, s in METHODS.items() if s.needs == "sparsity")
        raise MethodError(f"--sparsity applies to {takes} only, not {name!r}")
    return spec


def method_artifact(name: str, model: nn.Module, sparsity: float | None = None, artifact: Artifact | None = None,
                    calibration: CalibrationActivations | None = None) -> Artifact:
    """The artifact method ``name`` applies to ``model`` (see ``MethodSpec``)."""
    spec = check_method(name, sparsity, artifact is not None)
    if spec.calibrated and calibration is None:
        raise MethodError(f"method {name!r} needs calibration activations")
    return spec.build(model, sparsity, artifact, calibration)


def build_method(name: str, model: nn.Module, sparsity: float | None = None, artifact: Artifact | None = None,
                 calibration: CalibrationActivations | None = None, force: bool = False,
                 backend: str = QUALITY_BACKEND) -> Sparsifier:
    """Apply method ``name`` to ``model`` through ``runtime.apply``; ``.remove()`` detaches it."""
    runtime.apply(model, method_artifact(name, model, sparsity, artifact, calibration), force=force, backend=backend)
    return Sparsifier(model)
