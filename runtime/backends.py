"""Kernel backends: how a decode step's thresholded product is computed, behind one interface.

A backend computes, for token rows ``x`` (N, C), per-channel weights ``w`` float32 -- (C,), or (N, C) with one row
per token row (a prompt prior per sequence, ``runtime.rules``) -- per-row thresholds ``tau`` (N, 1) float32 and
weight rows ``rows`` (C, out) (the projection's weight stored as contiguous input-channel rows, see
``runtime.layout``)::

    out[r, :] = sum over channels c with threshold_keep(x[r, c], w[r, c], tau[r]) of x[r, c] * rows[c, :]

returning ``(out (N, out) in x's dtype, kept)`` where ``kept`` is the number of kept (row, channel) pairs
(an int, or a 0-dim tensor on the device where counting must not synchronise). Skipped rows are never read.

Backends, in the order ``backend="auto"`` tries them: ``triton`` (GPU kernels; CPU only under Triton's
interpreter), ``native`` (the compiled CPU kernel), ``embedding_bag`` (any device), and ``masked``: the
reference, which does not gather at all -- the projection's own product on the zeroed input, reading every
weight. ``dense`` is no backend a user asks for but what ``auto`` runs where measurement shows that the
projection's own product on the whole input (nothing skipped) is faster on this machine than gathering
(``runtime.selection``). The choice is made once per (device, dtype, token rows, projection shape) by
:class:`BackendChooser`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import ClassVar

import torch
from torch.nn import functional as F

from . import native
from .rules import threshold_keep

MAX_GATHER_ROWS = 8  # token rows per call (batch x new tokens) up to which ``auto`` gathers; more run dense
_log = logging.getLogger("clada.runtime")
_warned: set[str] = set()


class BackendError(ValueError):
    """A backend name is unknown or the backend cannot run on this device and dtype."""


class KernelBackend:
    """One way to compute the thresholded product (see the module doc)."""

    name: ClassVar[str] = ""
    gathers: ClassVar[bool] = True  # False: the masked reference (the projection's own product)
    # True: ``gather(x, weight, tau, rows, counter)`` adds the kept count to ``counter`` (() int64 on x's device, or
    # a new one where None) and returns it, costing no operation of its own (the Triton kernel)
    counts_into: ClassVar[bool] = False

    def accepts(self, device: torch.device, dtype: torch.dtype, rows: int) -> bool:
        raise NotImplementedError

    def identity(self) -> str:
        """What its speed depends on besides the machine (e.g. the built kernel): keys measured timings."""
        return self.name

    def gather(self, x: torch.Tensor, weight: torch.Tensor, tau: torch.Tensor,
               rows: torch.Tensor) -> tuple[torch.Tensor, int | torch.Tensor]:
        raise NotImplementedError


class NativeBackend(KernelBackend):
    """The compiled CPU kernel of ``runtime.native`` (selection and weighted row sum in one C call)."""

    name = "native"

    def accepts(self, device, dtype, rows):
        kernel = native.gather_kernel() if device.type == "cpu" else None
        return kernel is not None and dtype in kernel.dtypes and rows <= native.MAX_ROWS

    def identity(self):
        return f"{self.name}:{native.gather_kernel().path.stem}"  # the library's name hashes source and flags

    def gather(self, x, weight, tau, rows):
        if tau.numel() != x.shape[0]:
            tau = torch.broadcast_to(tau, (x.shape[0], 1))
        return native.gather_kernel()(x, weight, tau.contiguous(), rows)


class EmbeddingBagBackend(KernelBackend):
    """``embedding_bag`` over the kept channels: one bag per token row; a single row is cut into one bag per
    CPU thread (summed afterwards) so that every thread streams weights."""

    name = "embedding_bag"

    def accepts(self, device, dtype, rows):
        return True

    def gather(self, x, weight, tau, rows):
        n, channels = x.shape
        where = threshold_keep(x, weight, tau).view(-1).nonzero().squeeze(1)  # flat row * C + channel, ascending
        values = x.view(-1).index_select(0, where)
        if n == 1:
            split = max(1, torch.get_num_threads())
            offsets = torch.arange(split, dtype=torch.long, device=x.device) * -(-where.numel() // split)
            out = F.embedding_bag(where, rows, offsets, mode="sum", per_sample_weights=values).sum(0, keepdim=True)
        else:
            starts = torch.arange(n, device=x.device) * channels
            out = F.embedding_bag(where % channels, rows, torch.searchsorted(where, starts), mode="sum",
                                  per_sample_weights=values)
        return out, where.numel()


class DenseBackend(KernelBackend):
    """Nothing skipped: the projection's own product on the whole input (``auto``'s measured choice where
    gathering does not pay on this machine)."""

    name = "dense"
    gathers = False

    def accepts(self, device, dtype, rows):
        return True


class MaskedBackend(KernelBackend):
    """The masked reference: zero the skipped channels, then the projection's own product (every weight read)."""

    name = "masked"
    gathers = False

    def accepts(self, device, dtype, rows):
        return True


def _triton_backend() -> KernelBackend | None:
    try:
        from .triton_kernels import TritonBackend
    except ImportError:
        return None
    return TritonBackend()


BACKENDS: dict[str, KernelBackend] = {}  # name -> backend, in the order ``auto`` tries them
for _backend in (_triton_backend(), NativeBackend(), EmbeddingBagBackend(), MaskedBackend()):
    if _backend is not None:
        BACKENDS[_backend.name] = _backend
MASKED = BACKENDS["masked"]
DENSE = DenseBackend()
BACKEND_NAMES = ("triton", "native", "embedding_bag", "masked")  # every name a user may ask for
PATH_NAMES = BACKEND_NAMES + (DENSE.name,)  # what can compute a gated call: the keys of stats()["path_calls"]


def first_gathering(device: torch.device, dtype: torch.dtype, rows: int) -> KernelBackend | None:
    """The first gathering backend, in ``BACKENDS`` order, that runs ``rows`` token rows of ``dtype`` on ``device``."""
    return next((b for b in BACKENDS.values() if b.gathers and b.accepts(device, dtype, rows)), None)


Selector = Callable[[torch.device, torch.dtype, int], dict]  # (device, dtype, rows) -> {shape: ShapeDecision}


class BackendChooser:
    """The backend of each (device, dtype, token rows, projection shape), chosen on first use and kept.

    ``requested``: ``"auto"`` or a backend name, used wherever it accepts the call (masked elsewhere, e.g. for
    prefill-shaped sparse calls). ``auto`` gathers only up to ``MAX_GATHER_ROWS`` rows (more: masked, or dense
    with a selector); with a ``selector``
    (``runtime.apply`` gives one for threshold rules) it follows the measured decision of the call's shape
    (``runtime.selection``: dense or the first gathering backend), made once per (device, dtype) at the first
    decode call; without one it takes the first backend in ``BACKENDS`` order that accepts.
    """

    def __init__(self, requested: str = "auto", selector: Selector | None = None):
        if requested != "auto" and requested not in BACKEND_NAMES:
            raise BackendError(f"unknown backend {requested!r}; expected auto or one of {', '.join(BACKEND_NAMES)}")
        self.requested = requested
        self.selector = selector if requested == "auto" else None
        self.chosen: dict[tuple, KernelBackend] = {}
        self.decisions: dict[tuple, dict] = {}  # (device type, index, dtype) -> {shape: ShapeDecision}
        self._deciding = threading.Lock()

    def check(self, device: torch.device, dtype: torch.dtype) -> None:
        """BackendError unless the requested backend can run a one-row call of ``dtype`` on ``device``."""
        backend = BACKENDS.get(self.requested)
        if self.requested == "auto":
            return
        if backend is None or not backend.accepts(device, dtype, 1):
            why = "is not installed" if backend is None else f"cannot run {str(dtype).removeprefix('torch.')} on {device.type}"
            raise BackendError(f"backend {self.requested!r} {why} on this machine; use backend='auto'")

    def choose(self, device: torch.device, dtype: torch.dtype, rows: int, shape=None) -> KernelBackend:
        """The backend of a call of ``rows`` token rows of ``dtype`` on ``device`` by a projection of ``shape``."""
        key = (device.type, device.index, dtype, rows, shape if self.selector is not None else None)
        backend = self.chosen.get(key)
        if backend is None:
            backend = self.chosen[key] = self._pick(device, dtype, rows, key[-1])
        return backend

    def _pick(self, device, dtype, rows, shape) -> KernelBackend:
        if self.requested != "auto":
            backend = BACKENDS.get(self.requested, MASKED)
            return backend if backend.accepts(device, dtype, rows) else MASKED
        if rows > MAX_GATHER_ROWS:  # measured (a shape given): the dense product, never slower than dense
            return MASKED if shape is None else DENSE
        if shape is None:
            backend = next(b for b in BACKENDS.values() if b.accepts(device, dtype, rows))
        else:
            name = self.decisions_for(device, dtype, rows)[shape].choice(rows)
            backend = DENSE if name == DENSE.name else BACKENDS[name]
        if device.type == "cuda" and backend.name == "embedding_bag" and "cuda" not in _warned:
            _warned.add("cuda")
            _log.warning("clada: Triton is not installed (pip install 'clada[gpu]'); CUDA decode steps use "
                         "embedding_bag, which synchronises with the host once per gate")
        return backend

    def decisions_for(self, device: torch.device, dtype: torch.dtype, rows: int) -> dict:
        """The selector's decisions for (device, dtype), measured (or read from the cache) on first use, when a call
        of ``rows`` token rows decides the layout."""
        key = (device.type, device.index, dtype)
        if key not in self.decisions:
            with self._deciding:  # concurrent first decode calls: one measures and re-lays, the others wait
                if key not in self.decisions:
                    self.decisions[key] = self.selector(device, dtype, rows)
        return self.decisions[key]

    def summary(self) -> dict[str, str]:
        """``"device dtype rows[ shape]" -> backend name`` of every choice made so far."""
        return {f"{d}{'' if i is None else ':' + str(i)} {str(t).removeprefix('torch.')} {r}"
                + ("" if s is None else f" {s}"): b.name for (d, i, t, r, s), b in self.chosen.items()}

    def selection(self) -> list[dict]:
        """Every measured decision so far: device, dtype, shape, layout, backend per row count and why."""
        return [{"device": f"{d}{'' if i is None else ':' + str(i)}", "dtype": str(t).removeprefix("torch."),
                 **decision.summary()}
                for (d, i, t), decisions in self.decisions.items() for decision in decisions.values()]
