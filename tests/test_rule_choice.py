"""calibration.rule: auto -- both rules' error tables, each search trial picks one of them or the mixed rule (both
tables' rows per layer; ``sparsity_rule``), the artifact has the chosen trial's rule; the frontier's per-level choice
(bench_quality.level_rule)."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import optuna
import pytest
import torch
from safetensors import safe_open

from clada.artifacts import load_artifact
from clada.calibrate import pipeline
from clada.calibrate.measure import LayerTable, mixed_tables
from clada.calibrate.recipe import RecipeError, parse_recipe
from clada.calibrate.search import (MIXED, PREDICTED_ATTR, RULE_PARAM, Point, SearchSettings, ThresholdSearch,
                                    rules_of, searched_rules, warm_start_points)

from .conftest import run_recipe, tiny_job

RULES = ("threshold", "predictor")


def _table(saved_per_cell: float, error_per_cell: float, cells: int = 5) -> LayerTable:
    """One input quantile; cell c skips ``c * saved_per_cell`` of the bytes at error ``c**2 * error_per_cell``,
    tau_mid = c."""
    c = torch.arange(cells, dtype=torch.float32).view(1, cells)
    return LayerTable(tau_in=torch.zeros(1), tau_mid=c.clone(), error=c ** 2 * error_per_cell, saved=c * saved_per_cell)


class _FakeEvaluator:
    def signals(self):
        return torch.linspace(0, 1, 11), torch.linspace(0, 1, 11)


def _search(**tables) -> ThresholdSearch:
    return ThresholdSearch(tables, torch.ones(2), _FakeEvaluator(), SearchSettings(rules=tuple(tables)), artifact_of=None)


def test_auto_measures_both_rules_and_refuses_what_the_predictor_has_not():
    assert rules_of(parse_recipe({"calibration": {"rule": "auto"}}).calibration.rule) == RULES
    assert rules_of("predictor") == ("predictor",)
    with pytest.raises(RecipeError, match="'search.prefix'.*calibration.rule: auto"):
        parse_recipe({"calibration": {"rule": "auto"}, "search": {"prefix": True}})
    with pytest.raises(RecipeError, match="'calibration.attention_sparsity'"):
        parse_recipe({"calibration": {"rule": "auto", "attention_sparsity": 0.3}})


def test_warm_start_points_are_made_once_per_rule():
    one = warm_start_points(SearchSettings())
    both = warm_start_points(SearchSettings(rules=RULES))
    assert searched_rules(RULES) == (*RULES, MIXED) and searched_rules(("predictor",)) == ("predictor",)
    assert len(both) == 3 * len(one) and all(RULE_PARAM not in p for p in one)
    assert [{k: v for k, v in p.items() if k != RULE_PARAM} for p in both[::3]] == one
    assert [p[RULE_PARAM] for p in both[:6]] == [*RULES, MIXED] * 2


def test_mixed_tables_hold_both_rules_rows_and_each_layer_takes_the_cheaper_rule():
    # layer 0: the threshold rule skips bytes for less error; layer 1: the predictor
    threshold = [_table(0.1, 0.001), _table(0.1, 0.004)]
    predictor = [_table(0.1, 0.004), _table(0.1, 0.001)]
    tables = mixed_tables(threshold, predictor)
    assert tables[0].predicted.tolist() == [False, True] and tables[0].error.shape == (2, 5)
    search = _search(threshold=threshold, predictor=predictor)
    assert search.rules == (*RULES, MIXED)
    params = {"price": 0.02, "depth_slope": 0.0}
    mixed = search.point({**params, RULE_PARAM: MIXED})
    assert mixed.rule == MIXED and mixed.predicted == [False, True]
    assert search.point({**params, RULE_PARAM: "predictor"}).predicted == []
    # at the same price the mixed point skips more than either rule alone (each layer at its cheaper rule's cells)
    levels = {r: search.level_of({**params, RULE_PARAM: r}) for r in search.rules}
    assert levels[MIXED] > max(levels["threshold"], levels["predictor"])
    at = search.point_at_saved({**params, RULE_PARAM: MIXED}, 0.3)
    assert at.predicted == [False, True]
    # a trial stores the layers, and its point comes back with them
    attrs = search.trial_attrs(dataclasses.replace(mixed, figures={"ppl_increase": 0.0}))
    assert attrs[PREDICTED_ATTR] == [False, True]
    trial = optuna.trial.create_trial(params={"price": 0.02, RULE_PARAM: MIXED}, value=0.1, user_attrs=attrs,
                                      distributions={"price": optuna.distributions.FloatDistribution(1e-4, 1, log=True),
                                                     RULE_PARAM: optuna.distributions.CategoricalDistribution(
                                                         list(search.rules))})
    assert search.point_of(trial).predicted == [False, True]


def test_a_point_allocates_from_the_tables_of_its_rule():
    search = _search(threshold=[_table(0.1, 0.001)] * 2, predictor=[_table(0.2, 0.001)] * 2)
    params = {"price": 0.02, "depth_slope": 0.0}
    threshold, predictor = (search.point({**params, RULE_PARAM: r}) for r in RULES)
    assert threshold.rule == "threshold" and predictor.rule == "predictor"
    # the same price buys more bytes where a cell saves more: the predictor's tables save twice as much per cell
    assert search.level_of({**params, RULE_PARAM: "predictor"}) > search.level_of({**params, RULE_PARAM: "threshold"})
    assert search.point(params).rule == "threshold"  # no rule named: the settings' first
    at = search.point_at_saved({**params, RULE_PARAM: "predictor"}, 0.4)
    assert at.rule == "predictor" and sum(at.tau_mid) / 2 * 0.2 == pytest.approx(0.4, abs=0.1)
    with pytest.raises(ValueError, match="tables of the rules"):
        ThresholdSearch({"threshold": []}, torch.ones(2), _FakeEvaluator(), SearchSettings(rules=RULES), None)


def test_the_artifact_names_the_rule_of_its_point():
    point = Point(params={}, tau_in=[0.1, 0.1], tau_mid=[0.2, 0.2], lam=0.0, gam=0.0, tau_s=1e6, tau_H=1.0)
    args = (torch.ones(2, 4), torch.ones(2, 8), torch.zeros(2))
    assert pipeline.point_artifact(point, *args).rule == {"name": "threshold"}
    point.rule = "predictor"
    assert pipeline.point_artifact(point, *args).rule == pipeline.rule_metadata("predictor")
    assert pipeline.rule_metadata("predictor")["name"] == "predictor"
    point.rule, point.predicted = MIXED, [True, False]
    rule = pipeline.point_artifact(point, *args).rule
    assert rule == {**pipeline.rule_metadata("predictor"), "name": MIXED, "predicted": [True, False]}


def test_auto_studies_name_the_rules_they_pick_from(monkeypatch):
    auto = parse_recipe({"calibration": {"rule": "auto"}})
    threshold = parse_recipe({})
    names = pipeline.study_name(auto), pipeline.study_name(threshold)
    monkeypatch.setattr(pipeline, "searched_rules", lambda measured: measured)  # as before the mixed rule
    assert pipeline.study_name(auto) != names[0]  # a new study: its trials pick among three rules
    assert pipeline.study_name(threshold) == names[1]
    # the measurements do not name it: the tables of auto recipes from before the mixed rule stay valid
    assert "rules" not in pipeline._error_identity(dataclasses.asdict(auto.calibration))


def test_measurements_keep_both_rules_tables(tmp_path):
    tables = [_table(0.1, 0.001), _table(0.1, 0.002)]
    other = [_table(0.2, 0.003), _table(0.2, 0.004)]
    m = pipeline.Measurements(torch.ones(2, 4), torch.ones(2, 8), tables, torch.ones(2), None, other)
    m.save(tmp_path / "m.safetensors", "k")
    back = pipeline.Measurements.load(tmp_path / "m.safetensors", "k")
    assert torch.equal(back.predictor_tables[1].error, other[1].error)
    assert torch.equal(back.rule_tables(RULES)["threshold"][0].error, tables[0].error)
    single = pipeline.Measurements(torch.ones(2, 4), torch.ones(2, 8), tables, torch.ones(2))
    single.save(tmp_path / "s.safetensors", "k")
    assert pipeline.Measurements.load(tmp_path / "s.safetensors", "k").predictor_tables is None


def test_level_rule_takes_the_rule_with_the_smaller_kl_on_the_search_documents():
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    from bench_quality import level_rule

    search = _search(threshold=[_table(0.1, 0.001)] * 2, predictor=[_table(0.1, 0.002)] * 2)
    kl = {"threshold": 0.03, "predictor": 0.01, MIXED: 0.02}

    def evaluate(point):
        point.figures = {"mlp_reads_saved": 0.2, "ppl_increase": kl[point.rule], "kl": kl[point.rule]}
        return point

    search.evaluate = evaluate
    params, choice = level_rule(search, {"price": 0.01, "depth_slope": 0.0, RULE_PARAM: "threshold"}, 0.2)
    assert params[RULE_PARAM] == "predictor" == choice["rule"] and choice["rule_proxy"]["threshold"]["kl"] == 0.03
    kl.update(threshold=0.005)
    assert level_rule(search, params, 0.2)[0][RULE_PARAM] == "threshold"
    one = _search(threshold=[_table(0.1, 0.001)] * 2)
    assert level_rule(one, {"price": 0.01}, 0.2) == ({"price": 0.01}, {})


def test_calibrating_with_auto_searches_both_rules_and_writes_the_chosen_ones_artifact(tmp_path):
    recipe = tiny_job(tmp_path, trials=14)
    recipe["calibration"].update(rule="auto", q_mid=[0.0, 0.3, 0.5])
    run_recipe(tmp_path, recipe)
    out = tmp_path / "out"
    report = json.loads((out / "report.json").read_text())
    artifact = load_artifact(out / "clada.safetensors")
    assert artifact.rule["name"] == report["chosen"]["rule"] == report["heldout"]["rule"]
    assert report["chosen"]["params"].get(RULE_PARAM, "threshold") == report["chosen"]["rule"]
    study = optuna.load_study(study_name=report["search"]["study"], storage=f"sqlite:///{out / 'study.db'}")
    assert {t.params[RULE_PARAM] for t in study.trials} == {*RULES, MIXED}
    if artifact.rule["name"] == MIXED:
        assert report["chosen"]["predicted_layers"] == [l for l, p in enumerate(artifact.rule["predicted"]) if p]
    with safe_open(str(out / pipeline.MEASUREMENTS_NAME), "pt") as fh:  # both rules' tables, reused by a rerun
        assert {"table.0.error", "predictor_table.0.error"} <= set(fh.keys())


def test_the_frontier_names_a_mixed_level_s_predicted_layers():
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    from frontier_report import _rule_cell

    row = {"rule": MIXED, "predicted_layers": 17, "rule_proxy": {"threshold": {"kl": 0.01}, MIXED: {"kl": 0.005}}}
    assert _rule_cell(row) == "mixed (17 layers predicted) (kl threshold 0.0100 / mixed 0.0050)"
    assert _rule_cell({"rule": "predictor"}) == "predictor"
