"""EleutherAI's lm-evaluation-harness on a model patched by ``clada.runtime``: dense and sparse side by side.

``HarnessLM`` is an lm-eval ``LM`` over one loaded model, its tokenizer and a ``Sparsifier`` (the applied
method), in one of two modes, ``"dense"`` or ``"sparse"``:

- ``loglikelihood``: the requests of one document sharing a context are scored together as one multiple-choice
  question of ``clada eval --mc`` (``multiple_choice.score_choices``): the context is a dense prefill, the continuation
  tokens decode steps, dense (inside ``runtime.dense``) and sparse at once. Both modes of one model share a
  ``ScoreCache``, so running the harness dense and then sparse scores each question once.
- ``generate_until``: the patched ``model.generate`` (greedy unless the task asks to sample), inside
  ``runtime.dense`` in the dense mode; generation stops at the first of the task's ``until`` strings (cut off
  from the text), at EOS, or after ``max_gen_toks`` tokens.
- ``loglikelihood_rolling`` (perplexity tasks) is not supported: ``clada eval`` measures perplexity in the
  generation regime.

``evaluate_side_by_side`` runs the harness on both modes and ``comparison_rows`` lines up their metrics.
"""

from __future__ import annotations

from contextlib import nullcontext
from importlib import metadata

import torch
from lm_eval.api.model import LM
from torch import nn
from tqdm.auto import tqdm
from transformers import StoppingCriteria, StoppingCriteriaList

from .data import DataSpecError
from .evaluate import Sparsifier
from .lm_eval_tasks import SHIPPED_TASK
from .multiple_choice import Question, encode, score_choices

MODES = ("dense", "sparse")
DEFAULT_MAX_GEN_TOKS = 256
STAT_KEYS = ("rule", "tokens", "mlp_sparsity", "input_sparsity", "mlp_reads_saved", "relaxed_share")


def lm_eval_version() -> str:
    return metadata.version("lm_eval")


class ScoreCache:
    """(dense, sparse) (log-likelihood, is_greedy) of each request, scored per question: the requests of one
    document (lm-eval's task name and doc id) with the same context, as ``clada eval --mc`` scores a question
    (the prefill's batch is its choices; grouping equal contexts of many documents into one batch would change
    the floating-point sums and can flip near ties)."""

    def __init__(self, model: nn.Module, tokenizer, method: Sparsifier, progress: bool = False):
        self.model, self.tokenizer, self.method, self.progress = model, tokenizer, method, progress
        self.scores: dict[tuple, dict[str, tuple[float, bool]]] = {}

    @staticmethod
    def question(request) -> tuple:
        """The question a request belongs to: (task name, doc id, context)."""
        return getattr(request, "task_name", None), getattr(request, "doc_id", None), request.args[0]

    def get(self, requests, mode: str) -> list[tuple[float, bool]]:
        keys = [(self.question(r), r.args[1]) for r in requests]
        missing: dict[tuple, list[str]] = {}
        for question, continuation in keys:
            if (question, continuation) not in self.scores:
                missing.setdefault(question, [])
                if continuation not in missing[question]:
                    missing[question].append(continuation)
        for question, continuations in tqdm(missing.items(), desc="loglikelihood, dense and sparse", unit="question",
                                            disable=not self.progress or not missing):
            ctx, choices = encode(self.tokenizer, Question(question[-1], tuple(continuations), 0))
            s = score_choices(self.model, self.method, ctx, choices)
            for i, continuation in enumerate(continuations):
                self.scores[question, continuation] = {
                    "dense": (float(s.dense[i]), bool(s.dense_greedy[i])),
                    "sparse": (float(s.sparse[i]), bool(s.sparse_greedy[i]))}
        return [self.scores[key][mode] for key in keys]


class _StopAt(StoppingCriteria):
    """Stops once the generated text (after ``start`` tokens) contains one of ``stops``."""

    def __init__(self, tokenizer, start: int, stops: list[str]):
        self.tokenizer, self.start, self.stops = tokenizer, start, stops

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        text = self.tokenizer.decode(input_ids[0, self.start:], skip_special_tokens=True)
        done = any(stop in text for stop in self.stops)
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)


def cut_at_stops(text: str, stops: list[str]) -> str:
    """``text`` up to the first occurrence of any of ``stops``."""
    cut = min((text.find(s) for s in stops if s and s in text), default=len(text))
    return text[:cut]


class HarnessLM(LM):
    """An lm-eval ``LM`` for one mode (``"dense"`` or ``"sparse"``) of a model patched with ``method``."""

    def __init__(self, model: nn.Module, tokenizer, method: Sparsifier, mode: str, cache: ScoreCache | None = None,
                 max_gen_toks: int = DEFAULT_MAX_GEN_TOKS, progress: bool = False):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
        self.model, self.tokenizer, self.method, self.mode = model, tokenizer, method, mode
        self.cache = cache or ScoreCache(model, tokenizer, method)
        self.max_gen_toks, self.progress = max_gen_toks, progress

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        return self.cache.get(requests, self.mode)

    def loglikelihood_rolling(self, requests) -> list[float]:
        raise NotImplementedError("clada lm-eval scores multiple-choice and generation tasks; perplexity tasks "
                                  "(loglikelihood_rolling) are not supported: clada eval --data measures perplexity "
                                  "in the generation regime")

    @torch.no_grad()
    def _generate(self, context: str, gen_kwargs: dict) -> str:
        kwargs = dict(gen_kwargs)
        until = kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        max_new = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
        sample = bool(kwargs.pop("do_sample", False)) and float(kwargs.get("temperature", 1.0)) > 0
        sampling = {k: kwargs[k] for k in ("temperature", "top_p", "top_k") if k in kwargs} if sample else {}
        ctx = self.tokenizer(context)["input_ids"] if context else []
        eos = self.tokenizer.eos_token_id
        ctx = ctx or [eos if eos is not None else 0]
        limit = getattr(self.model.config, "max_position_embeddings", None)
        if limit:
            ctx = ctx[-max(1, limit - max_new):]  # left-truncated to leave room for the new tokens
        device = next(self.model.parameters()).device
        ids = torch.tensor([ctx], device=device)
        stop = StoppingCriteriaList([_StopAt(self.tokenizer, len(ctx), until)] if until else [])
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else eos
        with self.method.dense() if self.mode == "dense" else nullcontext():
            out = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new,
                                      do_sample=sample, stopping_criteria=stop, pad_token_id=pad, **sampling)
        return cut_at_stops(self.tokenizer.decode(out[0, len(ctx):], skip_special_tokens=True), until)

    def generate_until(self, requests) -> list[str]:
        return [self._generate(*r.args) for r in tqdm(requests, desc=f"generate_until, {self.mode}", unit="request",
                                                      disable=not self.progress)]


def task_manager(names: list[str], include_paths: list[str]):
    """lm-eval's TaskManager knowing ``names``: from ``include_paths`` alone when they hold them all (indexing
    lm-eval's own tasks takes seconds), else with lm-eval's tasks too; DataSpecError naming unknown tasks."""
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=include_paths, include_defaults=False)
    if all(name in manager.all_tasks for name in names):
        return manager
    manager = TaskManager(include_path=include_paths)
    unknown = [name for name in names if name not in manager.all_tasks]
    if unknown:
        raise DataSpecError(f"--tasks: unknown lm-eval task {', '.join(map(repr, unknown))}; expected an lm-eval "
                            f"task or group, one in --include-path, {SHIPPED_TASK} or bigbench:TASK")
    return manager


def evaluate_side_by_side(model: nn.Module, tokenizer, method: Sparsifier, names: list[str], manager,
                          limit: int | None = None, max_gen_toks: int = DEFAULT_MAX_GEN_TOKS,
                          progress: bool = False) -> dict:
    """lm-eval's results for the dense and the sparse mode of ``model`` (patched with ``method``) on the tasks
    ``names`` of ``manager``: {"dense": ..., "sparse": ... (each with "results", "n-samples", "versions"),
    "sparse_stats": the runtime's realised figures over the sparse decode steps}."""
    from lm_eval import simple_evaluate

    cache = ScoreCache(model, tokenizer, method, progress)
    method.reset_stats()  # the dense mode records nothing; the sparse steps of scoring and generating are counted
    out = {}
    for mode in MODES:
        lm = HarnessLM(model, tokenizer, method, mode, cache, max_gen_toks, progress)
        result = simple_evaluate(model=lm, tasks=list(names), task_manager=manager, limit=limit, log_samples=False,
                                 bootstrap_iters=1000)
        out[mode] = {key: result[key] for key in ("results", "n-samples", "versions") if key in result}
    stats = method.stats()
    out["sparse_stats"] = {k: stats[k] for k in STAT_KEYS if k in stats}
    return out


def comparison_rows(results: dict) -> list[dict]:
    """One row per task and metric (lm-eval's "metric,filter" keys): dense, sparse ("clada"), their difference,
    lm-eval's standard errors and the number of documents scored."""
    rows = []
    dense, sparse = results["dense"]["results"], results["sparse"]["results"]
    for task, metrics in dense.items():
        n = results["dense"].get("n-samples", {}).get(task, {}).get("effective")
        for key, value in metrics.items():
            metric, comma, filter_name = key.partition(",")
            if not comma or metric.endswith("_stderr") or not isinstance(value, (int, float)):
                continue
            other = sparse.get(task, {}).get(key)
            stderr = f"{metric}_stderr,{filter_name}"
            rows.append({"task": task, "metric": metric if filter_name == "none" else key, "dense": float(value),
                         "clada": None if other is None else float(other),
                         "difference": None if other is None else float(other) - float(value), "n": n,
                         "dense_stderr": metrics.get(stderr), "clada_stderr": sparse.get(task, {}).get(stderr)})
    return rows
