"""Offline measurements on the dense model: channel score weights, MLP inputs, and per-layer error tables.

A layer's error table holds, for a grid of (input, intermediate) threshold quantiles, the error of the layer's
MLP output over calibration tokens and the share of the layer's MLP weight bytes skipped. The error (recipe
``calibration.layer_error``) is ``relative``, ||y' - y||^2 / ||y||^2; or ``kl``, the KL divergence of the model's
next-token distributions that the change y' - y alone would cause, in nats per token, to second order (the Fisher
information of the output distributions with respect to y, estimated from gradients of sampled tokens,
``output_gradients``). Error-controlled allocation then picks, per layer, the cell that skips the most bytes
within that layer's error budget.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from ..runtime.adapters import MLPAdapter, MLPParts
from ..runtime.predictor import BITS, GROUP, SCALES, LowBitCopy
from ..runtime.rules import centred, channel_scores, compensated

SCORE_RULES = ("magnitude", "wina")


def _score_weights(adapter: MLPAdapter, parts: list[MLPParts], rule: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(L, C_in) and (L, C_out) float32 score weights of the channels read by ``parts``' input projections
    (together) and by their output projection (``channel_weights``' rules)."""
    if rule not in SCORE_RULES:
        raise ValueError(f"score rule {rule!r} is not one of {SCORE_RULES}")
    rows_in, rows_out = [], []
    for part in parts:
        w_in = [adapter.weight(getattr(part.owner, n)).float() for n in part.in_names]
        w_out = adapter.weight(getattr(part.owner, part.out_name)).float()
        if rule == "magnitude":
            rows_in.append(torch.ones(w_in[0].shape[1]))
            rows_out.append(torch.ones(w_out.shape[1]))
        else:
            rows_in.append(sum(w.pow(2).sum(0) for w in w_in).sqrt().cpu())
            rows_out.append(w_out.norm(dim=0).cpu())
    return torch.stack(rows_in), torch.stack(rows_out)


@torch.no_grad()
def channel_weights(model: nn.Module, adapter: MLPAdapter, rule: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel score weights, (L, D) for the MLP input and (L, I) for the intermediate, float32.

    ``magnitude``: all ones (score = |activation|). ``wina``: the L2 norm of the weight column the
    channel multiplies (for the input, over all input projections together), so score = |a_i| * ||W[:, i]||.
    """
    return _score_weights(adapter, adapter.mlp_parts(model), rule)


@torch.no_grad()
def attention_channel_weights(model: nn.Module, adapter: MLPAdapter, rule: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The same for the attention projections: (L, D) for the attention input (q/k/v together) and (L, A) for
    the attention output (o's input)."""
    return _score_weights(adapter, adapter.attention_parts(model), rule)


@torch.no_grad()
def collect_inputs(model: nn.Module, modules: list[nn.Module], tokens: torch.Tensor, prompt: int, max_tokens: int,
                   batch_size: int = 8) -> list[torch.Tensor]:
    """Dense inputs of each of ``modules`` at scored positions (>= prompt): list of (N, C), N <= max_tokens."""
    store: list[list[torch.Tensor]] = [[] for _ in modules]
    hooks = []
    for i, module in enumerate(modules):
        def grab(module, args, i=i):
            x = args[0]
            if x.dim() == 2:  # some families flatten (B*T, D)
                x = x.view(current["shape"][0], -1, x.shape[-1])
            store[i].append(x[:, prompt:].reshape(-1, x.shape[-1]).cpu())
        hooks.append(module.register_forward_pre_hook(grab))
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


def collect_mlp_inputs(model: nn.Module, adapter: MLPAdapter, tokens: torch.Tensor, prompt: int,
                       max_tokens: int, batch_size: int = 8) -> list[torch.Tensor]:
    """Dense MLP inputs x of every layer at scored positions (>= prompt): list of (N, D), N <= max_tokens."""
    modules = [getattr(part.owner, part.in_names[0]) for part in adapter.mlp_parts(model)]
    return collect_inputs(model, modules, tokens, prompt, max_tokens, batch_size)


def output_gradients(model: nn.Module, adapter: MLPAdapter, tokens: torch.Tensor, prompt: int, max_tokens: int,
                     samples: int, seed: int = 0, batch_size: int = 2, progress: bool = True) -> list[torch.Tensor]:
    """Per layer (K, N, D) float32: for each of K = ``samples`` draws, the gradient with respect to the layer's MLP
    output y (the output projection's output) of sum_t ln p(y_t), y_t drawn from the dense model's own next-token
    distribution at every scored position t (>= prompt); rows aligned with ``collect_mlp_inputs`` (the same
    documents, positions and order, N <= max_tokens).

    E[(g . d)^2] over draws is the Fisher information of the output distributions in the direction d, so for a
    change d_t of token t's MLP output, 0.5 * E[(g_t . d_t)^2] is the KL divergence it causes to second order
    (terms coupling different tokens' changes left out)."""
    outs = [getattr(part.owner, part.out_name) for part in adapter.mlp_parts(model)]
    per_doc = tokens.shape[1] - prompt
    docs = min(tokens.shape[0], -(-max_tokens // per_doc))
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    leaves: list[torch.Tensor] = [None] * len(outs)  # type: ignore[list-item]

    def add_leaf(l: int):
        def hook(module, args, out):
            leaves[l] = torch.zeros_like(out, requires_grad=True)
            return out + leaves[l]  # d loss / d leaf = d loss / d out, through every later layer
        return hook

    grads: list[list[torch.Tensor]] = [[] for _ in outs]
    flags = [p.requires_grad for p in model.parameters()]
    hooks = [m.register_forward_hook(add_leaf(l)) for l, m in enumerate(outs)]
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        with torch.enable_grad(), tqdm(total=samples * docs, desc="output gradients", unit="doc",
                                       disable=not progress) as bar:
            for _ in range(samples):
                rows: list[list[torch.Tensor]] = [[] for _ in outs]
                for start in range(0, docs, batch_size):
                    batch = tokens[start : min(start + batch_size, docs)].to(device)
                    logp = torch.log_softmax(model(input_ids=batch).logits[:, prompt:].float(), dim=-1)
                    drawn = torch.multinomial(logp.detach().exp().flatten(0, 1), 1, generator=generator)
                    logp.flatten(0, 1).gather(1, drawn).sum().backward()
                    for l, leaf in enumerate(leaves):
                        g = leaf.grad.view(batch.shape[0], -1, leaf.shape[-1]) if leaf.dim() == 2 else leaf.grad
                        rows[l].append(g[:, prompt:].reshape(-1, g.shape[-1]).float().cpu())
                    bar.update(batch.shape[0])
                for l in range(len(outs)):
                    grads[l].append(torch.cat(rows[l])[:max_tokens])
    finally:
        for h in hooks:
            h.remove()
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)
    return [torch.stack(g) for g in grads]


def attention_thresholds(model: nn.Module, adapter: MLPAdapter, tokens: torch.Tensor, prompt: int, max_tokens: int,
                         sparsity: float, rule: str) -> dict[str, torch.Tensor]:
    """The artifact's attention tensors (``Artifact`` fields ``tau_base_attn_*``, ``channel_weight_attn_*``) that
    skip ``sparsity`` of each layer's attention input and output channels on the calibration tokens: per layer
    and side the ``sparsity`` quantile of the dense scores |a|·w (float32)."""
    parts = adapter.attention_parts(model)
    weights = dict(zip(("in", "out"), attention_channel_weights(model, adapter, rule)))
    modules = [getattr(p.owner, p.in_names[0]) for p in parts] + [getattr(p.owner, p.out_name) for p in parts]
    inputs = collect_inputs(model, modules, tokens, prompt, max_tokens)
    out = {}
    for k, side in enumerate(("in", "out")):
        taus = [score_quantiles(channel_scores(x, weights[side][l]), [sparsity])[0]
                for l, x in enumerate(inputs[k * len(parts) : (k + 1) * len(parts)])]
        out[f"tau_base_attn_{side}"] = torch.stack(taus).float()
        out[f"channel_weight_attn_{side}"] = weights[side].float()
    return out


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


QUANTILE_METHODS = ("sampled", "exact")
SAMPLED_MAX = 4_000_000  # torch.quantile's input limit: larger score sets are subsampled (fixed seed)


def score_quantiles(scores: torch.Tensor, qs: torch.Tensor | list[float], method: str = "sampled") -> torch.Tensor:
    """(Q,) float32 quantiles (linear interpolation) of a score tensor; quantile 0 means threshold 0 (nothing but
    exact zeros skipped). ``sampled``: torch.quantile, on a fixed-seed subsample above ``SAMPLED_MAX`` entries;
    ``exact``: over every entry (a full sort). Both agree below ``SAMPLED_MAX``."""
    if method not in QUANTILE_METHODS:
        raise ValueError(f"quantile method {method!r} is not one of {QUANTILE_METHODS}")
    qs = torch.as_tensor(qs, dtype=torch.float32)
    flat = scores.flatten().float()
    if method == "sampled":
        if flat.numel() > SAMPLED_MAX:
            flat = flat[torch.randperm(flat.numel(), generator=torch.Generator().manual_seed(0))[:SAMPLED_MAX]]
        return torch.where(qs > 0, torch.quantile(flat, qs.to(flat.device)).cpu(), torch.zeros(()))
    ordered = flat.sort().values.cpu().double()
    pos = qs.double() * (ordered.numel() - 1)
    lo = pos.floor().long()
    hi = (lo + 1).clamp_max(ordered.numel() - 1)
    value = ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)
    return torch.where(qs > 0, value.float(), torch.zeros(()))


@dataclass
class LayerTable:
    """Grid results for one layer; every tensor is (Qi, Qm) except ``tau_in``, ``centred`` and ``predicted`` (Qi,).

    ``centred[i]``: row i was measured with compensation on the input side (scores |x - c|, skipped channels
    standing for c; c the calibration mean of x); a table may hold both kinds of rows (``LayerTable.stack``).
    ``predicted[i]``: row i is the predictor rule's (``PredictorErrorModel``), in a table that also holds the
    threshold rule's rows (``mixed_tables``).
    """

    tau_in: torch.Tensor
    tau_mid: torch.Tensor
    error: torch.Tensor
    saved: torch.Tensor
    centred: torch.Tensor | None = None
    predicted: torch.Tensor | None = None

    def __post_init__(self):
        if self.centred is None:
            self.centred = torch.zeros(len(self.tau_in), dtype=torch.bool)
        if self.predicted is None:
            self.predicted = torch.zeros(len(self.tau_in), dtype=torch.bool)

    def plain(self) -> LayerTable:
        """The table's rows without compensation (all of them for a table without centred rows)."""
        return LayerTable(*(getattr(self, f)[~self.centred] for f in _TABLE_FIELDS))

    @classmethod
    def stack(cls, tables: list[LayerTable]) -> LayerTable:
        """One table holding the rows of ``tables`` (same intermediate quantiles), in order."""
        return cls(*(torch.cat([getattr(t, f) for t in tables]) for f in _TABLE_FIELDS))


_TABLE_FIELDS = ("tau_in", "tau_mid", "error", "saved", "centred", "predicted")  # LayerTable's, in constructor order


def mixed_tables(threshold: list[LayerTable], predictor: list[LayerTable]) -> list[LayerTable]:
    """Per layer one table of the threshold rule's rows and the predictor rule's (``predicted``; same intermediate
    quantiles): the allocation then takes each layer's cell from whichever rule skips its bytes for less error (the
    mixed rule, ``runtime.rules.MixedRule``). Both tables' errors and saved shares are in the same units."""
    def tagged(table: LayerTable, predicted: bool) -> LayerTable:
        return dataclasses.replace(table, predicted=torch.full((len(table.tau_in),), predicted))

    return [LayerTable.stack([tagged(t, False), tagged(p, True)]) for t, p in zip(threshold, predictor)]


def second_order_kl(grads: torch.Tensor, change: torch.Tensor) -> torch.Tensor:
    """0.5 * mean over draws k and tokens n of (g_kn . d_n)^2: the KL divergence (nats per token, second order) that a
    change ``change`` (N, D) of a layer's MLP output causes, from ``grads`` (K, N, D) (``output_gradients``)."""
    return 0.5 * torch.einsum("knd,nd->kn", grads, change).pow(2).mean()


class LayerErrorModel:
    """One layer's MLP on calibration inputs x (N, D): the thresholds of a quantile pair and the output error.

    For (q_in, q_mid): tau_in is the q_in quantile of the input scores |x - c_in|·w_in; tau_mid the q_mid quantile
    of the intermediate scores |h'|·w_mid, where h' is computed from x with the skipped input channels set to
    c_in (as at run time; ``center_in`` c_in (D,), default None: 0, no compensation). ``error`` is the error of
    the MLP output y' with both keep masks applied (the runtime's rule, ``threshold_keep``): ||y' - y||^2 / ||y||^2,
    or, given ``grads`` (K, N, D) of the same tokens (``output_gradients``), the second-order KL divergence
    0.5 * mean over tokens and draws of (g . (y' - y))^2 in nats per token; ``saved`` the share of the layer's MLP
    weight bytes skipped. The grid search (``table``) and TEAL-greedy's walk both use it; ``quantiles`` is
    ``score_quantiles``' method.
    """

    def __init__(self, adapter: MLPAdapter, part: MLPParts, x: torch.Tensor, weight_in: torch.Tensor,
                 weight_mid: torch.Tensor, quantiles: str = "sampled", center_in: torch.Tensor | None = None,
                 grads: torch.Tensor | None = None):
        self.adapter, self.part, self.quantiles = adapter, part, quantiles
        self.out = getattr(part.owner, part.out_name)
        device, self.dtype = adapter.weight(self.out).device, adapter.weight(self.out).dtype
        self.x = x.to(device).float()
        self.weight_in, self.weight_mid = weight_in.to(device).float(), weight_mid.to(device).float()
        self.center_in = None if center_in is None else center_in.to(device).float()
        self.grads = None if grads is None else grads.to(device).float()
        self.bytes_in, self.bytes_mid = adapter.projection_bytes(part)
        with torch.no_grad():
            self.h = self._intermediate(self.x)  # the dense intermediate (N, I)
            self.y = self._output(self.h)
        self.y_norm = self.y.pow(2).sum()
        self.score_in = channel_scores(centred(self.x, self.center_in), self.weight_in)
        self._by_q_in: dict[float, tuple] = {}

    def _intermediate(self, x: torch.Tensor) -> torch.Tensor:
        """h (float32) of MLP inputs x (float32), computed by the layer in its own dtype."""
        return self.adapter.intermediate(self.part, x.to(self.dtype)).float()

    def _output(self, h: torch.Tensor) -> torch.Tensor:
        """The MLP output (float32) of intermediates h (float32), computed in the layer's dtype."""
        return self.out(h.to(self.dtype)).float()

    @torch.no_grad()
    def _input_side(self, q_in: float) -> tuple[float, float, torch.Tensor, torch.Tensor]:
        """(tau_in, skipped input share, h', intermediate scores of h') of ``q_in``, cached."""
        key = round(float(q_in), 9)
        if key not in self._by_q_in:
            tau_in = float(score_quantiles(self.score_in, [key], self.quantiles)[0])
            keep_in = self.score_in > tau_in
            self._by_q_in[key] = (tau_in, 1.0 - keep_in.float().mean(), *self._kept_input(keep_in))
        return self._by_q_in[key]

    def _kept_input(self, keep_in: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(h', intermediate scores) with the input channels ``keep_in`` (N, D) kept: h' from x with the others set
        to c_in, scored as it is."""
        h = self._intermediate(compensated(self.x, keep_in, self.center_in))
        return h, channel_scores(h, self.weight_mid)

    def mid_taus(self, q_in: float, q_mid: torch.Tensor | list[float]) -> torch.Tensor:
        """(Qm,) intermediate thresholds of the quantiles ``q_mid`` at input quantile ``q_in``."""
        return score_quantiles(self._input_side(q_in)[3], q_mid, self.quantiles)

    def thresholds(self, q_in: float, q_mid: float) -> tuple[float, float]:
        """(tau_in, tau_mid) of the quantile pair."""
        return self._input_side(q_in)[0], float(self.mid_taus(q_in, [q_mid])[0])

    @torch.no_grad()
    def measure(self, q_in: float, tau_mid: float) -> tuple[float, float]:
        """(error, saved byte share) with the input quantile ``q_in`` and intermediate threshold ``tau_mid``."""
        _, skip_in, h, score_mid = self._input_side(q_in)
        keep_mid = score_mid > tau_mid
        skip_mid = 1.0 - keep_mid.float().mean()
        return float(self._error(self._output(h * keep_mid) - self.y)), float(self._saved(skip_in, skip_mid))

    def _error(self, change: torch.Tensor) -> torch.Tensor:
        """The error of a change (N, D) of the MLP output: relative, or the KL estimate given gradients."""
        if self.grads is None:
            return change.pow(2).sum() / self.y_norm
        return second_order_kl(self.grads, change)

    def _saved(self, skip_in: torch.Tensor | float, skip_mid: torch.Tensor | float) -> torch.Tensor | float:
        """Share of the layer's MLP bytes skipped with shares ``skip_in`` of the input channels and ``skip_mid`` of
        the neurons skipped."""
        return (skip_in * self.bytes_in + skip_mid * self.bytes_mid) / (self.bytes_in + self.bytes_mid)

    def error(self, q_in: float, q_mid: float) -> float:
        return self.measure(q_in, self.thresholds(q_in, q_mid)[1])[0]

    def table(self, q_in: torch.Tensor, q_mid: torch.Tensor) -> LayerTable:
        """Error and skipped bytes over the grid ``q_in`` x ``q_mid``."""
        tau_in = torch.zeros(len(q_in))
        tau_mid = torch.zeros(len(q_in), len(q_mid))
        error = torch.zeros(len(q_in), len(q_mid))
        saved = torch.zeros(len(q_in), len(q_mid))
        for i, qi in enumerate(q_in.tolist()):
            tau_in[i] = self._input_side(qi)[0]
            tau_mid[i] = self.mid_taus(qi, q_mid)
            for j, tj in enumerate(tau_mid[i].tolist()):
                error[i, j], saved[i, j] = self.measure(qi, tj)
        centred = torch.full((len(q_in),), self.center_in is not None)
        return LayerTable(tau_in, tau_mid, error, saved, centred)


class PredictorErrorModel(LayerErrorModel):
    """``LayerErrorModel`` of the predictor rule (``runtime.predictor``): tau_in is the q_in quantile of the input
    scores |x|·w_in (the copy's rows it skips), tau_mid the q_mid quantile of the scores |h~|·w_mid of the estimate
    from the copy on the masked input; the error is that of the exact h with the skipped neurons zeroed, and
    ``saved`` counts a skipped neuron's gate row, up row and down column less the copy's rows read. Column q_mid = 0
    skips nothing and reads no copy (tau_mid -1)."""

    def __init__(self, adapter: MLPAdapter, part: MLPParts, layer: int, copy: LowBitCopy, x: torch.Tensor,
                 weight_in: torch.Tensor, weight_mid: torch.Tensor, quantiles: str = "sampled",
                 grads: torch.Tensor | None = None):
        self.layer, self.copy = layer, copy
        super().__init__(adapter, part, x, weight_in, weight_mid, quantiles, None, grads)
        self.copy_share = copy.share_of_input_bytes(self.dtype.itemsize)

    def _kept_input(self, keep_in):
        """(the exact h from the whole input, the scores of the estimate from the copy on the kept input channels)"""
        estimate = self.copy.estimate(self.layer, (self.x * keep_in).to(self.dtype))
        return self.h, channel_scores(estimate, self.weight_mid)

    def _saved(self, skip_in, skip_mid):
        full = self.bytes_in + self.bytes_mid
        return skip_mid - self.copy_share * self.bytes_in * (1.0 - skip_in) / full

    def table(self, q_in: torch.Tensor, q_mid: torch.Tensor) -> LayerTable:
        table = super().table(q_in, q_mid)
        table.tau_mid[:, 0], table.error[:, 0], table.saved[:, 0] = -1.0, 0.0, 0.0
        return table


def predictor_tables(model: nn.Module, adapter: MLPAdapter, inputs: list[torch.Tensor], weight_in: torch.Tensor,
                     weight_mid: torch.Tensor, q_in: torch.Tensor, q_mid: torch.Tensor, progress: bool = True,
                     grads: list[torch.Tensor] | None = None, bits: int = BITS, group: int = GROUP,
                     scales: str = SCALES) -> list[LayerTable]:
    """``PredictorErrorModel.table`` of every layer, with the low-bit copy the runtime's predictor rule makes."""
    parts = adapter.mlp_parts(model)
    copy = LowBitCopy(adapter, parts, bits, group, scales)
    return [PredictorErrorModel(adapter, part, l, copy, inputs[l], weight_in[l], weight_mid[l],
                                grads=None if grads is None else grads[l]).table(q_in, q_mid)
            for l, part in enumerate(tqdm(parts, desc="per-layer predictor tables", unit="layer",
                                          disable=not progress))]


def input_centers(inputs: list[torch.Tensor]) -> torch.Tensor:
    """(L, D) float32 calibration mean of each layer's MLP input: the compensation a centred layer uses."""
    return torch.stack([x.float().mean(0) for x in inputs])


def build_tables(model: nn.Module, adapter: MLPAdapter, inputs: list[torch.Tensor], weight_in: torch.Tensor,
                 weight_mid: torch.Tensor, q_in: torch.Tensor, q_mid: torch.Tensor,
                 progress: bool = True, centers: torch.Tensor | None = None,
                 grads: list[torch.Tensor] | None = None) -> list[LayerTable]:
    """``LayerErrorModel.table`` for every layer (scores and quantiles as the grid search uses them), with a progress
    bar. With ``centers`` (L, D) each table also holds the rows of the compensated input side (``LayerTable.stack``),
    so that the allocation chooses per layer whether compensation pays; with ``grads`` (``output_gradients``) the
    error is the KL estimate instead of the relative error."""
    tables = []
    for l, part in enumerate(tqdm(adapter.mlp_parts(model), desc="per-layer error tables", unit="layer",
                                  disable=not progress)):
        variants = [None] if centers is None else [None, centers[l]]
        g = None if grads is None else grads[l]
        tables.append(LayerTable.stack([LayerErrorModel(adapter, part, inputs[l], weight_in[l], weight_mid[l],
                                                        center_in=c, grads=g).table(q_in, q_mid) for c in variants]))
    return tables


ALLOCATION_RULES = ("budget", "marginal")


def allocate(tables: list[LayerTable], budgets: torch.Tensor, error_weights: torch.Tensor | None = None,
             rule: str = "budget") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-layer thresholds from the error tables; returns (tau_in, tau_mid) (L,) float32 and ``centred`` (L,) bool
    (whether the chosen cell is a compensated one, ``LayerTable.centred``).

    ``budget``: each layer takes the cell that skips most bytes with error * weight[l] <= budget[l].
    ``marginal``: each layer takes the cell maximising saved - error * weight[l] / budget[l], i.e. it keeps
    skipping while one more unit of skipped bytes costs at most budget[l] units of weighted error. With one
    budget for all layers this is the rate-distortion (Lagrangian) allocation: the total weighted error is the
    smallest possible for the bytes skipped, among the table's cells; each layer's error budget is then the
    error of the cell it lands on.
    """
    return cell_values(tables, allocation_cells(tables, budgets, error_weights, rule))[:3]


def cell_values(tables: list[LayerTable], cells: list[tuple[int, int]]
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(tau_in, tau_mid) (L,) float32, ``centred`` and ``predicted`` (L,) bool of each layer's ``cells``."""
    rows = [(t, i) for t, (i, _) in zip(tables, cells)]
    return (torch.tensor([float(t.tau_in[i]) for t, i in rows], dtype=torch.float32),
            torch.tensor([float(t.tau_mid[i, j]) for t, (i, j) in zip(tables, cells)], dtype=torch.float32),
            torch.tensor([bool(t.centred[i]) for t, i in rows], dtype=torch.bool),
            torch.tensor([bool(t.predicted[i]) for t, i in rows], dtype=torch.bool))


def allocation_cells(tables: list[LayerTable], budgets: torch.Tensor, error_weights: torch.Tensor | None = None,
                     rule: str = "budget") -> list[tuple[int, int]]:
    """The (row, column) cell of each layer's table that ``allocate`` takes (see there for the rules)."""
    if rule not in ALLOCATION_RULES:
        raise ValueError(f"allocation rule {rule!r} is not one of {ALLOCATION_RULES}")
    cells = []
    weights = error_weights if error_weights is not None else torch.ones(len(tables))
    for table, budget, weight in zip(tables, budgets, weights):
        if rule == "marginal":
            flat = (table.saved - table.error * weight / budget).flatten()
        else:
            ok = table.error * weight <= budget
            ok[0, 0] = True
            flat = torch.where(ok, table.saved, torch.full_like(table.saved, -1.0)).flatten()
        cells.append(divmod(int(flat.argmax()), table.saved.shape[1]))
    return cells


def tables_saved(tables: list[LayerTable], cells: list[tuple[int, int]]) -> float:
    """Share of all layers' MLP bytes the ``cells`` skip on the calibration tokens (layers of equal size), at the
    base thresholds (before any per-token relaxation)."""
    return sum(float(t.saved[i, j]) for t, (i, j) in zip(tables, cells)) / len(tables)
