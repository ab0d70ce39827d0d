"""Where do the skipped bytes go? Time inside the native gather kernel vs the whole decode, skipping vs not.

    python benchmarks/probe_kernel_time.py --artifact out/smollm2-135m-threshold/clada.safetensors      # ~2 min on 2 cores

SmolLM2-135M fp32 on CPU, batch 1, a 128-token prompt of held-out lee, ``--new-tokens`` greedy tokens, backend
``native`` everywhere (no measured selection), alternating two modes per repetition: ``skipping`` (the artifact's
thresholds; no adaptation and no compensation, so that the two modes differ only in what the kernel skips) and
``zero`` (every threshold 0: the same path reading every row). Every kernel call is timed from Python
(``GatherKernel.__call__``); printed per mode: medians of the whole generate and of the kernel's seconds, and their
ratios. Writes results/bench/<cpu>/kernel_time.json.
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
from clada.calibrate.bench import bench_texts, cpu_folder, text_prompts, zero_artifact
from clada.calibrate.models import load_model
from clada.runtime import native
from clada.runtime.machine import cpu_info

ROOT = Path(__file__).resolve().parent.parent


class KernelClock:
    """Wraps ``GatherKernel.__call__`` to add up the seconds spent in it while installed, in all and per weight shape
    ("CxOUT": [seconds, calls, kept (row, channel) pairs, row-channel pairs])."""

    def __init__(self):
        self.seconds, self.calls = 0.0, 0
        self.shapes: dict[str, list] = {}
        self._inner = native.GatherKernel.__call__

    def __enter__(self):
        inner = self._inner

        def timed(kernel, x, scale, thresholds, rows):
            start = time.perf_counter()
            out, kept = inner(kernel, x, scale, thresholds, rows)
            elapsed = time.perf_counter() - start
            self.seconds += elapsed
            self.calls += 1
            shape = self.shapes.setdefault(f"{rows.shape[0]}x{rows.shape[1]}", [0.0, 0, 0, 0])
            shape[0] += elapsed
            shape[1] += 1
            shape[2] += kept
            shape[3] += x.numel()
            return out, kept
        native.GatherKernel.__call__ = timed
        return self

    def __exit__(self, *exc):
        native.GatherKernel.__call__ = self._inner


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--artifact", default="out/smollm2-135m-threshold/clada.safetensors")
    parser.add_argument("--reps", type=int, default=6)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    artifact = load_artifact(args.artifact)
    modes = {"skipping": dataclasses.replace(artifact, lam=0.0, gam=0.0, center_in=None, center_mid=None),
             "zero": zero_artifact(artifact)}
    model, tokenizer, _ = load_model(artifact.model.get("spec", "smollm2-135m"), "float32", "cpu")
    ids = text_prompts(tokenizer, bench_texts("lee", artifact), 1, 128)
    runs = {mode: [] for mode in modes}
    for rep in range(args.reps + 1):  # the first repetition warms up
        for mode, art in modes.items():
            runtime.apply(model, art, backend="native")
            with KernelClock() as clock:
                start = time.perf_counter()
                model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new_tokens,
                               min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)
                total = time.perf_counter() - start
            stats = runtime.stats(model)
            runtime.remove(model)
            if rep:
                runs[mode].append({"total_s": total, "kernel_s": clock.seconds, "kernel_calls": clock.calls,
                                   "reads_saved": stats["reads_saved"], "shapes": clock.shapes})
    med = {mode: {key: statistics.median(r[key] for r in rows) for key in ("total_s", "kernel_s", "reads_saved")}
           for mode, rows in runs.items()}
    s, z = med["skipping"], med["zero"]
    summary = {"kernel_ratio": s["kernel_s"] / z["kernel_s"], "total_ratio": s["total_s"] / z["total_s"],
               "kernel_share_zero": z["kernel_s"] / z["total_s"],
               "kernel_seconds_saved_per_step": (z["kernel_s"] - s["kernel_s"]) / args.new_tokens}
    summary["per_shape"] = {}
    for shape in runs["zero"][0]["shapes"]:
        time_of = {mode: statistics.median(r["shapes"][shape][0] for r in rows) for mode, rows in runs.items()}
        kept = runs["skipping"][0]["shapes"][shape]
        summary["per_shape"][shape] = {"kernel_ratio": time_of["skipping"] / time_of["zero"],
                                       "kept_share": kept[2] / kept[3], "zero_ms_per_token": time_of["zero"] * 1e3 / args.new_tokens}
        print(f"  {shape:10s} kept {kept[2] / kept[3]:.3f} of the rows: kernel time skipping / zero "
              f"{time_of['skipping'] / time_of['zero']:.3f} ({time_of['zero'] * 1e3 / args.new_tokens:.2f} ms per token at zero)")
    for mode, m in med.items():
        print(f"{mode:9s} generate {m['total_s']:.3f} s  kernel {m['kernel_s']:.3f} s  reads_saved {m['reads_saved']:.3f}")
    print(f"skipping / zero: kernel {summary['kernel_ratio']:.3f}, whole generate {summary['total_ratio']:.3f}; "
          f"kernel share of the zero path {summary['kernel_share_zero']:.3f}; "
          f"{summary['kernel_seconds_saved_per_step'] * 1e3:.2f} ms of kernel time saved per token")
    info = cpu_info()
    folder = ROOT / "results" / "bench" / cpu_folder(info)
    folder.mkdir(parents=True, exist_ok=True)
    out = {"cpu": info, "threads": args.threads, "reps": args.reps, "new_tokens": args.new_tokens,
           "artifact": args.artifact, "runs": runs, "medians": med, **summary,
           "command": "python benchmarks/probe_kernel_time.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    write_atomic(folder / "kernel_time.json", json.dumps(out, indent=1).encode())
    print(f"wrote {folder / 'kernel_time.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
