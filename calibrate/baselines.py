"""Sparsity methods selectable by name for evaluation: baselines and CLADA ablations.

Artifact-expressible baselines (thresholds from calibration activations, channel scales all ones, no
adaptation), applied with ``clada.runtime``:

- ``uniform``: neuron j of a token is skipped iff |h_j| <= t_mid[l]; t_mid[l] is the quantile q of |h| on
  calibration tokens, the same q in every layer (h: the input of the down projection);
- ``teal`` (TEAL's uniform rule): input channel i is skipped iff |x_i| <= t_in[l] (columns of gate/up) and
  neuron j iff |h_j| <= t_mid[l] (columns of down), both at quantile q in every layer; t_mid is the quantile
  of h computed from the input-sparsified x, as at run time;
- ``teal-greedy`` (TEAL's block-wise greedy allocation, restricted to the MLP): in each layer, start from
  no sparsity and repeatedly raise q_in or q_mid by ``GREEDY_STEP``, whichever adds less relative L2 error
  to the layer's MLP output on calibration tokens, until the layer's byte-weighted sparsity reaches the
  target q (the same target in every layer).

Evaluation-only baselines (``cats``, ``griffin``): see clada.calibrate.masked_methods. ``dense``: nothing
skipped. CLADA ablations of an artifact: ``clada`` (as calibrated), ``clada-surprisal`` (gam = 0),
``clada-entropy`` (lam = 0), ``clada-noadapt`` (lam = gam = 0).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from clada import runtime
from clada.artifacts import Artifact
from clada.calibrate.evaluate import Sparsifier
from clada.calibrate.masked_methods import CatsMethod, DenseMethod, GriffinMethod, activation_modules
from clada.calibrate.measure import channel_scales, collect_mlp_inputs
from clada.runtime.adapters import MLPParts, adapter_for

ARTIFACT_BASELINES = ("uniform", "teal", "teal-greedy")
ABLATIONS = {  # name -> (keep lam, keep gam)
    "clada-noadapt": (False, False), "clada-surprisal": (True, False), "clada-entropy": (False, True),
    "clada": (True, True),
}
SPARSITY_METHODS = ARTIFACT_BASELINES + ("cats", "griffin")
CALIBRATED_METHODS = ARTIFACT_BASELINES + ("cats",)
METHODS = ("dense",) + SPARSITY_METHODS + tuple(ABLATIONS)
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


class ArtifactMethod(Sparsifier):
    """An artifact applied with ``clada.runtime``: CLADA, its ablations and the artifact baselines."""

    def __init__(self, model: nn.Module, artifact: Artifact, force: bool = False):
        runtime.apply(model, artifact, force=force)
        super().__init__(model)
        self.artifact = artifact
        self.adaptive = artifact.lam != 0.0 or artifact.gam != 0.0


def ablation(artifact: Artifact, name: str) -> Artifact:
    """``artifact`` with the adaptation terms the ablation ``name`` drops set to zero."""
    keep_lam, keep_gam = ABLATIONS[name]
    return dataclasses.replace(artifact, lam=artifact.lam if keep_lam else 0.0, gam=artifact.gam if keep_gam else 0.0)


def sorted_quantile(ordered: torch.Tensor, q: float) -> float:
    """The q quantile (linear interpolation, as torch.quantile) of values already sorted ascending (1-D)."""
    if q <= 0:
        return 0.0  # as the calibration's quantile grid: quantile 0 means threshold 0
    pos = q * (ordered.numel() - 1)
    lo = int(pos)
    hi = min(lo + 1, ordered.numel() - 1)
    return float(ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo))


class LayerProbe:
    """One layer's MLP on calibration inputs x (N, D): thresholds of quantile pairs and the output error.

    For (q_in, q_mid): t_in is the q_in quantile of |x|; t_mid the q_mid quantile of |h'|, where h' is the
    intermediate computed from x with the channels |x| <= t_in zeroed (exact quantiles over all entries;
    quantile 0 means threshold 0: nothing but exact zeros skipped). ``error`` is ||y' - y||^2 / ||y||^2 of
    the MLP output with both masks applied.
    """

    def __init__(self, adapter, part: MLPParts, x: torch.Tensor):
        self.adapter, self.part = adapter, part
        self.out = getattr(part.owner, part.out_name)
        self.x = x.to(adapter.weight(self.out).device).float()
        self.x_sorted = self.x.abs().flatten().sort().values
        with torch.no_grad():
            self.y = self.out(adapter.intermediate(part, self.x))
        self.y_norm = self.y.pow(2).sum()
        self._by_q_in: dict[float, tuple[float, torch.Tensor, torch.Tensor]] = {}

    @torch.no_grad()
    def _sparse_input(self, q_in: float) -> tuple[float, torch.Tensor, torch.Tensor]:
        """(t_in, h', |h'| sorted) of ``q_in``, cached."""
        key = round(q_in, 9)
        if key not in self._by_q_in:
            t_in = sorted_quantile(self.x_sorted, q_in)
            h = self.adapter.intermediate(self.part, self.x * (self.x.abs() > t_in))
            self._by_q_in[key] = (t_in, h, h.abs().flatten().sort().values)
        return self._by_q_in[key]

    def thresholds(self, q_in: float, q_mid: float) -> tuple[float, float]:
        t_in, _, h_sorted = self._sparse_input(q_in)
        return t_in, sorted_quantile(h_sorted, q_mid)

    @torch.no_grad()
    def error(self, q_in: float, q_mid: float) -> float:
        _, h, h_sorted = self._sparse_input(q_in)
        y = self.out(h * (h.abs() > sorted_quantile(h_sorted, q_mid)))
        return float((y - self.y).pow(2).sum() / self.y_norm)


def teal_greedy_path(probe: LayerProbe, frac_in: float, target: float, step: float = GREEDY_STEP,
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


def _layer_quantiles(name: str, probe: LayerProbe, frac_in: float, levels: Sequence[float]) -> list[tuple[float, float]]:
    """(q_in, q_mid) of one layer for each level of the artifact baseline ``name``."""
    if name == "uniform":
        return [(0.0, q) for q in levels]
    if name == "teal":
        return [(q, q) for q in levels]
    path = teal_greedy_path(probe, frac_in, max(levels))
    return [_first_reaching(path, frac_in, q) for q in levels]


def _check_levels(name: str, levels: Sequence[float]) -> None:
    for q in levels:
        if not 0.0 <= q <= MAX_QUANTILE:
            raise MethodError(f"{name}: sparsity {q} is outside [0, {MAX_QUANTILE}]")


def threshold_artifact(model: nn.Module, tau_in: torch.Tensor, tau_mid: torch.Tensor, **recipe) -> Artifact:
    """An artifact of per-layer thresholds on |x| and |h| (channel scales all ones, no adaptation)."""
    adapter = adapter_for(model)
    ones_in, ones_mid = channel_scales(model, adapter, "magnitude")
    return Artifact(tau_in.float(), tau_mid.float(), ones_in, ones_mid, runtime.mlp_fingerprint(model, adapter),
                    model=runtime.model_identity(model, adapter), recipe=dict(recipe))


def baseline_artifacts(name: str, model: nn.Module, calibration: CalibrationActivations,
                       levels: Sequence[float]) -> list[Artifact]:
    """Artifacts of the artifact baseline ``name`` (uniform, teal, teal-greedy) at each sparsity level."""
    if name not in ARTIFACT_BASELINES:
        raise MethodError(f"{name!r} is not one of {', '.join(ARTIFACT_BASELINES)}")
    _check_levels(name, levels)
    adapter = adapter_for(model)
    parts = adapter.mlp_parts(model)
    tau = torch.zeros(2, len(levels), len(parts))
    for layer, part in enumerate(parts):
        in_bytes = sum(adapter.weight(getattr(part.owner, n)).numel() for n in part.in_names)
        frac_in = in_bytes / (in_bytes + adapter.weight(getattr(part.owner, part.out_name)).numel())
        probe = LayerProbe(adapter, part, calibration.inputs[layer])
        for k, (q_in, q_mid) in enumerate(_layer_quantiles(name, probe, frac_in, levels)):
            tau[:, k, layer] = torch.tensor(probe.thresholds(q_in, q_mid))
    return [threshold_artifact(model, tau[0, k], tau[1, k], baseline=name, sparsity=q) for k, q in enumerate(levels)]


@torch.no_grad()
def cats_thresholds(model: nn.Module, calibration: CalibrationActivations, q: float) -> torch.Tensor:
    """(L,) the q quantile of |act(gate(x))| of every layer on the calibration inputs."""
    _check_levels("cats", [q])
    adapter = adapter_for(model)
    parts = adapter.mlp_parts(model)
    out = []
    for act, part, x in zip(activation_modules(adapter, parts), parts, calibration.inputs):
        seen: list[torch.Tensor] = []
        hook = act.register_forward_hook(lambda m, a, o: seen.append(o.detach()))
        try:
            adapter.intermediate(part, x.to(adapter.weight(getattr(part.owner, part.out_name)).device).float())
        finally:
            hook.remove()
        out.append(sorted_quantile(seen[0].abs().flatten().sort().values, q))
    return torch.tensor(out, dtype=torch.float32)


def check_method(name: str, sparsity: float | None, has_artifact: bool) -> None:
    """MethodError unless ``name`` is a method and gets what it needs (a sparsity level xor an artifact)."""
    if name not in METHODS:
        raise MethodError(f"unknown method {name!r}; expected one of {', '.join(METHODS)}")
    if name in ABLATIONS and not has_artifact:
        raise MethodError(f"method {name!r} needs an artifact (--artifact)")
    if name in SPARSITY_METHODS:
        if sparsity is None:
            raise MethodError(f"method {name!r} needs a sparsity level (--sparsity)")
        _check_levels(name, [sparsity])
    elif sparsity is not None:
        raise MethodError(f"--sparsity applies to {', '.join(SPARSITY_METHODS)} only, not {name!r}")


def build_method(name: str, model: nn.Module, sparsity: float | None = None, artifact: Artifact | None = None,
                 calibration: CalibrationActivations | None = None, force: bool = False) -> Sparsifier:
    """Attach method ``name`` to ``model`` (see the module doc); ``.remove()`` detaches it.

    ``sparsity``: the quantile / target of the baselines; ``artifact``: the CLADA artifact of the clada*
    methods; ``calibration``: activations for uniform, teal, teal-greedy and cats.
    """
    check_method(name, sparsity, artifact is not None)
    if name == "dense":
        return DenseMethod(model)
    if name in ABLATIONS:
        return ArtifactMethod(model, ablation(artifact, name), force=force)
    if name == "griffin":
        return GriffinMethod(model, sparsity)
    if calibration is None:
        raise MethodError(f"method {name!r} needs calibration activations")
    if name == "cats":
        return CatsMethod(model, cats_thresholds(model, calibration, sparsity))
    return ArtifactMethod(model, baseline_artifacts(name, model, calibration, [sparsity])[0])
