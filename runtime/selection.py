"""Measured choice, per machine, between a projection's dense product and a gathering kernel backend.

Skipping weight reads pays only where the gathering kernel, at the density a model's activations keep, is
faster than the dense product on this machine: torch's dense GEMV is much faster on some CPUs than on others.
``backend="auto"`` therefore times both before the first decode step of a (device, dtype) and follows the
measurement. For each projection shape of the model and each token-row count in ``ROW_COUNTS`` it times, over
the model's own weights of that shape (enough layers that they stream from memory, as decoding does):

- ``dense``: the projections' own products in their original layout (``F.linear``, what the unpatched model does);
- ``dense_rows``: the same products with the weights stored as input-channel rows (the gathering layout);
- ``sparse``: the gathering backend on synthetic activations keeping ``density`` of the channels of each row
  (independent random masks per row, so at several rows the union of the masks is what it is for independent
  rows).

On a CPU each layer's timed calls follow an attention-shaped product (channels x channels, untimed), as an MLP
product follows torch's own work in a model, whose worker threads may still be spinning when the kernel starts.
On a GPU the passes are timed as launched from Python (what a plain ``generate`` pays: the Triton kernel's launch
costs about 0.1 ms more than cuBLAS's), or, where ``runtime.apply(..., cuda_graphs=True)`` says the decode steps
are replayed from CUDA graphs (a serving engine's captured steps), each candidate's pass is captured in a graph and
its replays are timed: the device's work alone.

Per shape, the layout is decided at the row count of the call that triggered the measurement (the batch the user
decodes; the next timed count up): the gathering layout if there the faster of ``sparse`` and ``dense_rows`` beats
``dense`` by more than ``TOLERANCE`` (10%), the runtime's own per-call work (``CALL_OVERHEAD_MS``, on CPU: the timed
calls are the kernels alone) added to it; then every row count runs the faster of the two. Otherwise the shape keeps
its original layout and runs ``dense`` at every row count. (One copy of the weights has one layout: a process that
later decodes at another row count gets the best that layout allows there, which ``reason`` shows.) Timings are
cached in ``$CLADA_CACHE/selection/`` keyed by the CPU (model and flags) or GPU name, torch version, thread count,
dtype, shape, rows and density (rounded to ``DENSITY_STEP``), so a machine measures each case once -- or, where the
decision was a close call, again at later decisions (up to ``SITTINGS`` sittings, each candidate's fastest kept: a
neighbour's memory traffic only ever slows a sitting down). Units: milliseconds per call (all layers of the shape
divided by their number).
"""

from __future__ import annotations

import functools
import hashlib
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch.nn import functional as F

from .machine import cache_root, cpu_identity, last_level_cache_bytes
from .rules import SPARSITY_KEYS

ROW_COUNTS = (1, 2, 4, 8)  # token rows per call that are timed; a call of n rows follows the next count up
# The gathering layout must win by more than this share at the deciding row count, after the runtime's own work
# per call (below) is added to its timings: the timed calls are the kernels alone, in a loop over weights whose
# caches a model's call does not meet. (With the relative margin alone, 25%, the runtime's work was guessed at: bf16
# gate+up at 4 rows measured 9% and 21% faster gathered and lost end to end.)
TOLERANCE = 0.10
# And, on CPU, the runtime's own work per gathered call (the wrappers, the gate's thresholds, a group's bookkeeping),
# which the timed kernels leave out, is added to the gathering layout's timings before comparing. Measured on an AMD
# EPYC (SmolLM2-135M, layer 3 of a patched model, float32 and bfloat16, 1 and 4 rows; a call through the wrappers
# minus the bare kernel on the same input): 23-26 us for one projection (down, o), 54-64 us for a row group (gate+up,
# q/k/v). For small shapes it decides: q/k/v in bfloat16 at 4 rows gathered 28% faster per kernel call (0.083 vs
# 0.115 ms) and CLADA lost end to end (0.98x dense).
CALL_OVERHEAD_MS = {1: 0.025, 2: 0.06}  # by members: one projection, or a row group of several
# A cached timing whose decision was a close call is measured again at later decisions, up to SITTINGS sittings in all,
# keeping each candidate's fastest (``fastest_of``): on a shared host a sitting under a neighbour's memory traffic ran
# every candidate 2-4x slower, which shrinks the fixed per-call overhead beside the kernels and froze a wrong choice
# into the cache (SmolLM2-135M's down projection, bfloat16, 1 row, 2 threads, AMD EPYC Zen 3: cached dense 0.419 /
# native 0.340 ms, so gathered; measured again 0.110 / 0.104, dense). Close: the margin (``gathering_margin``,
# ``product_margin``: 1 is the decision's edge) within CLOSE_CALL of 1.
SITTINGS = 3
CLOSE_CALL = 0.2
DENSITY_STEP = 0.05
REPS = 5  # timed passes per candidate (after one warm-up pass), median
MIN_STREAM_BYTES = 64 << 20  # bytes each timed pass reads at least (or every layer of the shape)
CANDIDATES = ("dense", "dense_rows", "sparse")


@dataclass(frozen=True)
class Shape:
    """One kind of gated projection: ``members`` dense products (gate and up: 2) of ``channels`` inputs whose
    row buffer is (channels, width), where width is the members' outputs together."""

    channels: int
    width: int
    members: int

    def __str__(self) -> str:
        return f"{self.channels}x{self.width}" + (f"/{self.members}" if self.members > 1 else "")


@dataclass
class Timing:
    """Milliseconds per call of each candidate for one shape at ``rows`` token rows keeping ``density``."""

    rows: int
    density: float
    dense: float
    dense_rows: float
    sparse: float
    cached: bool = False
    sittings: int = 1  # measurements combined into it (``fastest_of``)


@dataclass
class ShapeDecision:
    """What a shape runs: its layout, the backend name per row count, and the timings behind them."""

    shape: Shape
    backend: str  # the gathering backend that was timed
    deciding_rows: int  # the timed row count at which the layout was decided
    gathering_layout: bool
    per_rows: dict[int, str]  # rows -> "dense" or ``backend``
    timings: list[Timing]

    def choice(self, rows: int) -> str:
        """Backend name (or "dense") for a call of ``rows`` token rows (at most ``backends.MAX_GATHER_ROWS``)."""
        return self.per_rows[timed_count(rows)]

    def reason(self) -> str:
        parts = [f"{t.rows} rows: {self.backend} {t.sparse:.3f} / dense {t.dense:.3f}"
                 + (f" / dense_rows {t.dense_rows:.3f}" if self.gathering_layout else "") + " ms" for t in self.timings]
        density = self.timings[0].density if self.timings else float("nan")
        layout = "gathering layout" if self.gathering_layout else "original layout (dense wins)"
        layout += f" (decided at {self.deciding_rows} rows)"
        cached = " (cached)" if self.timings and all(t.cached for t in self.timings) else ""
        at = next((t for t in self.timings if t.rows == self.deciding_rows), None)
        cached += f" ({at.sittings} sittings)" if at is not None and at.sittings > 1 else ""
        return f"{layout} at {density:.2f} kept{cached}; " + "; ".join(parts)

    def summary(self) -> dict:
        return {"shape": str(self.shape), "backend": self.backend, "gathering_layout": self.gathering_layout,
                "deciding_rows": self.deciding_rows,
                "per_rows": {str(k): v for k, v in self.per_rows.items()}, "reason": self.reason(),
                "timings": [asdict(t) for t in self.timings]}


def timed_count(rows: int) -> int:
    """The timed row count a call of ``rows`` token rows follows: the next one up (the largest beyond)."""
    return next((n for n in ROW_COUNTS if rows <= n), ROW_COUNTS[-1])


def decide(shape: Shape, backend: str, timings: Sequence[Timing], rows: int = 1,
           overhead_ms: float = 0.0) -> ShapeDecision:
    """The layout (decided at ``rows``, the triggering call's token rows) and the choice per row count from
    ``timings`` (one per ``ROW_COUNTS`` entry), as the module doc says; ``overhead_ms``: the runtime's own work
    per gathered call of the shape, added to the gathering layout's timings before comparing."""
    at = next(t for t in timings if t.rows == timed_count(rows))
    gathering = gathering_margin(at, overhead_ms) < 1.0
    per_rows = {t.rows: (backend if gathering and t.sparse <= t.dense_rows else "dense") for t in timings}
    return ShapeDecision(shape, backend, at.rows, gathering, per_rows, list(timings))


def gathering_margin(timing: Timing, overhead_ms: float = 0.0) -> float:
    """The gathering layout's time (its faster product plus ``overhead_ms``) over the most it may take to be chosen
    (dense less TOLERANCE): below 1 it is chosen."""
    return (min(timing.sparse, timing.dense_rows) + overhead_ms) / (timing.dense * (1 - TOLERANCE))


def close_call(margin: float) -> bool:
    """Whether a decision of this margin is near enough its edge to be measured again (``SITTINGS``)."""
    return abs(margin - 1.0) <= CLOSE_CALL


def fastest_of(old, new, candidates: Sequence[str]):
    """``new`` (a Timing or ProductTiming of the same case) with each of ``candidates`` the faster of the two
    sittings, and their sittings summed: a disturbance only ever adds time."""
    return replace(new, **{name: min(getattr(old, name), getattr(new, name)) for name in candidates},
                   sittings=old.sittings + new.sittings, cached=False)


def settled(cls, entry: dict | None, candidates: Sequence[str], measure_now: Callable[[], object],
            margin: Callable[[object], float] | None = None) -> tuple[object, bool]:
    """(timing, fresh) of one case: the cache's ``entry`` read as ``cls`` (Timing or ProductTiming); measured now
    (``measure_now()``) where there is none; measured again and combined (``fastest_of`` over ``candidates``) where
    ``margin`` (None: never) puts its decision within CLOSE_CALL of the edge and it has fewer than SITTINGS sittings.
    ``fresh``: the timing is new and belongs in the cache."""
    timing = None if entry is None else cls(**{**entry, "cached": True})
    if timing is not None and (margin is None or timing.sittings >= SITTINGS or not close_call(margin(timing))):
        return timing, False
    new = measure_now()
    return (new if timing is None else fastest_of(timing, new, candidates)), True


def _entry(timing) -> dict:
    return {k: v for k, v in asdict(timing).items() if k != "cached"}


# --- measurement -----------------------------------------------------------------------------------------------

def not_traced(fn: Callable) -> Callable:
    """``fn``, never traced by dynamo (``torch.compiler.disable``, torch 2.11's dynamo crashed inside the measured
    choices), decorated at its first call where dynamo is loaded: without dynamo nothing is compiling, and importing
    it with the runtime would cost ~1.4 s and import Triton."""
    disabled = None

    @functools.wraps(fn)
    def call(*args, **kwargs):
        nonlocal disabled
        if "torch._dynamo" not in sys.modules:
            return fn(*args, **kwargs)
        if disabled is None:
            disabled = torch.compiler.disable(fn)
        return disabled(*args, **kwargs)
    return call


Clock = Callable[[torch.device], float]


def wall_clock(device: torch.device) -> float:
    """Seconds, after the device finished its queued work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


@dataclass
class Workload:
    """The weights of every layer of one shape: per layer, the members' (out, in) weights as the model holds
    them in its original layout."""

    shape: Shape
    weights: list[list[torch.Tensor]]  # layer -> members' (out_i, channels) weights


def _streaming(layers: Sequence, device: torch.device) -> list:
    """The first of ``layers`` (each a tensor or a list of them) that one pass over them streams at least
    ``MIN_STREAM_BYTES`` (or four last-level caches), or all."""
    need = max(MIN_STREAM_BYTES, 4 * cache_in_front(device))
    taken, total = [], 0
    for layer in layers:
        taken.append(layer)
        total += sum(w.numel() * w.element_size() for w in (layer if isinstance(layer, list) else [layer]))
        if total >= need:
            break
    return taken


def measure(workload: Workload, gather: Callable, rows: int, density: float, dtype: torch.dtype,
            device: torch.device, clock: Clock = wall_clock, reps: int = REPS, graphs: bool = False) -> Timing:
    """Time the three candidates of ``workload`` at ``rows`` token rows keeping ``density`` of the channels
    (``graphs``, on a GPU: as replays of a CUDA graph of each pass, else as calls launched from Python)."""
    layers = _streaming(workload.weights, device)
    channels = workload.shape.channels
    gen = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, channels, generator=gen).to(device=device, dtype=dtype)
    weight = torch.ones(channels, device=device)
    scores = x.float().abs()
    if density >= 1.0:
        tau = torch.full((rows, 1), -1.0, device=device)
    else:
        tau = torch.quantile(scores, 1.0 - density, dim=1, keepdim=True)
    row_buffers = [torch.cat([w.t() for w in members], dim=1).contiguous() for members in layers]
    transposed = [[buf[:, a:b].t() for a, b in _bounds(members)] for buf, members in zip(row_buffers, layers)]
    # In a model every MLP product follows torch's own work (the attention projections), whose worker threads may
    # still be busy-waiting when the kernel starts. On a CPU each timed call here follows such a product too (an
    # attention-shaped one, outside the timed span): back-to-back kernel calls would miss that contention. On a GPU
    # the calls run back to back (timing one call would synchronise each time).
    context = torch.randn(channels, channels, generator=gen).to(device=device, dtype=dtype)
    in_context = device.type == "cpu"
    dense_calls = [[(lambda w=w: F.linear(x, w)) for w in members] for members in layers]
    dense_rows_calls = [[(lambda w=w: F.linear(x, w)) for w in members] for members in transposed]
    sparse_calls = [[lambda buf=buf: gather(x, weight, tau, buf)] for buf in row_buffers]

    def timed(calls: list[list[Callable]]) -> float:
        """Seconds of one pass over every layer's calls."""
        if not in_context:
            t0 = clock(device)
            for layer in calls:
                for call in layer:
                    call()
            return clock(device) - t0
        total = 0.0
        for layer in calls:
            F.linear(x, context)
            t0 = clock(device)
            for call in layer:
                call()
            total += clock(device) - t0
        return total

    passes = {"dense": dense_calls, "dense_rows": dense_rows_calls, "sparse": sparse_calls}
    if device.type == "cuda" and graphs:  # the device's time, as a decode step replayed from a graph spends it
        passes = {name: graphed(calls, device) for name, calls in passes.items()}
    times: dict[str, list[float]] = {name: [] for name in CANDIDATES}
    with torch.no_grad():
        for rep in range(reps + 1):
            for name in CANDIDATES:  # alternating, so that a disturbance hits every candidate alike
                elapsed = timed(passes[name])
                if rep:
                    times[name].append(elapsed)
    ms = {name: statistics.median(v) / len(layers) * 1e3 for name, v in times.items()}
    return Timing(rows, density, ms["dense"], ms["dense_rows"], ms["sparse"])


def capture(run: Callable[[], object], device: torch.device):
    """(a CUDA graph of one ``run()``, None) after one eager ``run()`` on a side stream (Triton's autotuning and
    cuBLAS's setup stay out of the graph), or (None, why) where capture fails (something in ``run`` synchronises)."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        run()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            run()
    except RuntimeError as exc:
        return None, f"{type(exc).__name__}: {exc}"
    return graph, None


def graphed(calls: list[list[Callable]], device: torch.device) -> list[list[Callable]]:
    """``calls`` (per layer, its calls) as one replay of a CUDA graph of a pass over them (``capture``), so that
    timing a pass measures the device's work and not Python's launches (which a served model replaying graphs does
    not pay); the calls themselves where capture fails."""
    def one_pass() -> None:
        for layer in calls:
            for call in layer:
                call()

    with torch.no_grad():
        graph, _ = capture(one_pass, device)
    return calls if graph is None else [[graph.replay]]


def _bounds(members: list[torch.Tensor]) -> list[tuple[int, int]]:
    starts = [0]
    for w in members:
        starts.append(starts[-1] + w.shape[0])
    return list(zip(starts[:-1], starts[1:]))


def cache_in_front(device: torch.device) -> int:
    """Bytes of the largest cache in front of ``device``'s memory: a GPU's L2, else the CPU's last level."""
    if device.type == "cuda":
        return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 32 << 20))
    return last_level_cache_bytes()


# --- the cache of timings ---------------------------------------------------------------------------------------

def machine_key(device: torch.device) -> str:
    """What timings depend on besides the case: processor (or GPU), torch version and thread count."""
    hw = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_identity()
    text = f"{hw}|{platform.machine()}|{torch.__version__}|{torch.get_num_threads()}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _cache_file(device: torch.device) -> Path:
    return cache_root() / "selection" / f"{device.type}-{machine_key(device)}.json"


MEASUREMENT = 3  # how ``measure`` times (3: on a CPU, after an attention-shaped product); part of the cache key


def case_key(backend: str, dtype: torch.dtype, shape: Shape, rows: int, density: float, graphs: bool = False) -> str:
    """``backend``: its identity (name and, e.g., the built kernel's hash); ``graphs``: timed as CUDA graph replays."""
    return (f"m{MEASUREMENT}|{backend}|{str(dtype).removeprefix('torch.')}|{shape}|{rows}|{density:.2f}"
            + ("|graphs" if graphs else ""))


def load_cache(device: torch.device) -> dict[str, dict]:
    try:
        data = json.loads(_cache_file(device).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def store_cache(device: torch.device, entries: dict[str, dict]) -> None:
    """Merge ``entries`` into the machine's cache file (written to a temporary file, then renamed)."""
    from ..artifacts import write_atomic

    path = _cache_file(device)
    merged = {**load_cache(device), **entries}
    try:
        write_atomic(path, (json.dumps(merged, indent=0, sort_keys=True) + "\n").encode())
    except OSError:
        pass  # a read-only cache only costs the measurement again


def round_density(density: float) -> float:
    return min(1.0, max(DENSITY_STEP, round(density / DENSITY_STEP) * DENSITY_STEP))


@not_traced  # measures, reads and writes files: never traced into a compiled graph
def select(workloads: Sequence[Workload], densities: Sequence[float], backend, dtype: torch.dtype,
           device: torch.device, rows: int = 1, clock: Clock = wall_clock,
           graphs: bool = False) -> list[ShapeDecision]:
    """A decision per workload (shape) between the dense product and ``backend`` (a gathering KernelBackend),
    its layout decided at ``rows`` token rows, measuring what the cache does not have yet (``graphs``: on a GPU,
    timed as CUDA graph replays)."""
    graphs = graphs and device.type == "cuda"
    cache = load_cache(device)
    fresh: dict[str, dict] = {}
    decisions = []
    for workload, density in zip(workloads, densities):
        density = round_density(density)
        overhead = CALL_OVERHEAD_MS[min(workload.shape.members, 2)] if device.type == "cpu" else 0.0
        timings = []
        for n in ROW_COUNTS:  # only the deciding row count's close call is measured again: it decides the layout
            key = case_key(backend.identity(), dtype, workload.shape, n, density, graphs)
            timing, new = settled(Timing, cache.get(key), CANDIDATES,
                                  lambda n=n: measure(workload, backend.gather, n, density, dtype, device, clock,
                                                      graphs=graphs),
                                  (lambda t: gathering_margin(t, overhead)) if n == timed_count(rows) else None)
            if new:
                fresh[key] = _entry(timing)
            timings.append(timing)
        decisions.append(decide(workload.shape, backend.name, timings, rows, overhead))
    if fresh:
        store_cache(device, fresh)
    return decisions


# --- the products a decode step leaves dense (runtime.dense_products) ---------------------------------------------
# Torch's product against the compiled one (``native.GatherKernel.gemv``) on the same weights in their original
# layout; the compiled one is taken where it is faster by more than TOLERANCE after PRODUCT_CALL_OVERHEAD_MS, the
# extra Python work of its call (the module's forward, reshapes, the output's allocation), is added to it.
PRODUCT_CALL_OVERHEAD_MS = 0.005
PRODUCT_CANDIDATES = ("torch", "native")


@dataclass
class ProductTiming:
    """Milliseconds per call of torch's dense product and the compiled one for one weight shape at ``rows`` rows."""

    rows: int
    torch: float
    native: float
    cached: bool = False
    sittings: int = 1  # measurements combined into it (``fastest_of``)


@dataclass
class ProductDecision:
    """Which product a dense projection of ``shape`` (out, in) and ``dtype`` runs at ``rows`` token rows, and why."""

    shape: tuple[int, int]
    dtype: str
    timing: ProductTiming
    choice: str  # "native" or "torch"

    def summary(self) -> dict:
        t = self.timing
        return {"shape": f"{self.shape[0]}x{self.shape[1]}", "dtype": self.dtype, "rows": t.rows,
                "choice": self.choice, "reason": f"native {t.native:.3f} / torch {t.torch:.3f} ms"
                + (" (cached)" if t.cached else "") + (f" ({t.sittings} sittings)" if t.sittings > 1 else "")}


def measure_products(weights: Sequence[torch.Tensor], rows: int, clock: Clock = wall_clock,
                     reps: int = REPS) -> ProductTiming:
    """Time torch's product (``F.linear``) and the compiled one on ``weights`` (same shape, dtype and device; enough
    of them that a pass streams from memory, as decoding does) at ``rows`` token rows, alternating the two."""
    from . import native

    kernel = native.gather_kernel()
    device = weights[0].device
    stream = _streaming(list(weights), device)
    x = torch.randn(rows, weights[0].shape[1], generator=torch.Generator().manual_seed(rows)).to(weights[0].dtype)
    calls = {"torch": lambda w: F.linear(x, w), "native": lambda w: kernel.gemv(x, w)}
    seconds = alternating_medians({name: (lambda call=calls[name]: [call(w) for w in stream])
                                   for name in PRODUCT_CANDIDATES}, device, clock, reps)
    ms = {name: t / len(stream) * 1e3 for name, t in seconds.items()}
    return ProductTiming(rows, torch=ms["torch"], native=ms["native"])


def alternating_medians(passes: dict[str, Callable[[], object]], device: torch.device, clock: Clock,
                        reps: int) -> dict[str, float]:
    """Median seconds of each named pass, the passes run in turn ``reps`` times after one untimed round (so that a
    disturbance hits every candidate alike)."""
    times: dict[str, list[float]] = {name: [] for name in passes}
    with torch.no_grad():
        for rep in range(reps + 1):
            for name, run in passes.items():
                t0 = clock(device)
                run()
                if rep:
                    times[name].append(clock(device) - t0)
    return {name: statistics.median(v) for name, v in times.items()}


def product_margin(timing: ProductTiming) -> float:
    """The compiled product's time plus PRODUCT_CALL_OVERHEAD_MS over the most it may take to be chosen (torch's
    less TOLERANCE): below 1 it is chosen."""
    return (timing.native + PRODUCT_CALL_OVERHEAD_MS) / (timing.torch * (1 - TOLERANCE))


@not_traced  # measures, reads and writes files: never traced into a compiled graph
def choose_product(weights: Sequence[torch.Tensor], rows: int) -> ProductDecision:
    """The product the dense projections with ``weights`` (one shape) run at ``rows`` (a ``ROW_COUNTS`` entry) token
    rows on this machine: measured once per machine and case, then read from the timing cache."""
    from . import native

    w = weights[0]
    dtype = str(w.dtype).removeprefix("torch.")
    key = f"m{MEASUREMENT}|gemv:{native.gather_kernel().path.stem}|{dtype}|{w.shape[0]}x{w.shape[1]}|{rows}"
    timing, new = settled(ProductTiming, load_cache(w.device).get(key), PRODUCT_CANDIDATES,
                          lambda: measure_products(weights, rows), product_margin)
    if new:
        store_cache(w.device, {key: _entry(timing)})
    native_wins = product_margin(timing) < 1.0
    return ProductDecision((int(w.shape[0]), int(w.shape[1])), dtype, timing, "native" if native_wins else "torch")


# --- dense calls of many token rows on a re-laid weight (prefill) --------------------------------------------------
# A projection in the gathering layout keeps its (out, in) shape as a transposed view of (in, out) rows, and its dense
# calls (prefill, ``runtime.dense``) run torch's product on that view. On a CPU without a fast 2-byte float product
# this can be far slower than on the original layout: bfloat16 on an AMD EPYC Zen 3 (AVX2), 128 token rows of SmolLM2's
# gate (3072x576), 470 ms on the view against 49 on the original layout; with both operands widened to float32 and
# the result rounded back, 6.5 ms (the same sums in float32; torch's bfloat16 product differs in the last bit of
# some outputs). So for 2-byte floats on a CPU the two are timed once per machine, dtype and shape (at
# ``WIDE_ROWS`` rows) and the faster runs every dense call of the re-laid weight.
WIDE_ROWS = 64
WIDE_CANDIDATES = ("torch", "float32")


def wide_product(x: torch.Tensor, weight: torch.Tensor, choice: str, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` computed as ``choice`` says: "torch" (in x's dtype) or "float32" (widened,
    rounded back to x's dtype). x: (..., in); weight: (out, in); bias: (out,) or None."""
    if choice == "float32":
        return F.linear(x.float(), weight.float(), None if bias is None else bias.float()).to(x.dtype)
    return F.linear(x, weight, bias)


def measure_wide(weight: torch.Tensor, clock: Clock = wall_clock, reps: int = 3) -> dict[str, float]:
    """Milliseconds of one call of each of ``WIDE_CANDIDATES`` on ``weight`` (out, in) at ``WIDE_ROWS`` token rows,
    alternating them; median of ``reps`` after one warm-up."""
    x = torch.randn(WIDE_ROWS, weight.shape[1], generator=torch.Generator().manual_seed(0)).to(weight.dtype)
    seconds = alternating_medians({name: (lambda name=name: wide_product(x, weight, name)) for name in WIDE_CANDIDATES},
                                  weight.device, clock, reps)
    return {name: t * 1e3 for name, t in seconds.items()}


@not_traced  # measures, reads and writes files: never traced into a compiled graph
def choose_wide_product(weight: torch.Tensor) -> str:
    """The product dense calls on ``weight`` (out, in), a re-laid 2-byte float view on a CPU, run on this machine:
    "torch" or "float32", measured once per machine, dtype and shape (``measure_wide``), then read from the timing
    cache. The widened product must win by more than TOLERANCE."""
    dtype = str(weight.dtype).removeprefix("torch.")
    key = f"m{MEASUREMENT}|wide|{dtype}|{weight.shape[0]}x{weight.shape[1]}|{WIDE_ROWS}"
    ms = load_cache(weight.device).get(key)
    if ms is None:
        ms = measure_wide(weight)
        store_cache(weight.device, {key: ms})
    return "float32" if ms["float32"] < ms["torch"] * (1 - TOLERANCE) else "torch"


# --- applying the decisions to a patched model -------------------------------------------------------------------

class MeasuredLayout:
    """``backend="auto"``'s selector for one patched model: the projections of each shape, measured and re-laid
    at the first decode call of a (device, dtype).

    ``add(shape, side, members)`` registers one layer's projections of ``shape`` (gate and up together) reading
    side ``side``; ``select(device, dtype, rows)`` (``rows``: the triggering call's token rows) measures (or reads cached timings), re-lays the shapes for which
    gathering pays (``runtime.layout.store_rows``) and returns ``{shape: ShapeDecision}``. The density of each
    side is what the dense calls so far showed (``SparsityState.expected_density``: the prompt's prefill), else
    the artifact's held-out figure, else 1 (nothing skipped).
    """

    def __init__(self, adapter, state, artifact, graphs: bool = False):
        self.adapter, self.state, self.graphs = adapter, state, graphs
        self.layers: dict[Shape, tuple[str, list[list]]] = {}  # shape -> (side, per layer: its projections)
        heldout = (artifact.figures or {}).get("heldout", {})
        self.fallback = {side: 1.0 - float(heldout.get(key) or 0.0) for side, key in SPARSITY_KEYS.items()}

    def add(self, shape: Shape, side: str, members: list) -> None:
        self.layers.setdefault(shape, (side, []))[1].append(list(members))

    def select(self, device: torch.device, dtype: torch.dtype, rows: int = 1) -> dict[Shape, ShapeDecision]:
        from .backends import first_gathering
        from .layout import store_rows

        backend = first_gathering(device, dtype, max(ROW_COUNTS))
        shapes = list(self.layers)
        workloads = [Workload(s, [[self.adapter.weight_of(p) for p in members] for members in self.layers[s][1]])
                     for s in shapes]
        densities = [self.state.expected_density(self.layers[s][0], self.fallback[self.layers[s][0]]) for s in shapes]
        decisions = select(workloads, densities, backend, dtype, device, rows, graphs=self.graphs)
        for shape, decision in zip(shapes, decisions):
            if decision.gathering_layout:
                for members in self.layers[shape][1]:
                    store_rows(self.adapter, members)
        self.state.density_wanted = False
        return dict(zip(shapes, decisions))
