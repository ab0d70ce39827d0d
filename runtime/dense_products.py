"""The products a decode step leaves dense, on the compiled CPU kernel where it is measured faster than torch's.

An artifact skips MLP (and optionally attention) weight reads; the other projections of a decode step -- the
attention projections of an MLP-only artifact, and the LM head -- still read every weight through torch's own
product, which on some CPUs is far from the memory bandwidth at one to eight token rows (MKL's GEMV on an AMD EPYC:
8-11 GB/s in float32, 2-3x slower than ``native_gather.c``'s ``clada_gemv_*``). ``apply`` therefore hands those
``nn.Linear`` modules to :class:`DenseProducts`: at decode-shaped calls on a CPU (at most
``native.GEMV_MAX_ROWS`` token rows, no autograd) a module runs the compiled product on its own weight, in its
original layout (nothing is copied or re-laid, a tied head stays tied), where ``runtime.selection`` measured it faster
than torch's for that (dtype, shape, token rows) on this machine; elsewhere, and for every other call, the module's
own forward runs. As ``backend="auto"``'s layout, each (dtype, shape) is decided at the token rows of its first
decode-shaped call: where torch's product wins there, that shape's modules step out (their own forward again, nothing
of the runtime in their call path: on an AMD EPYC Zen 3 in bfloat16 a step's ~200 wrapper calls that only forwarded
to torch cost 11% of a decode step); after a change of the model's dtype (``pre_forward``) they step in again and are
decided anew. ``remove`` restores the modules' forwards. Modules whose forward something else already replaced (an
accelerate hook) are left alone.
"""

from __future__ import annotations

import threading

import torch
from torch import nn

from . import native
from .selection import ProductDecision, choose_product, timed_count


class DenseProducts:
    """The dense ``nn.Linear`` modules of one patched model a decode step may run on the compiled product."""

    def __init__(self, modules: list[nn.Linear]):
        self.modules = [m for m in dict.fromkeys(modules) if type(m) is nn.Linear and "forward" not in m.__dict__]
        self.decisions: dict[tuple, ProductDecision] = {}  # (dtype, out, in, timed rows) -> decision
        self.stepped_out: set[tuple] = set()  # (dtype, out, in) where torch won: those modules run their own forward
        self.calls = {"native": 0, "torch": 0}
        self._lock = threading.Lock()
        self._dtype = self.modules[0].weight.dtype if self.modules else None
        for m in self.modules:
            self._step_in(m)

    def _step_in(self, module: nn.Linear) -> None:
        module.forward = self._forward_of(module)  # an instance attribute shadowing nn.Linear.forward until restore

    def restore(self) -> None:
        """Give every module its own forward back."""
        for m in self.modules:
            m.__dict__.pop("forward", None)

    def pre_forward(self, model, args, kwargs) -> None:
        """Model forward pre-hook: after a change of the model's dtype, the modules that stepped out for another dtype
        step in again (their choice is measured anew)."""
        if self.modules and self.modules[0].weight.dtype != self._dtype:
            with self._lock:
                self._dtype = self.modules[0].weight.dtype
                for m in self.modules:
                    if (m.weight.dtype, *m.weight.shape) in self.stepped_out:
                        m.__dict__.pop("forward", None)
                    elif "forward" not in m.__dict__:
                        self._step_in(m)
        return None

    def _forward_of(self, module: nn.Linear):
        linear = nn.Linear.forward.__get__(module)

        def forward(x: torch.Tensor) -> torch.Tensor:
            weight = module.weight
            rows = x.numel() // x.shape[-1] if x.dim() and x.shape[-1] else 0
            kernel = native.gather_kernel()
            if (kernel is None or not rows or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
                    or not kernel.gemv_accepts(x, weight) or self._choice(weight, rows) != "native"):
                self.calls["torch"] += 1
                return linear(x)
            out = kernel.gemv(x.reshape(rows, x.shape[-1]).contiguous(), weight)
            if module.bias is not None:
                out = out + module.bias
            self.calls["native"] += 1
            return out.reshape(*x.shape[:-1], weight.shape[0])
        return forward

    def _choice(self, weight: torch.Tensor, rows: int) -> str:
        key = (weight.dtype, *weight.shape, timed_count(rows))
        decision = self.decisions.get(key)
        if decision is None:
            with self._lock:
                decision = self.decisions.get(key)
                if decision is None:
                    same = [m for m in self.modules if m.weight.shape == weight.shape
                            and m.weight.dtype == weight.dtype and m.weight.device == weight.device]
                    decision = self.decisions[key] = choose_product([m.weight for m in same], timed_count(rows))
                    if decision.choice == "torch":  # decided at these rows, as auto's layout: the shape steps out
                        self.stepped_out.add(key[:-1])
                        for m in same:
                            m.__dict__.pop("forward", None)
        return decision.choice

    def reset(self) -> None:
        self.calls = dict.fromkeys(self.calls, 0)

    def summary(self) -> dict:
        """Calls per product since apply and each measured choice (``runtime.stats()["dense_products"]``)."""
        return {"calls": dict(self.calls), "choices": [d.summary() for d in self.decisions.values()]}
