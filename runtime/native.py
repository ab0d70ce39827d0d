"""Optional compiled CPU kernel for the decode-step gather: selection and weighted row sum in one call.

``gather_kernel()`` builds ``native_gather.c`` (beside this file) once per machine with the system C compiler
(``$CC``, else ``cc``; the first of ``FLAG_SETS`` that builds and loads), caches the shared
library under ``$CLADA_CACHE/native`` (default ``~/.cache/clada/native``; the name hashes the source, flags,
compiler and CPU, so a new CPU or compiler builds anew), and loads it with ``ctypes``. It returns None -- and
the runtime keeps using ``embedding_bag`` -- where that is not possible (no compiler, a failed build, an
unloadable library) or where ``CLADA_NATIVE=0``; a one-line warning says why, once per process.

Threads (``torch.get_num_threads()`` per call): built with ``-fopenmp``, the kernel's work runs on the OpenMP
runtime torch itself uses (its ``libgomp.so.1`` is already loaded, so the kernel's reference resolves to it): the
threads that just ran torch's products take the kernel's work at once. Sharing one runtime is checked after
loading (the library mapped no OpenMP runtime the process did not have); where it is not shared (a torch built
with another OpenMP, or none) or OpenMP does not build, the kernel runs its own small pool of workers instead
(see native_gather.c). On SmolLM2
(AMD EPYC, 2 threads, fp32, batch 1) the pool lost about a fifth of a decode step against torch's spinning
threads, which the shared runtime does not.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from .machine import cache_root, cpu_identity

SOURCE = Path(__file__).with_name("native_gather.c")
# -ffp-contract=off: the kernels fuse multiply-adds explicitly, the same way in every code path (native_gather.c)
FLAG_SETS = (("-O3", "-march=native", "-ffp-contract=off", "-fopenmp"), ("-O3", "-march=native", "-ffp-contract=off", "-pthread"),
             ("-O3", "-ffp-contract=off", "-pthread"))
OPENMP_RUNTIMES = ("libgomp", "libiomp", "libomp")  # file names of OpenMP runtimes (``openmp_runtimes``)
MAX_ROWS = 64  # token rows per call the kernel accepts (one bit each in a 64-bit mask)
SYMBOLS = {torch.float32: "clada_gather_f32", torch.bfloat16: "clada_gather_bf16", torch.float16: "clada_gather_f16"}
GEMV_SYMBOLS = {torch.float32: "clada_gemv_f32", torch.bfloat16: "clada_gemv_bf16", torch.float16: "clada_gemv_f16"}
GEMV_MAX_ROWS = 8  # token rows per call the dense product accepts
STEP_SYMBOLS = {torch.float32: "clada_predictor_step_f32", torch.bfloat16: "clada_predictor_step_bf16",
                torch.float16: "clada_predictor_step_f16"}
ACTIVATIONS = ("silu", "gelu_tanh")  # the predictor step's activation codes, in order (native_gather.c)
_log = logging.getLogger("clada.runtime")
_UNSET = object()
_kernel = _UNSET


class GatherKernel:
    """The loaded ``clada_gather_*`` and ``clada_gemv_*`` functions (one per element type the build has): see
    native_gather.c."""

    def __init__(self, lib: ctypes.CDLL, path: Path, flags: tuple[str, ...]):
        self.path, self.flags = path, flags
        self._fns, self._gemv = {}, {}
        p, i = ctypes.c_void_p, ctypes.c_int64
        for dtype, symbol in SYMBOLS.items():
            fn = getattr(lib, symbol, None)  # clada_gather_f16 only where the CPU has F16C
            if fn is not None:
                fn.restype, fn.argtypes = ctypes.c_int64, [p, i, i, p, i, p, p, i, i, p, i]
                self._fns[dtype] = fn
        for dtype, symbol in GEMV_SYMBOLS.items():
            fn = getattr(lib, symbol, None)
            if fn is not None:
                fn.restype, fn.argtypes = ctypes.c_int64, [p, i, i, p, i, i, p, i]
                self._gemv[dtype] = fn
        self._steps = {}
        f = ctypes.c_float
        for dtype, symbol in STEP_SYMBOLS.items():
            fn = getattr(lib, symbol, None)
            if fn is not None:
                fn.restype = ctypes.c_int64
                fn.argtypes = [p, i, p, f, p, p, i, p, f, i, p, p, i, p, i, i, p, p, i]
                self._steps[dtype] = fn
        self._q4 = getattr(lib, "clada_q4_estimate", None)
        if self._q4 is not None:
            self._q4.restype, self._q4.argtypes = ctypes.c_int64, [p, i, p, ctypes.c_float, p, p, i, p, i]

    @property
    def dtypes(self) -> tuple[torch.dtype, ...]:
        return tuple(self._fns)

    def accepts(self, x: torch.Tensor, rows: torch.Tensor) -> bool:
        """Whether a call with input ``x`` (..., C) and weight rows ``rows`` (C, out) can run here."""
        return (x.dtype in self._fns and rows.dtype == x.dtype and x.device.type == "cpu"
                and rows.device.type == "cpu" and rows.stride(1) == 1 and x.numel() <= MAX_ROWS * x.shape[-1])

    def __call__(self, x: torch.Tensor, scale: torch.Tensor, thresholds: torch.Tensor,
                 rows: torch.Tensor) -> tuple[torch.Tensor, int]:
        """(N, out) sums over each row's kept channels, in x's dtype (summed in float32), and the number of
        kept (row, channel) pairs.

        x: (N, C) contiguous; scale: contiguous float32 (C,), or (N, C) with one row per token row;
        thresholds: (N,) float32 (row r keeps channel c iff |x[r, c]| * scale[r, c] > thresholds[r]);
        rows: (C, out) of x's dtype with unit column stride.
        """
        n, channels = x.shape
        if scale.shape not in ((channels,), (n, channels)):
            raise ValueError(f"clada native gather: scale of shape {tuple(scale.shape)} for x of {tuple(x.shape)}")
        out = torch.empty(n, rows.shape[1], dtype=torch.float32)
        kept = self._fns[x.dtype](x.data_ptr(), n, channels, scale.data_ptr(), channels if scale.dim() == 2 else 0,
                                  thresholds.data_ptr(),
                                  rows.data_ptr(), rows.shape[1], rows.stride(0), out.data_ptr(),
                                  torch.get_num_threads())
        if kept < 0:
            raise RuntimeError(f"clada native gather failed (code {kept}: rows={n}, channels={channels})")
        return (out if x.dtype == torch.float32 else out.to(x.dtype)), kept

    @property
    def gemv_dtypes(self) -> tuple[torch.dtype, ...]:
        return tuple(self._gemv)

    def gemv_accepts(self, x: torch.Tensor, weight: torch.Tensor) -> bool:
        """Whether ``gemv`` can compute ``x`` (..., in) times ``weight`` (out, in)^T here."""
        return (x.dtype in self._gemv and weight.dtype == x.dtype and x.device.type == "cpu"
                and weight.device.type == "cpu" and weight.dim() == 2 and weight.stride(1) == 1
                and x.shape[-1] == weight.shape[1] and x.numel() <= GEMV_MAX_ROWS * x.shape[-1])

    def gemv(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """(N, out) = ``x`` (N, in) contiguous times ``weight`` (out, in)^T (unit column stride), in x's dtype,
        summed in float32: a dense projection's product on its original layout (N <= ``GEMV_MAX_ROWS``)."""
        n, nin = x.shape
        out = torch.empty(n, weight.shape[0], dtype=torch.float32)
        code = self._gemv[x.dtype](x.data_ptr(), n, nin, weight.data_ptr(), weight.shape[0], weight.stride(0),
                                   out.data_ptr(), torch.get_num_threads())
        if code < 0:
            raise RuntimeError(f"clada native gemv failed (code {code}: rows={n}, in={nin})")
        return out if x.dtype == torch.float32 else out.to(x.dtype)

    def predictor_accepts(self, dtype: torch.dtype) -> bool:
        """Whether this build has the predictor's step (``predictor_step``) for weights of ``dtype``."""
        return dtype in self._steps

    def predictor_step(self, x: torch.Tensor, weight_in: torch.Tensor, tau_in: float, codes: torch.Tensor,
                       scales: torch.Tensor, weight_mid: torch.Tensor, tau_mid: float, activation: str,
                       gate: torch.Tensor, up: torch.Tensor, down_rows: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        """One gated MLP's decode step of one token row ``x`` (D,) under the predictor rule (native_gather.c,
        ``clada_predictor_step_*``): the 4-bit estimate from the packed copy (``codes``, ``scales``:
        ``runtime.predictor.packed``) over the input channels |x|·weight_in > tau_in, the neurons
        |act(gate~)·up~|·weight_mid > tau_mid (``activation``: one of ``ACTIVATIONS``), their rows of ``gate`` and
        ``up`` ((I, D), unit column stride), and down's rows ``down_rows`` (I, out) of them. Returns the output (out,)
        in x's dtype and the kept input channels and neurons."""
        counts = torch.zeros(2, dtype=torch.int64)
        out = torch.empty(down_rows.shape[1], dtype=torch.float32)
        code = self._steps[x.dtype](x.data_ptr(), x.numel(), weight_in.data_ptr(), tau_in, codes.data_ptr(),
                                    scales.data_ptr(), codes.shape[0] * 64, weight_mid.data_ptr(), tau_mid,
                                    ACTIVATIONS.index(activation), gate.data_ptr(), up.data_ptr(), gate.stride(0),
                                    down_rows.data_ptr(), down_rows.stride(0), down_rows.shape[1], out.data_ptr(),
                                    counts.data_ptr(), torch.get_num_threads())
        if code < 0:
            raise RuntimeError(f"clada native predictor step failed (code {code})")
        kept_in, kept_mid = counts.tolist()
        return (out if x.dtype == torch.float32 else out.to(x.dtype)), kept_in, kept_mid

    def q4_estimate(self, x: torch.Tensor, scale: torch.Tensor, threshold: float, codes: torch.Tensor,
                    scales: torch.Tensor) -> tuple[torch.Tensor, int]:
        """(width,) float32 estimate of one token row ``x`` (C,) float32 from a blocked 4-bit copy (``codes``
        (width / 64, C, 32) uint8, ``scales`` (width / 64, C / 32, 64) float16: ``runtime.predictor.packed``)
        over the channels with |x| * scale > threshold, and their number."""
        width = codes.shape[0] * 64
        out = torch.empty(width, dtype=torch.float32)
        kept = self._q4(x.data_ptr(), x.numel(), scale.data_ptr(), threshold, codes.data_ptr(), scales.data_ptr(),
                        width, out.data_ptr(), torch.get_num_threads())
        if kept < 0:
            raise RuntimeError(f"clada native q4_estimate failed (code {kept})")
        return out, kept


def cache_dir() -> Path:
    """Where built kernels are kept: ``$CLADA_CACHE/native`` or ``~/.cache/clada/native``."""
    return cache_root() / "native"


def _compiler_identity(cc: str) -> str:
    try:
        return subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def _build(cc: str, flags: tuple[str, ...], target: Path) -> str | None:
    """Compile the kernel into ``target`` (atomically); returns None, or the compiler's complaint."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        done = subprocess.run([cc, *flags, "-shared", "-fPIC", str(SOURCE), "-o", tmp, "-lm"],
                              capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            return (done.stderr.strip().splitlines() or ["exit status %d" % done.returncode])[-1]
        os.replace(tmp, target)
        return None
    except (OSError, subprocess.SubprocessError) as err:
        return str(err)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _load() -> GatherKernel | None:
    if os.environ.get("CLADA_NATIVE", "1") == "0":
        return None
    cc = shutil.which(os.environ.get("CC") or "cc")
    if cc is None:
        _log.warning("clada: no C compiler (%s) found; decode steps use embedding_bag", os.environ.get("CC") or "cc")
        return None
    source = SOURCE.read_bytes()
    ident = _compiler_identity(cc) + cpu_identity() + platform.machine() + torch.__version__
    problems = []
    for flags in FLAG_SETS:
        key = hashlib.sha256(source + repr(flags).encode() + ident.encode()).hexdigest()[:16]
        target = cache_dir() / f"gather-{key}.so"
        problem = None if target.is_file() else _build(cc, flags, target)
        if problem is None:
            runtimes = openmp_runtimes()
            try:
                lib = ctypes.CDLL(str(target))
            except OSError as err:
                problem = str(err)
            else:
                if "-fopenmp" not in flags or openmp_runtimes() <= runtimes:
                    return GatherKernel(lib, target, flags)
                problem = "its OpenMP runtime is not torch's"
                _log.info("clada: the OpenMP build of the gather kernel would not share torch's OpenMP runtime; "
                          "using its own thread pool")
        problems.append(f"{' '.join(flags)}: {problem}")
    _log.warning("clada: native gather kernel unavailable (%s); decode steps use embedding_bag", "; ".join(problems))
    return None


def openmp_runtimes() -> set[str]:
    """Files of the OpenMP runtimes this process has mapped (Linux: its memory maps; elsewhere a set that no
    load can stay within, so that the OpenMP build is never taken)."""
    try:
        with open("/proc/self/maps") as maps:
            return {os.path.realpath(line.split()[-1]) for line in maps
                    if any(name in line.rsplit("/", 1)[-1] for name in OPENMP_RUNTIMES)}
    except OSError:
        return {object()}  # type: ignore[arg-type]  # a new object each call: never a subset


def gather_kernel() -> GatherKernel | None:
    """The compiled kernel, built and loaded on first call (cached per process), or None if unavailable."""
    global _kernel
    if _kernel is _UNSET:
        _kernel = _load()
    return _kernel


def reset() -> None:
    """Forget the loaded kernel so that the next ``gather_kernel()`` looks again (tests, changed environment)."""
    global _kernel
    _kernel = _UNSET
