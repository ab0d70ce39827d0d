"""Gated MLP modules: a patched model's projections (and, for CATS, activations) ask the artifact's sparsity
rule (``runtime.rules``) which channels a call keeps, and a kernel backend (``runtime.backends``) computes
the product over those only.

Per decoder layer l and token row t, with threshold multiplier ``m[t]`` (1 = base, < 1 = relaxed; None while
a call runs dense: prefill, or ``runtime.dense``), the rule's keep mask selects the MLP input channels (the
columns of gate/up, fc1) and the intermediate neurons (the columns of down, fc2) a call uses.

Two kinds of execution compute the same function:
- the masked reference (backend ``masked``): the skipped entries are zeroed and the original projection is
  called (it reads every weight); it serves prefill-shaped sparse calls and rules without a threshold form;
- gathering backends (decode-shaped calls of few token rows): each projection's weight is stored as
  contiguous input-channel rows (``runtime.layout``) and only the kept rows are summed; skipped rows are never
  read. Gate and up share one row buffer, so a kept input channel's row is read once for both.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
from torch import nn
from torch.nn.modules import module as torch_module

from .backends import DENSE, MASKED, PATH_NAMES, BackendChooser
from .calls import CallState
from .rules import ATTENTION_SIDES, SIDES, SPARSITY_KEYS, SparsityRule, centred, threshold_keep
from .selection import choose_wide_product, wide_product

DENSITY_ROWS = 16  # token rows at the end of a dense call whose keep shares estimate a side's density
# runtime.stats()["decode_steps"]: sparse decode calls, their token positions (rows x new tokens), and those of calls
# feeding several new tokens per row on top of a cache (speculative verification, chunked decoding)
DECODE_STEP_COUNTS = ("calls", "positions", "multi_token_calls", "multi_token_positions")


def row_multipliers(multiplier: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(..., 1) float32 multiplier of each token row of ``x`` (..., C).

    ``multiplier``: one value (any shape), one per token row (e.g. (B, T) for x (B, T, C) or (B*T, C)), or one
    per sequence (B, 1) that the sequence's T rows share.
    """
    rows = x.numel() // x.shape[-1]
    m = multiplier.float()
    if m.numel() == rows:
        return m.reshape(*x.shape[:-1], 1)
    if m.numel() == 1:
        return m.reshape([1] * x.dim())
    if rows % m.numel() == 0:
        return m.reshape(-1, 1).repeat_interleave(rows // m.numel(), 0).reshape(*x.shape[:-1], 1)
    raise ValueError(f"threshold multiplier of {m.numel()} values does not fit a call of {rows} token rows")


class SparsityState:
    """The rule, backend choices, current multiplier and running statistics of one patched model.

    ``multiplier`` is None (dense) or a tensor (see ``row_multipliers``). ``side_bytes``: per side, per layer, the
    weight bytes a decode step reads in the projections reading that side's input (``in``: gate/up; ``mid``: down;
    ``attn_in``: q/k/v; ``attn_out``: o); ``decode_bytes``: those of the whole model
    (``MLPAdapter.decode_weight_bytes``; 0: unknown, no ``reads_saved``).
    """

    def __init__(self, rule: SparsityRule, chooser: BackendChooser, side_bytes: dict[str, list[float]],
                 gated: bool, decode_bytes: float = 0.0):
        self.rule, self.chooser = rule, chooser
        self.decode_bytes = decode_bytes
        self.num_layers = len(side_bytes["in"])
        self.bytes = {side: torch.tensor(b, dtype=torch.float64) for side, b in side_bytes.items()}
        self.gated = gated
        self.call = CallState()  # per thread: multiplier, batch, observing, signals (runtime.calls)
        self.density_wanted = False  # dense calls estimate each side's density for the measured backend choice
        self.density = {side: [0.0, 0] for side in SIDES}  # side -> [sum of per-layer keep shares, layers seen]
        self.dense_sides: frozenset[str] = frozenset()  # sides whose original modules run (runtime.routing)
        self.reset_stats()

    @property
    def multiplier(self) -> torch.Tensor | None:
        """The calling thread's threshold multiplier (None: its call runs dense)."""
        return self.call.multiplier

    @multiplier.setter
    def multiplier(self, value: torch.Tensor | None) -> None:
        self.call.multiplier = value

    def step_thresholds(self, layer: int, side: str, x: torch.Tensor) -> torch.Tensor:
        """(N, 1) float32 thresholds tau_base[layer] * m of the calling thread's step for the N token rows of ``x``
        (N, C): ``rule.step_tau_all`` of the side's every layer, computed once per step (multiplier), side and row
        count instead of once per call (two tensor operations fewer per gathered call)."""
        call, rule = self.call, self.rule
        m, n, version = call.multiplier, x.shape[0], rule.tau_version
        cached = call.thresholds
        if cached is None or cached[0] is not m or cached[1] != n or cached[2] != version:
            cached = call.thresholds = (m, n, version, {})
        per_layer = cached[3].get(side)
        if per_layer is None:
            per_layer = cached[3][side] = rule.step_tau_all(side, row_multipliers(m, x))
        return per_layer[layer]

    def to(self, device: torch.device) -> None:
        self.rule.to(device)
        self.reset_stats(device)

    def reset_stats(self, device: torch.device | None = None) -> None:
        """Zero the accumulators: per layer and side, [token rows seen, sum of skipped-channel fractions]."""
        device = device or self.rule.tau["in"].device
        self.skipped = {side: torch.zeros(self.num_layers, 2, dtype=torch.float64, device=device) for side in SIDES}
        self.skipped_host = {side: [[0, 0.0] for _ in range(self.num_layers)] for side in SIDES}
        # backends that count into a device counter (``counts_into``): kept pairs per layer on the device, the
        # token rows and channels of those calls on the host; one 0-dim view per layer, made once
        self.kept_counts = {side: torch.zeros(self.num_layers, dtype=torch.int64, device=device) for side in SIDES}
        self.kept_counters = {side: list(self.kept_counts[side].unbind(0)) for side in SIDES}
        self.counted = {side: [[0, 1] for _ in range(self.num_layers)] for side in SIDES}  # [rows, channels]
        self.dense_rows = dict.fromkeys(SIDES, 0)  # token rows every layer of a side ran in pass-through
        self.dense_layer_rows = {side: [0] * self.num_layers for side in SIDES}  # per layer: rows a step ran dense
        self.relaxed = torch.zeros(2, dtype=torch.float64, device=device)  # [decode tokens, relaxed tokens]
        self.path_calls = dict.fromkeys(PATH_NAMES, 0)
        self.decode_steps = dict.fromkeys(DECODE_STEP_COUNTS, 0)

    def record_decode_step(self, rows: int, positions: int) -> None:
        """Count a sparse decode call of ``rows`` sequences of ``positions`` new tokens each."""
        steps = self.decode_steps
        steps["calls"] += 1
        steps["positions"] += rows * positions
        if positions > 1:
            steps["multi_token_calls"] += 1
            steps["multi_token_positions"] += rows * positions

    @property
    def passing_through(self) -> bool:
        """Whether every side the rule sparsifies runs its original modules (nothing is skipped)."""
        return bool(self.dense_sides) and self.dense_sides.issuperset(self.rule.sides)

    def record_dense_step(self, rows: int) -> None:
        """Count ``rows`` token rows of a decode call on the sides in pass-through: every layer, nothing skipped."""
        for side in self.dense_sides:
            self.dense_rows[side] += rows
            self.path_calls[DENSE.name] += self.num_layers

    def record_dense_layer(self, layer: int, rows: int, sides: tuple[str, ...] = ("in", "mid")) -> None:
        """Count ``rows`` token rows of a decode call that ``layer`` ran dense on ``sides`` (nothing skipped, nothing
        of the rule read: a decode step that measured the dense product faster, ``runtime.predictor_step``)."""
        for side in sides:
            self.dense_layer_rows[side][layer] += rows
        self.path_calls[DENSE.name] += 1

    def record_mask(self, side: str, layer: int, keep: torch.Tensor) -> None:
        """Accumulate one call's keep mask (..., C) without synchronising with the host."""
        frac = 1.0 - keep.sum(-1, dtype=torch.float64) / keep.shape[-1]
        acc = self.skipped[side][layer]
        acc[0] += frac.numel()
        acc[1] += frac.sum()

    def record_counted(self, side: str, layer: int, rows: int, channels: int) -> None:
        """Accumulate a gathering call whose backend added its kept pairs to ``kept_counters[side][layer]``."""
        acc = self.counted[side][layer]
        acc[0] += rows
        acc[1] = channels

    def record_kept(self, side: str, layer: int, rows: int, kept: int | torch.Tensor, channels: int) -> None:
        """Accumulate a gathering call: ``kept`` (row, channel) pairs kept over ``rows`` rows of ``channels``."""
        if isinstance(kept, torch.Tensor):
            acc = self.skipped[side][layer]
            acc[0] += rows
            acc[1] += rows - kept.double() / channels
        else:
            acc = self.skipped_host[side][layer]
            acc[0] += rows
            acc[1] += rows - kept / channels

    def observe_density(self, side: str, layer: int, x: torch.Tensor) -> None:
        """Add the share of channels the last ``DENSITY_ROWS`` token rows of a dense call's ``x`` (..., C) keep at
        the base thresholds (multiplier 1) to ``density`` (a float; on CUDA this synchronises, during prefill)."""
        rows = centred(x.reshape(-1, x.shape[-1])[-DENSITY_ROWS:], self.rule.center(layer, side, x.dtype))
        keep = threshold_keep(rows, self.rule.channel_weight(layer, side), self.rule.step_tau(layer, side, torch.ones(
            (), device=rows.device)))
        acc = self.density[side]
        acc[0] += float(keep.float().mean())
        acc[1] += 1

    def expected_density(self, side: str, default: float) -> float:
        """Mean keep share of ``side`` seen in dense calls since apply, or ``default`` if none was seen."""
        total, seen = self.density[side]
        return total / seen if seen else default

    def record_multiplier(self, multiplier: torch.Tensor) -> None:
        """Count the tokens of a multiplier and those relaxed (m < 1), on the device."""
        self.relaxed[0] += multiplier.numel()
        self.relaxed[1] += (multiplier < 1).sum()

    def summary(self) -> dict:
        """Realised figures since the last reset (floats; synchronises once). Under concurrent callers the counts
        are approximate (unlocked increments)."""
        share, ran, tokens = {}, {}, 0.0  # per side and layer: skipped share, share of rows the rule ran on
        for side in SIDES:
            acc = self.skipped[side].cpu() + torch.tensor(self.skipped_host[side], dtype=torch.float64).view(-1, 2)
            counted = torch.tensor(self.counted[side], dtype=torch.float64).view(-1, 2)
            acc[:, 0] += counted[:, 0]
            acc[:, 1] += counted[:, 0] - self.kept_counts[side].cpu().double() / counted[:, 1]
            ruled = acc[:, 0].clone()
            acc[:, 0] += self.dense_rows[side] + torch.tensor(self.dense_layer_rows[side], dtype=torch.float64)
            share[side] = torch.where(acc[:, 0] > 0, acc[:, 1] / acc[:, 0].clamp_min(1), torch.zeros(()))
            ran[side] = torch.where(acc[:, 0] > 0, ruled / acc[:, 0].clamp_min(1), torch.zeros(()))
            tokens = max(tokens, float(acc[:, 0].max())) if self.num_layers else 0.0
        total = self.bytes["in"] + self.bytes["mid"]
        saved = self.rule.mlp_bytes_saved(share["in"], share["mid"], ran["in"], self.bytes["in"], self.bytes["mid"],
                                          self.gated)
        reads = saved / total
        attn = {side: share[side] * self.bytes[side] for side in ATTENTION_SIDES if side in self.bytes}
        attn_saved = float(sum(float(v.sum()) for v in attn.values()))
        relaxed = self.relaxed.cpu()
        return {
            "rule": self.rule.name,
            "tokens": int(tokens),
            # per side (the attention sides: None where the artifact leaves attention dense)
            **{key: float(share[side].mean()) if side in self.bytes else None for side, key in SPARSITY_KEYS.items()},
            "mlp_reads_saved": float(saved.sum() / total.sum()),
            "attention_reads_saved": attn_saved / sum(float(self.bytes[s].sum()) for s in attn) if attn else None,
            # over every weight byte a decode step reads (attention, MLP, head); the MLP's share of them
            "reads_saved": float(saved.sum() + attn_saved) / self.decode_bytes if self.decode_bytes else None,
            "mlp_weight_share": float(total.sum() / self.decode_bytes) if self.decode_bytes else None,
            "relaxed_share": float(relaxed[1] / relaxed[0]) if relaxed[0] > 0 else 0.0,
            "path_calls": dict(self.path_calls),
            "decode_steps": dict(self.decode_steps),
            "backends": self.chooser.summary(),
            "selection": self.chooser.selection(),
            "per_layer": {
                "input_sparsity": [round(float(v), 5) for v in share["in"]],
                "mlp_sparsity": [round(float(v), 5) for v in share["mid"]],
                "mlp_reads_saved": [round(float(v), 5) for v in reads],
            },
        }


class ChannelGate(nn.Module):
    """Asks the rule which channels of one layer's side a call keeps; zeroes the others (masked reference)
    or hands them to a gathering backend. Gate and up read the same tensor: its result is computed once."""

    def __init__(self, state: SparsityState, layer: int, side: str):
        super().__init__()
        self.state, self.layer, self.side = state, layer, side
        self._last: tuple | None = None  # masked reference: (last input, its masked copy), one attribute: thread-safe
        self._last_counted: torch.Tensor | None = None  # gathering: last input whose kept count was recorded
        # dense calls: a weak reference to the last input shown (gate and up share it); a strong one would keep every
        # layer's prefill activations alive until the next call (at 8192 tokens the patched prefill took 1.29x dense)
        self._observed: weakref.ref | None = None
        self._center_terms: dict = {}  # compensation: weight rows' key -> (out,) projection of the center

    def observe(self, x: torch.Tensor) -> None:
        """A dense call: show the rule the activations if it watches the prefill, and estimate the side's
        density while the backend choice waits for it."""
        st = self.state
        seen, call = self._observed, st.call
        if (seen is not None and seen() is x) or not (call.observing or st.density_wanted):
            return
        if call.observing and st.rule.observes_prefill:
            st.rule.observe_prefill(self.layer, self.side, x, call.batch, call.prompt_mask)
        if st.density_wanted and st.rule.threshold_form:
            st.observe_density(self.side, self.layer, x)
        self.__dict__["_observed"] = weakref.ref(x)

    def record_dense(self, x: torch.Tensor) -> None:
        """A decode call that the backend choice runs dense: nothing skipped (counted once per input)."""
        if x is not self._last_counted:
            st = self.state
            rows = x.numel() // x.shape[-1]
            st.record_kept(self.side, self.layer, rows, rows * x.shape[-1], x.shape[-1])
            st.path_calls[DENSE.name] += 1
            self.__dict__["_last_counted"] = x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        st = self.state
        if st.multiplier is None:
            self.observe(x)
            return x
        last = self._last
        if last is not None and last[0] is x:
            return last[1]
        keep = st.rule.keep(self.layer, self.side, x, row_multipliers(st.multiplier, x))
        st.record_mask(self.side, self.layer, keep)
        st.path_calls["masked"] += 1
        out = st.rule.masked(self.layer, self.side, x, keep)
        self.__dict__["_last"] = (x, out)  # nn.Module.__setattr__ costs ~7 us
        return out

    def gather(self, backend, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """(N, out) for ``x`` (N token rows of C, any leading shape) and weight ``rows`` (C, out) by ``backend``."""
        st, rule = self.state, self.state.rule
        center = rule.center(self.layer, self.side, x.dtype)
        flat = centred(x.reshape(-1, x.shape[-1]), center).contiguous()
        tau = st.step_thresholds(self.layer, self.side, flat)
        weight = rule.keep_weight(self.layer, self.side, flat)
        first = x is not self._last_counted  # gate and up gathering their own rows: count the input once
        if backend.counts_into:
            out, _ = backend.gather(flat, weight, tau, rows, st.kept_counters[self.side][self.layer] if first
                                    else None)
        else:
            out, kept = backend.gather(flat, weight, tau, rows)
        if center is not None:
            out = out + self.center_term(center, rows)
        if first:
            if backend.counts_into:
                st.record_counted(self.side, self.layer, flat.shape[0], flat.shape[1])
            else:
                st.record_kept(self.side, self.layer, flat.shape[0], kept, flat.shape[1])
            st.path_calls[backend.name] += 1
            self.__dict__["_last_counted"] = x
        return out


    def center_term(self, center: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """(out,) ``center`` (C,) times weight ``rows`` (C, out), in the rows' dtype (summed in float32): what the
        skipped channels stand for under compensation. Computed once per weight storage."""
        key = (rows.data_ptr(), tuple(rows.shape), rows.stride(), rows.dtype, rows.device)
        term = self._center_terms.get(key)
        if term is None:
            term = (center.to(rows.dtype).float() @ rows.float()).to(rows.dtype)
            terms = self._center_terms if len(self._center_terms) < 4 else {}  # old storages (model.to) drop out
            self.__dict__["_center_terms"] = {**terms, key: term}
        return term


class RowGroup:
    """Input projections of one MLP reading the same input (gate and up), whose (in_features, out_features)
    weights ``runtime.apply`` lays out as column blocks of one buffer (in_features, sum of out_features).

    A decode step then gathers each kept channel's whole buffer row once for all members. Members are looked
    up through ``rows_of`` at each step; if the buffer is no longer shared (e.g. the parameters were moved one
    by one), ``full_rows`` returns None and each member gathers its own rows.
    """

    def __init__(self, members: list[nn.Module], rows_of: Callable[[nn.Module], torch.Tensor]):
        self.members, self.rows_of = members, rows_of
        self._buffer: tuple | None = None  # (key of the members' rows, full buffer view or None)
        self._last: tuple | None = None  # (last input, its output for all members); one attribute each: thread-safe
        widths = [rows_of(m).shape[1] for m in members]
        self.bounds = [(sum(widths[:i]), sum(widths[: i + 1])) for i in range(len(widths))]

    def full_rows(self) -> torch.Tensor | None:
        """(in_features, sum of out_features) view of the shared buffer, or None if it is not shared."""
        rows = [self.rows_of(m) for m in self.members]
        key = tuple((r.data_ptr(), r.shape, r.stride()) for r in rows)
        known = self._buffer
        if known is not None and known[0] == key:
            return known[1]
        first, total = rows[0], self.bounds[-1][1]
        shared = all(r.stride() == (total, 1) and r.shape[0] == first.shape[0] and r.dtype == first.dtype
                     and r.device == first.device
                     and r.data_ptr() == first.data_ptr() + a * first.element_size()
                     for r, (a, _) in zip(rows, self.bounds))
        full = first.as_strided((first.shape[0], total), (total, 1)) if shared else None
        self._last, self._buffer = None, (key, full)
        return full

    def output(self, backend, x: torch.Tensor, gate: ChannelGate, member: int) -> torch.Tensor | None:
        """(N, out_features of ``member``) output of member ``member`` for input ``x`` (computed once for all)."""
        last = self._last
        if last is None or last[0] is not x:
            full = self.full_rows()
            if full is None:
                return None
            last = self._last = (x, gate.gather(backend, x, full))
        a, b = self.bounds[member]
        return last[1][:, a:b]


def hooked(*modules: nn.Module) -> bool:
    """Whether a forward hook watches any of ``modules`` (or every module): then they are called as modules, so
    that the hooks see the calls they watch."""
    return bool(torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks
                or any(m._forward_hooks or m._forward_pre_hooks for m in modules))


class Wrapper(nn.Module):
    """A module standing in for ``inner`` whose state dict is ``inner``'s under the wrapper's own name.

    ``state_dict()`` of a patched model therefore has the dense model's keys (``mlp.up_proj.weight``, not
    ``mlp.up_proj.inner.weight``) and each weight in its dense (out, in) layout (a re-laid weight is copied out
    contiguous), so ``save_pretrained`` writes a plain checkpoint; ``load_state_dict`` takes either key form.
    """

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        self.register_state_dict_post_hook(_dense_keys)
        self.register_load_state_dict_pre_hook(_wrapped_keys)


def _dense_keys(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    inner = prefix + "inner."
    for key in [k for k in state_dict if k.startswith(inner)]:
        value = state_dict.pop(key)
        if not isinstance(value, nn.Parameter) and not value.is_contiguous():  # keep_vars=False: a detached view
            value = value.contiguous()
        state_dict[prefix + key[len(inner):]] = value


def _wrapped_keys(module: nn.Module, state_dict: dict, prefix: str, *_args) -> None:
    for key in [k for k in state_dict if k.startswith(prefix) and not k.startswith((prefix + "inner.", prefix + "gate."))]:
        state_dict[prefix + "inner." + key[len(prefix):]] = state_dict.pop(key)


class GatedProjection(Wrapper):
    """Wraps an MLP projection; its input passes through a ChannelGate first. ``inner`` is the original.

    ``rows_of(inner)`` returns the projection's weight as (in_features, out_features) -- a view of the storage
    the inner module computes with, read at each call so that ``model.to(...)`` stays coherent -- or None where
    only the masked reference is available. Gathering needs those rows contiguous (``runtime.layout``).
    """

    def __init__(self, inner: nn.Module, gate: ChannelGate,
                 rows_of: Callable[[nn.Module], torch.Tensor] | None = None,
                 group: RowGroup | None = None, member: int = 0, shape=None):
        super().__init__(inner)
        self.gate = gate
        self.rows_of = rows_of
        self.group, self.member = group, member  # plain attributes: the group is shared, not a submodule
        self.shape = shape  # runtime.selection.Shape of the call's row buffer (the measured choice is per shape)
        self._wide: tuple | None = None  # ((dtype, shape, threads) of the last dense call on a re-laid weight, choice)

    def dense(self, x: torch.Tensor) -> torch.Tensor:
        """The inner projection's dense call. A plain Linear whose 2-byte float weight is re-laid (gathering layout)
        on a CPU runs the product measured faster there for it (``selection.choose_wide_product``): torch's
        product on the transposed view, or the same widened to float32."""
        inner = self.inner
        weight = getattr(inner, "weight", None)
        if (type(inner) is not nn.Linear or weight.device.type != "cpu" or weight.element_size() != 2
                or not weight.is_floating_point() or weight.is_contiguous() or hooked(inner)):
            return inner(x)
        case = (weight.dtype, weight.shape, torch.get_num_threads())
        known = self._wide
        if known is None or known[0] != case:
            known = self._wide = (case, choose_wide_product(weight))
        if known[1] == "torch":
            return inner(x)
        return wide_product(x, weight, known[1], inner.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, inner = self.gate, self.inner
        st = gate.state
        if st.multiplier is None:
            gate.observe(x)
            return self.dense(x)
        backend = MASKED
        if self.rows_of is not None and st.rule.threshold_form:
            backend = st.chooser.choose(x.device, x.dtype, x.numel() // x.shape[-1], self.shape)
        if backend is DENSE:
            gate.record_dense(x)
            return self.dense(x)
        if not backend.gathers:
            return inner(gate(x))
        out = self.group.output(backend, x, gate, self.member) if self.group is not None else None
        if out is None:
            rows = self.rows_of(inner)
            if not rows.is_contiguous():
                return inner(gate(x))
            out = gate.gather(backend, x, rows)
        bias = getattr(inner, "bias", None)
        if bias is not None:
            out = out + bias
        return out.reshape(*x.shape[:-1], out.shape[-1])


class GatedActivation(Wrapper):
    """Wraps an MLP's activation module for rules that look at the intermediate there (``mid_at="activation"``,
    CATS): its output passes through the layer's ``mid`` gate (masked reference)."""

    def __init__(self, inner: nn.Module, gate: ChannelGate):
        super().__init__(inner)
        self.gate = gate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gate(self.inner(x))
