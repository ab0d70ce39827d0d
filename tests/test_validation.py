"""The winner's-curse guard: validated_choice re-scores the best feasible trials on unseen documents."""

import optuna
import pytest

from clada.calibrate.search import Point, SearchSettings, ThresholdSearch, best_feasible, validated_choice


def _study(rows: list[tuple[float, float]]) -> optuna.Study:
    """A study whose trial i has budget i, reads saved rows[i][0] and search ppl_increase rows[i][1] (budget 0.02)."""
    study = optuna.create_study(direction="maximize")
    dist = {"budget": optuna.distributions.FloatDistribution(0, 100)}
    for i, (reads, ppl) in enumerate(rows):
        study.add_trial(optuna.trial.create_trial(params={"budget": float(i)}, distributions=dist, value=reads,
                                                  user_attrs={"ppl_increase": ppl, "constraint": ppl - 0.02}))
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
