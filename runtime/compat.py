"""Small shims over transformers versions (the KV-cache argument was renamed from past_key_values to cache, the
weights' dtype argument of from_pretrained from torch_dtype to dtype)."""

from __future__ import annotations

import inspect
from functools import lru_cache

import torch
from torch import nn


def transformers_version() -> tuple[int, int]:
    """(major, minor) of the installed transformers."""
    import transformers  # here, not at import: transformers' import pulls in pyyaml, which the runtime avoids

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


CACHE_ARGUMENTS = ("past_key_values", "cache")  # the KV cache keyword of model.forward, old and new


def call_cache(kwargs: dict):
    """The KV cache a model call was given (None: none)."""
    for name in CACHE_ARGUMENTS:
        cache = kwargs.get(name)
        if cache is not None:
            return cache
    return None


def cached_tokens(kwargs: dict) -> int | None:
    """Tokens already in the KV cache of a model call, i.e. the cache position of its first new token: 0 without a
    cache, None where it cannot be told without waiting for the device. Read from the cache (a ``Cache``'s
    ``get_seq_length``, a legacy tuple's key length), else from a host-side ``cache_position``."""
    cache = call_cache(kwargs)
    length = getattr(cache, "get_seq_length", None)
    if callable(length):
        return _host_int(length())
    if cache is not None:
        try:
            return int(cache[0][0].shape[-2])
        except (TypeError, IndexError, AttributeError, KeyError):
            pass
    position = kwargs.get("cache_position")
    if isinstance(position, torch.Tensor) and position.numel():
        return _host_int(position.reshape(-1)[0])
    return 0 if cache is None else None


def _host_int(value) -> int | None:
    """``value`` as an int, or None for a tensor on an accelerator (reading it would synchronise)."""
    if isinstance(value, torch.Tensor):
        return int(value) if value.device.type == "cpu" else None
    return int(value)
