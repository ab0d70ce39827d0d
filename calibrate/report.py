"""Write report.json, report.md and the trials plot of a calibration run (each written atomically)."""

from __future__ import annotations

import json
from pathlib import Path

from ..artifacts import atomic_path, write_atomic
from ..runtime import SPARSITY_FIGURES
from .evaluate import INTERVAL_LEVEL

HEADLINE_KEYS = ("dense_ppl", "sparse_ppl", "ppl_increase", "kl", *SPARSITY_FIGURES, "tokens")


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:+.4f}" if abs(value) < 1 and value < 0 else f"{value:.4f}"
    return str(value)


def interval_words(figures: dict) -> str:
    """`` (95% interval +a to +b over N documents)`` for figures with a ``ppl_increase_interval``, else ``""``."""
    interval = figures.get("ppl_increase_interval")
    if not interval:
        return ""
    documents = figures.get("documents")
    return (f" ({INTERVAL_LEVEL:.0%} interval {interval[0]:+.4f} to {interval[1]:+.4f}"
            + (f" over {documents} documents" if documents else "") + ")")


def budget_warning(report: dict) -> str | None:
    """One line if the held-out ppl_increase is above the recipe's budget (search.max_ppl_increase), else None."""
    held, budget = report["heldout"]["ppl_increase"], report["search"]["max_ppl_increase"]
    if held <= budget:
        return None
    return (f"held-out ppl_increase {held:+.4f} is above the recipe's budget {budget:g} (search.max_ppl_increase): "
            "the search and validation documents underestimated it; more of them (calibration.search_docs, "
            "search.validation_docs) or a smaller budget gives a choice that holds")


def _layer_error(report: dict) -> str:
    calibration = report.get("recipe", {}).get("calibration", {})
    if calibration.get("layer_error", "relative") == "kl":
        return (f"KL divergence (second order, from {calibration.get('gradient_samples')} sampled-token gradients "
                "per position)")
    return "relative MLP output error weighted by the residual ratio"


def render_markdown(report: dict) -> str:
    held = report["heldout"]
    warning = budget_warning(report)
    lines = [
        f"# CLADA calibration report: {report['model']['spec']}",
        "",
        f"Data: `{report['data']['spec']}` ({report['data']['calibration_docs']} calibration / "
        f"{report['data']['heldout_docs']} held-out documents). Regime: {report['regime']}.",
        "",
        "## Held-out figures (generation regime, measured in this run)",
        "",
        "| key | value |",
        "|---|---|",
    ]
    lines += [f"| {k} | {_fmt(held[k])}" + (interval_words(held) if k == "ppl_increase" else "")
              + (" **above the budget**" if k == "ppl_increase" and warning else "") + " |"
              for k in HEADLINE_KEYS if held.get(k) is not None]
    if warning:
        lines += ["", f"**Warning:** {warning}."]
    chosen = report["chosen"]
    derived = (f", derived by the validation from trial {chosen['derived_from']}"
               if chosen.get("derived_from") is not None else "")
    lines += [
        "",
        "## Chosen point",
        "",
        f"Trial {chosen['trial']}{derived} (constraint: proxy ppl_increase <= "
        f"{report['search']['max_ppl_increase']}, feasible trials: {report['search']['feasible_trials']} of "
        f"{report['search']['trials']}).",
        "",
        f"- lam = {chosen['lam']:.4f}, gam = {chosen['gam']:.4f}, tau_s = {chosen['tau_s']:.4f}, "
        f"tau_H = {chosen['tau_H']:.4f} (normalised nats, see docs/algorithm.md)",
        f"- prompt prior (prefix-driven sparsity): exponent {chosen.get('prefix', 0.0):.3f} on both MLP sides"
        + (" (none)" if not chosen.get("prefix") else "") + "",
        f"- allocated from per-layer error tables of {_layer_error(report)}",
        f"- compensated input sides (skipped channels stand for their calibration mean): layers "
        f"{', '.join(map(str, chosen.get('compensated_layers', []))) or 'none'}",
        "- proxy figures on calibration docs: " + ", ".join(f"{k}={v:.4f}" for k, v in chosen["proxy"].items()),
        "",
        "## Pareto front of the search (proxy, calibration docs)",
        "",
        "| trial | mlp_reads_saved | ppl_increase |",
        "|---|---|---|",
    ]
    lines += [f"| {p['trial']} | {p['mlp_reads_saved']:.4f} | {p['ppl_increase']:+.4f} |" for p in report["pareto_front"]]
    checks = report["search"].get("validation", [])
    if checks:
        lines += ["", f"## Validation of the best trials ({report['search']['validation_docs']} documents the search "
                  "never scored; each trial with adaptation beside its no-adaptation counterpart at the same reads "
                  "saved, the better standing for it; chosen: the first within the budget on average, then its level "
                  "filled up to the budget)", "",
                  "| trial | variant | mlp_reads_saved | ppl_increase search | validation | averaged | within budget "
                  "| chosen |", "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {c['trial']} | {c.get('variant', 'searched')} | {c['mlp_reads_saved']:.4f} | "
                  f"{c['search_ppl_increase']:+.4f} | {c['validation_ppl_increase']:+.4f} | "
                  f"{c['averaged_ppl_increase']:+.4f} | {'yes' if c['passes'] else 'no'} | "
                  f"{'yes' if c.get('chosen') else ''} |" for c in checks]
    lines += ["", "## Timings (s)", ""]
    lines += [f"- {k}: {v:.1f}" for k, v in report["timings_s"].items()]
    lines.append("")
    return "\n".join(lines)


def plot_trials(report: dict, path: Path) -> None:
    """Scatter of every trial (reads saved vs ppl increase), Pareto front, constraint, chosen point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trials = report["trials"]
    limit = report["search"]["max_ppl_increase"]
    fig, ax = plt.subplots(figsize=(6.5, 4.5), dpi=120)
    ok = [t for t in trials if t["ppl_increase"] <= limit]
    bad = [t for t in trials if t["ppl_increase"] > limit]
    ax.scatter([t["mlp_reads_saved"] for t in bad], [t["ppl_increase"] for t in bad], s=14, c="#bbbbbb", label="infeasible trial")
    ax.scatter([t["mlp_reads_saved"] for t in ok], [t["ppl_increase"] for t in ok], s=14, c="#4477aa", label="feasible trial")
    front = report["pareto_front"]
    ax.plot([p["mlp_reads_saved"] for p in front], [p["ppl_increase"] for p in front], c="#4477aa", lw=1, label="Pareto front")
    ax.axhline(limit, ls="--", c="#cc6677", lw=1, label=f"max ppl_increase {limit}")
    chosen, held = report["chosen"]["proxy"], report["heldout"]
    ax.scatter([chosen["mlp_reads_saved"]], [chosen["ppl_increase"]], marker="*", s=160, c="#ee7733", label="chosen (calibration)")
    ax.scatter([held["mlp_reads_saved"]], [held["ppl_increase"]], marker="D", s=50, c="#228833", label="chosen (held-out)")
    ax.set_xlabel("mlp_reads_saved (share of MLP weight bytes skipped)")
    ax.set_ylabel("ppl_increase (relative)")
    ax.set_yscale("symlog", linthresh=0.01)
    ax.set_title(f"CLADA search: {report['model']['spec']} on {report['data']['spec']}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def write_reports(report: dict, folder: Path) -> list[Path]:
    """report.json, report.md, trials.png in ``folder``; returns their paths."""
    json_path, md_path, png_path = folder / "report.json", folder / "report.md", folder / "trials.png"
    write_atomic(json_path, (json.dumps(report, indent=2, sort_keys=True) + "\n").encode())
    write_atomic(md_path, render_markdown(report).encode())
    plot_trials(report, png_path)
    return [json_path, md_path, png_path]
