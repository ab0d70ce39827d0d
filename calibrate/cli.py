"""Command line: ``clada calibrate|eval|lm-eval|bench|inspect|export`` and ``clada-calibrate RECIPE``.

The console scripts enter through ``clada.calibrate.extras`` (which says so when click is missing); each command
checks the optional dependencies it will use before it loads or downloads anything.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from ..runtime import SPARSITY_FIGURES
from ..runtime.backends import BACKEND_NAMES
from .methods import METHODS
from .report import interval_words

SPARSITY_HELP = "Sparsity level (quantile or target) of the methods that take one, e.g. 0.5."

# Errors that mean "bad input": one line on stderr, exit code 2.
def _input_errors() -> tuple[type[BaseException], ...]:
    from ..artifacts import ArtifactError
    from .cache import FetchError
    from .data import DataSpecError
    from .extras import MissingDependency
    from .models import ModelSpecError
    from .recipe import RecipeError
    from ..runtime.adapters import UnsupportedModelError

    return (ArtifactError, DataSpecError, ModelSpecError, RecipeError, UnsupportedModelError, FetchError,
            MissingDependency)


def _require(model_spec: str, data_spec: str | None, *modules: str) -> None:
    """MissingDependency unless the optional modules a command uses with these model and data specs (and
    ``modules``) are installed; checked before anything is loaded or downloaded."""
    from . import data, extras, models

    extras.require([*modules, *models.required_modules(model_spec),
                    *(data.required_modules(data_spec) if data_spec else [])])


def _artifact(path: str | None):
    """The artifact at ``path`` (None: none), its rule built once to check it (``runtime.check_rule``): a bad file,
    an unknown rule or a bad rule parameter fails here, before the model loads."""
    from .. import runtime

    if not path:
        return None
    art = runtime.load_artifact(path)
    runtime.check_rule(art)
    return art


def _fail(exc: BaseException) -> None:
    click.echo(f"clada: error: {exc}", err=True)
    sys.exit(2)


def _print_figures(title: str, figures: dict) -> None:
    click.echo(title)
    for key in ("rule", "dense_ppl", "sparse_ppl", "ppl_increase", "kl", *SPARSITY_FIGURES, "greedy_agreement",
                "tokens"):
        if figures.get(key) is not None:
            value = figures[key]
            click.echo(f"  {key:25s} {value:.4f}" if isinstance(value, float) else f"  {key:25s} {value}")
            if key == "ppl_increase" and figures.get("ppl_increase_interval"):
                click.echo(f"  {'':25s}{interval_words(figures)}")


RECIPE_ARG = click.argument("recipe", type=click.Path(dir_okay=False))
OUTPUT_OPT = click.option("--output", "-o", default=None, help="Output folder (overrides the recipe's 'output').")
def _no_progress_bars(ctx: click.Context, param: click.Parameter, quiet: bool) -> bool:
    if quiet:  # transformers' own bars too (e.g. "Loading weights")
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    return quiet


QUIET_OPT = click.option("--quiet", "-q", is_flag=True, callback=_no_progress_bars, help="No progress bars.")
def _method_opt(purpose: str):
    """``--method`` of the commands that set a sparse method against dense (default: the CLADA artifact)."""
    return click.option("--method", default="clada", show_default=True, type=click.Choice(list(METHODS)),
                        help=f"The registered method {purpose} (docs/baselines.md).")


SPARSITY_OPT = click.option("--sparsity", default=None, type=float, help=SPARSITY_HELP)
MODEL_OPT = click.option("--model", "model_spec", required=True,
                         help="Checkpoint folder, .gguf file, hub id or built-in name.")
ARTIFACT_OPT = click.option("--artifact", default=None, type=click.Path(dir_okay=False),
                            help="clada.safetensors file (needed by the default method and the clada* methods).")
STORAGE_OPT = click.option("--storage", default=None, metavar="URL",
                           help="Optuna storage (overrides the recipe's 'search.storage'): workers given the same "
                                "recipe and postgresql://USER@HOST/DB share one study.")


@click.group()
@click.version_option(package_name="clada")
def main() -> None:
    """CLADA: calibrate, evaluate and inspect adaptive activation-sparsity artifacts."""


@main.command("calibrate")
@RECIPE_ARG
@OUTPUT_OPT
@STORAGE_OPT
@QUIET_OPT
def calibrate_cmd(recipe: str, output: str | None, storage: str | None, quiet: bool) -> None:
    """Calibrate thresholds as described by RECIPE (YAML); writes clada.safetensors and reports."""
    from .recipe import load_recipe

    try:
        recipe_obj = load_recipe(recipe, output, storage)
        _require(recipe_obj.model, recipe_obj.data, "optuna", "matplotlib")
        from .pipeline import run_calibration

        report = run_calibration(recipe_obj, progress=not quiet)
    except _input_errors() as exc:
        _fail(exc)
    except KeyboardInterrupt:
        click.echo("clada: interrupted; completed trials are kept in the study, run the same command to resume",
                   err=True)
        sys.exit(130)
    from .report import budget_warning

    _print_figures(f"chosen point, held-out {report['data']['spec']} ({report['regime']}):", report)
    click.echo(f"  {'wall time':25s} {report['timings_s']['total']:.0f} s")
    click.echo(f"artifact: {report['artifact']}")
    if budget_warning(report):
        click.echo(f"clada: warning: {budget_warning(report)}", err=True)


calibrate_main = calibrate_cmd  # the ``clada-calibrate`` console script: same command as ``clada calibrate``


@main.command("eval")
@MODEL_OPT
@ARTIFACT_OPT
@click.option("--method", default=None, type=click.Choice(list(METHODS)),
              help="A registered method (docs/baselines.md); also reports greedy_agreement. Default: the artifact "
                   "as calibrated.")
@SPARSITY_OPT
@click.option("--mc", "mc_specs", multiple=True,
              help="Score multiple choice instead of perplexity: FILE.jsonl ({context, choices, label} per line) "
                   "or bigbench:TASK[/SUBTASK]; repeatable.")
@click.option("--greedy-prompts", default=8, show_default=True, type=click.IntRange(1),
              help="Held-out prompts whose 64 greedy tokens give greedy_agreement (with --method).")
@click.option("--data", default="lee", show_default=True, help="lee, enwiki, a .txt/.jsonl file or hf:NAME[:CONFIG]:SPLIT:FIELD.")
@click.option("--docs", default=32, show_default=True, help="Documents to score (those long enough).")
@click.option("--prompt-tokens", default=None, type=int, help="Prompt length (default: the artifact's recipe).")
@click.option("--scored-tokens", default=None, type=int, help="Scored tokens per document (default: the artifact's recipe).")
@click.option("--split", type=click.Choice(["heldout", "all"]), default="heldout", show_default=True,
              help="heldout: only documents the calibration did not see (when DATA is the calibration data).")
@click.option("--dtype", default="float32", show_default=True)
@click.option("--device", default="cpu", show_default=True)
@click.option("--force", is_flag=True, help="Apply even if the weight fingerprint differs.")
@click.option("--json", "json_out", default=None, type=click.Path(dir_okay=False), help="Write the figures as JSON.")
@QUIET_OPT
def eval_cmd(model_spec, artifact, method, sparsity, mc_specs, greedy_prompts, data, docs, prompt_tokens, scored_tokens,
             split, dtype, device, force, json_out, quiet):
    """Dense vs a sparse method on DATA in the generation regime (perplexity, KL, realised sparsity), or
    multiple-choice accuracy with --mc."""
    from .. import runtime
    from ..artifacts import write_atomic
    from .compare import attach_method, recipe_of
    from .methods import check_method
    from .data import load_documents, split_documents
    from .evaluate import generation_eval, greedy_agreement, tokenize_documents
    from .models import load_model
    from .multiple_choice import load_questions, multiple_choice_eval

    name = method or "clada"
    try:
        _require(model_spec, None if mc_specs else data)
        check_method(name, sparsity, artifact is not None)
        art = _artifact(artifact)
        calibrated = recipe_of(art)
        prompt = prompt_tokens or calibrated.prompt_tokens
        scored = scored_tokens or calibrated.scored_tokens
        # questions and documents are read before the model loads: a bad or unobtainable one fails in seconds
        questions = {spec: load_questions(spec) for spec in mc_specs} if mc_specs else None
        documents = None if mc_specs else load_documents(data)
        model, tokenizer, _ = load_model(model_spec, dtype, device)
        if not mc_specs:
            texts = documents.documents
            split_of = art.data if art is not None else {"spec": calibrated.data}
            if split == "heldout" and (documents.identity.get("sha256") == split_of.get("sha256")
                                       or (art is None and data == calibrated.data)):
                texts = split_documents(texts, split_of.get("heldout_fraction", calibrated.heldout_fraction),
                                        split_of.get("split_seed", calibrated.seed))[1]
            tokens = tokenize_documents(tokenizer, texts, prompt + scored + 1, max_docs=docs)
        sparse = attach_method(name, model, tokenizer, art, sparsity, force)
    except (_input_errors() + (ValueError,)) as exc:
        _fail(exc)
    label = "CLADA" if method is None else method + (f" {sparsity:g}" if sparsity is not None else "")
    if mc_specs:
        figures = {"method": name, "sparsity": sparsity, "model": model_spec, "artifact": artifact, "mc": {}}
        for spec, qs in questions.items():
            result = multiple_choice_eval(model, tokenizer, qs, sparse, progress=not quiet)
            figures["mc"][spec] = result
            click.echo(f"multiple choice {spec} ({result['questions']} questions), dense vs {label}:")
            for key in ("accuracy_dense", "accuracy_sparse", "chance", "same_choice"):
                click.echo(f"  {key:16s} {result[key]:.4f}")
    else:
        # the calibration's batch size: it bounds the (batch, scored, vocab) logits held at once (Gemma: 262k vocab)
        figures = generation_eval(model, tokens, prompt, calibrated.eval.batch_size, progress=not quiet, method=sparse)
        if method is not None:
            figures["greedy_agreement"] = greedy_agreement(model, tokens[:greedy_prompts, :prompt], sparse)
            figures.update({"method": method, "sparsity": sparsity})
        figures.update({"model": model_spec, "artifact": str(artifact), "data": data, "prompt_tokens": prompt,
                        "documents": int(tokens.shape[0])})
        _print_figures(f"dense vs {label} on {data} ({tokens.shape[0]} docs, prompt {prompt}, scored {scored}):", figures)
    if json_out:
        write_atomic(Path(json_out), (json.dumps(figures, indent=2) + "\n").encode())


def _print_lm_eval(rows: list[dict], stats: dict, version: str) -> None:
    width = max([len("task"), *(len(r["task"]) for r in rows)])
    click.echo(f"{'task':{width}s}  {'metric':10s} {'dense':>8s} {'clada':>8s} {'difference':>10s} {'n':>5s}")
    for r in rows:
        clada = "-" if r["clada"] is None else f"{r['clada']:.4f}"
        diff = "-" if r["difference"] is None else f"{r['difference']:+.4f}"
        click.echo(f"{r['task']:{width}s}  {r['metric']:10s} {r['dense']:8.4f} {clada:>8s} {diff:>10s} "
                   f"{'' if r['n'] is None else r['n']:>5}")
    saved = stats.get("mlp_reads_saved")
    click.echo(f"lm-eval {version}; CLADA decode steps: {stats.get('tokens', 0)} tokens"
               + (f", mlp_reads_saved {saved:.4f}" if saved is not None and stats.get("tokens") else ""))


@main.command("lm-eval")
@MODEL_OPT
@ARTIFACT_OPT
@_method_opt("run beside dense")
@SPARSITY_OPT
@click.option("--tasks", "tasks_spec", required=True,
              help="Comma-separated lm-eval tasks: lm-eval's own (hub datasets: needs a network), those in "
                   "--include-path, clada_cause_and_effect (shipped, offline) or bigbench:TASK[/SUBTASK] (offline).")
@click.option("--include-path", "include_paths", multiple=True, type=click.Path(),
              help="A folder of lm-eval task YAMLs (e.g. over local JSON/JSONL files); repeatable.")
@click.option("--limit", default=None, type=click.IntRange(1), help="Score only the first N documents of each task.")
@click.option("--max-gen-toks", default=256, show_default=True, type=click.IntRange(1),
              help="New tokens of generation tasks that set no max_gen_toks.")
@click.option("--dtype", default="float32", show_default=True)
@click.option("--device", default="cpu", show_default=True)
@click.option("--force", is_flag=True, help="Apply even if the weight fingerprint differs.")
@click.option("--json", "json_out", default=None, type=click.Path(dir_okay=False),
              help="Write both results, the table, the lm-eval version and the settings as JSON.")
@QUIET_OPT
def lm_eval_cmd(model_spec, artifact, method, sparsity, tasks_spec, include_paths, limit, max_gen_toks, dtype, device,
                force, json_out, quiet):
    """Dense vs CLADA (or another method) on lm-evaluation-harness tasks, side by side: multiple choice scores
    the context as a dense prefill and the continuation in the decode regime (as clada eval --mc), generation
    runs the patched generate."""
    import tempfile

    from .. import runtime
    from ..artifacts import write_atomic
    from .methods import check_method

    try:
        _require(model_spec, None, "lm_eval")
        from .compare import attach_method
        from .lm_eval_tasks import parse_tasks, prepare_tasks
        from .lm_eval_wrapper import comparison_rows, evaluate_side_by_side, lm_eval_version, task_manager
        from .models import load_model

        check_method(method, sparsity, artifact is not None)
        tasks = parse_tasks(tasks_spec)
        art = _artifact(artifact)
        folder = tempfile.TemporaryDirectory(prefix="clada-lm-eval-")
        prepared = prepare_tasks(tasks, list(include_paths), Path(folder.name))
        manager = task_manager(prepared.names, prepared.include_paths)
        model, tokenizer, _ = load_model(model_spec, dtype, device)
        sparse = attach_method(method, model, tokenizer, art, sparsity, force)
    except (_input_errors() + (ValueError,)) as exc:
        _fail(exc)
    with folder:
        try:
            results = evaluate_side_by_side(model, tokenizer, sparse, prepared.names, manager, limit, max_gen_toks,
                                           progress=not quiet)
        except NotImplementedError as exc:
            _fail(exc)
    rows = comparison_rows(results)
    version = lm_eval_version()
    _print_lm_eval(rows, results["sparse_stats"], version)
    if json_out:
        figures = {"lm_eval_version": version, "model": model_spec, "artifact": artifact, "method": method,
                   "sparsity": sparsity, "tasks": tasks, "lm_eval_tasks": prepared.names, "limit": limit,
                   "rows": rows, "dense": results["dense"], "clada": results["sparse"],
                   "sparse_stats": results["sparse_stats"]}
        write_atomic(Path(json_out), (json.dumps(figures, indent=2, default=str) + "\n").encode())


def _prompt_lengths(sweep: str | None) -> list[int]:
    """``--sweep`` "512,2048" -> [512, 2048]; ValueError naming the option otherwise."""
    parts = sweep.split(",") if sweep else []
    if not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise ValueError(f"--sweep: expected comma-separated positive prompt lengths, got {sweep!r}")
    return [int(p) for p in parts]


def _print_bench(r: dict) -> None:
    click.echo(f"decode, batch {r['batch']}, prompt {r['prompt_tokens']}, {r['new_tokens']} new tokens, "
               f"{r['dtype']} on {r['device']} ({r['threads']} threads), {r['cache']} KV cache, median of {r['reps']}; "
               f"method {r['method']} (rule {r['rule']}), backend {r['backend']}:")
    click.echo(f"  dense_tok_s      {r['dense_tok_s']:.2f}")
    click.echo(f"  clada_tok_s      {r['clada_tok_s']:.2f}")
    click.echo(f"  ratio            {r['ratio']:.3f}")
    for key in ("mlp_sparsity", "input_sparsity", "mlp_reads_saved", "attention_reads_saved", "reads_saved",
                "mlp_share", "attention_share", "bound", "gain_of_bound",
                "signal_overhead", "layout_ratio", "sparsity_ratio", "layout_mlp_share", "layout_attention_share",
                "skip_bound", "skip_gain_of_bound", "paired_ratio", "paired_sparsity_ratio", "best_ratio",
                "best_layout_ratio", "best_sparsity_ratio", "prefill_overhead"):
        if r.get(key) is not None:  # the attention figures: artifacts that sparsify attention only
            click.echo(f"  {key:16s} {r[key]:.3f}")
    click.echo("  fast_path        " + ", ".join(f"{path} {share:.0%}" for path, share in r["fast_path"].items()
                                             if share))
    click.echo(f"  clada_faster     {r['clada_faster']} of {r['reps']} repetitions")
    click.echo("  spread           " + ", ".join(f"{mode} {s:.1%}" for mode, s in r["spread"].items()))
    click.echo("  step ms          " + ", ".join(f"{mode} {ms:.1f}" for mode, ms in r["step_ms"].items())
               + " (first after apply: " + ", ".join(f"{mode} {ms:.1f}" for mode, ms in r["first_step_ms"].items())
               + ")")
    click.echo("  apply ms         " + ", ".join(f"{mode} {ms:.1f}" for mode, ms in r["apply_ms"].items()
                                             if mode != "dense"))
    for decision in r["selection"]:
        click.echo(f"  selection        {decision['dtype']} {decision['shape']}: {decision['reason']}")
    for dtype, decision in (r.get("predictor_path") or {}).items():
        if isinstance(decision, dict):  # backend auto: the path its first decode steps timed faster
            click.echo(f"  predictor path   {dtype}: {decision['path']} (step {decision['step_ms']:.2f} / dense "
                       f"{decision['dense_ms']:.2f} ms over the MLPs of a decode step, median of {decision['steps']})")
    for choice in (r.get("dense_products") or {}).get("choices", []):
        click.echo(f"  dense product    {choice['dtype']} {choice['shape']} at {choice['rows']} rows: {choice['choice']} "
                   f"({choice['reason']})")
    cpu = r["cpu"]
    click.echo(f"  cpu              {cpu['model_name']} (family {cpu['family']} model {cpu['model']}), "
               + " ".join(f for f, on in cpu["flags"].items() if on))
    if r["noisy"]:
        worst = max(r["spread"], key=r["spread"].get)
        click.echo(f"clada: warning: decode tok/s varied by {r['spread'][worst]:.0%} between repetitions ({worst}): "
                   f"the machine was not quiet; treat the ratios as noise", err=True)


@main.command("bench")
@MODEL_OPT
@ARTIFACT_OPT
@_method_opt("to time against dense")
@SPARSITY_OPT
@click.option("--backend", default="auto", show_default=True, type=click.Choice(["auto", *BACKEND_NAMES]),
              help="Kernel backend of the sparse modes (docs/runtime.md).")
@click.option("--batch", default=1, show_default=True, type=click.IntRange(1, 256))
@click.option("--prompt-tokens", default=128, show_default=True, type=click.IntRange(1))
@click.option("--new-tokens", default=64, show_default=True, type=click.IntRange(2))
@click.option("--reps", default=5, show_default=True, type=click.IntRange(1), help="Timed repetitions per mode.")
@click.option("--warmup", default=1, show_default=True, type=click.IntRange(0), help="Untimed repetitions first.")
@click.option("--data", default="lee", show_default=True, help="Text the prompts are cut from.")
@click.option("--dtype", default="float32", show_default=True)
@click.option("--device", default="cpu", show_default=True)
@click.option("--force", is_flag=True, help="Apply even if the weight fingerprint differs.")
@click.option("--sweep", default=None, help="Also a long-context sweep over these prompt lengths, e.g. 512,2048,8192.")
@click.option("--sweep-new-tokens", default=16, show_default=True, type=click.IntRange(2))
@click.option("--sweep-reps", default=2, show_default=True, type=click.IntRange(1),
              help="Timed repetitions per mode and prompt length in the sweep (after one warm-up).")
@click.option("--cache", default="dynamic", show_default=True, type=click.Choice(["dynamic", "static"]),
              help="KV cache of generate: transformers' default (grows each step) or preallocated.")
@click.option("--threads", default=None, type=click.IntRange(1), help="torch threads (default: torch's own).")
@click.option("--json", "json_out", default=None, type=click.Path(dir_okay=False), help="Write the figures as JSON.")
def bench_cmd(model_spec, artifact, method, sparsity, backend, batch, prompt_tokens, new_tokens, reps, warmup, data,
              dtype, device, force, sweep, sweep_new_tokens, sweep_reps, cache, threads, json_out):
    """Decode tokens/s of dense vs a sparse method (default: the CLADA artifact), alternating in one process,
    with the bound the savings allow."""
    from .. import runtime
    from ..artifacts import write_atomic
    from .bench import BenchConfig, bench_texts, run_bench, text_prompts
    from .compare import calibrated_method_artifact
    from .methods import check_method
    from .models import load_model

    try:
        _require(model_spec, data)
        lengths = _prompt_lengths(sweep)
        check_method(method, sparsity, artifact is not None)
        given = _artifact(artifact)
        texts = bench_texts(data, given)
        model, tokenizer, _ = load_model(model_spec, dtype, device)
        art = calibrated_method_artifact(method, model, tokenizer, given, sparsity)
        runtime.apply(model, art, force=force, backend=backend)  # validate once before any timing
        runtime.remove(model)
        prompts = {p: text_prompts(tokenizer, texts, batch, p).to(device) for p in [prompt_tokens] + lengths}
    except (_input_errors() + (ValueError,)) as exc:
        _fail(exc)
    model.eval()
    config = BenchConfig(batch, prompt_tokens, new_tokens, reps, warmup, force, backend=backend, cache=cache,
                         threads=threads)
    result = run_bench(model, art, prompts[prompt_tokens], config, progress=lambda msg: click.echo(msg, err=True))
    result.update({"model": model_spec, "artifact": str(artifact), "method": method, "sparsity": sparsity})
    _print_bench(result)
    if lengths:
        click.echo(f"long-context sweep ({sweep_new_tokens} new tokens, dense and CLADA, 1 warm-up and "
                   f"{sweep_reps} timed repetitions each, medians):")
        click.echo(f"  {'prompt':>7s} {'dense prefill s':>16s} {'clada prefill s':>16s} {'prefill overhead':>17s} "
                   f"{'decode ratio':>13s} {'step ms (dense / clada)':>24s} {'MLP ms (dense / clada)':>23s}")
        result["sweep"] = []
        for p in lengths:
            r = run_bench(model, art, prompts[p], BenchConfig(batch, p, sweep_new_tokens, sweep_reps, 1, force,
                                                              backend=backend, profile=False, layout=False,
                                                              mlp_time=True, cache=cache, threads=threads),
                          progress=lambda msg: click.echo(f"[prompt {p}] {msg}", err=True))
            row = {k: r[k] for k in ("prompt_tokens", "dense_prefill_s", "clada_prefill_s", "prefill_overhead",
                                     "dense_tok_s", "clada_tok_s", "ratio", "mlp_reads_saved", "step_ms",
                                     "mlp_step_ms")}
            result["sweep"].append(row)
            step, mlp = row["step_ms"], row["mlp_step_ms"]
            click.echo(f"  {p:7d} {row['dense_prefill_s']:16.3f} {row['clada_prefill_s']:16.3f} "
                       f"{row['prefill_overhead']:17.3f} {row['ratio']:13.3f} "
                       f"{step['dense']:8.1f} / {step['clada']:<6.1f} {mlp['dense']:8.1f} / {mlp['clada']:.1f}")
    if json_out:
        write_atomic(Path(json_out), (json.dumps(result, indent=2) + "\n").encode())


@main.command("export")
@click.option("--artifact", required=True, type=click.Path(dir_okay=False), help="clada.safetensors file.")
@click.option("--checkpoint", required=True, type=click.Path(file_okay=False), help="Checkpoint folder (with config.json).")
def export_cmd(artifact: str, checkpoint: str) -> None:
    """Place ARTIFACT in a checkpoint folder and declare it in its config.json.

    Afterwards ``runtime.from_pretrained(CHECKPOINT)`` or ``runtime.apply(model)`` finds it.
    """
    from .. import runtime

    try:
        target = runtime.declare_in_checkpoint(artifact, checkpoint)
    except _input_errors() as exc:
        _fail(exc)
    click.echo(f"exported {target} and declared it in {Path(checkpoint) / 'config.json'}")


@main.command("inspect")
@click.argument("artifact", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print everything as JSON.")
def inspect_cmd(artifact: str, as_json: bool) -> None:
    """Print an artifact's thresholds (attention and prompt-prior exponents where it has them), adaptation
    parameters and metadata."""
    from ..artifacts import load_artifact

    try:
        art = load_artifact(artifact)
    except _input_errors() as exc:
        _fail(exc)
    info = {
        "model": art.model, "data": art.data, "figures": art.figures, "signals": art.signals,
        "lam": art.lam, "gam": art.gam, "tau_s": art.tau_s, "tau_H": art.tau_H,
        "tau_base_in": [round(v, 6) for v in art.tau_base_in.tolist()],
        "tau_base_mid": [round(v, 6) for v in art.tau_base_mid.tolist()],
        "compensated_layers": {side: [l for l in range(art.num_layers) if bool(art.center(side)[l].any())]
                               for side in ("in", "mid") if art.center(side) is not None},
        # the optional parts: attention thresholds (format 5) and prompt-prior exponents (format 6)
        **{f"tau_base_{side}": [round(v, 6) for v in art.tau_base(side).tolist()]
           for side in ("attn_in", "attn_out") if art.has_attention},
        **{f"prefix_{side}": [round(v, 6) for v in art.prefix(side).tolist()]
           for side in ("in", "mid") if art.prefix(side) is not None},
    }
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    click.echo(f"{artifact}: CLADA artifact, {art.num_layers} layers")
    m = art.model
    click.echo(f"  model     {m.get('spec', '?')} ({m.get('architecture', '?')}, hidden {m.get('hidden_size')}, "
               f"intermediate {m.get('intermediate_size')})")
    click.echo(f"  data      {art.data.get('spec', '?')} sha256 {str(art.data.get('sha256', '?'))[:12]}")
    click.echo(f"  adapt     lam={art.lam:.4f} gam={art.gam:.4f} tau_s={art.tau_s:.4f} tau_H={art.tau_H:.4f}")
    click.echo("  tau_in    " + " ".join(f"{v:.3g}" for v in art.tau_base_in.tolist()))
    click.echo("  tau_mid   " + " ".join(f"{v:.3g}" for v in art.tau_base_mid.tolist()))
    for key, label in (("tau_base_attn_in", "tau_attn_in"), ("tau_base_attn_out", "tau_attn_out"),
                       ("prefix_in", "prefix_in"), ("prefix_mid", "prefix_mid")):
        if key in info:
            click.echo(f"  {label:<9s} " + " ".join(f"{v:.3g}" for v in info[key]))
    for side, layers in info["compensated_layers"].items():
        click.echo(f"  centred   {side}: layers {' '.join(map(str, layers)) or 'none'}")
    held = art.figures.get("heldout")
    if held:
        _print_figures("  held-out figures at calibration:", held)


if __name__ == "__main__":
    main()
