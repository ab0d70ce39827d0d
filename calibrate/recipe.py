"""Calibration recipes: YAML files validated against a schema before any model is loaded.

Every key, its type, default and meaning is documented in docs/recipe.md. Errors are one line naming
the field (with a did-you-mean for unknown keys) and raise RecipeError.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml


class RecipeError(ValueError):
    """A recipe file or field is invalid."""


@dataclass
class CalibrationSection:
    activation_tokens: int = 1024
    search_docs: int = 16
    score: str = "wina"
    q_in: list[float] = field(default_factory=lambda: [0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4])
    q_mid: list[float] = field(default_factory=lambda: [round(0.05 * i, 2) for i in range(16)])  # 0 .. 0.75
    compensation: bool = True  # tables also hold compensated input sides; the allocation picks per layer
    layer_error: str = "kl"  # the tables' error: "kl" (second-order KL from output gradients) or "relative"
    gradient_samples: int = 4  # sampled-token gradients per activation token estimating the KL (layer_error kl)
    attention_sparsity: float = 0.0  # share of attention input/output channels skipped per layer (0: attention dense)
    # the runtime rule the tables are measured for: "threshold" (|x|·w > tau on both MLP sides), "predictor"
    # (neurons chosen from a 4-bit copy of gate and up, runtime.predictor; gated MLPs, no compensation) or "auto"
    # (both rules' tables; each search trial picks one, and the artifact has the chosen trial's)
    rule: str = "threshold"


@dataclass
class SearchSection:
    trials: int = 40
    max_ppl_increase: float = 0.02
    adapt: bool = True
    prefix: bool = False  # search the prompt prior's exponent too (prefix-driven sparsity; 0 is in the range)
    allocation: str = "marginal"
    storage: str | None = None
    validation_docs: int = 48
    candidates: int = 8
    fill_steps: int = 3  # bisection steps moving the validated choice's level up while it stays within the budget


@dataclass
class EvalSection:
    heldout_docs: int = 32
    batch_size: int = 16


@dataclass
class Recipe:
    model: str = "smollm2-135m"
    data: str = "lee"
    output: str = "out/smollm2-135m"
    seed: int = 0
    dtype: str = "float32"
    device: str = "cpu"
    prompt_tokens: int = 64
    scored_tokens: int = 128
    heldout_fraction: float = 0.3
    calibration: CalibrationSection = field(default_factory=CalibrationSection)
    search: SearchSection = field(default_factory=SearchSection)
    eval: EvalSection = field(default_factory=EvalSection)

    def to_dict(self) -> dict:
        return asdict(self)


SECTIONS = {"calibration": CalibrationSection, "search": SearchSection, "eval": EvalSection}

# (field path, lower bound, upper bound) for numbers; bounds inclusive, None = open.
RANGES = {
    "seed": (0, None), "prompt_tokens": (1, None), "scored_tokens": (1, None), "heldout_fraction": (0.01, 0.99),
    "calibration.activation_tokens": (16, None), "calibration.search_docs": (1, None),
    "calibration.attention_sparsity": (0.0, 0.9), "calibration.gradient_samples": (1, None),
    "search.trials": (1, None), "search.max_ppl_increase": (0.0, 10.0),
    "search.validation_docs": (0, None), "search.candidates": (1, None),
    "search.fill_steps": (0, None),
    "eval.heldout_docs": (1, None), "eval.batch_size": (1, None),
}
# Keys whose default follows calibration.search_docs (the size of a recipe): the value per search document.
# The defaults (search_docs 16) are 1024 activation tokens, 48 validation and 32 held-out documents.
PER_SEARCH_DOC = {"calibration.activation_tokens": 64, "search.validation_docs": 3, "eval.heldout_docs": 2}
CHOICES = {"dtype": ("float32", "bfloat16", "float16"), "calibration.score": ("wina", "magnitude"),
           "calibration.layer_error": ("kl", "relative"), "calibration.rule": ("threshold", "predictor", "auto"),
           "search.allocation": ("marginal", "budget", "both")}


def _check_type(path: str, value: Any, default: Any, annotation: str) -> Any:
    if annotation.startswith("list"):
        if not isinstance(value, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            raise RecipeError(f"recipe field '{path}': expected a list of numbers, got {value!r}")
        if not value or any(not 0.0 <= v < 1.0 for v in value) or sorted(value) != value:
            raise RecipeError(f"recipe field '{path}': quantiles must be ascending, in [0, 1), non-empty")
        return [float(v) for v in value]
    if annotation == "str | None":
        if value is not None and not isinstance(value, str):
            raise RecipeError(f"recipe field '{path}': expected a string or null, got {value!r}")
        return value
    kind = type(default)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise RecipeError(f"recipe field '{path}': expected {kind.__name__}, got {type(value).__name__} {value!r}")
    return value


def _build(cls, data: dict, prefix: str):
    known = {f.name: f for f in fields(cls)}
    kwargs = {}
    for key, value in data.items():
        path = prefix + str(key)
        if key not in known:
            close = difflib.get_close_matches(str(key), list(known), n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
            raise RecipeError(f"recipe: unknown field '{path}'{hint}")
        if key in SECTIONS and not prefix:
            if not isinstance(value, dict):
                raise RecipeError(f"recipe field '{path}': expected a mapping")
            kwargs[key] = _build(SECTIONS[key], value, path + ".")
            continue
        default = getattr(cls(), key)
        value = _check_type(path, value, default, str(known[key].type))
        if path in RANGES and value is not None:
            low, high = RANGES[path]
            if (low is not None and value < low) or (high is not None and value > high):
                raise RecipeError(f"recipe field '{path}': {value} is outside [{low}, {high if high is not None else 'inf'}]")
        if path in CHOICES and value not in CHOICES[path]:
            raise RecipeError(f"recipe field '{path}': {value!r} is not one of {', '.join(CHOICES[path])}")
        if path == "search.storage" and value is not None:
            value = _check_storage(value, f"recipe field '{path}'")
        if path == "device":
            _check_device(value)
        kwargs[key] = value
    return cls(**kwargs)


def _check_device(device: str) -> None:
    from .models import device_problem  # imports torch; only when a recipe names a device

    problem = device_problem(device)
    if problem:
        raise RecipeError(f"recipe field 'device': {problem}")


def _check_storage(url: str, field: str) -> str:
    from .storage import check_url  # imports SQLAlchemy; only when a storage is given

    return check_url(url, field)


def parse_recipe(data: Any, source: str = "recipe") -> Recipe:
    """Validate a recipe mapping and return a Recipe with defaults filled in."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: top level must be a mapping of fields")
    recipe = _build(Recipe, data, "")
    for path, per_doc in PER_SEARCH_DOC.items():
        section, key = path.split(".")
        if key not in data.get(section, {}):
            setattr(getattr(recipe, section), key, per_doc * recipe.calibration.search_docs)
    if recipe.calibration.rule != "threshold":  # what the predictor rule does not have
        for path, value in (("calibration.attention_sparsity", recipe.calibration.attention_sparsity),
                            ("search.prefix", recipe.search.prefix)):
            if value:
                raise RecipeError(f"recipe field '{path}': the predictor rule (calibration.rule: "
                                  f"{recipe.calibration.rule}) has none; leave it off")
    return recipe


def load_recipe(path: str | os.PathLike, output: str | None = None, storage: str | None = None) -> Recipe:
    """Read and validate a YAML recipe; ``output`` and ``storage`` override ``output`` and ``search.storage``."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    recipe = parse_recipe(data, str(path))
    if output is not None:
        recipe.output = output
    if storage is not None:
        recipe.search.storage = _check_storage(storage, "--storage")
    return recipe
