"""The predictor rule's low-bit copy of a gated MLP's gate and up: which neurons a decode step needs, estimated
before any of their full-precision weights is read.

The predictor rule (``rules.PredictorRule``) keeps neuron j of layer l iff |h~_j|·c_j > tau_mid[l]·m, where

    h~ = act(Q(W_gate) x') * Q(W_up) x'

comes from a copy of gate and up quantised to ``bits`` per weight (symmetric, one float16 scale per ``group``
consecutive input channels of a neuron's row, chosen by ``scales``: :func:`quantised`), and x' is the MLP input with
the channels |x_i|·w_i <= tau_in[l]·m set to 0 (the copy's rows of those input channels are not read). A kept
neuron's gate row, up row and down column are read in full precision against the whole input; a skipped neuron's not
at all. Per step a layer reads the copy's rows of its kept input channels: ``bytes_per_weight`` per weight of gate
and up.
"""

from __future__ import annotations

import torch

from .adapters import MLPAdapter, MLPParts

BITS = 4  # the copy's bits per weight
GROUP = 32  # weights of a row per float16 scale
# How a group's scale is chosen. absmax: the group's largest |w| maps to the largest code (the copies of artifacts
# whose rule names no ``scales``); mse: of the scales absmax / t, t in SCALE_SEARCH (codes of the largest |w|), the one
# with the smallest squared error of the group's weights (28% less than absmax on SmolLM2-135M's gate and up at 4 bits,
# 19% on Gaussian weights): the same bytes and layout, a closer estimate h~.
SCALE_CHOICES = ("absmax", "mse")
SCALES = "mse"  # what the calibration writes into new predictor artifacts
UNNAMED_SCALES = "absmax"  # the copies of artifacts whose rule names no scales (made before the key), and the default
SCALE_SEARCH = (-1.5, 1.0, 26)  # t from top - 1.5 to top + 1 in 26 steps of 0.1 (top = 2**(bits-1) - 1 among them)
SEARCH_ROWS = 256  # rows of a weight searched at once (bounds the search's memory)


def quantise(weight: torch.Tensor, bits: int = BITS, group: int = GROUP,
             scales: str = UNNAMED_SCALES) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight`` (O, I) quantised symmetrically to ``bits`` per weight: int8 codes (O, I) in [-2**(bits-1),
    2**(bits-1) - 1] and float16 scales (O, I / group), one per ``group`` consecutive weights of a row, chosen by
    ``scales`` (``SCALE_CHOICES``: absmax / (2**(bits-1) - 1), or the squared-error-optimal one of ``SCALE_SEARCH``);
    codes are the weights over their float16 scale, rounded and clamped."""
    out_features, in_features = weight.shape
    if not 2 <= bits <= 8:
        raise ValueError(f"predictor copy: bits {bits} is outside 2..8")
    if group < 1 or in_features % group:
        raise ValueError(f"predictor copy: group {group} does not divide the {in_features} input features")
    if scales not in SCALE_CHOICES:
        raise ValueError(f"predictor copy: scales {scales!r} is not one of {', '.join(SCALE_CHOICES)}")
    w = weight.detach().float().reshape(out_features, in_features // group, group)
    top = 2 ** (bits - 1) - 1
    pieces = [_quantised_groups(w[r:r + SEARCH_ROWS], top, scales) for r in range(0, out_features, SEARCH_ROWS)]
    codes = torch.cat([c for c, _ in pieces])
    scale = torch.cat([s for _, s in pieces])
    return codes.to(torch.int8).reshape(out_features, in_features), scale.squeeze(-1)


def _quantised_groups(w: torch.Tensor, top: int, scales: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes (R, G, group) float32 and float16 scales (R, G, 1) of the groups ``w`` (R, G, group)."""
    amax = w.abs().amax(-1, keepdim=True)
    best_scale = (amax / top).half()
    if scales == "mse":
        best_error = _squared_error(w, best_scale, top)
        low, high, steps = SCALE_SEARCH
        for t in torch.linspace(top + low, top + high, steps).tolist():
            scale = (amax / t).half()
            error = _squared_error(w, scale, top)
            better = error < best_error
            best_error = torch.where(better, error, best_error)
            best_scale = torch.where(better, scale, best_scale)
    return _codes(w, best_scale, top), best_scale


def _codes(w: torch.Tensor, scale: torch.Tensor, top: int) -> torch.Tensor:
    """Codes (R, G, group) float32 of the groups ``w`` over their float16 ``scale`` (R, G, 1), rounded and clamped."""
    return (w / scale.float().clamp_min(torch.finfo(torch.float32).tiny)).round_().clamp_(-top - 1, top)


def _squared_error(w: torch.Tensor, scale: torch.Tensor, top: int) -> torch.Tensor:
    """(R, G, 1) squared error of the groups ``w`` (R, G, group) quantised with ``scale`` (R, G, 1)."""
    return _codes(w, scale, top).mul_(scale.float()).sub_(w).square_().sum(-1, keepdim=True)


def dequantised(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """(O, I) float32 values of ``quantise``'s codes (O, I) and scales (O, I / group)."""
    group = codes.shape[1] // scales.shape[1]
    return (codes.float().reshape(*scales.shape, group) * scales.float()[..., None]).reshape(codes.shape)


def quantised(weight: torch.Tensor, bits: int = BITS, group: int = GROUP,
              scales: str = UNNAMED_SCALES) -> torch.Tensor:
    """``weight`` (O, I) through ``quantise`` and back: the copy's values, float32 (O, I)."""
    return dequantised(*quantise(weight, bits, group, scales))


def bytes_per_weight(bits: int = BITS, group: int = GROUP) -> float:
    """Bytes the copy stores per weight: its code and its share of a float16 scale."""
    return (bits + 16 / group) / 8


PACK_BLOCK = 64  # outputs per block of the packed copy (native_gather.c's Q4_BLOCK)


def packed(pairs: list[tuple[torch.Tensor, torch.Tensor]], bits: int,
           group: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The copy of several projections reading one input (gate and up: ``quantise``'s (codes, scales) of each) in the
    native kernel's blocked layout (native_gather.c, ``clada_q4_estimate``), their outputs one after the other:
    codes (W / 64, I, 32) uint8 (per channel and block eight little-endian 32-bit words, nibble k of word l the code
    + 8 of output 8k + l), scales (W / 64, I / 32, 64) float16; on the CPU. None where the kernel cannot read it (not
    4 bits in groups of 32, W not a multiple of 64)."""
    codes = torch.cat([c for c, _ in pairs]).cpu()
    scales = torch.cat([s for _, s in pairs]).cpu()
    width, channels = codes.shape
    if bits != 4 or group != 32 or width % PACK_BLOCK:
        return None
    nibbles = (codes.T.to(torch.int64) + 8).reshape(channels, width // PACK_BLOCK, 8, 8).permute(1, 0, 2, 3)
    words = (nibbles << (4 * torch.arange(8)).view(8, 1)).sum(2)  # word l: nibble k = output 8k + l of the block
    code_bytes = words.to(torch.int32).contiguous().view(torch.uint8)  # little-endian, as the kernel reads them
    scale_blocks = scales.T.reshape(channels // group, width // PACK_BLOCK, PACK_BLOCK).permute(1, 0, 2).contiguous()
    return code_bytes, scale_blocks


def unpacked(code_bytes: torch.Tensor, scale_blocks: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``packed``'s copy back as ``quantise``'s int8 codes (W, I) and float16 scales (W, I / group), the projections'
    outputs one after the other."""
    blocks, channels, _ = code_bytes.shape
    words = code_bytes.contiguous().view(torch.int32).to(torch.int64)  # (W / 64, I, 8)
    nibbles = (words.unsqueeze(2) >> (4 * torch.arange(8)).view(8, 1)) & 15  # (W / 64, I, 8 (k), 8 (l))
    codes = (nibbles - 8).permute(0, 2, 3, 1).reshape(blocks * PACK_BLOCK, channels).to(torch.int8)
    scales = scale_blocks.permute(0, 2, 1).reshape(blocks * PACK_BLOCK, channels // group)
    return codes, scales


class LowBitCopy:
    """The copies of gate and up of every layer of a gated MLP model (``quantise`` with ``scales``): packed for the
    native kernel (``packed``: per layer (codes, scales), or None where the kernel cannot read them; such a layer's
    codes are kept as they are, ``unpackable``), and dequantised where the masked reference computes the estimate h~
    (``estimate``; made then from the packed copy, per layer, in the dtype and on the device of the call, so that a
    model decoding on the native step keeps only the packed copy). ``layers``: the layers copied (default: all; the
    others have neither packed nor unpackable codes)."""

    def __init__(self, adapter: MLPAdapter, parts: list[MLPParts], bits: int = BITS, group: int = GROUP,
                 scales: str = UNNAMED_SCALES, layers: list[int] | None = None):
        if not adapter.gated or any(len(p.in_names) != 2 for p in parts):
            raise ValueError("the predictor rule needs a gated MLP with separate gate and up projections "
                             f"({type(adapter).__name__} has none)")
        self.adapter, self.parts, self.bits, self.group, self.scales = adapter, parts, bits, group, scales
        self.bytes_per_weight = bytes_per_weight(bits, group)
        self.packed, self.unpackable = [], []  # per layer: the packed copy, or (codes, scales) of gate and up
        copied = set(range(len(parts)) if layers is None else layers)
        for layer in range(len(parts)):
            pairs = [quantise(w, bits, group, scales) for w in self._weights(layer)] if layer in copied else None
            self.packed.append(None if pairs is None else packed(pairs, bits, group))
            self.unpackable.append(pairs if self.packed[-1] is None else None)
        self.copies: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(parts)  # made by ``estimate``

    def _weights(self, layer: int) -> list[torch.Tensor]:
        part = self.parts[layer]
        return [self.adapter.weight(getattr(part.owner, n)) for n in part.in_names]

    def _pairs(self, layer: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``quantise``'s (codes, scales) of the layer's gate and up."""
        if self.packed[layer] is None:
            return self.unpackable[layer]
        codes, scales = unpacked(*self.packed[layer], self.group)
        rows = [w.shape[0] for w in self._weights(layer)]
        return list(zip(codes.split(rows), scales.split(rows)))

    def share_of_input_bytes(self, element_size: int) -> float:
        """The copy's bytes over the bytes of the gate and up it copies, for weights of ``element_size`` bytes."""
        return self.bytes_per_weight / element_size

    def estimate(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """h~ (..., I) float32 of MLP inputs ``x`` (..., D) (the skipped input channels already zero)."""
        copies = self.copies[layer]
        if copies is None or copies[0].device != x.device or copies[0].dtype != x.dtype:
            copies = self.copies[layer] = tuple(dequantised(*q).to(x.device, x.dtype) for q in self._pairs(layer))
        gate, up = copies
        act = getattr(self.parts[layer].owner, self.adapter.act_name)
        return (act(x @ gate.T) * (x @ up.T)).float()
