"""Sparsity-quality frontier on SmolLM2-135M: every baseline and CLADA on held-out lee and on enwiki.

    nice -n 15 python benchmarks/bench_quality.py            # about 35-45 min on 2 CPU cores

Writes results/quality/frontier.json (every figure), frontier.md (tables, the command at the top) and
frontier.png (ppl_increase vs mlp_reads_saved, one line per method, one panel per data set).

What is measured (recipe recipes/smollm2-135m.yaml: prompt 64, scored 128 tokens per document):
- data: the recipe's held-out lee documents (never seen by the calibration) and the first enwiki documents;
- baselines (clada.calibrate.baselines): uniform, teal, teal-greedy and cats are calibrated on the recipe's
  activation documents (the calibration's); griffin needs no calibration; each at several sparsity levels;
- CLADA: no new calibration. The points of the default calibration study's Pareto front (out/<name>/study.db,
  proxy figures on the search documents) nearest each of CLADA_TARGETS (proxy reads saved), rebuilt from the
  study (thresholds re-derived from the per-layer error tables, which are cached in the clada cache), plus
  the default artifact file itself; each also without adaptation (lam = gam = 0: the "clada-noadapt" line).
  For the default artifact also its ablations (surprisal only, entropy only), the threshold sensitivity
  (tau_s, tau_H +-0.2) and multiple choice (BIG-bench cause_and_effect and physical_intuition);
- regime: methods without adaptation are scored with clada.calibrate.evaluate.TeacherForcedEvaluator, exact
  for them (tests/test_baselines.py checks it against the token-by-token regime); adaptive CLADA points with
  generation_eval, token by token; greedy_agreement over 64 greedy tokens from held-out lee prompts.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from functools import partial
from pathlib import Path

import optuna
import torch

from clada import runtime
from clada.artifacts import Artifact, load_artifact, write_atomic
from clada.calibrate.baselines import THRESHOLD_BASELINES, CalibrationActivations, baseline_artifacts
from clada.calibrate.methods import METHODS, build_method, method_artifact
from clada.calibrate.cache import cache_dir
from clada.calibrate.compare import threshold_sensitivity
from clada.calibrate.data import load_documents
from clada.calibrate.evaluate import (QUALITY_BACKEND, ProxyEvaluator, Sparsifier, TeacherForcedEvaluator, generation_eval, greedy_agreement,
                                      greedy_tokens, tokenize_documents)
from clada.calibrate.models import load_model
from clada.calibrate.multiple_choice import load_questions, multiple_choice_eval
from clada.calibrate.pipeline import ARTIFACT_NAME, Measurements, measure, point_artifact, study_name, token_splits
from clada.calibrate.recipe import load_recipe
from clada.calibrate.search import SearchSettings, ThresholdSearch, pareto_front

sys.path.insert(0, str(Path(__file__).resolve().parent))
from frontier_report import render  # noqa: E402  (benchmarks/ is not a package)

ROOT = Path(__file__).resolve().parent.parent
LEVELS = {name: list(spec.levels) for name, spec in METHODS.items() if spec.levels}  # sparsity levels per baseline
CLADA_TARGETS = (0.10, 0.20, 0.25, 0.30)  # proxy reads saved; the nearest front point of each
DATASETS = ("lee", "enwiki")
KEYS = ("ppl_increase", "kl", "mlp_reads_saved", "mlp_sparsity", "input_sparsity", "relaxed_share", "dense_ppl")
MC_TASKS = ("bigbench:cause_and_effect", "bigbench:physical_intuition")
GREEDY_TOKENS = 64


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def measurements(recipe, model, adapter, act_tokens: torch.Tensor) -> Measurements:
    """``pipeline.measure`` of the recipe, cached by what it depends on (model fingerprint and every recipe field
    but the search, eval and output settings) -- it is deterministic, and a new budget needs no new tables."""
    inputs = {k: v for k, v in recipe.to_dict().items() if k not in ("search", "eval", "output")}
    key = hashlib.sha256((json.dumps(inputs, sort_keys=True) + repr(runtime.mlp_fingerprint(model, adapter).tolist())).encode())
    path = cache_dir() / "tables" / f"{key.hexdigest()[:16]}.safetensors"
    cached = Measurements.load(path, key.hexdigest())
    if cached is not None:
        return cached
    log("measuring per-layer error tables (once; cached)")
    m = measure(recipe, model, adapter, act_tokens, progress=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    m.save(path, key.hexdigest())
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
        self.greedy_reference = greedy_tokens(self.model, self.prompts, args.greedy_tokens)
        self.dense_ppl = {k: math.exp(torch.cat([b["nll_dense"] for b in ev.batches]).double().mean().item())
                          for k, ev in self.reference.items()}

    def evaluate(self, method, label: str, level, extra: dict | None = None) -> dict:
        """Figures of an attached ``method`` on both data sets and its greedy agreement; detaches it."""
        t = time.time()
        row = {"method": label, "level": level, **(extra or {})}
        try:
            for name, tokens in self.tokens.items():
                if method.adaptive:
                    figures = generation_eval(self.model, tokens, self.prompt, self.batch,
                                              progress=False, method=method, reference=self.reference[name])
                else:
                    figures = self.reference[name](method)
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


def run_baselines(bench: Bench, levels: dict) -> list[dict]:
    r = bench.recipe
    calib = CalibrationActivations.collect(bench.model, bench.splits.act, r.prompt_tokens, r.calibration.activation_tokens)
    rows = []
    for name, qs in levels.items():
        if name in THRESHOLD_BASELINES:  # all levels from one greedy walk per layer
            for q, art in zip(qs, baseline_artifacts(name, bench.model, calib, qs)):
                runtime.apply(bench.model, art, backend=QUALITY_BACKEND)
                rows.append(bench.evaluate(Sparsifier(bench.model), name, q))
        else:
            for q in qs:
                rows.append(bench.evaluate(build_method(name, bench.model, sparsity=q, calibration=calib), name, q))
    return rows


BASELINES = ("dense", *LEVELS)


def reused_rows(path: Path, bench: Bench) -> tuple[list[dict], dict]:
    """Baseline rows of an earlier run (checked to share recipe, data and greedy settings), plus its CLADA rows
    renamed 'clada-earlier' if that run's study differs from this recipe's; and where they came from."""
    earlier = json.loads(path.read_text())
    r = bench.recipe
    same = {"recipe model/data/lengths/split": all(earlier["recipe"][k] == r.to_dict()[k] for k in
                                                   ("model", "data", "dtype", "prompt_tokens", "scored_tokens",
                                                    "heldout_fraction", "seed")),
            "documents": earlier["data"] == {k: int(v.shape[0]) for k, v in bench.tokens.items()},
            "greedy": earlier["greedy"] == {"prompts": int(bench.prompts.shape[0]), "tokens": bench.args.greedy_tokens}}
    if not all(same.values()):
        raise SystemExit(f"{path}: cannot reuse its baselines, it differs in " + ", ".join(k for k, v in same.items() if not v))
    rows = [row for row in earlier["rows"] if row["method"] in BASELINES]
    if earlier["reconstruction"].get("study") != study_name(r):
        rows += [{**row, "method": "clada-earlier", "study": earlier["reconstruction"].get("study")}
                 for row in earlier["rows"] if row["method"] == "clada"]
    return rows, {"file": str(path), "command": earlier["command"], "study": earlier["reconstruction"].get("study")}


def study_points(bench: Bench, study_dir: Path, default: Artifact) -> tuple[list[dict], dict]:
    """Pareto-front trials of the calibration study with their rebuilt artifacts, and a reconstruction check."""
    r = bench.recipe
    storage = f"sqlite:///{(study_dir / 'study.db').resolve()}"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=study_name(r), storage=storage)
    trials = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    front = [trials[i] for i in pareto_front([(t.user_attrs["mlp_reads_saved"], t.user_attrs["ppl_increase"])
                                               for t in trials])]
    m = measurements(r, bench.model, bench.adapter, bench.splits.act)
    fingerprint = runtime.mlp_fingerprint(bench.model, bench.adapter)
    artifact_of = partial(point_artifact, weight_in=m.weight_in, weight_mid=m.weight_mid, fingerprint=fingerprint,
                          centers=m.centers)
    search = ThresholdSearch(m.tables, m.ratios, ProxyEvaluator(bench.model, bench.splits.search, bench.prompt,
                                                               r.eval.batch_size), SearchSettings(), artifact_of)
    points = []
    for t in front:
        point = search.point_of(t)
        points.append({"trial": t.number, "params": t.params, "artifact": artifact_of(point),
                       "proxy": {k: t.user_attrs[k] for k in ("mlp_reads_saved", "ppl_increase", "kl", "relaxed_share")}})
    chosen = default.figures.get("calibration_proxy", {})
    match = [p for p in points if abs(p["proxy"]["mlp_reads_saved"] - chosen.get("mlp_reads_saved", -1)) < 1e-9]
    check = {"study": study_name(r), "trials": len(trials), "front": len(front)}
    if match:
        a = match[0]["artifact"]
        check.update(trial=match[0]["trial"], max_abs_diff=max(
            float((a.tau_base_in - default.tau_base_in).abs().max()), float((a.tau_base_mid - default.tau_base_mid).abs().max()),
            abs(a.lam - default.lam), abs(a.gam - default.gam), abs(a.tau_s - default.tau_s), abs(a.tau_H - default.tau_H)))
    return points, check


def pick_points(points: list[dict], targets: tuple[float, ...], default_trial: int | None) -> list[dict]:
    """The front point nearest each target (proxy reads saved), and the default artifact's, without repeats."""
    chosen = {min(points, key=lambda p: abs(p["proxy"]["mlp_reads_saved"] - x))["trial"] for x in targets}
    chosen.add(default_trial)
    return [p for p in points if p["trial"] in chosen]


def run_clada(bench: Bench, points: list[dict], default: Artifact, default_trial: int | None) -> list[dict]:
    """Each point as calibrated ("clada", adaptive: token by token) and without adaptation ("clada-noadapt")."""
    rows = []
    for p in points:
        art = default if p["trial"] == default_trial else p["artifact"]  # the file itself for the default
        extra = {"trial": p["trial"], "params": p["params"], "proxy": p["proxy"], "default": p["trial"] == default_trial}
        rows.append(bench.evaluate(build_method("clada", bench.model, artifact=art), "clada", f"t{p['trial']}", extra))
        if art.lam != 0 or art.gam != 0:
            rows.append(bench.evaluate(build_method("clada-noadapt", bench.model, artifact=art), "clada-noadapt",
                                       f"t{p['trial']}", extra))
        else:
            rows.append({**rows[-1], "method": "clada-noadapt"})  # no adaptation to drop: the same point
    return rows


def run_default(bench: Bench, default: Artifact, rows: list[dict], args) -> dict:
    """The default artifact: its ablations, threshold sensitivity on held-out lee, multiple choice.

    ``rows``: the CLADA rows, whose default point gives the "clada" and "clada-noadapt" ablations."""
    out = {"ablations": []}
    for name in ("clada", "clada-surprisal", "clada-entropy", "clada-noadapt", "clada-nocomp"):
        variant = method_artifact(name, bench.model, artifact=default)
        extra = {"lam": variant.lam, "gam": variant.gam}
        done = [r for r in rows if r.get("default") and r["method"] == name]
        out["ablations"].append({**done[0], "level": "default", **extra} if done else
                                bench.evaluate(build_method("clada", bench.model, artifact=variant), name, "default",
                                               extra))
    base = out["ablations"][0]["lee"]
    log("threshold sensitivity (tau_s, tau_H +-0.2) on held-out lee")
    out["sensitivity"] = threshold_sensitivity(bench.model, default, bench.tokens["lee"], bench.prompt, 0.2,
                                               bench.batch, base=base, reference=bench.reference["lee"])
    out["mc"] = {}
    for spec in args.mc:
        questions = load_questions(spec)[: args.mc_limit]
        method = build_method("clada", bench.model, artifact=default)
        t = time.time()
        try:
            out["mc"][spec] = multiple_choice_eval(bench.model, bench.tokenizer, questions, method, progress=False)
        finally:
            method.remove()
        log(f"multiple choice {spec}: {out['mc'][spec]} ({time.time() - t:.0f} s)")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default=str(ROOT / "recipes" / "smollm2-135m.yaml"))
    parser.add_argument("--study-dir", default=None, help="Calibration output folder (default: the recipe's output).")
    parser.add_argument("--out", default=str(ROOT / "results" / "quality"))
    parser.add_argument("--docs", type=int, default=32, help="Documents per data set.")
    parser.add_argument("--batch-size", type=int, default=32, help="Documents per forward (all 32 at once by default).")
    parser.add_argument("--greedy-prompts", type=int, default=8)
    parser.add_argument("--greedy-tokens", type=int, default=GREEDY_TOKENS)
    parser.add_argument("--mc", nargs="*", default=list(MC_TASKS))
    parser.add_argument("--mc-limit", type=int, default=None, help="Questions per task (default: all).")
    parser.add_argument("--quick", action="store_true", help="Smoke run: 2 levels per baseline, 2 CLADA points.")
    parser.add_argument("--reuse-baselines", default=None, metavar="FRONTIER_JSON",
                        help="Take the baseline rows from an earlier frontier.json of the same recipe and data instead "
                             "of measuring them again (they do not depend on the CLADA study); its CLADA rows are kept "
                             "as 'clada-earlier' when that run used another study.")
    args = parser.parse_args(argv)
    t0 = time.time()
    torch.manual_seed(0)
    bench = Bench(args)
    recipe = bench.recipe
    study_dir = Path(args.study_dir or ROOT / recipe.output)
    default = load_artifact(study_dir / ARTIFACT_NAME)
    levels = {k: (v[1::3] if args.quick else v) for k, v in LEVELS.items()}

    if args.reuse_baselines:  # read at the end: an earlier run may still be writing it
        rows, reused = [], None
    else:
        log("baselines")
        rows = [bench.evaluate(build_method("dense", bench.model), "dense", 0.0)]
        rows += run_baselines(bench, levels)
        reused = None
    log("CLADA study points")
    points, check = study_points(bench, study_dir, default)
    points = pick_points(points, (0.15,) if args.quick else CLADA_TARGETS, check.get("trial"))
    clada_rows = run_clada(bench, points, default, check.get("trial"))
    rows += clada_rows
    default_figures = run_default(bench, default, clada_rows, args)
    if args.reuse_baselines:
        earlier, reused = reused_rows(Path(args.reuse_baselines), bench)
        rows = earlier + rows
        log(f"baselines: {len(earlier)} rows reused from {args.reuse_baselines}")
    result = {
        "command": "nice -n 15 python benchmarks/bench_quality.py" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip(),
        "quick": args.quick, "minutes": round((time.time() - t0) / 60, 1), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "recipe": recipe.to_dict(), "study_dir": str(study_dir),
        "data": {k: int(v.shape[0]) for k, v in bench.tokens.items()}, "dense_ppl": bench.dense_ppl,
        "prompt_tokens": recipe.prompt_tokens, "scored_tokens": recipe.scored_tokens,
        "greedy": {"prompts": int(bench.prompts.shape[0]), "tokens": args.greedy_tokens},
        "reconstruction": check, "default_artifact": str(study_dir / ARTIFACT_NAME), "baselines_from": reused,
        "default_calibration_figures": default.figures,
        "rows": rows, **default_figures,
    }
    out = Path(args.out)
    write_atomic(out / "frontier.json", (json.dumps(result, indent=1) + "\n").encode())
    render(result, out)
    log(f"wrote {out / 'frontier.md'} and {out / 'frontier.png'} in {result['minutes']} min")


if __name__ == "__main__":
    main()
