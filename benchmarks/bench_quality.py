"""Sparsity-quality frontier on SmolLM2-135M: every baseline and CLADA on held-out lee and on enwiki.

    nice -n 15 python benchmarks/bench_quality.py            # about 35-45 min on 2 CPU cores

Writes results/quality/frontier.json (every figure), frontier.md (tables, the command at the top) and
frontier.png (ppl_increase vs mlp_reads_saved, one line per method, one panel per data set).

What is measured (recipe recipes/smollm2-135m-threshold.yaml: prompt 64, scored 128 tokens per document):
- data: the recipe's held-out lee documents (never seen by the calibration) and the first enwiki documents;
- baselines (clada.calibrate.baselines): uniform, teal, teal-greedy and cats are calibrated on the recipe's
  activation documents (the calibration's); griffin needs no calibration; each at several sparsity levels;
- CLADA: no new calibration. From the default calibration study (out/<name>/study.db) the default artifact's
  trial: its allocation shape (depth slope, mix) and adaptation, with the allocation's price moved so that the
  per-layer error tables (cached in the clada cache) skip each of CLADA_LEVELS of the MLP bytes
  (ThresholdSearch.point_at_saved; under calibration.rule auto each level takes the rule whose point there has the
  smaller KL on the search documents: level_rule), plus the default artifact file itself. At each level the ablations: without
  adaptation (lam = gam = 0: "clada-noadapt") and without compensation (allocated from the uncompensated rows
  at the same level: "clada-nocomp"). For the default artifact also the surprisal-only and entropy-only
  ablations, the threshold sensitivity (tau_s, tau_H +-0.2) and multiple choice (BIG-bench cause_and_effect and
  physical_intuition);
- regime: methods without adaptation are scored with clada.calibrate.evaluate.TeacherForcedEvaluator, exact
  for them (tests/test_baselines.py checks it against the token-by-token regime); adaptive CLADA points with
  generation_eval, token by token; greedy_agreement over 64 greedy tokens from 32 held-out lee prompts
  (--greedy-prompts; reused baseline rows get theirs re-measured when the earlier run used other prompts).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from functools import partial
from pathlib import Path

import optuna
import torch

from clada import runtime
from clada.artifacts import Artifact, ArtifactError, load_artifact, write_atomic
from clada.calibrate.baselines import THRESHOLD_BASELINES, CalibrationActivations, baseline_artifacts
from clada.calibrate.methods import METHODS, build_method, method_artifact
from clada.calibrate.cache import FetchError, cache_dir
from clada.calibrate.compare import threshold_sensitivity
from clada.calibrate.data import DataSpecError, load_documents
from clada.calibrate.evaluate import (QUALITY_BACKEND, ProxyEvaluator, Sparsifier, TeacherForcedEvaluator, generation_eval, greedy_agreement,
                                      greedy_tokens, tokenize_documents)
from clada.calibrate.models import load_model
from clada.calibrate.multiple_choice import load_questions, multiple_choice_eval
from clada.calibrate.pipeline import (ARTIFACT_NAME, MEASUREMENTS_NAME, Measurements, measure, measurement_key,
                                     point_artifact, study_name, token_splits)
from clada.calibrate.recipe import RecipeError, load_recipe
from clada.calibrate.search import RULE_PARAM, SearchSettings, ThresholdSearch, rules_of

sys.path.insert(0, str(Path(__file__).resolve().parent))
from frontier_report import render  # noqa: E402  (benchmarks/ is not a package)
from script_io import command_line  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
LEVELS = {name: list(spec.levels) for name, spec in METHODS.items() if spec.levels}  # sparsity levels per baseline
CLADA_LEVELS = (0.05, 0.10, 0.15, 0.20, 0.25, 0.30, 0.35, 0.40)  # reads saved in the error tables (base thresholds)
DATASETS = ("lee", "enwiki")
KEYS = ("ppl_increase", "kl", "mlp_reads_saved", "reads_saved", "mlp_sparsity", "input_sparsity", "relaxed_share", "dense_ppl")
MC_TASKS = ("bigbench:cause_and_effect", "bigbench:physical_intuition")
GREEDY_TOKENS = 64


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def default_of_study(parser: argparse.ArgumentParser, args) -> tuple[Path, Artifact]:
    """(study folder, its default artifact) of ``args.recipe`` and ``args.study_dir`` (default: the recipe's
    output), read before any model loads; a bad recipe or a missing or bad artifact is one error line, exit 2."""
    try:
        study_dir = Path(args.study_dir or ROOT / load_recipe(args.recipe).output)
        return study_dir, load_artifact(study_dir / ARTIFACT_NAME)
    except (RecipeError, ArtifactError) as exc:
        parser.error(str(exc))


def measurements(recipe, model, adapter, act_tokens: torch.Tensor, data_sha256: str, study_dir: Path | None = None
                 ) -> Measurements:
    """``pipeline.measure`` of the recipe under its ``measurement_key`` (model, documents ``data_sha256``, settings):
    the calibration's own (``study_dir``'s measurements file) where the key matches, else this cache's copy, else
    measured once and cached -- it is deterministic, and a new budget needs no new tables."""
    key = measurement_key(recipe, runtime.model_identity(model, adapter), runtime.mlp_fingerprint(model, adapter),
                          data_sha256)
    cached = cache_dir() / "tables" / f"{key[:16]}.safetensors"
    for path in ([study_dir / MEASUREMENTS_NAME] if study_dir is not None else []) + [cached]:
        found = Measurements.load(path, key)
        if found is not None:
            return found
    log("measuring per-layer error tables (once; cached)")
    m = measure(recipe, model, adapter, act_tokens, progress=False)
    cached.parent.mkdir(parents=True, exist_ok=True)
    m.save(cached, key)
    return m


class Bench:
    """Shared state of one benchmark run: model, data, dense references."""

    def __init__(self, args):
        self.args = args
        self.recipe = load_recipe(args.recipe)
        r = self.recipe
        self.model, self.tokenizer, _ = load_model(r.model, r.dtype, r.device)
        self.adapter = runtime.adapter_for(self.model)
        self.prompt = r.prompt_tokens
        lee = load_documents(r.data)
        self.data_sha256 = lee.identity["sha256"]
        self.splits = token_splits(r, self.tokenizer, lee.documents)
        length = r.prompt_tokens + r.scored_tokens + 1
        self.tokens = {"lee": self.splits.held[: args.docs],
                       "enwiki": tokenize_documents(self.tokenizer, load_documents("enwiki").documents, length,
                                                    max_docs=args.docs)}
        log(f"data: {', '.join(f'{k} {v.shape[0]} docs' for k, v in self.tokens.items())}; dense references")
        self.batch = args.batch_size
        self.reference = {k: TeacherForcedEvaluator(self.model, v, self.prompt, self.batch)
                          for k, v in self.tokens.items()}
        self.prompts = self.tokens["lee"][: args.greedy_prompts, : self.prompt]
        # dense greedy continuations (none where no greedy agreement is wanted: greedy_prompts 0)
        self.greedy_reference = (greedy_tokens(self.model, self.prompts, args.greedy_tokens) if args.greedy_prompts
                                 else None)
        self.measured: dict[str, dict] = {}  # decode digest -> row (evaluate_artifact)
        self.dense_ppl = {k: math.exp(torch.cat([b["nll_dense"] for b in ev.batches]).double().mean().item())
                          for k, ev in self.reference.items()}

    def evaluate_artifact(self, artifact: Artifact, label: str, level, extra: dict | None = None) -> dict:
        """``evaluate`` of CLADA with ``artifact``; one that decodes like an artifact this run already measured
        (``Artifact.decode_digest``: e.g. "clada-noadapt" of a point without adaptation) takes its figures."""
        key = artifact.decode_digest()
        done = self.measured.get(key)
        if done is not None:
            log(f"{label:16s} {level!s:>8s}: decodes like {done['method']} {done['level']}: figures reused")
            return {**{k: v for k, v in done.items() if k not in ("method", "level", "target", "default", "seconds")},
                    "method": label, "level": level, **(extra or {}), "same_as": f"{done['method']} {done['level']}"}
        row = self.evaluate(build_method("clada", self.model, artifact=artifact), label, level, extra)
        self.measured[key] = row
        return row

    def figures(self, method, data: str) -> dict:
        """``generation_eval``'s figures of an attached ``method`` on data set ``data`` (teacher forced, in one
        forward, where that is exact: without adaptation)."""
        if method.adaptive:
            return generation_eval(self.model, self.tokens[data], self.prompt, self.batch, progress=False,
                                   method=method, reference=self.reference[data])
        return self.reference[data](method)

    def evaluate(self, method, label: str, level, extra: dict | None = None) -> dict:
        """Figures of an attached ``method`` on both data sets and its greedy agreement; detaches it."""
        t = time.time()
        row = {"method": label, "level": level, **(extra or {})}
        try:
            for name in self.tokens:
                figures = self.figures(method, name)
                row[name] = {k: figures[k] for k in KEYS}
            row["greedy_agreement"] = greedy_agreement(self.model, self.prompts, method, self.args.greedy_tokens,
                                                       reference=self.greedy_reference)
        finally:
            method.remove()
        row["seconds"] = round(time.time() - t, 1)
        log(f"{label:16s} {level!s:>8s}: lee reads {row['lee']['mlp_reads_saved']:.3f} ppl+ {row['lee']['ppl_increase']:+.4f}"
            f" | enwiki reads {row['enwiki']['mlp_reads_saved']:.3f} ppl+ {row['enwiki']['ppl_increase']:+.4f}"
            f" | agree {row['greedy_agreement']:.3f} ({row['seconds']:.0f} s)")
        return row


def baseline_methods(bench: Bench, levels: dict):
    """(name, level, attached method) of every baseline point, one at a time (the caller removes each)."""
    r = bench.recipe
    calib = CalibrationActivations.collect(bench.model, bench.splits.act, r.prompt_tokens, r.calibration.activation_tokens)
    for name, qs in levels.items():
        if name in THRESHOLD_BASELINES:  # all levels from one greedy walk per layer
            for q, art in zip(qs, baseline_artifacts(name, bench.model, calib, qs)):
                runtime.apply(bench.model, art, backend=QUALITY_BACKEND)
                yield name, q, Sparsifier(bench.model)
        else:
            for q in qs:
                yield name, q, build_method(name, bench.model, sparsity=q, calibration=calib)


def run_baselines(bench: Bench, levels: dict) -> list[dict]:
    return [bench.evaluate(method, name, q) for name, q, method in baseline_methods(bench, levels)]


def regreedy(bench: Bench, rows: list[dict]) -> None:
    """Re-measure only the greedy agreement of reused baseline ``rows`` (in place), with this run's prompts."""
    by_point = {(r["method"], r["level"]): r for r in rows}
    levels = {name: [q for (m, q) in by_point if m == name] for name in LEVELS if any(m == name for m, _ in by_point)}
    for name, q, method in baseline_methods(bench, levels):
        t = time.time()
        try:
            agreement = greedy_agreement(bench.model, bench.prompts, method, bench.args.greedy_tokens,
                                         reference=bench.greedy_reference)
        finally:
            method.remove()
        by_point[(name, q)].update(greedy_agreement=agreement, greedy_remeasured=True)
        log(f"{name:16s} {q!s:>8s}: greedy agreement {agreement:.3f} on {bench.prompts.shape[0]} prompts "
            f"({time.time() - t:.0f} s)")
    if ("dense", 0.0) in by_point:
        by_point[("dense", 0.0)]["greedy_agreement"] = 1.0


BASELINES = ("dense", *LEVELS)


def reused_rows(path: Path, bench: Bench, measure_again: list[str]) -> tuple[list[dict], dict]:
    """Baseline rows of an earlier run (checked to share recipe, data and greedy settings) but those of the methods
    in ``measure_again``, plus its CLADA rows renamed 'clada-earlier' if that run's study differs from this
    recipe's (else its own 'clada-earlier' rows, each naming its study); and where they came from."""
    earlier = json.loads(path.read_text())
    r = bench.recipe
    same = {"recipe model/data/lengths/split": all(earlier["recipe"][k] == r.to_dict()[k] for k in
                                                   ("model", "data", "dtype", "prompt_tokens", "scored_tokens",
                                                    "heldout_fraction", "seed")),
            "documents": earlier["data"] == {k: int(v.shape[0]) for k, v in bench.tokens.items()}}
    if not all(same.values()):
        raise SystemExit(f"{path}: cannot reuse its baselines, it differs in " + ", ".join(k for k, v in same.items() if not v))
    rows = [{k: v for k, v in row.items() if k != "greedy_remeasured"}  # that flag says what this run re-measured
            for row in earlier["rows"] if row["method"] in BASELINES and row["method"] not in measure_again]
    if earlier["greedy"] != {"prompts": int(bench.prompts.shape[0]), "tokens": bench.args.greedy_tokens}:
        log(f"baselines: greedy agreement re-measured ({earlier['greedy']} before)")
        regreedy(bench, rows)
    if earlier["reconstruction"].get("study") != study_name(r):
        rows += [{**row, "method": "clada-earlier", "study": earlier["reconstruction"].get("study")}
                 for row in earlier["rows"] if row["method"] == "clada"]
    else:  # the same study: its CLADA rows are this run's to measure, the earlier study's curve it kept stays
        rows += [row for row in earlier["rows"] if row["method"] == "clada-earlier"]
    origin = earlier.get("baselines_from") or {}  # rows the earlier run reused themselves: where they were measured
    greedy_there = any(row.get("greedy_remeasured") for row in earlier["rows"] if row["method"] in BASELINES)
    return rows, {"file": str(path), "command": origin.get("command", earlier["command"]),
                  "study": earlier["reconstruction"].get("study"),
                  "greedy_remeasured": any(row.get("greedy_remeasured") for row in rows),
                  "greedy_from": earlier["command"] if greedy_there else origin.get("greedy_from")}


def missing_levels(rows: list[dict], levels: dict[str, list[float]]) -> dict[str, list[float]]:
    """The baseline ``levels`` (method -> sparsity levels) that no row of ``rows`` measured."""
    have = {(row["method"], row["level"]) for row in rows}
    missing = {name: [q for q in qs if (name, q) not in have] for name, qs in levels.items()}
    return {name: qs for name, qs in missing.items() if qs}


def repo_path(path: Path) -> str:
    """``path`` relative to the repository where it lies inside it (results name no machine's folders), else as given."""
    try:
        return str(Path(os.path.abspath(path)).relative_to(ROOT))
    except ValueError:
        return str(path)


def study_search(bench: Bench, study_dir: Path, default: Artifact) -> tuple[ThresholdSearch, dict, dict]:
    """The calibration study's search (its error tables, cached), the default artifact's trial (number, params,
    proxy figures) and a check that the study reproduces the default artifact."""
    r = bench.recipe
    storage = f"sqlite:///{(study_dir / 'study.db').resolve()}"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=study_name(r), storage=storage)
    trials = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    m = measurements(r, bench.model, bench.adapter, bench.splits.act, bench.data_sha256, study_dir)
    fingerprint = runtime.mlp_fingerprint(bench.model, bench.adapter)
    artifact_of = partial(point_artifact, weight_in=m.weight_in, weight_mid=m.weight_mid, fingerprint=fingerprint,
                          centers=m.centers)
    settings = SearchSettings(layer_error=r.calibration.layer_error, rules=rules_of(r.calibration.rule))
    search = ThresholdSearch(m.rule_tables(settings.rules), m.ratios,
                             ProxyEvaluator(bench.model, bench.splits.search, bench.prompt, r.eval.batch_size),
                             settings, artifact_of)
    chosen = default.figures.get("calibration_proxy", {})
    match = [t for t in trials if abs(t.user_attrs["mlp_reads_saved"] - chosen.get("mlp_reads_saved", -1)) < 1e-9]
    if not match:
        raise SystemExit(f"{study_dir}: the study has no trial with the default artifact's proxy figures {chosen}")
    trial = match[0]
    a = artifact_of(search.point_of(trial))
    check = {"study": study_name(r), "trials": len(trials), "trial": trial.number, "max_abs_diff": max(
        float((a.tau_base_in - default.tau_base_in).abs().max()), float((a.tau_base_mid - default.tau_base_mid).abs().max()),
        abs(a.lam - default.lam), abs(a.gam - default.gam), abs(a.tau_s - default.tau_s), abs(a.tau_H - default.tau_H))}
    proxy = {k: trial.user_attrs[k] for k in ("mlp_reads_saved", "ppl_increase", "kl", "relaxed_share")}
    return search, {"trial": trial.number, "params": dict(trial.params), "proxy": proxy}, check


def level_rule(search: ThresholdSearch, params: dict, level: float) -> tuple[dict, dict]:
    """``params`` with the sparsity rule CLADA takes at ``level``, and what that choice saw: the rule of ``params``
    where the search has one rule's tables; with several (``calibration.rule: auto``) the one whose point at
    ``level`` has the smallest KL to dense on the calibration's search documents (``ThresholdSearch.evaluate``:
    documents the held-out figures never see)."""
    if len(search.rules) == 1:
        return params, {}
    proxy = {}
    for rule in search.rules:
        point = search.evaluate(search.point_at_saved({**params, RULE_PARAM: rule}, level))
        proxy[rule] = {k: point.figures[k] for k in ("mlp_reads_saved", "ppl_increase", "kl")}
    rule = min(proxy, key=lambda r: proxy[r]["kl"])
    log(f"level {level}: rule {rule} (search documents: " + ", ".join(
        f"{r} kl {p['kl']:.4f} reads {p['mlp_reads_saved']:.3f}" for r, p in proxy.items()) + ")")
    return {**params, RULE_PARAM: rule}, {"rule": rule, "rule_proxy": proxy}


def run_clada(bench: Bench, search: ThresholdSearch, default: Artifact, chosen: dict, levels: tuple[float, ...]
              ) -> list[dict]:
    """CLADA at each level of reads saved (``ThresholdSearch.point_at_saved``: the default trial's allocation shape
    and adaptation, its price moved to skip ``level`` of the bytes in the error tables; its rule from
    ``level_rule``), with its ablations at the
    same level: "clada-noadapt" (the same thresholds, lam = gam = 0), "clada-noprefix" (the same thresholds without
    the prompt prior, where the default has one) and "clada-nocomp" (allocated from the
    uncompensated rows, at the same level); then the default artifact file itself (level "default")."""
    rows = []
    for level in levels:
        params, choice = level_rule(search, chosen["params"], level)
        compensated = any(bool(t.centred.any()) for t in search.tables_of(params))  # not the predictor's tables
        for name, plain in (("clada", False), ("clada-nocomp", True))[:2 if compensated else 1]:
            point = search.point_at_saved(params, level, plain=plain)
            art = search.artifact_of(point)
            extra = {"target": level, "compensated_layers": sum(point.centred), **choice,
                     **({"predicted_layers": sum(point.predicted)} if point.predicted else {})}
            rows.append(bench.evaluate_artifact(art, name, level, extra))
            if name == "clada":
                for ablation in ("clada-noadapt", *(("clada-noprefix",) if art.has_prefix else ())):
                    rows.append(bench.evaluate_artifact(method_artifact(ablation, bench.model, artifact=art),
                                                        ablation, level, extra))
    extra = {**chosen, "default": True, "rule": default.rule.get("name", "threshold")}
    for name in ("clada", "clada-noadapt"):
        rows.append(bench.evaluate_artifact(method_artifact(name, bench.model, artifact=default), name, "default",
                                            extra))
    return rows


def mc_questions(parser: argparse.ArgumentParser, args) -> dict[str, list]:
    """The questions of each ``--mc`` task (at most ``--mc-limit``), read before any model loads: a task that cannot be
    had (unknown, or its data not downloadable) is one error line, exit 2, not a failure after the measurements."""
    try:
        return {spec: load_questions(spec)[: args.mc_limit] for spec in args.mc}
    except (DataSpecError, FetchError, OSError) as exc:
        parser.error(f"--mc: {str(exc).splitlines()[0]} (--mc with no task skips multiple choice)")


def run_default(bench: Bench, default: Artifact, rows: list[dict], questions: dict[str, list]) -> dict:
    """The default artifact: its ablations, threshold sensitivity on held-out lee, multiple choice (``questions``:
    per task, ``mc_questions``).

    ``rows``: the CLADA rows, whose default point gives the "clada" and "clada-noadapt" ablations."""
    out = {"ablations": []}
    for name in ("clada", "clada-surprisal", "clada-entropy", "clada-noadapt", "clada-nocomp",
                 *(("clada-noprefix",) if default.has_prefix else ())):
        variant = method_artifact(name, bench.model, artifact=default)
        extra = {"lam": variant.lam, "gam": variant.gam}
        done = [r for r in rows if r.get("default") and r["method"] == name]
        out["ablations"].append({**done[0], "level": "default", **extra} if done else
                                bench.evaluate_artifact(variant, name, "default", extra))
    base = out["ablations"][0]["lee"]
    log("threshold sensitivity (tau_s, tau_H +-0.2) on held-out lee")
    out["sensitivity"] = threshold_sensitivity(bench.model, default, bench.tokens["lee"], bench.prompt, 0.2,
                                               bench.batch, base=base, reference=bench.reference["lee"])
    out["mc"] = {}
    for spec, task in questions.items():
        method = build_method("clada", bench.model, artifact=default)
        t = time.time()
        try:
            out["mc"][spec] = multiple_choice_eval(bench.model, bench.tokenizer, task, method, progress=False)
        finally:
            method.remove()
        log(f"multiple choice {spec}: {out['mc'][spec]} ({time.time() - t:.0f} s)")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default=str(ROOT / "recipes" / "smollm2-135m-threshold.yaml"))
    parser.add_argument("--study-dir", default=None, help="Calibration output folder (default: the recipe's output).")
    parser.add_argument("--out", default=str(ROOT / "results" / "quality"))
    parser.add_argument("--docs", type=int, default=32, help="Documents per data set.")
    parser.add_argument("--batch-size", type=int, default=32, help="Documents per forward (all 32 at once by default).")
    parser.add_argument("--greedy-prompts", type=int, default=32, help="Held-out lee prompts of greedy agreement.")
    parser.add_argument("--greedy-tokens", type=int, default=GREEDY_TOKENS)
    parser.add_argument("--mc", nargs="*", default=list(MC_TASKS))
    parser.add_argument("--mc-limit", type=int, default=None, help="Questions per task (default: all).")
    parser.add_argument("--quick", action="store_true", help="Smoke run: 2 levels per baseline, CLADA at one level.")
    parser.add_argument("--reuse-baselines", default=None, metavar="FRONTIER_JSON",
                        help="Take the baseline rows from an earlier frontier.json of the same recipe and data instead "
                             "of measuring them again (they do not depend on the CLADA study); levels it lacks are "
                             "measured; only their greedy "
                             "agreement is measured again if that run used other greedy settings. Its CLADA rows are "
                             "kept as 'clada-earlier' when that run used another study.")
    parser.add_argument("--measure-again", nargs="*", default=[], choices=sorted(LEVELS), metavar="METHOD",
                        help="With --reuse-baselines: baselines whose rows are measured again by this run, not reused "
                             "(e.g. teal-greedy, when the baseline code changed since the earlier run).")
    args = parser.parse_args(argv)
    t0 = time.time()
    torch.manual_seed(0)
    study_dir, default = default_of_study(parser, args)
    questions = mc_questions(parser, args)
    bench = Bench(args)
    recipe = bench.recipe
    attention_dropped = default.has_attention  # the baselines sparsify MLPs only: compare the MLP part
    if attention_dropped:
        log("the default artifact also sparsifies attention projections; the frontier uses its MLP part "
            "(clada-noattention)")
        default = method_artifact("clada-noattention", bench.model, artifact=default)
    levels = {k: (v[1::3] if args.quick else v) for k, v in LEVELS.items()}

    if args.reuse_baselines:  # read at the end: an earlier run may still be writing it
        rows, reused = [], None
    else:
        log("baselines")
        rows = [bench.evaluate(build_method("dense", bench.model), "dense", 0.0)]
        rows += run_baselines(bench, levels)
        reused = None
    log("CLADA at each level, with its ablations")
    search, chosen, check = study_search(bench, study_dir, default)
    clada_rows = run_clada(bench, search, default, chosen, (0.15,) if args.quick else CLADA_LEVELS)
    rows += clada_rows
    default_figures = run_default(bench, default, clada_rows, questions)
    if args.reuse_baselines:
        earlier, reused = reused_rows(Path(args.reuse_baselines), bench, args.measure_again)
        log(f"baselines: {len(earlier)} rows reused from {args.reuse_baselines}")
        missing = missing_levels(earlier, levels)
        if missing:
            log("baselines: measuring what is not reused (missing there, or --measure-again): " + ", ".join(
                f"{name} {', '.join(map(str, qs))}" for name, qs in missing.items()))
            earlier += run_baselines(bench, missing)
            reused["measured_here"] = [f"{name} {q}" for name, qs in missing.items() for q in qs]
        rows = earlier + rows
    result = {
        "command": (f"nice -n {os.nice(0)} " if os.nice(0) else "") + command_line("bench_quality.py", argv),
        "quick": args.quick, "minutes": round((time.time() - t0) / 60, 1), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "recipe": recipe.to_dict(), "study_dir": repo_path(study_dir),
        "data": {k: int(v.shape[0]) for k, v in bench.tokens.items()}, "dense_ppl": bench.dense_ppl,
        "prompt_tokens": recipe.prompt_tokens, "scored_tokens": recipe.scored_tokens,
        "greedy": {"prompts": int(bench.prompts.shape[0]), "tokens": args.greedy_tokens},
        "reconstruction": check, "default_artifact": repo_path(study_dir / ARTIFACT_NAME), "baselines_from": reused,
        "default_attention_dropped": attention_dropped,
        "default_calibration_figures": default.figures,
        "rows": rows, **default_figures,
    }
    out = Path(args.out)
    write_atomic(out / "frontier.json", (json.dumps(result, indent=1) + "\n").encode())
    render(result, out)
    log(f"wrote {out / 'frontier.md'} and {out / 'frontier.png'} in {result['minutes']} min")


if __name__ == "__main__":
    main()
