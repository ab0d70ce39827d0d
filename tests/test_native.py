"""The compiled decode-step kernel (runtime/native.py): exact selection, sums, build cache and clean fallback."""

from __future__ import annotations

import logging
import shutil

import pytest
import torch

from clada import runtime
from clada.runtime import native
from tests.conftest import make_artifact, tiny_model
from tests.test_runtime import PROMPT, decode_logits


@pytest.fixture
def kernel():
    """The kernel as the runtime loads it; skipped only where this machine has no C compiler at all."""
    if shutil.which("cc") is None:
        pytest.skip("no C compiler (cc) on this machine: the runtime uses embedding_bag here")
    k = native.gather_kernel()
    assert k is not None, "a C compiler exists but the kernel did not build or load (see the logged warning)"
    return k


@pytest.fixture
def fresh_native(tmp_path, monkeypatch):
    """An empty kernel cache and no loaded kernel; the process's kernel is looked up again afterwards."""
    monkeypatch.setenv("CLADA_CACHE", str(tmp_path))
    native.reset()
    yield tmp_path / "native"
    native.reset()


TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-3}  # vs a float32 sum of the same
DTYPES = [pytest.param(d, id=str(d).removeprefix("torch.")) for d in TOLERANCE]


def reference(x, scale, thresholds, rows):
    """The masked product in float32 from the same (possibly rounded) inputs, and the kept count."""
    x, rows = x.float(), rows.float()
    keep = x.abs() * scale > thresholds.view(-1, 1)
    return (x * keep) @ rows, int(keep.sum())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,channels,threads", [(1, 37, 1), (1, 300, 2), (3, 64, 2), (8, 200, 2), (64, 96, 2)])
def test_kernel_equals_masked_product(kernel, dtype, n, channels, threads):
    """Every row keeps exactly the channels the masked reference keeps and sums their weighted rows."""
    if dtype not in kernel.dtypes:
        pytest.skip(f"this compiler has no {dtype} type; the runtime uses embedding_bag for it")
    gen = torch.Generator().manual_seed(n * 1000 + channels)
    x = torch.randn(n, channels, generator=gen).to(dtype)
    scale = torch.rand(channels, generator=gen) + 0.5
    thresholds = torch.rand(n, generator=gen) * 1.5  # rows skip between none and most channels
    wide = torch.randn(channels, 70, generator=gen).to(dtype)
    rows = wide[:, 3:53]  # row stride 70 > width 50: the kernel honours the stride
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got, kept = kernel(x, scale, thresholds, rows)
    finally:
        torch.set_num_threads(before)
    want, want_kept = reference(x, scale, thresholds, rows)
    assert kept == want_kept and got.dtype == dtype
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol * want.abs().max().item())


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_rows_result_depends_on_nothing_but_the_row(kernel, dtype):
    """Batch invariance: a token row's output is bitwise the same alone, beside any other rows (which keep other
    channels), and at 1 or 2 threads: the summation order is fixed by channel index alone."""
    if dtype not in kernel.dtypes:
        pytest.skip(f"this compiler has no {dtype} type")
    gen = torch.Generator().manual_seed(7)
    channels, width = 700, 300  # several channel blocks, a width that is no multiple of the vector width
    rows = torch.randn(channels, width, generator=gen).to(dtype)
    scale = torch.rand(channels, generator=gen) + 0.5
    x = torch.randn(1, channels, generator=gen).to(dtype)
    thr = torch.tensor([0.6])
    before = torch.get_num_threads()
    outs = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            outs.append(kernel(x, scale, thr, rows)[0][0])
            for seed in (1, 2):
                others = torch.randn(5, channels, generator=torch.Generator().manual_seed(seed)).to(dtype)
                batch = torch.cat([others[:2], x, others[2:]])
                outs.append(kernel(batch, scale, torch.tensor([0.0, 1.5, 0.6, 0.3, 2.0, 0.9]), rows)[0][2])
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(o, outs[0]) for o in outs[1:])


def test_kernel_calls_from_several_threads_and_after_fork(kernel):
    """Concurrent callers each get every result (OpenMP build: a team per caller; own pool: one caller at a time,
    the others run alone), and a forked child, whose threads are gone, still computes every call (alone)."""
    import multiprocessing
    import threading

    gen = torch.Generator().manual_seed(3)
    rows = torch.randn(900, 200, generator=gen)
    scale = torch.ones(900)
    xs = [torch.randn(2, 900, generator=gen) for _ in range(4)]
    thr = torch.tensor([0.3, 0.8])
    want = [reference(x, scale, thr, rows)[0] for x in xs]
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        got = [None] * len(xs)

        def call(i):
            for _ in range(20):
                got[i] = kernel(xs[i], scale, thr, rows)[0]

        threads = [threading.Thread(target=call, args=(i,)) for i in range(len(xs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-4)
        ctx = multiprocessing.get_context("fork")
        with ctx.Pool(1) as pool:
            child = pool.apply_async(_kernel_in_child, (xs[0], scale, thr, rows)).get(timeout=60)
        torch.testing.assert_close(child, want[0], rtol=1e-5, atol=1e-4)
    finally:
        torch.set_num_threads(before)


def _kernel_in_child(x, scale, thr, rows):
    return native.gather_kernel()(x, scale, thr, rows)[0]


def test_kernel_skipping_everything_returns_zeros(kernel):
    x = torch.randn(4, 40)
    got, kept = kernel(x, torch.ones(40), torch.full((4,), 1e9), torch.randn(40, 16))
    assert kept == 0 and torch.equal(got, torch.zeros(4, 16))


def test_kernel_declines_what_it_cannot_compute(kernel):
    rows = torch.randn(8, 16)
    assert kernel.accepts(torch.randn(2, 8), rows)
    assert not kernel.accepts(torch.randn(native.MAX_ROWS + 1, 8), rows)
    assert not kernel.accepts(torch.randn(2, 8, dtype=torch.float64), rows.double())
    assert not kernel.accepts(torch.randn(2, 8), rows.t().contiguous().t())  # columns not contiguous
    assert not kernel.accepts(torch.randn(2, 8).bfloat16(), rows)  # mixed element types
    assert kernel.accepts(torch.randn(2, 8).bfloat16(), rows.bfloat16())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,nin,nout,threads", [(1, 37, 5, 1), (1, 576, 577, 2), (2, 100, 130, 2), (4, 48, 64, 1),
                                                (5, 300, 67, 2), (8, 17, 300, 2)])
def test_gemv_equals_the_dense_product(kernel, dtype, n, nin, nout, threads):
    """The dense product on the original (out, in) layout, with a row stride beyond in (a view of a wider buffer)."""
    if dtype not in kernel.gemv_dtypes:
        pytest.skip(f"this compiler has no {dtype} type")
    gen = torch.Generator().manual_seed(n * 1000 + nin)
    weight = torch.randn(nout, nin + 3, generator=gen).to(dtype)[:, :nin]
    x = torch.randn(n, nin, generator=gen).to(dtype)
    assert kernel.gemv_accepts(x, weight)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = kernel.gemv(x, weight)
    finally:
        torch.set_num_threads(before)
    want = x.float() @ weight.float().t()
    assert got.dtype == dtype and got.shape == (n, nout)
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol * want.abs().max().item())


def test_gemv_rows_depend_on_nothing_but_themselves(kernel):
    """A token row's product is bitwise the same alone, beside other rows, and at 1 or 2 threads."""
    gen = torch.Generator().manual_seed(11)
    weight, x = torch.randn(301, 700, generator=gen), torch.randn(1, 700, generator=gen)
    before = torch.get_num_threads()
    outs = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            outs.append(kernel.gemv(x, weight)[0])
            for others in (3, 7):
                batch = torch.cat([torch.randn(others, 700, generator=gen), x])
                outs.append(kernel.gemv(batch, weight)[others])
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(o, outs[0]) for o in outs[1:])


def test_gemv_declines_what_it_cannot_compute(kernel):
    weight = torch.randn(16, 8)
    assert kernel.gemv_accepts(torch.randn(2, 8), weight)
    assert not kernel.gemv_accepts(torch.randn(native.GEMV_MAX_ROWS + 1, 8), weight)
    assert not kernel.gemv_accepts(torch.randn(2, 8), weight.t().contiguous().t())  # rows not contiguous
    assert not kernel.gemv_accepts(torch.randn(2, 9), torch.randn(16, 9)[:, :8])  # in features differ
    assert not kernel.gemv_accepts(torch.randn(2, 8).bfloat16(), weight)  # mixed element types
    assert not kernel.gemv_accepts(torch.randn(2, 8, dtype=torch.float64), weight.double())


def test_failed_build_falls_back_with_one_warning(fresh_native, monkeypatch, caplog):
    """A compiler that fails leaves no half-written library, logs why, and the runtime still runs exactly."""
    monkeypatch.setenv("CC", "false")
    with caplog.at_level(logging.WARNING, logger="clada.runtime"):
        assert native.gather_kernel() is None
        assert native.gather_kernel() is None  # remembered: not rebuilt, not warned again
    warnings = [r for r in caplog.records if "unavailable" in r.getMessage()]
    assert len(warnings) == 1
    assert not fresh_native.exists() or not any(fresh_native.iterdir())
    model = tiny_model("llama")
    art = make_artifact(model, tau_in=0.05, tau_mid=0.05)
    runtime.apply(model, art, backend="masked")
    ref = decode_logits(model, PROMPT)
    runtime.remove(model)
    runtime.apply(model, art)
    torch.testing.assert_close(decode_logits(model, PROMPT), ref, rtol=1e-5, atol=1e-5)
    calls = runtime.stats(model)["path_calls"]
    assert calls["embedding_bag"] > 0 and calls["native"] == 0
    runtime.remove(model)


def test_missing_compiler_and_opt_out_give_none(fresh_native, monkeypatch):
    monkeypatch.setenv("CC", "/nonexistent/cc")
    assert native.gather_kernel() is None
    native.reset()
    monkeypatch.delenv("CC")
    monkeypatch.setenv("CLADA_NATIVE", "0")
    assert native.gather_kernel() is None


def test_built_kernel_is_cached_per_machine(fresh_native, monkeypatch, kernel):
    """The first load builds into the cache; the next process (here: after reset) loads without compiling."""
    monkeypatch.setenv("CC", shutil.which("cc"))
    first = native.gather_kernel()
    assert first is not None and first.path.parent == fresh_native and first.path.is_file()
    native.reset()
    monkeypatch.setattr(native, "_build", lambda *a: pytest.fail("rebuilt although the cache had the library"))
    again = native.gather_kernel()
    assert again is not None and again.path == first.path


def test_without_a_shared_openmp_runtime_the_kernel_runs_its_own_pool(fresh_native, monkeypatch):
    """Where the OpenMP build would bring a second OpenMP runtime (a torch built with another), the loader takes the
    build with the kernel's own thread pool, which computes the same, also from a forked child."""
    if shutil.which("cc") is None:
        pytest.skip("no C compiler (cc) on this machine: the runtime uses embedding_bag here")
    mapped = iter(range(100))
    monkeypatch.setattr(native, "openmp_runtimes", lambda: {next(mapped)})  # every load maps another runtime
    k = native.gather_kernel()
    assert k is not None and "-fopenmp" not in k.flags and "-pthread" in k.flags
    gen = torch.Generator().manual_seed(5)
    x, rows = torch.randn(3, 700, generator=gen), torch.randn(700, 130, generator=gen)
    scale, thr = torch.rand(700, generator=gen) + 0.5, torch.tensor([0.2, 0.9, 1.5])
    want, kept = reference(x, scale, thr, rows)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        got, got_kept = k(x, scale, thr, rows)
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    assert got_kept == kept


def test_the_openmp_build_is_taken_where_it_shares_torchs_runtime(fresh_native, kernel):
    """On Linux with torch's GNU OpenMP (this machine's torch), the OpenMP build loads, resolving to torch's runtime:
    the process maps no OpenMP runtime besides those it had (torch's and, say, another package's renamed copy)."""
    import sys

    if not sys.platform.startswith("linux") or "OpenMP" not in torch.__config__.parallel_info():
        pytest.skip("torch here does not use OpenMP on Linux")
    assert "-fopenmp" in kernel.flags
    assert any("torch" in path for path in native.openmp_runtimes())
