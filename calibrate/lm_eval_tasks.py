"""lm-evaluation-harness tasks for ``clada lm-eval``: the shipped offline task, BIG-bench tasks converted on the
fly, and the include folders the harness is given.

Every task here is a multiple-choice task YAML over a local JSONL file (lm-eval's ``json`` dataset builder) whose
rows are those of ``clada eval --mc FILE.jsonl`` (``context``, ``choices``, ``label``; see
``clada.calibrate.multiple_choice``). The request lm-eval then makes per choice is (context, choice) verbatim
(``target_delimiter: ""``), and the wrapper encodes it as ``clada eval --mc`` does, so the two give the same
scores.

- ``clada_cause_and_effect`` (shipped, ``calibrate/tasks/cause_and_effect/``): BIG-bench ``cause_and_effect``
  (all three subtasks, 153 questions) in the zero-shot prompt of ``clada eval --mc bigbench:cause_and_effect``;
  ``write_shipped_task()`` regenerates its JSONL and YAML.
- ``bigbench:TASK[/SUBTASK]``: any BIG-bench JSON task, converted from the cached ``bigbench`` sdist into a
  temporary include folder as the lm-eval task ``clada_bigbench_TASK[__SUBTASK]``.

lm-eval resolves a relative ``data_files`` path against the current directory; the shipped YAML names its JSONL
relative to itself, and ``prepare_tasks`` writes a copy whose path is absolute, so it runs from anywhere.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import yaml

from ..artifacts import write_atomic
from .data import DataSpecError
from .multiple_choice import load_bigbench, questions_jsonl

SHIPPED = Path(__file__).parent / "tasks"
SHIPPED_TASK = "clada_cause_and_effect"
_SHIPPED_FOLDER = SHIPPED / "cause_and_effect"
_SHIPPED_SOURCE = "cause_and_effect"
BIGBENCH_PREFIX = "bigbench:"


def task_config(name: str, data_file: str) -> dict:
    """An lm-eval multiple-choice task over the JSONL file ``data_file`` (rows: context, choices, label)."""
    return {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": data_file}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "context",
        "doc_to_choice": "choices",
        "doc_to_target": "label",
        "target_delimiter": "",
        "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in ("acc", "acc_norm")],
        "metadata": {"version": 1.0},
    }


def _dump(config: dict) -> bytes:
    return yaml.safe_dump(config, sort_keys=False).encode()


def write_task(folder: Path, name: str, jsonl_name: str, jsonl: str, data_file: str | None = None) -> Path:
    """Write ``folder/jsonl_name`` and ``folder/name.yaml`` (naming the JSONL as ``data_file``, default its
    absolute path); returns the YAML's path."""
    target = folder / jsonl_name
    write_atomic(target, jsonl.encode())
    path = folder / f"{name}.yaml"
    write_atomic(path, _dump(task_config(name, data_file or str(target.resolve()))))
    return path


def write_shipped_task(folder: Path = _SHIPPED_FOLDER) -> Path:
    """Regenerate the shipped task from BIG-bench ``cause_and_effect`` (fetches the bigbench sdist once)."""
    return write_task(folder, SHIPPED_TASK, f"{_SHIPPED_SOURCE}.jsonl", questions_jsonl(load_bigbench(_SHIPPED_SOURCE)),
                      data_file=f"{_SHIPPED_SOURCE}.jsonl")


def localise(yaml_path: Path, folder: Path) -> Path:
    """Copy the task YAML ``yaml_path`` into ``folder`` with its relative ``data_files`` made absolute against
    its own folder (lm-eval would take them relative to the current directory)."""
    config = yaml.safe_load(yaml_path.read_text(encoding="utf-8"))
    config = copy.deepcopy(config)
    files = config.get("dataset_kwargs", {}).get("data_files", {})
    for split, name in files.items():
        if not Path(name).is_absolute():
            files[split] = str((yaml_path.parent / name).resolve())
    target = folder / yaml_path.name
    write_atomic(target, _dump(config))
    return target


def bigbench_task_name(task: str) -> str:
    """The lm-eval name of ``bigbench:TASK[/SUBTASK]`` converted by ``prepare_tasks``."""
    return "clada_bigbench_" + task.replace("/", "__")


@dataclass(frozen=True)
class PreparedTasks:
    names: list[str]           # lm-eval task names, in the order given
    include_paths: list[str]   # folders for lm-eval's TaskManager


def parse_tasks(spec: str) -> list[str]:
    """``--tasks`` "a,bigbench:b" -> ["a", "bigbench:b"]; DataSpecError if empty."""
    names = [t.strip() for t in spec.split(",") if t.strip()]
    if not names:
        raise DataSpecError(f"--tasks: expected comma-separated task names, got {spec!r}")
    return names


def prepare_tasks(tasks: list[str], include_paths: list[str], folder: Path) -> PreparedTasks:
    """lm-eval names and include folders for ``tasks``: the shipped task (localised into ``folder``), each
    ``bigbench:`` task converted into ``folder``, then the user's ``include_paths`` (each must be a folder)."""
    for path in include_paths:
        if not Path(path).is_dir():
            raise DataSpecError(f"--include-path: {path} is not a folder")
    for shipped in sorted(SHIPPED.glob("*/*.yaml")):
        localise(shipped, folder)
    names = []
    for task in tasks:
        if task.startswith(BIGBENCH_PREFIX):
            source = task.removeprefix(BIGBENCH_PREFIX)
            name = bigbench_task_name(source)
            write_task(folder, name, f"{name}.jsonl", questions_jsonl(load_bigbench(source)))
            names.append(name)
        else:
            names.append(task)
    return PreparedTasks(names, [str(folder), *(str(Path(p).resolve()) for p in include_paths)])
