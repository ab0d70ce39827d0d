"""One adapter per MLP family: where a decoder layer's MLP projections live and how their weights are laid out.

The algorithm only ever sees ``MLPParts``: the projections that read the MLP input x (``in_names``)
and the projection that reads the intermediate activation h (``out_name``). Adding a family is
one small subclass registered under its ``config.model_type`` values (docs/adding-an-architecture.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


class UnsupportedModelError(ValueError):
    """The model's architecture has no registered adapter."""


@dataclass(frozen=True)
class MLPParts:
    """The MLP projections of one decoder layer: ``owner.<name>`` for each name."""

    owner: nn.Module
    in_names: tuple[str, ...]
    out_name: str


class MLPAdapter:
    """Base adapter. Subclasses set ``model_types``, paths, projection names, ``act_name`` and ``gated``."""

    model_types: tuple[str, ...] = ()
    layers_path: str = "model.layers"
    mlp_path: str = "mlp"
    in_names: tuple[str, ...] = ()
    out_name: str = ""
    act_name: str = "act_fn"
    gated: bool = True

    def layers(self, model: nn.Module) -> list[nn.Module]:
        """The decoder layers, in order."""
        return list(model.get_submodule(self.layers_path))

    def mlp_parts(self, model: nn.Module) -> list[MLPParts]:
        """MLP parts of every decoder layer."""
        parts = []
        for layer in self.layers(model):
            owner = layer.get_submodule(self.mlp_path) if self.mlp_path else layer
            parts.append(MLPParts(owner, self.in_names, self.out_name))
        return parts

    def weight(self, proj: nn.Module) -> torch.Tensor:
        """The projection's weight as (out_features, in_features); sees through a runtime wrapper."""
        return self.weight_of(getattr(proj, "inner", proj))

    def weight_of(self, proj: nn.Module) -> torch.Tensor:
        return proj.weight

    def intermediate(self, part: MLPParts, x: torch.Tensor) -> torch.Tensor:
        """h, the input of the output projection, computed from the MLP input x: (..., D) -> (..., I)."""
        act = getattr(part.owner, self.act_name)
        if self.gated:
            gate, up = (getattr(part.owner, n) for n in part.in_names)
            return act(gate(x)) * up(x)
        return act(getattr(part.owner, part.in_names[0])(x))


class GatedAdapter(MLPAdapter):
    """LLaMA-style gated MLP: down(act(gate(x)) * up(x))."""

    model_types = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "granite", "olmo2")
    in_names = ("gate_proj", "up_proj")
    out_name = "down_proj"


class OPTAdapter(MLPAdapter):
    """OPT: fc2(relu(fc1(x))) directly on the decoder layer."""

    model_types = ("opt",)
    layers_path = "model.decoder.layers"
    mlp_path = ""
    in_names = ("fc1",)
    out_name = "fc2"
    act_name = "activation_fn"
    gated = False


class GPT2Adapter(MLPAdapter):
    """GPT-2: c_proj(gelu(c_fc(x))) with Conv1D weights stored as (in_features, out_features)."""

    model_types = ("gpt2",)
    layers_path = "transformer.h"
    in_names = ("c_fc",)
    out_name = "c_proj"
    act_name = "act"
    gated = False

    def weight_of(self, proj: nn.Module) -> torch.Tensor:
        return proj.weight.t()


ADAPTERS: tuple[type[MLPAdapter], ...] = (GatedAdapter, OPTAdapter, GPT2Adapter)


def supported_model_types() -> list[str]:
    return sorted(t for cls in ADAPTERS for t in cls.model_types)


def adapter_for(model: nn.Module) -> MLPAdapter:
    """The adapter registered for ``model.config.model_type``; UnsupportedModelError otherwise."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for cls in ADAPTERS:
        if model_type in cls.model_types:
            return cls()
    raise UnsupportedModelError(
        f"model_type {model_type!r} is not supported; supported: {', '.join(supported_model_types())} "
        "(see docs/adding-an-architecture.md)"
    )
