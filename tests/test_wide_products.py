"""Dense calls (prefill) of a projection whose 2-byte float weight is re-laid for gathering: torch's product on
the transposed view or the same widened to float32, whichever ``selection.choose_wide_product`` measured faster."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from clada import runtime
from clada.runtime import native, selection, sparse
from clada.runtime.sparse import GatedProjection
from tests.conftest import fixed_wide_timing, make_artifact, tiny_model

MEASURE_WIDE = selection.measure_wide  # the real one (conftest's autouse fixture replaces it in each test)
PROMPT = torch.randint(4, 100, (2, 8), generator=torch.Generator().manual_seed(5))
pytestmark = pytest.mark.skipif(native.gather_kernel() is None or torch.bfloat16 not in native.gather_kernel().dtypes,
                                reason="no compiled bfloat16 kernel on this machine")


def patched_bf16(monkeypatch, float32_ms: float):
    """A tiny bfloat16 llama patched with the native backend (which re-lays gate, up and down at apply), on a
    machine where the widened product takes ``float32_ms`` against torch's 1 ms; and the calls of the widened
    product, recorded."""
    monkeypatch.setattr(selection, "measure_wide", fixed_wide_timing(float32_ms=float32_ms))
    calls = []
    real = sparse.wide_product

    def recording(x, weight, choice, bias=None):
        calls.append((tuple(weight.shape), choice))
        return real(x, weight, choice, bias)

    monkeypatch.setattr(sparse, "wide_product", recording)  # sparse calls it by this name
    model = tiny_model("llama").to(torch.bfloat16)
    runtime.apply(model, make_artifact(model, tau_in=0.05, tau_mid=0.05), backend="native")
    return model, calls


def wrappers(model) -> list[GatedProjection]:
    return [m for m in model.modules() if isinstance(m, GatedProjection)]


def test_prefill_on_relaid_weights_runs_the_widened_product_where_it_wins(monkeypatch):
    model, calls = patched_bf16(monkeypatch, float32_ms=0.5)
    projections = wrappers(model)
    assert projections and all(not p.inner.weight.is_contiguous() for p in projections)  # re-laid
    with torch.no_grad():
        model(input_ids=PROMPT)
    assert len(calls) == len(projections) and {c for _, c in calls} == {"float32"}
    x = torch.randn(5, projections[0].inner.in_features, dtype=torch.bfloat16)
    w = projections[0].inner.weight
    assert torch.equal(projections[0].dense(x), F.linear(x.float(), w.float()).to(torch.bfloat16))
    runtime.remove(model)


def test_prefill_on_relaid_weights_keeps_torchs_product_where_widening_does_not_win(monkeypatch):
    model, calls = patched_bf16(monkeypatch, float32_ms=0.95)  # within the tolerance
    with torch.no_grad():
        model(input_ids=PROMPT)
    assert calls == []
    p = wrappers(model)[0]
    x = torch.randn(5, p.inner.in_features, dtype=torch.bfloat16)
    assert torch.equal(p.dense(x), p.inner(x))
    runtime.remove(model)


def test_a_hooked_projection_is_called_as_a_module(monkeypatch):
    model, calls = patched_bf16(monkeypatch, float32_ms=0.5)
    seen = []
    p = wrappers(model)[0]
    p.inner.register_forward_hook(lambda *a: seen.append(1))
    x = torch.randn(3, p.inner.in_features, dtype=torch.bfloat16)
    p.dense(x)
    assert seen == [1] and calls == []
    runtime.remove(model)


def test_float32_and_original_layouts_are_never_measured(monkeypatch):
    measured = []
    monkeypatch.setattr(selection, "measure_wide", lambda weight, clock=None, reps=None: measured.append(1))
    model = tiny_model("llama")
    runtime.apply(model, make_artifact(model, tau_in=0.05, tau_mid=0.05), backend="native")  # float32, re-laid
    with torch.no_grad():
        model(input_ids=PROMPT)
    runtime.remove(model)
    model = tiny_model("llama").to(torch.bfloat16)
    runtime.apply(model, make_artifact(model, tau_in=0.05, tau_mid=0.05), backend="masked")  # original layout
    with torch.no_grad():
        model(input_ids=PROMPT)
    runtime.remove(model)
    assert measured == []


def test_each_shape_is_measured_once_per_machine(monkeypatch):
    measured = []

    def counting(weight, clock=None, reps=None):
        measured.append(tuple(weight.shape))
        return {"torch": 1.0, "float32": 0.5}

    monkeypatch.setattr(selection, "measure_wide", counting)
    model = tiny_model("llama").to(torch.bfloat16)
    runtime.apply(model, make_artifact(model, tau_in=0.05, tau_mid=0.05), backend="native")
    for _ in range(2):
        with torch.no_grad():
            model(input_ids=PROMPT)
    runtime.remove(model)
    runtime.apply(model, make_artifact(model, tau_in=0.05, tau_mid=0.05), backend="native")  # a new patch: cached
    with torch.no_grad():
        model(input_ids=PROMPT)
    # tiny llama: gate and up (64x32) share a shape, down (32x64) has its own
    assert sorted(measured) == [(32, 64), (64, 32)]


def test_measure_wide_times_both_candidates_alternately():
    ticks = iter(range(1000))
    ms = MEASURE_WIDE(torch.randn(24, 16, dtype=torch.bfloat16), clock=lambda device: float(next(ticks)), reps=3)
    assert ms == {"torch": pytest.approx(1e3), "float32": pytest.approx(1e3)}
