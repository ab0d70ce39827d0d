"""What this machine's processor is, for cache keys (built kernels, measured timings) and for reports, and where
clada keeps what it builds or measures once per machine."""

from __future__ import annotations

import os
import platform
from pathlib import Path

# Instruction sets that decide how fast dense and gathering kernels run here (reported by benchmarks).
CPU_FLAGS = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
             "avx512_fp16", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8")
_CACHE_ROOT = Path("/sys/devices/system/cpu/cpu0/cache")


def cache_root() -> Path:
    """Root of clada's cache: ``$CLADA_CACHE`` or ``~/.cache/clada`` (not created here)."""
    return Path(os.environ.get("CLADA_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "clada"))


def cpu_identity() -> str:
    """The CPU's model name and feature flags (what ``-march=native`` compiles for), one core's lines."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    keep = [ln for ln in lines if ln.startswith(("model name", "flags", "Features"))]
    return "\n".join(dict.fromkeys(keep))


def _size_bytes(text: str) -> int | None:
    text = text.strip().upper()
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
    try:
        return int(text.rstrip("KMG")) * mult
    except ValueError:
        return None


def cpu_caches() -> dict[str, dict]:
    """Per cache level of cpu0 (Linux sysfs): ``{"L1d": {"bytes": ..., "shared_cpu_list": ...}, ...}``."""
    caches = {}
    for index in sorted(_CACHE_ROOT.glob("index*")):
        try:
            read = lambda name: (index / name).read_text().strip()  # noqa: E731
            kind = {"Data": "d", "Instruction": "i"}.get(read("type"), "")
            caches[f"L{read('level')}{kind}"] = {"bytes": _size_bytes(read("size")),
                                                 "shared_cpu_list": read("shared_cpu_list")}
        except OSError:
            continue
    return caches


def last_level_cache_bytes(default: int = 32 << 20) -> int:
    """The CPU's largest cache in bytes, or ``default`` where unknown."""
    return max((c["bytes"] for c in cpu_caches().values() if c["bytes"]), default=default)


def cpu_info() -> dict:
    """For reports: model name, family and model numbers, the ``CPU_FLAGS`` it has, its caches, logical CPUs."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    fields: dict[str, str] = {}
    for line in lines:  # the first core's values
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    have = set(fields.get("flags", fields.get("Features", "")).split())
    return {"model_name": fields.get("model name", platform.processor()), "family": fields.get("cpu family"),
            "model": fields.get("model"), "machine": platform.machine(), "logical_cpus": os.cpu_count(),
            "flags": {flag: flag in have for flag in CPU_FLAGS}, "caches": cpu_caches()}
