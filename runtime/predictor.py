"""The predictor rule's low-bit copy of a gated MLP's gate and up: which neurons a decode step needs, estimated
before any of their full-precision weights is read.

The predictor rule (``rules.PredictorRule``) keeps neuron j of layer l iff |h~_j|·c_j > tau_mid[l]·m, where

    h~ = act(Q(W_gate) x') * Q(W_up) x'

comes from a copy of gate and up quantised to ``bits`` per weight (symmetric, one float16 scale per ``group``
consecutive input channels of a neuron's row: :func:`quantised`), and x' is the MLP input with the channels
|x_i|·w_i <= tau_in[l]·m set to 0 (the copy's rows of those input channels are not read). A kept neuron's gate row,
up row and down column are read in full precision against the whole input; a skipped neuron's not at all. Per step
a layer reads the copy's rows of its kept input channels: ``bytes_per_weight`` per weight of gate and up.
"""

from __future__ import annotations

import torch

from .adapters import MLPAdapter, MLPParts

BITS = 4  # the copy's bits per weight
GROUP = 32  # weights of a row per float16 scale


def quantised(weight: torch.Tensor, bits: int = BITS, group: int = GROUP) -> torch.Tensor:
    """``weight`` (O, I) quantised symmetrically to ``bits`` per weight with one float16 scale (absmax / (2**(bits-1)
    - 1)) per ``group`` consecutive weights of a row, returned dequantised, float32, (O, I)."""
    out_features, in_features = weight.shape
    if not 2 <= bits <= 8:
        raise ValueError(f"predictor copy: bits {bits} is outside 2..8")
    if group < 1 or in_features % group:
        raise ValueError(f"predictor copy: group {group} does not divide the {in_features} input features")
    w = weight.detach().float().reshape(out_features, in_features // group, group)
    top = 2 ** (bits - 1) - 1
    scale = (w.abs().amax(-1, keepdim=True) / top).half().float()  # stored as float16
    codes = (w / scale.clamp_min(torch.finfo(torch.float32).tiny)).round().clamp(-top - 1, top)
    return (codes * scale).reshape(out_features, in_features)


def bytes_per_weight(bits: int = BITS, group: int = GROUP) -> float:
    """Bytes the copy stores per weight: its code and its share of a float16 scale."""
    return (bits + 16 / group) / 8


class LowBitCopy:
    """The dequantised copies of gate and up of every layer of a gated MLP model (kept in the weights' dtype and
    device, followed lazily when the model moves), and the estimate h~ computed from them."""

    def __init__(self, adapter: MLPAdapter, parts: list[MLPParts], bits: int = BITS, group: int = GROUP):
        if not adapter.gated or any(len(p.in_names) != 2 for p in parts):
            raise ValueError("the predictor rule needs a gated MLP with separate gate and up projections "
                             f"({type(adapter).__name__} has none)")
        self.adapter, self.parts, self.bits, self.group = adapter, parts, bits, group
        self.bytes_per_weight = bytes_per_weight(bits, group)
        self.copies = []
        for part in parts:
            weights = [adapter.weight(getattr(part.owner, n)) for n in part.in_names]
            self.copies.append(tuple(quantised(w, bits, group).to(w.dtype) for w in weights))

    def share_of_input_bytes(self, element_size: int) -> float:
        """The copy's bytes over the bytes of the gate and up it copies, for weights of ``element_size`` bytes."""
        return self.bytes_per_weight / element_size

    def estimate(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """h~ (..., I) float32 of MLP inputs ``x`` (..., D) (the skipped input channels already zero)."""
        gate, up = self.copies[layer]
        if gate.device != x.device or gate.dtype != x.dtype:
            gate, up = self.copies[layer] = (gate.to(x.device, x.dtype), up.to(x.device, x.dtype))
        act = getattr(self.parts[layer].owner, self.adapter.act_name)
        return (act(x @ gate.T) * (x @ up.T)).float()
