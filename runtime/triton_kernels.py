"""Optional Triton kernel for the decode-step thresholded gather (GPU; CPU only under ``TRITON_INTERPRET=1``).

Shapes and units of one call (``TritonBackend.gather``)::

    x           (N, C)    activations, float32 | bfloat16 | float16, contiguous, 1 <= N <= MAX_ROWS token rows
    weight      (C,)      float32 per-channel score weight, or (N, C): one row per token row (a prompt prior)
    thresholds  (N,)      float32, one per token row ((N, 1), or one value for all rows, accepted)
    rows        (C, OUT)  weight rows in x's dtype, unit column stride, row stride >= OUT
    row r keeps channel c  iff  float32(|x[r, c]|) * weight[r, c] > thresholds[r]     (strict)
    out         (N, OUT)  sum over row r's kept channels c of x[r, c] * rows[c, :]; float32 sums, x's dtype
    counter     ()        int64 on x's device: the call adds its kept (row, channel) pairs over all rows to it

Split-K design: the grid is (OUT / BLOCK_N, SPLIT). A program owns BLOCK_N outputs of every row and one slice of
``K_SPLIT`` channels (``channels_per_program``: a function of (C, OUT) and the device, never of the data or N).
It walks its slice BLOCK_K channels at a time: the union of the rows' keep masks, one masked load of the weight
block ``rows[k:k+BLOCK_K, n0:n0+BLOCK_N]`` (only rows some token row keeps are read: masked loads, static shapes,
no compaction) and each row's float32 products, accumulated in registers (multiply-adds, or the tensor cores with
rows padded to 16: ``USE_DOT``, autotuned). ``VARIANT`` says where the keep masks come from: "two_pass" (the
default) runs a select kernel first that writes the masked rows and the union as int8, so the row kernel's
weight loads wait on one load; "fused" compares the scores in every program; "prefetch" is two_pass with the
weight rows loaded one block ahead by hand. With one slice (SPLIT = 1) the program writes its outputs in x's
dtype; else each slice's float32 sums go to their own slot of a (SPLIT, N, OUT) buffer that a slot-sum kernel
adds in slot order and casts. No float atomics: a row's result is summed in one fixed order that depends on
neither the other rows of the call (a channel only another row keeps contributes an exact zero) nor the
scheduling of programs, so batches of one size give each row the same bits whatever its companions (batch
invariance; TEAL's kernel adds partials atomically). The kept count is added to ``counter`` with one integer
atomic per program (of the select kernel, or of the fused kernel's pid_n == 0 programs), so statistics cost no
kernel of their own. Nothing on the call path synchronises with the host; a decode step through it can be
captured in a CUDA graph (benchmarks/gpu/bench_gpu.py replays one).

Triton is imported on first use, not with this module: Triton decorates its own library (``tl.sum``, ...) for
the interpreter or for the GPU when it is imported, so TRITON_INTERPRET must be set before that import.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import os

import torch

MAX_ROWS = 8  # token rows per call
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Block sizes (and USE_DOT, default False) under TRITON_INTERPRET=1, read at each call (tests change it);
# autotuning would run every config.
INTERPRETER_CONFIG = {"BLOCK_K": 16, "BLOCK_N": 32}
# (BLOCK_K, BLOCK_N, num_warps, num_stages, USE_DOT) autotuned on CUDA per (C, OUT, N, channels per program).
# Triton pipelines none of the multiply-add loops (their weight loads wait on a comparison chain): configs with
# one stage suit slices of one block (many short programs hide the memory latency instead).
CUDA_CONFIGS = ((32, 128, 4, 3, False), (64, 64, 4, 4, False), (16, 256, 4, 4, False), (32, 256, 8, 3, False),
                (64, 64, 4, 4, True), (64, 128, 4, 3, True), (128, 64, 4, 3, True), (128, 128, 8, 3, True),
                (64, 64, 2, 1, False), (64, 128, 4, 1, False), (128, 64, 4, 1, False), (32, 128, 2, 1, False))
K_ALIGN = 128  # channels per program are a multiple of every BLOCK_K above
PROGRAMS_PER_SM = 4  # split-K target: about this many programs per multiprocessor at BLOCK_N = 128
SPLIT_OVERRIDE: dict[tuple[int, int], int] = {}  # (C, OUT) -> channels per program (benchmarks sweep it)
REDUCE_BLOCK = 1024  # outputs per program of the slot-sum kernel
SELECT_BLOCK = 256  # channels per program of the select kernel
# "fused": each program of the row kernel compares its channels' scores itself; "two_pass": a select kernel
# writes the masked rows and the union of the keep masks first, and the row kernel's weight loads depend on one
# load instead of a comparison chain; "prefetch": two_pass with the row kernel's loads issued one block ahead
# (read by each call; benchmarks/gpu/bench_gpu.py times all three). On an H200 (bfloat16, LLaMA-2-7B's MLP,
# sparsity 0.4, CUDA graph replays) two_pass beat fused at 1 token row (gate+up 41.5 vs 45.3 us, down 27.1 vs
# 29.7) and at 8 (54.8 vs 64.6, 34.9 vs 43.8); prefetch matched two_pass at 1 row (40.4 / 26.6 us, another run).
VARIANT = "two_pass"
VARIANTS = ("fused", "two_pass", "prefetch")

triton = tl = None  # set by _import_triton()


def _installed() -> bool:
    """Whether Triton is installed (without importing it) and torch can register the op (torch >= 2.4)."""
    try:
        return importlib.util.find_spec("triton") is not None and hasattr(torch.library, "custom_op")
    except (ImportError, ValueError):  # ValueError: sys.modules["triton"] is None (import blocked)
        return False


_INSTALLED = _installed()
_KERNELS: dict[bool, tuple] = {}  # interpreted? -> (gather kernel, slot-sum kernel, select kernel)


def _import_triton() -> bool:
    """Import Triton once (where installed) and register the op; whether it imported."""
    global triton, tl, _INSTALLED
    if triton is None and _INSTALLED:
        try:
            import triton as triton_module
            import triton.language as language
        except ImportError:
            _INSTALLED = False
            return False
        triton, tl = triton_module, language
        _register_op()
    return triton is not None


def _interpreting() -> bool:
    """TRITON_INTERPRET=1, and Triton (imported now if not yet) has its library built for the interpreter."""
    return (os.environ.get("TRITON_INTERPRET") == "1" and _import_triton()
            and not isinstance(tl.sum, triton.JITFunction))


def triton_available() -> bool:
    """Whether Triton imports and can run here: on a CUDA device, or on CPU under ``TRITON_INTERPRET=1``."""
    return _import_triton() and (torch.cuda.is_available() or _interpreting())


def _gather_kernel(x_ptr, weight_ptr, thresholds_ptr, rows_ptr, out_ptr, counter_ptr, C, OUT, row_stride, K_SPLIT,
                   N: tl.constexpr, N_POW2: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
                   ROW_WEIGHTS: tl.constexpr, USE_DOT: tl.constexpr, DIRECT: tl.constexpr,
                   DOT_FLOAT32: tl.constexpr, PRESELECTED: tl.constexpr, PREFETCH: tl.constexpr):
    """BLOCK_N outputs of all N rows over one slice of K_SPLIT channels; decorated by ``_kernels()``.
    ``out_ptr``: (N, OUT) in x's dtype where DIRECT (one slice), else float32 (SPLIT, N, OUT) slots.
    ``ROW_WEIGHTS``: ``weight_ptr`` holds one row of C weights per token row (a prompt prior), else one row.
    ``DOT_FLOAT32``: tl.dot on float32 copies of the operands (the interpreter: its bfloat16 dot is wrong).
    ``PRESELECTED``: ``_select_kernel`` ran first: ``x_ptr`` holds the masked rows (skipped entries zero) and
    ``weight_ptr`` the int8 union of the keep masks (C,); no thresholds are compared here and nothing is counted.
    ``PREFETCH`` (with PRESELECTED): each block's weight rows are loaded one iteration ahead of their sums and the
    union one more ahead (Triton pipelines none of these loops itself)."""
    ROWS: tl.constexpr = 16 if USE_DOT else N_POW2  # tl.dot needs 16 rows; padding rows keep nothing
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    in_n = offs_n < OUT
    offs_r = tl.arange(0, ROWS)
    in_r = offs_r < N
    tau = tl.load(thresholds_ptr + offs_r, mask=in_r, other=0.0)
    acc = tl.zeros([ROWS, BLOCK_N], dtype=tl.float32)
    kept = tl.zeros([ROWS, BLOCK_K], dtype=tl.int32)
    k_begin = pid_s * K_SPLIT
    k_end = tl.minimum(k_begin + K_SPLIT, C)
    if PREFETCH:  # preselected rows, software-pipelined by hand: block i+1's loads are issued before block i's sums
        offs_k = k_begin + tl.arange(0, BLOCK_K)
        needed = tl.load(weight_ptr + offs_k, mask=offs_k < k_end, other=0) != 0
        w_next = tl.load(rows_ptr + offs_k.to(tl.int64)[:, None] * row_stride + offs_n[None, :],
                         mask=needed[:, None] & in_n[None, :], other=0.0)
        x_next = tl.load(x_ptr + offs_r[:, None] * C + offs_k[None, :],
                         mask=in_r[:, None] & (offs_k < k_end)[None, :], other=0.0)
        needed_next = tl.load(weight_ptr + offs_k + BLOCK_K, mask=offs_k + BLOCK_K < k_end, other=0) != 0
    for k0 in range(k_begin, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        in_k = offs_k < k_end
        valid = in_r[:, None] & in_k[None, :]
        if PREFETCH:  # this block was loaded one iteration ago; load the next (past the slice: all masked)
            w, xk = w_next, x_next
            ahead = offs_k + BLOCK_K
            w_next = tl.load(rows_ptr + ahead.to(tl.int64)[:, None] * row_stride + offs_n[None, :],
                             mask=needed_next[:, None] & in_n[None, :], other=0.0)
            x_next = tl.load(x_ptr + offs_r[:, None] * C + ahead[None, :],
                             mask=in_r[:, None] & (ahead < k_end)[None, :], other=0.0)
            needed_next = tl.load(weight_ptr + ahead + BLOCK_K, mask=ahead + BLOCK_K < k_end, other=0) != 0
        else:
            x = tl.load(x_ptr + offs_r[:, None] * C + offs_k[None, :], mask=valid, other=0.0)
            if PRESELECTED:
                needed = tl.load(weight_ptr + offs_k, mask=in_k, other=0) != 0
                xk = x
            else:
                if ROW_WEIGHTS:
                    weight = tl.load(weight_ptr + offs_r[:, None] * C + offs_k[None, :], mask=valid, other=0.0)
                else:
                    weight = tl.load(weight_ptr + offs_k, mask=in_k, other=0.0)[None, :]
                keep = (tl.abs(x.to(tl.float32)) * weight > tau[:, None]) & valid
                needed = tl.max(keep.to(tl.int32), axis=0) > 0  # the union of the rows' keep masks: rows read once
                xk = tl.where(keep, x, tl.zeros_like(x))
                kept += keep.to(tl.int32)
            w = tl.load(rows_ptr + offs_k.to(tl.int64)[:, None] * row_stride + offs_n[None, :],
                        mask=needed[:, None] & in_n[None, :], other=0.0)
        if USE_DOT and DOT_FLOAT32:
            acc = tl.dot(xk.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
        elif USE_DOT:
            acc = tl.dot(xk, w, acc, input_precision="ieee")
        else:
            acc += tl.sum(xk.to(tl.float32)[:, :, None] * w.to(tl.float32)[None, :, :], axis=1)
    store = in_r[:, None] & in_n[None, :]
    if DIRECT:
        tl.store(out_ptr + offs_r[:, None] * OUT + offs_n[None, :], acc.to(out_ptr.dtype.element_ty), mask=store)
    else:
        tl.store(out_ptr + (pid_s * N + offs_r[:, None]).to(tl.int64) * OUT + offs_n[None, :], acc, mask=store)
    if not PRESELECTED:
        tl.atomic_add(counter_ptr, tl.sum(tl.sum(kept, axis=1), axis=0).to(tl.int64), mask=pid_n == 0)


def _select_kernel(x_ptr, weight_ptr, thresholds_ptr, masked_ptr, needed_ptr, counter_ptr, C, N: tl.constexpr,
                   N_POW2: tl.constexpr, BLOCK: tl.constexpr, ROW_WEIGHTS: tl.constexpr):
    """The keep decisions once for every program of the row kernel (``VARIANT`` "two_pass"): ``masked_ptr`` (N, C)
    gets x with skipped entries zero, ``needed_ptr`` (C,) int8 the union of the rows' keep masks, ``counter_ptr``
    the kept count."""
    offs_r = tl.arange(0, N_POW2)
    in_r = offs_r < N
    offs_k = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    valid = in_r[:, None] & (offs_k < C)[None, :]
    x = tl.load(x_ptr + offs_r[:, None] * C + offs_k[None, :], mask=valid, other=0.0)
    if ROW_WEIGHTS:
        weight = tl.load(weight_ptr + offs_r[:, None] * C + offs_k[None, :], mask=valid, other=0.0)
    else:
        weight = tl.load(weight_ptr + offs_k, mask=offs_k < C, other=0.0)[None, :]
    tau = tl.load(thresholds_ptr + offs_r, mask=in_r, other=0.0)
    keep = (tl.abs(x.to(tl.float32)) * weight > tau[:, None]) & valid
    tl.store(masked_ptr + offs_r[:, None] * C + offs_k[None, :], tl.where(keep, x, tl.zeros_like(x)), mask=valid)
    tl.store(needed_ptr + offs_k, tl.max(keep.to(tl.int8), axis=0), mask=offs_k < C)
    tl.atomic_add(counter_ptr, tl.sum(tl.sum(keep.to(tl.int32), axis=1), axis=0).to(tl.int64))


def _slot_sum_kernel(slots_ptr, out_ptr, SPLIT, SIZE, BLOCK: tl.constexpr):
    """out[i] = sum over s = 0, 1, .. SPLIT-1 of slots[s, i] (float32, in slot order), cast to out's dtype."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < SIZE
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for s in range(SPLIT):
        acc += tl.load(slots_ptr + s * SIZE + offs, mask=inside, other=0.0)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=inside)


def _kernels() -> tuple[object, object, object, bool]:
    """(gather kernel, slot-sum kernel, select kernel, interpreted?) for the current mode, decorated once per mode:
    the interpreter when TRITON_INTERPRET=1 (one fixed config), else the GPU kernel autotuned over CUDA_CONFIGS."""
    interpreted = _interpreting()
    if interpreted not in _KERNELS:
        gather = triton.jit(_gather_kernel)
        if not interpreted:  # restore_value: each trial run adds into the caller's counter
            configs = [triton.Config({"BLOCK_K": k, "BLOCK_N": n, "USE_DOT": dot}, num_warps=w, num_stages=s)
                       for k, n, w, s, dot in CUDA_CONFIGS]
            brief = {"warmup": 5, "rep": 25} if "rep" in inspect.signature(triton.autotune).parameters else {}
            gather = triton.autotune(configs=configs, key=["C", "OUT", "K_SPLIT", "N"],
                                     restore_value=["counter_ptr"], **brief)(gather)
        _KERNELS[interpreted] = (gather, triton.jit(_slot_sum_kernel), triton.jit(_select_kernel))
    return (*_KERNELS[interpreted], interpreted)


def _multiprocessors(device: torch.device) -> int:
    count = _SMS.get(device.index)
    if count is None:
        count = _SMS[device.index] = torch.cuda.get_device_properties(device).multi_processor_count
    return count


_SMS: dict[int | None, int] = {}


def channels_per_program(channels: int, width: int, device: torch.device, block_k: int | None = None) -> int:
    """K_SPLIT: the channels one program sums for a (C = ``channels``, OUT = ``width``) call on ``device``:
    ``SPLIT_OVERRIDE``'s entry for the shape, else enough slices for about PROGRAMS_PER_SM programs per
    multiprocessor at BLOCK_N = 128, a multiple of K_ALIGN (under the interpreter, ``block_k`` given: one slice).
    Depends on the shape and device only, so a row's sums have one order whatever the data and the other rows."""
    override = SPLIT_OVERRIDE.get((channels, width))
    if override is not None:
        return override
    if block_k is not None:
        return -(-channels // block_k) * block_k
    columns = -(-width // 128)
    split = max(1, min(-(-channels // K_ALIGN), round(PROGRAMS_PER_SM * _multiprocessors(device) / columns)))
    return -(-(-(-channels // split)) // K_ALIGN) * K_ALIGN


def _register_op() -> None:
    """Register ``clada::triton_gather`` (torch.library's triton_op imports Triton, so this waits for it)."""
    # torch >= 2.6: triton_op lets torch.compile see the kernel inside the op; older torch: an opaque custom op.
    define = getattr(torch.library, "triton_op", None) or torch.library.custom_op
    wrap = getattr(torch.library, "wrap_triton", None) or (lambda kernel: kernel)

    @define("clada::triton_gather", mutates_args=("counter",))
    def triton_gather(x: torch.Tensor, weight: torch.Tensor, thresholds: torch.Tensor, rows: torch.Tensor,
                      counter: torch.Tensor) -> torch.Tensor:
        """out (N, OUT) in x's dtype, adding the kept count to ``counter``: see the module docstring; inputs as
        checked by gather."""
        n, channels = x.shape
        width = rows.shape[1]
        gather, slot_sum, select, interpreted = _kernels()
        blocks = INTERPRETER_CONFIG if interpreted else {}
        k_split = channels_per_program(channels, width, x.device, blocks.get("BLOCK_K"))
        split = -(-channels // k_split)
        out = torch.empty(n, width, dtype=x.dtype, device=x.device)
        slots = out if split == 1 else torch.empty(split, n, width, dtype=torch.float32, device=x.device)
        preselected = VARIANT in ("two_pass", "prefetch")
        n_pow2 = triton.next_power_of_2(n)
        if preselected:
            masked = torch.empty_like(x)
            needed = torch.empty(channels, dtype=torch.int8, device=x.device)
            wrap(select)[(-(-channels // SELECT_BLOCK),)](x, weight, thresholds, masked, needed, counter, channels,
                                                          N=n, N_POW2=n_pow2, BLOCK=SELECT_BLOCK,
                                                          ROW_WEIGHTS=weight.dim() == 2)
            x, weight = masked, needed
        grid = lambda meta: (-(-width // meta["BLOCK_N"]), split)
        wrap(gather)[grid](x, weight, thresholds, rows, slots, counter, channels, width, rows.stride(0), k_split,
                           N=n, N_POW2=n_pow2, ROW_WEIGHTS=weight.dim() == 2, DIRECT=split == 1,
                           DOT_FLOAT32=interpreted, PRESELECTED=preselected, PREFETCH=VARIANT == "prefetch",
                           **({"USE_DOT": False, **blocks} if interpreted else {}))
        if split > 1:
            size = n * width
            wrap(slot_sum)[(-(-size // REDUCE_BLOCK),)](slots, out, split, size, BLOCK=REDUCE_BLOCK)
        return out

    @triton_gather.register_fake
    def _(x, weight, thresholds, rows, counter):
        return x.new_empty(x.shape[0], rows.shape[1])


class TritonBackend:
    """The decode-step gather on Triton: ``gather(x, weight, thresholds, rows, counter) -> (out, counter)``."""

    name = "triton"
    gathers = True  # as runtime.backends.KernelBackend: reads only the kept channels' rows
    counts_into = True  # adds its kept count to a caller's device counter (no kernel of its own)

    def identity(self) -> str:
        """The backend with Triton's version and a hash of the kernels' source (keys measured timings)."""
        if not _import_triton():
            return f"{self.name}:absent"
        source = (inspect.getsource(_gather_kernel) + inspect.getsource(_slot_sum_kernel)
                  + inspect.getsource(_select_kernel) + repr(CUDA_CONFIGS) + VARIANT)
        return f"{self.name}:{triton.__version__}:{hashlib.sha256(source.encode()).hexdigest()[:8]}"

    def accepts(self, device: torch.device, dtype: torch.dtype, rows: int) -> bool:
        """Whether a call with ``rows`` token rows of ``dtype`` on ``device`` can run here."""
        if dtype not in DTYPES or not 1 <= rows <= MAX_ROWS:
            return False
        device = torch.device(device)  # CPU: Triton is not even imported unless TRITON_INTERPRET=1
        return _import_triton() if device.type == "cuda" else device.type == "cpu" and _interpreting()

    def gather(self, x: torch.Tensor, weight: torch.Tensor, thresholds: torch.Tensor, rows: torch.Tensor,
               counter: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(out (N, OUT) in x's dtype, counter) where ``counter`` (() int64 on x's device; a new zero one if None)
        has had the call's kept (row, channel) pairs added; checks metadata only (no host sync)."""
        if not _import_triton():
            raise RuntimeError("clada triton gather: triton is not installed")
        if thresholds.numel() in (1, x.shape[0]):  # (N,), (N, 1) or one for all rows, possibly broadcast
            thresholds = torch.broadcast_to(thresholds.reshape(-1), x.shape[:1]).contiguous()
        if x.dim() != 2 or not 1 <= x.shape[0] <= MAX_ROWS or x.dtype not in DTYPES or not x.is_contiguous():
            raise ValueError(f"x must be contiguous (N <= {MAX_ROWS}, C) of {DTYPES}: {tuple(x.shape)} {x.dtype}")
        channels = x.shape[1]
        if (weight.shape not in ((channels,), (x.shape[0], channels)) or weight.dtype != torch.float32
                or not weight.is_contiguous()):
            raise ValueError(f"weight must be contiguous float32 ({channels},) or ({x.shape[0]}, {channels}): "
                             f"{tuple(weight.shape)} {weight.dtype}")
        if thresholds.shape != (x.shape[0],) or thresholds.dtype != torch.float32 or not thresholds.is_contiguous():
            raise ValueError(f"thresholds must be float32 ({x.shape[0]},): {tuple(thresholds.shape)} "
                             f"{thresholds.dtype}")
        if (rows.dim() != 2 or rows.shape[0] != channels or rows.dtype != x.dtype or rows.stride(1) != 1
                or rows.stride(0) < rows.shape[1]):
            raise ValueError(f"rows must be ({channels}, OUT) of {x.dtype} with unit column stride: "
                             f"{tuple(rows.shape)} {rows.dtype} strides {rows.stride()}")
        if counter is None:
            counter = torch.zeros((), dtype=torch.int64, device=x.device)
        elif counter.shape != () or counter.dtype != torch.int64:
            raise ValueError(f"counter must be a 0-dim int64 tensor: {tuple(counter.shape)} {counter.dtype}")
        if len({x.device, weight.device, thresholds.device, rows.device, counter.device}) != 1:
            raise ValueError("x, weight, thresholds, rows and counter must be on one device")
        return torch.ops.clada.triton_gather(x, weight, thresholds, rows, counter), counter
