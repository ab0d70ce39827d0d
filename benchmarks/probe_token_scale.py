"""Could a per-token signal lower a layer's error at equal bytes? Why the cognitive-load adaptation does not pay.

    python benchmarks/probe_token_scale.py     # ~5 min on 2 CPU cores

The keep rule compares every token's scores with one threshold per layer (times the adaptation's multiplier m_t).
To second order, skipping channel i of token t costs 0.5 * E[(g_t . d_ti)^2]: the layer's score |a_ti|·c_i squared
times the token's own sensitivity (g_t: the gradient of the model's log-likelihood with respect to the MLP output,
``output_gradients``), which differs between tokens. A rule that scaled each token's scores by a per-token signal
u_t, ``|a_ti|·c_i·(u_t / mean u)^beta`` (beta > 0: high-u tokens keep more), would follow that sensitivity if u
tracked it. On the default recipe's activation documents (the dense model; 1024 scored tokens), per layer and MLP
side, the probe skips the same share of (token, channel) entries by each rule and measures the second-order KL
(``measure.second_order_kl``, 8 gradient draws) relative to the plain rule (WINA, one threshold, no compensation).
The signals u_t (``SIGNALS``): two oracles of the token's own prediction, the runtime's two load signals, and a
table by the fed token that the runtime could know before the step at no cost.

Writes results/quality/token_scale_probe.json and .md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from script_io import command_line, write_results  # noqa: E402  (benchmarks/ is not a package)

from clada import runtime  # noqa: E402
from clada.calibrate.data import load_documents  # noqa: E402
from clada.calibrate.measure import (channel_weights, collect_mlp_inputs, output_gradients,  # noqa: E402
                                     score_quantiles, second_order_kl)
from clada.calibrate.models import load_model  # noqa: E402
from clada.calibrate.recipe import load_recipe  # noqa: E402
from clada.calibrate.splits import token_splits  # noqa: E402
from clada.runtime.rules import channel_scores  # noqa: E402
from clada.runtime.signals import load_signals  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
LAYERS = (1, 4, 8, 12, 15, 19, 22, 25, 28)
SKIPPED = {"in": (0.15, 0.3), "mid": (0.35, 0.5)}  # share of (token, channel) entries skipped per side
BETAS = (0.25, 0.5)
TOKENS, DRAWS = 1024, 8
SIGNALS = {  # u_t of the token fed at step t (p_t: the dense next-token distribution its forward computes)
    "impurity now": "1 - ||p_t||^2, the scale of the token's own Fisher information (an oracle: known after the step)",
    "entropy now": "normalised entropy of p_t (an oracle)",
    "entropy before": "normalised entropy of p_{t-1}: the runtime's H_t",
    "surprisal": "-ln p_{t-1}(x_t) / ln|V|: the runtime's s_t",
    "by fed token": "mean impurity after the fed token x_t, a vocabulary table from other calibration documents "
                    "(known before the step)",
}


@torch.no_grad()
def next_token_figures(model, tokens: torch.Tensor, batch: int = 8) -> dict[str, torch.Tensor]:
    """Per document and position t (B, T): impurity and normalised entropy of the dense next-token distribution p_t,
    and the normalised surprisal of token t under p_{t-1} (0 at t = 0)."""
    out: dict[str, list[torch.Tensor]] = {"impurity": [], "entropy": [], "surprisal": []}
    for start in range(0, tokens.shape[0], batch):
        ids = tokens[start : start + batch]
        logits = model(input_ids=ids).logits.float()
        out["entropy"].append(load_signals(logits, ids)[1])
        out["surprisal"].append(torch.nn.functional.pad(load_signals(logits[:, :-1], ids[:, 1:])[0], (1, 0)))
        out["impurity"].append(1 - torch.softmax(logits, -1).pow(2).sum(-1))
    return {k: torch.cat(v) for k, v in out.items()}


def token_signals(model, splits, prompt: int, rows: int) -> dict[str, torch.Tensor]:
    """(rows,) signal u_t of each scored token of the activation documents, in ``collect_mlp_inputs``' order."""
    per_doc = splits.act.shape[1] - prompt
    docs = -(-rows // per_doc)
    act = next_token_figures(model, splits.act[:docs])
    scored = lambda f, shift=0: f[:, prompt - shift : f.shape[1] - shift if shift else None].reshape(-1)[:rows]
    fed = splits.act[:docs, prompt:].reshape(-1)[:rows]
    other = torch.cat([splits.search, splits.validation])  # documents apart from the activation documents
    seen = next_token_figures(model, other)["impurity"][:, :-1].reshape(-1)
    ids = other[:, :-1].reshape(-1)
    vocab, k = model.config.vocab_size, 5.0  # table shrunk towards the mean by k pseudo-counts
    table = ((torch.zeros(vocab).index_add_(0, ids, seen) + k * seen.mean())
             / (torch.zeros(vocab).index_add_(0, ids, torch.ones_like(seen)) + k))
    return {"impurity now": scored(act["impurity"]), "entropy now": scored(act["entropy"]),
            "entropy before": scored(act["entropy"], 1), "surprisal": scored(act["surprisal"]),
            "by fed token": table[fed]}


def skip_mask(scores: torch.Tensor, share: float) -> torch.Tensor:
    """(N, C) bool: the ``share`` of entries with the lowest scores (one threshold over all tokens)."""
    return scores <= score_quantiles(scores, [share])[0]


@torch.no_grad()
def layer_errors(adapter, part, x: torch.Tensor, grads: torch.Tensor, w_in: torch.Tensor, w_mid: torch.Tensor,
                 signals: dict[str, torch.Tensor]) -> dict:
    """{side: {share: {rule: KL relative to the plain rule}}} of one layer (plain rule's KL under "plain")."""
    out_proj = getattr(part.owner, part.out_name)
    dtype = out_proj.weight.dtype
    mlp_mid = lambda h: out_proj(h.to(dtype)).float()
    mlp_in = lambda xx: mlp_mid(adapter.intermediate(part, xx.to(dtype)).float())
    h = adapter.intermediate(part, x.to(dtype)).float()
    y = mlp_mid(h)
    result = {}
    for side, shares in SKIPPED.items():
        act, weight = (x, w_in) if side == "in" else (h, w_mid)
        plain = channel_scores(act, weight)
        rules = {"plain": plain, **{f"{name} ^{beta}": plain * (u / u.mean()).pow(beta)[:, None]
                                    for name, u in signals.items() for beta in BETAS}}
        result[side] = {}
        for share in shares:
            errors = {}
            for rule, scores in rules.items():
                kept = act * ~skip_mask(scores, share)
                errors[rule] = float(second_order_kl(grads, (mlp_in(kept) if side == "in" else mlp_mid(kept)) - y))
            result[side][str(share)] = {"plain": errors["plain"],
                                        **{r: e / errors["plain"] for r, e in errors.items() if r != "plain"}}
    return result


def render(result: dict) -> str:
    rules = [r for r in result["layers"][str(LAYERS[0])]["in"][str(SKIPPED["in"][0])] if r != "plain"]
    md = ["# Per-token signals in the keep rule (probe)", "",
          f"`{result['command']}` ({result['minutes']} min): the default recipe's model and activation documents, "
          f"{result['tokens']} scored tokens, {DRAWS} gradient draws. Each cell: the layer's second-order KL when the "
          "scores are scaled by (u_t / mean u)^beta, relative to the plain rule, at the same share of entries "
          "skipped; below 1 the signal helps.", "",
          *[f"- `{name}`: {meaning}" for name, meaning in SIGNALS.items()], "",
          f"Correlation with `impurity now` (the oracle): " + ", ".join(
              f"{k} {v:.2f}" for k, v in result["correlation"].items()), "",
          "Geometric mean over layers " + ", ".join(map(str, LAYERS)) + ":", "",
          "| rule | " + " | ".join(f"{side} {share}" for side, shares in SKIPPED.items() for share in shares) + " |",
          "|---|" + "---:|" * sum(map(len, SKIPPED.values()))]
    for rule in rules:
        cells = []
        for side, shares in SKIPPED.items():
            for share in shares:
                v = torch.tensor([result["layers"][str(l)][side][str(share)][rule] for l in LAYERS])
                cells.append(f"{v.log().mean().exp():.3f} ({v.min():.2f}-{v.max():.2f})")
        md.append(f"| {rule} | " + " | ".join(cells) + " |")
    md += ["", "(min-max over layers in brackets.)", ""]
    return "\n".join(md)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default=str(ROOT / "recipes" / "smollm2-135m-threshold.yaml"))
    parser.add_argument("--out", default=str(ROOT / "results" / "quality"))
    args = parser.parse_args(argv)
    t0 = time.time()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    r = load_recipe(args.recipe)
    model, tokenizer, _ = load_model(r.model, r.dtype, r.device)
    adapter = runtime.adapter_for(model)
    splits = token_splits(r, tokenizer, load_documents(r.data).documents)
    xs = collect_mlp_inputs(model, adapter, splits.act, r.prompt_tokens, TOKENS)
    grads = output_gradients(model, adapter, splits.act, r.prompt_tokens, TOKENS, DRAWS, seed=r.seed + 1)
    w_in, w_mid = channel_weights(model, adapter, "wina")
    signals = token_signals(model, splits, r.prompt_tokens, xs[0].shape[0])
    oracle = signals["impurity now"]
    correlation = {k: float(torch.corrcoef(torch.stack([oracle, v]))[0, 1]) for k, v in signals.items()
                   if k != "impurity now"}
    parts = adapter.mlp_parts(model)
    layers = {}
    for l in LAYERS:
        layers[str(l)] = layer_errors(adapter, parts[l], xs[l].float(), grads[l], w_in[l], w_mid[l], signals)
        print(f"layer {l}: " + json.dumps({s: {q: {k: round(v, 3) for k, v in d.items() if k != "plain"}
                                              for q, d in v.items()} for s, v in layers[str(l)].items()}), flush=True)
    result = {"command": command_line("probe_token_scale.py", argv), "minutes": round((time.time() - t0) / 60, 1),
              "model": r.model, "tokens": int(xs[0].shape[0]), "draws": DRAWS, "correlation": correlation,
              "layers": layers}
    write_results(args.out, "token_scale_probe", result, render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
