"""Decode speed of dense vs CLADA in one process: ``clada bench``.

Method (all figures come from one run):
- Prompts: ``batch`` windows of ``prompt_tokens`` consecutive tokens of real text (held-out documents by
  default), so activations, hence realised sparsity, are those of natural language.
- Modes, timed alternately within each repetition after ``warmup`` untimed repetitions:
  ``dense`` (the unpatched model, original weight layout), ``clada`` (the artifact applied -- CLADA's, or any
  registered method's -- with the requested kernel backend; ``auto`` measures dense against gathering per
  projection shape and runs the faster, see runtime/selection.py), ``layout`` (the gathering backend -- the named
  one, or for ``auto`` the one auto measured -- with every threshold at zero: nothing skipped; threshold rules
  only). ``layout`` separates what the transposed weight layout and gathering kernel gain by themselves from
  what skipping gains.
- Each mode is set anew in each repetition (``runtime.apply`` / ``remove``), then settled by one untimed generate
  of one decode step: the one-time work of the first decode call after ``apply`` (``auto``'s measured re-lay of the
  weights, ~0.1-0.2 s for SmolLM2) is what a user pays once per ``apply``, not per token, and timing it in every
  repetition charged it to CLADA's throughput (3% of a 64-token bfloat16 run on an AMD EPYC). It is reported
  beside: ``first_step_ms``, per mode, the median of that settling step's decode time (the steady step's is
  ``step_ms``), and ``apply_ms``, per mode, the median wall time of setting it (``runtime.apply``: the predictor
  rule builds its low-bit copy there).
- A step is timed with ``model.generate`` (greedy, exactly ``new_tokens`` tokens). Prefill is the first
  forward call; decode time is the rest of the generate wall time, so it includes generate's own overhead.
  tok/s = batch * (new_tokens - 1) / decode seconds. Medians over repetitions; ``spread`` per mode is
  (max - min) / median of the repetitions' tok/s, and ``noisy`` is set (and the CLI warns) above ``NOISY``.
  On a shared host the memory bandwidth a decode step gets drifts over seconds to minutes, which ratios of
  medians taken minutes apart cannot cancel; the modes of one repetition run back to back, so beside the medians:
  ``paired_ratio`` (median over repetitions of dense seconds / CLADA seconds of the same repetition),
  ``paired_sparsity_ratio`` (layout / CLADA likewise), ``clada_faster`` (repetitions in which CLADA beat dense),
  and ``best_ratio``, ``best_layout_ratio``, ``best_sparsity_ratio`` (from each mode's fastest repetition).
- ``threads``: torch's thread count during the run (the compiled kernel uses the same), set by ``--threads``.
- ``mlp_share`` f: share of dense decode time spent inside the MLPs (first input projection called to
  output projection returned, every layer), from an extra profiled dense run in the same process.
- ``attention_share`` f_a (artifacts that sparsify attention): share of dense decode time inside the attention
  projections (each of q/k/v or the fused one, and o, from its call to its return), from another profiled run.
- ``bound`` = 1 / (1 - r * f - r_a * f_a) with r = ``mlp_reads_saved``, r_a = ``attention_reads_saved`` (0
  without attention): the best ratio if time in every sparsified projection were proportional to bytes read;
  ``gain_of_bound`` = (ratio - 1) / (bound - 1). It can exceed 1 when the layout alone is faster.
- ``reads_saved``: the skipped bytes over every weight byte a decode step reads (attention, MLP, head).
- ``signal_overhead``: share of CLADA decode time spent computing surprisal, entropy and the threshold
  multiplier (the runtime's model-level hooks), from an extra profiled CLADA run.
- ``skip_bound`` = 1 / (1 - r * f_layout - r_a * f_a,layout), f_layout = ``layout_mlp_share`` (the MLPs' share
  of the layout mode's decode time, from an extra profiled run; ``layout_attention_share`` likewise): the best ``sparsity_ratio`` (CLADA / layout) if skipping
  saved MLP time in proportion to the bytes it saves on that path; ``skip_gain_of_bound`` = (sparsity_ratio - 1)
  / (skip_bound - 1): how much of it skipping realises.
- ``profile=False`` (the long-context sweep) skips the profiled runs: the figures they give are NaN.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .. import runtime
from ..artifacts import ATTENTION_KEYS, Artifact
from ..runtime.machine import cpu_info

MODES = ("dense", "clada", "layout")
NOISY = 0.10  # rep-to-rep spread of decode tok/s above which a run is flagged as noisy


@dataclass(frozen=True)
class BenchConfig:
    batch: int = 1
    prompt_tokens: int = 128
    new_tokens: int = 64
    reps: int = 5
    warmup: int = 1
    force: bool = False  # apply despite a fingerprint mismatch
    backend: str = "auto"  # kernel backend of the sparse modes (runtime.apply's backend=)
    profile: bool = True  # also the profiled runs for mlp_share, bound and signal_overhead
    layout: bool = True  # also time the layout-only mode (fast path, nothing skipped)
    mlp_time: bool = False  # also time the MLPs inside the timed runs (adds ~2 timer calls per layer)
    cache: str = "dynamic"  # KV cache of generate: "dynamic" (default of transformers) or "static"
    threads: int | None = None  # torch threads during the run (None: as set)


def bench_texts(data: str, artifact: Artifact | None = None) -> list[str]:
    """Benchmark prompt text: the documents of ``data`` the calibration did not see first, then the others (the
    artifact's split where it was calibrated on ``data``, else the default recipe's)."""
    from .data import load_documents, split_documents
    from .recipe import Recipe

    documents = load_documents(data)
    split = {"heldout_fraction": Recipe().heldout_fraction, "split_seed": Recipe().seed}
    if artifact is not None and documents.identity.get("sha256") == artifact.data.get("sha256"):
        split.update({k: artifact.data[k] for k in split if k in artifact.data})
    calib, held = split_documents(documents.documents, split["heldout_fraction"], split["split_seed"])
    return held + calib


def text_prompts(tokenizer, documents: list[str], batch: int, prompt_tokens: int) -> torch.Tensor:
    """(batch, prompt_tokens) int64: consecutive windows of the documents' concatenated token stream."""
    need = batch * prompt_tokens
    stream: list[int] = []
    for doc in documents:
        stream.extend(tokenizer(doc, add_special_tokens=False)["input_ids"])
        if len(stream) >= need:
            break
    if len(stream) < need:
        raise ValueError(f"the benchmark text has {len(stream)} tokens; batch {batch} x prompt {prompt_tokens} "
                         f"needs {need}")
    return torch.tensor(stream[:need], dtype=torch.long).view(batch, prompt_tokens)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Stopwatch:
    """Accumulates wall seconds between paired start/stop hook calls (synchronising on CUDA)."""

    def __init__(self, device: torch.device):
        self.device, self.total, self._t0 = device, 0.0, None
        self.active = True

    def start(self, *_args, **_kwargs) -> None:
        if self.active:
            _sync(self.device)
            self._t0 = time.perf_counter()

    def stop(self, *_args, **_kwargs) -> None:
        if self.active and self._t0 is not None:
            _sync(self.device)
            self.total += time.perf_counter() - self._t0
            self._t0 = None


def timed_generate(model: nn.Module, ids: torch.Tensor, new_tokens: int,
                    watch: _Stopwatch | None = None, cache: str = "dynamic") -> tuple[float, float]:
    """(prefill seconds, decode seconds) of one greedy generate of exactly ``new_tokens`` tokens.

    ``watch`` (optional) is paused during prefill so that it accumulates decode time only. ``cache``:
    "dynamic" (transformers' default: the KV cache grows by concatenation each step) or "static"
    (preallocated for prompt + new tokens, as serving engines do).
    """
    extra = {"cache_implementation": "static"} if cache == "static" else {}
    device = ids.device
    calls: list[float] = []

    def pre(*_a, **_k):
        if not calls and watch is not None:
            watch.active = False
        _sync(device)
        calls.append(time.perf_counter())

    def post(*_a, **_k):
        _sync(device)
        if len(calls) == 1:
            calls.append(time.perf_counter())
            if watch is not None:
                watch.active = True

    hooks = [model.register_forward_pre_hook(pre, prepend=True),
             model.register_forward_hook(post)]
    try:
        with torch.no_grad():
            _sync(device)
            t0 = time.perf_counter()
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, **extra)
            _sync(device)
            total = time.perf_counter() - t0
    finally:
        for h in hooks:
            h.remove()
    prefill = calls[1] - calls[0]
    return prefill, total - (calls[1] - t0)


def _mlp_watch(model: nn.Module, watch: _Stopwatch) -> list:
    """Hooks timing every layer's MLP: from its first input projection's call to its output projection's return."""
    adapter = runtime.adapter_for(model)
    hooks = []
    for part in adapter.mlp_parts(model):
        hooks.append(getattr(part.owner, part.in_names[0]).register_forward_pre_hook(watch.start))
        hooks.append(getattr(part.owner, part.out_name).register_forward_hook(watch.stop))
    return hooks


def _attention_watch(model: nn.Module, watch: _Stopwatch) -> list:
    """Hooks timing every attention projection (q/k/v or the fused one, and o), each from its call to its return."""
    adapter = runtime.adapter_for(model)
    hooks = []
    for part in adapter.attention_parts(model):
        for proj in part.projections():
            hooks.append(proj.register_forward_pre_hook(watch.start))
            hooks.append(proj.register_forward_hook(watch.stop))
    return hooks


def _signal_watch(model: nn.Module, watch: _Stopwatch) -> list:
    """Hooks bracketing the runtime's own model-level hooks (load signals and threshold multiplier)."""
    return [model.register_forward_pre_hook(watch.start, prepend=True),
            model.register_forward_pre_hook(watch.stop),
            model.register_forward_hook(watch.start, prepend=True),
            model.register_forward_hook(watch.stop)]


def zero_artifact(artifact: Artifact) -> Artifact:
    """The same artifact with every threshold at zero and no adaptation: the gathering path skipping nothing."""
    attention = {} if not artifact.has_attention else {  # zero thresholds, the same channel weights
        name: torch.zeros_like(getattr(artifact, name)) if name.startswith("tau") else getattr(artifact, name)
        for name in ATTENTION_KEYS}
    return Artifact(torch.zeros_like(artifact.tau_base_in), torch.zeros_like(artifact.tau_base_mid),
                    artifact.channel_weight_in, artifact.channel_weight_mid, artifact.fingerprint,
                    model=artifact.model, rule=artifact.rule, **attention)


def _set_mode(model: nn.Module, mode: str, artifacts: dict[str, Artifact], config: BenchConfig) -> None:
    if runtime.is_patched(model):
        runtime.remove(model)
    if mode != "dense":
        runtime.apply(model, artifacts[mode], force=config.force, backend=layout_backend(model, config.backend)
                      if mode == "layout" else config.backend)


def layout_backend(model: nn.Module, backend: str) -> str:
    """The gathering backend the ``layout`` mode runs: ``backend``, or for ``auto`` the first gathering backend
    for the model's device and dtype (the one auto measures against dense)."""
    if backend != "auto":
        return backend
    param = next(model.parameters())
    return runtime.first_gathering(param.device, param.dtype, 1).name


def paired(base: list[float], other: list[float]) -> float:
    """Median over repetitions of base seconds / other seconds (the speed-up of ``other``, rep by rep)."""
    return statistics.median(b / o for b, o in zip(base, other))


def cpu_folder(cpu: dict) -> str:
    """The name of a CPU's folder under results/bench/ (``cpu``: ``runtime.machine.cpu_info()``), e.g.
    ``amd-epyc-f26m2``: speed figures hold only for the CPU they were measured on."""
    slug = "".join(c if c.isalnum() else "-" for c in str(cpu["model_name"]).lower()).strip("-")
    return f"{slug}-f{cpu['family']}m{cpu['model']}"


def spread(seconds: list[float]) -> float:
    """(max - min) / median of the rates 1 / seconds: the rep-to-rep spread of a mode's tok/s."""
    rates = [1.0 / s for s in seconds]
    return (max(rates) - min(rates)) / statistics.median(rates)


def _profiled(model: nn.Module, ids: torch.Tensor, new_tokens: int,
              install: Callable[[nn.Module, _Stopwatch], list], cache: str = "dynamic") -> float:
    """Share of decode time inside what ``install``'s hooks bracket, in one extra generate."""
    watch = _Stopwatch(ids.device)
    hooks = install(model, watch)
    try:
        _, decode = timed_generate(model, ids, new_tokens, watch, cache)
    finally:
        for h in hooks:
            h.remove()
    return watch.total / decode


def _fast_path(stats: list[dict]) -> dict:
    """Which backend computed the thresholded products of the timed sparse runs: share of gate inputs per name."""
    calls = {path: sum(s["path_calls"][path] for s in stats) for path in stats[0]["path_calls"]} if stats else {}
    total = sum(calls.values())
    return {path: n / total for path, n in calls.items()} if total else calls


def run_bench(model: nn.Module, artifact: Artifact, ids: torch.Tensor, config: BenchConfig,
              progress: Callable[[str], None] | None = None) -> dict:
    """Dense vs CLADA decode throughput on prompts ``ids`` (B, P) of an unpatched ``model``."""
    if runtime.is_patched(model):
        raise ValueError("run_bench needs the unpatched model (it applies and removes the artifact itself)")
    threads = torch.get_num_threads()
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    try:
        return _run_bench(model, artifact, ids, config, progress)
    finally:
        torch.set_num_threads(threads)


def _run_bench(model: nn.Module, artifact: Artifact, ids: torch.Tensor, config: BenchConfig,
               progress: Callable[[str], None] | None) -> dict:
    say = progress or (lambda _msg: None)
    artifacts = {"clada": artifact, "layout": zero_artifact(artifact)}
    decode_tokens = ids.shape[0] * (config.new_tokens - 1)
    layout = config.layout and runtime.RULES[artifact.rule.get("name", "threshold")].threshold_form
    modes = MODES if layout else tuple(m for m in MODES if m != "layout")
    times: dict[str, list[float]] = {m: [] for m in modes}
    prefill: dict[str, list[float]] = {m: [] for m in modes}
    mlp: dict[str, list[float]] = {m: [] for m in modes}
    first_step: dict[str, list[float]] = {m: [] for m in modes}
    apply_s: dict[str, list[float]] = {m: [] for m in modes}
    stats: list[dict] = []
    for rep in range(config.warmup + config.reps):
        for mode in modes:
            start = time.perf_counter()
            _set_mode(model, mode, artifacts, config)
            set_seconds = time.perf_counter() - start
            _, settle = timed_generate(model, ids, 2, cache=config.cache)  # one decode step: the one-time work
            if runtime.is_patched(model):
                runtime.reset_stats(model)  # the realised figures are the timed run's
            if rep >= config.warmup:
                first_step[mode].append(settle)
                apply_s[mode].append(set_seconds)
            watch = _Stopwatch(ids.device) if config.mlp_time else None
            hooks = _mlp_watch(model, watch) if watch is not None else []
            try:
                p, d = timed_generate(model, ids, config.new_tokens, watch, config.cache)
            finally:
                for h in hooks:
                    h.remove()
            if rep >= config.warmup:
                times[mode].append(d)
                prefill[mode].append(p)
                if watch is not None:
                    mlp[mode].append(watch.total)
                if mode == "clada":
                    stats.append(runtime.stats(model))
        timed = rep - config.warmup + 1
        say(f"rep {rep + 1}/{config.warmup + config.reps}" + (" (warm-up)" if timed <= 0 else
            f": dense {decode_tokens / times['dense'][-1]:.1f} tok/s, clada {decode_tokens / times['clada'][-1]:.1f} tok/s"))
    mlp_share = layout_mlp_share = signal_overhead = float("nan")
    attention_share = layout_attention_share = 0.0 if not artifact.has_attention else float("nan")
    if config.profile:
        _set_mode(model, "dense", artifacts, config)
        mlp_share = _profiled(model, ids, config.new_tokens, _mlp_watch, config.cache)
        if artifact.has_attention:
            attention_share = _profiled(model, ids, config.new_tokens, _attention_watch, config.cache)
        if layout:
            _set_mode(model, "layout", artifacts, config)
            layout_mlp_share = _profiled(model, ids, config.new_tokens, _mlp_watch, config.cache)
            if artifact.has_attention:
                layout_attention_share = _profiled(model, ids, config.new_tokens, _attention_watch, config.cache)
        _set_mode(model, "clada", artifacts, config)
        signal_overhead = _profiled(model, ids, config.new_tokens, _signal_watch, config.cache)
    if runtime.is_patched(model):
        runtime.remove(model)

    tok_s = {m: decode_tokens / statistics.median(times[m]) for m in modes}
    tok_s.setdefault("layout", float("nan"))
    best = {m: min(times[m]) for m in modes}
    best.setdefault("layout", float("nan"))
    weight = [s["tokens"] for s in stats]
    def mean_stat(key: str) -> float:
        return sum(s[key] * w for s, w in zip(stats, weight)) / max(sum(weight), 1)
    reads = mean_stat("mlp_reads_saved")
    attention_reads = mean_stat("attention_reads_saved") if artifact.has_attention else 0.0
    ratio = tok_s["clada"] / tok_s["dense"]
    bound = 1.0 / (1.0 - reads * mlp_share - attention_reads * attention_share)
    skip_bound = 1.0 / (1.0 - reads * layout_mlp_share - attention_reads * layout_attention_share)
    sparsity_ratio = tok_s["clada"] / tok_s["layout"]
    return {
        "dense_tok_s": tok_s["dense"], "clada_tok_s": tok_s["clada"], "ratio": ratio,
        "mlp_sparsity": mean_stat("mlp_sparsity"), "input_sparsity": mean_stat("input_sparsity"),
        "mlp_reads_saved": reads, "reads_saved": mean_stat("reads_saved"), "relaxed_share": mean_stat("relaxed_share"),
        "attention_reads_saved": attention_reads if artifact.has_attention else None,
        "mlp_share": mlp_share, "attention_share": attention_share if artifact.has_attention else None,
        "layout_attention_share": layout_attention_share if artifact.has_attention else None, "bound": bound,
        "gain_of_bound": (ratio - 1.0) / (bound - 1.0) if bound > 1.0 else float("nan"),  # nan: not profiled
        "signal_overhead": signal_overhead,
        "layout_tok_s": tok_s["layout"], "layout_ratio": tok_s["layout"] / tok_s["dense"],
        "sparsity_ratio": sparsity_ratio, "layout_mlp_share": layout_mlp_share, "skip_bound": skip_bound,
        "skip_gain_of_bound": (sparsity_ratio - 1.0) / (skip_bound - 1.0) if skip_bound > 1.0 else float("nan"),
        "fast_path": _fast_path(stats), "rule": artifact.rule.get("name", "threshold"), "backend": config.backend,
        "layout_backend": layout_backend(model, config.backend) if layout else None,
        "backends": stats[-1]["backends"] if stats else {},
        "selection": stats[-1]["selection"] if stats else [],
        "dense_products": stats[-1].get("dense_products") if stats else None,
        "predictor_path": stats[-1].get("predictor_path") if stats else None,
        "paired_ratio": paired(times["dense"], times["clada"]),
        "paired_sparsity_ratio": paired(times["layout"], times["clada"]) if layout else float("nan"),
        "clada_faster": sum(d > c for d, c in zip(times["dense"], times["clada"])),
        "best_ratio": best["dense"] / best["clada"], "best_layout_ratio": best["dense"] / best["layout"],
        "best_sparsity_ratio": best["layout"] / best["clada"],
        "spread": {m: spread(times[m]) for m in modes},
        "noisy": any(spread(times[m]) > NOISY for m in modes),
        "dense_prefill_s": statistics.median(prefill["dense"]),
        "clada_prefill_s": statistics.median(prefill["clada"]),
        "prefill_overhead": statistics.median(prefill["clada"]) / statistics.median(prefill["dense"]) - 1.0,
        "batch": int(ids.shape[0]), "prompt_tokens": int(ids.shape[1]), "new_tokens": config.new_tokens,
        "reps": config.reps, "warmup": config.warmup, "cache": config.cache,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "device": str(ids.device), "threads": torch.get_num_threads(), "torch": torch.__version__,
        "cpu": cpu_info(),
        "decode_s": {m: times[m] for m in modes},
        "step_ms": {m: statistics.median(times[m]) / (config.new_tokens - 1) * 1e3 for m in modes},
        "mlp_step_ms": {m: statistics.median(v) / (config.new_tokens - 1) * 1e3 for m, v in mlp.items() if v},
        "first_step_ms": {m: statistics.median(first_step[m]) * 1e3 for m in modes},
        "apply_ms": {m: statistics.median(apply_s[m]) * 1e3 for m in modes},
    }
