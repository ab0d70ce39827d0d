"""Small shims over transformers versions (the KV-cache argument was renamed from past_key_values to cache, the
weights' dtype argument of from_pretrained from torch_dtype to dtype)."""

from __future__ import annotations

import inspect
from functools import lru_cache

import torch
import transformers
from torch import nn


def transformers_version() -> tuple[int, int]:
    """(major, minor) of the installed transformers."""
    major, minor = transformers.__version__.split(".")[:2]
    return int(major), int(minor)


def dtype_kwargs(dtype: torch.dtype) -> dict:
    """``from_pretrained`` keyword arguments loading the weights in ``dtype``, whatever the transformers version."""
    return {"dtype" if transformers_version() >= (4, 56) else "torch_dtype": dtype}


@lru_cache(maxsize=None)
def _cache_argument(cls: type) -> str:
    params = inspect.signature(cls.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def cache_kwargs(model: nn.Module, cache) -> dict:
    """Keyword arguments that pass a KV cache to ``model.forward``, whatever the transformers version."""
    return {_cache_argument(type(model)): cache, "use_cache": True}


def output_cache(output):
    """The KV cache returned in a model output."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values
