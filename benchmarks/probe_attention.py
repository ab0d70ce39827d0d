"""Does skipping attention-projection reads pay, beside the MLP's? A probe before the runtime sparsifies them.

    nice -n 15 python benchmarks/probe_attention.py          # about 10 min on 2 CPU cores

On the recipe's model and held-out lee documents (as bench_quality: 32 docs, 128 scored tokens after a dense
prefill of 64, teacher forced), each decode position skips, per layer, the share ``s`` of the attention input's
channels (the columns of q, k and v, one mask) and of the attention output's channels (the columns of o) with the
smallest WINA scores |x_j| * ||W[:, j]|| (per-token top-k; forward pre-hooks, no runtime kernel). It is measured
alone and on top of the default artifact without adaptation (``clada-noadapt``), and every point gets
``reads_saved`` over all weight bytes a decode step reads (attention, MLP, head). Beside it, bench_quality's
``clada-noadapt`` rows (results/quality/frontier.json, same documents) show what the MLP alone costs at the same
``reads_saved``. Writes results/quality/attention_probe.json and .md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from clada import runtime
from clada.artifacts import load_artifact, write_atomic
from clada.calibrate.data import load_documents
from clada.calibrate.evaluate import TeacherForcedEvaluator
from clada.calibrate.methods import build_method
from clada.calibrate.models import load_model
from clada.calibrate.pipeline import ARTIFACT_NAME, token_splits
from clada.calibrate.recipe import load_recipe

ROOT = Path(__file__).resolve().parent.parent
SHARES = (0.1, 0.2, 0.3, 0.4)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def top_k_keep(x: torch.Tensor, weight: torch.Tensor, share: float) -> torch.Tensor:
    """x (..., C) with, per row, the ``share`` of channels of smallest |x|*weight set to 0."""
    skip = int(round(share * x.shape[-1]))
    if skip == 0:
        return x
    scores = x.abs() * weight
    cut = scores.kthvalue(skip, dim=-1, keepdim=True).values
    return x * (scores > cut)


@contextmanager
def attention_top_k(model, share: float):
    """While open, every attention block of ``model`` skips ``share`` of its input and output channels (one mask
    per input, shared by the projections that read it). Yields the weight bytes skipped per token."""
    adapter = runtime.adapter_for(model)
    hooks, skipped = [], 0.0
    for part in adapter.attention_parts(model):
        ins = [getattr(part.owner, n) for n in part.in_names]
        out = getattr(part.owner, part.out_name)
        w_in = torch.cat([adapter.weight(m) for m in ins]).norm(dim=0)
        w_out = adapter.weight(out).norm(dim=0)
        last: list = [None, None]  # (input, its masked copy): q, k and v read the same tensor

        def masked_in(module, args, w=w_in, last=last):
            if args[0] is not last[0]:
                last[:] = [args[0], top_k_keep(args[0], w, share)]
            return (last[1], *args[1:])

        hooks += [m.register_forward_pre_hook(masked_in) for m in ins]
        hooks.append(out.register_forward_pre_hook(lambda module, args, w=w_out: (top_k_keep(args[0], w, share),
                                                                                   *args[1:])))
        skipped += share * sum(adapter.projection_bytes(part))
    try:
        yield skipped
    finally:
        for h in hooks:
            h.remove()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default=str(ROOT / "recipes" / "smollm2-135m-threshold.yaml"))
    parser.add_argument("--docs", type=int, default=32)
    parser.add_argument("--out", default=str(ROOT / "results" / "quality"))
    args = parser.parse_args(argv)
    t0 = time.time()
    r = load_recipe(args.recipe)
    model, tokenizer, _ = load_model(r.model, r.dtype, r.device)
    adapter = runtime.adapter_for(model)
    tokens = token_splits(r, tokenizer, load_documents(r.data).documents).held[: args.docs]
    default = load_artifact(ROOT / r.output / ARTIFACT_NAME)
    decode_bytes = adapter.decode_weight_bytes(model)
    reference = TeacherForcedEvaluator(model, tokens, r.prompt_tokens, r.eval.batch_size)
    rows = []
    for base in ("dense", "clada-noadapt"):
        for share in (0.0, *SHARES):
            if base == "dense" and share == 0.0:
                continue
            method = build_method(base, model, artifact=default if base != "dense" else None)
            try:
                with attention_top_k(model, share) as attn_skipped:
                    figures = reference(method)
            finally:
                method.remove()
            mlp_skipped = (figures["reads_saved"] or 0.0) * decode_bytes
            row = {"mlp": base, "attention_share": share, "ppl_increase": figures["ppl_increase"], "kl": figures["kl"],
                   "mlp_reads_saved": figures["mlp_reads_saved"] if base != "dense" else 0.0,
                   "attention_reads_saved": attn_skipped / decode_bytes,
                   "reads_saved": (mlp_skipped + attn_skipped) / decode_bytes}
            rows.append(row)
            log(f"{base:14s} attention {share:.1f}: reads_saved {row['reads_saved']:.4f} "
                f"ppl+ {row['ppl_increase']:+.4f}")
    frontier = json.loads((Path(args.out) / "frontier.json").read_text())
    mlp_weight_share = sum(sum(adapter.projection_bytes(p)) for p in adapter.mlp_parts(model)) / decode_bytes
    mlp_only = sorted(((row["lee"]["mlp_reads_saved"] * mlp_weight_share, row["lee"]["ppl_increase"], row["level"])
                       for row in frontier["rows"] if row["method"] == "clada-noadapt"))
    result = {"command": "nice -n 15 python benchmarks/probe_attention.py" + "".join(f" {a}" for a in (argv or sys.argv[1:])),
              "minutes": round((time.time() - t0) / 60, 1), "threads": torch.get_num_threads(),
              "torch": torch.__version__, "model": r.model, "docs": int(tokens.shape[0]),
              "default_artifact": str(ROOT / r.output / ARTIFACT_NAME), "mlp_weight_share": mlp_weight_share,
              "rows": rows, "mlp_only_from_frontier": mlp_only}
    out = Path(args.out)
    write_atomic(out / "attention_probe.json", (json.dumps(result, indent=1) + "\n").encode())
    write_atomic(out / "attention_probe.md", (render(result) + "\n").encode())
    log(f"wrote {out / 'attention_probe.md'} in {result['minutes']} min")


def render(result: dict) -> str:
    md = ["# Attention projections: what skipping their reads costs (probe)", "",
          f"Command: `{result['command']}` ({result['minutes']} min, {result['threads']} CPU threads, torch "
          f"{result['torch']}). Model `{result['model']}`, {result['docs']} held-out lee documents, teacher forced "
          "(exact without adaptation). Per-token top-k on WINA scores over the attention input (q, k, v columns, one "
          "mask) and output (o columns), the same share on both; `reads_saved` over every weight byte a decode step "
          f"reads (the MLPs are {result['mlp_weight_share']:.3f} of them). MLP: nothing skipped (`dense`) or the "
          f"default artifact `{result['default_artifact']}` without adaptation (`clada-noadapt`).", "",
          "| MLP | attention share skipped | attention reads_saved | MLP reads saved | reads_saved (all) | ppl_increase | kl |",
          "|---|---:|---:|---:|---:|---:|---:|"]
    for row in result["rows"]:
        md.append(f"| {row['mlp']} | {row['attention_share']:.1f} | {row['attention_reads_saved']:.4f} | "
                  f"{row['mlp_reads_saved']:.3f} | {row['reads_saved']:.4f} | {row['ppl_increase']:+.4f} | "
                  f"{row['kl']:.4f} |")
    md += ["", "The MLP alone at other levels (results/quality/frontier.json, `clada-noadapt`, same documents):", "",
           "| level | reads_saved (all) | ppl_increase |", "|---|---:|---:|"]
    md += [f"| {level} | {reads:.4f} | {ppl:+.4f} |" for reads, ppl, level in result["mlp_only_from_frontier"]]
    return "\n".join(md)


if __name__ == "__main__":
    main()
