"""Prompt-lookup (speculative) decoding, dense vs CLADA: acceptance rate and tokens/s from one run.

    python benchmarks/bench_speculative.py --artifact out/smollm2-135m/clada.safetensors [--model smollm2-135m]
        [--prompts 8] [--prompt-tokens 128] [--new-tokens 64] [--lookup 4] [--json OUT]

Each of ``--prompts`` held-out prompts (batch 1: transformers' prompt lookup takes one sequence) is generated
greedily with ``prompt_lookup_num_tokens=--lookup`` and without it, by the dense model and by the patched model
(``runtime.apply`` / ``remove`` around each CLADA run), in turn, so that drift on a busy host hits every mode
alike. Main-model calls are counted by a forward pre-hook: a verification call feeds the last token and the
draft, so drafted = positions - calls, accepted = new tokens - calls (each call yields its accepted draft tokens
plus one of its own), acceptance = accepted / drafted. tok/s = new tokens / generate seconds (prefill
included; medians over prompts with min-max spread). The CLADA run's ``runtime.stats()['decode_steps']`` is
printed too: its multi-token positions are the verification positions that ran sparse.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from clada import runtime
from clada.artifacts import load_artifact, write_atomic
from clada.calibrate.bench import bench_texts, text_prompts
from clada.calibrate.models import load_model
from clada.runtime.machine import cpu_info

MODES = ("dense", "clada")


class CallCounter:
    """Counts a model's forward calls on top of a cache and the positions they feed."""

    def __init__(self, model):
        self.reset()
        self.hook = model.register_forward_pre_hook(self._count, with_kwargs=True)

    def _count(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None and self.seen_prefill:
            self.calls += 1
            self.positions += ids.shape[1]
        self.seen_prefill = True

    def reset(self) -> None:
        self.calls = self.positions = 0
        self.seen_prefill = False


def generate(model, ids: torch.Tensor, new_tokens: int, lookup: int | None, counter: CallCounter) -> dict:
    """One greedy generate of exactly ``new_tokens``: seconds, calls after prefill, positions fed, accepted."""
    counter.reset()
    extra = {"prompt_lookup_num_tokens": lookup} if lookup else {}
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, **extra)
    seconds = time.perf_counter() - start
    made = out.shape[1] - ids.shape[1]
    calls = counter.calls + 1  # the prefill call makes the first token
    return {"seconds": seconds, "tokens": made, "calls": calls, "drafted": counter.positions - counter.calls,
            "accepted": made - calls, "sequence": out[0, ids.shape[1]:].tolist()}


def summary(runs: list[dict]) -> dict:
    rates = [r["tokens"] / r["seconds"] for r in runs]
    drafted, accepted = sum(r["drafted"] for r in runs), sum(r["accepted"] for r in runs)
    return {"tok_s": statistics.median(rates), "tok_s_min": min(rates), "tok_s_max": max(rates),
            "calls": sum(r["calls"] for r in runs), "drafted": drafted, "accepted": accepted,
            "acceptance": accepted / drafted if drafted else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--artifact", required=True)
    parser.add_argument("--data", default="lee")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--lookup", type=int, default=4)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    artifact = load_artifact(args.artifact)
    model, tokenizer, _ = load_model(args.model)
    model.generation_config.pad_token_id = tokenizer.eos_token_id
    ids = text_prompts(tokenizer, bench_texts(args.data, artifact), args.prompts, args.prompt_tokens)
    counter = CallCounter(model)
    runs = {(mode, lookup): [] for mode in MODES for lookup in (args.lookup, None)}
    sparse_steps: dict[str, int] = {}
    agree = []
    for i in range(args.prompts):
        prompt = ids[i : i + 1]
        for lookup in (args.lookup, None):
            runs[("dense", lookup)].append(generate(model, prompt, args.new_tokens, lookup, counter))
            runtime.apply(model, artifact)
            runs[("clada", lookup)].append(generate(model, prompt, args.new_tokens, lookup, counter))
            if lookup:
                for key, value in runtime.stats(model)["decode_steps"].items():
                    sparse_steps[key] = sparse_steps.get(key, 0) + value
            runtime.remove(model)
        same = [a == b for a, b in zip(runs[("clada", args.lookup)][-1]["sequence"],
                                       runs[("clada", None)][-1]["sequence"])]
        agree.append(sum(same) / len(same))
        print(f"prompt {i + 1}/{args.prompts} done", flush=True)

    result = {"model": args.model, "artifact": args.artifact, "data": args.data, "prompts": args.prompts,
              "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "lookup": args.lookup,
              "torch_threads": torch.get_num_threads(), "cpu": cpu_info(),
              "modes": {f"{mode}{'' if lookup else '-plain'}": summary(r) for (mode, lookup), r in runs.items()},
              "clada_decode_steps": sparse_steps,
              "clada_lookup_vs_plain_token_agreement": statistics.mean(agree)}
    m = result["modes"]
    print(f"CPU: {result['cpu']['model_name']} (family {result['cpu']['family']} model {result['cpu']['model']}), {result['torch_threads']} threads; {args.prompts} prompts x "
          f"{args.new_tokens} new tokens, prompt_lookup_num_tokens={args.lookup}")
    print(f"{'mode':<14} {'tok/s':>7} {'min-max':>13} {'acceptance':>10} {'calls':>6}")
    for name, s in m.items():
        acc = "-" if s["acceptance"] is None else f"{s['acceptance']:.3f}"
        print(f"{name:<14} {s['tok_s']:7.2f} {s['tok_s_min']:6.2f}-{s['tok_s_max']:<6.2f} {acc:>10} {s['calls']:6d}")
    print(f"CLADA / dense with lookup: {m['clada']['tok_s'] / m['dense']['tok_s']:.3f}; without: "
          f"{m['clada-plain']['tok_s'] / m['dense-plain']['tok_s']:.3f}; lookup / plain: dense "
          f"{m['dense']['tok_s'] / m['dense-plain']['tok_s']:.3f}, CLADA {m['clada']['tok_s'] / m['clada-plain']['tok_s']:.3f}")
    print(f"CLADA decode_steps (lookup runs): {sparse_steps}")
    if args.json:
        for runs_of_mode in runs.values():
            for r in runs_of_mode:
                r.pop("sequence")
        write_atomic(args.json, json.dumps(result, indent=1).encode())


if __name__ == "__main__":
    main()
