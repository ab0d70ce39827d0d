"""Decode speed and gather-kernel bandwidth of CLADA on LLaMA-2-7B / Llama-3-8B shapes: one command, one JSON.

    python benchmarks/gpu/bench_gpu.py [--dry-run] [--out results/bench/gpu/] [--models llama2-7b,llama3-8b]
        [--dtypes bfloat16,float16] [--reads 0.25,0.40,0.50] [--other-reads 0.40] [--batches 1,4,8]
        [--eager-batches 1] [--backend auto] [--minutes 7.5] [--variants fused,two_pass,prefetch]
        [--sweep-rows 1,8] [--kernel-sparsity 0,0.4,0.5] [--no-kernels]

Random-weight models of the real shapes (built directly on the GPU in the dtype): a check of the Triton kernels
against float64, a microbenchmark of the Triton gather against cuBLAS ``F.linear`` (CUDA graph replays, and a sweep
of variants x channels per program whose fastest the rest of the run uses), TEAL-style per-layer thresholds
calibrated on the random model's own MLP inputs (``baseline_artifacts("teal", ...)``, and the attention inputs at
the same sparsity), decode steps replayed from CUDA graphs (dense, layout-only, CLADA, CLADA with triton
everywhere, CLADA with attention) per model x dtype x target x batch, and an eager ``calibrate.bench.run_bench``.
``--dry-run``: tiny shapes on CPU under ``TRITON_INTERPRET=1`` (a smoke test of the script, not a measurement: one
reads target, batches 1 and 4, 3 new tokens, backend ``triton`` so that auto does not time the interpreter;
about a minute). See benchmarks/gpu/README.md.
"""

from __future__ import annotations

import sys

DRY_RUN = "--dry-run" in sys.argv[1:]
if DRY_RUN:  # before anything can import triton: it builds its library for the interpreter or the GPU on import
    import os

    os.environ["TRITON_INTERPRET"] = "1"

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402,F811
import platform  # noqa: E402
import re  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import transformers  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from clada import runtime  # noqa: E402
from clada.artifacts import write_atomic  # noqa: E402
from clada.calibrate.baselines import CalibrationActivations, baseline_artifacts  # noqa: E402
from clada.calibrate.measure import attention_thresholds  # noqa: E402
from clada.calibrate.bench import BenchConfig, layout_backend, run_bench, zero_artifact  # noqa: E402
from clada.runtime.backends import BACKENDS  # noqa: E402
from clada.runtime.selection import capture  # noqa: E402

SHAPES = {
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000),
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0),
}
TINY = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4, vocab_size=256)
TINY_KV = {"llama2-7b": 4, "llama3-8b": 2}
KERNEL_SPARSITY = (0.0, 0.4, 0.5)
KERNEL_ROWS = (1, 4, 8)
GRAPH_CALLS = 20  # calls captured in one CUDA graph by the kernel timer
STEP_ROOM = 256  # positions a static cache has beyond the prompt in step_times (it runs < 100 steps)
SWEEP_ROWS = (1, 8)  # token rows at which the first model's kernels are timed at every variant and split
SWEEP_SPLITS = (256, 512, 1024, 2048)  # channels per program swept (besides the default; 64 and 128 lost on an H200)
DRY_DEFAULTS = {"reads": "0.4", "other_reads": "0.4", "batches": "1,4", "eager_batches": "1,4", "backend": "triton",
                "dtypes": "float32,bfloat16"}
DRY_BLOCKS = {"BLOCK_K": 64, "BLOCK_N": 512}  # interpreter blocks: one program per call on the tiny shapes
T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} +{time.perf_counter() - T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


def elapsed_min() -> float:
    return (time.perf_counter() - T0) / 60.0


def build_model(name: str, dtype: torch.dtype, device: torch.device, dry: bool) -> LlamaForCausalLM:
    settings = dict(TINY, num_key_value_heads=TINY_KV[name]) if dry else SHAPES[name]
    config = LlamaConfig(**settings, max_position_embeddings=2048 if not dry else 256, initializer_range=0.02,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    saved = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # parameters created directly in the dtype, on the device
    try:
        with device:
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(saved)
    return model.to(dtype).eval()


def calibrate(model, dtype_name: str, reads: list[float], dry: bool, device: torch.device) -> tuple[list, list]:
    """TEAL thresholds of the MLPs at each reads-saved target, and the same with the attention projections' inputs
    at that target's sparsity too (TEAL's whole setting: q/k/v, o, gate/up and down)."""
    vocab = model.config.vocab_size
    n, prompt, scored = (4, 8, 8) if dry else (8, 32, 32)
    tokens = torch.randint(3, vocab, (n, prompt + scored + 1), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        calib = CalibrationActivations.collect(model, tokens.to(device), prompt, max_tokens=n * scored)
        mlp = baseline_artifacts("teal", model, calib, reads)
        adapter = runtime.adapter_for(model)
        attention = [dataclasses.replace(art, **attention_thresholds(model, adapter, tokens, prompt, n * scored, q,
                                                                     "magnitude"))
                     for q, art in zip(reads, mlp)]
    return mlp, attention


def _timer(device: torch.device, fn, calls: int, warmup: int, graph: bool = False) -> float:
    """Median milliseconds of one call of ``fn`` (CUDA events on the GPU, perf_counter on CPU). ``graph``: on a GPU,
    ``fn`` captured ``GRAPH_CALLS`` times in one CUDA graph and its replays timed (the device's time, without
    Python's launches); ``fn`` itself where capture fails."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda" and graph:
        captured, why = capture(lambda: [fn() for _ in range(GRAPH_CALLS)], device)
        if captured is not None:
            return _timer(device, captured.replay, max(3, calls // GRAPH_CALLS), 1) / GRAPH_CALLS
        log(f"  graph capture failed ({why}); timing eager calls")
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize()
        for _ in range(calls):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(calls):
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def _autotuned() -> dict:
    """The Triton gather's autotuned config per key so far (CUDA): {key: config}."""
    from clada.runtime import triton_kernels as tk

    kernel = tk._KERNELS.get(False, (None,))[0]
    return {str(k): str(v) for k, v in getattr(kernel, "cache", {}).items()}


def _reference(x, weight, tau, rows):
    keep = x.double().abs() * weight.double() > tau.double()[:, None]
    return (x.double() * keep) @ rows.double(), int(keep.sum())


@torch.no_grad()
def check_kernels(device: torch.device, dry: bool) -> list[dict]:
    """The Triton gather against a float64 reference on this device, each variant (float32 multiply-adds, tensor
    cores) alone: relative error ||out - ref|| / ||ref|| and exact kept counts, per dtype, shape and rows."""
    from clada.runtime import triton_kernels as tk

    backend = BACKENDS.get("triton")
    if backend is None or not backend.accepts(device, torch.float32, 1):
        return []
    # (C, OUT, row stride, dtypes, token rows): odd shapes in every dtype, LLaMA-2-7B's MLP buffers in 16 bits
    every = (torch.float32, torch.bfloat16, torch.float16)
    cases = [(37, 50, 70, every, (3,)), (300, 129, 129, every[1:2], (1, 8))]
    if not dry:
        cases += [(4096, 22016, 22016, every[1:2], (1, 8)), (11008, 4096, 4096, every[1:], (1,)),
                  (11008, 4096, 4096, every[1:2], (8,))]
    saved = tk.CUDA_CONFIGS
    out = []
    gen = torch.Generator(device=device).manual_seed(5)
    saved_variant = tk.VARIANT
    try:
        for kernel_variant, variant in [(k, v) for k in tk.VARIANTS for v in ((False, True) if not dry else (False,))]:
            tk.VARIANT = kernel_variant
            if not dry:
                tk.CUDA_CONFIGS = tuple(c for c in saved if c[4] == variant)
                tk._KERNELS.pop(False, None)
            for c, width, stride, dtypes, row_counts in cases:
                for dtype in dtypes:
                    for n in row_counts:
                        x = torch.randn(n, c, device=device, generator=gen).to(dtype)
                        weight = torch.rand(c, device=device, generator=gen) + 0.5
                        tau = torch.rand(n, device=device, generator=gen) * 1.5
                        rows = torch.randn(c, stride + 3, device=device, generator=gen).to(dtype)[:, 3:3 + width]
                        got, kept = backend.gather(x, weight, tau, rows)
                        want, want_kept = _reference(x, weight, tau, rows)
                        err = float((got.double() - want).norm() / want.norm().clamp_min(1e-30))
                        limit = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
                        ok = int(kept) == want_kept and err < limit and bool(torch.isfinite(got).all())
                        out.append({"variant": f"{kernel_variant}-{'dot' if variant else 'fma'}",
                                    "dtype": str(dtype).removeprefix("torch."),
                                    "C": c, "OUT": width, "rows": n, "rel_err": err, "kept_exact": int(kept) == want_kept,
                                    "ok": ok})
                        if not ok:
                            log(f"  CHECK FAILED: {out[-1]}")
    finally:
        tk.CUDA_CONFIGS = saved
        tk.VARIANT = saved_variant
        tk._KERNELS.pop(False, None)
    failed = {r["variant"] for r in out if not r["ok"]}
    if any(v.endswith("dot") for v in failed) and not any(v.endswith("fma") for v in failed):
        tk.CUDA_CONFIGS = tuple(c for c in saved if not c[4])  # keep the run useful: drop the wrong one, say so
        log("  the tensor-core variant failed its check: autotuning the float32 multiply-add variant only")
    if any(v.startswith("two_pass") for v in failed):
        tk.VARIANTS = ("fused",)
        log("  the two-pass variant failed its check: not timed")
    log(f"kernel check: {sum(r['ok'] for r in out)}/{len(out)} ok" + (f", failed variants {sorted(failed)}" if failed else ""))
    return out


@torch.no_grad()
def kernel_bench(model_name: str, hidden: int, inter: int, dtype: torch.dtype, device: torch.device,
                 dry: bool, sweep: bool = False) -> list[dict]:
    """Triton gather vs dense F.linear for gate+up (hidden -> 2*inter) and down (inter -> hidden), each timed as
    graph replays (device time) and as eager calls (with Python's launches). ``sweep``: also every split of the
    channels over programs at sparsity 0.4 (the autotuned config of each in ``config``)."""
    from clada.runtime import triton_kernels as tk

    triton_backend = BACKENDS.get("triton")
    if triton_backend is None or not triton_backend.accepts(device, dtype, 1):
        log(f"kernel bench skipped: triton backend cannot run {dtype} on {device}")
        return []
    calls, warmup = (1, 0) if dry else (100, 10)
    elem = torch.tensor([], dtype=dtype).element_size()
    out = []
    gen = torch.Generator(device=device).manual_seed(2)
    for buffer, c, width in (("gate_up", hidden, 2 * inter), ("down", inter, hidden)):
        w_dense = (torch.randn(width, c, device=device, dtype=torch.float32, generator=gen) * 0.02).to(dtype)
        rows = w_dense.t().contiguous()  # (C, OUT), unit column stride
        weight = torch.ones(c, device=device, dtype=torch.float32)
        counter = torch.zeros((), dtype=torch.int64, device=device)
        for n in KERNEL_ROWS[:2] if dry else KERNEL_ROWS:
            x = torch.randn(n, c, device=device, dtype=torch.float32, generator=gen).to(dtype)
            dense_ms = _timer(device, lambda: F.linear(x, w_dense), calls, warmup, graph=True)
            dense_eager_ms = _timer(device, lambda: F.linear(x, w_dense), calls, warmup)
            dense_bytes = width * c * elem
            score = x.float().abs() * weight
            splits = [None]
            if sweep and n in SWEEP_ROWS:
                splits += [k for k in SWEEP_SPLITS if k < c]
            for s in (0.0, 0.4) if dry else KERNEL_SPARSITY:
                if s == 0.0:
                    tau = torch.full((n,), -1.0, device=device, dtype=torch.float32)
                else:
                    tau = torch.quantile(score, s, dim=1).float().contiguous()
                keep = score > tau[:, None]
                union = int(keep.any(0).sum())
                read = union * width * elem
                variants = tk.VARIANTS if s == 0.4 and len(splits) > 1 else (tk.VARIANT,)
                for variant, k_split in [(v, k) for v in variants for k in (splits if s == 0.4 else [None])]:
                    saved_variant, tk.VARIANT = tk.VARIANT, variant
                    if k_split is not None:
                        tk.SPLIT_OVERRIDE[(c, width)] = k_split
                    call = lambda: triton_backend.gather(x, weight, tau, rows, counter)  # noqa: E731
                    ms = _timer(device, call, calls, warmup, graph=True)
                    eager_ms = _timer(device, call, calls, warmup) if k_split is None else None
                    used = tk.channels_per_program(c, width, device, tk.INTERPRETER_CONFIG["BLOCK_K"] if dry else None)
                    tk.SPLIT_OVERRIDE.pop((c, width), None)
                    tk.VARIANT = saved_variant
                    out.append({
                        "model": model_name, "dtype": str(dtype).removeprefix("torch."), "buffer": buffer, "C": c,
                        "OUT": width, "rows": n, "sparsity": s, "kept_share": float(keep.float().mean()),
                        "channels_read_share": union / c, "channels_per_program": used,
                        "split": -(-c // used), "swept": k_split is not None, "variant": variant,
                        "triton_ms": ms, "dense_ms": dense_ms, "triton_eager_ms": eager_ms,
                        "dense_eager_ms": dense_eager_ms,
                        "triton_gb_s": read / (ms * 1e-3) / 1e9, "dense_gb_s": dense_bytes / (dense_ms * 1e-3) / 1e9,
                        "speedup_vs_dense": dense_ms / ms,
                    })
                    log(f"kernel {model_name} {out[-1]['dtype']} {buffer} rows={n} s={s} {variant} "
                        f"split={out[-1]['split']}: "
                        f"triton {ms:.4f} ms ({out[-1]['triton_gb_s']:.0f} GB/s), dense {dense_ms:.4f} ms "
                        f"({out[-1]['dense_gb_s']:.0f} GB/s)" + (f"; eager {eager_ms:.4f} / {dense_eager_ms:.4f}"
                                                                 if eager_ms is not None else ""))
        del w_dense, rows
    return out


def tune_from(kernels: list[dict]) -> dict:
    """Set the Triton variant and each MLP buffer's channels per program to the fastest swept at one token row and
    sparsity 0.4 (the variant: least gate+up plus down time); what was set, for the JSON."""
    from clada.runtime import triton_kernels as tk

    swept = [k for k in kernels if k["rows"] == 1 and k["sparsity"] == 0.4]
    best = {}
    for variant in sorted({k["variant"] for k in swept}):
        total, splits = 0.0, {}
        for buffer in ("gate_up", "down"):
            mine = [k for k in swept if k["variant"] == variant and k["buffer"] == buffer]
            if not mine:
                break
            fastest = min(mine, key=lambda k: k["triton_ms"])
            total += fastest["triton_ms"]
            splits[(fastest["C"], fastest["OUT"])] = fastest["channels_per_program"]
        else:
            best[variant] = (total, splits)
    if not best:
        return {}
    variant = min(best, key=lambda v: best[v][0])
    tk.VARIANT = variant
    tk.SPLIT_OVERRIDE.update(best[variant][1])
    chosen = {"variant": variant, "channels_per_program": {f"{c}x{o}": k for (c, o), k in best[variant][1].items()},
              "ms": {v: t for v, (t, _) in best.items()}}
    log(f"tuned: {chosen}")
    return chosen


def static_cache(model, batch: int, length: int):
    """A transformers StaticCache for ``batch`` rows of ``length`` positions, whatever the transformers version."""
    import inspect

    from transformers import StaticCache

    param = next(model.parameters())
    wanted = {"config": model.config, "max_cache_len": length, "max_batch_size": batch, "batch_size": batch,
              "device": param.device, "dtype": param.dtype}
    accepted = inspect.signature(StaticCache.__init__).parameters
    return StaticCache(**{k: v for k, v in wanted.items() if k in accepted})


@torch.no_grad()
def step_times(model, ids: torch.Tensor, steps: int, replays: int) -> dict:
    """Milliseconds of one decode step (one new token per row on a static cache after a prefill of ``ids``):
    eager (Python launching every kernel, median of ``steps``) and replayed from a CUDA graph of the step (the
    device's time, as serving engines decode), with the runtime's statistics of the eager steps."""
    device = ids.device
    prompt = ids.shape[1]
    # transformers >= 5 advances a static cache's position on every call (ignoring cache_position): room for
    # every step this function runs (warm-up, timed, profiled, captured, replayed)
    cache = static_cache(model, ids.shape[0], prompt + STEP_ROOM)
    out = model(input_ids=ids, past_key_values=cache, cache_position=torch.arange(prompt, device=device),
                use_cache=True)
    token = out.logits[:, -1:].argmax(-1)
    position = torch.tensor([prompt], device=device)

    def step():
        return model(input_ids=token, past_key_values=cache, cache_position=position, use_cache=True).logits

    for _ in range(3):  # auto's measurement, Triton's autotuning
        step()
    if runtime.is_patched(model):
        runtime.reset_stats(model)
    eager = _timer(device, step, steps, 1)
    result = {"eager_ms": eager}
    if runtime.is_patched(model):
        stats = runtime.stats(model)
        result.update(mlp_reads_saved=stats["mlp_reads_saved"], reads_saved=stats["reads_saved"],
                      mlp_weight_share=stats["mlp_weight_share"], path_calls=stats["path_calls"],
                      backends=stats["backends"])
    if device.type == "cuda":
        result.update(kernel_time(step))
        graph, why = capture(step, device)
        if graph is not None:
            result["graph_ms"] = _timer(device, graph.replay, replays, 3)
        else:
            result["graph_error"] = why[:500]
            log(f"  graph capture failed: {result['graph_error']}")
    del cache
    return result


def kernel_time(step, steps: int = 3) -> dict:
    """Device time of one eager ``step`` as the profiler sees it: the sum of its kernels' durations (ms; idle gaps
    between launches left out) and their number, averaged over ``steps`` steps."""
    try:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                step()
            torch.cuda.synchronize()
        total = count = 0.0
        for event in prof.key_averages():
            us = getattr(event, "self_device_time_total", None)
            us = getattr(event, "self_cuda_time_total", 0.0) if us is None else us
            if us > 0:
                total += us
                count += event.count
        return {"kernel_sum_ms": total / steps / 1e3, "kernels_per_step": count / steps}
    except Exception as exc:  # noqa: BLE001 -- a figure less, not a failed run
        return {"kernel_time_error": f"{type(exc).__name__}: {exc}"[:300]}


def graph_bench(model, artifact, batch: int, prompt_tokens: int, dry: bool, backend: str,
                attention=None) -> dict:
    """Decode-step milliseconds of dense, layout-only (the gathering path at zero thresholds) and CLADA (``backend``,
    and ``triton`` where that is not it; ``attention``: an artifact sparsifying the attention projections too, mode
    ``clada_attn``), each eager and replayed from a CUDA graph; ratios dense / mode."""
    device = next(model.parameters()).device
    ids = torch.randint(3, model.config.vocab_size, (batch, prompt_tokens),
                        generator=torch.Generator().manual_seed(7 + batch)).to(device)
    steps, replays = (2, 2) if dry else (10, 30)
    modes = {"dense": None, "layout": (zero_artifact(artifact), layout_backend(model, backend)),
             "clada": (artifact, backend)}
    if backend != "triton":
        modes["clada_triton"] = (artifact, "triton")
    if attention is not None:
        modes["clada_attn"] = (attention, backend)
    row: dict = {"batch": batch, "backend": backend, "modes": {}}
    for mode, setup in modes.items():
        if runtime.is_patched(model):
            runtime.remove(model)
        if setup is not None:  # timed as graph replays: auto compares device times too
            runtime.apply(model, setup[0], backend=setup[1], cuda_graphs=True)
        try:
            row["modes"][mode] = step_times(model, ids, steps, replays)
        except Exception as exc:  # noqa: BLE001 -- record, go on with the other modes
            row["modes"][mode] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
            log(f"  {mode} FAILED: {row['modes'][mode]['error']}")
    if runtime.is_patched(model):
        runtime.remove(model)
    dense = row["modes"]["dense"]
    for mode, got in row["modes"].items():
        for kind in ("eager_ms", "graph_ms"):
            if mode != "dense" and kind in got and kind in dense:
                row[f"{mode}_{kind.removesuffix('_ms')}_ratio"] = dense[kind] / got[kind]
    clada = row["modes"]["clada"]
    if "mlp_reads_saved" in clada:  # the bytes bound: a step's time in proportion to the weight bytes it reads
        row["bound"] = 1.0 / (1.0 - clada["mlp_reads_saved"] * clada["mlp_weight_share"])
    if (row["modes"].get("clada_attn") or {}).get("reads_saved") is not None:
        row["attn_bound"] = 1.0 / (1.0 - row["modes"]["clada_attn"]["reads_saved"])
    return row


def _clean(value):
    """JSON-safe: NaN/inf -> None, tensors -> lists, recursively."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, torch.Tensor):
        return _clean(value.tolist())
    return value


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def print_table(rows: list[dict]) -> None:
    """Eager ``clada bench`` runs: tok/s of generate."""
    head = ("model", "dtype", "target", "reads", "batch", "dense", "clada", "ratio", "layout", "bound", "backend")
    fmt = "{:<10} {:<8} {:>6} {:>6} {:>5} {:>9} {:>9} {:>6} {:>6} {:>6}  {}"
    print("eager generate (tok/s):")
    print(fmt.format(*head))
    for r in rows:
        f = lambda v, d=3: "-" if v is None else f"{v:.{d}f}"  # noqa: E731
        backends = ",".join(sorted(set(r.get("backends", {}).values()))) or "-"
        print(fmt.format(r["model"], r["dtype"], f(r["reads_target"], 2), f(r.get("mlp_reads_saved")), r["batch"],
                         f(r.get("dense_tok_s"), 1), f(r.get("clada_tok_s"), 1), f(r.get("ratio")),
                         f(r.get("layout_ratio")), f(r.get("bound")), backends))


def print_steps(rows: list[dict]) -> None:
    """Decode-step milliseconds, replayed from CUDA graphs (eager where no graph), and ratios dense / mode."""
    fmt = "{:<10} {:<8} {:>5} {:>5} {:>6} {:>8} {:>8} {:>8} {:>8} {:>6} {:>6} {:>6} {:>6} {:>6} {:>6} {:>6}  {}"
    print("decode step (ms), CUDA graph replay; ratios dense / mode; +attn: attention projections sparse too:")
    print(fmt.format("model", "dtype", "tgt", "batch", "reads", "dense", "layout", "clada", "+attn", "ratio",
                     "layout", "triton", "bound", "+attn", "all", "bound", "eager ratio / chosen"))
    for r in rows:
        f = lambda v, d=3: "-" if v is None else f"{v:.{d}f}"  # noqa: E731
        modes = r["modes"]
        kind = "graph" if "graph_ms" in modes.get("dense", {}) else "eager"
        ms = {m: modes.get(m, {}).get(f"{kind}_ms") for m in ("dense", "layout", "clada", "clada_triton",
                                                               "clada_attn")}
        chosen = ",".join(sorted(set(modes.get("clada", {}).get("backends", {}).values()))) or "-"
        print(fmt.format(r["model"], r["dtype"], f(r["reads_target"], 2), r["batch"],
                         f(modes.get("clada", {}).get("mlp_reads_saved")), f(ms["dense"]), f(ms["layout"]),
                         f(ms["clada"]), f(ms["clada_attn"]), f(r.get(f"clada_{kind}_ratio")),
                         f(r.get(f"layout_{kind}_ratio")), f(r.get(f"clada_triton_{kind}_ratio")), f(r.get("bound")),
                         f(r.get(f"clada_attn_{kind}_ratio")), f(modes.get("clada_attn", {}).get("reads_saved")),
                         f(r.get("attn_bound")),
                         f"{f(r.get('clada_eager_ratio'))} / {chosen}"))


def numbers(parser: argparse.ArgumentParser, flag: str, text: str, kind: type) -> list:
    """The comma-separated ``kind`` values of ``text`` (empty items skipped); one error line naming ``flag`` else."""
    try:
        return [kind(item) for item in text.split(",") if item.strip()]
    except ValueError:
        parser.error(f"{flag}: expected comma-separated {kind.__name__} values, got {text!r}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU under TRITON_INTERPRET=1")
    p.add_argument("--out", default="results/bench/gpu/")
    p.add_argument("--models", default="llama2-7b,llama3-8b")
    p.add_argument("--dtypes", default=None, help="default bfloat16,float16 (dry run: float32,bfloat16)")
    p.add_argument("--reads", default=None,
                   help="mlp_reads_saved targets (TEAL quantiles) of the first model and dtype; default 0.25,0.40,0.50")
    p.add_argument("--other-reads", default=None, help="targets of the other models and dtypes; default 0.40")
    p.add_argument("--batches", default=None, help="default 1,4,8")
    p.add_argument("--eager-batches", default=None,
                   help="batches of the eager generate runs (clada bench), first model and dtype at the middle "
                        "target; default 1")
    p.add_argument("--backend", default=None, help="runtime backend of the sparse modes (default auto)")
    p.add_argument("--minutes", type=float, default=7.5, help="start no new configuration past this budget")
    p.add_argument("--no-kernels", action="store_true", help="skip the kernel microbenchmark")
    p.add_argument("--variants", default=None, help="Triton kernel variants checked and swept (default: all)")
    p.add_argument("--sweep-rows", default=None, help="token rows of the variant x split sweep (default 1,8)")
    p.add_argument("--kernel-sparsity", default=None, help="sparsities of the kernel microbenchmark "
                                                           "(default 0,0.4,0.5)")
    args = p.parse_args(argv)
    from clada.runtime import triton_kernels as tk

    if args.variants:
        tk.VARIANTS = tuple(v.strip() for v in args.variants.split(","))
        unknown = set(tk.VARIANTS) - {"fused", "two_pass", "prefetch"}
        if unknown:
            p.error(f"--variants: unknown {sorted(unknown)}; expected fused, two_pass, prefetch")
    global SWEEP_ROWS, KERNEL_SPARSITY
    if args.sweep_rows:
        SWEEP_ROWS = tuple(numbers(p, "--sweep-rows", args.sweep_rows, int))
    if args.kernel_sparsity:
        KERNEL_SPARSITY = tuple(numbers(p, "--kernel-sparsity", args.kernel_sparsity, float))
    dry = args.dry_run
    defaults = DRY_DEFAULTS if dry else {"reads": "0.25,0.40,0.50", "other_reads": "0.40", "batches": "1,4,8",
                                         "eager_batches": "1", "backend": "auto", "dtypes": "bfloat16,float16"}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    for m in models:
        if m not in SHAPES:
            p.error(f"unknown model {m!r}; expected {', '.join(SHAPES)}")
    dtype_names = [d.strip() for d in args.dtypes.split(",")]
    for d in dtype_names:
        if d not in ("float32", "bfloat16", "float16"):
            p.error(f"--dtypes: unknown dtype {d!r}; expected float32, bfloat16 or float16")
    dtypes = [getattr(torch, d) for d in dtype_names]
    reads = numbers(p, "--reads", args.reads, float)
    other_reads = numbers(p, "--other-reads", args.other_reads, float)
    batches = numbers(p, "--batches", args.batches, int)
    eager_batches = numbers(p, "--eager-batches", args.eager_batches, int)
    if dry:
        from clada.runtime import triton_kernels

        triton_kernels.INTERPRETER_CONFIG.update(DRY_BLOCKS)
        device = torch.device("cpu")
        prompt_tokens, new_tokens, reps, warmup = 8, 3, 1, 0
    else:
        if not torch.cuda.is_available():
            p.error("no CUDA device: run with --dry-run on CPU")
        device = torch.device("cuda")
        prompt_tokens, new_tokens, reps, warmup = 128, 64, 3, 1
    gpu = "cpu (dry run)" if dry else torch.cuda.get_device_name(device)
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    result: dict = {
        "gpu": gpu, "dry_run": dry, "torch": torch.__version__, "triton": triton_version,
        "transformers": transformers.__version__, "python": platform.python_version(),
        "cuda": torch.version.cuda, "backend": args.backend, "minutes_budget": args.minutes,
        "settings": {"models": models, "dtypes": dtype_names, "reads": reads, "other_reads": other_reads,
                     "batches": batches, "eager_batches": eager_batches, "prompt_tokens": prompt_tokens,
                     "new_tokens": new_tokens, "reps": reps, "warmup": warmup, "cache": "static"},
        "checks": [], "kernels": [], "steps": [], "runs": [], "calibration": [], "autotuned": {}, "skipped": [],
        "budget_exceeded": False,
    }
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / ("gpu-bench-dry-run.json" if dry else f"gpu-bench-{_slug(gpu)}.json")

    def save() -> None:  # after every stage: a run stopped at its time limit still leaves what it measured
        result["total_minutes"] = elapsed_min()
        result["autotuned"] = _autotuned()
        write_atomic(path, (json.dumps(_clean(result), indent=1) + "\n").encode())

    log(f"device {gpu}; {len(models)} models x {len(dtypes)} dtypes, targets {reads} then {other_reads}, "
        f"batches {batches}")

    def over_budget(what: str) -> bool:
        if elapsed_min() > args.minutes:
            if not result["budget_exceeded"]:
                log(f"budget of {args.minutes} min exceeded at {elapsed_min():.2f} min: no new configurations")
            result["budget_exceeded"] = True
            result["skipped"].append(what)
            return True
        return False

    result["checks"] = check_kernels(device, dry)
    save()
    first = True
    for dtype, dtype_name in zip(dtypes, dtype_names):
        for name in models:
            if over_budget(f"{name} {dtype_name}"):
                continue
            log(f"building {name} {dtype_name} on {device}")
            model = build_model(name, dtype, device, dry)
            cfg = model.config
            if not args.no_kernels:
                result["kernels"] += kernel_bench(name, cfg.hidden_size, cfg.intermediate_size, dtype, device, dry,
                                                  sweep=first)
                if first:
                    result["tuned"] = tune_from(result["kernels"])
                save()
            targets = reads if first or dry else other_reads
            log(f"calibrating {name} {dtype_name} at reads {targets}")
            artifacts, with_attention = calibrate(model, dtype_name, targets, dry, device)
            result["calibration"].append({"model": name, "dtype": dtype_name, "targets": targets})
            for q, artifact, attention in zip(targets, artifacts, with_attention):
                for b in batches:
                    what = f"{name} {dtype_name} reads={q} batch={b}"
                    if over_budget(f"step {what}"):
                        continue
                    log(f"decode steps {what}")
                    row = graph_bench(model, artifact, b, prompt_tokens, dry, args.backend, attention)
                    row.update(model=name, dtype=dtype_name, reads_target=q)
                    result["steps"].append(_clean(row))
                    log(f"  ratios: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items() if k.endswith("_ratio")))
                    save()
                eager_here = batches if dry else (eager_batches if first and q == targets[len(targets) // 2] else [])
                for b in eager_here:
                    what = f"{name} {dtype_name} reads={q} batch={b}"
                    if over_budget(f"eager {what}"):
                        continue
                    ids = torch.randint(3, cfg.vocab_size, (b, prompt_tokens),
                                        generator=torch.Generator().manual_seed(3 + b)).to(device)
                    config = BenchConfig(batch=b, prompt_tokens=prompt_tokens, new_tokens=new_tokens, reps=reps,
                                         warmup=warmup, backend=args.backend, cache="static")
                    log(f"eager generate {what}")
                    try:
                        r = run_bench(model, artifact, ids, config, progress=lambda m: log(f"  {m}"))
                    except Exception as exc:  # noqa: BLE001 -- record and go on with the other configurations
                        log(f"  FAILED: {type(exc).__name__}: {exc}")
                        if runtime.is_patched(model):
                            runtime.remove(model)
                        r = {"error": f"{type(exc).__name__}: {exc}", "batch": b}
                    r.update(model=name, dtype=dtype_name, reads_target=q)
                    result["runs"].append(_clean(r))
                    if "ratio" in r:
                        log(f"  dense {r['dense_tok_s']:.1f} tok/s, clada {r['clada_tok_s']:.1f} tok/s, ratio "
                            f"{r['ratio']:.3f}, layout {r['layout_ratio']:.3f}, reads saved {r['mlp_reads_saved']:.3f}"
                            f", backends {r['backends']}")
                    save()
            first = False
            del model, artifacts, with_attention
            if device.type == "cuda":
                torch.cuda.empty_cache()

    save()
    print_steps(result["steps"])
    print_table([r for r in result["runs"] if "error" not in r])
    errors = [r for r in result["runs"] if "error" in r]
    errors += [m for r in result["steps"] for m in r["modes"].values() if "error" in m]
    failed_checks = [c for c in result["checks"] if not c["ok"]]
    log(f"wrote {path} ({len(result['steps'])} step rows, {len(result['runs'])} eager runs, {len(errors)} failed, "
        f"{len(failed_checks)} failed kernel checks, {len(result['kernels'])} kernel entries, "
        f"{result['total_minutes']:.2f} min{', budget exceeded' if result['budget_exceeded'] else ''})")
    return 1 if errors or failed_checks else 0


if __name__ == "__main__":
    sys.exit(main())
