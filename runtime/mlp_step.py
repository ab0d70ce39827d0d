"""A gated MLP's gathered decode call in one function: the fast path around its projections' wrappers.

Patched, a gated MLP's own forward calls four modules (gate, up, the activation, down), and each projection's
wrapper (``sparse.GatedProjection``) looks up its backend, its weight rows and its input's bookkeeping on every
call. On a 2-core CPU that Python work cost about as much as the kernels: SmolLM2-135M, float32, batch 1, 2
threads, AMD EPYC Zen 3, ~0.3 ms of each MLP call outside its two kernel calls (py-spy: 12% of a decode step, the
kernels 25%). ``apply`` therefore gives each gated MLP whose gate and up share one row buffer an instance
``forward`` (``MLPSteps``; ``remove`` pops it, and so does ``runtime.routing`` while it runs the MLP's input or
output side in its original modules): a decode call whose row group and output projection both gather
runs as the two gathers and the activation between them -- ``ChannelGate.gather`` on the group's buffer, the
adapter's ``act(gate) * up``, ``ChannelGate.gather`` on down's rows: the operations of the wrappers' own path, in
the same order, so the outputs are bitwise the same. Every other call (prefill, ``runtime.dense``, the masked
reference, a projection the measured choice runs dense or routed back to its original module, a buffer no longer
shared, a bias, a forward hook on one of the MLP's modules) runs the MLP's own forward through the wrappers, as
before. The step made decode 4-13% faster there (paired, alternating in one process, 1 and 2 threads).
"""

from __future__ import annotations

from torch import nn

from .adapters import MLPAdapter, MLPParts
from .sparse import GatedProjection, SparsityState, hooked


def step_modules(modules: dict, part: MLPParts, act_name: str, state: SparsityState, extra: bool):
    """(gate, up, act, down) of a gated MLP's module dict (what the tree holds now) if a sparse decode step can take
    its call: thresholds on, no ``extra`` arguments, every projection wrapped, no hook watching one; else None."""
    gate_name, up_name = part.in_names
    gate, up, down = modules.get(gate_name), modules.get(up_name), modules.get(part.out_name)
    act = modules.get(act_name)
    if (extra or state.multiplier is None or type(gate) is not GatedProjection or type(up) is not GatedProjection
            or type(down) is not GatedProjection or hooked(gate, up, act, down)):
        return None
    return gate, up, act, down


class MLPSteps:
    """The gated MLPs of one patched model whose decode calls run as one step (their instance ``forward``)."""

    def __init__(self, adapter: MLPAdapter, state: SparsityState, parts: list[MLPParts]):
        self.state, self.act_name, self.weight_of = state, adapter.act_name, adapter.weight_of
        self.steps: dict[nn.Module, object] = {}  # MLP -> its step forward
        if not adapter.gated:
            return
        for part in (p for p in parts if len(p.in_names) == 2):
            gate, up, down = wrappers = part.projections()
            if (all(isinstance(w, GatedProjection) for w in wrappers)
                    and gate.group is not None and gate.group is up.group and down.group is None
                    and "forward" not in part.owner.__dict__):
                self.steps[part.owner] = self._forward_of(part)
        self.follow(frozenset())

    def follow(self, dense_sides: frozenset[str]) -> None:
        """Put the steps in place (instance attributes shadowing the MLPs' class forward), or take them out while
        ``runtime.routing`` runs an MLP side in its original modules: a step could then only hand each call on to
        the MLP's own forward, a Python call and its checks per layer and decode step for nothing."""
        wanted = not dense_sides & {"in", "mid"}
        for owner, step in self.steps.items():
            if wanted:
                owner.forward = step
            elif owner.__dict__.get("forward") is step:
                del owner.__dict__["forward"]

    def stats_entries(self) -> dict:
        """What ``runtime.stats`` reports of these steps: nothing (their calls count in the state's path_calls)."""
        return {}

    def restore(self) -> None:
        """Give every MLP its own forward back."""
        self.follow(frozenset({"in", "mid"}))

    def _forward_of(self, part: MLPParts):
        owner, state, act_name, weight_of = part.owner, self.state, self.act_name, self.weight_of
        own = type(owner).forward.__get__(owner)
        modules = owner._modules  # the projections the tree holds now (routing may have put an original back)
        plan = [None]  # (key, rows of gate and up, their bounds, down's rows); one list item: replaced whole

        def forward(x, *args, **kwargs):
            found = step_modules(modules, part, act_name, state, args or kwargs)
            if found is None:
                return own(x, *args, **kwargs)
            gate, up, act, down = found
            rows = x.numel() // x.shape[-1]
            chooser = state.chooser
            into = chooser.choose(x.device, x.dtype, rows, gate.shape)
            out_of = chooser.choose(x.device, x.dtype, rows, down.shape)
            if not (into.gathers and out_of.gathers):  # (apply gives steps only to a rule of threshold form)
                return own(x)
            # the rows the wrappers would look up, found again only when a weight's storage changed (model.to,
            # a re-lay); the key is the modules and their weights' addresses
            weights = (weight_of(gate.inner), weight_of(up.inner), weight_of(down.inner))
            key = (gate, up, down, *(w.data_ptr() for w in weights), *(w.dtype for w in weights))
            known = plan[0]
            if known is None or known[0] != key:
                full, down_rows = gate.group.full_rows(), down.rows_of(down.inner)
                usable = (full is not None and down_rows.is_contiguous()
                          and all(getattr(m.inner, "bias", None) is None for m in (gate, up, down)))
                known = plan[0] = (key, full if usable else None, gate.group.bounds[gate.member],
                                   gate.group.bounds[up.member], down_rows)
            _, full, (a, b), (c, d), down_rows = known
            if full is None:
                return own(x)
            both = gate.gate.gather(into, x, full)
            h = act(both[:, a:b]) * both[:, c:d]
            out = down.gate.gather(out_of, h, down_rows)
            return out.reshape(*x.shape[:-1], out.shape[-1])
        return forward
