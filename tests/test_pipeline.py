"""The calibration job end to end on a tiny local model and text file, through the CLI."""

from __future__ import annotations

import json
import os
import stat

import pytest
import torch
import yaml
from click.testing import CliRunner

from clada import runtime
from clada.artifacts import load_artifact
from clada.calibrate.cli import calibrate_main, main
from tests.conftest import calibrate_tiny, tiny_model

REPORT_KEYS = {"dense_ppl", "sparse_ppl", "ppl_increase", "mlp_sparsity", "mlp_reads_saved", "relaxed_share", "tokens"}


UMASK = 0o027  # not the usual 0o022: outputs must follow the umask, as a plain open(path, "w") would


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    old = os.umask(UMASK)
    try:
        return root, calibrate_tiny(root, "llama")
    finally:
        os.umask(old)


def test_outputs_written(workspace):
    root, output = workspace
    out = root / "out"
    assert {"clada.safetensors", "report.json", "report.md", "trials.png", "study.db"} <= {p.name for p in out.iterdir()}
    report = json.loads((out / "report.json").read_text())
    assert REPORT_KEYS <= set(report)
    assert report["tokens"] == 4 * 24
    assert report["search"]["trials"] == 6
    checks = report["search"]["validation"]
    assert report["search"]["validation_docs"] > 0 and checks  # the chosen trial was re-checked
    chosen = [c for c in checks if c["chosen"]]
    assert len(chosen) == 1  # the chosen point (a trial, or one the validation derived from it) was re-checked
    source = report["chosen"]["derived_from"]
    assert chosen[0]["trial"] == (report["chosen"]["trial"] if source is None else source)
    assert (chosen[0]["variant"] == "searched") == (source is None)
    first = next(i for i, c in enumerate(checks) if c["trial"] == chosen[0]["trial"])
    assert not any(c["passes"] for c in checks[:first])  # earlier (more reads saved) candidates failed
    assert "## Validation of the best trials" in (out / "report.md").read_text()
    assert (out / "trials.png").read_bytes()[:4] == b"\x89PNG"
    assert "mlp_reads_saved" in output and "artifact:" in output


def test_outputs_get_the_mode_of_a_plain_write(workspace):
    root, _ = workspace
    for name in ("clada.safetensors", "report.json", "report.md", "trials.png"):
        assert stat.S_IMODE(os.stat(root / "out" / name).st_mode) == 0o666 & ~UMASK, name


def test_artifact_applies_and_generates(workspace):
    root, _ = workspace
    art = load_artifact(root / "out" / "clada.safetensors")
    assert art.model["num_layers"] == 2 and art.recipe["scored_tokens"] == 24
    assert -1 <= art.lam <= 0 and -1 <= art.gam <= 0
    model = tiny_model("llama")
    runtime.apply(model, art)
    out = model.generate(torch.tensor([[5, 6, 7, 8, 9]]), max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 11)


def test_trials_store_the_thresholds_they_chose(workspace):
    """Each completed trial keeps its per-layer thresholds as user attributes: the chosen trial's are the
    artifact's, readable without the error tables."""
    import optuna

    root, _ = workspace
    out = root / "out"
    report = json.loads((out / "report.json").read_text())
    study = optuna.load_study(study_name=report["search"]["study"], storage=f"sqlite:///{out / 'study.db'}")
    chosen = next(t for t in study.trials if t.number == report["chosen"]["trial"])
    art = load_artifact(out / "clada.safetensors")
    assert chosen.user_attrs["tau_in"] == pytest.approx(art.tau_base_in.tolist())
    assert chosen.user_attrs["tau_mid"] == pytest.approx(art.tau_base_mid.tolist())
    assert (chosen.user_attrs["tau_s"], chosen.user_attrs["tau_H"]) == pytest.approx((art.tau_s, art.tau_H))
    assert art.rule == {"name": "threshold"}
    assert all(len(t.user_attrs["tau_in"]) == 2 for t in study.trials if t.state.name == "COMPLETE")


def test_rerun_of_a_finished_study_reuses_measurements_and_validation(workspace, monkeypatch):
    from clada.calibrate import pipeline, search

    root, first = workspace
    out = root / "out"
    before = load_artifact(out / "clada.safetensors")
    assert "[2/6] measuring dense MLP activations" in first and (out / "measurements.safetensors").is_file()

    def never(*args, **kwargs):
        raise AssertionError("measured or validated again")

    monkeypatch.setattr(pipeline, "measure", never)
    monkeypatch.setattr(search, "validated_choice", never)
    result = CliRunner().invoke(calibrate_main, [str(root / "recipe.yaml"), "--quiet"])
    assert result.exit_code == 0, result.output
    assert "measurements of this model and recipe reused" in result.output
    assert "validation of the best trials reused from the study" in result.output
    after = load_artifact(out / "clada.safetensors")
    assert torch.equal(after.tau_base_in, before.tau_base_in) and torch.equal(after.tau_base_mid, before.tau_base_mid)
    report = json.loads((out / "report.json").read_text())
    chosen = next(c for c in report["search"]["validation"] if c["chosen"])
    assert chosen["trial"] in (report["chosen"]["trial"], report["chosen"]["derived_from"])


def test_measurements_are_keyed_by_model_and_settings(tmp_path):
    from clada.calibrate.measure import LayerTable
    from clada.calibrate.pipeline import Measurements, measurement_key
    from clada.calibrate.recipe import parse_recipe

    model = tiny_model("llama")
    identity, fingerprint = runtime.model_identity(model), runtime.mlp_fingerprint(model)
    key = measurement_key(parse_recipe({}), identity, fingerprint, "abc")
    assert key == measurement_key(parse_recipe({"search": {"trials": 3}, "output": "x"}), identity, fingerprint, "abc")
    others = [measurement_key(parse_recipe({"calibration": {"activation_tokens": 64}}), identity, fingerprint, "abc"),
              measurement_key(parse_recipe({}), identity, runtime.mlp_fingerprint(tiny_model("llama", 1)), "abc"),
              measurement_key(parse_recipe({}), identity, fingerprint, "abd"),
              measurement_key(parse_recipe({"dtype": "bfloat16"}), identity, fingerprint, "abc")]
    assert key not in others and len(set(others)) == len(others)
    table = LayerTable(torch.rand(2), torch.rand(2, 3), torch.rand(2, 3), torch.rand(2, 3))
    measured = Measurements(torch.rand(2, 32), torch.rand(2, 64), [table, table], torch.rand(2))
    measured.save(tmp_path / "m.safetensors", key)
    back = Measurements.load(tmp_path / "m.safetensors", key)
    assert torch.equal(back.weight_mid, measured.weight_mid) and torch.equal(back.tables[1].error, table.error)
    assert Measurements.load(tmp_path / "m.safetensors", others[0]) is None
    assert Measurements.load(tmp_path / "missing.safetensors", key) is None


def test_heldout_figure_above_the_budget_is_a_warning_and_marked_in_the_report(workspace, monkeypatch):
    from clada.calibrate import pipeline
    from clada.calibrate.report import render_markdown

    root, _ = workspace
    report = json.loads((root / "out" / "report.json").read_text())
    report["search"]["max_ppl_increase"] = 0.015
    report["heldout"]["ppl_increase"] = report["ppl_increase"] = 0.0187
    assert len(report["heldout"]["ppl_increase_interval"]) == 2 and report["heldout"]["documents"] > 0
    report["heldout"]["ppl_increase_interval"], report["heldout"]["documents"] = [0.012, 0.025], 32
    monkeypatch.setattr(pipeline, "run_calibration", lambda recipe, progress: report)
    result = CliRunner().invoke(calibrate_main, [str(root / "recipe.yaml"), "--quiet"])
    assert result.exit_code == 0, result.output
    warning = "clada: warning: held-out ppl_increase +0.0187 is above the recipe's budget 0.015 (search.max_ppl_increase)"
    assert warning in result.stderr and result.stderr.count("clada: warning") == 1
    markdown = render_markdown(report)
    assert ("| ppl_increase | 0.0187 (95% interval +0.0120 to +0.0250 over 32 documents) **above the budget** |"
            in markdown) and "**Warning:** held-out" in markdown
    report["heldout"]["ppl_increase"] = report["ppl_increase"] = 0.0149
    result = CliRunner().invoke(calibrate_main, [str(root / "recipe.yaml"), "--quiet"])
    assert "warning" not in result.output and "above the budget" not in render_markdown(report)


def test_resume_keeps_trials(workspace):
    root, _ = workspace
    recipe = yaml.safe_load((root / "recipe.yaml").read_text())
    recipe["search"]["trials"] = 8
    (root / "recipe2.yaml").write_text(yaml.safe_dump(recipe))
    result = CliRunner().invoke(main, ["calibrate", str(root / "recipe2.yaml"), "--quiet"])
    assert result.exit_code == 0, result.output
    report = json.loads((root / "out" / "report.json").read_text())
    assert report["search"]["trials"] == 8  # 6 kept from the first run + 2 new


def test_inspect_and_eval(workspace):
    root, _ = workspace
    runner = CliRunner()
    result = runner.invoke(main, ["inspect", str(root / "out" / "clada.safetensors")])
    assert result.exit_code == 0 and "tau_in" in result.output and "lam=" in result.output
    json_out = root / "eval.json"
    result = runner.invoke(main, ["eval", "--model", str(root / "ckpt"), "--artifact", str(root / "out" / "clada.safetensors"),
                                  "--data", str(root / "docs.txt"), "--docs", "3", "--json", str(json_out), "--quiet"])
    assert result.exit_code == 0, result.output
    figures = json.loads(json_out.read_text())
    assert REPORT_KEYS <= set(figures) and figures["tokens"] == 3 * 24


@pytest.mark.parametrize("content,match", [
    ("modle: x\n", "did you mean 'model'"),
    ("search: {trials: -1}\n", "search.trials"),
    ("search: {max_ppl_increase: fast}\n", "search.max_ppl_increase"),
    ("model: [1\n", "not valid YAML"),
])
def test_bad_recipe_exits_2_and_writes_nothing(tmp_path, content, match):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(content + f"output: {tmp_path / 'never'}\n")
    result = CliRunner().invoke(calibrate_main, [str(recipe)])
    assert result.exit_code == 2
    assert match in result.output and result.output.count("\n") == 1
    assert not (tmp_path / "never").exists()


@pytest.mark.parametrize("device,cuda_devices,mps,match", [
    ("cuda", 0, False, "'cuda' is not available on this machine"),
    ("cuda:1", 1, False, "'cuda:1' does not exist: this machine has 1 cuda device"),
    ("mps", 0, False, "'mps' is not available on this machine"),
    ("gpu", 0, False, "'gpu' is not a torch device"),
])
def test_missing_device_is_refused_before_loading(tmp_path, monkeypatch, device, cuda_devices, mps, match):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda_devices > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: cuda_devices)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
    loaded = []
    monkeypatch.setattr("clada.calibrate.models.resolve_checkpoint", lambda spec: loaded.append(spec))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"device: '{device}'\noutput: {tmp_path / 'o'}\n")
    result = CliRunner().invoke(calibrate_main, [str(recipe)])
    assert result.exit_code == 2 and result.output.count("\n") == 1, result.output
    assert f"recipe field 'device': {match}" in result.output
    assert not loaded and not (tmp_path / "o").exists()


def test_available_devices_pass_validation(monkeypatch):
    from clada.calibrate.recipe import parse_recipe

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    for device in ("cpu", "cuda", "cuda:1", "mps"):
        assert parse_recipe({"device": device}).device == device


def test_missing_recipe_and_bad_model(tmp_path):
    result = CliRunner().invoke(calibrate_main, [str(tmp_path / "nope.yaml")])
    assert result.exit_code == 2 and "recipe file not found" in result.output
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: no-such-model\noutput: {tmp_path / 'o'}\n")
    result = CliRunner().invoke(calibrate_main, [str(recipe)])
    assert result.exit_code == 2 and "unknown name 'no-such-model'" in result.output
    assert not (tmp_path / "o").exists()


def test_inspect_corrupt_artifact(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"garbage!" * 4)
    result = CliRunner().invoke(main, ["inspect", str(bad)])
    assert result.exit_code == 2 and "error" in result.output


def test_a_new_calibration_format_measures_and_searches_again(monkeypatch):
    from clada.calibrate import pipeline
    from clada.calibrate.recipe import parse_recipe

    model, recipe = tiny_model("llama"), parse_recipe({})
    identity, fingerprint = runtime.model_identity(model), runtime.mlp_fingerprint(model)
    key, name = pipeline.measurement_key(recipe, identity, fingerprint, "abc"), pipeline.study_name(recipe)
    monkeypatch.setattr(pipeline, "CALIBRATION_FORMAT", pipeline.CALIBRATION_FORMAT + 1)
    assert pipeline.measurement_key(recipe, identity, fingerprint, "abc") != key
    assert pipeline.study_name(recipe) != name


def test_every_committed_recipe_parses():
    from pathlib import Path

    from clada.calibrate.recipe import load_recipe

    recipes = sorted((Path(__file__).resolve().parent.parent / "recipes").glob("*.yaml"))
    assert len(recipes) >= 4
    outputs = [load_recipe(path).output for path in recipes]
    assert len(set(outputs)) == len(outputs)  # no two recipes write (and resume) the same study folder
