"""Neurons chosen from a low-bit copy of gate and up: fewer errors than the threshold rule at equal bytes? (probe)

    python benchmarks/probe_predictor.py      # ~20 min on 2 CPU cores

The threshold rule skips MLP input channels (rows of gate and up, by |x|·w) and intermediate neurons (columns of
down, by |h|·c); a neuron it skips still costs its gate and up rows, since its h had to be computed. The
predictor rule computes an estimate ``h~ = act(Q(W_gate) x) * Q(W_up) x`` from a copy of gate and up quantised to
``--bits`` per weight (symmetric, one float16 scale per ``--group`` weights of a row: ``runtime.predictor``'s
``LowBitCopy``), keeps neuron j iff |h~_j|·c_j > tau_l (c: the calibration's channel weights of down's input), and reads the gate row, up
row and down column of each kept neuron only, in full precision. Its reads saved are the neurons skipped minus the
copy's bytes read every step (:func:`copy_share`; they depend on the model's dtype, so each level is also allocated
and counted as if the weights were bfloat16: twice the copy's share). Variant ``input mask``: the copy, stored as
input-channel rows, is read under the threshold rule's input mask (``Q_IN``), and the estimate comes from the masked
input; the kept neurons' exact rows still see the whole input.

Both rules: per-layer KL tables on the default recipe's activation documents (the threshold rule: the calibration's
own tables, with compensation; the predictor: :meth:`Predictor.measure`, the same tokens and gradient draws), one
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
from clada.runtime.predictor import LowBitCopy  # noqa: E402
from clada.runtime.rules import channel_scores, threshold_keep  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
LEVELS = (0.15, 0.20, 0.25, 0.30, 0.35)
SHAPE = {"price": 1.0, "depth_slope": 0.0, "mix": 1.0}  # one price for every layer
Q_PREDICTOR = torch.linspace(0.0, 0.8, 33)  # shares of neurons skipped in the predictor's table
Q_IN = (0.0, 0.1, 0.2, 0.3)  # shares of input channels whose rows of the copy are not read (0: the copy in full)
BFLOAT16_BYTES = 2


def copy_share(bytes_in: float, bytes_mid: float, weight_bytes: float, copy_bytes: float) -> float:
    """Share of a layer's MLP bytes (input projections ``bytes_in``, output ``bytes_mid``, stored at ``weight_bytes``
    per weight) that the copy of the input projections at ``copy_bytes`` per weight costs."""
    return bytes_in * copy_bytes / weight_bytes / (bytes_in + bytes_mid)


class Predictor:
    """The predictor rule on one model's gated MLPs: the runtime's low-bit copy of gate and up (``LowBitCopy``), and
    the channel weights of the MLP input (``weight_in``, the input mask's scores) and of down's input
    (``weight_mid``)."""

    def __init__(self, model, adapter, weight_in: torch.Tensor, weight_mid: torch.Tensor, bits: int, group: int):
        self.parts = adapter.mlp_parts(model)
        self.adapter, self.weight_in, self.weight_mid = adapter, weight_in.float(), weight_mid.float()
        self.copy = LowBitCopy(adapter, self.parts, bits, group)  # ValueError: not gated, or a group that does not fit
        self.copy_bytes = self.copy.bytes_per_weight
        bytes_in, bytes_mid = adapter.projection_bytes(self.parts[0])
        element = adapter.weight(getattr(self.parts[0].owner, self.parts[0].out_name)).element_size()
        self.share = {dtype: copy_share(bytes_in, bytes_mid, size, self.copy_bytes)
                      for dtype, size in (("model", element), ("bfloat16", BFLOAT16_BYTES))}

    def estimate(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """h~ (..., I) float32 of MLP inputs x (..., D) from the low-bit copy, computed in float32."""
        return self.copy.estimate(layer, x.float())

    def input_keep(self, layer: int, x: torch.Tensor, tau_in: float) -> torch.Tensor:
        """The input mask the copy is read under (rows of skipped input channels not read; tau_in < 0: none)."""
        if tau_in < 0:
            return torch.ones(x.shape, dtype=torch.bool, device=x.device)
        return threshold_keep(x, self.weight_in[layer], tau_in)

    def measure(self, layer: int, x: torch.Tensor, grads: torch.Tensor, q_in: list[float]) -> dict[str, torch.Tensor]:
        """The layer on calibration inputs x (N, D): per input quantile ``q_in`` (0: the copy read in full) and share
        of neurons ``Q_PREDICTOR`` skipped, the thresholds, the KL estimate (``second_order_kl`` with ``grads``) and
        the skipped shares: tau_in, skip_in (Qi,); tau_mid, error, skip_mid (Qi, Qm). Column 0 skips nothing and reads
        no copy (tau_mid -1)."""
        part = self.parts[layer]
        out = getattr(part.owner, part.out_name)
        shape = (len(q_in), len(Q_PREDICTOR))
        r = {"tau_in": torch.zeros(len(q_in)), "skip_in": torch.zeros(len(q_in)), "tau_mid": torch.zeros(shape),
             "error": torch.zeros(shape), "skip_mid": torch.zeros(shape)}
        with torch.no_grad():
            h = self.adapter.intermediate(part, x).float()
            y = out(h.to(x.dtype)).float()
            scores_in = channel_scores(x, self.weight_in[layer])
            for i, q in enumerate(q_in):
                r["tau_in"][i] = float(score_quantiles(scores_in, [q])[0]) if q > 0 else -1.0
                keep_in = self.input_keep(layer, x, float(r["tau_in"][i]))
                r["skip_in"][i] = 1 - keep_in.float().mean()
                scores = channel_scores(self.estimate(layer, x * keep_in), self.weight_mid[layer])
                taus = score_quantiles(scores, Q_PREDICTOR)
                taus[0] = -1.0
                r["tau_mid"][i] = taus
                for j, tau in enumerate(taus.tolist()[1:], 1):
                    keep = scores > tau
                    r["error"][i, j] = second_order_kl(grads, out((h * keep).to(x.dtype)).float() - y)
                    r["skip_mid"][i, j] = 1 - keep.float().mean()
        return r

    @staticmethod
    def table(measured: dict[str, torch.Tensor], share: float, rows: int | None = None) -> LayerTable:
        """``LayerTable`` of ``measure``'s figures (its first ``rows`` input rows; default all) with the copy at
        ``share`` of the MLP bytes: saved = neurons skipped - share x the copy's rows read (0 where nothing is
        skipped)."""
        m = {k: v[:rows] for k, v in measured.items()}
        saved = m["skip_mid"] - share * (1 - m["skip_in"])[:, None]
        saved[:, 0] = 0.0
        return LayerTable(m["tau_in"], m["tau_mid"], m["error"], saved)


class PredictorMethod:
    """The predictor rule at thresholds ``tau_in``, ``tau_mid`` (L,) on the model with the copy counted at ``share``
    of the MLP bytes, duck-typed as an evaluation method (``evaluate.Sparsifier``): calls inside
    ``teacher_forced`` are sparse, every other call dense."""

    adaptive, needs_prompt = False, False

    def __init__(self, predictor: Predictor, tau_in: list[float], tau_mid: list[float], share: float):
        self.predictor, self.tau_in, self.tau_mid, self.share, self.sparse = predictor, tau_in, tau_mid, share, False
        self.reset_stats()
        for layer, part in enumerate(predictor.parts):
            part.owner.forward = partial(self._forward, layer)

    def _forward(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        p = self.predictor
        part = p.parts[layer]
        h = p.adapter.intermediate(part, x)
        if self.sparse and self.tau_mid[layer] >= 0:
            keep_in = p.input_keep(layer, x, self.tau_in[layer])
            keep = threshold_keep(p.estimate(layer, x * keep_in), p.weight_mid[layer], self.tau_mid[layer])
            h = h * keep.to(h.dtype)
            seen = self.seen[layer]
            seen[0] += 1 - keep.float().mean().item() - self.share * keep_in.float().mean().item()
            seen[1] += 1
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
        self.seen = [[0.0, 0] for _ in self.tau_mid]  # per layer: sum of per-call reads saved, calls

    def stats(self) -> dict:
        """``runtime.stats``-like figures: reads saved net of the copy's rows read (0 in a layer skipping nothing)."""
        per_layer = [s / n if n else 0.0 for s, n in self.seen]
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
          "tokens). `threshold`: the calibration's own tables (compensation where it pays); `predictor`: the copy "
          "read in full; `predictor, input mask`: the copy's rows of the input channels that the threshold rule's "
          "input mask skips are not read, and the estimate is computed from the masked input (per layer the "
          f"allocation picks the input share from {', '.join(map(str, Q_IN))}); the exact rows of kept neurons read "
          "in full. Reads saved net of the copy's bytes read; `bfloat16 bytes`: allocated and counted with the copy's "
          "share for 2-byte weights (the figures are the float32 model's).", ""]
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
    parser.add_argument("--recipe", default=str(ROOT / "recipes" / "smollm2-135m-threshold.yaml"))
    parser.add_argument("--docs", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--bits", type=int, default=4, choices=range(2, 9), metavar="2..8")
    parser.add_argument("--group", type=int, default=32, help="weights per float16 scale (divides the hidden size)")
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
    try:  # the copy first: a group that does not divide the hidden size is one error line, before the tables
        predictor = Predictor(model, adapter, m.weight_in, m.weight_mid, args.bits, args.group)
    except ValueError as exc:
        parser.error(str(exc))
    c = r.calibration
    log("predictor tables")
    inputs = collect_mlp_inputs(model, adapter, bench.splits.act, r.prompt_tokens, c.activation_tokens)
    grads = output_gradients(model, adapter, bench.splits.act, r.prompt_tokens, c.activation_tokens,
                             c.gradient_samples, seed=r.seed, progress=False)
    measured = [predictor.measure(layer, x, g, list(Q_IN)) for layer, (x, g) in enumerate(zip(inputs, grads))]
    del inputs, grads
    searches = {}  # rule label -> (its tables' search, the copy's share)
    for dtype, share in predictor.share.items():
        suffix = "" if dtype == "model" else ", bfloat16 bytes"
        for rows, name in ((1, "predictor"), (None, "predictor, input mask")):
            tables = [Predictor.table(mm, share, rows) for mm in measured]
            searches[name + suffix] = (ThresholdSearch(tables, m.ratios, _NoSignals(), settings, artifact_of), share)
    rows = []
    for level in LEVELS:
        point = threshold.point_at_saved(SHAPE, level)
        rows.append(evaluate(bench, build_method("clada-noadapt", model, artifact=artifact_of(point)), "threshold",
                             level, {"compensated_layers": sum(point.centred)}))
        for label, (search, share) in searches.items():
            point = search.point_at_saved(SHAPE, level)
            rows.append(evaluate(bench, PredictorMethod(predictor, point.tau_in, point.tau_mid, share), label, level,
                                 {"input_masked_layers": sum(t >= 0 for t in point.tau_in)}))
    result = {"command": command_line("probe_predictor.py", argv), "minutes": round((time.time() - t0) / 60, 1),
              "torch": torch.__version__, "model": r.model, "dtype": r.dtype, "docs": args.docs, "bits": args.bits,
              "group": args.group, "copy_bytes": predictor.copy_bytes, "share": predictor.share, "rows": rows}
    write_results(args.out, "predictor_probe", result, render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
