"""Offline measurements on the dense model: channel score weights, MLP inputs, and per-layer error tables.

A layer's error table holds, for a grid of (input, intermediate) threshold quantiles, the relative L2
error of the layer's MLP output ||y' - y||^2 / ||y||^2 over calibration tokens and the share of the
layer's MLP weight bytes skipped. Error-controlled allocation then picks, per layer, the cell that
skips the most bytes within that layer's error budget.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from clada.runtime.adapters import MLPAdapter, MLPParts

SCORE_RULES = ("magnitude", "wina")


@torch.no_grad()
def channel_scales(model: nn.Module, adapter: MLPAdapter, rule: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel score weights, (L, D) for the MLP input and (L, I) for the intermediate, float32.

    ``magnitude``: all ones (score = |activation|). ``wina``: the L2 norm of the weight column the
    channel multiplies (for the input, over all input projections together), so score = |a_i| * ||W[:, i]||.
    """
    if rule not in SCORE_RULES:
        raise ValueError(f"score rule {rule!r} is not one of {SCORE_RULES}")
    rows_in, rows_mid = [], []
    for part in adapter.mlp_parts(model):
        w_in = [adapter.weight(getattr(part.owner, n)).float() for n in part.in_names]
        w_out = adapter.weight(getattr(part.owner, part.out_name)).float()
        if rule == "magnitude":
            rows_in.append(torch.ones(w_in[0].shape[1]))
            rows_mid.append(torch.ones(w_out.shape[1]))
        else:
            rows_in.append(sum(w.pow(2).sum(0) for w in w_in).sqrt().cpu())
            rows_mid.append(w_out.norm(dim=0).cpu())
    return torch.stack(rows_in), torch.stack(rows_mid)


@torch.no_grad()
def collect_mlp_inputs(model: nn.Module, adapter: MLPAdapter, tokens: torch.Tensor, prompt: int,
                       max_tokens: int, batch_size: int = 8) -> list[torch.Tensor]:
    """Dense MLP inputs x of every layer at scored positions (>= prompt): list of (N, D), N <= max_tokens."""
    parts = adapter.mlp_parts(model)
    store: list[list[torch.Tensor]] = [[] for _ in parts]
    hooks = []
    for layer, part in enumerate(parts):
        def grab(module, args, layer=layer):
            x = args[0]
            if x.dim() == 2:  # some families flatten (B*T, D)
                x = x.view(current["shape"][0], -1, x.shape[-1])
            store[layer].append(x[:, prompt:].reshape(-1, x.shape[-1]).cpu())
        hooks.append(getattr(part.owner, part.in_names[0]).register_forward_pre_hook(grab))
    current: dict = {}
    device = next(model.parameters()).device
    try:
        for start in range(0, tokens.shape[0], batch_size):
            batch = tokens[start : start + batch_size].to(device)
            current["shape"] = batch.shape
            model(input_ids=batch)
            if sum(t.shape[0] for t in store[0]) >= max_tokens:
                break
    finally:
        for h in hooks:
            h.remove()
    return [torch.cat(rows)[:max_tokens] for rows in store]


@torch.no_grad()
def residual_ratios(model: nn.Module, adapter: MLPAdapter, tokens: torch.Tensor, prompt: int) -> torch.Tensor:
    """(L,) ||MLP output||^2 / ||decoder-layer output (residual stream)||^2 at scored positions.

    Multiplying a layer's relative MLP error by this ratio gives the error relative to the residual
    stream it is added to: layers whose MLP writes little into the residual tolerate more. The MLP output
    is what the layer adds to the residual (``adapter.residual_write``: after a post-MLP norm if any, times
    ``adapter.residual_scale``).
    """
    parts, layers = adapter.mlp_parts(model), adapter.layers(model)
    mlp_sq = torch.zeros(len(parts), dtype=torch.float64)
    res_sq = torch.zeros(len(parts), dtype=torch.float64)

    def sq(t: torch.Tensor) -> float:
        t = t[0] if isinstance(t, tuple) else t
        t = t.view(tokens.shape[0], -1, t.shape[-1]) if t.dim() == 2 else t
        return float(t[:, prompt:].double().pow(2).sum())

    hooks = []
    for l, (part, layer) in enumerate(zip(parts, layers)):
        hooks.append(adapter.residual_write(layer, part).register_forward_hook(
            lambda m, a, o, l=l: mlp_sq.__setitem__(l, mlp_sq[l] + sq(o))))
        hooks.append(layer.register_forward_hook(lambda m, a, o, l=l: res_sq.__setitem__(l, res_sq[l] + sq(o))))
    try:
        model(input_ids=tokens.to(next(model.parameters()).device))
    finally:
        for h in hooks:
            h.remove()
    return (mlp_sq * adapter.residual_scale(model) ** 2 / res_sq.clamp_min(1e-30)).float()


def _quantiles(scores: torch.Tensor, qs: torch.Tensor) -> torch.Tensor:
    """Quantiles of a large score tensor (subsampled to stay within torch.quantile's limits)."""
    flat = scores.flatten().float()
    if flat.numel() > 4_000_000:
        flat = flat[torch.randperm(flat.numel(), generator=torch.Generator().manual_seed(0))[:4_000_000]]
    return torch.where(qs > 0, torch.quantile(flat, qs.float()), torch.zeros(()))


@dataclass
class LayerTable:
    """Grid results for one layer; every tensor is (Qi, Qm) except ``t_in`` (Qi,)."""

    t_in: torch.Tensor
    t_mid: torch.Tensor
    error: torch.Tensor
    saved: torch.Tensor


@torch.no_grad()
def layer_table(adapter: MLPAdapter, part: MLPParts, x: torch.Tensor, scale_in: torch.Tensor,
                scale_mid: torch.Tensor, q_in: torch.Tensor, q_mid: torch.Tensor) -> LayerTable:
    """Error and skipped bytes of one layer's MLP over a grid of threshold quantiles (see module doc)."""
    out_proj = getattr(part.owner, part.out_name)
    device = adapter.weight(out_proj).device
    x = x.to(device).float()
    weights = [adapter.weight(getattr(part.owner, n)) for n in part.in_names]
    bytes_in = float(sum(w.numel() for w in weights))
    bytes_mid = float(adapter.weight(out_proj).numel())
    h = adapter.intermediate(part, x)
    y = out_proj(h)
    y_norm = y.pow(2).sum()
    score_in = x.abs() * scale_in.to(device)
    t_in = _quantiles(score_in, q_in)
    t_mid = torch.zeros(len(q_in), len(q_mid))
    error = torch.zeros(len(q_in), len(q_mid))
    saved = torch.zeros(len(q_in), len(q_mid))
    for i, ti in enumerate(t_in):
        keep_in = score_in > ti
        h_i = adapter.intermediate(part, x * keep_in)
        skip_in = 1.0 - keep_in.float().mean()
        score_mid = h_i.abs() * scale_mid.to(device)
        t_mid[i] = _quantiles(score_mid, q_mid)
        for j, tj in enumerate(t_mid[i]):
            keep_mid = score_mid > tj
            y_ij = out_proj(h_i * keep_mid)
            error[i, j] = (y_ij - y).pow(2).sum() / y_norm
            skip_mid = 1.0 - keep_mid.float().mean()
            saved[i, j] = (skip_in * bytes_in + skip_mid * bytes_mid) / (bytes_in + bytes_mid)
    return LayerTable(t_in.cpu(), t_mid, error, saved)


def build_tables(model: nn.Module, adapter: MLPAdapter, inputs: list[torch.Tensor], scale_in: torch.Tensor,
                 scale_mid: torch.Tensor, q_in: torch.Tensor, q_mid: torch.Tensor,
                 progress: bool = True) -> list[LayerTable]:
    """``layer_table`` for every layer, with a progress bar."""
    parts = adapter.mlp_parts(model)
    return [layer_table(adapter, part, inputs[l], scale_in[l], scale_mid[l], q_in, q_mid)
            for l, part in enumerate(tqdm(parts, desc="per-layer error tables", unit="layer", disable=not progress))]


ALLOCATION_RULES = ("budget", "marginal")


def allocate(tables: list[LayerTable], budgets: torch.Tensor, error_weights: torch.Tensor | None = None,
             rule: str = "budget") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-layer thresholds from the error tables; returns (tau_in, tau_mid), each (L,) float32.

    ``budget``: each layer takes the cell that skips most bytes with error * weight[l] <= budget[l].
    ``marginal``: each layer takes the cell maximising saved - error * weight[l] / budget[l], i.e. it keeps
    skipping while one more unit of skipped bytes costs at most budget[l] units of weighted error. With one
    budget for all layers this is the rate-distortion (Lagrangian) allocation: the total weighted error is the
    smallest possible for the bytes skipped, among the table's cells; each layer's error budget is then the
    error of the cell it lands on.
    """
    if rule not in ALLOCATION_RULES:
        raise ValueError(f"allocation rule {rule!r} is not one of {ALLOCATION_RULES}")
    tau_in, tau_mid = [], []
    weights = error_weights if error_weights is not None else torch.ones(len(tables))
    for table, budget, weight in zip(tables, budgets, weights):
        if rule == "marginal":
            flat = (table.saved - table.error * weight / budget).flatten()
        else:
            ok = table.error * weight <= budget
            ok[0, 0] = True
            flat = torch.where(ok, table.saved, torch.full_like(table.saved, -1.0)).flatten()
        i, j = divmod(int(flat.argmax()), table.saved.shape[1])
        tau_in.append(float(table.t_in[i]))
        tau_mid.append(float(table.t_mid[i, j]))
    return torch.tensor(tau_in, dtype=torch.float32), torch.tensor(tau_mid, dtype=torch.float32)
