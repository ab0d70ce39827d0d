"""The winner's-curse guard: validated_choice re-scores the best feasible trials on unseen documents."""

import optuna
import pytest

from clada.calibrate.search import (DERIVED_ATTR, Point, SearchSettings, ThresholdSearch, _completed, best_feasible,
                                    stored_validated_choice, validated_choice)


def _study(rows: list[tuple[float, float]]) -> optuna.Study:
    """A study whose trial i has budget i, reads saved rows[i][0] and search ppl_increase rows[i][1] (budget 0.02)."""
    study = optuna.create_study(direction="maximize")
    dist = {"budget": optuna.distributions.FloatDistribution(0, 100)}
    for i, (reads, ppl) in enumerate(rows):
        study.add_trial(optuna.trial.create_trial(params={"budget": float(i)}, distributions=dist, value=reads,
                                                  user_attrs={"mlp_reads_saved": reads, "ppl_increase": ppl,
                                                              "constraint": ppl - 0.02}))
    return study


class _Search:
    """Stand-in for ThresholdSearch: the point of trial i carries i in tau_in; its "artifact" is the point."""

    settings = SearchSettings(max_ppl_increase=0.02)
    evaluator = None
    score = ThresholdSearch.score  # the real scoring call, on the validator passed in
    point_of = ThresholdSearch.point_of  # the real rebuild (no stored thresholds here: from the parameters)

    def artifact_of(self, point: Point) -> Point:
        return point

    def point(self, params: dict) -> Point:
        i = params["budget"]
        return Point(params=params, tau_in=[i], tau_mid=[0.0], lam=0.0, gam=0.0, tau_s=1.0, tau_H=1.0)


def _validator(ppl_by_trial: dict[int, float], calls: list[int]):
    def score(point):
        i = int(point.tau_in[0])
        calls.append(i)
        return {"ppl_increase": ppl_by_trial[i]}
    return score


ROWS = [(0.30, 0.019), (0.25, 0.015), (0.20, 0.010), (0.22, 0.018), (0.35, 0.05)]  # 3 is dominated, 4 infeasible


def test_first_front_trial_within_budget_on_average_is_chosen():
    calls: list[int] = []
    best, checks = validated_choice(_study(ROWS), _Search(), _validator({0: 0.03, 1: 0.02, 2: 0.0}, calls), 8)
    assert best.number == 1 and calls == [0, 1]  # 0 averages 0.0245 > 0.02; 1 averages 0.0175; 3 is dominated
    assert [c["passes"] for c in checks] == [False, True]
    assert checks[0]["averaged_ppl_increase"] == pytest.approx(0.0245)
    assert checks[1]["validation_ppl_increase"] == 0.02


def test_without_validator_the_best_feasible_trial():
    study = _study(ROWS)
    best, checks = validated_choice(study, _Search(), None, 8)
    assert best.number == best_feasible(study).number == 0 and checks == []


def test_none_passing_falls_back_to_the_smallest_average_among_those_checked():
    calls: list[int] = []
    best, checks = validated_choice(_study(ROWS), _Search(), _validator({0: 0.09, 1: 0.04, 2: 0.05}, calls), 2)
    assert calls == [0, 1] and best.number == 1 and not any(c["passes"] for c in checks)


def test_no_feasible_trial():
    best, checks = validated_choice(_study([(0.3, 0.05)]), _Search(), _validator({}, []), 8)
    assert best is None and checks == []


def test_validation_documents_are_disjoint_from_search_documents():
    from clada.calibrate.splits import token_splits
    from clada.calibrate.recipe import parse_recipe
    from tests.conftest import word_tokenizer

    recipe = parse_recipe({"calibration": {"search_docs": 3}, "search": {"validation_docs": 2},
                           "prompt_tokens": 4, "scored_tokens": 4, "heldout_fraction": 0.2})
    docs = [" ".join(f"w{(i * 7 + j) % 50}" for j in range(20)) for i in range(12)]
    splits = token_splits(recipe, word_tokenizer(), docs)
    assert splits.search.shape[0] == 3 and splits.validation.shape[0] == 2
    search_rows = {tuple(r.tolist()) for r in splits.search}
    assert not any(tuple(r.tolist()) in search_rows for r in splits.validation)
    none = token_splits(parse_recipe({"search": {"validation_docs": 0}, "prompt_tokens": 4, "scored_tokens": 4}),
                        word_tokenizer(), docs)
    assert none.validation.shape[0] == 0


def test_a_small_recipe_scales_validation_activations_and_heldout_documents():
    """Validation documents, activation tokens and held-out documents follow calibration.search_docs unless set;
    the defaults stay those of search_docs 16."""
    from clada.calibrate.recipe import parse_recipe

    default = parse_recipe({})
    assert (default.search.validation_docs, default.calibration.activation_tokens, default.eval.heldout_docs) == (48, 1024, 32)
    small = parse_recipe({"search": {"trials": 4}, "calibration": {"search_docs": 4}})
    assert (small.search.validation_docs, small.calibration.activation_tokens, small.eval.heldout_docs) == (12, 256, 8)
    given = parse_recipe({"calibration": {"search_docs": 4, "activation_tokens": 512}, "search": {"validation_docs": 0},
                          "eval": {"heldout_docs": 5}})
    assert (given.search.validation_docs, given.calibration.activation_tokens, given.eval.heldout_docs) == (0, 512, 5)


class _AdaptiveSearch(_Search):
    """A search whose points are identified by their level ``budget`` and carry adaptation ``lam``: search and
    validation ppl_increase are ``ppl(level, lam)``, reads saved the level (less 0.05 with adaptation, so the
    counterpart at the same reads has a lower level)."""

    settings = SearchSettings(max_ppl_increase=0.02, adapt=True)
    add_derived = ThresholdSearch.add_derived
    trial_attrs = ThresholdSearch.trial_attrs
    rule_of = ThresholdSearch.rule_of

    def __init__(self, ppl):
        self.ppl = ppl

    def point(self, params: dict) -> Point:
        return Point(params=dict(params), tau_in=[params["budget"]], tau_mid=[0.0], lam=params.get("lam", 0.0),
                     gam=0.0, tau_s=1.0, tau_H=1.0, centred=[False])

    def level_of(self, params: dict) -> float:
        return params["budget"]

    def point_at_saved(self, params: dict, target: float) -> Point:
        return self.point({**params, "budget": target})

    def evaluate(self, point: Point) -> Point:
        level = point.params["budget"]
        point.figures = {"mlp_reads_saved": level - 0.05 * bool(point.lam), "ppl_increase": self.ppl(level, point.lam)}
        return point

    def without_adaptation(self, point: Point) -> Point:
        return self.evaluate(self.point({**point.params, "lam": 0.0, "budget": point.params["budget"] - 0.05}))


def _adaptive_study(search: _AdaptiveSearch, levels: list[tuple[float, float]]) -> optuna.Study:
    """Trials at (level, lam), evaluated by ``search``."""
    study = optuna.create_study(direction="maximize")
    dist = {"budget": optuna.distributions.FloatDistribution(0, 1), "lam": optuna.distributions.FloatDistribution(-1, 0)}
    for level, lam in levels:
        point = search.evaluate(search.point({"budget": level, "lam": lam}))
        study.add_trial(optuna.trial.create_trial(params=point.params, distributions=dist,
                                                  value=point.figures["mlp_reads_saved"],
                                                  user_attrs=search.trial_attrs(point)))
    return study


def _level_validator(search: _AdaptiveSearch, harder: float = 0.0):
    """Validation documents on which every point measures ``harder`` more than on the search documents."""
    return lambda point: {"ppl_increase": search.ppl(point.params["budget"], point.lam) + harder}


def test_a_candidate_loses_to_its_counterpart_without_adaptation():
    """Adaptation costs 0.004 ppl_increase at the same reads saved: the candidate (level 0.30, reads 0.25, within
    the budget on the search documents, over it on average) is replaced by its counterpart (level 0.25, reads 0.25,
    within it), added to the study as a derived trial that the search does not count."""
    search = _AdaptiveSearch(lambda level, lam: 0.05 * level + 0.004 * bool(lam))
    study = _adaptive_study(search, [(0.30, -0.5)])
    best, checks = validated_choice(study, search, _level_validator(search, 0.006), 8)
    assert [(c["variant"], c["passes"], c["chosen"]) for c in checks] == [("searched", False, False),
                                                                          ("no adaptation", True, True)]
    assert best.user_attrs[DERIVED_ATTR] == 0 and best.params["lam"] == 0.0 and best.params["budget"] == 0.25
    assert best.value == pytest.approx(0.25) and search.point_of(best).tau_in == [0.25]
    assert _completed(study) == 1 and len(study.trials) == 2


def test_adaptation_that_pays_is_kept():
    search = _AdaptiveSearch(lambda level, lam: 0.05 * level - 0.003 * bool(lam))  # 0.012 vs 0.0125 at reads 0.25
    best, checks = validated_choice(_adaptive_study(search, [(0.30, -0.5)]), search, _level_validator(search), 8)
    assert best.number == 0 and best.params["lam"] == -0.5 and [c["chosen"] for c in checks] == [True, False]


def test_the_fill_moves_the_level_up_to_the_budget():
    """The only candidate passes; with no failed candidate above it the fill bisects towards 0.05 more reads, keeping
    what stays within the budget 0.02."""
    search = _AdaptiveSearch(lambda level, lam: 0.08 * level)  # within the budget up to level 0.25
    study = _adaptive_study(search, [(0.20, 0.0)])
    best, checks = validated_choice(study, search, _level_validator(search), 8, fill_steps=3)
    # 0.20 passes; bisection between 0.20 and 0.25: 0.225 passes, 0.2375 passes, 0.24375 passes
    assert [c["variant"] for c in checks] == ["searched", "filled", "filled", "filled"]
    assert best.params["budget"] == pytest.approx(0.24375) and best.user_attrs[DERIVED_ATTR] == 0
    search = _AdaptiveSearch(lambda level, lam: 0.099 * level)  # within the budget up to level 0.202 only
    study = _adaptive_study(search, [(0.20, 0.0)])
    best, checks = validated_choice(study, search, _level_validator(search), 8, fill_steps=2)
    assert best.number == 0 and [c["passes"] for c in checks] == [True, False, False]


def test_a_stored_choice_is_reused_although_the_study_holds_its_derived_trial():
    search = _AdaptiveSearch(lambda level, lam: 0.05 * level + 0.004 * bool(lam))
    study = _adaptive_study(search, [(0.30, -0.5)])
    best, _, reused = stored_validated_choice(study, search, lambda: _level_validator(search, 0.006), 8, 0.5, 4)
    assert not reused and best.user_attrs[DERIVED_ATTR] == 0
    again, _, reused = stored_validated_choice(study, search, lambda: None, 8, 0.5, 4)
    assert reused and again.number == best.number


def test_a_derived_point_may_carry_a_price_where_its_source_had_a_budget():
    """point_at_saved moves a level as a price (marginal rule): a trial of the budget rule derives one, and a price
    beyond the search's range widens the derived trial's distribution."""
    search = _AdaptiveSearch(lambda level, lam: 0.0)
    study = _adaptive_study(search, [(0.2, -0.5)])
    point = Point(params={"price": 0.5, "lam": 0.0}, tau_in=[0.1], tau_mid=[0.0], lam=0.0, gam=0.0, tau_s=1.0,
                  tau_H=1.0, centred=[False], figures={"mlp_reads_saved": 0.2, "ppl_increase": 0.01})
    derived = search.add_derived(study, point, study.trials[0])
    assert set(derived.distributions) == {"price", "lam"} and derived.distributions["price"].high == 0.5
    assert derived.params == {"price": 0.5, "lam": 0.0} and derived.user_attrs[DERIVED_ATTR] == 0
