"""Which layer error allocates better: the KL estimate or the relative error? Equal-reads curves on held-out text.

    python benchmarks/probe_layer_error.py      # ~15 min on 2 CPU cores (error tables cached after the first run)

For the default recipe's model and split, the per-layer error tables are built with ``calibration.layer_error``
``relative`` and ``kl`` (bench_quality's table cache), and each is allocated by the plain rate-distortion rule (one
price for every layer, depth_slope 0; relative errors weighted by the residual ratio, mix 1) at each level of MLP
bytes skipped in ``LEVELS`` (``ThresholdSearch.point_at_saved``). No adaptation, no attention sparsity:
teacher-forced evaluation on the first 32 held-out lee documents and 32 enwiki documents (exact without
adaptation). Writes results/quality/layer_error_probe.json and .md.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from functools import partial
from pathlib import Path

import torch
from bench_quality import DATASETS, Bench, log, measurements

from clada import runtime
from clada.artifacts import write_atomic
from clada.calibrate.methods import build_method
from clada.calibrate.pipeline import point_artifact
from clada.calibrate.search import SearchSettings, ThresholdSearch

ROOT = Path(__file__).resolve().parent.parent
LEVELS = (0.10, 0.15, 0.20, 0.25, 0.30, 0.35)
ERRORS = ("relative", "kl")


class _NoSignals:
    """The search's evaluator is never called here (no adaptation): it only lends the signal quantiles."""

    def signals(self):
        return torch.zeros(1), torch.zeros(1)


def curve(bench: Bench, layer_error: str) -> list[dict]:
    """Teacher-forced figures at each level of the plain allocation from ``layer_error`` tables."""
    recipe = copy.deepcopy(bench.recipe)
    recipe.calibration.layer_error = layer_error
    m = measurements(recipe, bench.model, bench.adapter, bench.splits.act, bench.data_sha256)
    artifact_of = partial(point_artifact, weight_in=m.weight_in, weight_mid=m.weight_mid, centers=m.centers,
                          fingerprint=runtime.mlp_fingerprint(bench.model, bench.adapter))
    search = ThresholdSearch(m.tables, m.ratios, _NoSignals(), SearchSettings(layer_error=layer_error), artifact_of)
    rows = []
    for level in LEVELS:
        point = search.point_at_saved({"price": 1.0, "depth_slope": 0.0, "mix": 1.0}, level)
        method = build_method("clada-noadapt", bench.model, artifact=artifact_of(point))
        row = {"layer_error": layer_error, "level": level, "compensated_layers": sum(point.centred)}
        try:
            for name in DATASETS:
                figures = bench.reference[name](method)
                row[name] = {k: figures[k] for k in ("mlp_reads_saved", "ppl_increase", "kl")}
        finally:
            method.remove()
        log(f"{layer_error:8s} {level:.2f}: " + " | ".join(
            f"{n} reads {row[n]['mlp_reads_saved']:.3f} ppl+ {row[n]['ppl_increase']:+.4f}" for n in DATASETS))
        rows.append(row)
    return rows


def render(rows: list[dict], command: str, docs: int) -> str:
    md = ["# Layer error probe: KL estimate vs relative error", "",
          f"`{command}`: the default recipe's model and calibration split; per-layer error tables of each kind, "
          "allocated by one price for every layer (depth_slope 0; relative errors weighted by the residual ratio, "
          f"mix 1) at each level of MLP bytes skipped; no adaptation, MLP only; teacher forced on {docs} held-out "
          f"lee and {docs} enwiki documents (64-token dense prefill, 128 scored tokens).", "",
          "| level | " + " | ".join(f"{n} reads ({e}) | {n} ppl_increase ({e})" for n in DATASETS for e in ERRORS) + " |",
          "|---:|" + "---:|" * (2 * len(DATASETS) * len(ERRORS))]
    by = {(r["layer_error"], r["level"]): r for r in rows}
    for level in LEVELS:
        cells = [f"{by[(e, level)][n]['mlp_reads_saved']:.3f} | {by[(e, level)][n]['ppl_increase']:+.4f}"
                 for n in DATASETS for e in ERRORS]
        md.append(f"| {level:.2f} | " + " | ".join(cells) + " |")
    for n in DATASETS:
        mean = {e: sum(by[(e, lv)][n]["ppl_increase"] for lv in LEVELS) / len(LEVELS) for e in ERRORS}
        md.append("")
        md.append(f"Mean ppl_increase over the levels on {n}: " + ", ".join(f"{e} {mean[e]:+.4f}" for e in ERRORS) + ".")
    return "\n".join(md) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default=str(ROOT / "recipes" / "smollm2-135m-threshold.yaml"))
    parser.add_argument("--docs", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", default=str(ROOT / "results" / "quality" / "layer_error_probe"))
    args = parser.parse_args(argv)
    args.greedy_prompts, args.greedy_tokens = 1, 1  # Bench's greedy reference, unused here
    t0 = time.time()
    bench = Bench(args)
    rows = [row for e in ERRORS for row in curve(bench, e)]
    command = "python benchmarks/probe_layer_error.py" + "".join(f" {a}" for a in (argv or sys.argv[1:]))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"command": command, "seconds": round(time.time() - t0), "torch": torch.__version__, "rows": rows}
    write_atomic(out.with_suffix(".json"), (json.dumps(payload, indent=1) + "\n").encode())
    write_atomic(out.with_suffix(".md"), render(rows, command, args.docs).encode())
    log(f"wrote {out}.json and .md ({payload['seconds']} s)")


if __name__ == "__main__":
    main()
