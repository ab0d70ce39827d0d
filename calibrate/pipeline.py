"""The calibration job: recipe -> measurements -> search -> artifact + held-out evaluation + reports."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from .. import __version__, runtime
from ..artifacts import Artifact, save_artifact, write_atomic
from .data import load_documents
from .evaluate import QUALITY_BACKEND, ProxyEvaluator, generation_eval
from .measure import (LayerTable, attention_thresholds, build_tables, channel_weights, collect_mlp_inputs, input_centers,
                      output_gradients, predictor_tables, residual_ratios)
from .models import load_model
from .recipe import Recipe
from .report import HEADLINE_KEYS, write_reports
from .search import (DERIVED_ATTR, MIXED, POINT_ATTRS, PREDICTED_ATTR, SLOT_ATTR, WORKER_ATTR, Point,
                     SearchSettings, ThresholdSearch,
                     feasible_trials, pareto_front, rules_of, run_search, searched_rules, stored_validated_choice)
from .splits import token_splits
from .storage import is_shared, open_storage, redact

ARTIFACT_NAME = "clada.safetensors"
MEASUREMENTS_NAME = "measurements.safetensors"  # beside the study: a rerun with the same model and settings reuses it
# Bump when a code change alters what the calibration stores for the same model, data and recipe (an error table, a
# trial's value): stored measurements and studies of another format are then measured again instead of reused (the
# package version, in the measurements' key, is not bumped with such changes). Format 1, the code from before this
# constant, adds nothing to either identity, so what it stored stays valid.
CALIBRATION_FORMAT = 1
REGIME = "dense prefill of {p} prompt tokens, then {s} tokens fed one at a time with KV cache and adaptive sparse MLPs"


def study_name(recipe: Recipe) -> str:
    """Study identity: everything that changes what a trial computes (not output, storage or trial count)."""
    d = recipe.to_dict()
    d.pop("output")
    if not d["calibration"]["attention_sparsity"]:  # attention dense: the same study as before the setting existed
        d["calibration"].pop("attention_sparsity")
    if not d["search"]["prefix"]:  # no prompt prior: likewise
        d["search"].pop("prefix")
    rules = searched_rules(rules_of(d["calibration"]["rule"]))
    d["calibration"] = _error_identity(d["calibration"])
    if MIXED in rules:  # trials pick among more rules than the studies from before the mixed rule
        d["search"]["rules"] = list(rules)
    d["search"] = {k: v for k, v in d["search"].items() if k not in ("storage", "trials", "validation_docs", "candidates",
                                                                        "fill_steps")}
    d.pop("eval")
    d.update(_format_identity())
    return "clada-" + hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


def _format_identity() -> dict:
    """``CALIBRATION_FORMAT`` as an identity entry (none for format 1)."""
    return {} if CALIBRATION_FORMAT == 1 else {"format": CALIBRATION_FORMAT}


def _error_identity(calibration: dict) -> dict:
    """The calibration settings without the keys a recipe from before they existed did not have: the layer-error
    keys when the error is relative, the rule when it is the threshold rule (the identity of studies and
    measurements made before); with the predictor rule (or auto) the copy's scale choice where it is not absmax, the
    one of the studies made before it existed."""
    threshold = calibration.get("rule", "threshold") == "threshold"
    left = ("rule",) if threshold else ()
    if calibration["layer_error"] == "relative":
        left += ("layer_error", "gradient_samples")
    kept = {k: v for k, v in calibration.items() if k not in left}
    if not threshold and runtime.PREDICTOR_SCALES != runtime.PREDICTOR_UNNAMED_SCALES:
        kept["predictor_scales"] = runtime.PREDICTOR_SCALES  # the predictor's tables depend on its copy's scales
    return kept


def _log(msg: str) -> None:
    print(f"clada: {msg}", flush=True)


@dataclass
class Measurements:
    """Channel score weights (L, D) and (L, I), per-layer error tables, residual ratios (L,) and, with compensation,
    the input centers (L, D) the tables' centred rows use. ``tables``: the recipe's rule's (``calibration.rule:
    auto``: the threshold rule's); ``predictor_tables``: the predictor rule's beside them (auto only)."""

    weight_in: torch.Tensor
    weight_mid: torch.Tensor
    tables: list
    ratios: torch.Tensor
    centers: torch.Tensor | None = None
    predictor_tables: list | None = None

    def rule_tables(self, rules: tuple[str, ...]) -> dict[str, list]:
        """The tables of each of ``rules`` (``search.rules_of`` of the recipe they were measured for)."""
        return {rules[0]: self.tables, **({rules[1]: self.predictor_tables} if len(rules) > 1 else {})}

    def save(self, path: Path, key: str) -> None:
        """Write them (safetensors, atomically) with ``key``: what they were measured from."""
        tensors = {"weight_in": self.weight_in, "weight_mid": self.weight_mid, "ratios": self.ratios}
        if self.centers is not None:
            tensors["centers"] = self.centers
        for prefix, tables in (("table", self.tables), ("predictor_table", self.predictor_tables or [])):
            for layer, table in enumerate(tables):
                tensors.update({f"{prefix}.{layer}.{f.name}": getattr(table, f.name) for f in dataclasses.fields(table)})
        write_atomic(path, save({k: v.detach().cpu().clone() for k, v in tensors.items()}, metadata={"key": key}))

    @classmethod
    def load(cls, path: Path, key: str) -> Measurements | None:
        """The measurements ``save`` wrote to ``path`` with the same ``key``, else None."""
        try:
            with safe_open(str(path), "pt") as fh:
                if fh.metadata().get("key") != key:
                    return None
                t = {name: fh.get_tensor(name) for name in fh.keys()}
        except (OSError, SafetensorError):
            return None
        layers = len(t["ratios"])

        def tables(prefix: str) -> list[LayerTable]:
            return [LayerTable(**{f.name: t[f"{prefix}.{l}.{f.name}"] for f in dataclasses.fields(LayerTable)
                                  if f"{prefix}.{l}.{f.name}" in t}) for l in range(layers)]

        return cls(t["weight_in"], t["weight_mid"], tables("table"), t["ratios"], t.get("centers"),
                   tables("predictor_table") if "predictor_table.0.error" in t else None)


def measurement_key(recipe: Recipe, identity: dict, fingerprint: torch.Tensor, data_sha256: str) -> str:
    """What the measurements depend on: the model's weights, the documents, and every recipe setting that picks
    the activation documents or shapes the tables."""
    settings = {"version": __version__, "model": identity, "fingerprint": fingerprint.tolist(), "data": data_sha256,
                "calibration": {k: v for k, v in _error_identity(dataclasses.asdict(recipe.calibration)).items()
                                if k != "attention_sparsity"},  # the attention thresholds are not measurements
                "device": torch.device(recipe.device).type,
                **{k: getattr(recipe, k) for k in ("dtype", "seed", "prompt_tokens", "scored_tokens", "heldout_fraction")},
                **_format_identity()}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def measure(recipe: Recipe, model, adapter, act_tokens: torch.Tensor, progress: bool = True) -> Measurements:
    """The offline measurements on the dense model that the search allocates thresholds from."""
    weight_in, weight_mid = channel_weights(model, adapter, recipe.calibration.score)
    c = recipe.calibration
    inputs = collect_mlp_inputs(model, adapter, act_tokens, recipe.prompt_tokens, c.activation_tokens)
    rules = rules_of(c.rule)
    centers = input_centers(inputs) if c.compensation and "threshold" in rules else None
    grads = None
    if c.layer_error == "kl":
        grads = output_gradients(model, adapter, act_tokens, recipe.prompt_tokens, c.activation_tokens,
                                 c.gradient_samples, seed=recipe.seed, progress=progress)
    grid = torch.tensor(c.q_in), torch.tensor(c.q_mid)
    tables = {}
    for rule in rules:
        if rule == "predictor":
            tables[rule] = predictor_tables(model, adapter, inputs, weight_in, weight_mid, *grid, progress=progress,
                                            grads=grads)
        else:
            tables[rule] = build_tables(model, adapter, inputs, weight_in, weight_mid, *grid, progress=progress,
                                        centers=centers, grads=grads)
    del inputs, grads
    ratios = residual_ratios(model, adapter, act_tokens[:8], recipe.prompt_tokens)
    return Measurements(weight_in, weight_mid, tables[rules[0]], ratios, centers,
                        tables[rules[1]] if len(rules) > 1 else None)


def rule_metadata(rule: str, predicted: list[bool] | None = None) -> dict:
    """The artifact's ``rule`` metadata of a sparsity rule the search picks from (``Point.rule``; ``predicted``: the
    mixed rule's layers the predictor decides, ``Point.predicted``)."""
    if rule in ("predictor", MIXED):
        copy = {"bits": runtime.PREDICTOR_BITS, "group": runtime.PREDICTOR_GROUP, "scales": runtime.PREDICTOR_SCALES}
        return {"name": rule, **copy, **({"predicted": list(predicted or [])} if rule == MIXED else {})}
    return {"name": "threshold"}


def point_artifact(point: Point, weight_in: torch.Tensor, weight_mid: torch.Tensor, fingerprint: torch.Tensor,
                   centers: torch.Tensor | None = None, attention: dict[str, torch.Tensor] | None = None,
                   **metadata) -> Artifact:
    """The artifact of a search point (``metadata``: Artifact's model, recipe, data, signals dicts; the point's prompt
    prior exponent, if any, on both MLP sides of every layer); ``centers``
    (L, D): the input centers of the layers the point compensates (``point.centred``); ``attention``: the
    attention tensors (``measure.attention_thresholds``), the same for every point, or None (attention dense). Its
    ``rule`` metadata is the point's (``rule_metadata``)."""
    centred = torch.tensor(point.centred, dtype=torch.bool) if point.centred else None
    L = len(point.tau_in)
    prefix = {f"prefix_{side}": torch.full((L,), float(point.prefix)) for side in ("in", "mid")} if point.prefix else {}
    center_in = None
    if centers is not None and centred is not None and bool(centred.any()):
        center_in = torch.where(centred[:, None], centers.float(), torch.zeros(()))
    return Artifact(center_in=center_in,
        tau_base_in=torch.tensor(point.tau_in, dtype=torch.float32),
        tau_base_mid=torch.tensor(point.tau_mid, dtype=torch.float32),
        channel_weight_in=weight_in, channel_weight_mid=weight_mid, fingerprint=fingerprint,
        rule=rule_metadata(point.rule, point.predicted),
        lam=point.lam, gam=point.gam, tau_s=point.tau_s, tau_H=point.tau_H, **(attention or {}), **prefix, **metadata)


def _trial_rows(study) -> list[dict]:
    rows = []
    for t in study.trials:
        if t.state.name == "COMPLETE":
            rows.append({"trial": t.number, "params": t.params, "derived_from": t.user_attrs.get(DERIVED_ATTR),
                         **{k: t.user_attrs[k] for k in ("mlp_reads_saved", "ppl_increase", "kl", "relaxed_share")}})
    return rows


def run_calibration(recipe: Recipe, progress: bool = True) -> dict:
    """Run the whole job described by ``recipe``; write artifact and reports into ``recipe.output``."""
    torch.manual_seed(recipe.seed)
    out = Path(recipe.output)
    timings: dict[str, float] = {}
    t0 = time.time()
    if is_shared(recipe.search.storage):
        open_storage(recipe.search.storage)  # unreachable server or bad credentials: fail before the model loads

    _log(f"[1/6] model {recipe.model} and data {recipe.data}")
    model, tokenizer, checkpoint = load_model(recipe.model, recipe.dtype, recipe.device)
    adapter = runtime.adapter_for(model)
    docs = load_documents(recipe.data)
    splits = token_splits(recipe, tokenizer, docs.documents)
    calib, held, search_tokens = splits.calib, splits.held, splits.search
    length = recipe.prompt_tokens + recipe.scored_tokens + 1
    _log(f"      {calib.shape[0]} calibration / {held.shape[0]} held-out documents of >= {length} tokens")
    timings["load"] = time.time() - t0
    out.mkdir(parents=True, exist_ok=True)  # only once model and data are known to load

    t = time.time()
    identity = runtime.model_identity(model, adapter)
    fingerprint = runtime.mlp_fingerprint(model, adapter)
    key = measurement_key(recipe, identity, fingerprint, docs.identity["sha256"])
    measured = Measurements.load(out / MEASUREMENTS_NAME, key)
    if measured is None:
        _log(f"[2/6] measuring dense MLP activations ({recipe.calibration.activation_tokens} tokens per layer)")
        measured = measure(recipe, model, adapter, splits.act, progress)
        measured.save(out / MEASUREMENTS_NAME, key)
    else:
        _log(f"[2/6] dense MLP measurements of this model and recipe reused from {out / MEASUREMENTS_NAME}")
    weight_in, weight_mid, ratios = measured.weight_in, measured.weight_mid, measured.ratios
    timings["measure"] = time.time() - t

    attention = None
    if recipe.calibration.attention_sparsity:
        _log(f"      attention thresholds skipping {recipe.calibration.attention_sparsity:.0%} of the attention input "
             "and output channels per layer")
        attention = attention_thresholds(model, adapter, splits.act, recipe.prompt_tokens,
                                         recipe.calibration.activation_tokens, recipe.calibration.attention_sparsity,
                                         recipe.calibration.score)
    artifact_of = partial(point_artifact, weight_in=weight_in, weight_mid=weight_mid, fingerprint=fingerprint,
                          centers=measured.centers, attention=attention)

    t = time.time()
    _log(f"[3/6] dense reference on {search_tokens.shape[0]} search documents")
    evaluator = ProxyEvaluator(model, search_tokens, recipe.prompt_tokens, recipe.eval.batch_size)
    settings = SearchSettings.from_recipe(recipe, recipe.search.storage or f"sqlite:///{(out / 'study.db').resolve()}",
                                          study_name(recipe))
    search = ThresholdSearch(measured.rule_tables(settings.rules), ratios, evaluator, settings, artifact_of)
    _log(f"[4/6] Optuna search: {settings.trials} trials, maximise mlp_reads_saved s.t. "
         f"ppl_increase <= {settings.max_ppl_increase} (study {settings.study_name} in {redact(settings.storage)})")
    study = run_search(search, progress=progress)
    timings["search"] = time.time() - t

    t = time.time()
    n_val, n_search = splits.validation.shape[0], search_tokens.shape[0]

    def validator() -> ProxyEvaluator | None:
        if not n_val:
            return None
        _log(f"      validating the best trials on {n_val} validation documents")
        return ProxyEvaluator(model, splits.validation, recipe.prompt_tokens, recipe.eval.batch_size)

    def show(c: dict) -> None:
        _log(f"      trial {c['trial']} ({c.get('variant', 'searched')}): reads saved {c['mlp_reads_saved']:.3f}, "
             f"ppl_increase search {c['search_ppl_increase']:+.4f} validation {c['validation_ppl_increase']:+.4f} "
             f"-> {'within budget' if c['passes'] else 'over budget'}")

    best, checks, reused = stored_validated_choice(study, search, validator, recipe.search.candidates,
                                                   n_val / (n_val + n_search), n_val, recipe.search.fill_steps, show)
    if reused:
        _log("      validation of the best trials reused from the study (it has no new trials):")
        for c in checks:
            show(c)
    chosen = next((c for c in checks if c.get("chosen")), None)
    if chosen is not None:
        _log(f"      chosen: trial {best.number} ({chosen.get('variant', 'searched')} point of trial {chosen['trial']}),"
             f" reads saved {chosen['mlp_reads_saved']:.3f}")
    timings["validation"] = time.time() - t
    if checks and not any(c["passes"] for c in checks):
        _log("      warning: no checked trial met the budget on validation documents; using the closest")
    if best is None:
        best = min((tr for tr in study.trials if tr.state.name == "COMPLETE"), key=lambda tr: tr.user_attrs["ppl_increase"])
        _log("      warning: no trial met the quality constraint; using the one with the smallest ppl_increase")
    point = search.point_of(best)
    artifact = artifact_of(
        point,
        model={**identity, "spec": recipe.model, "checkpoint": str(checkpoint)},
        recipe=recipe.to_dict(),
        data={**docs.identity, "heldout_fraction": recipe.heldout_fraction, "split_seed": recipe.seed},
        signals={"surprisal": "-ln p(token fed) / ln|V|", "entropy": "-sum p ln p / ln|V|",
                 "multiplier": "max(0, 1 + lam*[s > tau_s] + gam*[H > tau_H])", "score": recipe.calibration.score},
    )
    runtime.apply(model, artifact, backend=QUALITY_BACKEND)

    t = time.time()
    _log(f"[5/6] held-out evaluation, generation regime ({held.shape[0]} docs x {recipe.scored_tokens} tokens)")
    heldout = generation_eval(model, held, recipe.prompt_tokens, recipe.eval.batch_size, progress=progress)
    timings["heldout_eval"] = time.time() - t
    runtime.remove(model)

    proxy = {k: v for k, v in best.user_attrs.items()
             if k not in (SLOT_ATTR, WORKER_ATTR, DERIVED_ATTR, PREDICTED_ATTR, *POINT_ATTRS)}  # figures only
    artifact.figures = {"heldout": {k: heldout[k] for k in HEADLINE_KEYS}, "calibration_proxy": proxy}
    _log(f"[6/6] writing {out / ARTIFACT_NAME} and reports")
    save_artifact(artifact, out / ARTIFACT_NAME)
    trials = _trial_rows(study)
    front = [trials[i] for i in pareto_front([(r["mlp_reads_saved"], r["ppl_increase"]) for r in trials])]
    timings["total"] = time.time() - t0
    report = {
        **{k: heldout[k] for k in HEADLINE_KEYS},
        "heldout": heldout,
        "regime": REGIME.format(p=recipe.prompt_tokens, s=recipe.scored_tokens)
                  + (" and attention projections" if artifact.has_attention else ""),
        "model": artifact.model,
        "data": {**artifact.data, "spec": recipe.data, "calibration_docs": int(calib.shape[0]),
                 "heldout_docs": int(held.shape[0])},
        "recipe": recipe.to_dict(),
        "residual_ratio": [round(v, 5) for v in ratios.tolist()],
        "chosen": {"trial": best.number, "derived_from": best.user_attrs.get(DERIVED_ATTR), "params": best.params,
                   "rule": point.rule, "lam": point.lam, "gam": point.gam,
                   "tau_s": point.tau_s, "tau_H": point.tau_H, "tau_base_in": point.tau_in,
                   "tau_base_mid": point.tau_mid, "compensated_layers": [l for l, c in enumerate(point.centred) if c],
                   "prefix": point.prefix,
                   **({"predicted_layers": [l for l, p in enumerate(point.predicted) if p]} if point.rule == MIXED
                      else {}),
                   "proxy": {k: best.user_attrs[k] for k in ("mlp_reads_saved", "ppl_increase", "kl", "relaxed_share")}},
        "search": {"study": settings.study_name, "storage": redact(settings.storage),
                   "trials": sum(r["derived_from"] is None for r in trials),
                   "feasible_trials": len(feasible_trials(study)), "max_ppl_increase": settings.max_ppl_increase,
                   "validation_docs": int(splits.validation.shape[0]), "validation": checks},
        "trials": trials,
        "pareto_front": front,
        "timings_s": timings,
        "clada_version": __version__,
        "artifact": str(out / ARTIFACT_NAME),
    }
    write_reports(report, out)
    return report
