"""The predictor rule: neurons chosen from a low-bit copy of gate and up (runtime.predictor, rules.PredictorRule),
its byte count, its decoding under backend="auto", and its calibration (calibration.rule: predictor)."""

from __future__ import annotations

import dataclasses
import json
import warnings

import pytest
import torch

from clada import runtime
from clada.artifacts import ArtifactError, load_artifact
from clada.calibrate.measure import PredictorErrorModel, channel_weights, predictor_tables
from clada.calibrate.recipe import RecipeError, parse_recipe
from clada.runtime.predictor import LowBitCopy, bytes_per_weight, quantised

from .conftest import make_artifact, run_recipe, tiny_job, tiny_model

PREDICTOR = {"name": "predictor", "bits": 4, "group": 32}


def predictor_artifact(model, tau_in=0.05, tau_mid=0.02, **rule):
    return dataclasses.replace(make_artifact(model, tau_in, tau_mid), rule={**PREDICTOR, **rule})


def test_quantised_copy_has_at_most_2_to_the_bits_levels_per_group_and_a_small_error():
    w = torch.randn(8, 64)
    q = quantised(w, 4, 32)
    for row in q.reshape(8, 2, 32).reshape(16, 32):
        assert row.unique().numel() <= 16
    assert (q - w).abs().max() <= w.abs().max() / 7 / 2 * 1.01  # at most half a step of absmax / 7
    assert bytes_per_weight(4, 32) == pytest.approx(0.5625)
    with pytest.raises(ValueError, match="does not divide"):
        quantised(w, 4, 48)
    with pytest.raises(ValueError, match="bits 1"):
        quantised(w, 1, 32)


def test_predictor_keeps_the_neurons_its_estimate_scores_above_tau_and_gate_and_up_see_the_whole_input():
    model = tiny_model("llama")
    adapter = runtime.adapter_for(model)
    parts = adapter.mlp_parts(model)
    copy = LowBitCopy(adapter, parts)
    ids = torch.randint(3, 100, (2, 10))
    seen = {}  # layer -> (MLP input, down's input) of the patched model's call
    for layer, part in enumerate(parts):
        part.owner.register_forward_pre_hook(lambda m, a, layer=layer: seen.__setitem__(layer, [a[0]]))
    with torch.no_grad():
        model(ids)
    weight_in, weight_mid = channel_weights(model, adapter, "wina")
    tau_in = torch.stack([(seen[l][0].abs() * weight_in[l]).quantile(0.2) for l in range(2)])
    tau_mid = torch.stack([(copy.estimate(l, seen[l][0]).abs() * weight_mid[l]).quantile(0.4) for l in range(2)])
    artifact = predictor_artifact(model, tau_in, tau_mid)
    runtime.apply(model, artifact, backend="masked")
    for layer, part in enumerate(parts):
        getattr(part.owner, part.out_name).inner.register_forward_pre_hook(  # down's input, after the mask
            lambda m, a, layer=layer: seen[layer].append(a[0]))
    with torch.no_grad(), runtime.fixed_multiplier(model, 1.0):
        model(ids)
    stats = runtime.stats(model)
    runtime.remove(model)
    skipped_in, skipped_mid = [], []
    for layer, part in enumerate(parts):
        x, h = seen[layer]
        keep_in = x.abs() * weight_in[layer] > artifact.tau_base_in[layer]
        keep = copy.estimate(layer, x * keep_in).abs() * weight_mid[layer] > artifact.tau_base_mid[layer]
        exact = adapter.intermediate(part, x)  # from the whole input: the copy's mask does not reach gate and up
        torch.testing.assert_close(h, exact * keep)
        assert 0 < keep.float().mean() < 1
        skipped_in.append(1 - keep_in.float().mean().item())
        skipped_mid.append(1 - keep.float().mean().item())
    assert stats["rule"] == "predictor"
    assert stats["input_sparsity"] == pytest.approx(sum(skipped_in) / 2, abs=1e-6)
    assert stats["mlp_sparsity"] == pytest.approx(sum(skipped_mid) / 2, abs=1e-6)
    # a skipped neuron saves its gate row, up row and down column; the copy's rows of kept input channels are read
    share = bytes_per_weight() / 4 * 2 / 3  # the copy of gate and up over the MLP's float32 bytes
    expected = sum(m - share * (1 - i) for i, m in zip(skipped_in, skipped_mid)) / 2
    assert stats["mlp_reads_saved"] == pytest.approx(expected, abs=1e-6)


def test_a_layer_with_a_negative_tau_mid_skips_nothing_and_reads_no_copy():
    model = tiny_model("llama")
    artifact = predictor_artifact(model, tau_mid=torch.tensor([-1.0, 0.02]))
    ids = torch.randint(3, 100, (1, 8))
    runtime.apply(model, artifact, backend="masked")
    with torch.no_grad(), runtime.fixed_multiplier(model, 1.0):
        model(ids)
    per_layer = runtime.stats(model)["per_layer"]
    runtime.remove(model)
    assert per_layer["mlp_sparsity"][0] == 0 and per_layer["input_sparsity"][0] == 0
    assert per_layer["mlp_reads_saved"][0] == 0
    assert per_layer["mlp_sparsity"][1] > 0


def test_auto_decodes_dense_says_so_and_counts_nothing_saved():
    model = tiny_model("llama")
    ids = torch.randint(3, 100, (1, 8))
    dense = model.generate(ids, max_new_tokens=6, do_sample=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        runtime.apply(model, predictor_artifact(model))
    assert any("predictor rule has no kernel" in str(w.message) for w in caught)
    out = model.generate(ids, max_new_tokens=6, do_sample=False)
    stats = runtime.stats(model)
    runtime.remove(model)
    assert torch.equal(out, dense)
    assert stats["mlp_reads_saved"] == 0 and stats["decode_steps"]["calls"] > 0
    assert stats["path_calls"]["masked"] == 0 and stats["path_calls"]["dense"] > 0


def test_predictor_needs_separate_gate_and_up():
    model = tiny_model("gpt2")
    with pytest.raises(ArtifactError, match="needs a gated MLP"):
        runtime.apply(model, predictor_artifact(model), backend="masked")
    assert not runtime.is_patched(model)


def test_predictor_table_counts_the_copy_and_its_first_column_reads_none():
    model = tiny_model("llama")
    adapter = runtime.adapter_for(model)
    parts = adapter.mlp_parts(model)
    weight_in, weight_mid = channel_weights(model, adapter, "wina")
    x = torch.randn(64, 32)
    tables = predictor_tables(model, adapter, [x, x], weight_in, weight_mid, torch.tensor([0.0, 0.3]),
                              torch.tensor([0.0, 0.5]), progress=False)
    table = tables[0]
    assert table.tau_mid[:, 0].tolist() == [-1.0, -1.0] and table.saved[:, 0].tolist() == [0.0, 0.0]
    assert table.error[:, 0].tolist() == [0.0, 0.0]
    share = bytes_per_weight() / 4 * 2 / 3
    model_ = PredictorErrorModel(adapter, parts[0], 0, LowBitCopy(adapter, parts), x, weight_in[0], weight_mid[0])
    skip_in = float(model_._input_side(0.3)[1])
    # half the neurons skipped (the 0.5 quantile), less the copy's rows of the kept input channels
    assert float(table.saved[1, 1]) == pytest.approx(0.5 - share * (1 - skip_in), abs=0.02)
    assert float(table.saved[1, 1]) > float(table.saved[0, 1])  # reading fewer rows of the copy saves more
    assert float(table.error[1, 1]) > 0


def test_predictor_recipe_refuses_what_the_rule_has_not():
    assert parse_recipe({"calibration": {"rule": "predictor"}}).calibration.rule == "predictor"
    with pytest.raises(RecipeError, match="'calibration.rule'"):
        parse_recipe({"calibration": {"rule": "oracle"}})
    with pytest.raises(RecipeError, match="'calibration.attention_sparsity'"):
        parse_recipe({"calibration": {"rule": "predictor", "attention_sparsity": 0.2}})
    with pytest.raises(RecipeError, match="'search.prefix'"):
        parse_recipe({"calibration": {"rule": "predictor"}, "search": {"prefix": True}})


def test_the_threshold_rule_keeps_the_identity_of_recipes_from_before_the_setting():
    from pathlib import Path

    from clada.calibrate import pipeline
    from clada.calibrate.recipe import load_recipe

    default = load_recipe(Path(__file__).resolve().parent.parent / "recipes" / "smollm2-135m.yaml")
    assert pipeline.study_name(default) == "clada-2001cba6261c"  # the default study, stored before the setting
    predictor = dataclasses.replace(default, calibration=dataclasses.replace(default.calibration, rule="predictor"))
    model = tiny_model("llama")
    identity, fingerprint = runtime.model_identity(model), runtime.mlp_fingerprint(model)
    assert pipeline.study_name(predictor) != pipeline.study_name(default)
    assert (pipeline.measurement_key(predictor, identity, fingerprint, "abc")
            != pipeline.measurement_key(default, identity, fingerprint, "abc"))


def test_calibrating_with_the_predictor_rule_writes_a_predictor_artifact(tmp_path):
    recipe = tiny_job(tmp_path, trials=4)
    recipe["calibration"]["rule"] = "predictor"
    recipe["calibration"]["q_mid"] = [0.0, 0.3, 0.5]
    run_recipe(tmp_path, recipe)
    artifact = load_artifact(tmp_path / "out" / "clada.safetensors")
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert artifact.rule == PREDICTOR
    assert report["heldout"]["rule"] == "predictor"
    assert report["mlp_reads_saved"] > 0  # the tiny search budget allows skipping
