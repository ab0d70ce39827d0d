"""Optional dependencies: what each is for, which extra installs it, and the one-line failure when one is missing.

``pip install clada`` brings only the runtime's torch, safetensors and transformers. A command checks what it will
use before it loads or downloads anything (``require``). The console scripts start here, and without click go only
as far as saying so.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterable

# module -> (what needs it, the extra that installs it)
OPTIONAL = {
    "click": ("the command line", "calibrate"),
    "optuna": ("the threshold search", "calibrate"),
    "matplotlib": ("the trials plot", "calibrate"),
    "gguf": ("converting a GGUF model", "calibrate"),
    "datasets": ("hf: data", "calibrate"),
    "lm_eval": ("lm-evaluation-harness", "lmeval"),
}


class MissingDependency(RuntimeError):
    """An optional dependency a command needs is not installed (the message names the extra)."""


def installed(module: str) -> bool:
    """Whether ``module`` imports (a module found but failing to import counts as missing)."""
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def require(modules: Iterable[str]) -> None:
    """MissingDependency naming every module of ``modules`` (keys of ``OPTIONAL``) that is not installed, what
    needs it, and the pip command that installs its extra."""
    missing = [m for m in dict.fromkeys(modules) if not installed(m)]
    if missing:
        extras = ",".join(sorted({OPTIONAL[m][1] for m in missing}))
        what = ", ".join(f"{m} ({OPTIONAL[m][0]})" for m in missing)
        raise MissingDependency(f"not installed: {what}; install with: pip install 'clada[{extras}]'")


def _start(command: str) -> None:
    try:
        require(["click"])
    except MissingDependency as exc:
        print(f"clada: error: {exc}", file=sys.stderr)
        sys.exit(2)
    from . import cli

    getattr(cli, command)()


def main() -> None:
    """The ``clada`` console script."""
    _start("main")


def calibrate_main() -> None:
    """The ``clada-calibrate`` console script."""
    _start("calibrate_main")
