"""Compensation (artifact ``center_in``/``center_mid``): scores |x - c|·w, skipped channels standing for c.

Every backend computes the formula, zero centers are no compensation, the artifact carries them (format 4), and
the calibration's tables and allocation choose them per layer."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from clada import runtime
from clada.artifacts import ArtifactError, load_artifact, save_artifact
from clada.calibrate.measure import LayerErrorModel, LayerTable, allocate, build_tables, input_centers
from clada.calibrate.pipeline import point_artifact
from clada.calibrate.search import Point
from clada.runtime.backends import BACKENDS
from tests.conftest import make_artifact, tiny_model

GATHERING = [name for name, b in BACKENDS.items() if b.gathers and b.accepts(torch.device("cpu"), torch.float32, 2)]


def centred_artifact(model, seed: int = 0):
    """Thresholds that skip a good share of both sides, and centers on layer 0 (both sides) and layer 1 (input)."""
    art = make_artifact(model, tau_in=0.05, tau_mid=0.02)
    gen = torch.Generator().manual_seed(seed)
    center_in = torch.zeros_like(art.channel_weight_in)
    center_mid = torch.zeros_like(art.channel_weight_mid)
    center_in[:2] = torch.randn(2, center_in.shape[1], generator=gen) * 0.3
    center_mid[0] = torch.randn(center_mid.shape[1], generator=gen) * 0.05
    return dataclasses.replace(art, center_in=center_in, center_mid=center_mid)


def formula(mlp, art, layer: int, x: torch.Tensor) -> torch.Tensor:
    """The compensated MLP output written out: y = down(h'), h' = where(|h - c_mid|·w > tau, h, c_mid), h from
    x' = where(|x - c_in|·w > tau, x, c_in)."""
    c_in, c_mid = art.center_in[layer], art.center_mid[layer]
    keep_in = (x - c_in).abs() * art.channel_weight_in[layer] > art.tau_base_in[layer]
    xs = torch.where(keep_in, x, c_in)
    h = torch.nn.functional.silu(mlp.gate_proj.inner(xs)) * mlp.up_proj.inner(xs)
    keep_mid = (h - c_mid).abs() * art.channel_weight_mid[layer] > art.tau_base_mid[layer]
    return mlp.down_proj.inner(torch.where(keep_mid, h, c_mid))


@pytest.mark.parametrize("backend", ["masked", *GATHERING])
def test_every_backend_computes_the_compensated_formula(backend):
    model = tiny_model("llama")
    art = centred_artifact(model)
    runtime.apply(model, art, backend=backend)
    x = torch.randn(2, 1, model.config.hidden_size, generator=torch.Generator().manual_seed(3))
    for layer in range(2):
        mlp = model.model.layers[layer].mlp
        with torch.no_grad(), runtime.fixed_multiplier(model, 1.0):
            got = mlp(x)
        want = formula(mlp, art, layer, x)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    stats = runtime.stats(model)
    runtime.remove(model)
    assert stats["path_calls"][backend] > 0
    assert 0.05 < stats["per_layer"]["input_sparsity"][0] < 0.95  # the formula skipped channels: not vacuous


def test_compensation_changes_what_is_skipped_and_zero_centers_change_nothing():
    model = tiny_model("llama")
    prompt = torch.randint(4, 100, (2, 8), generator=torch.Generator().manual_seed(1))

    def tokens(art):
        runtime.apply(model, art, backend="masked")
        with torch.no_grad():
            out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=10,
                                 min_new_tokens=10, do_sample=False, pad_token_id=0)
        stats = runtime.stats(model)
        runtime.remove(model)
        return out, stats["per_layer"]["input_sparsity"]

    plain = make_artifact(model, tau_in=0.05, tau_mid=0.02)
    zero = dataclasses.replace(plain, center_in=torch.zeros_like(plain.channel_weight_in),
                               center_mid=torch.zeros_like(plain.channel_weight_mid))
    base, base_sparsity = tokens(plain)
    same, same_sparsity = tokens(zero)
    assert torch.equal(base, same) and same_sparsity == base_sparsity
    _, centred_sparsity = tokens(centred_artifact(model))
    assert centred_sparsity[0] != base_sparsity[0]  # layer 0 scores |x - c|


def test_centers_round_trip_in_format_4_and_plain_artifacts_stay_format_3(tmp_path):
    model = tiny_model("llama")
    art = centred_artifact(model)
    save_artifact(art, tmp_path / "c.safetensors")
    back = load_artifact(tmp_path / "c.safetensors")
    assert torch.equal(back.center_in, art.center_in) and torch.equal(back.center_mid, art.center_mid)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "c.safetensors"), "pt") as fh:
        assert fh.metadata()["format_version"] == "4"
    save_artifact(make_artifact(model), tmp_path / "p.safetensors")
    with safe_open(str(tmp_path / "p.safetensors"), "pt") as fh:
        assert fh.metadata()["format_version"] == "3" and "center_in" not in fh.keys()
    assert load_artifact(tmp_path / "p.safetensors").center_in is None
    bad = dataclasses.replace(art, center_in=art.center_in[:, :-1])
    with pytest.raises(ArtifactError, match="center_in"):
        save_artifact(bad, tmp_path / "bad.safetensors")
    assert not (tmp_path / "bad.safetensors").exists()


def test_tables_hold_compensated_rows_and_allocation_picks_them_per_layer():
    model = tiny_model("llama")
    adapter = runtime.adapter_for(model)
    parts = adapter.mlp_parts(model)
    gen = torch.Generator().manual_seed(0)
    d = model.config.hidden_size
    offset = torch.zeros(d)
    offset[:4] = 3.0  # channels far from 0: compensation should pay there
    inputs = [torch.randn(256, d, generator=gen) + offset for _ in parts]
    w_in, w_mid = torch.ones(len(parts), d), torch.ones(len(parts), model.config.intermediate_size)
    q_in, q_mid = torch.tensor([0.0, 0.3, 0.6]), torch.tensor([0.0, 0.3])
    centers = input_centers(inputs)
    assert torch.allclose(centers[0], inputs[0].mean(0))
    tables = build_tables(model, adapter, inputs, w_in, w_mid, q_in, q_mid, progress=False, centers=centers)
    assert tables[0].centred.tolist() == [False] * 3 + [True] * 3
    plain = LayerErrorModel(adapter, parts[0], inputs[0], w_in[0], w_mid[0]).table(q_in, q_mid)
    zero = LayerErrorModel(adapter, parts[0], inputs[0], w_in[0], w_mid[0], center_in=torch.zeros(d)).table(q_in, q_mid)
    assert torch.equal(plain.error, tables[0].error[:3]) and torch.allclose(zero.error, plain.error)
    # The compensated rows err less at equal input quantile on the shifted channels...
    assert (tables[0].error[4:, 0] < tables[0].error[1:3, 0]).all()
    # ...so a budget allocation that can afford q_in 0.3 in either kind takes the compensated one.
    budget = float(tables[0].error[1, 0]) * 0.999
    _, _, centred = allocate(tables, torch.full((len(parts),), budget))
    assert centred[0]
    # A hand-made table where the plain rows are better: the allocation keeps the layer plain.
    swapped = LayerTable(tables[0].tau_in, tables[0].tau_mid, tables[0].error, tables[0].saved,
                         ~tables[0].centred)
    _, _, centred = allocate([swapped], torch.tensor([budget]))
    assert not centred[0]


def test_point_artifact_carries_centers_of_the_compensated_layers_only():
    model = tiny_model("llama")
    art = make_artifact(model)
    L, d = art.channel_weight_in.shape
    centers = torch.randn(L, d)
    point = Point(params={}, tau_in=[0.1] * L, tau_mid=[0.1] * L, lam=0.0, gam=0.0, tau_s=1.0, tau_H=1.0,
                  centred=[True] + [False] * (L - 1))
    made = point_artifact(point, art.channel_weight_in, art.channel_weight_mid, art.fingerprint, centers)
    assert torch.equal(made.center_in[0], centers[0]) and not made.center_in[1:].any()
    plain = point_artifact(dataclasses.replace(point, centred=[False] * L), art.channel_weight_in,
                           art.channel_weight_mid, art.fingerprint, centers)
    assert plain.center_in is None


def test_a_center_is_cast_once_per_activation_dtype_and_follows_the_device():
    from clada.runtime.rules import build_rule
    art = centred_artifact(tiny_model("llama"))
    rule = build_rule(art)
    assert rule.center(0, "in").dtype == torch.float32 and rule.center(1, "mid", torch.bfloat16) is None
    half = rule.center(0, "in", torch.bfloat16)
    assert half.dtype == torch.bfloat16 and rule.center(0, "in", torch.bfloat16) is half  # kept, not cast per call
    torch.testing.assert_close(half.float(), art.center_in[0], rtol=1e-2, atol=1e-3)
    rule.to(torch.device("cpu"))
    assert rule.center(0, "in", torch.bfloat16) is not half  # a move drops the casts of the old storage


def test_bfloat16_activations_use_the_compensated_formula():
    model = tiny_model("llama").to(torch.bfloat16)
    art = centred_artifact(model)
    runtime.apply(model, art, backend="masked")
    x = torch.randn(2, 1, model.config.hidden_size, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    mlp = model.model.layers[0].mlp
    with torch.no_grad(), runtime.fixed_multiplier(model, 1.0):
        got = mlp(x)
    bf16 = dataclasses.replace(art, center_in=art.center_in.bfloat16(), center_mid=art.center_mid.bfloat16())
    with torch.no_grad():
        want = formula(mlp, bf16, 0, x)
    runtime.remove(model)
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
