"""The projections a decode step leaves dense on the compiled CPU product (runtime/dense_products.py): which modules,
when it runs, the measured choice, and that ``remove`` gives every module back untouched."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from clada import runtime
from clada.runtime import native, patch, selection
from clada.runtime.selection import ProductTiming
from tests.conftest import GATHER, fixed_product_timing, fixed_timing, make_artifact, tiny_model
from tests.test_runtime import PROMPT, decode_logits

MEASURE_PRODUCTS = selection.measure_products  # the real one (conftest's autouse fixture replaces it in each test)
pytestmark = pytest.mark.skipif(native.gather_kernel() is None, reason="no compiled kernel on this machine")


def artifact(model):
    return make_artifact(model, tau_in=0.05, tau_mid=0.05)


def dense_modules(model) -> list[nn.Linear]:
    adapter = runtime.adapter_for(model)
    attention = [m for p in adapter.attention_parts(model) for m in p.projections()]
    return attention + [model.get_output_embeddings()]


def without_products(monkeypatch):
    """``apply`` as if no projection were left to the compiled product."""
    real = patch.DenseProducts
    monkeypatch.setattr(patch, "DenseProducts", lambda modules: real([]))


def test_attention_and_head_run_the_compiled_product_where_it_wins(monkeypatch):
    model = tiny_model("llama")
    masked = make_artifact(model, tau_in=0.05, tau_mid=0.05)
    runtime.apply(model, masked, backend="masked")
    reference = decode_logits(model, PROMPT)
    assert runtime.stats(model)["dense_products"] is None  # the reference reads every weight with torch's product
    runtime.remove(model)
    runtime.apply(model, artifact(model))
    got = decode_logits(model, PROMPT)
    st = runtime.stats(model)["dense_products"]
    runtime.remove(model)
    # every decode step (2 rows) of 4 attention projections x 2 layers and the head; the prefill (16 rows): torch,
    # also the MLP projections' (the gathering backend takes their decode steps)
    assert st["calls"]["native"] == 6 * (4 * 2 + 1) and st["calls"]["torch"] == 4 * 2 + 1 + 3 * 2
    assert {(c["shape"], c["rows"], c["choice"]) for c in st["choices"]} >= {("128x32", 2, "native")}
    torch.testing.assert_close(got, reference, rtol=1e-4, atol=1e-4)  # the same function, other summation order


def test_mlp_projections_auto_runs_dense_take_the_compiled_product(monkeypatch):
    """Where gathering loses (auto keeps the original layout and puts the original modules back), the MLP's own
    projections are dense products too."""
    model = tiny_model("llama")
    monkeypatch.setattr(selection, "measure", fixed_timing(2.0))  # gathering slower than dense everywhere
    runtime.apply(model, artifact(model))
    decode_logits(model, PROMPT)
    st = runtime.stats(model)
    runtime.remove(model)
    assert st["path_calls"]["dense"] > 0 and st["path_calls"][GATHER] == 0
    # the first decode step decides (through the wrappers, which call the modules' products); the later 5 run the
    # original modules: 3 MLP projections x 2 layers more per step
    assert st["dense_products"]["calls"]["native"] >= 5 * (4 * 2 + 1 + 3 * 2)
    part = runtime.adapter_for(model).mlp_parts(model)[0]
    mlp = {"x".join(map(str, p.weight.shape)) for p in part.projections()}
    assert mlp <= {c["shape"] for c in st["dense_products"]["choices"]}


def test_where_torch_wins_the_modules_run_their_own_forward(monkeypatch):
    model = tiny_model("llama")
    monkeypatch.setattr(selection, "measure_products", fixed_product_timing(native_ms=0.95))  # within tolerance
    runtime.apply(model, artifact(model))
    got = decode_logits(model, PROMPT)
    st = runtime.stats(model)["dense_products"]
    runtime.remove(model)
    assert st["calls"]["native"] == 0 and st["choices"] and all(c["choice"] == "torch" for c in st["choices"])
    without_products(monkeypatch)
    runtime.apply(model, artifact(model))
    assert torch.equal(got, decode_logits(model, PROMPT))
    runtime.remove(model)


def test_where_torch_wins_the_shape_steps_out_until_the_dtype_changes(monkeypatch):
    """Decided at the first decode call's rows: torch's product wins, so the shape's modules run their own forward
    (nothing of the runtime in their call path); a dtype change steps them in again to be decided anew."""
    model = tiny_model("llama")
    monkeypatch.setattr(selection, "measure_products", fixed_product_timing(native_ms=0.95))  # within tolerance
    runtime.apply(model, artifact(model))
    modules = dense_modules(model)
    assert all("forward" in m.__dict__ for m in modules)
    decode_logits(model, PROMPT)
    assert not any("forward" in m.__dict__ for m in modules)  # stepped out at the first decode step
    calls = runtime.stats(model)["dense_products"]["calls"]
    decode_logits(model, PROMPT)
    # no wrapper of theirs ran again: only the MLP projections' prefill calls (their decode steps gather)
    assert runtime.stats(model)["dense_products"]["calls"] == {"native": 0, "torch": calls["torch"] + 3 * 2}
    monkeypatch.setattr(selection, "measure_products", fixed_product_timing(native_ms=0.5))  # now the kernel wins
    model.to(torch.bfloat16)
    decode_logits(model, PROMPT)
    st = runtime.stats(model)["dense_products"]
    assert all("forward" in m.__dict__ for m in modules) and st["calls"]["native"] > calls["native"]
    assert {c["choice"] for c in st["choices"] if c["dtype"] == "bfloat16"} == {"native"}
    runtime.remove(model)
    assert not any("forward" in m.__dict__ for m in model.modules())


def test_remove_gives_every_module_back_and_the_head_stays_tied():
    model = tiny_model("llama")
    model.config.tie_word_embeddings = True
    model.tie_weights()
    keys = list(model.state_dict())
    runtime.apply(model, artifact(model))
    modules = dense_modules(model)
    assert all("forward" in m.__dict__ for m in modules)
    assert list(model.state_dict()) == keys  # nothing was wrapped or re-laid
    decode_logits(model, PROMPT)
    runtime.remove(model)
    assert not any("forward" in m.__dict__ for m in model.modules())
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert list(model.state_dict()) == keys


def test_autograd_and_foreign_forwards_are_left_to_torch():
    model = tiny_model("llama")
    head = model.get_output_embeddings()
    hooked = runtime.adapter_for(model).attention_parts(model)[0].owner.q_proj
    own = hooked.forward
    hooked.forward = lambda x: own(x)  # something else (an accelerate hook, say) replaced this forward
    runtime.apply(model, artifact(model))
    assert hooked.forward is not own and hooked.__dict__["forward"].__name__ == "<lambda>"
    x = torch.randn(1, 1, head.in_features, requires_grad=True)
    head(x).sum().backward()  # the compiled product has no gradient: torch's runs
    assert x.grad is not None
    with torch.no_grad():
        head(torch.randn(1, 1, head.in_features))
    st = runtime.stats(model)["dense_products"]
    runtime.remove(model)
    assert st["calls"] == {"native": 1, "torch": 1}
    assert hooked.__dict__["forward"].__name__ == "<lambda>"  # still the foreign one


def test_products_are_measured_once_per_machine_and_case(monkeypatch, tmp_path):
    cache = tmp_path / "sel.json"
    monkeypatch.setattr(selection, "_cache_file", lambda device: cache)
    measured = []

    def counting(weights, rows, clock=None, reps=None):
        measured.append((tuple(weights[0].shape), rows, len(weights)))
        return ProductTiming(rows, 1.0, 0.5)

    monkeypatch.setattr(selection, "measure_products", counting)
    model = tiny_model("llama")
    for _ in range(2):
        runtime.apply(model, artifact(model))
        decode_logits(model, PROMPT)
        choices = runtime.stats(model)["dense_products"]["choices"]
        runtime.remove(model)
    # tiny llama: q/o (32x32), k/v (16x32 with 2 kv heads or 32x32), head (VOCAB x 32); decoded at 2 rows
    shapes = {tuple(m.weight.shape) for m in dense_modules(model)}
    assert sorted(m[0] for m in measured) == sorted(shapes) and {m[1] for m in measured} == {2}
    assert all(n == sum(tuple(m.weight.shape) == s for m in dense_modules(model)) for s, _, n in measured)
    assert all("(cached)" in c["reason"] for c in choices)


def test_measure_products_times_both_candidates_alternately():
    """One clock tick per timed pass over the weights: each candidate's figure is a pass over its number of them."""
    ticks = iter(range(1000))
    weights = [torch.randn(24, 16) for _ in range(3)]
    timing = MEASURE_PRODUCTS(weights, 2, clock=lambda device: float(next(ticks)), reps=3)
    assert timing.rows == 2 and timing.torch == timing.native == pytest.approx(1e3 / 3)


def test_a_close_product_choice_is_measured_again_until_it_is_clear(monkeypatch, tmp_path):
    """The compiled product 6% faster than torch's (within TOLERANCE: torch) is a close call: the next choice measures
    again and keeps each candidate's fastest, which here makes the compiled one win clearly; then nothing more."""
    monkeypatch.setattr(selection, "_cache_file", lambda device: tmp_path / "sel.json")
    sittings = iter([ProductTiming(1, 1.0, 0.94), ProductTiming(1, 1.1, 0.6)])
    measured = []
    monkeypatch.setattr(selection, "measure_products", lambda weights, rows, *a, **k: measured.append(rows)
                        or next(sittings))
    weights = [torch.zeros(8, 8)]
    assert selection.choose_product(weights, 1).choice == "torch"
    second = selection.choose_product(weights, 1)
    assert second.choice == "native" and (second.timing.torch, second.timing.native, second.timing.sittings) == (1.0, 0.6, 2)
    assert selection.choose_product(weights, 1).timing.cached and len(measured) == 2
