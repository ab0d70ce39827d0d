"""Decode speed and gather-kernel bandwidth of CLADA on LLaMA-2-7B / Llama-3-8B shapes: one command, one JSON.

    python benchmarks/gpu/bench_gpu.py [--dry-run] [--out results/bench/gpu/] [--models llama2-7b,llama3-8b]
        [--dtypes bfloat16,float16] [--reads 0.25,0.40,0.50] [--batches 1,4,8] [--backend auto] [--minutes 7.5]

Random-weight models of the real shapes (built directly on the GPU in the dtype), TEAL-style per-layer thresholds
calibrated on the random model's own MLP inputs (``baseline_artifacts("teal", ...)``) at each reads-saved target,
then ``calibrate.bench.run_bench`` (dense, clada and layout-only, alternating in one process, static KV cache)
per model x dtype x target x batch, and a microbenchmark of the Triton gather against cuBLAS ``F.linear``.
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
from clada.calibrate.bench import BenchConfig, run_bench  # noqa: E402
from clada.runtime.backends import BACKENDS  # noqa: E402

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
DRY_DEFAULTS = {"reads": "0.4", "batches": "1,4", "backend": "triton", "dtypes": "float32,bfloat16"}
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


def calibrate(model, dtype_name: str, reads: list[float], dry: bool, device: torch.device) -> list:
    vocab = model.config.vocab_size
    n, prompt, scored = (4, 8, 8) if dry else (8, 32, 32)
    tokens = torch.randint(3, vocab, (n, prompt + scored + 1), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        calib = CalibrationActivations.collect(model, tokens.to(device), prompt, max_tokens=n * scored)
    return baseline_artifacts("teal", model, calib, reads)


def _timer(device: torch.device, fn, calls: int, warmup: int) -> float:
    """Median milliseconds of one call of ``fn`` (CUDA events on the GPU, perf_counter on CPU)."""
    for _ in range(warmup):
        fn()
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


@torch.no_grad()
def kernel_bench(model_name: str, hidden: int, inter: int, dtype: torch.dtype, device: torch.device,
                 dry: bool) -> list[dict]:
    """Triton gather vs dense F.linear for gate+up (hidden -> 2*inter) and down (inter -> hidden)."""
    triton_backend = BACKENDS.get("triton")
    if triton_backend is None or not triton_backend.accepts(device, dtype, 1):
        log(f"kernel bench skipped: triton backend cannot run {dtype} on {device}")
        return []
    calls, warmup = (1, 0) if dry else (50, 10)
    elem = torch.tensor([], dtype=dtype).element_size()
    out = []
    gen = torch.Generator(device=device).manual_seed(2)
    for buffer, c, width in (("gate_up", hidden, 2 * inter), ("down", inter, hidden)):
        w_dense = (torch.randn(width, c, device=device, dtype=torch.float32, generator=gen) * 0.02).to(dtype)
        rows = w_dense.t().contiguous()  # (C, OUT), unit column stride
        weight = torch.ones(c, device=device, dtype=torch.float32)
        for n in KERNEL_ROWS[:2] if dry else KERNEL_ROWS:
            x = torch.randn(n, c, device=device, dtype=torch.float32, generator=gen).to(dtype)
            dense_ms = _timer(device, lambda: F.linear(x, w_dense), calls, warmup)
            dense_bytes = width * c * elem
            score = x.float().abs() * weight
            for s in KERNEL_SPARSITY[::2] if dry else KERNEL_SPARSITY:
                if s == 0.0:
                    tau = torch.full((n,), -1.0, device=device, dtype=torch.float32)
                else:
                    tau = torch.quantile(score, s, dim=1).float().contiguous()
                keep = score > tau[:, None]
                union = int(keep.any(0).sum())
                ms = _timer(device, lambda: triton_backend.gather(x, weight, tau, rows), calls, warmup)
                read = union * width * elem
                out.append({
                    "model": model_name, "dtype": str(dtype).removeprefix("torch."), "buffer": buffer, "C": c,
                    "OUT": width, "rows": n, "sparsity": s, "kept_share": float(keep.float().mean()),
                    "channels_read_share": union / c, "triton_ms": ms, "dense_ms": dense_ms,
                    "triton_gb_s": read / (ms * 1e-3) / 1e9, "dense_gb_s": dense_bytes / (dense_ms * 1e-3) / 1e9,
                    "speedup_vs_dense": dense_ms / ms,
                })
                log(f"kernel {model_name} {out[-1]['dtype']} {buffer} rows={n} s={s}: triton {ms:.4f} ms "
                    f"({out[-1]['triton_gb_s']:.0f} GB/s), dense {dense_ms:.4f} ms ({out[-1]['dense_gb_s']:.0f} GB/s)")
        del w_dense, rows
    return out


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
    head = ("model", "dtype", "target", "reads", "batch", "dense", "clada", "ratio", "layout", "bound", "backend")
    fmt = "{:<10} {:<8} {:>6} {:>6} {:>5} {:>9} {:>9} {:>6} {:>6} {:>6}  {}"
    print(fmt.format(*head))
    for r in rows:
        f = lambda v, d=3: "-" if v is None else f"{v:.{d}f}"  # noqa: E731
        backends = ",".join(sorted(set(r.get("backends", {}).values()))) or "-"
        print(fmt.format(r["model"], r["dtype"], f(r["reads_target"], 2), f(r.get("mlp_reads_saved")), r["batch"],
                         f(r.get("dense_tok_s"), 1), f(r.get("clada_tok_s"), 1), f(r.get("ratio")),
                         f(r.get("layout_ratio")), f(r.get("bound")), backends))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU under TRITON_INTERPRET=1")
    p.add_argument("--out", default="results/bench/gpu/")
    p.add_argument("--models", default="llama2-7b,llama3-8b")
    p.add_argument("--dtypes", default=None, help="default bfloat16,float16 (dry run: float32,bfloat16)")
    p.add_argument("--reads", default=None, help="mlp_reads_saved targets (TEAL quantiles); default 0.25,0.40,0.50")
    p.add_argument("--batches", default=None, help="default 1,4,8")
    p.add_argument("--backend", default=None, help="runtime backend of the sparse modes (default auto)")
    p.add_argument("--minutes", type=float, default=7.5, help="start no new configuration past this budget")
    p.add_argument("--no-kernels", action="store_true", help="skip the kernel microbenchmark")
    args = p.parse_args(argv)
    dry = args.dry_run
    defaults = DRY_DEFAULTS if dry else {"reads": "0.25,0.40,0.50", "batches": "1,4,8", "backend": "auto",
                                         "dtypes": "bfloat16,float16"}
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
    reads = [float(q) for q in args.reads.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
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
        "settings": {"models": models, "dtypes": dtype_names, "reads": reads, "batches": batches,
                     "prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "reps": reps, "warmup": warmup,
                     "cache": "static"},
        "runs": [], "kernels": [], "calibration": [], "skipped": [], "budget_exceeded": False,
    }
    log(f"device {gpu}; {len(models)} models x {len(dtypes)} dtypes x {len(reads)} targets x {len(batches)} batches")

    def over_budget(what: str) -> bool:
        if elapsed_min() > args.minutes:
            if not result["budget_exceeded"]:
                log(f"budget of {args.minutes} min exceeded at {elapsed_min():.2f} min: no new configurations")
            result["budget_exceeded"] = True
            result["skipped"].append(what)
            return True
        return False

    for dtype, dtype_name in zip(dtypes, dtype_names):
        for name in models:
            if over_budget(f"{name} {dtype_name}"):
                continue
            log(f"building {name} {dtype_name} on {device}")
            model = build_model(name, dtype, device, dry)
            cfg = model.config
            if not args.no_kernels:
                result["kernels"] += kernel_bench(name, cfg.hidden_size, cfg.intermediate_size, dtype, device, dry)
            log(f"calibrating {name} {dtype_name} at reads {reads}")
            artifacts = calibrate(model, dtype_name, reads, dry, device)
            result["calibration"].append({"model": name, "dtype": dtype_name, "targets": reads})
            for q, artifact in zip(reads, artifacts):
                for b in batches:
                    what = f"{name} {dtype_name} reads={q} batch={b}"
                    if over_budget(what):
                        continue
                    ids = torch.randint(3, cfg.vocab_size, (b, prompt_tokens),
                                        generator=torch.Generator().manual_seed(3 + b)).to(device)
                    config = BenchConfig(batch=b, prompt_tokens=prompt_tokens, new_tokens=new_tokens, reps=reps,
                                         warmup=warmup, backend=args.backend, cache="static")
                    log(f"bench {what}")
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
            del model, artifacts
            if device.type == "cuda":
                torch.cuda.empty_cache()

    result["total_minutes"] = elapsed_min()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / ("gpu-bench-dry-run.json" if dry else f"gpu-bench-{_slug(gpu)}.json")
    write_atomic(path, (json.dumps(_clean(result), indent=1) + "\n").encode())
    print_table([r for r in result["runs"] if "error" not in r])
    errors = [r for r in result["runs"] if "error" in r]
    log(f"wrote {path} ({len(result['runs'])} runs, {len(errors)} failed, {len(result['kernels'])} kernel entries, "
        f"{result['total_minutes']:.2f} min{', budget exceeded' if result['budget_exceeded'] else ''})")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
