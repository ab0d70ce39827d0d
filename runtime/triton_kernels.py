"""Optional Triton kernel for the decode-step thresholded gather (GPU; CPU only under ``TRITON_INTERPRET=1``).

Shapes and units of one call (``TritonBackend.gather``)::

    x           (N, C)    activations, float32 | bfloat16 | float16, contiguous, 1 <= N <= MAX_ROWS token rows
    weight      (C,)      float32 per-channel score weight, or (N, C): one row per token row (a prompt prior)
    thresholds  (N,)      float32, one per token row ((N, 1), or one value for all rows, accepted)
    rows        (C, OUT)  weight rows in x's dtype, unit column stride, row stride >= OUT
    row r keeps channel c  iff  float32(|x[r, c]|) * weight[r, c] > thresholds[r]     (strict)
    out         (N, OUT)  sum over row r's kept channels c of x[r, c] * rows[c, :]; float32 sums, x's dtype
    kept        ()        int32 on x's device: kept (row, channel) pairs over all rows

Split-K design (after TEAL's sparse GEMV): the grid is (OUT / BLOCK_N, C / BLOCK_K). A program computes the keep
masks of its BLOCK_K channels for every token row, loads the weight block ``rows[k0:k0+BLOCK_K, n0:n0+BLOCK_N]``
once with a mask that is true only where some row keeps the channel (masked loads, static shapes, no compaction),
and stores each row's float32 partial sum in its own slot of a float32 (C / MIN_BLOCK_K, N, OUT) buffer (a block
of BLOCK_K > MIN_BLOCK_K channels zeroes its other slots), which a torch sum over the first dimension reduces and casts to x's dtype. No float atomics: a row's result is summed in
one fixed order that does not depend on the other rows of the call (a channel another row needs is read, but
contributes an exact zero to this row) nor on the scheduling of programs, so batches of one size give each row
the same bits whatever its companions (batch invariance; TEAL's kernel adds partials atomically). Programs with
pid_n == 0 add their slice's kept count (an integer atomic). Nothing on the call path synchronises with the host.

Triton is imported on first use, not with this module: Triton decorates its own library (``tl.sum``, ...) for
the interpreter or for the GPU when it is imported, so TRITON_INTERPRET must be set before that import.
"""

from __future__ import annotations

import importlib.util
import os

import torch

MAX_ROWS = 8  # token rows per call (one unrolled loop iteration each)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Block sizes under TRITON_INTERPRET=1, read at each call (tests change it); autotuning would run every config.
INTERPRETER_CONFIG = {"BLOCK_K": 16, "BLOCK_N": 32}
# (BLOCK_K, BLOCK_N, num_warps) autotuned on CUDA per (C, OUT, N). At N = 8 on sm_90 (ptxas -v) none spills more
# than 32 bytes; 64 x 128 blocks on 4 warps or 128 x 256 on 8 spill kilobytes.
CUDA_CONFIGS = ((16, 64, 2), (32, 128, 4), (16, 256, 4), (64, 128, 8), (128, 64, 8), (32, 256, 8),
                (16, 512, 8), (32, 512, 8))
MIN_BLOCK_K = 16  # channels per slot of partial sums: every BLOCK_K above is a multiple of it

triton = tl = None  # set by _import_triton()


def _installed() -> bool:
    """Whether Triton is installed (without importing it) and torch can register the op (torch >= 2.4)."""
    try:
        return importlib.util.find_spec("triton") is not None and hasattr(torch.library, "custom_op")
    except (ImportError, ValueError):  # ValueError: sys.modules["triton"] is None (import blocked)
        return False


_INSTALLED = _installed()
_KERNELS: dict[bool, object] = {}  # interpreted? -> kernel


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


def _gather_kernel(x_ptr, weight_ptr, thresholds_ptr, rows_ptr, out_ptr, kept_ptr, C, OUT, row_stride, SLOTS,
                   N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, MIN_BLOCK_K: tl.constexpr,
                   ROW_WEIGHTS: tl.constexpr):
    """One (BLOCK_K channels) x (BLOCK_N outputs) block for all N rows; decorated by ``_kernel()``. ``out_ptr``:
    float32 (SLOTS, N, OUT) partial sums, one slot per MIN_BLOCK_K channels (a larger block fills its first slot
    and zeroes the others). ``ROW_WEIGHTS``: ``weight_ptr`` holds one row of C weights per token row (a prompt
    prior), loaded per row; else one row shared by all, loaded once."""
    SLOTS_PER_BLOCK: tl.constexpr = BLOCK_K // MIN_BLOCK_K
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    in_k = offs_k < C
    in_n = offs_n < OUT
    if not ROW_WEIGHTS:
        weight = tl.load(weight_ptr + offs_k, mask=in_k, other=0.0)
    # Pass 1: the union of the rows' keep masks decides which weight rows are read (once, for all rows).
    needed = tl.zeros([BLOCK_K], dtype=tl.int1)
    for r in tl.static_range(N):
        xr = tl.load(x_ptr + r * C + offs_k, mask=in_k, other=0.0).to(tl.float32)
        if ROW_WEIGHTS:
            weight = tl.load(weight_ptr + r * C + offs_k, mask=in_k, other=0.0)
        needed = needed | ((tl.abs(xr) * weight > tl.load(thresholds_ptr + r)) & in_k)
    w_ptrs = rows_ptr + offs_k.to(tl.int64)[:, None] * row_stride + offs_n[None, :]
    w = tl.load(w_ptrs, mask=needed[:, None] & in_n[None, :], other=0.0).to(tl.float32)
    # Pass 2: each row's float32 partial sum over its own kept channels, added into the float32 output.
    kept = tl.zeros([BLOCK_K], dtype=tl.int32)  # per channel: rows keeping it
    for r in tl.static_range(N):
        xr = tl.load(x_ptr + r * C + offs_k, mask=in_k, other=0.0).to(tl.float32)
        if ROW_WEIGHTS:
            weight = tl.load(weight_ptr + r * C + offs_k, mask=in_k, other=0.0)
        keep = (tl.abs(xr) * weight > tl.load(thresholds_ptr + r)) & in_k
        partial = tl.sum(tl.where(keep, xr, 0.0)[:, None] * w, axis=0)
        tl.store(out_ptr + ((pid_k * SLOTS_PER_BLOCK) * N + r).to(tl.int64) * OUT + offs_n, partial, mask=in_n)
        for extra in tl.static_range(1, SLOTS_PER_BLOCK):  # this block's other MIN_BLOCK_K slots: zeros
            slot = pid_k * SLOTS_PER_BLOCK + extra
            tl.store(out_ptr + (slot * N + r).to(tl.int64) * OUT + offs_n, tl.zeros([BLOCK_N], dtype=tl.float32),
                     mask=in_n & (tl.broadcast_to(slot, [BLOCK_N]) < SLOTS))  # vector compare for the interpreter
        kept += keep.to(tl.int32)
    tl.atomic_add(kept_ptr, tl.sum(kept, axis=0), mask=pid_n == 0)  # one program per channel slice counts it


def _kernel() -> tuple[object, bool]:
    """(kernel, interpreted?) for the current mode, decorated once per mode: the interpreter when
    TRITON_INTERPRET=1 (one fixed config), else the GPU kernel autotuned over CUDA_CONFIGS."""
    interpreted = _interpreting()
    if interpreted not in _KERNELS:
        jitted = triton.jit(_gather_kernel)
        if not interpreted:  # reset_to_zero: each trial run adds into the kept count
            configs = [triton.Config({"BLOCK_K": k, "BLOCK_N": n}, num_warps=w) for k, n, w in CUDA_CONFIGS]
            jitted = triton.autotune(configs=configs, key=["C", "OUT", "N"], reset_to_zero=["kept_ptr"])(jitted)
        _KERNELS[interpreted] = jitted
    return _KERNELS[interpreted], interpreted


def _register_op() -> None:
    """Register ``clada::triton_gather`` (torch.library's triton_op imports Triton, so this waits for it)."""
    # torch >= 2.6: triton_op lets torch.compile see the kernel inside the op; older torch: an opaque custom op.
    define = getattr(torch.library, "triton_op", None) or torch.library.custom_op
    wrap = getattr(torch.library, "wrap_triton", None) or (lambda kernel: kernel)

    @define("clada::triton_gather", mutates_args=())
    def triton_gather(x: torch.Tensor, weight: torch.Tensor, thresholds: torch.Tensor,
                      rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(out (N, OUT) in x's dtype, kept () int32): see the module docstring; inputs as checked by gather."""
        n, channels = x.shape
        width = rows.shape[1]
        kept = torch.zeros((), dtype=torch.int32, device=x.device)
        kernel, interpreted = _kernel()
        # one float32 slot of partial sums per MIN_BLOCK_K channels, whichever block size the autotuner picks
        slots = -(-channels // MIN_BLOCK_K)
        partials = torch.empty(slots, n, width, dtype=torch.float32, device=x.device)
        grid = lambda meta: (-(-width // meta["BLOCK_N"]), -(-channels // meta["BLOCK_K"]))
        wrap(kernel)[grid](x, weight, thresholds, rows, partials, kept, channels, width, rows.stride(0), slots, N=n,
                           MIN_BLOCK_K=MIN_BLOCK_K, ROW_WEIGHTS=weight.dim() == 2,
                           **(INTERPRETER_CONFIG if interpreted else {}))
        return partials.sum(0).to(x.dtype), kept

    @triton_gather.register_fake
    def _(x, weight, thresholds, rows):
        return x.new_empty(x.shape[0], rows.shape[1]), x.new_empty((), dtype=torch.int32)


class TritonBackend:
    """The decode-step gather on Triton: ``gather(x, weight, thresholds, rows) -> (out, kept)``."""

    name = "triton"
    gathers = True  # as runtime.backends.KernelBackend: reads only the kept channels' rows

    def identity(self) -> str:
        """The backend with Triton's version (keys measured timings)."""
        return f"{self.name}:{triton.__version__ if _import_triton() else 'absent'}"

    def accepts(self, device: torch.device, dtype: torch.dtype, rows: int) -> bool:
        """Whether a call with ``rows`` token rows of ``dtype`` on ``device`` can run here."""
        if dtype not in DTYPES or not 1 <= rows <= MAX_ROWS:
            return False
        device = torch.device(device)  # CPU: Triton is not even imported unless TRITON_INTERPRET=1
        return _import_triton() if device.type == "cuda" else device.type == "cpu" and _interpreting()

    def gather(self, x: torch.Tensor, weight: torch.Tensor, thresholds: torch.Tensor,
               rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(out (N, OUT) in x's dtype, kept () int32 on x's device); checks metadata only (no host sync)."""
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
        if len({x.device, weight.device, thresholds.device, rows.device}) != 1:
            raise ValueError("x, weight, thresholds and rows must be on one device")
        return torch.ops.clada.triton_gather(x, weight, thresholds, rows)
