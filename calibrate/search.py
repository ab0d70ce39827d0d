"""Optuna search over error-budget allocation and cognitive-load adaptation.

Each trial picks a per-layer level ``b * exp(depth_slope * (l/(L-1) - 1/2))`` on the layer's error: with
``layer_error: kl`` the KL divergence the layer's MLP output error causes (already in one unit for every layer);
with ``relative`` the relative MLP output error weighted by ``residual_ratio[l] ** mix`` (mix = 1: error relative to
the residual stream; mix = 0: relative to the MLP output), mix searched too. Error-controlled allocation
(clada.calibrate.measure.allocate) turns it into
per-layer thresholds. With ``allocation: budget`` the level is the layer's error budget (``budget``); with
``marginal`` it is the price (``price``) at which the layer stops skipping: the rate-distortion allocation,
whose per-layer budgets are where one more skipped byte would cost more error than the price.
It also picks ``lam, gam`` in [-1, 0] and the quantiles ``q_s, q_H`` of the calibration surprisal and
entropy that become ``tau_s, tau_H``, and (``prefix``) the exponent alpha in [0, 1] of each sequence's prompt prior
(prefix-driven sparsity, ``clada.runtime.rules``; 0: none), the same on both MLP sides of every layer. Given error tables of several sparsity rules (recipe ``calibration.rule:
auto``: the threshold and the predictor rule's), each trial also picks the rule (``sparsity_rule``) whose tables it
allocates from and whose artifact it scores: one of them, or ``mixed``, whose tables hold both rules' rows, so that
each layer takes the rule that skips its bytes for less error (``measure.mixed_tables``). The objective maximises ``mlp_reads_saved`` under the constraint
``ppl_increase <= max_ppl_increase`` (both from the fast proxy on calibration documents).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import socket
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import optuna
import torch
from optuna.storages._heartbeat import get_heartbeat_thread, is_heartbeat_enabled  # as study.optimize; ask/tell has none
from tqdm.auto import tqdm

from ..artifacts import Artifact
from .evaluate import ProxyEvaluator
from .measure import LayerTable, allocation_cells, cell_values, mixed_tables, tables_saved
from .storage import is_shared, open_storage, study_lock

POINT_ATTRS = ("tau_in", "tau_mid", "tau_s", "tau_H", "centred")  # trial user attributes: the thresholds the trial chose
READS_TOLERANCE = 0.002  # mlp_reads_saved a counterpart may differ by from the point it is compared with
DERIVED_ATTR = "derived_from"  # user attribute of a trial the validation added (not sampled): the trial it came from
RULE_PARAM = "sparsity_rule"  # trial parameter: the rule whose tables a trial allocates from (several rules' tables)
MIXED = "mixed"  # the rule of the threshold and predictor rules' tables together: each layer takes either's cells
PREDICTED_ATTR = "predicted"  # trial user attribute of a mixed point: per layer whether the predictor decides it
FIGURE_KEYS = ("mlp_reads_saved", "mlp_sparsity", "input_sparsity", "ppl_increase", "kl", "relaxed_share")


@dataclass
class SearchSettings:
    trials: int = 40
    max_ppl_increase: float = 0.02
    adapt: bool = True
    prefix: bool = False
    layer_error: str = "kl"  # what the error tables hold (recipe calibration.layer_error); "relative" adds ``mix``
    allocation: str = "marginal"  # "marginal", "budget" or "both" (the study picks per trial)
    budget_range: tuple[float, float] = (1e-5, 0.3)
    price_range: tuple[float, float] = (3e-4, 0.1)
    seed: int = 0
    storage: str | None = None
    study_name: str = "clada"
    rules: tuple[str, ...] = ("threshold",)  # sparsity rules whose tables the search has (the first: the default)

    @classmethod
    def from_recipe(cls, recipe, storage: str, study_name: str) -> SearchSettings:
        """The settings of a recipe's ``search`` section (every key this class shares with it), its seed, and
        the study's storage URL and name."""
        section = dataclasses.asdict(recipe.search)
        shared = {f.name: section[f.name] for f in dataclasses.fields(cls) if f.name in section}
        return cls(**{**shared, "seed": recipe.seed, "storage": storage, "study_name": study_name,
                      "layer_error": recipe.calibration.layer_error, "rules": rules_of(recipe.calibration.rule)})

    @property
    def weighs_residual(self) -> bool:
        """Whether the errors are weighted by ``residual_ratio ** mix`` (relative errors; KL needs no weight)."""
        return self.layer_error == "relative"


@dataclass
class Point:
    """One evaluated configuration: its parameters, thresholds and proxy figures."""

    params: dict
    tau_in: list[float]
    tau_mid: list[float]
    lam: float
    gam: float
    tau_s: float
    tau_H: float
    figures: dict = field(default_factory=dict)
    number: int = -1
    centred: list[bool] = field(default_factory=list)  # per layer: input side compensated (empty: none)
    prefix: float = 0.0  # exponent of the prompt prior on both MLP sides (0: none)
    rule: str = "threshold"  # the sparsity rule whose tables gave the thresholds (``searched_rules``)
    predicted: list[bool] = field(default_factory=list)  # mixed rule: per layer whether the predictor decides it


def rules_of(calibration_rule: str) -> tuple[str, ...]:
    """The sparsity rules a recipe's ``calibration.rule`` measures tables for ("auto": both)."""
    return ("threshold", "predictor") if calibration_rule == "auto" else (calibration_rule,)


def searched_rules(measured: tuple[str, ...]) -> tuple[str, ...]:
    """The rules a search over the tables of the ``measured`` rules picks from: those, and, where the threshold and
    the predictor rule's tables are both there, the mixed rule (``MIXED``)."""
    return measured + ((MIXED,) if {"threshold", "predictor"} <= set(measured) else ())


class ThresholdSearch:
    """Turns trial parameters into thresholds, and scores the artifact of each point (``artifact_of``) with a
    ProxyEvaluator. ``tables``: the per-layer error tables of the one rule ``settings.rules`` names, or a mapping
    of each of its rules to theirs; ``rules``: what trials pick from (``searched_rules``), their tables
    ``rule_tables``."""

    def __init__(self, tables: list[LayerTable] | dict[str, list[LayerTable]], residual_ratio: torch.Tensor,
                 evaluator: ProxyEvaluator, settings: SearchSettings, artifact_of: Callable[[Point], Artifact]):
        self.rule_tables = dict(tables) if isinstance(tables, dict) else {settings.rules[0]: tables}
        if set(self.rule_tables) != set(settings.rules):
            raise ValueError(f"tables of the rules {sorted(self.rule_tables)}; the settings name {settings.rules}")
        self.tables = self.rule_tables[settings.rules[0]]
        self.rules = searched_rules(settings.rules)
        if MIXED in self.rules:
            self.rule_tables[MIXED] = mixed_tables(self.rule_tables["threshold"], self.rule_tables["predictor"])
        self.residual_ratio, self.evaluator, self.settings = residual_ratio, evaluator, settings
        self.artifact_of = artifact_of
        self.surprisal, self.entropy = evaluator.signals()

    def rule_of(self, params: dict) -> str:
        """The sparsity rule of trial parameters ``params`` (the settings' first where they name none)."""
        return params.get(RULE_PARAM, self.settings.rules[0])

    def tables_of(self, params: dict, plain: bool = False) -> list[LayerTable]:
        """The error tables ``params`` allocate from (``plain``: their uncompensated rows only)."""
        tables = self.rule_tables[self.rule_of(params)]
        return [t.plain() for t in tables] if plain else tables

    def _budgets(self, params: dict) -> tuple[torch.Tensor, torch.Tensor, str]:
        """Per-layer budgets (L,), error weights (L,) and allocation rule of ``params``."""
        L = len(self.tables)
        depth = torch.linspace(-0.5, 0.5, L) if L > 1 else torch.zeros(1)
        rule = "marginal" if "price" in params else "budget"
        budgets = params.get("price", params.get("budget")) * torch.exp(params.get("depth_slope", 0.0) * depth)
        weights = self.residual_ratio ** params.get("mix", 1.0) if self.settings.weighs_residual else torch.ones(L)
        return budgets, weights, rule

    def point(self, params: dict, tables: list[LayerTable] | None = None) -> Point:
        """Thresholds and adaptation parameters for ``params`` (no evaluation); ``tables``: other error tables of
        the same layers to allocate from (default: the search's)."""
        tables = tables or self.tables_of(params)
        tau_in, tau_mid, centred, predicted = cell_values(tables, allocation_cells(tables, *self._budgets(params)))
        q_s, q_H = params.get("q_s", 1.0), params.get("q_H", 1.0)
        return Point(
            params=dict(params), tau_in=tau_in.tolist(), tau_mid=tau_mid.tolist(), centred=centred.tolist(),
            predicted=predicted.tolist() if self.rule_of(params) == MIXED else [],
            lam=params.get("lam", 0.0), gam=params.get("gam", 0.0), prefix=params.get("prefix", 0.0),
            rule=self.rule_of(params), tau_s=float(torch.quantile(self.surprisal, q_s)) if q_s < 1 else 1e6,
            tau_H=float(torch.quantile(self.entropy, q_H)) if q_H < 1 else 1.0,
        )

    def point_at_saved(self, params: dict, target: float, plain: bool = False) -> Point:
        """The point of ``params`` with the price (marginal rule) set so that the error tables skip ``target`` of
        the MLP bytes at the base thresholds (the nearest the tables allow; per-token relaxation then skips a
        little less): the search's allocation, shape and adaptation at another level. ``plain``: allocate from
        the tables' uncompensated rows only (the no-compensation ablation at the same level)."""
        tables = self.tables_of(params, plain)
        shape = {k: v for k, v in params.items() if k not in ("price", "budget", "rule")}

        def saved(log_price: float) -> float:
            return self.level_of({**shape, "price": math.exp(log_price)}, tables)

        lo, hi = math.log(1e-7), math.log(10.0)  # saved grows with the price
        for _ in range(40):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if saved(mid) < target else (lo, mid)
        price = math.exp(hi if abs(saved(hi) - target) <= abs(saved(lo) - target) else lo)
        return self.point({**shape, "price": price}, tables)

    def level_of(self, params: dict, tables: list[LayerTable] | None = None) -> float:
        """The share of MLP bytes the error tables (default: those of ``params``' rule) skip at the base thresholds
        of ``params`` (point_at_saved's target)."""
        tables = tables or self.tables_of(params)
        return tables_saved(tables, allocation_cells(tables, *self._budgets(params)))

    def without_adaptation(self, point: Point, steps: int = 2) -> Point:
        """The no-adaptation counterpart of the evaluated ``point``: its allocation shape with lam = gam = 0, its
        level moved (up to ``steps`` secant steps) so that it reads as many MLP bytes on the search documents as
        ``point`` does; evaluated. Relaxed tokens read more, so the counterpart's base thresholds skip less."""
        params, reads = {**point.params, "lam": 0.0, "gam": 0.0}, point.figures["mlp_reads_saved"]
        target = reads
        for _ in range(steps):
            plain = self.evaluate(self.point_at_saved(params, target))
            miss = reads - plain.figures["mlp_reads_saved"]
            if abs(miss) < READS_TOLERANCE:
                break
            target += miss
        return plain

    def point_of(self, trial: optuna.trial.FrozenTrial) -> Point:
        """The point a completed trial evaluated: its stored thresholds (``POINT_ATTRS``), or, for trials of
        studies from before they were stored, recomputed from its parameters."""
        if all(key in trial.user_attrs for key in POINT_ATTRS):
            attrs = {key: trial.user_attrs[key] for key in POINT_ATTRS}
            point = Point(params=dict(trial.params), lam=trial.params.get("lam", 0.0),
                          gam=trial.params.get("gam", 0.0), prefix=trial.params.get("prefix", 0.0),
                          rule=self.rule_of(trial.params), number=trial.number,
                          predicted=list(trial.user_attrs.get(PREDICTED_ATTR, [])), **attrs)
        else:
            point = self.point(trial.params)
            point.number = trial.number
        point.figures = {k: trial.user_attrs[k] for k in FIGURE_KEYS if k in trial.user_attrs}
        return point

    def score(self, point: Point, evaluator: ProxyEvaluator | None = None) -> dict:
        """Proxy figures of ``point``'s artifact on ``evaluator``'s documents (default: the search documents)."""
        return (evaluator or self.evaluator)(self.artifact_of(point))

    def evaluate(self, point: Point) -> Point:
        figures = self.score(point)
        point.figures = {k: figures[k] for k in FIGURE_KEYS}
        return point

    def suggest(self, trial: optuna.Trial) -> dict:
        rule = self.settings.allocation
        if rule == "both":
            rule = trial.suggest_categorical("rule", ["marginal", "budget"])
        if rule == "marginal":
            params = {"price": trial.suggest_float("price", *self.settings.price_range, log=True)}
        else:
            params = {"budget": trial.suggest_float("budget", *self.settings.budget_range, log=True)}
        params["depth_slope"] = trial.suggest_float("depth_slope", -2.0, 2.0)
        if self.settings.weighs_residual:
            params["mix"] = trial.suggest_float("mix", 0.0, 1.0)
        if self.settings.adapt:
            params.update(lam=trial.suggest_float("lam", -1.0, 0.0), gam=trial.suggest_float("gam", -1.0, 0.0),
                          q_s=trial.suggest_float("q_s", 0.5, 0.99), q_H=trial.suggest_float("q_H", 0.5, 0.99))
        if self.settings.prefix:
            params["prefix"] = trial.suggest_float("prefix", 0.0, 1.0)
        if len(self.rules) > 1:
            params[RULE_PARAM] = trial.suggest_categorical(RULE_PARAM, list(self.rules))
        return params

    def trial_attrs(self, point: Point) -> dict:
        """The user attributes a trial of the evaluated ``point`` stores: its proxy figures, its thresholds (so that a
        report or benchmark rebuilds it without the error tables) and its constraint violation."""
        return {**point.figures, **{key: getattr(point, key) for key in POINT_ATTRS},
                **({PREDICTED_ATTR: point.predicted} if point.predicted else {}),
                "constraint": point.figures["ppl_increase"] - self.settings.max_ppl_increase}

    def objective(self, trial: optuna.Trial) -> float:
        point = self.evaluate(self.point(self.suggest(trial)))
        attrs = self.trial_attrs(point)
        for key, value in attrs.items():
            trial.set_user_attr(key, value)
        if _NATIVE_CONSTRAINTS:
            trial.set_constraint("ppl_increase", attrs["constraint"])
        return point.figures["mlp_reads_saved"]

    def add_derived(self, study: optuna.Study, point: Point, source: optuna.trial.FrozenTrial) -> optuna.trial.FrozenTrial:
        """Store the evaluated ``point``, derived from trial ``source`` by the validation, as a completed trial of
        ``study`` (marked ``DERIVED_ATTR``; the search neither counts nor samples from it as its own)."""
        dists = {}  # the source's, for the point's parameters (a level moved by point_at_saved is a price)
        for key, value in point.params.items():
            d = source.distributions.get(key)
            if d is None or (isinstance(d, optuna.distributions.FloatDistribution)
                             and not d.low <= value <= d.high):  # a level the search's range does not hold
                low, high = (d.low, d.high) if d is not None else self.settings.price_range
                d = optuna.distributions.FloatDistribution(min(low, value), max(high, value),
                                                           log=d.log if d is not None else True)
            dists[key] = d
        attrs = {**self.trial_attrs(point), DERIVED_ATTR: source.number}
        study.add_trial(optuna.trial.create_trial(params=point.params, distributions=dists,
                                                  value=point.figures["mlp_reads_saved"], user_attrs=attrs))
        return study.trials[-1]


_NATIVE_CONSTRAINTS = hasattr(optuna.trial.Trial, "set_constraint")  # optuna >= 5


def _constraint(trial: optuna.trial.FrozenTrial) -> list[float]:
    return [trial.user_attrs.get("constraint", math.inf)]


def warm_start_points(settings: SearchSettings) -> list[dict]:
    """The first trials of every study: no-adaptation points across budgets, then two with the
    'thresholds halved on the 30% most surprising tokens' adaptation at higher base budgets (all without a prompt
    prior), then (``prefix``) two with the prompt prior at exponents 0.25 and 0.5; with several sparsity rules, each
    of these once per rule (``searched_rules``)."""
    marginal = settings.allocation != "budget"
    key, levels, adaptive = (("price", (1.5e-3, 3e-3, 5e-3, 1e-2), (5e-3, 7.5e-3)) if marginal else
                             ("budget", (1e-4, 3e-4, 1e-3, 3e-3), (6e-4, 1e-3)))
    rule = {"rule": "marginal" if marginal else "budget"} if settings.allocation == "both" else {}
    shape = {"depth_slope": 0.0, **({"mix": 1.0} if settings.weighs_residual else {})}
    points = []
    for level in levels:
        params = {**rule, key: level, **shape}
        if settings.adapt:
            params.update(lam=0.0, gam=0.0, q_s=0.9, q_H=0.9)
        points.append(params)
    if settings.adapt:
        for level in adaptive:
            points.append({**rule, key: level, **shape, "lam": -0.5, "gam": 0.0, "q_s": 0.7, "q_H": 0.9})
    if settings.prefix:
        points = [{**p, "prefix": 0.0} for p in points]
        for level, alpha in zip(levels[1:3], (0.25, 0.5)):
            points.append({**points[levels.index(level)], "prefix": alpha})
    rules = searched_rules(settings.rules)
    if len(rules) > 1:
        points = [{**p, RULE_PARAM: rule} for p in points for rule in rules]
    return points


SLOT_ATTR = "slot"  # user attribute: the trial's slot, 0 .. trials-1
WORKER_ATTR = "worker"  # user attribute: host:pid of the process that ran the trial
POLL_S = 0.5        # how often a worker with nothing to claim checks whether other workers' trials finished
_LIVE = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.RUNNING)


def _sampler(settings: SearchSettings, slot: int) -> optuna.samplers.BaseSampler:
    """A TPE sampler seeded by (seed, slot). A slot is the smallest index not held by a completed or running
    trial, so one worker's n-th completed trial is slot n and a run resumed after an interruption proposes
    exactly what an uninterrupted run would have; concurrent workers never share a slot, hence never a seed."""
    extra = {} if _NATIVE_CONSTRAINTS else {"constraints_func": _constraint}
    return optuna.samplers.TPESampler(seed=settings.seed * 1_000_003 + slot, n_startup_trials=10, **extra)


def _sampled(trials: list[optuna.trial.FrozenTrial]) -> list[optuna.trial.FrozenTrial]:
    """The trials the search proposed (not those the validation derived from them)."""
    return [t for t in trials if DERIVED_ATTR not in t.user_attrs]


def _completed(study: optuna.Study) -> int:
    return sum(t.state == optuna.trial.TrialState.COMPLETE for t in _sampled(study.get_trials(deepcopy=False)))


def fail_stale_trials(study: optuna.Study) -> int:
    """Mark trials left RUNNING by a killed process as FAIL (single-process storages only); return how many."""
    stale = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.RUNNING]
    for t in stale:
        study.tell(t.number, state=optuna.trial.TrialState.FAIL)
    return len(stale)


def fail_expired_trials(study: optuna.Study) -> None:
    """Shared storages: mark FAIL the running trials whose heartbeat is older than the grace period (dead workers)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def claim_trial(study: optuna.Study, settings: SearchSettings) -> optuna.Trial | None:
    """Start the next trial, or return None when completed + running trials already reach ``settings.trials``.

    Call under ``study_lock``: the count, the slot choice and the ask are then atomic across workers, so
    several workers never overshoot the trial count nor share a slot. Warm-start slots get fixed parameters.
    """
    trials = study.get_trials(deepcopy=False)
    for _ in (t for t in trials if t.state == optuna.trial.TrialState.WAITING):
        study.tell(study.ask(), state=optuna.trial.TrialState.FAIL)  # enqueued by a worker killed before its ask
    live = [t for t in _sampled(trials) if t.state in _LIVE]
    if len(live) >= settings.trials:
        return None
    used = {t.user_attrs.get(SLOT_ATTR, t.number) for t in live}  # studies from before slots: number = slot
    slot = next(i for i in range(len(live) + 1) if i not in used)
    warm = warm_start_points(settings)
    study.sampler = _sampler(settings, slot)
    study.enqueue_trial(warm[slot] if slot < len(warm) else {},
                        user_attrs={SLOT_ATTR: slot, WORKER_ATTR: f"{socket.gethostname()}:{os.getpid()}"})
    with warnings.catch_warnings():  # optuna warns that heartbeats are meant for study.optimize; we send them
        warnings.filterwarnings("ignore", message="Heartbeat")
        trial = study.ask()
    if is_heartbeat_enabled(study._storage):  # from its claim on, a dead worker's trial expires
        study._storage.record_heartbeat(trial._trial_id)
    return trial


def run_trial(study: optuna.Study, trial: optuna.Trial, search: ThresholdSearch) -> None:
    """Evaluate a claimed trial (sending heartbeats on shared storages) and tell the study; on any error or
    interruption the trial is told FAIL, so that its slot is redone."""
    try:
        with get_heartbeat_thread(trial._trial_id, study._storage):
            value = search.objective(trial)
    except BaseException:
        with contextlib.suppress(Exception):
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
        raise
    study.tell(trial, value)


def run_search(search: ThresholdSearch, progress: bool = True) -> optuna.Study:
    """Run (or resume, or join) the study until it holds ``settings.trials`` completed trials.

    With the default SQLite file (one process) trials left running by a killed run are marked failed and
    redone. Workers sharing a PostgreSQL study claim trials under a lock and run exactly ``settings.trials``
    between them; a worker with nothing left to claim waits for the others' trials, so every worker returns
    the same complete study. A dead worker's trial is failed once its heartbeat is stale, and redone.
    """
    s = search.settings
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = open_storage(s.storage)
    study = optuna.create_study(study_name=s.study_name, storage=storage, sampler=_sampler(s, 0),
                                direction="maximize", load_if_exists=True)
    shared = is_shared(s.storage)
    if not shared:
        fail_stale_trials(study)
    done = _completed(study)
    bar = tqdm(total=s.trials, initial=min(done, s.trials), desc="optuna search", unit="trial", disable=not progress)
    while done < s.trials:
        if shared:
            fail_expired_trials(study)
        with study_lock(storage, s.study_name):
            trial = claim_trial(study, s)
        if trial is None:
            time.sleep(POLL_S)
        else:
            run_trial(study, trial, search)
        done = _completed(study)
        bar.n = min(done, s.trials)
        best = best_feasible(study)
        if best is not None:
            bar.set_postfix(best_reads=f"{best.user_attrs['mlp_reads_saved']:.3f}",
                            ppl=f"{best.user_attrs['ppl_increase']:+.3f}")
        bar.refresh()
    bar.close()
    return study


def feasible_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE
            and t.user_attrs.get("constraint", math.inf) <= 0]


def best_feasible(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    trials = feasible_trials(study)
    return max(trials, key=lambda t: (t.value, -t.user_attrs["ppl_increase"])) if trials else None


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of (reads_saved, ppl_increase) points not dominated (more saved and less increase)."""
    order = sorted(range(len(points)), key=lambda i: (-points[i][0], points[i][1]))
    front, best_ppl = [], math.inf
    for i in order:
        if points[i][1] < best_ppl:
            front.append(i)
            best_ppl = points[i][1]
    return sorted(front, key=lambda i: points[i][0])


VALIDATION_ATTR = "validation"  # study user attribute: the validated choice and what it depended on


def stored_validated_choice(study: optuna.Study, search: ThresholdSearch,
                            make_validator: Callable[[], ProxyEvaluator | None], candidates: int,
                            validation_weight: float, validation_docs: int, fill_steps: int = 0,
                            on_check: Callable[[dict], None] | None = None
                            ) -> tuple[optuna.trial.FrozenTrial | None, list[dict], bool]:
    """``validated_choice``, made once per set of trials: it is stored in the study with what it depends on (the
    sampled feasible trials, the candidates, the validation documents, the fill steps), so that a rerun of a
    finished study reuses it without building the validator (``make_validator`` is called only when it
    validates). Workers sharing a study validate it under the study's lock: the first validates (so a point the
    validation adds is added once), the others reuse its choice. The third value says whether it was reused."""
    settings = search.settings
    with study_lock(open_storage(settings.storage) if is_shared(settings.storage) else None, settings.study_name):
        key = {"feasible": sorted(t.number for t in _sampled(feasible_trials(study))), "candidates": candidates,
               "validation_docs": validation_docs, "weight": validation_weight,
               "max_ppl_increase": settings.max_ppl_increase, "fill_steps": fill_steps}
        stored = study.user_attrs.get(VALIDATION_ATTR)
        if isinstance(stored, dict) and stored.get("key") == key:
            best = next((t for t in study.trials if t.number == stored["trial"]), None)
            return best, stored["checks"], True
        best, checks = validated_choice(study, search, make_validator(), candidates, validation_weight, fill_steps,
                                        on_check)
        study.set_user_attr(VALIDATION_ATTR, {"key": key, "trial": best.number if best else None, "checks": checks})
    return best, checks, False


def validated_choice(study: optuna.Study, search: ThresholdSearch, validator: ProxyEvaluator | None,
                     candidates: int, validation_weight: float = 0.5, fill_steps: int = 0,
                     on_check: Callable[[dict], None] | None = None
                     ) -> tuple[optuna.trial.FrozenTrial | None, list[dict]]:
    """The artifact's trial, chosen against the winner's curse, and the checks made (one dict per point scored on
    the validation documents; the chosen one has ``chosen: True``).

    Picking the feasible trial with the most reads saved favours trials whose ppl_increase the search
    documents happen to underestimate. So the feasible Pareto-front trials are re-scored, most reads saved
    first, on ``validator``'s documents (never seen by the search); the first whose ppl_increase averaged
    over search and validation documents (validation weighted ``validation_weight``, e.g. its share of all
    those documents) stays within the budget is chosen. A candidate with adaptation is also compared with its
    no-adaptation counterpart at the same reads saved (``ThresholdSearch.without_adaptation``; a paired
    comparison, far less noisy than the two points' distance to the budget): the one with the smaller ppl_increase
    on the validation documents (the search documents favour the sampled point, which the search fitted to them)
    stands for the candidate, so the validation drops adaptation where it does not pay. The chosen point
    is then moved up in level (``fill_steps`` bisection steps towards the last candidate that failed, or 0.05 more
    reads saved) while it stays within the budget. A point the validation made is added to the study
    (``ThresholdSearch.add_derived``). Without a validator this is ``best_feasible``. When none of the first
    ``candidates`` passes, the checked point with the smallest averaged ppl_increase is returned; None when no
    trial is feasible. ``on_check`` is called with each check as it is made (progress).
    """
    if validator is None:
        return best_feasible(study), []
    feasible = _sampled(feasible_trials(study))
    order = pareto_front([(t.value, t.user_attrs["ppl_increase"]) for t in feasible])[::-1]  # most reads first
    budget = search.settings.max_ppl_increase
    checks: list[dict] = []
    scored: list[tuple[Point, optuna.trial.FrozenTrial]] = []

    def check(point: Point, source: optuna.trial.FrozenTrial, variant: str) -> dict:
        figures = search.score(point, validator)
        averaged = (1 - validation_weight) * point.figures["ppl_increase"] + validation_weight * figures["ppl_increase"]
        checks.append({"trial": source.number, "variant": variant, "mlp_reads_saved": point.figures["mlp_reads_saved"],
                       "search_ppl_increase": point.figures["ppl_increase"],
                       "validation_ppl_increase": figures["ppl_increase"], "averaged_ppl_increase": averaged,
                       "passes": averaged <= budget, "chosen": False})
        scored.append((point, source))
        if on_check is not None:
            on_check(checks[-1])
        return checks[-1]

    def chosen(index: int) -> optuna.trial.FrozenTrial:
        checks[index]["chosen"] = True
        point, source = scored[index]
        return source if checks[index]["variant"] == "searched" else search.add_derived(study, point, source)

    upper = None  # reads saved of the last candidate that failed: where the fill stops
    for i in order[:candidates]:
        trial = feasible[i]
        point = search.point_of(trial)
        best = len(checks)
        check(point, trial, "searched")
        if search.settings.adapt and (point.lam or point.gam):
            check(search.without_adaptation(point), trial, "no adaptation")
            if checks[-1]["validation_ppl_increase"] < checks[best]["validation_ppl_increase"]:
                best = len(checks) - 1
        if checks[best]["passes"]:
            return chosen(_fill(search, check, scored, checks, best, upper, fill_steps)), checks
        upper = checks[best]["mlp_reads_saved"]
    if not checks:
        return None, checks
    return chosen(min(range(len(checks)), key=lambda j: checks[j]["averaged_ppl_increase"])), checks


def _fill(search: ThresholdSearch, check: Callable, scored: list, checks: list[dict], best: int, upper: float | None,
          steps: int) -> int:
    """Bisect the level of the passing check ``best`` upwards (its allocation shape and adaptation, the tables'
    level between its own and ``upper`` reads saved, or 0.05 more) for ``steps`` steps; the index of the passing
    check with the most reads saved."""
    if not steps:
        return best
    point, source = scored[best]
    lo = search.level_of(point.params)
    hi = lo + (max(upper - checks[best]["mlp_reads_saved"], 0.01) if upper is not None else 0.05)
    for _ in range(steps):
        mid = (lo + hi) / 2
        if check(search.evaluate(search.point_at_saved(point.params, mid)), source, "filled")["passes"]:
            lo, best = mid, len(checks) - 1
        else:
            hi = mid
    return best
