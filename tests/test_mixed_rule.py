"""The mixed rule (``runtime.rules.MixedRule``): the predictor on the layers an artifact names, the threshold rule
(compensation included) on the others; the masked reference, the native decode step, the byte count and the
artifact's parameter."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from clada import runtime
from clada.artifacts import load_artifact, save_artifact

from .conftest import make_artifact
from .test_predictor import generate, kernel_or_skip, predictor_model


def with_rule(artifact, predicted=None, compensated=True):
    """``artifact`` (a predictor artifact of ``predictor_model``) under the mixed rule deciding ``predicted`` layers
    by the copy (None: the predictor rule itself), the input side of the threshold layers compensated."""
    rule = dict(artifact.rule) if predicted is None else {**artifact.rule, "name": "mixed", "predicted": predicted}
    center_in = None
    if compensated and predicted is not None and not all(predicted):
        gen = torch.Generator().manual_seed(1)
        center_in = torch.randn(artifact.channel_weight_in.shape, generator=gen) * 0.05
        center_in[torch.tensor(predicted)] = 0.0  # a predicted layer has none
    return dataclasses.replace(artifact, rule=rule, center_in=center_in)


def run_once(model, artifact, ids):
    """(logits, stats) of one forward of ``ids`` at the base thresholds, masked reference."""
    runtime.apply(model, artifact, backend="masked")
    try:
        with torch.no_grad(), runtime.fixed_multiplier(model, 1.0):
            logits = model(ids).logits
        return logits, runtime.stats(model)
    finally:
        runtime.remove(model)


def test_mixed_rule_is_the_predictor_or_the_threshold_rule_on_each_layer():
    model, artifact = predictor_model()
    ids = torch.randint(3, 100, (1, 10))
    predictor = run_once(model, artifact, ids)
    all_predicted = run_once(model, with_rule(artifact, [True, True]), ids)
    torch.testing.assert_close(all_predicted[0], predictor[0], rtol=0, atol=0)
    assert all_predicted[1]["mlp_reads_saved"] == pytest.approx(predictor[1]["mlp_reads_saved"], abs=1e-9)

    none_predicted = with_rule(artifact, [False, False])
    threshold = dataclasses.replace(none_predicted, rule={"name": "threshold"})
    mixed, reference = run_once(model, none_predicted, ids), run_once(model, threshold, ids)
    torch.testing.assert_close(mixed[0], reference[0], rtol=0, atol=0)
    for key in ("mlp_reads_saved", "mlp_sparsity", "input_sparsity"):
        assert mixed[1][key] == pytest.approx(reference[1][key], abs=1e-9)
    assert mixed[1]["mlp_reads_saved"] != pytest.approx(predictor[1]["mlp_reads_saved"], abs=1e-3)

    # layer 0 by the threshold rule (same input as the threshold artifact's), layer 1 by the copy
    first = run_once(model, with_rule(artifact, [False, True]), ids)[1]["per_layer"]
    assert first["mlp_reads_saved"][0] == pytest.approx(reference[1]["per_layer"]["mlp_reads_saved"][0], abs=1e-9)
    assert first["input_sparsity"][0] == pytest.approx(reference[1]["per_layer"]["input_sparsity"][0], abs=1e-9)
    # the predicted layer: a skipped neuron also saves its gate and up rows, the copy's rows read count against it
    assert first["mlp_reads_saved"][1] > first["mlp_sparsity"][1] * 1 / 3


def test_mixed_rule_copies_only_the_predicted_layers():
    model, artifact = predictor_model()
    runtime.apply(model, with_rule(artifact, [False, True]), backend="masked")
    try:
        rule = model._clada_patch.state.rule
        copy = rule.copy
        assert copy.packed[0] is None and copy.unpackable[0] is None
        assert copy.packed[1] is not None or copy.unpackable[1] is not None
        assert rule.reads_copy() == [False, True]
    finally:
        runtime.remove(model)


@pytest.mark.parametrize("predicted", [[False, True], [True, False]])
def test_native_decode_steps_of_the_mixed_rule_match_the_masked_reference(predicted):
    kernel_or_skip()
    model, artifact = predictor_model()
    mixed = with_rule(artifact, predicted)
    ids = torch.randint(3, 100, (1, 12))
    reference, masked = generate(model, mixed, "masked", ids)
    scores, stats = generate(model, mixed, "native", ids)
    torch.testing.assert_close(scores, reference, rtol=1e-4, atol=1e-4)
    # 7 decode steps: the predicted layer one native call each, the threshold layer one per side
    assert stats["path_calls"]["native"] == 3 * 7 and stats["path_calls"]["masked"] == 0
    for key in ("mlp_reads_saved", "mlp_sparsity", "input_sparsity"):
        assert 0 < stats[key] == pytest.approx(masked[key], abs=0.02)
    # remove gives every projection its original layout back
    for part in runtime.adapter_for(model).mlp_parts(model):
        assert all(m.weight.is_contiguous() for m in part.projections())


def test_mixed_rule_refuses_a_bad_layer_list_in_one_line_naming_the_file(tmp_path):
    model, artifact = predictor_model()
    for bad in ([True], [1, 0], "all", None):
        rule = {**artifact.rule, "name": "mixed", **({} if bad is None else {"predicted": bad})}
        path = tmp_path / "bad.safetensors"
        save_artifact(dataclasses.replace(artifact, rule=rule), path)
        with pytest.raises(ValueError, match=r"bad\.safetensors: mixed rule: 'predicted' must list 2 booleans"):
            runtime.apply(model, path)
        assert not runtime.is_patched(model)


def test_a_mixed_artifact_saves_and_loads_its_layers_and_negative_thresholds(tmp_path):
    model, artifact = predictor_model()
    mixed = with_rule(dataclasses.replace(artifact, tau_base_mid=torch.tensor([0.02, -1.0])), [False, True])
    save_artifact(mixed, tmp_path / "m.safetensors")
    back = load_artifact(tmp_path / "m.safetensors")
    assert back.rule == mixed.rule and back.rule["predicted"] == [False, True]
    assert torch.equal(back.center_in, mixed.center_in) and float(back.tau_base_mid[1]) == -1.0
    threshold = dataclasses.replace(mixed, rule={"name": "threshold"})
    with pytest.raises(Exception, match="tau_base_mid"):  # a negative threshold means something to these rules only
        save_artifact(threshold, tmp_path / "t.safetensors")
    assert make_artifact(model).rule == {"name": "threshold"}


@pytest.mark.parametrize("command", ["eval", "bench"])
def test_the_cli_refuses_a_bad_rule_parameter_in_one_line_before_the_model_loads(command, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from clada.calibrate import models
    from clada.calibrate.cli import main

    _, artifact = predictor_model()
    path = tmp_path / "bad.safetensors"
    save_artifact(dataclasses.replace(artifact, rule={**artifact.rule, "name": "mixed", "predicted": [True]}), path)
    (tmp_path / "docs.txt").write_text("one two three four five six seven eight nine ten\n\n" * 4)

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(models, "load_model", no_model)
    result = CliRunner().invoke(main, [command, "--model", "smollm2-135m", "--artifact", str(path), "--data",
                                       str(tmp_path / "docs.txt")])
    assert result.exit_code == 2 and result.output.count("\n") == 1, result.output
    assert f"{path}: mixed rule: 'predicted' must list 2 booleans" in result.output


@pytest.mark.parametrize("path", ["native", "dense"])
def test_auto_lays_the_threshold_layers_rows_for_the_step_and_back_when_dense_stays(path, monkeypatch):
    from clada.runtime import predictor_step, selection

    kernel_or_skip()
    model, artifact = predictor_model()
    mixed = with_rule(artifact, [False, True])
    selection._cache_file(torch.device("cpu")).unlink(missing_ok=True)
    monkeypatch.setattr(predictor_step, "DECISIONS", {})
    step_ms = 0.5 if path == "native" else 2.0
    monkeypatch.setattr(predictor_step, "timed", lambda p, run: (run(), 1e-3 * (step_ms if p == "native" else 1.0)))

    def layout(model):
        steps = model._clada_patch.mlp_steps
        gate, up = steps.inputs[0]
        assert (steps.input_rows[0] is not None) == (path == "native")
        assert gate.weight.is_contiguous() == up.weight.is_contiguous() == (path == "dense")
        assert steps.input_rows[1] is None  # the predicted layer keeps gate and up as the model holds them

    ids = torch.randint(3, 100, (1, 12))
    _, stats = generate(model, mixed, "auto", ids, new_tokens=16, check=layout)
    assert stats["predictor_path"]["float32"]["path"] == path
    assert stats["path_calls"]["masked"] == 0 and stats["mlp_reads_saved"] > 0  # (the trial's native steps skip)
