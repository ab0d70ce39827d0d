"""Decode-step MLP products of SmolLM2-135M's shapes over 30 layers: dense vs embedding_bag vs compiled kernel.

    python benchmarks/bench_kernels.py [--layers 30] [--reps 15] [--batches 1,4] [--dtype float32]

Random weights (``--dtype``) of SmolLM2-135M's MLP shapes (gate+up as one (576, 3072) row buffer, down as
(1536, 576) rows), one set per layer so that each step streams them from memory as decoding does (30 layers,
318 MB in float32, ten times this machine's L3 cache). Random activations; the thresholds keep about 76% of input channels and 65%
of neurons per token row (near the default artifact's realised figures). Per batch size, each product runs
all layers once per repetition; printed: best and median milliseconds per step, and the compiled kernel's
ratio to dense. Dense is ``F.linear`` on the original (out, in) layouts of gate, up and down, the calls the
transformers model makes.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from clada.runtime import native

HIDDEN, INTERMEDIATE = 576, 1536
KEEP_IN, KEEP_MID = 0.3, 0.45  # |x| thresholds on standard-normal activations: ~76% / ~65% kept


def ebag(x: torch.Tensor, rows: torch.Tensor, threshold: float) -> torch.Tensor:
    """The runtime's embedding_bag path, selection included: one bag per token row; a single row is cut into
    one bag per thread and the partial sums added."""
    n, channels = x.shape
    where = (x.abs() > threshold).view(-1).nonzero().squeeze(1)
    weights = x.view(-1)[where]
    if n == 1:
        split = torch.get_num_threads()
        offsets = torch.arange(split) * -(-where.numel() // split)
        return F.embedding_bag(where, rows, offsets, mode="sum", per_sample_weights=weights).sum(0, keepdim=True)
    offsets = torch.searchsorted(where, torch.arange(n) * channels)
    return F.embedding_bag(where % channels, rows, offsets, mode="sum", per_sample_weights=weights)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--batches", default="1,4")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    kernel = native.gather_kernel()
    if kernel is not None and dtype not in kernel.dtypes:
        kernel = None
    torch.manual_seed(0)
    gate_up = [torch.randn(HIDDEN, 2 * INTERMEDIATE, dtype=dtype) for _ in range(args.layers)]  # (in, out) rows
    down = [torch.randn(INTERMEDIATE, HIDDEN, dtype=dtype) for _ in range(args.layers)]
    dense_gate = [w[:, :INTERMEDIATE].t().contiguous() for w in gate_up]  # (out, in), as nn.Linear stores it
    dense_up = [w[:, INTERMEDIATE:].t().contiguous() for w in gate_up]
    dense_down = [w.t().contiguous() for w in down]
    ones_in, ones_mid = torch.ones(HIDDEN), torch.ones(INTERMEDIATE)
    print(f"{args.layers} layers, {args.dtype}, {torch.get_num_threads()} threads; ms per decode step (best / median)")
    for batch in (int(b) for b in args.batches.split(",")):
        x_in, x_mid = torch.randn(batch, HIDDEN, dtype=dtype), torch.randn(batch, INTERMEDIATE, dtype=dtype)
        thr_in, thr_mid = torch.full((batch,), KEEP_IN), torch.full((batch,), KEEP_MID)
        products = {
            "dense": lambda l: (F.linear(x_in, dense_gate[l]), F.linear(x_in, dense_up[l]),
                                F.linear(x_mid, dense_down[l])),
            "embedding_bag": lambda l: (ebag(x_in, gate_up[l], KEEP_IN), ebag(x_mid, down[l], KEEP_MID)),
        }
        if kernel is not None:
            products["compiled"] = lambda l: (kernel(x_in, ones_in, thr_in, gate_up[l]),
                                              kernel(x_mid, ones_mid, thr_mid, down[l]))
        best = {}
        for name, product in products.items():
            times = []
            for rep in range(args.reps + 1):
                start = time.perf_counter()
                for layer in range(args.layers):
                    product(layer)
                if rep:  # the first pass is a warm-up
                    times.append(time.perf_counter() - start)
            best[name] = min(times)
            print(f"  batch {batch} {name:14s} {min(times) * 1e3:6.1f} / {statistics.median(times) * 1e3:6.1f}")
        if "compiled" in best:
            print(f"  batch {batch} dense / compiled = {best['dense'] / best['compiled']:.2f}x")
    if kernel is None:
        print(f"no compiled kernel for {args.dtype} here; embedding_bag is what the runtime uses")


if __name__ == "__main__":
    main()
