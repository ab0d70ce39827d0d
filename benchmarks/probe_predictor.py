"""Neurons chosen from a low-bit copy of gate and up: fewer errors than the threshold rule at equal bytes? (probe)

    python benchmarks/probe_predictor.py      # ~25 min on 2 CPU cores

The threshold rule skips MLP input channels (rows of gate and up, by |x|·w) and intermediate neurons (columns of
down, by |h|·c); a neuron it skips still costs its gate and up rows, since its h had to be computed. The
predictor rule computes an estimate ``h~ = act(Q(W_gate) x) * Q(W_up) x`` from a copy of gate and up quantised to
``--bits`` per weight (symmetric, one float16 scale per ``--group`` weights of a row: :func:`quantised`), keeps
neuron j iff |h~_j|·c_j > tau_l (c: the calibration's channel weights of down's input), and reads the gate row, up
row and down column of each kept neuron only, in full precision. Its reads saved are the neurons skipped minus the
copy, read in full every step (:func:`copy_share`; it depends on the model's dtype, so each level is also
allocated as if the weights were bfloat16: twice the copy's share).

Both rules: per-layer KL tables on the default recipe's activation documents (the threshold rule: the calibration's
own tables, with compensation; the predictor: :func:`predictor_table`, the same tokens and gradient draws), one
price for every layer at each level (``ThresholdSearch.point_at_saved``, depth_slope 0), no adaptation, MLP only;
teacher forced on 32 held-out lee and 32 enwiki documents (bench_quality's references). Writes
results/quality/predictor_probe.json and .md.
"""

from __future__ import annotations

import argparse
import sys
import time
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_quality import DATASETS, KEYS, Bench, log, measurements  # noqa: E402  (benchmarks/ is not a package)
from probe_layer_error import _NoSignals  # noqa: E402
from script_io import command_line, write_results  # noqa: E402

from clada import runtime  # noqa: E402
from clada.calibrate.measure import (LayerTable, collect_mlp_inputs, output_gradients,  # noqa: E402
                                     score_quantiles, second_order_kl)
from clada.calibrate.methods import build_method  # noqa: E402
from clada.calibrate.pipeline import point_artifact  # noqa: E402
from clada.calibrate.search import SearchSettings, ThresholdSearch  # noqa: E402
from clada.runtime.rules import channel_scores, threshold_keep  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
LEVELS = (0.15, 0.20, 0.25, 0.30, 0.35)
SHAPE = {"price": 1.0, "depth_slope": 0.0, "mix": 1.0}  # one price for every layer
Q_PREDICTOR = torch.linspace(0.0, 0.8, 33)  # shares of neurons skipped in the predictor's table
BFLOAT16_BYTES = 2


def quantised(weight: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, float]:
    """``weight`` (O, I) quantised symmetrically to ``bits`` per weight, one scale per ``group`` consecutive weights
    of a row (absmax / (2**(bits-1) - 1)), returned dequantised in float32, and the copy's bytes per weight (its
    codes and float16 scales)."""
    out_features, in_features = weight.shape
    if in_features % group:
        raise ValueError(f"group {group} does not divide the {in_features} input features")
    w = weight.float().reshape(out_features, in_features // group, group)
    top = 2 ** (bits - 1) - 1
    scale = (w.abs().amax(-1, keepdim=True) / top).clamp_min(torch.finfo(torch.float32).tiny)
    codes = (w / scale).round().clamp(-top - 1, top)
    return (codes * scale).reshape(out_features, in_features), (bits + 16 / group) / 8


def copy_share(bytes_in: float, bytes_mid: float, weight_bytes: float, copy_bytes: float) -> float:
    """Share of a layer's MLP bytes (input projections ``bytes_in``, output ``bytes_mid``, stored at ``weight_bytes``
    per weight) that the copy of the input projections at ``copy_bytes`` per weight costs."""
    return bytes_in * copy_bytes / weight_bytes / (bytes_in + bytes_mid)


class Predictor:
    """The predictor rule on one model's gated MLPs: per layer the dequantised copies of gate and up, the channel
    weights of down's input, and (once allocated) the thresholds; ``forward`` replaces an MLP's output."""

    def __init__(self, model, adapter, weight_mid: torch.Tensor, bits: int, group: int):
        if not adapter.gated:
            raise ValueError("the predictor rule needs a gated MLP (gate and up)")
        self.parts = adapter.mlp_parts(model)
        self.adapter, self.weight_mid = adapter, weight_mid.float()
        self.copies, self.copy_bytes = [], 0.0
        for part in self.parts:
            pair = [quantised(adapter.weight(getattr(part.owner, n)), bits, group) for n in part.in_names]
            self.copies.append([w for w, _ in pair])
            self.copy_bytes = pair[0][1]
        bytes_in, bytes_mid = adapter.projection_bytes(self.parts[0])
        element = adapter.weight(getattr(self.parts[0].owner, self.parts[0].out_name)).element_size()
        self.share = {dtype: copy_share(bytes_in, bytes_mid, size, self.copy_bytes)
                      for dtype, size in (("model", element), ("bfloat16", BFLOAT16_BYTES))}

    def estimate(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """h~ (..., I) float32 of MLP inputs x (..., D) from the low-bit copy."""
        gate, up = self.copies[layer]
        act = getattr(self.parts[layer].owner, self.adapter.act_name)
        x = x.float()
        return act(x @ gate.T) * (x @ up.T)

    def table(self, layer: int, x: torch.Tensor, grads: torch.Tensor) -> LayerTable:
        """One-row ``LayerTable`` of the layer on calibration inputs x (N, D): per share of ``Q_PREDICTOR`` the
        threshold, the KL estimate (``second_order_kl`` with ``grads``) and the bytes saved net of the copy's."""
        part = self.parts[layer]
        out = getattr(part.owner, part.out_name)
        with torch.no_grad():
            h = self.adapter.intermediate(part, x).float()
            y = out(h.to(x.dtype)).float()
            scores = channel_scores(self.estimate(layer, x), self.weight_mid[layer])
            taus = score_quantiles(scores, Q_PREDICTOR)
            error, saved = torch.zeros(1, len(taus)), torch.zeros(1, len(taus))
            for j, tau in enumerate(taus.tolist()):
                keep = scores > tau if j else torch.ones_like(scores, dtype=torch.bool)
                error[0, j] = second_order_kl(grads, out((h * keep).to(x.dtype)).float() - y)
                saved[0, j] = 1 - keep.float().mean() - (self.share["model"] if j else 0.0)
        taus[0] = -1.0  # the first column keeps everything and reads no copy
        return LayerTable(torch.zeros(1), taus[None], error, saved)


class PredictorMethod:
    """The predictor rule at thresholds ``tau`` (L,) on the model, duck-typed as an evaluation method
    (``evaluate.Sparsifier``): calls inside ``teacher_forced`` are sparse, every other call dense."""

    adaptive, needs_prompt = False, False

    def __init__(self, predictor: Predictor, tau: list[float]):
        self.predictor, self.tau, self.sparse = predictor, tau, False
        self.skipped = [[0.0, 0] for _ in tau]  # per layer: sum of skipped shares, calls
        for layer, part in enumerate(predictor.parts):
            part.owner.forward = partial(self._forward, layer)

    def _forward(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        p = self.predictor
        part = p.parts[layer]
        h = p.adapter.intermediate(part, x)
        if self.sparse and self.tau[layer] >= 0:
            keep = threshold_keep(p.estimate(layer, x), p.weight_mid[layer], self.tau[layer])
            h = h * keep.to(h.dtype)
            self.skipped[layer][0] += 1 - keep.float().mean().item()
            self.skipped[layer][1] += 1
        return getattr(part.owner, part.out_name)(h)

    @contextmanager
    def dense(self):
        yield

    @contextmanager
    def teacher_forced(self):
        self.sparse = True
        try:
            yield
        finally:
            self.sparse = False

    def reset_stats(self) -> None:
        self.skipped = [[0.0, 0] for _ in self.tau]

    def stats(self) -> dict:
        """``runtime.stats``-like figures: reads saved net of the copy (layers whose threshold reads it)."""
        share = self.predictor.share["model"]
        per_layer = [s / n - share if n else 0.0 for s, n in self.skipped]
        return {"rule": "predictor", "mlp_reads_saved": sum(per_layer) / len(per_layer), "per_layer": per_layer}

    def remove(self) -> None:
        for part in self.predictor.parts:
            part.owner.__dict__.pop("forward", None)


def evaluate(bench: Bench, method, label: str, level: float, extra: dict | None = None) -> dict:
    """Teacher-forced figures (``KEYS``) of ``method`` on both data sets; detaches it."""
    row = {"rule": label, "level": level, **(extra or {})}
    try:
        for name in DATASETS:
            figures = bench.reference[name](method)
            row[name] = {k: figures[k] for k in KEYS if k in figures}
    finally:
        method.remove()
    log(f"{label:22s} {level:.2f}: " + " | ".join(
        f"{n} reads {row[n]['mlp_reads_saved']:.3f} ppl+ {row[n]['ppl_increase']:+.4f} kl {row[n]['kl']:.4f}"
        for n in DATASETS))
    return row


def render(result: dict) -> str:
    rows = result["rows"]
    labels = list(dict.fromkeys(r["rule"] for r in rows))
    md = ["# Predictor probe: neurons chosen from a low-bit copy of gate and up", "",
          f"`{result['command']}` ({result['minutes']} min, torch {result['torch']}): {result['model']}, "
          f"{result['dtype']}; copy of gate and up at {result['bits']} bits, one float16 scale per {result['group']} "
          f"weights ({result['copy_bytes']:.4f} bytes per weight): {result['share']['model']:.4f} of the MLP bytes "
          f"at the model's dtype, {result['share']['bfloat16']:.4f} for bfloat16 weights. Per-layer KL tables, one "
          "price for every layer (depth_slope 0), no adaptation, MLP only; teacher forced on "
          f"{result['docs']} held-out lee and {result['docs']} enwiki documents (64-token dense prefill, 128 scored "
          "tokens). `threshold`: the calibration's own tables (compensation where it pays); `predictor`: reads "
          "saved net of the copy; `predictor, bfloat16 bytes`: allocated at the level plus the difference of the "
          "copy's shares, so that its reads saved, were the weights bfloat16, would be the level (the figures "
          "shown are the float32 run's, reads net of the bfloat16 copy).", ""]
    for name in DATASETS:
        md += [f"`{name}`: reads saved / ppl_increase / KL", "",
               "| level | " + " | ".join(labels) + " |", "|---:|" + "---:|" * len(labels)]
        for level in sorted({r["level"] for r in rows}):
            cells = []
            for label in labels:
                row = next((r for r in rows if r["rule"] == label and r["level"] == level), None)
                cells.append("—" if row is None else f"{row[name]['mlp_reads_saved']:.3f} / "
                             f"{row[name]['ppl_increase']:+.4f} / {row[name]['kl']:.4f}")
            md.append(f"| {level:.2f} | " + " | ".join(cells) + " |")
        md.append("")
    return "\n".join(md)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default=str(ROOT / "recipes" / "smollm2-135m.yaml"))
    parser.add_argument("--docs", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group", type=int, default=32)
    parser.add_argument("--out", default=str(ROOT / "results" / "quality"))
    args = parser.parse_args(argv)
    args.greedy_prompts, args.greedy_tokens = 0, 1  # no greedy agreement here
    t0 = time.time()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    bench = Bench(args)
    r, model, adapter = bench.recipe, bench.model, bench.adapter
    m = measurements(r, model, adapter, bench.splits.act, bench.data_sha256, Path(r.output))
    artifact_of = partial(point_artifact, weight_in=m.weight_in, weight_mid=m.weight_mid, centers=m.centers,
                          fingerprint=runtime.mlp_fingerprint(model, adapter))
    settings = SearchSettings(layer_error="kl")
    threshold = ThresholdSearch(m.tables, m.ratios, _NoSignals(), settings, artifact_of)
    c = r.calibration
    log("predictor tables")
    inputs = collect_mlp_inputs(model, adapter, bench.splits.act, r.prompt_tokens, c.activation_tokens)
    grads = output_gradients(model, adapter, bench.splits.act, r.prompt_tokens, c.activation_tokens,
                             c.gradient_samples, seed=r.seed, progress=False)
    predictor = Predictor(model, adapter, m.weight_mid, args.bits, args.group)
    tables = [predictor.table(layer, x, g) for layer, (x, g) in enumerate(zip(inputs, grads))]
    del inputs, grads
    by_price = ThresholdSearch(tables, m.ratios, _NoSignals(), settings, artifact_of)
    extra_share = predictor.share["bfloat16"] - predictor.share["model"]
    rows = []
    for level in LEVELS:
        point = threshold.point_at_saved(SHAPE, level)
        rows.append(evaluate(bench, build_method("clada-noadapt", model, artifact=artifact_of(point)), "threshold",
                             level, {"compensated_layers": sum(point.centred)}))
        rows.append(evaluate(bench, PredictorMethod(predictor, by_price.point_at_saved(SHAPE, level).tau_mid),
                             "predictor", level))
        method = PredictorMethod(predictor, by_price.point_at_saved(SHAPE, level + extra_share).tau_mid)
        row = evaluate(bench, method, "predictor, bfloat16 bytes", level)
        for name in DATASETS:
            row[name]["mlp_reads_saved"] -= extra_share
        rows.append(row)
    result = {"command": command_line("probe_predictor.py", argv), "minutes": round((time.time() - t0) / 60, 1),
              "torch": torch.__version__, "model": r.model, "dtype": r.dtype, "docs": args.docs, "bits": args.bits,
              "group": args.group, "copy_bytes": predictor.copy_bytes, "share": predictor.share, "rows": rows}
    write_results(args.out, "predictor_probe", result, render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
