"""Benchmark: time to load (read + validate) a CLADA artifact, and to import clada.runtime in a fresh interpreter.

    python benchmarks/artifact_load.py [ARTIFACT] [--reps N]

Prints medians in milliseconds. Informational only; nothing here is asserted by the tests.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_ARTIFACT = Path(__file__).resolve().parent.parent / "out" / "smollm2-135m" / "clada.safetensors"


def load_ms(path: Path, reps: int) -> list[float]:
    """Wall time of ``clada.artifacts.load_artifact(path)`` per repetition, in ms (after one warm-up load)."""
    from clada.artifacts import load_artifact

    load_artifact(path)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        load_artifact(path)
        times.append((time.perf_counter() - t) * 1e3)
    return times


def import_ms(module: str, reps: int) -> list[float]:
    """Wall time of ``import module`` in a fresh interpreter per repetition, in ms (interpreter start excluded)."""
    code = f"import time; t = time.perf_counter(); import {module}; print((time.perf_counter() - t) * 1e3)"
    return [float(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout)
            for _ in range(reps)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact", nargs="?", type=Path, default=DEFAULT_ARTIFACT)
    parser.add_argument("--reps", type=int, default=50, help="artifact loads (imports: a fifth of it, at least 3)")
    args = parser.parse_args()
    if not args.artifact.is_file():
        sys.exit(f"artifact_load: {args.artifact}: no such file (run clada-calibrate first or pass a path)")
    size_kib = args.artifact.stat().st_size / 1024
    loads = load_ms(args.artifact, args.reps)
    print(f"load_artifact({args.artifact.name}, {size_kib:.0f} KiB): median {statistics.median(loads):.2f} ms, "
          f"min {min(loads):.2f} ms over {len(loads)} loads")
    n = max(3, args.reps // 5)
    for module in ("clada.runtime", "torch", "transformers"):
        times = import_ms(module, n)
        print(f"import {module:13s} (fresh interpreter): median {statistics.median(times):.0f} ms over {n} runs")


if __name__ == "__main__":
    main()
