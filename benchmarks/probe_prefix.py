"""Does the prompt prior (prefix-driven sparsity) pay? Equal-reads curves with and without it, on held-out text.

    python benchmarks/probe_prefix.py --artifact out/smollm2-135m-threshold/clada.safetensors     # ~12 min on 2 CPU cores

On the artifact's model and the first 32 held-out documents of each text (the default recipe's split: 64-token dense
prefill, 128 scored tokens, teacher forced, which is exact without adaptation), the artifact's MLP thresholds
without adaptation and attention (``clada-noadapt`` of its MLP part) are scaled by 0.8, 1.0 and 1.25 and each scale
is evaluated with prompt-prior exponents (alpha_in, alpha_mid) in ``PAIRS``. A prior pays where its point lies below
the no-prior curve (alpha 0, the three scales, interpolated linearly) at its own ``mlp_reads_saved``: the
``vs_curve`` column. Writes results/quality/prefix_probe.json and .md.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch
from script_io import command_line, write_results  # benchmarks/ is not a package: the module beside this script

from clada import runtime
from clada.artifacts import ATTENTION_KEYS, load_artifact
from clada.calibrate.data import load_documents
from clada.calibrate.evaluate import Sparsifier, TeacherForcedEvaluator
from clada.calibrate.models import load_model
from clada.calibrate.pipeline import token_splits
from clada.calibrate.recipe import load_recipe

ROOT = Path(__file__).resolve().parent.parent
SCALES = (0.8, 1.0, 1.25)
PAIRS = ((0.0, 0.0), (0.0, 0.25), (0.0, 0.5), (0.25, 0.0), (0.25, 0.25), (0.0, 1.0))


def below_curve(point: dict, curve: list[dict]) -> float:
    """``point``'s ppl_increase minus the no-prior curve's at its reads saved (piecewise linear through the curve's
    points, extended by its first or last segment beyond them)."""
    pts = sorted((c["mlp_reads_saved"], c["ppl_increase"]) for c in curve)
    x = point["mlp_reads_saved"]
    segments = list(zip(pts, pts[1:]))
    (x0, y0), (x1, y1) = next((seg for seg in segments if seg[0][0] <= x <= seg[1][0]),
                              segments[0] if x < pts[0][0] else segments[-1])
    return point["ppl_increase"] - (y0 + (y1 - y0) * (x - x0) / (x1 - x0))


def render(rows: list[dict], docs: int, command: str) -> str:
    """The markdown table of the probe's ``rows``, each with its ``vs_curve`` (set here)."""
    md = ["# Prompt prior probe (prefix-driven sparsity)", "",
          f"`{command}`: {docs} held-out documents per text, teacher forced, the artifact's MLP thresholds (no "
          "adaptation, no attention) scaled, with prompt-prior exponents (alpha_in, alpha_mid). `vs curve`: "
          "ppl_increase minus the no-prior curve's at the same reads saved (negative: the prior pays; beyond the "
          "curve's ends its last segment is extended).", "",
          "| text | scale | alpha_in | alpha_mid | mlp_reads_saved | ppl_increase | vs curve |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        curve = [c for c in rows if c["data"] == r["data"] and c["alpha_in"] == 0.0 and c["alpha_mid"] == 0.0]
        r["vs_curve"] = below_curve(r, curve) if (r["alpha_in"], r["alpha_mid"]) != (0.0, 0.0) else None
        delta = r["vs_curve"]
        md.append(f"| {r['data']} | {r['scale']} | {r['alpha_in']} | {r['alpha_mid']} | {r['mlp_reads_saved']:.4f} | "
                  f"{r['ppl_increase']:+.4f} | {'—' if delta is None else f'{delta:+.4f}'} |")
    return "\n".join(md) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--artifact", default="out/smollm2-135m-threshold/clada.safetensors")
    parser.add_argument("--data", default="lee,enwiki")
    parser.add_argument("--docs", type=int, default=32)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    recipe = load_recipe(ROOT / "recipes" / "smollm2-135m-threshold.yaml")
    base = load_artifact(args.artifact)
    base = dataclasses.replace(base, lam=0.0, gam=0.0, **dict.fromkeys(ATTENTION_KEYS))
    model, tokenizer, _ = load_model(base.model.get("spec", recipe.model), "float32", "cpu")
    L = base.num_layers
    rows = []
    for data in args.data.split(","):
        held = token_splits(dataclasses.replace(recipe, data=data), tokenizer, load_documents(data).documents).held
        evaluator = TeacherForcedEvaluator(model, held[: args.docs], recipe.prompt_tokens, recipe.eval.batch_size)
        for scale in SCALES:
            for a_in, a_mid in PAIRS:
                art = dataclasses.replace(base, tau_base_in=base.tau_base_in * scale,
                                          tau_base_mid=base.tau_base_mid * scale,
                                          prefix_in=torch.full((L,), a_in), prefix_mid=torch.full((L,), a_mid))
                runtime.apply(model, art, backend="masked")
                figures = evaluator(Sparsifier(model))
                runtime.remove(model)
                rows.append({"data": data, "scale": scale, "alpha_in": a_in, "alpha_mid": a_mid,
                             **{k: figures[k] for k in ("mlp_reads_saved", "ppl_increase", "kl")}})
                print(f"[{time.strftime('%H:%M:%S')}] {data} scale {scale} alpha ({a_in}, {a_mid}): reads "
                      f"{figures['mlp_reads_saved']:.4f} ppl_increase {figures['ppl_increase']:+.4f}",
                      file=sys.stderr, flush=True)
    command = command_line("probe_prefix.py", argv)
    write_results(ROOT / "results" / "quality", "prefix_probe", {"artifact": args.artifact, "command": command,
                                                                  "rows": rows}, render(rows, args.docs, command))
    return 0


if __name__ == "__main__":
    sys.exit(main())
