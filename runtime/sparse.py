"""Thresholded MLP projections: skip input channels and intermediate neurons whose score is below threshold.

Per decoder layer l and token t, with threshold multiplier ``scale[t]`` (1 = base, <1 = relaxed):
- the MLP input x (shape (..., D)) keeps channel i iff |x_i| * channel_scale_in[l, i] > tau_in[l] * scale[t];
- the intermediate h (shape (..., I)) keeps neuron j iff |h_j| * channel_scale_mid[l, j] > tau_mid[l] * scale[t].
A skipped input channel means column i of every input projection (gate/up, fc1) is never needed; a skipped
neuron means column j of the output projection (down, fc2).

Two execution paths compute the same function:
- the masked reference (``ChannelGate.forward``) zeroes the skipped entries and calls the original projection;
  it reads every weight and serves prefill-shaped inputs (several tokens per row) and ``fast=False``;
- the gathering fast path (``GatedProjection`` with ``rows_of``), used for calls of few token rows (decode): each
  projection's weight is stored transposed, (in_features, out_features) contiguous, so the weights of one input
  channel are one contiguous row; only the active rows are summed, scaled by the active activations. Skipped
  rows are never read. On CPU the compiled kernel of ``runtime.native`` selects and sums in one call,
  reading each row needed by any token row once; elsewhere (other devices, no compiler)
  ``embedding_bag`` sums one bag per token row. The Linear modules keep working on a transposed view of the
  same storage (no copy is kept), and ``runtime.remove`` restores the original layout.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn
from torch.nn import functional as F

from clada.runtime import native

SIDES = ("in", "mid")
PATHS = ("compiled", "embedding_bag", "masked")  # how the thresholded products of one gate input were computed


class Selection(NamedTuple):
    """Active channels of a decode step in ``embedding_bag`` form (one bag per token row).

    indices: (K,) int64 channel ids of all rows, concatenated; offsets: (N * split,) start of each bag in
    ``indices``; weights: (K,) the activations at those channels (the per-sample weights of the bag sum).
    A single row is cut into ``split`` bags (summed afterwards) so that every CPU thread streams weights.
    """

    indices: torch.Tensor
    offsets: torch.Tensor
    weights: torch.Tensor
    split: int


class SparsityState:
    """Thresholds, the current per-token threshold multiplier and running statistics of one patched model.

    ``scale`` is None (dense: prefill, or disabled) or a tensor broadcastable to the token shape, e.g.
    (B, 1) while decoding or (B, T) when a caller sets multipliers for a whole sequence.
    """

    def __init__(self, tau_in: torch.Tensor, tau_mid: torch.Tensor, in_bytes: list[float], mid_bytes: list[float]):
        self.tau = {"in": tau_in.float(), "mid": tau_mid.float()}
        self.bytes = {"in": torch.tensor(in_bytes, dtype=torch.float64), "mid": torch.tensor(mid_bytes, dtype=torch.float64)}
        self.scale: torch.Tensor | None = None
        self.fast = True  # gather active weight rows on decode steps (False: masked reference everywhere)
        self.native = True  # use the compiled CPU kernel where it applies (False: embedding_bag everywhere)
        self.fast_max_rows = 8  # token rows per call (batch x new tokens) up to which the fast path is used
        self.row_split = max(1, torch.get_num_threads())  # bags a single row is cut into (parallel streams)
        self._row_thresholds: dict = {}
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
        self.skipped_host = {side: [[0, 0.0] for _ in range(self.num_layers)] for side in SIDES}  # fast path
        self.relaxed = torch.zeros(2, dtype=torch.float64, device=device)  # [decode tokens, relaxed tokens]
        self.path_calls = dict.fromkeys(PATHS, 0)  # gate inputs (layer, side, call) per execution path

    def record(self, side: str, layer: int, keep: torch.Tensor) -> None:
        """Accumulate one call's mask ``keep`` (..., C) without synchronising with the host."""
        frac = 1.0 - keep.sum(-1, dtype=torch.float64) / keep.shape[-1]
        acc = self.skipped[side][layer]
        acc[0] += frac.numel()
        acc[1] += frac.sum()

    def row_thresholds(self, side: str) -> torch.Tensor:
        """(L, rows, 1) thresholds of the current step, tau[side][l] * scale[row], computed once per step."""
        key = (self.scale, self.tau[side]._version)
        cached = self._row_thresholds.get(side)
        if cached is None or cached[0][0] is not key[0] or cached[0][1] != key[1]:
            cached = (key, self.tau[side].view(-1, 1, 1) * self.scale.reshape(1, -1, 1).float())
            self._row_thresholds[side] = cached
        return cached[1]

    def record_counts(self, side: str, layer: int, rows: int, kept: int, channels: int) -> None:
        """Accumulate a fast-path call: ``kept`` active channels in total over ``rows`` rows of ``channels``."""
        self.skipped_host[side][layer][0] += rows
        self.skipped_host[side][layer][1] += rows - kept / channels

    def summary(self) -> dict:
        """Realised figures since the last reset (floats; synchronises once)."""
        out: dict = {}
        share, tokens = {}, 0.0
        for side in SIDES:
            acc = self.skipped[side].cpu() + torch.tensor(self.skipped_host[side], dtype=torch.float64).view(-1, 2)
            share[side] = torch.where(acc[:, 0] > 0, acc[:, 1] / acc[:, 0].clamp_min(1), torch.zeros(()))
            tokens = max(tokens, float(acc[:, 0].max())) if self.num_layers else 0.0
        total = self.bytes["in"] + self.bytes["mid"]
        reads = (share["in"] * self.bytes["in"] + share["mid"] * self.bytes["mid"]) / total
        relaxed = self.relaxed.cpu()
        out["tokens"] = int(tokens)
        out["mlp_sparsity"] = float(share["mid"].mean())
        out["input_sparsity"] = float(share["in"].mean())
        out["mlp_reads_saved"] = float((reads * total).sum() / total.sum())
        out["relaxed_share"] = float(relaxed[1] / relaxed[0]) if relaxed[0] > 0 else 0.0
        out["path_calls"] = dict(self.path_calls)
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
        self._last_input: torch.Tensor | None = None  # masked reference: last input and its masked copy
        self._last_output: torch.Tensor | None = None
        self._last_selected: torch.Tensor | None = None  # fast path: last input and its Selection
        self._last_selection: Selection | None = None
        self._last_counted: torch.Tensor | None = None  # compiled kernel: last input whose kept count was recorded

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
        self.state.path_calls["masked"] += 1
        out = x * keep.to(x.dtype)
        self.__dict__.update(_last_input=x, _last_output=out)
        return out

    def _row_starts(self, rows: int, channels: int, device: torch.device) -> torch.Tensor:
        """(rows,) int64 flat position of each row's first channel, row * channels (cached)."""
        starts = getattr(self, "_starts", None)
        if starts is None or starts.shape[0] != rows or starts.device != device:
            starts = self._starts = torch.arange(rows, device=device) * channels
        return starts

    def select(self, x: torch.Tensor) -> Selection:
        """The active channels of ``x`` (N rows of C, any leading shape) for the gathering fast path."""
        if x is self._last_selected:  # gate_proj and up_proj read the same tensor: select once
            return self._last_selection
        flat = x.reshape(-1, x.shape[-1])
        rows, channels = flat.shape
        threshold = self.state.row_thresholds(self.side)[self.layer]  # (rows, 1)
        keep = flat.abs().mul_(self.channel_scale) > threshold
        where = keep.view(-1).nonzero().squeeze(1)  # flat positions row * C + channel, ascending
        split = 1
        if rows == 1:
            indices, split = where, self.state.row_split
            offsets = torch.arange(split, dtype=torch.long, device=x.device) * -(-where.numel() // split)
        else:  # few ops: each costs microseconds of dispatch, more than its arithmetic on a decode step
            indices = where % channels
            offsets = torch.searchsorted(where, self._row_starts(rows, channels, x.device))
        selection = Selection(indices, offsets, flat.view(-1).index_select(0, where), split)
        self.state.record_counts(self.side, self.layer, rows, where.numel(), channels)
        self.state.path_calls["embedding_bag"] += 1
        self.__dict__.update(_last_selected=x, _last_selection=selection)  # nn.Module.__setattr__ costs ~7 us
        return selection

    def gather(self, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """(N, out) for ``x`` (N token rows of C, any leading shape) and weight ``rows`` (C, out): each token
        row's sum over its kept channels of activation * weight row (the decode-step product)."""
        kernel = native.gather_kernel() if self.state.native else None
        if kernel is None or not kernel.accepts(x, rows):
            return _gather_sum(self.select(x), rows)
        flat = x.reshape(-1, x.shape[-1]).contiguous()
        thresholds = self.state.row_thresholds(self.side)[self.layer]  # (rows, 1), or (1, 1) to broadcast
        if thresholds.numel() != flat.shape[0]:
            thresholds = torch.broadcast_to(thresholds, (flat.shape[0], 1)).contiguous()
        scale = self.channel_scale if self.channel_scale.dtype == torch.float32 else self.channel_scale.float()
        out, kept = kernel(flat, scale, thresholds, rows)
        if x is not self._last_counted:  # gate_proj and up_proj with their own rows: count the input once
            self.state.record_counts(self.side, self.layer, flat.shape[0], kept, flat.shape[1])
            self.state.path_calls["compiled"] += 1
            self.__dict__["_last_counted"] = x
        return out


class RowGroup:
    """Input projections of one MLP reading the same input (gate and up), whose (in_features, out_features)
    weights ``runtime.apply`` lays out as column blocks of one buffer (in_features, sum of out_features).

    A decode step then sums each active channel's whole buffer row once for all members: one
    ``embedding_bag`` call over rows twice as long instead of two calls (fewer dispatches, longer contiguous
    reads). Members are looked up through ``rows_of`` at each step; if the buffer is no longer shared (e.g. the
    parameters were moved one by one), ``full_rows`` returns None and each member gathers its own rows.
    """

    def __init__(self, members: list[nn.Module], rows_of: Callable[[nn.Module], torch.Tensor]):
        self.members, self.rows_of = members, rows_of
        self._key: tuple | None = None
        self._full: torch.Tensor | None = None
        self._last_input: torch.Tensor | None = None
        self._last_output: torch.Tensor | None = None
        widths = [rows_of(m).shape[1] for m in members]
        self.bounds = [(sum(widths[:i]), sum(widths[: i + 1])) for i in range(len(widths))]

    def full_rows(self) -> torch.Tensor | None:
        """(in_features, sum of out_features) view of the shared buffer, or None if it is not shared."""
        rows = [self.rows_of(m) for m in self.members]
        key = tuple((r.data_ptr(), r.shape, r.stride()) for r in rows)
        if key != self._key:
            first, total = rows[0], self.bounds[-1][1]
            shared = all(r.stride() == (total, 1) and r.shape[0] == first.shape[0] and r.dtype == first.dtype
                         and r.device == first.device
                         and r.data_ptr() == first.data_ptr() + a * first.element_size()
                         for r, (a, _) in zip(rows, self.bounds))
            self._full = first.as_strided((first.shape[0], total), (total, 1)) if shared else None
            self._key, self._last_input = key, None
        return self._full

    def output(self, x: torch.Tensor, gate: ChannelGate, member: int) -> torch.Tensor | None:
        """(N, out_features of ``member``) output of member ``member`` for input ``x`` (computed once for all)."""
        if x is not self._last_input:
            full = self.full_rows()
            if full is None:
                return None
            self._last_output = gate.gather(x, full)
            self._last_input = x
        a, b = self.bounds[member]
        return self._last_output[:, a:b]


def _gather_sum(sel: Selection, rows: torch.Tensor) -> torch.Tensor:
    """(N, out) sum over each row's active channels of activation * weight row (the decode-step product)."""
    out = F.embedding_bag(sel.indices, rows, sel.offsets, mode="sum", per_sample_weights=sel.weights)
    return out.sum(0, keepdim=True) if sel.split > 1 else out


class GatedProjection(nn.Module):
    """Wraps an MLP projection; its input passes through a ChannelGate first. ``inner`` is the original.

    ``rows_of(inner)`` returns the projection's weight as (in_features, out_features) -- a view of the storage
    the inner module computes with, read at each call so that ``model.to(...)`` stays coherent -- or None where
    only the masked reference is available. The fast path needs those rows contiguous (see ``apply``).
    """

    def __init__(self, inner: nn.Module, gate: ChannelGate,
                 rows_of: Callable[[nn.Module], torch.Tensor] | None = None,
                 group: RowGroup | None = None, member: int = 0):
        super().__init__()
        self.inner = inner
        self.gate = gate
        self.rows_of = rows_of
        self.group, self.member = group, member  # plain attributes: the group is shared, not a submodule

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        state = self.gate.state
        if state.scale is None:
            return self.inner(x)
        if self.rows_of is None or not state.fast or x.numel() > state.fast_max_rows * x.shape[-1]:
            return self.inner(self.gate(x))
        out = None
        if self.group is not None:
            out = self.group.output(x, self.gate, self.member)
        if out is None:
            rows = self.rows_of(self.inner)
            if not rows.is_contiguous():
                return self.inner(self.gate(x))
            out = self.gate.gather(x, rows)
        bias = getattr(self.inner, "bias", None)
        if bias is not None:
            out = out + bias
        return out.reshape(*x.shape[:-1], out.shape[-1])
