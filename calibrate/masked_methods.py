"""Evaluation-only baselines that an artifact cannot express, as forward hooks on every layer's MLP.

- ``cats`` (CATS): neuron j of a token is kept iff |act(gate(x))_j| > t[l], one threshold per layer calibrated
  at the same quantile of |act(gate(x))| in every layer. The gate projection is always computed; a skipped
  neuron saves its row of up (gated MLPs) and its column of down.
- ``griffin`` (GRIFFIN): per sequence and layer, the k neurons with the largest norm of the prompt's
  token-normalised intermediate activations, s_j = || h[:, j] / ||h[t, :]|| ||_t over prompt tokens, chosen
  once during the dense prefill and fixed for generation. A skipped neuron saves its rows of the input
  projections (gate and up) and its column of down.

They follow the same regime as the runtime (``clada.calibrate.evaluate.Sparsifier``): a call with several
new tokens per row is a dense prefill, a call with one new token per row a sparse decode step. Realised
figures use the runtime's formulas: ``mlp_sparsity`` is the mean share of neurons skipped per token,
``mlp_reads_saved`` the share of all MLP projection bytes (gate, up and down) a decode step does not read.
The hooks only zero activations (masked reference): they measure quality, not speed.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial

import torch
from torch import nn

from clada.calibrate.evaluate import Sparsifier
from clada.runtime.adapters import adapter_for


def _bytes(adapter, part, names: tuple[str, ...]) -> float:
    """Weight bytes of the projections ``names`` of one layer's MLP."""
    weights = [adapter.weight(getattr(part.owner, n)) for n in names]
    return float(sum(w.numel() * w.element_size() for w in weights))


class HookedMethod(Sparsifier):
    """Base of the hook-based methods: phase tracking, statistics, removal. Subclasses add per-layer hooks.

    ``skip_in_share``: share of the input projections' bytes that a skipped neuron's row saves.
    """

    adaptive = False
    skip_in_share = 0.0

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self.adapter = adapter_for(model)
        self.parts = self.adapter.mlp_parts(model)
        self.mode = "auto"  # "auto" (generation regime), "dense" or "scored" (every token a decode step)
        self.phase = "dense"  # of the current call: "dense", "prefill" (dense, observed) or "sparse"
        self.batch = 1  # rows of the current call
        in_bytes = torch.tensor([_bytes(self.adapter, p, p.in_names) for p in self.parts], dtype=torch.float64)
        out_bytes = torch.tensor([_bytes(self.adapter, p, (p.out_name,)) for p in self.parts], dtype=torch.float64)
        self.total_bytes = in_bytes + out_bytes
        self.skippable_bytes = in_bytes * self.skip_in_share + out_bytes
        self.reset_stats()
        self.hooks = [model.register_forward_pre_hook(self._on_call, with_kwargs=True)] + self.install()

    def install(self) -> list:
        """Register the per-layer hooks; return their handles."""
        return []

    def _on_call(self, module, args, kwargs) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        self.batch = int(ids.shape[0]) if ids is not None else 1
        if self.mode != "auto":
            self.phase = "sparse" if self.mode == "scored" else "dense"
        elif ids is not None and ids.dim() == 2 and ids.shape[1] == 1:
            self.phase = "sparse"
        else:
            self.phase = "prefill"

    @contextmanager
    def _mode(self, mode: str) -> Iterator[None]:
        self.mode = mode
        try:
            yield
        finally:
            self.mode = "auto"

    def dense(self):
        return self._mode("dense")

    def teacher_forced(self):
        return self._mode("scored")

    def record(self, layer: int, skipped: torch.Tensor) -> None:
        """Accumulate per-token skipped-neuron shares ``skipped`` (any shape, one value per token)."""
        self.skipped[layer, 0] += skipped.numel()
        self.skipped[layer, 1] += skipped.double().sum().cpu()

    def reset_stats(self) -> None:
        self.skipped = torch.zeros(len(self.parts), 2, dtype=torch.float64)  # [tokens, sum of skipped shares]

    def stats(self) -> dict:
        acc = self.skipped
        share = torch.where(acc[:, 0] > 0, acc[:, 1] / acc[:, 0].clamp_min(1), torch.zeros(()))
        reads = share * self.skippable_bytes / self.total_bytes
        zeros = [0.0] * len(self.parts)
        return {
            "tokens": int(acc[:, 0].max()) if len(self.parts) else 0,
            "mlp_sparsity": float(share.mean()),
            "input_sparsity": 0.0,
            "mlp_reads_saved": float((reads * self.total_bytes).sum() / self.total_bytes.sum()),
            "relaxed_share": 0.0,
            "per_layer": {"input_sparsity": zeros, "mlp_sparsity": [round(float(v), 5) for v in share],
                          "mlp_reads_saved": [round(float(v), 5) for v in reads]},
        }

    def remove(self) -> None:
        for hook in self.hooks:
            hook.remove()
        self.hooks = []


class DenseMethod(HookedMethod):
    """The dense model itself (nothing skipped; every figure is that of dense)."""


def activation_modules(adapter, parts) -> list[nn.Module]:
    """Each layer's activation module (``adapter.act_name``); refused when layers share one instance."""
    acts = [getattr(p.owner, adapter.act_name) for p in parts]
    if len({id(a) for a in acts}) != len(acts):
        raise ValueError("this model shares one activation module between layers; cats cannot hook it per layer")
    return acts


class CatsMethod(HookedMethod):
    """CATS: zero act(gate(x)) entries with |value| <= thresholds[l] on decode steps (see module doc)."""

    def __init__(self, model: nn.Module, thresholds: torch.Tensor):
        self.thresholds = thresholds.float()
        self.skip_in_share = 0.5 if adapter_for(model).gated else 0.0  # up is half of the input bytes
        super().__init__(model)

    def install(self) -> list:
        acts = activation_modules(self.adapter, self.parts)
        return [act.register_forward_hook(partial(self._mask, layer)) for layer, act in enumerate(acts)]

    def _mask(self, layer: int, module, args, out: torch.Tensor):
        if self.phase != "sparse":
            return None
        keep = out.abs() > self.thresholds[layer].to(out.device)
        self.record(layer, 1.0 - keep.float().mean(-1))
        return out * keep.to(out.dtype)


class GriffinMethod(HookedMethod):
    """GRIFFIN: per sequence, the prompt's top-k neurons of every layer, fixed for generation (see module doc)."""

    needs_prompt = True
    skip_in_share = 1.0

    def __init__(self, model: nn.Module, sparsity: float):
        if not 0.0 <= sparsity < 1.0:
            raise ValueError(f"griffin: sparsity {sparsity} is outside [0, 1)")
        self.sparsity = sparsity
        super().__init__(model)
        width = self.adapter.weight(getattr(self.parts[0].owner, self.parts[0].out_name)).shape[1]
        self.k = max(1, round((1.0 - sparsity) * width))
        self.masks: list[torch.Tensor | None] = [None] * len(self.parts)  # (B, I) bool per layer

    def install(self) -> list:
        return [getattr(p.owner, p.out_name).register_forward_pre_hook(partial(self._gate, layer))
                for layer, p in enumerate(self.parts)]

    @staticmethod
    def prompt_scores(h: torch.Tensor) -> torch.Tensor:
        """(B, I) GRIFFIN statistic of prompt activations h (B, T, I): column norms of row-normalised h."""
        z = h.float() / h.float().norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return z.norm(dim=1)

    def _gate(self, layer: int, module, args):
        h = args[0]
        rows = h.reshape(self.batch, -1, h.shape[-1])  # some families flatten (B*T, I)
        if self.phase == "prefill":
            top = self.prompt_scores(rows).topk(self.k, dim=-1).indices
            self.masks[layer] = torch.zeros(rows.shape[0], rows.shape[-1], dtype=torch.bool,
                                            device=h.device).scatter_(1, top, True)
            return None
        if self.phase != "sparse":
            return None
        mask = self.masks[layer]
        if mask is None or mask.shape[0] != rows.shape[0]:
            raise RuntimeError("griffin: a decode step without the prefill of its prompt (same batch) first")
        self.record(layer, torch.full(rows.shape[:2], 1.0 - self.k / rows.shape[-1]))
        return ((rows * mask[:, None, :].to(h.dtype)).view(h.shape),) + tuple(args[1:])
