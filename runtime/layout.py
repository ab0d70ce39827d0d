"""Weight-layout surgery for the gathering backends: store MLP weights as contiguous input-channel rows, in
place (each parameter becomes a transposed view of new storage; no copy is kept), and undo it."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .adapters import MLPAdapter


def store_rows_contiguous(adapter: MLPAdapter, proj: nn.Module) -> bool:
    """Re-lay the projection's weight so its (in_features, out_features) rows are contiguous.

    The parameter keeps its shape and values. Returns whether the rows are now contiguous (False for layouts
    this cannot change).
    """
    if adapter.weight_of(proj).t().is_contiguous():
        return True  # e.g. GPT-2's Conv1D already stores (in, out)
    param = getattr(proj, "weight", None)
    if isinstance(param, nn.Parameter) and param.data.is_contiguous():
        param.data = param.data.t().contiguous().t()
    return adapter.weight_of(proj).t().is_contiguous()


def can_share_rows(adapter: MLPAdapter, projs: list[nn.Module]) -> bool:
    """Whether several input projections reading the same input are plain Linear weights of one input size,
    dtype and device, so that their rows can be laid side by side in one buffer."""
    params = [getattr(p, "weight", None) for p in projs]
    if len(projs) < 2 or not all(isinstance(q, nn.Parameter) and adapter.weight_of(p) is q and q.dim() == 2
                                 for p, q in zip(projs, params)):
        return False
    first = params[0]
    return all(q.shape[1] == first.shape[1] and q.dtype == first.dtype and q.device == first.device for q in params)


def store_rows_shared(projs: list[nn.Module]) -> torch.Tensor:
    """Lay the (in, out) rows of input projections that ``can_share_rows`` side by side in one buffer
    (in_features, sum of out_features): each parameter becomes a transposed view of its column block. Returns the
    buffer."""
    params = [p.weight for p in projs]
    first = params[0]
    buffer = torch.empty(first.shape[1], sum(q.shape[0] for q in params), dtype=first.dtype, device=first.device)
    start = 0
    for q in params:
        block = buffer[:, start : start + q.shape[0]]
        block.copy_(q.data.t())
        q.data = block.t()
        start += q.shape[0]
    return buffer


def store_rows(adapter: MLPAdapter, projs: list[nn.Module]) -> None:
    """Gathering layout of projections reading one input: one shared row buffer for several (gate and up, which
    must ``can_share_rows``), contiguous rows for one."""
    if len(projs) > 1:
        store_rows_shared(projs)
    else:
        store_rows_contiguous(adapter, projs[0])


def rows_view(adapter: MLPAdapter) -> Callable[[nn.Module], torch.Tensor]:
    """proj -> its weight as (in_features, out_features), a view of the storage it computes with."""
    return lambda proj: adapter.weight_of(proj).t()


def restore_layout(proj: nn.Module) -> None:
    """Give the projection's weight its original contiguous (out, in) storage again."""
    param = getattr(proj, "weight", None)
    if isinstance(param, nn.Parameter) and not param.data.is_contiguous():
        param.data = param.data.contiguous()
