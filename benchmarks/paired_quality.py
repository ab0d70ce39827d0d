"""CLADA against a peer at equal MLP reads saved, document by document: a paired interval at each level.

    python benchmarks/paired_quality.py        # ~20 min on 2 CPU cores, after clada-calibrate of the default recipe

The frontier (bench_quality.py) compares means. Two methods measured on the same documents share each document's
difficulty, so their difference per document spreads far less than either figure does, and only that difference
can say whether one is below the other. On the frontier's documents (32 held-out lee, 32 enwiki; 64-token dense
prefill, 128 scored tokens, teacher forced where that is exact), CLADA at each level (bench_quality.run_clada's
construction: the default trial's allocation shape, its price moved, its rule from ``level_rule``) and the peer (TEAL-greedy by default) at its
frontier levels are measured. The peer's per-document figures are interpolated linearly in reads saved to CLADA's
reads saved, and the per-document difference (NLL increase in nats, whose mean is log(1 + ppl_increase); KL) gets
a 95% bootstrap interval over documents (``clada.calibrate.evaluate.bootstrap_interval``). Negative: CLADA lower.
Writes results/quality/paired.json and paired.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_quality as bq  # noqa: E402  (benchmarks/ is not a package)
from script_io import command_line, number_list, write_results  # noqa: E402

from clada.calibrate.evaluate import bootstrap_interval  # noqa: E402
from clada.calibrate.methods import build_method  # noqa: E402

FIGURES = {"nll_increase": "NLL increase (nats)", "kl": "KL (nats)"}  # per-document figures compared


def measure(bench: bq.Bench, method, label: str, level: float) -> dict:
    """Reads saved, means and per-document figures of an attached ``method`` on every data set; detaches it."""
    row = {"method": label, "level": level}
    try:
        for data in bq.DATASETS:
            f = bench.figures(method, data)
            row[data] = {"mlp_reads_saved": f["mlp_reads_saved"], "ppl_increase": f["ppl_increase"], "kl": f["kl"],
                         "per_document": f["per_document"]}
    finally:
        method.remove()
    bq.log(f"{label:12s} {level:.2f}: " + " | ".join(
        f"{d} reads {row[d]['mlp_reads_saved']:.4f} ppl+ {row[d]['ppl_increase']:+.4f} kl {row[d]['kl']:.5f}"
        for d in bq.DATASETS))
    return row


def paired(mine: dict, peer_rows: list[dict], data: str, figure: str) -> dict | None:
    """``mine``'s per-document ``figure`` on ``data`` minus the peer's, interpolated to ``mine``'s reads saved
    between the peer's two neighbouring points; None where those reads lie outside the peer's points."""
    x = mine[data]["mlp_reads_saved"]
    points = sorted(peer_rows, key=lambda r: r[data]["mlp_reads_saved"])
    for a, b in zip(points, points[1:]):
        x0, x1 = a[data]["mlp_reads_saved"], b[data]["mlp_reads_saved"]
        if x0 <= x <= x1 and x1 > x0:
            w = (x - x0) / (x1 - x0)
            of = lambda row: torch.tensor(row[data]["per_document"][figure], dtype=torch.float64)
            peer = (1 - w) * of(a) + w * of(b)
            diff = of(mine) - peer
            return {"mine": float(of(mine).mean()), "peer": float(peer.mean()),
                    "difference": float(diff.mean()), "interval": bootstrap_interval(diff),
                    "lower_on": int((diff < 0).sum()), "documents": int(diff.numel())}
    return None


def render(result: dict) -> str:
    peer = result["peer"]
    md = [f"# CLADA vs {peer}, paired by document", "",
          f"`{result['command']}` ({result['minutes']} min, {result['threads']} CPU threads, torch {result['torch']}). "
          f"Model `{result['model']}`; study `{result['study']}`, trial {result['trial']}. Per document: the mean over "
          "its scored tokens of the NLL increase (nats; the mean over documents is log(1 + ppl_increase)) and of "
          f"KL(dense || sparse). {peer} interpolated linearly in MLP reads saved to CLADA's; difference = CLADA - "
          f"{peer} (negative: CLADA lower), 95% bootstrap interval over documents; `lower on`: documents where CLADA "
          "is lower.", ""]
    for data in bq.DATASETS:
        md += [f"`{data}`:", "",
               "| level | rule | CLADA reads saved | CLADA ppl_increase | " + " | ".join(
                   f"{name}: CLADA / {peer} / difference (95%) / lower on" for name in FIGURES.values()) + " |",
               "|---:|---|---:|---:|" + "---|" * len(FIGURES)]
        for row in result["clada"]:
            cells = []
            for figure in FIGURES:
                p = row["paired"][data][figure]
                cells.append("outside the peer's points" if p is None else
                             f"{p['mine']:.5f} / {p['peer']:.5f} / **{p['difference']:+.5f}** ({p['interval'][0]:+.5f} "
                             f"to {p['interval'][1]:+.5f}) / {p['lower_on']} of {p['documents']}")
            md.append(f"| {row['level']:.2f} | {row['rule']} | "
                      f"{row[data]['mlp_reads_saved']:.4f} | {row[data]['ppl_increase']:+.4f} | "
                      + " | ".join(cells) + " |")
        md.append("")
    md += [f"{peer}'s points:", "", "| level | " + " | ".join(f"{d} reads saved / ppl_increase / kl" for d in bq.DATASETS)
           + " |", "|---:|" + "---|" * len(bq.DATASETS)]
    for row in result["peer_rows"]:
        md.append(f"| {row['level']} | " + " | ".join(
            f"{row[d]['mlp_reads_saved']:.4f} / {row[d]['ppl_increase']:+.4f} / {row[d]['kl']:.5f}" for d in bq.DATASETS)
                  + " |")
    return "\n".join(md) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default=str(bq.ROOT / "recipes" / "smollm2-135m.yaml"))
    parser.add_argument("--study-dir", default=None, help="Calibration output folder (default: the recipe's output).")
    parser.add_argument("--peer", default="teal-greedy", choices=sorted(bq.THRESHOLD_BASELINES))
    parser.add_argument("--levels", type=number_list, default=[0.10, 0.15, 0.20, 0.25, 0.30, 0.35],
                        help="CLADA's levels: MLP reads saved in the error tables (comma-separated).")
    parser.add_argument("--docs", type=int, default=32, help="Documents per data set.")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--out", default=str(bq.ROOT / "results" / "quality"))
    args = parser.parse_args(argv)
    args.greedy_prompts, args.greedy_tokens = 0, bq.GREEDY_TOKENS  # no greedy agreement here
    study_dir, default = bq.default_of_study(parser, args)
    t0 = time.time()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    bench = bq.Bench(args)
    search, chosen, check = bq.study_search(bench, study_dir, default)
    bq.log(f"study {check['study']}: trial {check['trial']} reproduces the default artifact to {check['max_abs_diff']:.1e}")
    clada = []
    for level in args.levels:
        params, choice = bq.level_rule(search, chosen["params"], level)
        artifact = search.artifact_of(search.point_at_saved(params, level, plain=False))
        clada.append({**measure(bench, build_method("clada", bench.model, artifact=artifact), "clada", level),
                      "rule": artifact.rule.get("name", "threshold"), **choice})
    peer_rows = [measure(bench, method, name, q)
                 for name, q, method in bq.baseline_methods(bench, {args.peer: bq.LEVELS[args.peer]})]
    for row in clada:
        row["paired"] = {d: {f: paired(row, peer_rows, d, f) for f in FIGURES} for d in bq.DATASETS}
    result = {"command": command_line("paired_quality.py", argv), "minutes": round((time.time() - t0) / 60, 1), "threads": torch.get_num_threads(),
              "torch": torch.__version__, "model": bench.recipe.model, "study": check["study"],
              "trial": check["trial"], "peer": args.peer, "clada": clada, "peer_rows": peer_rows}
    write_results(args.out, "paired", result, render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
