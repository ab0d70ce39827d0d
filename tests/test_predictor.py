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
from clada.runtime import native
from clada.runtime.predictor import LowBitCopy, bytes_per_weight, packed, quantise, quantised, unpacked

from .conftest import make_artifact, run_recipe, tiny_job, tiny_model

PREDICTOR = {"name": "predictor", "bits": 4, "group": 32}


def predictor_artifact(model, tau_in=0.05, tau_mid=0.02, **rule):
    return dataclasses.replace(make_artifact(model, tau_in, tau_mid), rule={**PREDICTOR, **rule})


def test_quantised_copy_is_within_half_a_step_and_counts_its_scales():
    w = torch.randn(6, 64, generator=torch.Generator().manual_seed(0))
    for bits in (2, 4, 8):
        q = quantised(w, bits, 32)
        step = w.reshape(6, 2, 32).abs().amax(-1, keepdim=True) / (2 ** (bits - 1) - 1)
        assert ((q - w).reshape(6, 2, 32).abs() <= step / 2 * 1.001 + 1e-6).all()  # (scales rounded to float16)
        assert bytes_per_weight(bits, 32) == pytest.approx((bits + 0.5) / 8)
    assert len(set(quantised(w, 2, 32).reshape(6, 2, 32)[0, 0].tolist())) <= 4
    for group in (48, 0):
        with pytest.raises(ValueError, match=f"group {group} does not divide"):
            quantised(w, 4, group)
    with pytest.raises(ValueError, match="bits 1"):
        quantised(w, 1, 32)


def test_mse_scales_lower_each_group_s_error_in_the_same_codes_and_bytes():
    w = torch.randn(128, 256, generator=torch.Generator().manual_seed(1))
    absmax, mse = quantised(w, 4, 32, "absmax"), quantised(w, 4, 32, "mse")
    group_error = lambda q: ((q - w) ** 2).reshape(128, 8, 32).sum(-1)  # noqa: E731
    assert (group_error(mse) <= group_error(absmax) * (1 + 1e-6)).all()  # absmax's scale is one of the candidates
    assert group_error(mse).sum() < 0.9 * group_error(absmax).sum()  # ~19% less on Gaussian weights
    codes, scales = quantise(w, 4, 32, "mse")
    assert codes.dtype == torch.int8 and codes.min() >= -8 and codes.max() <= 7 and scales.dtype == torch.float16
    assert (codes == -8).any()  # the search uses the code the absmax scale leaves unused
    with pytest.raises(ValueError, match="scales 'best' is not one of absmax, mse"):
        quantise(w, 4, 32, "best")


def test_the_packed_copy_unpacks_to_its_codes_and_scales():
    pairs = [quantise(torch.randn(rows, 64, generator=torch.Generator().manual_seed(rows)), 4, 32, "mse")
             for rows in (128, 64)]
    codes, scales = unpacked(*packed(pairs, 4, 32), 32)
    assert torch.equal(codes, torch.cat([c for c, _ in pairs]))
    assert torch.equal(scales, torch.cat([s for _, s in pairs]))


def test_the_rule_s_scales_come_from_the_artifact_and_default_to_absmax():
    from clada.runtime.rules import build_rule

    model = tiny_model("llama")
    adapter = runtime.adapter_for(model)
    parts = adapter.mlp_parts(model)
    x = torch.randn(3, adapter.weight(getattr(parts[0].owner, parts[0].in_names[0])).shape[1])
    estimates = {}
    for rule, scales in (({}, "absmax"), ({"scales": "mse"}, "mse"), ({"scales": "absmax"}, "absmax")):
        built = build_rule(predictor_artifact(model, **rule))
        built.bind(adapter, parts)
        assert built.copy.scales == scales  # an artifact naming no scales was calibrated with absmax copies
        estimates[scales] = built.copy.estimate(0, x)
        torch.testing.assert_close(estimates[scales], LowBitCopy(adapter, parts, 4, 32, scales).estimate(0, x))
    assert not torch.equal(estimates["absmax"], estimates["mse"])
    with pytest.raises(ValueError, match="^artifact: predictor rule: scales 'round' is not one of absmax, mse"):
        build_rule(predictor_artifact(model, scales="round"))  # names where the artifact came from


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

    recipes = Path(__file__).resolve().parent.parent / "recipes"
    default = load_recipe(recipes / "smollm2-135m-threshold.yaml")
    assert pipeline.study_name(default) == "clada-2001cba6261c"  # the threshold study, stored before the setting
    predictor = dataclasses.replace(default, calibration=dataclasses.replace(default.calibration, rule="predictor"))
    assert load_recipe(recipes / "smollm2-135m.yaml").calibration.rule == "auto"  # the default recipe's: both rules
    model = tiny_model("llama")
    identity, fingerprint = runtime.model_identity(model), runtime.mlp_fingerprint(model)
    assert pipeline.study_name(predictor) != pipeline.study_name(default)
    assert (pipeline.measurement_key(predictor, identity, fingerprint, "abc")
            != pipeline.measurement_key(default, identity, fingerprint, "abc"))


def test_the_copy_s_scales_are_in_the_identity_of_predictor_studies_only(monkeypatch):
    from pathlib import Path

    from clada.calibrate import pipeline
    from clada.calibrate.recipe import load_recipe

    recipes = Path(__file__).resolve().parent.parent / "recipes"
    auto, threshold = (load_recipe(recipes / name) for name in ("smollm2-135m.yaml", "smollm2-135m-threshold.yaml"))
    auto = dataclasses.replace(auto, search=dataclasses.replace(auto.search, max_ppl_increase=0.012))
    model = tiny_model("llama")
    identity, fingerprint = runtime.model_identity(model), runtime.mlp_fingerprint(model)

    def identities():
        return [(pipeline.study_name(r), pipeline.measurement_key(r, identity, fingerprint, "abc"))
                for r in (auto, threshold)]

    monkeypatch.setattr(pipeline, "searched_rules", lambda measured: measured)  # studies from before the mixed rule
    mse = identities()
    monkeypatch.setattr(runtime, "PREDICTOR_SCALES", "absmax")
    absmax = identities()
    assert mse[1] == absmax[1]  # the threshold rule's studies and tables do not read the copy
    assert mse[0][0] != absmax[0][0] and mse[0][1] != absmax[0][1]  # tables of absmax copies are not reused
    assert absmax[0][0] == "clada-10e1ae7a2f29"  # with absmax: the auto study (budget 0.012) stored before the setting


def test_calibrating_with_the_predictor_rule_writes_a_predictor_artifact(tmp_path):
    recipe = tiny_job(tmp_path, trials=4)
    recipe["calibration"]["rule"] = "predictor"
    recipe["calibration"]["q_mid"] = [0.0, 0.3, 0.5]
    run_recipe(tmp_path, recipe)
    artifact = load_artifact(tmp_path / "out" / "clada.safetensors")
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert artifact.rule == {**PREDICTOR, "scales": runtime.PREDICTOR_SCALES}
    assert report["heldout"]["rule"] == "predictor"
    assert report["mlp_reads_saved"] > 0  # the tiny search budget allows skipping


# --- the native decode step (runtime.predictor_step) ---------------------------------------------------------------

def kernel_or_skip():
    kernel = native.gather_kernel()
    if kernel is None or not kernel.predictor_accepts(torch.float32):
        pytest.skip("no native kernel on this machine")  # CI machines have a C compiler: the kernel tests run there
    return kernel


@pytest.mark.parametrize("scales_rule", ["absmax", "mse"])
def test_the_4_bit_estimate_reads_the_packed_copy_of_the_kept_input_channels(scales_rule):
    from clada.runtime.predictor import dequantised, packed, quantise

    kernel = kernel_or_skip()
    torch.manual_seed(0)
    gate, up = torch.randn(128, 64), torch.randn(128, 64)
    pairs = [quantise(gate, scales=scales_rule), quantise(up, scales=scales_rule)]
    if scales_rule == "mse":
        assert any((c == -8).any() for c, _ in pairs)  # the kernel reads the code absmax leaves unused
    codes, scales = packed(pairs, 4, 32)
    assert codes.shape == (4, 64, 32) and codes.dtype == torch.uint8 and scales.shape == (4, 2, 64)
    x, weight = torch.randn(64), torch.rand(64)
    for threshold in (-1.0, 0.3, 10.0):
        keep = x.abs() * weight > threshold
        expected = torch.cat([dequantised(*p) @ (x * keep) for p in pairs])
        estimate, kept = kernel.q4_estimate(x, weight, threshold, codes, scales)
        assert kept == int(keep.sum())
        torch.testing.assert_close(estimate, expected, rtol=1e-5, atol=1e-4)
    assert packed(pairs, 3, 32) is None and packed([quantise(gate[:32])], 4, 32) is None


def predictor_model(intermediate: int = 128, scales: str = "absmax"):
    """A tiny llama whose predictor artifact (copy ``scales``) skips ~20% of the copy's input rows and ~40% of the
    neurons."""
    model = tiny_model("llama", intermediate_size=intermediate)
    adapter = runtime.adapter_for(model)
    copy = LowBitCopy(adapter, adapter.mlp_parts(model), scales=scales)
    seen = {}
    hooks = [p.owner.register_forward_pre_hook(lambda m, a, l=l: seen.__setitem__(l, a[0]))
             for l, p in enumerate(adapter.mlp_parts(model))]
    with torch.no_grad():
        model(torch.randint(3, 100, (2, 12)))
    for h in hooks:
        h.remove()
    weight_in, weight_mid = channel_weights(model, adapter, "wina")
    tau_in = torch.stack([(seen[l].abs() * weight_in[l]).quantile(0.2) for l in range(2)])
    tau_mid = torch.stack([(copy.estimate(l, seen[l]).abs() * weight_mid[l]).quantile(0.4) for l in range(2)])
    return model, predictor_artifact(model, tau_in, tau_mid, scales=scales)


def generate(model, artifact, backend, ids, new_tokens=8, check=None):
    """(scores, stats) of greedy decoding with ``artifact`` applied; ``check(model)`` runs while it is."""
    runtime.apply(model, artifact, backend=backend)
    try:
        out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, output_scores=True,
                             return_dict_in_generate=True)
        if check is not None:
            check(model)
        return torch.stack(out.scores), runtime.stats(model)
    finally:
        runtime.remove(model)


@pytest.mark.parametrize("dtype,scales", [(torch.float32, "absmax"), (torch.bfloat16, "absmax"),
                                          (torch.float32, "mse")])
def test_native_decode_steps_compute_the_rule_and_count_what_the_masked_reference_counts(dtype, scales):
    if not kernel_or_skip().predictor_accepts(dtype):
        pytest.skip(f"no native predictor step for {dtype} on this machine")
    model, artifact = predictor_model(scales=scales)
    model.to(dtype)
    ids = torch.randint(3, 100, (1, 12))
    reference, masked = generate(model, artifact, "masked", ids)
    scores, stats = generate(model, artifact, "native", ids)
    tolerance = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(scores.float(), reference.float(), rtol=tolerance, atol=tolerance)
    assert stats["path_calls"]["native"] == 2 * 7 and stats["path_calls"]["masked"] == 0  # 7 decode steps
    for key in ("mlp_reads_saved", "mlp_sparsity", "input_sparsity"):
        assert 0 < stats[key] == pytest.approx(masked[key], abs=0.02)
    # a weight that moved back to its original layout is restored by remove
    assert all(p.owner.down_proj.weight.is_contiguous() for p in runtime.adapter_for(model).mlp_parts(model))


def test_auto_times_its_first_decode_steps_and_keeps_the_faster_path(monkeypatch):
    from clada.runtime import predictor_step, selection

    kernel_or_skip()
    model, artifact = predictor_model()
    ids = torch.randint(3, 100, (1, 12))
    reference, masked = generate(model, artifact, "masked", ids, new_tokens=16)
    trial = 1 + 2 * predictor_step.TRIAL_STEPS  # decode steps before the decision (the first untimed)
    for step_ms, path in ((0.5, "native"), (2.0, "dense"), (0.95, "dense")):  # 0.95: within MARGIN, dense
        selection._cache_file(torch.device("cpu")).unlink(missing_ok=True)  # a machine that has timed nothing
        monkeypatch.setattr(predictor_step, "DECISIONS", {})
        monkeypatch.setattr(predictor_step, "timed",
                            lambda p, run, ms=step_ms: (run(), 1e-3 * (ms if p == "native" else 1.0)))
        def layout(model, path=path):  # down re-laid for the step if it stays, in its own layout if dense stays
            steps = model._clada_patch.mlp_steps
            assert all(w.weight.is_contiguous() == (path == "dense") for w in steps.downs)
            assert steps.down_copies == [None, None]  # the trial's copies of down are gone

        scores, stats = generate(model, artifact, "auto", ids, new_tokens=16, check=layout)
        # two layers per decode step, each timed
        assert stats["predictor_path"] == {"float32": {"path": path, "step_ms": 2 * step_ms, "dense_ms": 2.0,
                                                       "steps": predictor_step.TRIAL_STEPS, "sittings": 1}}
        native_steps = (trial + 1) // 2 + (15 - trial if path == "native" else 0)  # 15 decode steps
        assert stats["path_calls"]["native"] == 2 * native_steps
        assert stats["path_calls"]["dense"] == 2 * (15 - native_steps)
        assert 0 < stats["mlp_reads_saved"] < masked["mlp_reads_saved"]  # the dense steps skipped nothing
        # the prefill's token and the untimed first decode step (the rule's) are the masked reference's; the second
        # decode step, the trial's first dense one, is not
        torch.testing.assert_close(scores[:2], reference[:2], rtol=1e-4, atol=1e-4)
        assert not torch.allclose(scores[2], reference[2], rtol=1e-4, atol=1e-4)
        # applied again, the same artifact keeps the decision: every decode step takes the path at once
        _, again = generate(model, artifact, "auto", ids, new_tokens=16, check=layout)
        assert again["path_calls"]["native" if path == "native" else "dense"] == 2 * 15


def test_auto_decisions_are_cached_per_machine_and_close_calls_timed_again(monkeypatch):
    from clada.runtime import predictor_step, selection

    kernel_or_skip()
    model, artifact = predictor_model()
    ids = torch.randint(3, 100, (1, 12))  # (the machine's timing cache: conftest's, this test's own)

    def new_process(step_ms: float) -> dict:
        """A decode of 15 steps in a process that has decided nothing, the step timing ``step_ms`` per layer."""
        monkeypatch.setattr(predictor_step, "DECISIONS", {})
        monkeypatch.setattr(predictor_step, "timed",
                            lambda p, run: (run(), 1e-3 * (step_ms if p == "native" else 1.0)))
        reads = []
        monkeypatch.setattr(predictor_step, "load_cache", lambda device: reads.append(1) or selection.load_cache(device))
        stats = generate(model, artifact, "auto", ids, new_tokens=16)[1]
        assert len(reads) == 1  # the cache file is read once, at apply, not again at the first decode call
        return stats

    first = new_process(0.5)  # a clear win: timed once, then taken from the cache at once
    assert first["predictor_path"]["float32"]["sittings"] == 1 and first["path_calls"]["dense"] > 0
    again = new_process(5.0)  # would lose now, but the cached clear decision is not timed again
    assert again["predictor_path"]["float32"] == {**first["predictor_path"]["float32"], "cached": True}
    assert again["path_calls"]["native"] == 2 * 15 and again["path_calls"]["dense"] == 0

    cache = selection._cache_file(torch.device("cpu"))
    cache.unlink()
    close = [new_process(ms) for ms in (0.95, 0.9, 0.5, 0.5)]  # 0.95 ms: 1.03 of the edge, a close call
    sittings = [s["predictor_path"]["float32"] for s in close]
    assert [s["sittings"] for s in sittings[:3]] == [1, 2, 3] and sittings[3].get("cached")
    assert [s["path"] for s in sittings] == ["dense", "native", "native", "native"]  # 1.8 ms: 0.98 of the edge
    assert sittings[2]["step_ms"] == 2 * 0.5 and sittings[3]["step_ms"] == 2 * 0.5  # each path's fastest kept
    assert all(s["path_calls"]["dense"] >= 2 * predictor_step.TRIAL_STEPS for s in close[:3])  # timed each time
    assert close[3]["path_calls"]["dense"] == 0  # three sittings: settled


def test_auto_without_a_kernel_decodes_dense_and_says_so(monkeypatch):
    from clada.runtime import predictor_step

    monkeypatch.setattr(predictor_step, "gather_kernel", lambda: None)
    model, artifact = predictor_model()
    ids = torch.randint(3, 100, (1, 12))
    dense = model.generate(ids, max_new_tokens=6, do_sample=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        runtime.apply(model, artifact)
    assert any("no kernel computes the predictor rule" in str(w.message) for w in caught)
    out = model.generate(ids, max_new_tokens=6, do_sample=False)
    stats = runtime.stats(model)
    runtime.remove(model)
    assert torch.equal(out, dense)
    assert stats["mlp_reads_saved"] == 0 and stats["decode_steps"]["calls"] == 5
    assert stats["path_calls"]["masked"] == 0 and stats["path_calls"]["dense"] == 2 * 5


def test_a_predictor_artifact_with_a_layer_that_skips_nothing_saves_and_loads(tmp_path):
    from clada.artifacts import save_artifact

    model = tiny_model("llama")
    art = predictor_artifact(model)
    art.tau_base_mid[0] = -1.0  # the predictor tables' first column: the layer skips nothing and reads no copy
    save_artifact(art, tmp_path / "p.safetensors")
    assert float(load_artifact(tmp_path / "p.safetensors").tau_base_mid[0]) == -1.0
    threshold = dataclasses.replace(art, rule={"name": "threshold"})
    with pytest.raises(ArtifactError, match="tau_base_mid holds NaN, inf or negative"):
        save_artifact(threshold, tmp_path / "t.safetensors")
    assert not (tmp_path / "t.safetensors").exists()
