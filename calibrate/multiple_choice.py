"""Log-likelihood multiple choice, dense vs sparse, from JSONL files or BIG-bench JSON tasks.

Question sources (``load_questions(spec)``):

- ``FILE.jsonl``: one object per line, ``{"context": str, "choices": [str, ...], "label": int}``; each choice
  is appended to the context verbatim.
- ``bigbench:TASK`` or ``bigbench:TASK/SUBTASK``: the task.json of the ``bigbench==1.0.0`` source
  distribution on PyPI, downloaded once into the clada cache (``pip download --no-deps --no-binary :all:``);
  only the named task's task.json files are extracted (tarfile members, the archive is never unpacked) and
  cached. A task.json without examples (e.g. cause_and_effect) stands for the union of its subtasks.
  Zero-shot prompt, BIG-bench's JSON-task format: task_prefix + example_input_prefix (default "\\nQ: ") + input
  + (if append_choices_to_input, default true) choice_prefix (default "\\n  choice: ") before each choice, in
  sorted order + example_output_prefix (default "\\nA: "). The label is the choice with the top target score;
  examples without target_scores (generative) are left out.

Scoring: a choice's score is the sum of log p(choice tokens | context). The regime is that of generation:
the context is a dense prefill and the choice tokens are decode steps (fed one at a time for adaptive
methods; in one teacher-forced call otherwise, which is exactly equivalent); dense scores come from the same
prefill with the continuation run in the method's dense mode. A trailing space of the context is moved to
the front of the choices (so that BPE tokenisers see " word"). An empty context is replaced by the EOS token.
accuracy = share of questions whose top-scoring choice is the label; chance = mean of 1 / number of choices.
"""

from __future__ import annotations

import copy
import json
import os
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..artifacts import write_atomic
from .cache import cache_dir, download_sdist
from .data import DataSpecError
from .evaluate import Sparsifier
from ..runtime.compat import cache_kwargs, output_cache

BIGBENCH_SDIST = "bigbench==1.0.0"
BIGBENCH_TASKS = "bigbench/benchmark_tasks/"
_TASK_NAME = re.compile(r"^[A-Za-z0-9_]+(/[A-Za-z0-9_]+)?$")


@dataclass(frozen=True)
class Question:
    context: str
    choices: tuple[str, ...]
    label: int
    source: str = ""  # e.g. the BIG-bench subtask


def _question(context, choices, label, where: str, source: str = "") -> Question:
    if not isinstance(context, str):
        raise DataSpecError(f"{where}: 'context' must be a string")
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
        raise DataSpecError(f"{where}: 'choices' must be a list of at least two non-empty strings")
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(choices):
        raise DataSpecError(f"{where}: 'label' must be an index into 'choices' (0 .. {len(choices) - 1})")
    return Question(context, tuple(choices), label, source)


def jsonl_questions(path: str | os.PathLike) -> list[Question]:
    """Questions of a JSONL file (see the module doc); DataSpecError naming the file and line when malformed."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataSpecError(f"{path}: cannot read multiple-choice file ({exc})") from None
    questions = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise DataSpecError(f"{path}:{number}: not valid JSON") from None
        if not isinstance(row, dict):
            raise DataSpecError(f"{path}:{number}: expected an object with context, choices, label")
        questions.append(_question(row.get("context"), row.get("choices"), row.get("label"), f"{path}:{number}"))
    if not questions:
        raise DataSpecError(f"{path}: no questions")
    return questions


def questions_jsonl(questions: list[Question]) -> str:
    """The JSONL text of ``questions`` that ``jsonl_questions`` reads back (with each question's source)."""
    return "".join(json.dumps({"context": q.context, "choices": list(q.choices), "label": q.label, "source": q.source},
                              ensure_ascii=False) + "\n" for q in questions)


def bigbench_questions(task: dict, source: str = "") -> list[Question]:
    """Zero-shot multiple-choice questions of one BIG-bench JSON task (format in the module doc)."""
    prefix = str(task.get("task_prefix", ""))
    input_prefix = str(task.get("example_input_prefix", "\nQ: "))
    output_prefix = str(task.get("example_output_prefix", "\nA: "))
    choice_prefix = str(task.get("choice_prefix", "\n  choice: "))
    append = bool(task.get("append_choices_to_input", True))
    questions = []
    for example in task.get("examples", []):
        scores = example.get("target_scores")
        if not isinstance(scores, dict) or len(scores) < 2:
            continue
        choices = sorted(scores)
        label = max(range(len(choices)), key=lambda i: (float(scores[choices[i]]), -i))
        text = str(example.get("input", ""))
        if append:
            text += "".join(choice_prefix + c for c in choices)
        questions.append(Question(prefix + input_prefix + text + output_prefix, tuple(choices), label, source))
    return questions


def _extract_task_files(task: str, target: Path) -> list[str]:
    """Extract TASK/task.json and TASK/*/task.json from the BIG-bench sdist into ``target``; relative paths."""
    pattern = re.compile(rf"^[^/]+/{re.escape(BIGBENCH_TASKS)}({re.escape(task)}(/[^/]+)?/task\.json)$")
    found = []
    with tarfile.open(download_sdist(BIGBENCH_SDIST), "r:gz") as archive:
        for member in archive:  # headers are read one by one; only matching members are read out
            match = pattern.match(member.name)
            if match and member.isfile() and (match.group(2) is None or "/" not in task):
                write_atomic(target / match.group(1), archive.extractfile(member).read())
                found.append(match.group(1))
    return sorted(found)


def bigbench_task_files(task: str) -> tuple[Path | None, list[Path]]:
    """Cached task.json of a BIG-bench task (None if it has none) and those of its subtasks, extracted once."""
    if not _TASK_NAME.match(task):
        raise DataSpecError(f"bigbench task {task!r}: expected TASK or TASK/SUBTASK (letters, digits, _)")
    root = cache_dir() / "files" / BIGBENCH_SDIST.replace("==", "-") / "benchmark_tasks"
    manifest = root / f"{task.replace('/', '__')}.files.json"
    if not manifest.is_file():
        files = _extract_task_files(task, root)
        if not files:
            raise DataSpecError(f"bigbench task {task!r} is not in {BIGBENCH_SDIST}")
        write_atomic(manifest, json.dumps(files).encode())
    own = f"{task}/task.json"
    files = json.loads(manifest.read_text())
    return (root / own if own in files else None), [root / f for f in files if f != own]


def load_bigbench(task: str) -> list[Question]:
    """Questions of ``bigbench:TASK[/SUBTASK]``: the task's own examples, else those of all its subtasks."""
    own, subtasks = bigbench_task_files(task)
    if own is not None:
        questions = bigbench_questions(json.loads(own.read_text(encoding="utf-8")), task)
        if questions:
            return questions
    questions = []
    for path in subtasks:
        questions += bigbench_questions(json.loads(path.read_text(encoding="utf-8")), f"{task}/{path.parent.name}")
    if not questions:
        raise DataSpecError(f"bigbench task {task!r} has no multiple-choice examples")
    return questions


def load_questions(spec: str) -> list[Question]:
    """``FILE.jsonl`` or ``bigbench:TASK[/SUBTASK]``."""
    if spec.startswith("bigbench:"):
        return load_bigbench(spec.removeprefix("bigbench:"))
    if spec.endswith(".jsonl"):
        return jsonl_questions(spec)
    raise DataSpecError(f"multiple-choice spec {spec!r}: expected FILE.jsonl or bigbench:TASK")


def encode(tokenizer, question: Question) -> tuple[list[int], list[list[int]]]:
    """Token ids of the context and of each choice (see the module doc for the whitespace rule)."""
    context = question.context.rstrip(" ")
    space = question.context[len(context):]
    ctx = tokenizer(context)["input_ids"] if context else []
    if not ctx:
        ctx = [tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0]
    choices = [tokenizer(space + c, add_special_tokens=False)["input_ids"] for c in question.choices]
    if any(not c for c in choices):
        raise ValueError(f"a choice of question {question.context[:40]!r} encodes to no tokens")
    return ctx, choices


def _choice_logprobs(first: torch.Tensor, rest: torch.Tensor, cont: torch.Tensor,
                     lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(n,) summed log-probs of each row's first ``lengths`` tokens of ``cont`` (n, T), and (n,) whether each of
    them is the top prediction (greedy); predictions: ``first`` (n, V) of token 0 and ``rest`` (n, T-1, V) of
    tokens 1..T-1."""
    logits = torch.cat([first[:, None], rest], 1).float()
    logp = torch.log_softmax(logits, -1).gather(-1, cont[..., None]).squeeze(-1)
    keep = torch.arange(cont.shape[1], device=cont.device)[None] < lengths[:, None]
    greedy = ((logits.argmax(-1) == cont) | ~keep).all(1)
    return (logp * keep).sum(1), greedy


@dataclass(frozen=True)
class ChoiceScores:
    """Log-likelihood of each choice, dense and sparse, each (n,), and whether greedy decoding (in the same
    mode) would produce the choice."""

    dense: torch.Tensor
    sparse: torch.Tensor
    dense_greedy: torch.Tensor
    sparse_greedy: torch.Tensor


@torch.no_grad()
def score_choices(model: nn.Module, method: Sparsifier, ctx: list[int], choices: list[list[int]]) -> ChoiceScores:
    """Dense and sparse log-likelihood of each choice after ``ctx``, in the regime of the module doc."""
    device = next(model.parameters()).device
    n, width = len(choices), max(len(c) for c in choices)
    cont = torch.tensor([c + [c[-1]] * (width - len(c)) for c in choices], device=device)  # right-padded
    lengths = torch.tensor([len(c) for c in choices], device=device)
    prefill = model(input_ids=torch.tensor([ctx] * n, device=device), use_cache=True)  # dense in every method
    first, cache = prefill.logits[:, -1], output_cache(prefill)
    with method.dense():
        dense = model(input_ids=cont[:, :-1], **cache_kwargs(model, copy.deepcopy(cache))).logits if width > 1 else None
    if width == 1:
        sparse = None
    elif method.adaptive:
        steps = []
        for t in range(width - 1):
            out = model(input_ids=cont[:, t : t + 1], **cache_kwargs(model, cache))
            cache = output_cache(out)
            steps.append(out.logits[:, -1])
        sparse = torch.stack(steps, 1)
    else:
        with method.teacher_forced():
            sparse = model(input_ids=cont[:, :-1], **cache_kwargs(model, cache)).logits
    empty = first.new_zeros(n, 0, first.shape[-1])
    dense_lp, dense_greedy = _choice_logprobs(first, dense if dense is not None else empty, cont, lengths)
    sparse_lp, sparse_greedy = _choice_logprobs(first, sparse if sparse is not None else empty, cont, lengths)
    return ChoiceScores(dense_lp, sparse_lp, dense_greedy, sparse_greedy)


def score_question(model: nn.Module, method: Sparsifier, ctx: list[int], choices: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(dense, sparse) log-likelihood of each choice, each (n,), in the regime of the module doc."""
    scores = score_choices(model, method, ctx, choices)
    return scores.dense, scores.sparse


def multiple_choice_eval(model: nn.Module, tokenizer, questions: list[Question], method: Sparsifier,
                         progress: bool = True) -> dict:
    """Accuracy dense and sparse, chance level and how often both pick the same choice."""
    dense_right = sparse_right = same = 0
    chance = 0.0
    for q in tqdm(questions, desc="multiple choice", unit="q", disable=not progress):
        ctx, choices = encode(tokenizer, q)
        dense, sparse = score_question(model, method, ctx, choices)
        d, s = int(dense.argmax()), int(sparse.argmax())
        dense_right += d == q.label
        sparse_right += s == q.label
        same += d == s
        chance += 1.0 / len(q.choices)
    n = len(questions)
    return {"questions": n, "accuracy_dense": dense_right / n, "accuracy_sparse": sparse_right / n,
            "chance": chance / n, "same_choice": same / n}
