"""Dense pass-through: where ``backend="auto"`` measured that the dense product wins, the patched model runs its
original projection modules, with nothing of the runtime in their call path.

A gated projection costs a few microseconds of Python per call even when it only forwards to the dense product
(SmolLM2-135M: 90 calls per decode step). Once the measured decisions (``runtime.selection``) of the model's
(device, dtype) keep every shape of a side (``in``: gate/up or fc1; ``mid``: down or fc2) in its original layout,
the wrappers of that side step out of the module tree and the original modules take their place; if every side
runs dense, the load signals are not computed either (nothing would use them). Decode steps are still counted,
as dense (``SparsityState.record_dense_step``). The routing is re-checked whenever the model's (device, dtype)
changes, and ``remove`` puts the wrappers back before undoing the patch. Its ``followers`` (the gated MLPs' decode
steps, ``runtime.mlp_step``) are told the dense sides after each routing.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from torch import nn

from .selection import Shape


class Routing:
    """The GatedProjections of one auto-patched model, by side and shape, in or out of the module tree.

    ``probe``: a parameter whose device and dtype are the model's. ``sites[side][shape]``: (owner, attribute name,
    wrapper) of every projection of that shape reading that side's input.
    """

    def __init__(self, state, chooser, probe: nn.Parameter):
        self.state, self.chooser, self.probe = state, chooser, probe
        self.sites: dict[str, dict[Shape, list[tuple[nn.Module, str, nn.Module]]]] = {}
        self.routed_for: tuple | None = None  # the (device, dtype) key whose decisions the tree follows
        self.followers: list[Callable[[frozenset[str]], None]] = []  # told the dense sides after every routing
        self._lock = threading.Lock()

    def add(self, side: str, shape: Shape, owner: nn.Module, name: str, wrapper: nn.Module) -> None:
        self.sites.setdefault(side, {}).setdefault(shape, []).append((owner, name, wrapper))

    def pre_forward(self, module, args, kwargs) -> None:
        """Model forward pre-hook: follow the decisions of the model's current (device, dtype), once they exist."""
        p = self.probe
        key = (p.device.type, p.device.index, p.dtype)
        if key == self.routed_for:
            return None
        decisions = self.chooser.decisions.get(key)
        with self._lock:
            if decisions is None:  # not measured yet (the first decode step measures): the wrappers decide per call
                self._route(set())
                self.routed_for = None
            else:
                self._route({side for side, shapes in self.sites.items()
                             if all(s in decisions and not decisions[s].gathering_layout for s in shapes)})
                self.routed_for = key
        return None

    def _route(self, dense_sides: set[str]) -> None:
        for side, shapes in self.sites.items():
            for sites in shapes.values():
                for owner, name, wrapper in sites:
                    setattr(owner, name, wrapper.inner if side in dense_sides else wrapper)
        self.state.dense_sides = frozenset(dense_sides)
        for follow in self.followers:
            follow(self.state.dense_sides)

    def restore(self) -> None:
        """Put every wrapper back in the tree (before ``remove``)."""
        with self._lock:
            self._route(set())
            self.routed_for = None
