"""Error-controlled allocation rules on synthetic per-layer error tables."""

import itertools

import pytest
import torch

from clada.calibrate.measure import LayerTable, allocate
from clada.calibrate.recipe import RecipeError, parse_recipe
from clada.calibrate.search import SearchSettings, warm_start_points


def _table(errors: list[float]) -> LayerTable:
    """One input quantile, len(errors) intermediate cells skipping 0, 0.1, 0.2, ... of the bytes; tau_mid = cell."""
    n = len(errors)
    return LayerTable(tau_in=torch.zeros(1), tau_mid=torch.arange(n, dtype=torch.float32).view(1, n),
                      error=torch.tensor([errors]), saved=torch.arange(n, dtype=torch.float32).view(1, n) / 10)


TABLES = [_table([0.0, 0.001, 0.002, 0.010, 0.050]),   # cheap layer
          _table([0.0, 0.004, 0.020, 0.060, 0.200])]   # expensive layer


def test_budget_rule_takes_the_most_skipping_cell_within_each_budget():
    _, tau_mid, _ = allocate(TABLES, torch.tensor([0.005, 0.005]))
    assert tau_mid.tolist() == [2.0, 1.0]


def test_marginal_rule_stops_where_the_next_step_costs_more_than_the_price():
    # price 0.05 error per unit saved: a 0.1 step is taken while it adds <= 0.005 error
    _, tau_mid, _ = allocate(TABLES, torch.tensor([0.05, 0.05]), rule="marginal")
    assert tau_mid.tolist() == [2.0, 1.0]
    _, tau_mid, _ = allocate(TABLES, torch.tensor([0.1, 0.1]), rule="marginal")
    assert tau_mid.tolist() == [3.0, 1.0]


def test_marginal_rule_is_optimal_for_the_bytes_it_skips():
    """No other choice of cells skips as many bytes with less total error (the Lagrangian property)."""
    for price in (0.01, 0.03, 0.1, 0.5, 2.0):
        _, tau_mid, _ = allocate(TABLES, torch.tensor([price, price]), rule="marginal")
        cells = [int(c) for c in tau_mid]
        saved = sum(cells) / 10
        error = sum(t.error[0, c].item() for t, c in zip(TABLES, cells))
        for other in itertools.product(range(5), repeat=2):
            if sum(other) / 10 >= saved - 1e-9:
                assert sum(t.error[0, c].item() for t, c in zip(TABLES, other)) >= error - 1e-12


def test_unknown_rule_and_recipe_choice():
    with pytest.raises(ValueError, match="allocation rule"):
        allocate(TABLES, torch.ones(2), rule="greedy")
    with pytest.raises(RecipeError, match="search.allocation"):
        parse_recipe({"search": {"allocation": "greedy"}})
    assert parse_recipe({}).search.allocation == "marginal"


@pytest.mark.parametrize("allocation,key", [("marginal", "price"), ("budget", "budget"), ("both", "price")])
def test_warm_start_points_use_the_rule_parameter(allocation, key):
    points = warm_start_points(SearchSettings(allocation=allocation))
    assert points and all(key in p for p in points)
    assert all(p.get("rule") == "marginal" for p in points) if allocation == "both" else all("rule" not in p for p in points)


class _FakeEvaluator:
    def signals(self):
        return torch.linspace(0, 1, 11), torch.linspace(0, 1, 11)


def _centred_table(errors: list[float], plain_errors: list[float]) -> LayerTable:
    """A compensated row (``errors``) stacked after an uncompensated one (``plain_errors``)."""
    plain, centred = _table(plain_errors), _table(errors)
    centred.centred = torch.ones(1, dtype=torch.bool)
    return LayerTable.stack([plain, centred])


def test_point_at_saved_hits_each_level_the_tables_allow_and_plain_drops_compensation():
    from clada.calibrate.search import ThresholdSearch

    tables = [_centred_table([0.0, 0.0005, 0.001, 0.005, 0.02], [0.0, 0.001, 0.002, 0.010, 0.050]),
              _centred_table([0.0, 0.003, 0.030, 0.090, 0.300], [0.0, 0.004, 0.020, 0.060, 0.200])]
    search = ThresholdSearch(tables, torch.ones(2), _FakeEvaluator(), SearchSettings(), artifact_of=None)
    params = {"price": 0.01, "depth_slope": 0.0, "mix": 1.0, "lam": -0.5, "gam": 0.0, "q_s": 0.9, "q_H": 1.0}
    for target in (0.0, 0.1, 0.2, 0.3, 0.4):  # both tables step 0.1 per cell: mean skipped 0.05 per step
        point = search.point_at_saved(params, target)
        skipped = sum(point.tau_mid) / 10 / 2
        assert skipped == pytest.approx(target, abs=0.025)
        assert point.lam == -0.5 and point.params["depth_slope"] == 0.0 and "budget" not in point.params
        plain = search.point_at_saved(params, target, plain=True)
        assert sum(plain.tau_mid) / 10 / 2 == pytest.approx(target, abs=0.025) and not any(plain.centred)
    # at 0.2 both layers can take compensated rows or not: the cheaper (compensated) first layer is chosen
    assert search.point_at_saved(params, 0.2).centred[0]
