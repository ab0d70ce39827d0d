"""A gated MLP's decode step (runtime/mlp_step.py): the same outputs as the projections' wrappers, bitwise, and
the wrappers' own path wherever the step cannot stand in."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from clada import runtime
from clada.runtime import native
from clada.runtime.backends import BACKENDS
from clada.runtime.sparse import GatedProjection
from tests.conftest import make_artifact, tiny_model

GATHERING = [name for name, b in BACKENDS.items() if b.gathers and b.accepts(torch.device("cpu"), torch.float32, 2)]
PROMPT = torch.randint(4, 100, (2, 8), generator=torch.Generator().manual_seed(3))


def relaxed_centred_artifact(model):
    """Thresholds skipping a good share of both sides, a relaxation on surprising tokens, centers on layer 0."""
    art = make_artifact(model, tau_in=0.05, tau_mid=0.02, lam=-0.5, tau_s=0.5)
    gen = torch.Generator().manual_seed(0)
    center_in, center_mid = torch.zeros_like(art.channel_weight_in), torch.zeros_like(art.channel_weight_mid)
    center_in[0] = torch.randn(center_in.shape[1], generator=gen) * 0.3
    center_mid[0] = torch.randn(center_mid.shape[1], generator=gen) * 0.05
    return dataclasses.replace(art, center_in=center_in, center_mid=center_mid)


def owners(model):
    return [p.owner for p in runtime.adapter_for(model).mlp_parts(model)]


def decode(model, new_tokens=6):
    """The greedy tokens and every step's scores (the decode steps' logits)."""
    with torch.no_grad():
        out = model.generate(PROMPT, attention_mask=torch.ones_like(PROMPT), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, output_scores=True,
                             return_dict_in_generate=True)
    return out.sequences, torch.stack(out.scores)


class SparseWrapperCalls:
    """Counts the wrappers' forwards during sparse calls (threshold multiplier set)."""

    def __init__(self, monkeypatch, model):
        self.count = 0
        inner = GatedProjection.forward

        def counted(wrapper, x):
            if runtime.multiplier(model) is not None:
                self.count += 1
            return inner(wrapper, x)
        monkeypatch.setattr(GatedProjection, "forward", counted)


def without_steps(model, fn):
    """``fn()`` with every MLP's own forward (the wrappers' path), the steps put back afterwards."""
    steps = {o: o.__dict__.pop("forward") for o in owners(model)}
    try:
        return fn()
    finally:
        for o, f in steps.items():
            o.forward = f


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "granite"])
@pytest.mark.parametrize("backend", GATHERING)
def test_step_decodes_bitwise_as_the_wrappers_and_skips_them(monkeypatch, family, backend):
    model = tiny_model(family)
    runtime.apply(model, relaxed_centred_artifact(model), backend=backend)
    assert all("forward" in o.__dict__ for o in owners(model))
    calls = SparseWrapperCalls(monkeypatch, model)
    tokens, scores = decode(model)
    stats = runtime.stats(model)
    assert calls.count == 0  # every sparse MLP call ran as the step
    runtime.reset_stats(model)
    want_tokens, want_scores = without_steps(model, lambda: decode(model))
    assert calls.count > 0
    assert torch.equal(tokens, want_tokens) and torch.equal(scores, want_scores)
    again = runtime.stats(model)
    for key in ("mlp_reads_saved", "path_calls", "relaxed_share"):
        assert stats[key] == again[key], key
    assert stats["mlp_reads_saved"] > 0.05
    runtime.remove(model)
    assert not any("forward" in o.__dict__ for o in owners(model))


def test_a_hook_on_a_projection_sees_the_decode_calls():
    """A forward hook on an MLP module sends its calls through the wrappers, so the hook sees them."""
    model = tiny_model("llama")
    runtime.apply(model, make_artifact(model, tau_in=0.05, tau_mid=0.02), backend=GATHERING[0])
    want = decode(model)[1]
    seen = []
    down = owners(model)[1].down_proj
    handle = down.register_forward_pre_hook(lambda m, args: seen.append(runtime.multiplier(model) is not None))
    got = decode(model)[1]
    handle.remove()
    assert any(seen) and torch.equal(got, want)


@pytest.mark.skipif(native.gather_kernel() is None or torch.bfloat16 not in native.gather_kernel().dtypes,
                    reason="no compiled bfloat16 kernel here")
def test_step_follows_a_change_of_the_weights_dtype(monkeypatch):
    """The step's rows are found again after ``model.to(dtype)`` (``auto`` lays the weights out again for the new
    dtype): the bfloat16 steps equal the wrappers' bitwise."""
    model = tiny_model("llama")
    runtime.apply(model, relaxed_centred_artifact(model))
    decode(model)
    model.to(torch.bfloat16)
    calls = SparseWrapperCalls(monkeypatch, model)
    got = decode(model)
    assert calls.count == 0 and runtime.stats(model)["mlp_reads_saved"] > 0.05
    want = without_steps(model, lambda: decode(model))
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_new_thresholds_take_effect_under_one_fixed_multiplier():
    """The step's thresholds, computed once per step for every layer, follow ``set_thresholds`` even when the
    multiplier object stays the same (``fixed_multiplier``)."""
    model = tiny_model("llama")
    art = make_artifact(model, tau_in=0.05, tau_mid=0.02)
    runtime.apply(model, art, backend=GATHERING[0])
    ids = PROMPT[:, :1]
    with torch.no_grad(), runtime.fixed_multiplier(model, 1.0):
        before = model(ids).logits
        runtime.set_thresholds(model, art.tau_base_in * 0, art.tau_base_mid * 0)
        after = model(ids).logits
    runtime.remove(model)
    with torch.no_grad():
        dense = model(ids).logits
    assert not torch.equal(before, after)
    torch.testing.assert_close(after, dense, rtol=1e-5, atol=1e-5)
