"""benchmarks/probe_token_scale.py: which token each signal belongs to, and the error ratios it reports."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from clada import runtime
from clada.calibrate.measure import channel_weights, collect_mlp_inputs, output_gradients

from .conftest import load_script, tiny_model


@pytest.fixture(scope="module")
def probe():
    return load_script("probe_token_scale")


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


def test_figures_belong_to_their_position(probe, model):
    ids = torch.randint(3, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    f = probe.next_token_figures(model, ids)
    assert all(v.shape == ids.shape for v in f.values())
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits.float(), -1)
    norm = math.log(model.config.vocab_size)
    t = 5
    assert f["entropy"][1, t] == pytest.approx(float(-(logp[1, t].exp() * logp[1, t]).sum() / norm), rel=1e-5)
    assert f["surprisal"][1, t] == pytest.approx(float(-logp[1, t - 1, ids[1, t]] / norm), rel=1e-5)
    assert f["impurity"][0, t] == pytest.approx(float(1 - logp[0, t].exp().pow(2).sum()), rel=1e-5)
    assert (f["surprisal"][:, 0] == 0).all()


def test_signals_follow_the_rows_of_the_mlp_inputs(probe, model):
    g = torch.Generator().manual_seed(1)
    ids = lambda n: torch.randint(3, model.config.vocab_size, (n, 12), generator=g)
    splits = SimpleNamespace(act=ids(3), search=ids(2), validation=ids(2))
    prompt, rows = 4, 20  # 8 scored positions per document: two whole documents and half of the third
    s = probe.token_signals(model, splits, prompt, rows)
    assert all(v.shape == (rows,) for v in s.values())
    full = probe.next_token_figures(model, splits.act)
    assert torch.equal(s["entropy now"][8:16], full["entropy"][1, prompt:])
    assert torch.equal(s["entropy before"][8:16], full["entropy"][1, prompt - 1 : -1])  # p_{t-1}: one step late
    assert torch.equal(s["surprisal"][16:], full["surprisal"][2, prompt : prompt + 4])


def test_a_signal_that_scales_every_token_alike_changes_nothing(probe, model):
    adapter = runtime.adapter_for(model)
    tokens = torch.randint(3, model.config.vocab_size, (4, 14), generator=torch.Generator().manual_seed(2))
    x = collect_mlp_inputs(model, adapter, tokens, 6, 32)[0]
    grads = output_gradients(model, adapter, tokens, 6, 32, 2, progress=False)[0]
    w_in, w_mid = channel_weights(model, adapter, "wina")
    part = adapter.mlp_parts(model)[0]
    same = {"flat": torch.full((x.shape[0],), 3.0), "varying": torch.linspace(0.1, 5.0, x.shape[0])}
    errors = probe.layer_errors(adapter, part, x.float(), grads, w_in[0], w_mid[0], same)
    for side, shares in probe.SKIPPED.items():
        for share in shares:
            cell = errors[side][str(share)]
            assert cell["plain"] > 0
            assert all(cell[f"flat ^{beta}"] == pytest.approx(1.0) for beta in probe.BETAS)
            assert any(cell[f"varying ^{beta}"] != pytest.approx(1.0) for beta in probe.BETAS)
