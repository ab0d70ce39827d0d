"""Render results/quality/frontier.md and frontier.png from frontier.json (written by bench_quality.py).

    python benchmarks/frontier_report.py [results/quality]     # re-render without re-measuring
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from clada.artifacts import atomic_path, write_atomic

DATASETS = ("lee", "enwiki")
METHOD_ORDER = ("uniform", "cats", "griffin", "teal", "teal-greedy", "clada-earlier", "clada-noadapt", "clada-nocomp",
                "clada-noprefix", "clada")
ABLATIONS = ("clada", "clada-surprisal", "clada-entropy", "clada-noadapt", "clada-nocomp", "clada-noprefix")
READS_GRID = (0.10, 0.15, 0.20, 0.25, 0.30, 0.35)
TARGET = {"lee": 0.02, "enwiki": 0.04}  # issue 3: reads saved >= TARGET_READS at these ppl_increase
TARGET_READS = 0.20
TARGET_17 = {"lee": 0.015, "enwiki": 0.02}  # issue 17: reads saved >= TARGET_READS_17 at these
TARGET_READS_17 = 0.25
FIGURE_FORMAT = {"ppl_increase": "+.4f", "kl": ".4f"}  # the figures compared at equal reads saved


def lines(rows: list[dict]) -> dict[str, list[dict]]:
    """Frontier rows per method (dense first), each line sorted by reads saved on held-out lee."""
    out: dict[str, list[dict]] = {}
    for row in rows:
        out.setdefault(row["method"], []).append(row)
    return {m: sorted(out[m], key=lambda r: r["lee"]["mlp_reads_saved"]) for m in METHOD_ORDER if m in out}


def interpolate(points: list[tuple[float, float]], x: float) -> float | None:
    """Piecewise-linear y at x through points sorted by x; None outside their range."""
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 <= x <= x1 and x1 > x0:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return points[0][1] if len(points) == 1 and abs(points[0][0] - x) < 1e-9 else None


def _f(value, fmt: str = ".4f") -> str:
    return "—" if value is None else format(value, fmt)


def curve(rows: list[dict], data: str, figure: str) -> list[tuple[float, float]]:
    """(mlp_reads_saved, ``figure``) of a method's ``rows`` on ``data``, sorted by reads saved."""
    return sorted((r[data]["mlp_reads_saved"], r[data][figure]) for r in rows)


def equal_reads_table(by_method: dict[str, list[dict]], data: str, figure: str = "ppl_increase") -> list[str]:
    """Each method's ``figure`` interpolated at READS_GRID (markdown rows)."""
    fmt = FIGURE_FORMAT[figure]
    out = [f"| method | " + " | ".join(f"reads {x:.2f}" for x in READS_GRID) + " |",
           "|---|" + "---:|" * len(READS_GRID)]
    for method, rows in by_method.items():
        pts = curve(rows, data, figure)
        out.append(f"| {method} | " + " | ".join(_f(interpolate(pts, x), fmt) for x in READS_GRID) + " |")
    return out


def points_table(by_method: dict[str, list[dict]]) -> list[str]:
    out = ["| method | level | lee reads saved | lee neuron / input sparsity | lee ppl_increase | lee kl | "
           "enwiki reads saved | enwiki ppl_increase | enwiki kl | greedy agreement |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for method, rows in by_method.items():
        for r in rows:
            lee, wiki = r["lee"], r["enwiki"]
            out.append(f"| {method} | {r['level']} | {lee['mlp_reads_saved']:.3f} | {lee['mlp_sparsity']:.2f} / "
                       f"{lee['input_sparsity']:.2f} | {lee['ppl_increase']:+.4f} | {lee['kl']:.4f} | "
                       f"{wiki['mlp_reads_saved']:.3f} | {wiki['ppl_increase']:+.4f} | {wiki['kl']:.4f} | "
                       f"{r['greedy_agreement']:.3f} |")
    return out


def clada_table(rows: list[dict]) -> list[str]:
    """One row per CLADA level: the full method and its two ablations at that level."""
    out = ["| level (tables) | rule | compensated layers | lee reads saved (all weights) | lee ppl_increase | enwiki reads saved | "
           "enwiki ppl_increase | no-adapt lee reads / ppl_increase | no-comp lee reads / ppl_increase | "
           "no-comp enwiki ppl_increase | greedy agreement |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    by = {(r["method"], str(r["level"])): r for r in rows}
    for r in rows:
        if r["method"] != "clada":
            continue
        n, c = by.get(("clada-noadapt", str(r["level"]))), by.get(("clada-nocomp", str(r["level"])))
        pair = lambda x, d="lee": "—" if x is None else f"{x[d]['mlp_reads_saved']:.3f} / {x[d]['ppl_increase']:+.4f}"
        every = r["lee"].get("reads_saved")
        out.append(f"| {r['level']} | {_rule_cell(r)} | {r.get('compensated_layers', '—')} | {r['lee']['mlp_reads_saved']:.3f} "
                   f"({_f(every, '.3f')}) | "
                   f"{r['lee']['ppl_increase']:+.4f} | {r['enwiki']['mlp_reads_saved']:.3f} | "
                   f"{r['enwiki']['ppl_increase']:+.4f} | {pair(n)} | {pair(c)} | "
                   f"{_f(c and c['enwiki']['ppl_increase'], '+.4f')} | {r['greedy_agreement']:.3f} |")
    return out


def _rule_cell(row: dict) -> str:
    """A CLADA row's sparsity rule (mixed: with the number of layers the predictor decides), with the search
    documents' KL of each rule it was chosen from (rule auto)."""
    proxy = row.get("rule_proxy")
    rule = row.get("rule", "threshold")  # rows from before the rule was recorded: the threshold rule
    if "predicted_layers" in row:
        rule = f"{rule} ({row['predicted_layers']} layers predicted)"
    if not proxy:
        return rule
    kls = " / ".join(f"{name} {figures['kl']:.4f}" for name, figures in proxy.items())
    return f"{rule} (kl {kls})"


def against(by_method: dict[str, list[dict]], method: str, peer: str, data: str,
            figure: str = "ppl_increase") -> str:
    """Where ``method``'s interpolated ``figure`` is at or below ``peer``'s on READS_GRID, in words."""
    fmt = FIGURE_FORMAT[figure]
    mine, theirs = curve(by_method.get(method, []), data, figure), curve(by_method.get(peer, []), data, figure)
    cells = []
    for x in READS_GRID:
        a, b = interpolate(mine, x), interpolate(theirs, x)
        cells.append(f"{x:.2f}: " + ("—" if a is None or b is None else ("yes" if a <= b else "no") +
                                     f" ({a:{fmt}} vs {b:{fmt}})"))
    return f"`{data}`: " + "; ".join(cells)


def _met_17(d: dict) -> bool:
    return (d["lee"]["mlp_reads_saved"] >= TARGET_READS_17 and d["lee"]["ppl_increase"] <= TARGET_17["lee"]
            and d["enwiki"]["ppl_increase"] <= TARGET_17["enwiki"])


def _greedy_origin(src: dict) -> str:
    """Where the reused baseline rows' greedy agreement was measured, as the end of a sentence."""
    if src.get("greedy_remeasured"):
        return "; their greedy agreement re-measured by this run."
    if src.get("greedy_from"):
        return f"; their greedy agreement measured by `{src['greedy_from']}`."
    return "."


def render_markdown(result: dict) -> str:
    by_method = lines(result["rows"])
    default = {r["method"]: r for r in result["ablations"]}
    d = default["clada"]
    ok_lee = d["lee"]["mlp_reads_saved"] >= TARGET_READS and d["lee"]["ppl_increase"] <= TARGET["lee"]
    ok_wiki = d["enwiki"]["ppl_increase"] <= TARGET["enwiki"]
    rec = result["reconstruction"]
    r = result["recipe"]
    md = [
        "# Sparsity–quality frontier: SmolLM2-135M, baselines vs CLADA",
        "",
        f"Command: `{result['command']}` ({result['minutes']} min, {result['threads']} CPU threads, torch {result['torch']})"
        + (" — **quick smoke run, not for the record**" if result["quick"] else ""),
        "",
    ]
    if result.get("baselines_from"):
        src = result["baselines_from"]
        earlier = [row.get("study", src["study"]) for row in result["rows"] if row["method"] == "clada-earlier"]
        md += [f"Baseline rows" + (f" (and `clada-earlier`: the CLADA points of study `{earlier[0]}`, whose greedy agreement is "
                                   "the earlier run's)" if earlier else "")
               + f" reused from `{src['file']}`, measured by `{src['command']}` on the same model, documents and "
               "settings" + _greedy_origin(src)
               + (" Measured by this run (missing there, or `--measure-again`): " + ", ".join(src["measured_here"])
                  + "." if src.get("measured_here") else ""), ""]
    md += [
        f"Model `{r['model']}`, {r['dtype']}. Data: {result['data']['lee']} held-out `lee` documents (never seen by the "
        f"calibration) and {result['data']['enwiki']} `enwiki` documents; each scored on {result['scored_tokens']} tokens after a "
        f"dense prefill of {result['prompt_tokens']} (dense perplexity {result['dense_ppl']['lee']:.2f} / "
        f"{result['dense_ppl']['enwiki']:.2f}). `mlp_reads_saved`: share of MLP weight bytes (gate, up, down) a decode "
        "step does not read. `greedy_agreement`: share of identical tokens vs dense over "
        f"{result['greedy']['tokens']} greedy tokens from {result['greedy']['prompts']} held-out lee prompts.",
        "",
        "## Targets with the default artifact",
        "",
        f"`{result['default_artifact']}`: held-out lee reads saved **{d['lee']['mlp_reads_saved']:.3f}** at ppl_increase "
        f"**{d['lee']['ppl_increase']:+.4f}** (target >= {TARGET_READS} at <= {TARGET['lee']}: **{'met' if ok_lee else 'not met'}**); "
        f"enwiki ppl_increase **{d['enwiki']['ppl_increase']:+.4f}** at reads {d['enwiki']['mlp_reads_saved']:.3f} "
        f"(target <= {TARGET['enwiki']}: **{'met' if ok_wiki else 'not met'}**).",
        "",
        f"Issue 17 (reads saved >= {TARGET_READS_17} at ppl_increase <= {TARGET_17['lee']} on lee, <= "
        f"{TARGET_17['enwiki']} on enwiki): **{'met' if _met_17(d) else 'not met'}**.",
        "",
        "## ppl_increase at equal reads saved (linear interpolation between each method's measured points)",
        "",
        "CLADA at or below teal-greedy: " + " — ".join(against(by_method, "clada", "teal-greedy", x) for x in DATASETS),
        "",
    ]
    for data in DATASETS:
        md += [f"Held-out `{data}`:" if data == "lee" else f"`{data}`:", ""] + equal_reads_table(by_method, data) + [""]
    md += ["## KL divergence at equal reads saved (the search's own unit; same interpolation)", "",
           "Mean KL(dense || sparse) per scored token, nats. Unlike ppl_increase it cannot cancel (a sparse model "
           "that is more confident on some tokens and less on others), so it moves less between nearby points.", "",
           "CLADA at or below teal-greedy: " + " — ".join(against(by_method, "clada", "teal-greedy", x, "kl")
                                                          for x in DATASETS), ""]
    for data in DATASETS:
        md += [f"Held-out `{data}`:" if data == "lee" else f"`{data}`:", ""] + equal_reads_table(by_method, data,
                                                                                                 "kl") + [""]
    md += ["![frontier](frontier.png)", "", "## Every measured point", ""] + points_table(by_method) + [""]
    same = [r for r in result["rows"] if r.get("same_as")]
    if same:
        md += ["Not measured again, since they decode exactly like an earlier row (`Artifact.decode_digest`: e.g. no "
               "adaptation to drop): " + "; ".join(f"{r['method']} {r['level']} = {r['same_as']}" for r in same) + ".",
               ""]
    md += ["## CLADA at each level, with its ablations",
           "",
           f"Study `{rec['study']}` ({rec['trials']} trials): the default artifact's trial {rec['trial']} (reproduced "
           f"from the study to {rec['max_abs_diff']:.1e}) gives the allocation's shape and the adaptation; its price is "
           "moved so that the per-layer error tables skip each level's share of the MLP bytes at the base thresholds "
           "(per-token relaxation then skips a little less). `clada-nocomp` is allocated at the same level from the "
           "uncompensated rows, `clada-noadapt` has the same thresholds without adaptation, `clada-noprefix` (where the "
           "default artifact has a prompt prior) the same thresholds without the prior."
           + (" With `calibration.rule: auto` each level takes the sparsity rule whose point there has the smaller KL "
              "on the calibration's search documents (in brackets: each rule's; held-out documents play no part)."
              if any(row.get("rule_proxy") for row in result["rows"]) else ""),
           ""] + clada_table(result["rows"]) + [""]
    md += ["## Ablation of the default artifact", "",
           "| variant | lam | gam | lee reads saved | lee ppl_increase | lee kl | relaxed share | enwiki reads saved | "
           "enwiki ppl_increase | greedy agreement |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name in ABLATIONS:
        if name not in default:  # clada-noprefix: only where the default artifact has a prompt prior
            continue
        a = default[name]
        md.append(f"| {name} | {a['lam']:+.3f} | {a['gam']:+.3f} | {a['lee']['mlp_reads_saved']:.3f} | {a['lee']['ppl_increase']:+.4f} | {a['lee']['kl']:.4f} | "
                  f"{a['lee']['relaxed_share']:.3f} | {a['enwiki']['mlp_reads_saved']:.3f} | "
                  f"{a['enwiki']['ppl_increase']:+.4f} | {a['greedy_agreement']:.3f} |")
    md += ["", "## Threshold sensitivity (default artifact, held-out lee, generation regime)", "",
            "tau_s and tau_H moved by ±0.2 (normalised nats: nats / ln|V|), one at a time.", "",
            "| variant | tau_s | tau_H | reads saved | Δ reads saved | ppl_increase | Δ ppl_increase | relaxed share |",
            "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for s in result["sensitivity"]:
        md.append(f"| {s['variant']} | {s['tau_s']:.3f} | {s['tau_H']:.3f} | {s['mlp_reads_saved']:.4f} | "
                  f"{s['d_mlp_reads_saved']:+.4f} | {s['ppl_increase']:+.4f} | {s['d_ppl_increase']:+.4f} | "
                  f"{s['relaxed_share']:.3f} |")
    md += ["", "## Multiple choice (BIG-bench 1.0.0, zero-shot log-likelihood, default artifact)", ""]
    if not result["mc"]:
        md += ["Not measured by this run (`--mc` named no task).", ""]
        return "\n".join(md)
    md += ["| task | questions | chance | accuracy dense | accuracy CLADA | same choice |", "|---|---:|---:|---:|---:|---:|"]
    for spec, m in result["mc"].items():
        md.append(f"| {spec} | {m['questions']} | {m['chance']:.3f} | {m['accuracy_dense']:.3f} | "
                  f"{m['accuracy_sparse']:.3f} | {m['same_choice']:.3f} |")
    md += ["", "Context = dense prefill, choice tokens = sparse decode steps (the generation regime).", ""]
    return "\n".join(md)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_method = lines(result["rows"])
    default = {r["method"]: r for r in result["ablations"]}["clada"]
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.2))
    for ax, data in zip(axes, DATASETS):
        for method, rows in by_method.items():
            pts = sorted((r[data]["mlp_reads_saved"], r[data]["ppl_increase"]) for r in rows)
            style = {"clada": dict(lw=2.4, color="black"), "clada-noadapt": dict(ls="--", color="gray"),
                     "clada-nocomp": dict(ls="-.", color="gray"), "clada-noprefix": dict(ls=(0, (5, 1)), color="gray"),
                     "clada-earlier": dict(ls=":", color="gray", lw=1)}.get(method, {})
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=4, label=method, **style)
        ax.plot(default[data]["mlp_reads_saved"], default[data]["ppl_increase"], marker="*", ms=16, color="gold",
                mec="black", ls="", label="default artifact", zorder=5)
        ax.axhline(TARGET[data], color="red", lw=0.8, ls=":")
        if data == "lee":
            ax.axvline(TARGET_READS, color="red", lw=0.8, ls=":")
        ax.set_yscale("symlog", linthresh=0.01)
        ax.set_xlim(0, 0.45)
        ax.set_ylim(-0.03, 1.0)
        ax.set_xlabel("mlp_reads_saved (share of MLP weight bytes not read per decode step)")
        ax.set_ylabel("ppl_increase (symlog)")
        ax.set_title("held-out lee" if data == "lee" else "enwiki")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="upper left")
    fig.suptitle("SmolLM2-135M: perplexity increase vs MLP reads saved (lower right is better)")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def render(result: dict, out: Path) -> None:
    """Write frontier.md and frontier.png into ``out``."""
    write_atomic(out / "frontier.md", (render_markdown(result) + "\n").encode())
    plot(result, out / "frontier.png")


if __name__ == "__main__":
    folder = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent / "results" / "quality")
    render(json.loads((folder / "frontier.json").read_text()), folder)
