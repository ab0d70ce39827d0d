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
    """The projections of one block of a decoder layer (its MLP, or its attention: ``attention_parts``):
    ``owner.<name>`` for each name; ``in_names`` read the block's input, ``out_name`` its inner activation."""

    owner: nn.Module
    in_names: tuple[str, ...]
    out_name: str

    @property
    def names(self) -> tuple[str, ...]:
        """Every projection's name: ``in_names``, then ``out_name``."""
        return self.in_names + (self.out_name,)

    def projections(self) -> list[nn.Module]:
        """The modules ``owner.<name>`` now holds for ``names``, in that order."""
        return [getattr(self.owner, n) for n in self.names]


class MLPAdapter:
    """Base adapter. Subclasses set ``model_types``, paths, projection names, ``act_name`` and ``gated``."""

    model_types: tuple[str, ...] = ()
    layers_path: str = "model.layers"
    mlp_path: str = "mlp"
    in_names: tuple[str, ...] = ()
    out_name: str = ""
    act_name: str = "act_fn"
    gated: bool = True
    residual_path: str = ""  # module of a decoder layer whose output is the MLP's write to the residual stream
    attn_path: str = "self_attn"  # the attention block: projections reading its input, and the output projection
    attn_in_names: tuple[str, ...] = ("q_proj", "k_proj", "v_proj")
    attn_out_name: str = "o_proj"

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

    def attention_parts(self, model: nn.Module) -> list[MLPParts]:
        """Attention projections of every decoder layer: those reading the attention input (q, k, v, or one fused
        projection) and the output projection reading the attention's output (o)."""
        return [MLPParts(layer.get_submodule(self.attn_path), self.attn_in_names, self.attn_out_name)
                for layer in self.layers(model)]

    def residual_write(self, layer: nn.Module, part: MLPParts) -> nn.Module:
        """The module whose output the decoder layer adds to its residual stream as the MLP's contribution.

        The output projection by default; a post-MLP norm where the family has one (``residual_path``).
        """
        return layer.get_submodule(self.residual_path) if self.residual_path else getattr(part.owner, part.out_name)

    def residual_scale(self, model: nn.Module) -> float:
        """The factor the layer multiplies ``residual_write``'s output by before adding it (1 but for Granite)."""
        return 1.0

    def weight(self, proj: nn.Module) -> torch.Tensor:
        """The projection's weight as (out_features, in_features); sees through a runtime wrapper."""
        return self.weight_of(getattr(proj, "inner", proj))

    def weight_of(self, proj: nn.Module) -> torch.Tensor:
        return proj.weight

    def projection_bytes(self, part: MLPParts) -> tuple[float, float]:
        """Weight bytes a decode step reads in the input projections (together) and in the output projection:
        the one count of MLP bytes that ``mlp_reads_saved`` and the error tables' skipped shares use."""
        def size(name: str) -> float:
            w = self.weight(getattr(part.owner, name))
            return float(w.numel() * w.element_size())
        return sum(size(n) for n in part.in_names), size(part.out_name)

    def decode_weight_bytes(self, model: nn.Module) -> float:
        """Weight bytes one decode step reads in the whole model: every matrix (2-D or larger parameter) outside
        the embedding tables, and the output head (a tied head: the embedding matrix, counted once); an
        embedding lookup reads one row and is left out. ``reads_saved`` divides the skipped bytes by it."""
        embeddings = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        tensors = {id(p): p for p in model.parameters() if p.dim() >= 2 and id(p) not in embeddings}
        if head is not None and getattr(head, "weight", None) is not None:
            tensors[id(head.weight)] = head.weight
        return float(sum(p.numel() * p.element_size() for p in tensors.values()))

    def intermediate(self, part: MLPParts, x: torch.Tensor) -> torch.Tensor:
        """h, the input of the output projection, computed from the MLP input x: (..., D) -> (..., I)."""
        act = getattr(part.owner, self.act_name)
        if self.gated:
            gate, up = (getattr(part.owner, n) for n in part.in_names)
            return act(gate(x)) * up(x)
        return act(getattr(part.owner, part.in_names[0])(x))


class GatedAdapter(MLPAdapter):
    """LLaMA-style gated MLP: down(act(gate(x)) * up(x)); Gemma uses GELU-tanh as ``act_fn``."""

    model_types = ("llama", "mistral", "qwen2", "qwen3", "gemma")
    in_names = ("gate_proj", "up_proj")
    out_name = "down_proj"


class GraniteAdapter(GatedAdapter):
    """Granite: the gated MLP's output is scaled by ``config.residual_multiplier`` before the residual add."""

    model_types = ("granite",)

    def residual_scale(self, model: nn.Module) -> float:
        return float(model.config.residual_multiplier)


class PostNormGatedAdapter(GatedAdapter):
    """Gemma 2/3 (GELU-tanh) and OLMo 2: the gated MLP's output is RMS-normalised before the residual add.

    The norm rescales it (Gemma 3 270M: down_proj's output is 1e-9..1e-2 of the residual, the norm's 0.01..0.8),
    so the MLP's share of the residual stream is measured at ``post_feedforward_layernorm``.
    """

    model_types = ("gemma2", "gemma3_text", "olmo2")
    residual_path = "post_feedforward_layernorm"


class Phi3Adapter(MLPAdapter):
    """Phi-3: down(act(g) * u) with [g, u] = gate_up(x), one fused (2I, D) projection read as a single in-projection.

    The fused weight is neither split nor copied: its input channels are gated once, and h is computed by
    cutting the projection's output in halves, as Phi3MLP does.
    """

    model_types = ("phi3",)
    in_names = ("gate_up_proj",)
    out_name = "down_proj"
    act_name = "activation_fn"
    attn_in_names = ("qkv_proj",)

    def intermediate(self, part: MLPParts, x: torch.Tensor) -> torch.Tensor:
        gate, up = getattr(part.owner, part.in_names[0])(x).chunk(2, dim=-1)
        return getattr(part.owner, self.act_name)(gate) * up


class OPTAdapter(MLPAdapter):
    """OPT: fc2(relu(fc1(x))) directly on the decoder layer."""

    model_types = ("opt",)
    layers_path = "model.decoder.layers"
    mlp_path = ""
    in_names = ("fc1",)
    out_name = "fc2"
    act_name = "activation_fn"
    gated = False
    attn_out_name = "out_proj"


class GPT2Adapter(MLPAdapter):
    """GPT-2: c_proj(gelu(c_fc(x))) with Conv1D weights stored as (in_features, out_features)."""

    model_types = ("gpt2",)
    layers_path = "transformer.h"
    in_names = ("c_fc",)
    out_name = "c_proj"
    act_name = "act"
    gated = False
    attn_path, attn_in_names, attn_out_name = "attn", ("c_attn",), "c_proj"

    def weight_of(self, proj: nn.Module) -> torch.Tensor:
        return proj.weight.t()


class NeoXAdapter(MLPAdapter):
    """GPT-NeoX / Pythia: dense_4h_to_h(gelu(dense_h_to_4h(x)))."""

    model_types = ("gpt_neox",)
    layers_path = "gpt_neox.layers"
    in_names = ("dense_h_to_4h",)
    out_name = "dense_4h_to_h"
    act_name = "act"
    gated = False
    attn_path, attn_in_names, attn_out_name = "attention", ("query_key_value",), "dense"


class FalconAdapter(NeoXAdapter):
    """Falcon: the same MLP as GPT-NeoX (FalconLinear layers), decoder layers under ``transformer.h``."""

    model_types = ("falcon",)
    layers_path = "transformer.h"
    attn_path = "self_attention"


class PhiAdapter(MLPAdapter):
    """Phi-1 / Phi-1.5 / Phi-2: fc2(gelu_new(fc1(x)))."""

    model_types = ("phi",)
    in_names = ("fc1",)
    out_name = "fc2"
    act_name = "activation_fn"
    gated = False
    attn_out_name = "dense"


ADAPTERS: tuple[type[MLPAdapter], ...] = (GatedAdapter, GraniteAdapter, PostNormGatedAdapter, Phi3Adapter, OPTAdapter,
                                          GPT2Adapter, NeoXAdapter, FalconAdapter, PhiAdapter)


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
