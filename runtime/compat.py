"""Small shims over transformers versions (the KV-cache argument was renamed from past_key_values to cache)."""

from __future__ import annotations

import inspect
from functools import lru_cache

from torch import nn


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
