"""Named methods on a loaded model for ``clada eval`` and the benchmarks, and the threshold sensitivity study."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from .. import runtime
from ..artifacts import Artifact
from .baselines import CalibrationActivations
from .data import load_documents
from .evaluate import QUALITY_BACKEND, Sparsifier, TeacherForcedEvaluator, generation_eval
from .methods import build_method, check_method, method_artifact
from .recipe import Recipe, parse_recipe
from .splits import token_splits

SENSITIVITY_KEYS = ("ppl_increase", "kl", "mlp_reads_saved", "mlp_sparsity", "input_sparsity", "relaxed_share")


def recipe_of(artifact: Artifact | None) -> Recipe:
    """The recipe an artifact was calibrated with (the default recipe without one); output and search
    settings are dropped, they do not affect which documents are calibration documents."""
    data = dict(artifact.recipe) if artifact is not None else {}
    data.pop("output", None)
    data.pop("search", None)
    return parse_recipe(data, "artifact recipe")


def calibration_activations(model: nn.Module, tokenizer, recipe: Recipe) -> CalibrationActivations:
    """Dense MLP inputs on the recipe's activation documents, as the calibration job collects them."""
    splits = token_splits(recipe, tokenizer, load_documents(recipe.data).documents)
    return CalibrationActivations.collect(model, splits.act, recipe.prompt_tokens, recipe.calibration.activation_tokens)


def calibrated_method_artifact(name: str, model: nn.Module, tokenizer, artifact: Artifact | None = None,
                               sparsity: float | None = None) -> Artifact:
    """The artifact of method ``name`` (clada.calibrate.methods.METHODS) for ``model``; the baselines that need
    calibration activations are calibrated on the artifact's (or the default recipe's) calibration documents."""
    spec = check_method(name, sparsity, artifact is not None)
    calibration = calibration_activations(model, tokenizer, recipe_of(artifact)) if spec.calibrated else None
    return method_artifact(name, model, sparsity, artifact, calibration)


def attach_method(name: str, model: nn.Module, tokenizer, artifact: Artifact | None = None,
                  sparsity: float | None = None, force: bool = False) -> Sparsifier:
    """Apply method ``name`` to ``model`` (see ``calibrated_method_artifact``)."""
    runtime.apply(model, calibrated_method_artifact(name, model, tokenizer, artifact, sparsity), force=force,
                  backend=QUALITY_BACKEND)
    return Sparsifier(model)


def threshold_sensitivity(model: nn.Module, artifact: Artifact, tokens: torch.Tensor, prompt: int,
                          delta: float = 0.2, batch_size: int = 16, base: dict | None = None,
                          reference: TeacherForcedEvaluator | None = None, progress: bool = False) -> list[dict]:
    """Generation-regime figures of ``artifact`` with ``tau_s`` and ``tau_H`` moved by -delta and +delta,
    one at a time (normalised nats, clamped at 0), and the change of each figure from the artifact as is.

    ``base``: the artifact's own figures on ``tokens`` if already measured; ``reference``: their dense
    reference (see ``generation_eval``). Rows: variant, tau_s, tau_H,
    SENSITIVITY_KEYS and ``d_<key>`` (variant minus base). A variant that decodes like one already measured
    (``Artifact.decode_digest``: a threshold whose weight lam or gam is 0) takes its figures.
    """
    variants = [("base", 0.0, 0.0), (f"tau_s-{delta:g}", -delta, 0.0), (f"tau_s+{delta:g}", delta, 0.0),
                (f"tau_H-{delta:g}", 0.0, -delta), (f"tau_H+{delta:g}", 0.0, delta)]
    rows, measured = [], {}  # decode digest -> figures: a move without effect (lam or gam 0) is not measured again
    if base is not None:
        measured[artifact.decode_digest()] = base
    for name, d_s, d_h in variants:
        variant = dataclasses.replace(artifact, tau_s=max(0.0, artifact.tau_s + d_s), tau_H=max(0.0, artifact.tau_H + d_h))
        key = variant.decode_digest()
        if key in measured:
            figures = measured[key]
        else:
            method = build_method("clada", model, artifact=variant)
            try:
                figures = generation_eval(model, tokens, prompt, batch_size, progress=progress, method=method,
                                          reference=reference)
            finally:
                method.remove()
            measured[key] = figures
        rows.append({"variant": name, "tau_s": variant.tau_s, "tau_H": variant.tau_H,
                     **{k: figures[k] for k in SENSITIVITY_KEYS}})
    for row in rows:
        row.update({f"d_{k}": row[k] - rows[0][k] for k in SENSITIVITY_KEYS})
    return rows
