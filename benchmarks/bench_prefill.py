"""What the prompt prior costs at prefill: dense prefill time of long prompts, patched with and without it.

    python benchmarks/bench_prefill.py --artifact out/smollm2-135m/clada.safetensors      # ~5 min on 2 CPU cores

On the artifact's model (fp32, CPU, ``--threads``), one prompt of each length in ``--lengths`` (default 512, 2048,
8192 tokens of the enwiki text) is prefilled ``--reps`` times, alternating three modes in each
rep: the unpatched model (``dense``), the model patched with the artifact without its prompt prior
(``noprefix``: the wrappers and the prefill's density estimate, nothing per sequence) and patched with the artifact
itself (``prefix``: plus the prior's pass over each layer's MLP activations). Printed and written to
results/bench/<cpu>/prefill.json: median seconds per mode and the ratios prefix/noprefix (the prior's own cost) and
prefix/dense (all the runtime adds to a prefill), each with its rep-to-rep spread.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from clada import runtime
from clada.artifacts import load_artifact, write_atomic
from clada.calibrate.bench import bench_texts, cpu_folder, spread, text_prompts
from clada.calibrate.models import load_model
from clada.runtime.machine import cpu_info

ROOT = Path(__file__).resolve().parent.parent
MODES = ("dense", "noprefix", "prefix")


@torch.no_grad()
def prefill_seconds(model, ids: torch.Tensor) -> float:
    start = time.perf_counter()
    model(input_ids=ids, use_cache=True)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--artifact", required=True, help="a CLADA artifact with a prompt prior (format 6)")
    parser.add_argument("--lengths", default="512,2048,8192")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--alpha", type=float, default=None,
                        help="prompt-prior exponent to measure if the artifact has none (default: the artifact's)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    artifact = load_artifact(args.artifact)
    if args.alpha is not None:
        L = artifact.num_layers
        artifact = dataclasses.replace(artifact, prefix_in=torch.full((L,), args.alpha),
                                       prefix_mid=torch.full((L,), args.alpha))
    if not artifact.has_prefix:
        print(f"{args.artifact}: the artifact has no prompt prior; pass --alpha to measure one", file=sys.stderr)
        return 2
    artifacts = {"noprefix": dataclasses.replace(artifact, prefix_in=None, prefix_mid=None), "prefix": artifact}
    model, tokenizer, _ = load_model(artifact.model.get("spec", "smollm2-135m"), "float32", "cpu")
    rows = []
    for length in (int(n) for n in args.lengths.split(",")):
        ids = text_prompts(tokenizer, bench_texts("enwiki"), 1, length)
        seconds = {mode: [] for mode in MODES}
        for mode in MODES:  # warm-up: first calls allocate
            if mode != "dense":
                runtime.apply(model, artifacts[mode], backend="auto")
            prefill_seconds(model, ids[:, :64])
            if mode != "dense":
                runtime.remove(model)
        for _ in range(args.reps):
            for mode in MODES:
                if mode != "dense":
                    runtime.apply(model, artifacts[mode], backend="auto")
                seconds[mode].append(prefill_seconds(model, ids))
                if mode != "dense":
                    runtime.remove(model)
        med = {mode: statistics.median(s) for mode, s in seconds.items()}
        row = {"tokens": length, "seconds": seconds, "median_s": med,
               "prior_cost": med["prefix"] / med["noprefix"], "runtime_cost": med["prefix"] / med["dense"],
               "spread": {mode: spread(s) for mode, s in seconds.items()}}
        rows.append(row)
        print(f"{length:6d} tokens  dense {med['dense']:.3f} s  noprefix {med['noprefix']:.3f} s  prefix "
              f"{med['prefix']:.3f} s  prefix/noprefix {row['prior_cost']:.3f}  prefix/dense {row['runtime_cost']:.3f}"
              f"  spread {max(row['spread'].values()):.0%}", flush=True)
    info = cpu_info()
    out = {"cpu": info, "threads": args.threads, "reps": args.reps, "artifact": args.artifact,
           "alpha": sorted({float(a) for a in artifact.prefix_mid}), "rows": rows,
           "command": "python benchmarks/bench_prefill.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    folder = ROOT / "results" / "bench" / cpu_folder(info)
    folder.mkdir(parents=True, exist_ok=True)
    write_atomic(folder / "prefill.json", json.dumps(out, indent=1).encode())
    print(f"wrote {folder / 'prefill.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
