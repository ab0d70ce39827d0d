"""benchmarks/bench_quality.py: the error tables it allocates from, and the baseline levels a reused frontier lacks."""

from __future__ import annotations

import argparse
import json
from types import SimpleNamespace

import pytest
import torch

from clada import runtime
from clada.calibrate import pipeline
from clada.calibrate.recipe import parse_recipe

from .conftest import load_script, tiny_model


@pytest.fixture(scope="module")
def bq():
    return load_script("bench_quality")


def test_tables_are_the_calibrations_own_else_measured_once_under_its_key(bq, tmp_path, monkeypatch):
    monkeypatch.setenv("CLADA_CACHE", str(tmp_path / "cache"))
    measured = []
    monkeypatch.setattr(bq, "measure", lambda *a, **k: measured.append(1) or pipeline.measure(*a, **k))
    model = tiny_model("llama")
    adapter = runtime.adapter_for(model)
    recipe = parse_recipe({"prompt_tokens": 4, "scored_tokens": 8, "calibration": {
        "activation_tokens": 32, "layer_error": "relative", "q_in": [0.0, 0.2], "q_mid": [0.0, 0.3]}})
    tokens = torch.randint(3, model.config.vocab_size, (6, 13), generator=torch.Generator().manual_seed(0))
    first = bq.measurements(recipe, model, adapter, tokens, "documents")
    again = bq.measurements(recipe, model, adapter, tokens, "documents")
    assert len(measured) == 1 and torch.equal(first.tables[1].error, again.tables[1].error)
    bq.measurements(recipe, model, adapter, tokens, "other documents")  # another key: measured again
    assert len(measured) == 2
    study = tmp_path / "study"
    study.mkdir()
    key = pipeline.measurement_key(recipe, runtime.model_identity(model, adapter),
                                   runtime.mlp_fingerprint(model, adapter), "third documents")
    own = pipeline.Measurements(first.weight_in, first.weight_mid, first.tables, first.ratios * 2, first.centers)
    own.save(study / pipeline.MEASUREMENTS_NAME, key)
    found = bq.measurements(recipe, model, adapter, tokens, "third documents", study)
    assert len(measured) == 2 and torch.equal(found.ratios, first.ratios * 2)  # the calibration's file, not measured


def test_a_reused_frontier_measures_only_the_levels_it_lacks(bq):
    rows = [{"method": "teal", "level": 0.1}, {"method": "teal", "level": 0.2}, {"method": "cats", "level": 0.3}]
    levels = {"teal": [0.05, 0.1, 0.2], "cats": [0.3], "griffin": [0.1]}
    assert bq.missing_levels(rows, levels) == {"teal": [0.05], "griffin": [0.1]}


def test_multiple_choice_tasks_are_read_before_any_model_loads(bq, tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="bench_quality.py")
    task = tmp_path / "q.jsonl"
    task.write_text('{"context": "Sky?", "choices": ["blue", "green"], "label": 0}\n' * 3)
    args = argparse.Namespace(mc=[str(task)], mc_limit=2)
    assert [len(q) for q in bq.mc_questions(parser, args).values()] == [2]
    with pytest.raises(SystemExit) as exit_info:
        bq.mc_questions(parser, argparse.Namespace(mc=["nosuchtask"], mc_limit=None))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("bench_quality.py: error: --mc: multiple-choice spec 'nosuchtask'")


def test_baselines_measured_again_are_not_reused(bq, tmp_path):
    recipe = parse_recipe({})
    bench = SimpleNamespace(recipe=recipe, tokens={"lee": torch.zeros(2, 3)}, prompts=torch.zeros(2, 1),
                            args=SimpleNamespace(greedy_tokens=4))
    row = lambda method, level, **extra: {"method": method, "level": level, **extra}
    earlier = {"recipe": recipe.to_dict(), "data": {"lee": 2}, "greedy": {"prompts": 2, "tokens": 4},
               "command": "python benchmarks/bench_quality.py", "reconstruction": {"study": bq.study_name(recipe)},
               "rows": [row("teal", 0.1, greedy_remeasured=True), row("teal-greedy", 0.1), row("clada", 0.1)]}
    path = tmp_path / "frontier.json"
    path.write_text(json.dumps(earlier))
    rows, origin = bq.reused_rows(path, bench, ["teal-greedy"])
    assert rows == [row("teal", 0.1)]  # no teal-greedy row; the earlier run's greedy flag is not this run's
    assert origin["greedy_remeasured"] is False and origin["greedy_from"] == earlier["command"]
    # an earlier run of the same study keeps the curve of the study before it; one of another study becomes that curve
    earlier["rows"].append(row("clada-earlier", 0.1, study="clada-older"))
    path.write_text(json.dumps(earlier))
    assert bq.reused_rows(path, bench, [])[0][-1] == row("clada-earlier", 0.1, study="clada-older")
    earlier["reconstruction"]["study"] = "clada-other"
    path.write_text(json.dumps(earlier))
    rows = bq.reused_rows(path, bench, [])[0]
    assert [r for r in rows if r["method"] == "clada-earlier"] == [row("clada-earlier", 0.1, study="clada-other")]


def test_results_name_paths_inside_the_repository_relative_to_it(bq, tmp_path):
    assert bq.repo_path(bq.ROOT / "out" / "smollm2-135m" / "clada.safetensors") == "out/smollm2-135m/clada.safetensors"
    assert bq.repo_path(tmp_path / "study") == str(tmp_path / "study")  # outside: as given
