"""Artifacts of the baselines: thresholds from calibration activations, channel weights all ones, no adaptation.

Every baseline is an artifact applied with ``clada.runtime`` like CLADA's (the method registry,
``clada.calibrate.methods``, names them):

- ``uniform``: neuron j of a token is skipped iff |h_j| <= t_mid[l]; t_mid[l] is the quantile q of |h| on
  calibration tokens, the same q in every layer (h: the input of the down projection);
- ``teal`` (TEAL's uniform rule): input channel i is skipped iff |x_i| <= t_in[l] (columns of gate/up) and
  neuron j iff |h_j| <= t_mid[l] (columns of down), both at quantile q in every layer; t_mid is the quantile
  of h computed from the input-sparsified x, as at run time;
- ``teal-greedy`` (TEAL's block-wise greedy allocation, restricted to the MLP): in each layer, start from
  no sparsity and repeatedly raise q_in or q_mid by ``GREEDY_STEP``, whichever adds less relative L2 error
  to the layer's MLP output on calibration tokens, until the layer's byte-weighted sparsity reaches the
  target q (the same target in every layer).

- ``cats`` (CATS, rule ``cats``): neuron j of a token is kept iff |act(gate(x))_j| > t[l], t[l] the quantile q of
  |act(gate(x))| on calibration tokens in every layer; gate is always computed, a skipped neuron saves its row of
  up (gated MLPs) and its column of down;
- ``griffin`` (GRIFFIN, rule ``griffin``): per sequence and layer, the (1 - q)·I neurons with the largest norm of
  the prompt's token-normalised intermediate activations, chosen at the dense prefill and fixed while decoding;
- ``dense`` (rule ``dense``): nothing skipped.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .. import runtime
from ..artifacts import Artifact
from ..runtime.adapters import adapter_for
from .measure import LayerErrorModel, channel_weights, collect_mlp_inputs, score_quantiles

GREEDY_STEP = 0.05
MAX_QUANTILE = 0.95


class MethodError(ValueError):
    """A method name or its settings are invalid."""


@dataclass
class CalibrationActivations:
    """Dense MLP inputs of every layer at scored positions of calibration documents: list of (N, D)."""

    inputs: list[torch.Tensor]

    @classmethod
    def collect(cls, model: nn.Module, tokens: torch.Tensor, prompt: int,
                max_tokens: int = 1024) -> CalibrationActivations:
        """Run the dense model on ``tokens`` (N, P+S+1) and keep up to ``max_tokens`` inputs per layer."""
        return cls(collect_mlp_inputs(model, adapter_for(model), tokens, prompt, max_tokens))


def magnitude_error_model(adapter, part, x: torch.Tensor) -> LayerErrorModel:
    """The layer-error model of the baselines: scores |activation| (weights all ones), exact quantiles."""
    ones_in = torch.ones(x.shape[-1])
    ones_mid = torch.ones(adapter.weight(getattr(part.owner, part.out_name)).shape[1])
    return LayerErrorModel(adapter, part, x, ones_in, ones_mid, quantiles="exact")


def teal_greedy_path(probe: LayerErrorModel, frac_in: float, target: float, step: float = GREEDY_STEP,
                     max_q: float = MAX_QUANTILE) -> list[tuple[float, float]]:
    """TEAL's greedy allocation in one layer: the visited (q_in, q_mid), from (0, 0) until the byte-weighted
    sparsity ``frac_in * q_in + (1 - frac_in) * q_mid`` reaches ``target`` (or both reach ``max_q``)."""
    top = int(round(max_q / step))
    i = j = 0
    path = [(0.0, 0.0)]
    while (frac_in * i + (1.0 - frac_in) * j) * step < target - 1e-9:
        candidates = []
        if i < top:
            candidates.append((probe.error((i + 1) * step, j * step), i + 1, j))
        if j < top:
            candidates.append((probe.error(i * step, (j + 1) * step), i, j + 1))
        if not candidates:
            break
        _, i, j = min(candidates)
        path.append((i * step, j * step))
    return path


def _first_reaching(path: list[tuple[float, float]], frac_in: float, target: float) -> tuple[float, float]:
    for q_in, q_mid in path:
        if frac_in * q_in + (1.0 - frac_in) * q_mid >= target - 1e-9:
            return q_in, q_mid
    return path[-1]


def _layer_quantiles(name: str, probe: LayerErrorModel, frac_in: float, levels: Sequence[float]) -> list[tuple[float, float]]:
    """(q_in, q_mid) of one layer for each level of the artifact baseline ``name``."""
    if name == "uniform":
        return [(0.0, q) for q in levels]
    if name == "teal":
        return [(q, q) for q in levels]
    path = teal_greedy_path(probe, frac_in, max(levels))
    return [_first_reaching(path, frac_in, q) for q in levels]


def check_levels(name: str, levels: Sequence[float]) -> None:
    for q in levels:
        if not 0.0 <= q <= MAX_QUANTILE:
            raise MethodError(f"{name}: sparsity {q} is outside [0, {MAX_QUANTILE}]")


def rule_artifact(model: nn.Module, rule: dict, tau_in: torch.Tensor | None = None,
                  tau_mid: torch.Tensor | None = None, **recipe) -> Artifact:
    """An artifact of ``rule`` for ``model``: per-layer thresholds on |x| and |h| (default zero), channel
    weights all ones, no adaptation; ``recipe`` records how it was made."""
    adapter = adapter_for(model)
    ones_in, ones_mid = channel_weights(model, adapter, "magnitude")
    zeros = torch.zeros(ones_in.shape[0])
    return Artifact(zeros if tau_in is None else tau_in.float(), zeros if tau_mid is None else tau_mid.float(),
                    ones_in, ones_mid, runtime.mlp_fingerprint(model, adapter),
                    model=runtime.model_identity(model, adapter), recipe=dict(recipe), rule=rule)


THRESHOLD_BASELINES = ("uniform", "teal", "teal-greedy")


def baseline_artifacts(name: str, model: nn.Module, calibration: CalibrationActivations,
                       levels: Sequence[float]) -> list[Artifact]:
    """Artifacts of the threshold baseline ``name`` (uniform, teal, teal-greedy) at each sparsity level."""
    if name not in THRESHOLD_BASELINES:
        raise MethodError(f"{name!r} is not one of {', '.join(THRESHOLD_BASELINES)}")
    check_levels(name, levels)
    adapter = adapter_for(model)
    parts = adapter.mlp_parts(model)
    tau = torch.zeros(2, len(levels), len(parts))
    for layer, part in enumerate(parts):
        probe = magnitude_error_model(adapter, part, calibration.inputs[layer])
        frac_in = probe.bytes_in / (probe.bytes_in + probe.bytes_mid)
        for k, (q_in, q_mid) in enumerate(_layer_quantiles(name, probe, frac_in, levels)):
            tau[:, k, layer] = torch.tensor(probe.thresholds(q_in, q_mid))
    return [rule_artifact(model, {"name": "threshold"}, tau[0, k], tau[1, k], baseline=name, sparsity=q)
            for k, q in enumerate(levels)]


@torch.no_grad()
def cats_artifact(model: nn.Module, calibration: CalibrationActivations, q: float) -> Artifact:
    """CATS at quantile ``q``: tau_mid[l] is the q quantile of |act(gate(x))| on the calibration inputs."""
    check_levels("cats", [q])
    adapter = adapter_for(model)
    taus = []
    for part, x in zip(adapter.mlp_parts(model), calibration.inputs):
        act = getattr(part.owner, adapter.act_name)
        seen: list[torch.Tensor] = []
        hook = act.register_forward_hook(lambda m, a, o: seen.append(o.detach()))
        try:
            adapter.intermediate(part, x.to(adapter.weight(getattr(part.owner, part.out_name)).device).float())
        finally:
            hook.remove()
        taus.append(float(score_quantiles(seen[0].abs(), [q], "exact")[0]))
    return rule_artifact(model, {"name": "cats"}, tau_mid=torch.tensor(taus), baseline="cats", sparsity=q)


def griffin_artifact(model: nn.Module, q: float) -> Artifact:
    """GRIFFIN keeping the (1 - q) share of the neurons each prompt's prefill ranks highest."""
    if not 0.0 <= q < 1.0:
        raise MethodError(f"griffin: sparsity {q} is outside [0, 1)")
    return rule_artifact(model, {"name": "griffin", "sparsity": float(q)}, baseline="griffin", sparsity=q)
