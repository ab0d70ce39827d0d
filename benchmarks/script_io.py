"""What the benchmark and probe scripts share: the command line they record and how they write their results.

benchmarks/ is not a package: a script run as ``python benchmarks/NAME.py`` finds this module beside it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from clada.artifacts import write_atomic


def command_line(script: str, argv: list[str] | None) -> str:
    """``python benchmarks/<script> ARGS`` as the script was called (``argv``: None for sys.argv)."""
    return (f"python benchmarks/{script} " + " ".join(argv if argv is not None else sys.argv[1:])).strip()


def write_results(folder: str | Path, stem: str, result: dict, markdown: str) -> None:
    """``<stem>.json`` (``result``) and ``<stem>.md`` (``markdown``) in ``folder``, each written atomically; prints the
    markdown."""
    folder = Path(folder)
    write_atomic(folder / f"{stem}.json", (json.dumps(result, indent=1) + "\n").encode())
    write_atomic(folder / f"{stem}.md", markdown.encode())
    print(markdown)


def number_list(text: str) -> list[float]:
    """argparse type: a comma-separated list of numbers."""
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of numbers: {text!r}") from None
