"""The CPU speed table of README in one command: dense vs CLADA decode on this machine, every dtype x batch x
thread count, and the llama.cpp peer beside it.

    python benchmarks/bench_cpu.py --artifact out/smollm2-135m/clada.safetensors [--model smollm2-135m]
        [--dtypes float32,bfloat16] [--batches 1,4] [--threads 2,1] [--reps 5] [--no-llamacpp]
        [--out results/bench/<cpu>/]

Per cell: ``calibrate.bench.run_bench`` (what ``clada bench`` runs: dense, CLADA with ``backend="auto"`` and the
layout-only mode alternating in one process, 128-token prompts of held-out text, 64 new tokens, medians of
``--reps`` after one warm-up), written as ``<model>-<dtype>-b<batch>-t<threads>.json``. Then, unless
``--no-llamacpp`` or llama-cpp-python is missing, ``bench_llamacpp.py`` at the same thread counts
(``llamacpp-<model>.json``). Last, ``table.md``: one row per cell with the ratio, what skipping adds, its bound,
the rep-to-rep spread and the backend chosen; every figure from this run; the CPU named (lscpu-style) on top.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import torch

from clada import runtime
from clada.artifacts import write_atomic
from clada.calibrate.bench import NOISY, BenchConfig, bench_texts, cpu_folder, run_bench, text_prompts
from clada.calibrate.models import load_model
from clada.runtime.machine import cpu_info

COLUMNS = ("dtype", "batch", "threads", "dense tok/s", "CLADA tok/s", "ratio", "paired ratio (CLADA faster)",
           "layout / dense", "CLADA / layout (paired)", "skip bound", "mlp_reads_saved", "reads_saved", "spread",
           "prefill overhead",
           "backend per shape (1 row; the products left dense at the batch's rows)")


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def table(cpu: dict, rows: list[dict], llama: dict | None) -> str:
    """Markdown of the cells (and llama.cpp's decode tok/s at batch 1) measured in this run."""
    flags = " ".join(f for f, on in cpu["flags"].items() if on)
    caches = ", ".join(f"{k} {v['bytes'] >> 10} KiB" for k, v in cpu["caches"].items() if v["bytes"])
    out = [f"CPU: {cpu['model_name']} (family {cpu['family']}, model {cpu['model']}), {cpu['logical_cpus']} logical "
           f"CPUs; {flags}; {caches}.", "",
           "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        shapes = {d["shape"]: d["per_rows"]["1"] for d in r["selection"]} or {"all": r["backend"]}
        products = (r.get("dense_products") or {}).get("choices", [])
        shapes.update({f"{c['shape']} dense at {c['rows']}": c["choice"] for c in products})
        worst = max(r["spread"].values())
        out.append("| " + " | ".join([
            r["dtype"], str(r["batch"]), str(r["threads"]), f"{r['dense_tok_s']:.2f}", f"{r['clada_tok_s']:.2f}",
            f"**{r['ratio']:.3f}**", f"{r['paired_ratio']:.3f} ({r['clada_faster']}/{r['reps']})",
            f"{r['layout_ratio']:.3f}", f"{r['sparsity_ratio']:.3f} ({r['paired_sparsity_ratio']:.3f})",
            f"{r['skip_bound']:.3f}", f"{r['mlp_reads_saved']:.3f}", f"{r['reads_saved']:.3f}",
            f"{worst:.0%}" + (" (noisy)" if worst > NOISY else ""), f"{r['prefill_overhead']:+.3f}",
            ", ".join(f"{s}: {b}" for s, b in shapes.items())]) + " |")
    if llama:
        out += ["", "llama.cpp on the same prompt (batch 1), decode tok/s (median; spread):", ""]
        out += [f"- {r['engine']} {r['type']}, {r['threads']} threads: {r['decode_tok_s']:.2f} ({r['spread']:.0%})"
                for r in llama["runs"]]
    return "\n".join(out) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifact", required=True, help="the CLADA artifact (clada.safetensors)")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--batches", default="1,4")
    parser.add_argument("--threads", default="2,1")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--data", default="lee")
    parser.add_argument("--no-llamacpp", action="store_true")
    parser.add_argument("--out", default=None, help="default results/bench/<cpu model>-f<family>m<model>/")
    args = parser.parse_args()
    artifact = runtime.load_artifact(args.artifact)  # a bad path fails here, before any model loads
    cpu = cpu_info()
    out = Path(args.out or f"results/bench/{cpu_folder(cpu)}")
    texts = bench_texts(args.data, artifact)
    rows = []
    for dtype in _csv(args.dtypes):
        model, tokenizer, _ = load_model(args.model, dtype, "cpu")
        model.eval()
        for batch in (int(b) for b in _csv(args.batches)):
            ids = text_prompts(tokenizer, texts, batch, args.prompt_tokens)
            for threads in (int(t) for t in _csv(args.threads)):
                config = BenchConfig(batch, args.prompt_tokens, args.new_tokens, args.reps, threads=threads)
                print(f"bench_cpu: {dtype} batch {batch} threads {threads}", file=sys.stderr, flush=True)
                r = run_bench(model, artifact, ids, config)
                r.update({"model": args.model, "artifact": args.artifact, "method": "clada"})
                write_atomic(out / f"{args.model}-{dtype}-b{batch}-t{threads}.json",
                             (json.dumps(r, indent=2) + "\n").encode())
                rows.append(r)
                print(f"  ratio {r['ratio']:.3f} (layout {r['layout_ratio']:.3f}, skipping {r['sparsity_ratio']:.3f}"
                      f" of bound {r['skip_bound']:.3f}), spread {max(r['spread'].values()):.0%}", flush=True)
        del model
    llama = None
    if not args.no_llamacpp and importlib.util.find_spec("llama_cpp") is not None:
        target = out / f"llamacpp-{args.model}.json"
        subprocess.run([sys.executable, str(Path(__file__).with_name("bench_llamacpp.py")), "--model", args.model,
                        "--threads", args.threads, "--reps", str(args.reps), "--prompt-tokens", str(args.prompt_tokens),
                        "--new-tokens", str(args.new_tokens), "--hf", "", "--json", str(target)], check=True)
        llama = json.loads(target.read_text())
    elif not args.no_llamacpp:
        print("bench_cpu: llama-cpp-python is not installed; no llama.cpp figures (see bench_llamacpp.py)",
              file=sys.stderr)
    write_atomic(out / "table.md", table(cpu, rows, llama).encode())
    print(table(cpu, rows, llama))


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
