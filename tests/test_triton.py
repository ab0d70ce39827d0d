"""The Triton decode-step gather (runtime/triton_kernels.py): exact selection and sums vs the masked reference,
what it accepts, no host synchronisation, and the registered ``clada::triton_gather`` op.

Without a GPU the kernel runs on CPU tensors under Triton's interpreter. Triton builds its own library
(``tl.sum``, ...) for the interpreter or the GPU when it is imported, so this module imports it at collection
with TRITON_INTERPRET=1 and restores the variable; the module's tests then run with it set (a module fixture),
and other test modules never see it (with it set, the runtime would pick the slow interpreter for CPU decode
steps). Where something imported Triton earlier without the interpreter, one test reruns this module in a
fresh process instead. Without triton these tests skip locally and fail under CI (``$CI`` set).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from clada.runtime import triton_kernels as tk

ON_CUDA = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"


def _interpreter_in_this_process() -> bool:
    """Import Triton (if not yet) with TRITON_INTERPRET=1, restore the variable; whether the interpreter works."""
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        return tk._interpreting()
    finally:
        if saved is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = saved


IN_PROCESS = ON_CUDA or _interpreter_in_this_process()
HAVE_TRITON = tk._import_triton()
DEVICE = torch.device("cuda" if ON_CUDA else "cpu")
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-3}  # relative to the output's magnitude
DTYPES = [pytest.param(d, id=str(d).removeprefix("torch.")) for d in TOLERANCE]
SMALL_BLOCKS = {"BLOCK_K": 16, "BLOCK_N": 32}  # interpreter blocks: several per dimension, the last ones partial
MID_BLOCKS = {"BLOCK_K": 64, "BLOCK_N": 64}
BIG_BLOCKS = {"BLOCK_K": 128, "BLOCK_N": 512}  # interpreter blocks for SmolLM2's shapes (fewer programs)
DOT_BLOCKS = {"BLOCK_K": 16, "BLOCK_N": 32, "USE_DOT": True}  # the tensor-core variant (rows padded to 16)
# (channels C, width OUT, row stride, interpreter blocks); stride > OUT: rows is a view of a wider buffer
SHAPES = [
    pytest.param(37, 50, 70, SMALL_BLOCKS, id="C37-OUT50-stride70"),
    pytest.param(300, 129, 129, MID_BLOCKS, id="C300-OUT129"),
    pytest.param(576, 3072, 3072, BIG_BLOCKS, id="smollm2-gate-up"),
    pytest.param(1536, 576, 576, BIG_BLOCKS, id="smollm2-down"),
]


@pytest.fixture(autouse=True, scope="module")
def triton_interpreter():
    """Triton importable (else skip, or fail under CI); TRITON_INTERPRET=1 for this module where no GPU."""
    if not HAVE_TRITON:
        reason = "triton is not installed (pip install triton): the runtime runs without its Triton backend"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}; CI must test it", pytrace=False)
        pytest.skip(reason)
    with pytest.MonkeyPatch.context() as mp:
        if not ON_CUDA:
            mp.setenv("TRITON_INTERPRET", "1")
        yield


@pytest.fixture(autouse=True)
def in_this_process(request):
    if not IN_PROCESS and request.node.originalname != "test_triton_in_fresh_process":
        pytest.skip("triton was imported without TRITON_INTERPRET=1: test_triton_in_fresh_process runs this")


def test_triton_in_fresh_process():
    """Where this process cannot interpret Triton kernels, run this module in one that can."""
    if IN_PROCESS:
        pytest.skip("the kernel tests run in this process")
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
                          cwd=Path(__file__).parents[1], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]


@pytest.fixture
def blocks(monkeypatch):
    """Set the interpreter's block sizes for one test (CUDA autotunes and ignores them)."""
    return lambda config: monkeypatch.setattr(tk, "INTERPRETER_CONFIG", dict(config))


def inputs(n, channels, width, stride, dtype, seed=0):
    """x (n, C), weight (C,), thresholds (n,) and rows (C, width) with row stride ``stride``, on DEVICE.

    Thresholds: row 0 keeps nothing (where n >= 2), row 1 everything (where n >= 3), the others some channels.
    """
    gen = torch.Generator().manual_seed(seed + 1000 * n + channels)
    x = torch.randn(n, channels, generator=gen).to(dtype)
    weight = torch.rand(channels, generator=gen) + 0.5
    thresholds = torch.rand(n, generator=gen) * 1.5
    if n >= 2:
        thresholds[0] = 1e30
    if n >= 3:
        thresholds[1] = -1.0
    wide = torch.randn(channels, stride + 3, generator=gen).to(dtype)
    rows = wide[:, 3:3 + width]
    return tuple(t.to(DEVICE) for t in (x, weight, thresholds, rows))


def reference(x, weight, thresholds, rows):
    """The float32 masked product of the same (possibly rounded) inputs, and the kept count."""
    keep = x.float().abs() * weight > thresholds.view(-1, 1)
    return (x.float() * keep) @ rows.float(), keep.sum()


def check(got, kept, x, weight, thresholds, rows):
    want, want_kept = reference(x, weight, thresholds, rows)
    assert kept.dim() == 0 and kept.device == x.device and kept.dtype == torch.int64
    assert int(kept) == int(want_kept)
    assert got.dtype == x.dtype and got.shape == want.shape and got.device == x.device
    tol = TOLERANCE[x.dtype]
    torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol * max(want.abs().max().item(), 1.0))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels,width,stride,config", SHAPES)
@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_triton_gather_equals_masked_product(blocks, dtype, channels, width, stride, config, n):
    """Every row keeps exactly the reference's channels and sums their weighted rows (float32 accumulation)."""
    blocks(config)
    x, weight, thresholds, rows = inputs(n, channels, width, stride, dtype)
    got, kept = tk.TritonBackend().gather(x, weight, thresholds, rows)
    check(got, kept, x, weight, thresholds, rows)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("variant", ["fma", "dot", "two_pass-fma", "two_pass-dot"])
@pytest.mark.parametrize("split", [None, 48, 100])
@pytest.mark.parametrize("n", [1, 3, 8])
def test_triton_split_and_dot_variants_equal_masked_product(blocks, monkeypatch, dtype, variant, split, n):
    """Slices of ``split`` channels per program (float32 slots summed by the second kernel; 100: slices that are
    no multiple of BLOCK_K), the tensor-core variant and the two-pass one (a select kernel first) compute the same
    selection and sums, with per-row weights (a prompt prior) too."""
    blocks(DOT_BLOCKS if variant.endswith("dot") else SMALL_BLOCKS)
    monkeypatch.setattr(tk, "VARIANT", "two_pass" if variant.startswith("two_pass") else "fused")
    if split is not None:
        monkeypatch.setitem(tk.SPLIT_OVERRIDE, (300, 129), split)
    x, weight, thresholds, rows = inputs(n, 300, 129, 140, dtype)
    got, kept = tk.TritonBackend().gather(x, weight, thresholds, rows)
    check(got, kept, x, weight, thresholds, rows)
    per_row = torch.rand(n, 300, generator=torch.Generator().manual_seed(n)).to(DEVICE) + 0.5
    got, kept = tk.TritonBackend().gather(x, per_row, thresholds, rows)
    keep = x.float().abs() * per_row > thresholds.view(-1, 1)
    assert int(kept) == int(keep.sum())
    want = (x.float() * keep) @ rows.float()
    tol = TOLERANCE[x.dtype]
    torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol * max(want.abs().max().item(), 1.0))


def test_triton_counter_accumulates(blocks):
    """A given counter has each call's kept pairs added to what it holds (statistics without a kernel of their
    own); a counter of the wrong kind is refused."""
    blocks(SMALL_BLOCKS)
    x, weight, thresholds, rows = inputs(4, 37, 50, 70, torch.float32)
    counter = torch.full((), 5, dtype=torch.int64, device=DEVICE)
    _, same = tk.TritonBackend().gather(x, weight, thresholds, rows, counter)
    tk.TritonBackend().gather(x, weight, thresholds, rows, counter)
    want = int((x.abs() * weight > thresholds.view(-1, 1)).sum())
    assert same is counter and int(counter) == 5 + 2 * want
    with pytest.raises(ValueError, match="counter"):
        tk.TritonBackend().gather(x, weight, thresholds, rows, torch.zeros((), dtype=torch.int32, device=DEVICE))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("config", [SMALL_BLOCKS, MID_BLOCKS, DOT_BLOCKS])
@pytest.mark.parametrize("variant", ["fused", "two_pass"])
def test_triton_row_does_not_depend_on_its_companions(blocks, monkeypatch, dtype, config, variant):
    """Batch invariance: a row's output has the same bits whatever the other rows of the call keep (partial sums in
    fixed slots, no float atomics, so also on a GPU whatever the order programs run in)."""
    blocks(config)
    monkeypatch.setattr(tk, "VARIANT", variant)
    x, weight, thresholds, rows = inputs(3, 300, 129, 129, dtype)
    other, _, other_thresholds, _ = inputs(3, 300, 129, 129, dtype, seed=1)
    x2, thresholds2 = x.clone(), thresholds.clone()
    x2[1:], thresholds2[1:] = other[1:], other_thresholds[1:] * 0.5
    alone, _ = tk.TritonBackend().gather(x, weight, thresholds, rows)
    again, _ = tk.TritonBackend().gather(x2, weight, thresholds2, rows)
    assert torch.equal(alone[0], again[0])
    assert not torch.equal(alone[1:], again[1:])


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_triton_model_row_does_not_depend_on_its_companions(blocks, family):
    """The model-level batch-invariance check of tests/test_decoding.py through the Triton backend."""
    from tests.test_decoding import assert_batch_invariant

    blocks(SMALL_BLOCKS)
    assert_batch_invariant(family, "triton")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("keep", ["none", "all"])
def test_triton_gather_keeps_none_or_all(blocks, dtype, keep):
    """Thresholds above every score keep nothing (zeros); negative ones keep every channel, but not the
    block's padding channels past C (their zero scores exceed a negative threshold too)."""
    blocks(SMALL_BLOCKS)
    x, weight, _, rows = inputs(4, 37, 50, 70, dtype)
    thresholds = torch.full((4, 1), 1e30 if keep == "none" else -1.0, device=DEVICE)  # (N, 1) is accepted
    got, kept = tk.TritonBackend().gather(x, weight, thresholds, rows)
    check(got, kept, x, weight, thresholds, rows)
    assert int(kept) == (0 if keep == "none" else 4 * 37)
    if keep == "none":
        assert torch.equal(got, torch.zeros_like(got))


def test_triton_gather_threshold_is_strict(blocks):
    """A score equal to its threshold is skipped (strict >), computed as a float32 product."""
    blocks(SMALL_BLOCKS)
    x = torch.tensor([[1.5, -2.0, 0.25, 3.0]], device=DEVICE)
    weight = torch.tensor([2.0, 1.5, 4.0, 0.5], device=DEVICE)  # scores 3.0, 3.0, 1.0, 1.5
    rows = torch.eye(4, device=DEVICE)
    got, kept = tk.TritonBackend().gather(x, weight, torch.tensor([1.5], device=DEVICE), rows)
    assert int(kept) == 2 and got.cpu().tolist() == [[1.5, -2.0, 0.0, 0.0]]


def test_triton_gather_rejects_bad_metadata():
    backend = tk.TritonBackend()
    x, weight, thresholds, rows = inputs(2, 8, 16, 16, torch.float32)
    with pytest.raises(ValueError, match="rows"):
        backend.gather(x, weight, thresholds, rows.to(torch.bfloat16))
    with pytest.raises(ValueError, match="rows"):
        backend.gather(x, weight, thresholds, rows.t().contiguous().t())  # column stride != 1
    with pytest.raises(ValueError, match="x"):
        backend.gather(torch.randn(9, 8, device=DEVICE), weight, torch.zeros(9, device=DEVICE), rows)
    with pytest.raises(ValueError, match="thresholds"):
        backend.gather(x, weight, torch.zeros(3, device=DEVICE), rows)
    with pytest.raises(ValueError, match="thresholds"):
        backend.gather(x, weight, thresholds.double(), rows)
    with pytest.raises(ValueError, match="weight"):
        backend.gather(x, weight.double(), thresholds, rows)


def test_triton_accepts(monkeypatch):
    backend = tk.TritonBackend()
    cpu = torch.device("cpu")
    assert backend.name == "triton" and tk.MAX_ROWS == 8
    assert tk.triton_available()
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert backend.accepts(torch.device("cuda"), dtype, 1) and backend.accepts(torch.device("cuda"), dtype, 8)
    assert not backend.accepts(torch.device("cuda"), torch.float32, tk.MAX_ROWS + 1)
    assert not backend.accepts(torch.device("cuda"), torch.float32, 0)
    assert not backend.accepts(torch.device("cuda"), torch.float64, 1)
    assert not backend.accepts(torch.device("cuda"), torch.int8, 1)
    assert not backend.accepts(torch.device("meta"), torch.float32, 1)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert backend.accepts(cpu, torch.bfloat16, 4) == (not ON_CUDA)  # where Triton was imported for the interpreter
    monkeypatch.delenv("TRITON_INTERPRET")
    assert not backend.accepts(cpu, torch.bfloat16, 4)  # checked afresh at each call
    assert tk.triton_available() == torch.cuda.is_available()
    monkeypatch.setattr(tk, "triton", None)  # as without the optional dependency
    monkeypatch.setattr(tk, "_INSTALLED", False)
    assert not backend.accepts(torch.device("cuda"), torch.float32, 1) and not tk.triton_available()


def test_triton_gather_never_syncs(blocks, monkeypatch):
    """The call path reads no tensor value on the host: no .item/.tolist/nonzero/bool/int/float of a tensor
    (and, on CUDA, no synchronising CUDA call)."""
    blocks(SMALL_BLOCKS)
    x, weight, thresholds, rows = inputs(4, 37, 50, 70, torch.bfloat16)
    tk.TritonBackend().gather(x, weight, thresholds, rows)  # warm: first-call setup is not on the decode path

    def forbidden(name):
        def raiser(*args, **kwargs):
            raise AssertionError(f"host synchronisation: {name} called on the gather path")
        return raiser

    with monkeypatch.context() as mp:
        for name in ("item", "tolist", "nonzero", "__bool__", "__int__", "__float__"):
            mp.setattr(torch.Tensor, name, forbidden(f"Tensor.{name}"))
        mp.setattr(torch, "nonzero", forbidden("torch.nonzero"))
        with pytest.raises(AssertionError, match="host synchronisation"):
            bool(torch.ones(1))  # the guard is live
        if ON_CUDA:
            torch.cuda.set_sync_debug_mode("error")
        try:
            got, kept = tk.TritonBackend().gather(x, weight, thresholds, rows)
        finally:
            if ON_CUDA:
                torch.cuda.set_sync_debug_mode("default")
    check(got, kept, x, weight, thresholds, rows)


def test_triton_op_registered_with_fake_implementation(blocks):
    """``clada::triton_gather`` is a torch.library op whose fake kernel gives shapes and dtypes only; opcheck
    finds its schema, autograd registration and fake kernel consistent with the real one."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    op = torch.ops.clada.triton_gather.default
    assert op.name() == "clada::triton_gather"
    assert len(op._schema.returns) == 1 and op._schema.arguments[-1].alias_info.is_write  # mutates the counter
    blocks(SMALL_BLOCKS)
    checks = ("test_schema", "test_autograd_registration", "test_faketensor")
    if ON_CUDA:  # the interpreted kernel cannot be traced (wrap_triton passes it through): CUDA only
        checks += ("test_aot_dispatch_dynamic",)
    counter = torch.zeros((), dtype=torch.int64, device=DEVICE)
    torch.library.opcheck(op, (*inputs(3, 37, 50, 70, torch.bfloat16), counter), test_utils=checks)
    with FakeTensorMode():
        x = torch.empty(3, 40, dtype=torch.bfloat16, device=DEVICE)
        rows = torch.empty(40, 96, dtype=torch.bfloat16, device=DEVICE)[:, :50]
        out = torch.ops.clada.triton_gather(x, torch.empty(40, device=DEVICE), torch.empty(3, device=DEVICE), rows,
                                            torch.zeros((), dtype=torch.int64, device=DEVICE))
    assert isinstance(out, FakeTensor)
    assert out.shape == (3, 50) and out.dtype == torch.bfloat16 and out.device == DEVICE


def _left_padded_batch():
    """Three prompts of 8, 5 and 3 tokens, left-padded to 8 (pad id 0), with their attention mask."""
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(4, 100, (3, 8), generator=gen)
    mask = torch.ones_like(ids)
    for row, length in enumerate((8, 5, 3)):
        ids[row, : 8 - length], mask[row, : 8 - length] = 0, 0
    return ids.to(DEVICE), mask.to(DEVICE)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_triton_backend_generates_the_masked_references_tokens(blocks, family):
    """A tiny model decoding through the Triton backend (greedy, batch 3, left padding) gives the masked
    reference's tokens, and every decode-step gate input went through Triton."""
    from clada import runtime
    from tests.conftest import make_artifact, tiny_model

    blocks(SMALL_BLOCKS)
    model = tiny_model(family).to(DEVICE)
    art = make_artifact(model, tau_in=0.05, tau_mid=0.02, lam=-0.5, tau_s=0.5)
    ids, mask = _left_padded_batch()
    tokens = {}
    for backend in ("masked", "triton"):
        runtime.apply(model, art, backend=backend)
        with torch.no_grad():
            out = model.generate(ids, attention_mask=mask, max_new_tokens=6, min_new_tokens=6, do_sample=False,
                                 pad_token_id=0)
        tokens[backend] = (out[:, ids.shape[1]:], runtime.stats(model))
        runtime.remove(model)
    (want, ref_stats), (got, stats) = tokens["masked"], tokens["triton"]
    assert torch.equal(got, want)
    calls = stats["path_calls"]
    assert calls["triton"] > 0 and sum(calls.values()) == calls["triton"], calls
    assert stats["backends"] == {f"{DEVICE.type} float32 3": "triton"}
    for key in ("mlp_sparsity", "input_sparsity", "relaxed_share"):
        assert stats[key] == pytest.approx(ref_stats[key], abs=1e-6)


def test_triton_decode_step_never_syncs(blocks, monkeypatch):
    """A whole decode step through the runtime (load signals, multiplier, thresholds, kernels, statistics) reads
    no tensor value on the host once the backend is chosen for the call's shape."""
    from clada import runtime
    from clada.runtime.compat import cache_kwargs, output_cache
    from tests.conftest import make_artifact, tiny_model

    blocks(SMALL_BLOCKS)
    model = tiny_model("llama").to(DEVICE)
    runtime.apply(model, make_artifact(model, tau_in=0.05, tau_mid=0.02, lam=-0.5, tau_s=0.5), backend="triton")
    ids = torch.randint(4, 100, (2, 6), device=DEVICE)
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True)
        nxt = out.logits[:, -1:].argmax(-1)
        out = model(input_ids=nxt, **cache_kwargs(model, output_cache(out)))  # first step: sets up, chooses
        nxt = out.logits[:, -1:].argmax(-1)
        cache = output_cache(out)
        seen: list[str] = []
        gates = [m for m in model.modules() if type(m).__name__ == "GatedProjection"]
        # the runtime's own code must not read values: count host reads made while a gated projection runs
        active = []
        hooks = [g.register_forward_pre_hook(lambda *a: active.append(1)) for g in gates]
        hooks += [g.register_forward_hook(lambda *a: active.pop() and None) for g in gates]
        def counted(name, original):
            def wrapper(*args, **kwargs):
                if active:
                    seen.append(name)
                return original(*args, **kwargs)
            return wrapper

        with monkeypatch.context() as mp:
            for name in ("item", "tolist", "nonzero", "__bool__", "__int__", "__float__"):
                mp.setattr(torch.Tensor, name, counted(name, getattr(torch.Tensor, name)))
            mp.setattr(torch, "nonzero", counted("torch.nonzero", torch.nonzero))
            model(input_ids=nxt, **cache_kwargs(model, cache))
        for h in hooks:
            h.remove()
    assert runtime.stats(model)["path_calls"]["triton"] > 0
    assert seen == [], f"host reads inside the gated projections: {sorted(set(seen))}"
    runtime.remove(model)
