"""Thresholded MLP projections: skip input channels and intermediate neurons whose score is below threshold.

Per decoder layer l and token t, with threshold multiplier ``scale[t]`` (1 = base, <1 = relaxed):
- the MLP input x (shape (..., D)) keeps channel i iff |x_i| * channel_scale_in[l, i] > tau_in[l] * scale[t];
- the intermediate h (shape (..., I)) keeps neuron j iff |h_j| * channel_scale_mid[l, j] > tau_mid[l] * scale[t].
A skipped input channel means column i of every input projection (gate/up, fc1) is never needed; a skipped
neuron means column j of the output projection (down, fc2). This module is the masked reference: it zeroes
the skipped entries and calls the original projection, so results equal what a gathering kernel computes.
"""

from __future__ import annotations

import torch
from torch import nn

SIDES = ("in", "mid")


class SparsityState:
    """Thresholds, the current per-token threshold multiplier and running statistics of one patched model.

    ``scale`` is None (dense: prefill, or disabled) or a tensor broadcastable to the token shape, e.g.
    (B, 1) while decoding or (B, T) when a caller sets multipliers for a whole sequence.
    """

    def __init__(self, tau_in: torch.Tensor, tau_mid: torch.Tensor, in_bytes: list[float], mid_bytes: list[float]):
        self.tau = {"in": tau_in.float(), "mid": tau_mid.float()}
        self.bytes = {"in": torch.tensor(in_bytes, dtype=torch.float64), "mid": torch.tensor(mid_bytes, dtype=torch.float64)}
        self.scale: torch.Tensor | None = None
        self.reset_stats()

    @property
    def num_layers(self) -> int:
        return int(self.tau["in"].shape[0])

    def to(self, device: torch.device) -> None:
        self.tau = {k: v.to(device) for k, v in self.tau.items()}
        self.reset_stats(device)

    def reset_stats(self, device: torch.device | None = None) -> None:
        """Zero the accumulators: per layer and side, [tokens seen, sum of skipped-channel fractions]."""
        device = device or self.tau["in"].device
        self.skipped = {side: torch.zeros(self.num_layers, 2, dtype=torch.float64, device=device) for side in SIDES}
        self.relaxed = torch.zeros(2, dtype=torch.float64, device=device)  # [decode tokens, relaxed tokens]

    def record(self, side: str, layer: int, keep: torch.Tensor) -> None:
        """Accumulate one call's mask ``keep`` (..., C) without synchronising with the host."""
        frac = 1.0 - keep.sum(-1, dtype=torch.float64) / keep.shape[-1]
        acc = self.skipped[side][layer]
        acc[0] += frac.numel()
        acc[1] += frac.sum()

    def summary(self) -> dict:
        """Realised figures since the last reset (floats; synchronises once)."""
        out: dict = {}
        share = {}
        for side in SIDES:
            acc = self.skipped[side].cpu()
            share[side] = torch.where(acc[:, 0] > 0, acc[:, 1] / acc[:, 0].clamp_min(1), torch.zeros(()))
        total = self.bytes["in"] + self.bytes["mid"]
        reads = (share["in"] * self.bytes["in"] + share["mid"] * self.bytes["mid"]) / total
        tokens = float(self.skipped["mid"][:, 0].max().cpu()) if self.num_layers else 0.0
        relaxed = self.relaxed.cpu()
        out["tokens"] = int(tokens)
        out["mlp_sparsity"] = float(share["mid"].mean())
        out["input_sparsity"] = float(share["in"].mean())
        out["mlp_reads_saved"] = float((reads * total).sum() / total.sum())
        out["relaxed_share"] = float(relaxed[1] / relaxed[0]) if relaxed[0] > 0 else 0.0
        out["per_layer"] = {
            "input_sparsity": [round(float(v), 5) for v in share["in"]],
            "mlp_sparsity": [round(float(v), 5) for v in share["mid"]],
            "mlp_reads_saved": [round(float(v), 5) for v in reads],
        }
        return out


class ChannelGate(nn.Module):
    """Zeroes the channels of an activation whose score is below the layer's (scaled) threshold."""

    def __init__(self, state: SparsityState, layer: int, side: str, channel_scale: torch.Tensor):
        super().__init__()
        self.state, self.layer, self.side = state, layer, side
        self.register_buffer("channel_scale", channel_scale.float(), persistent=False)
        self._last_input: torch.Tensor | None = None
        self._last_output: torch.Tensor | None = None

    def keep_mask(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """Boolean mask (..., C): True where the channel is computed."""
        threshold = (self.state.tau[self.side][self.layer] * scale).reshape(x.shape[:-1]).unsqueeze(-1)
        return x.abs().float() * self.channel_scale > threshold

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.state.scale
        if scale is None:
            return x
        if x is self._last_input:  # gate_proj and up_proj read the same tensor: mask once
            return self._last_output
        keep = self.keep_mask(x, scale)
        self.state.record(self.side, self.layer, keep)
        out = x * keep.to(x.dtype)
        self._last_input, self._last_output = x, out
        return out


class GatedProjection(nn.Module):
    """Wraps an MLP projection; its input passes through a ChannelGate first. ``inner`` is the original."""

    def __init__(self, inner: nn.Module, gate: ChannelGate):
        super().__init__()
        self.inner = inner
        self.gate = gate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(self.gate(x))
