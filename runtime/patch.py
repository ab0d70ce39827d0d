"""Apply a CLADA artifact to a transformers model, drive it, report its realised sparsity, remove it again.

The public API (re-exported by ``clada.runtime``): ``apply``, ``remove``, ``is_patched``, ``stats``,
``reset_stats``, ``set_thresholds``, ``dense``, ``fixed_multiplier``, ``multiplier``, ``applied_artifact``.
"""

from __future__ import annotations

import dataclasses
import os
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from ..artifacts import Artifact, ArtifactError, load_artifact
from .adapters import MLPParts, adapter_for
from .backends import BackendChooser
from .checkpoint import CONFIG_KEY, declaration, find_declared_artifact, save_with_artifact
from .dense_products import DenseProducts
from .identity import check_compatible
from .layout import can_share_rows, restore_layout, rows_view, store_rows
from .mlp_step import MLPSteps
from .routing import Routing
from .predictor_step import PredictorSteps
from .rules import ATTENTION_SIDES, MLP_SIDES, PredictorRule, build_rule
from .selection import MeasuredLayout, Shape
from .signals import SignalTracker
from .sparse import ChannelGate, GatedActivation, GatedProjection, RowGroup, SparsityState

PATCH_ATTR = "_clada_patch"


@dataclass
class Patch:
    """Everything ``apply`` changed on a model, so that ``remove`` can undo it exactly."""

    state: SparsityState
    tracker: SignalTracker
    parts: list[MLPParts]  # the MLP parts, then (artifacts that sparsify attention) the attention parts
    act_name: str
    hooks: list
    artifact: Artifact
    routing: Routing | None  # backend="auto": the original modules run where the dense product wins
    dense_products: DenseProducts | None  # the projections left dense, on the compiled CPU product where faster
    # gated MLPs whose decode calls run as one step: gathered (MLPSteps), or the predictor's (PredictorSteps); None:
    # the predictor on the masked reference
    mlp_steps: MLPSteps | PredictorSteps | None
    disable_compile: tuple | None = None  # (generation_config.disable_compile before apply,); None: no such setting


def apply(model: nn.Module, artifact: Artifact | str | os.PathLike | None = None, *, force: bool = False,
          backend: str = "auto", cuda_graphs: bool = False) -> None:
    """Validate ``artifact`` against ``model`` and patch its MLPs (and, for an artifact that sparsifies them, its
    attention projections) for adaptive sparse decoding.

    ``artifact``: an Artifact, a path, or None for the one declared beside the model's checkpoint.
    ``backend``: ``"auto"`` (the fastest available kernel backend per device, dtype and token rows) or one of
    ``runtime.backends.BACKEND_NAMES``; ``"masked"`` keeps the original weight layout and reads every weight.
    Any other backend stores MLP weights as input-channel rows (same memory) so decode steps read only the
    weights of kept channels; ``auto`` does so only where it measured that gathering is faster than the dense
    product, and elsewhere runs the original modules (``runtime.routing``). On a CPU, except for ``"masked"``,
    the products a decode step leaves dense (attention projections the artifact does not sparsify, the LM head,
    MLP projections ``auto`` runs dense) run on the compiled product where it is measured faster than torch's
    (``runtime.dense_products``). ``cuda_graphs``: the caller replays its decode steps from CUDA graphs (a serving
    engine's captured steps; the decode path never synchronises): ``auto`` then compares the device time of dense
    and gathering products, not their time as launched from Python, which on a GPU favours the dense product.
    transformers' automatic ``torch.compile`` of ``generate`` (static caches on a GPU) is turned off while patched
    (``generation_config.disable_compile``): the runtime's hooks and Python-side state are not traceable.
    Nothing is changed if validation fails. ``model.config`` declares the artifact and
    ``model.save_pretrained(dir)`` writes it beside the dense weights, for ``runtime.from_pretrained(dir)``.
    """
    if is_patched(model):
        raise RuntimeError("model already has a CLADA artifact applied; call runtime.remove(model) first")
    adapter = adapter_for(model)
    if artifact is None:
        artifact = find_declared_artifact(model)
    if not isinstance(artifact, Artifact):
        artifact = load_artifact(artifact)
    check_compatible(artifact, model, adapter, force=force, source=artifact.source)
    param = next(model.parameters())
    device = param.device
    chooser = BackendChooser(backend)
    chooser.check(device, param.dtype)
    rule = build_rule(artifact, device)

    parts = adapter.mlp_parts(model)
    try:
        rule.bind(adapter, parts)
    except ValueError as exc:
        raise ArtifactError(f"{artifact.source}: {exc}") from None
    mlp_modules = [m for p in parts for m in p.projections()]  # before any wrapping
    attention = adapter.attention_parts(model) if set(ATTENTION_SIDES) & set(rule.sides) else []
    side_bytes = {side: [] for side in MLP_SIDES + (ATTENTION_SIDES if attention else ())}
    for group, sides in ((parts, MLP_SIDES), (attention, ATTENTION_SIDES)):
        for part in group:
            for side, size in zip(sides, adapter.projection_bytes(part)):
                side_bytes[side].append(size)
    state = SparsityState(rule, chooser, side_bytes, adapter.gated, adapter.decode_weight_bytes(model))
    gathering = backend != "masked" and rule.threshold_form
    rows_of = rows_view(adapter) if gathering else None
    # auto re-lays a shape's weights only where measurement shows that gathering pays (runtime.selection)
    layout = MeasuredLayout(adapter, state, artifact, cuda_graphs) if gathering and backend == "auto" else None
    routing = Routing(state, chooser, param) if layout is not None else None
    for layer, part in enumerate(parts):
        if "in" in rule.sides:
            _gate(adapter, part.owner, part.in_names, ChannelGate(state, layer, "in"), rows_of, layout, routing)
        if "mid" in rule.sides and rule.mid_at == "down_input":
            _gate(adapter, part.owner, (part.out_name,), ChannelGate(state, layer, "mid"), rows_of, layout, routing)
        if "mid" in rule.sides and rule.mid_at == "activation":
            gate_mid = ChannelGate(state, layer, "mid")
            setattr(part.owner, adapter.act_name, GatedActivation(getattr(part.owner, adapter.act_name), gate_mid))
    for layer, part in enumerate(attention):
        for side, names in zip(ATTENTION_SIDES, (part.in_names, (part.out_name,))):
            _gate(adapter, part.owner, names, ChannelGate(state, layer, side), rows_of, layout, routing)
    if isinstance(rule, PredictorRule):
        steps = PredictorSteps(adapter, state, parts, backend, device, param.dtype) if backend != "masked" else None
    else:
        steps = MLPSteps(adapter, state, parts if gathering else [])
    if routing is not None:
        routing.followers.append(steps.follow)
    if layout is not None:
        chooser.selector = layout.select
        state.density_wanted = True
    products = None
    if backend != "masked" and device.type == "cpu":
        dense_attention = [] if attention else adapter.attention_parts(model)
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        products = DenseProducts(mlp_modules + [m for p in dense_attention for m in p.projections()]
                                 + ([head] if head is not None else []))
    tracker = SignalTracker(state, artifact.lam, artifact.gam, artifact.tau_s, artifact.tau_H)
    hooks = [  # routing first: the tracker reads the sides it left dense
        *([model.register_forward_pre_hook(routing.pre_forward, with_kwargs=True)] if routing is not None else []),
        model.register_forward_pre_hook(tracker.pre_forward, with_kwargs=True),
        model.register_forward_hook(tracker.post_forward, with_kwargs=True),
        *([model.register_forward_pre_hook(products.pre_forward, with_kwargs=True)] if products is not None else []),
    ]
    tracker.follow_model(model)  # beam search with legacy tuple caches reorders through the model
    generation = getattr(model, "generation_config", None)
    compile_setting = None
    if generation is not None and hasattr(generation, "disable_compile"):  # transformers >= 4.52
        compile_setting = (generation.disable_compile,)
        generation.disable_compile = True  # transformers would torch.compile generate's forward (and fail in it)
    setattr(model, PATCH_ATTR, Patch(state, tracker, parts + attention, adapter.act_name, hooks, artifact, routing,
                                     products, steps, compile_setting))
    setattr(model.config, CONFIG_KEY, declaration())
    model.save_pretrained = types.MethodType(_save_pretrained, model)  # shadows the class's until remove


def _save_pretrained(model: nn.Module, save_directory: str | os.PathLike, **kwargs) -> None:
    """``save_pretrained`` of a patched model: the dense weights under their usual names, config.json declaring
    the artifact, and the artifact (with the thresholds the model runs with) beside them, so that
    ``runtime.from_pretrained(save_directory)`` restores the patched model."""
    patch = _patch_of(model)
    tau = patch.state.rule.tau
    artifact = dataclasses.replace(patch.artifact, **{f"tau_base_{side}": t.float().cpu() for side, t in tau.items()})
    save_with_artifact(model, save_directory, artifact, **kwargs)


def _gate(adapter, owner: nn.Module, names: tuple[str, ...], gate: ChannelGate,
          rows_of: Callable[[nn.Module], torch.Tensor] | None, layout: MeasuredLayout | None,
          routing: Routing | None) -> None:
    """Wrap the projections ``owner.<name>`` that read one input in GatedProjections behind ``gate``.

    Gathering (``rows_of`` given): projections that can share one row buffer (gate and up) form a RowGroup of
    one shape; their weights are re-laid now for a named backend, or registered with the measured ``layout``
    (auto), which re-lays them where gathering pays; ``routing`` (auto) puts the original modules back in the tree
    where the dense product wins.
    """
    projs = [getattr(owner, n) for n in names]
    shared = rows_of is not None and can_share_rows(adapter, projs)
    group = RowGroup(projs, rows_of) if shared else None
    for members in ([projs] if shared else [[p] for p in projs]):
        weights = [adapter.weight_of(p) for p in members]
        shape = Shape(weights[0].shape[1], sum(w.shape[0] for w in weights), len(members))
        if layout is not None:
            layout.add(shape, gate.side, members)
        elif rows_of is not None:
            store_rows(adapter, members)
        for p in members:
            name = names[projs.index(p)]
            wrapper = GatedProjection(p, gate, rows_of, group, projs.index(p), shape)
            setattr(owner, name, wrapper)
            if routing is not None:
                routing.add(gate.side, shape, owner, name, wrapper)


def is_patched(model: nn.Module) -> bool:
    """Whether ``apply`` has patched ``model`` (and ``remove`` has not undone it)."""
    return getattr(model, PATCH_ATTR, None) is not None


def _patch_of(model: nn.Module) -> Patch:
    patch = getattr(model, PATCH_ATTR, None)
    if patch is None:
        raise RuntimeError("model has no CLADA artifact applied (call runtime.apply first)")
    return patch


def remove(model: nn.Module) -> None:
    """Undo ``apply``: the original modules and weight layout are put back, hooks removed, the config's artifact
    declaration dropped; outputs are dense."""
    patch = _patch_of(model)
    for hook in patch.hooks:
        hook.remove()
    if patch.routing is not None:
        patch.routing.restore()
    if patch.dense_products is not None:
        patch.dense_products.restore()
    if patch.mlp_steps is not None:
        patch.mlp_steps.restore()
    for part in patch.parts:
        for name in part.names:
            wrapped = getattr(part.owner, name)
            if isinstance(wrapped, GatedProjection):
                restore_layout(wrapped.inner)
                setattr(part.owner, name, wrapped.inner)
        act = getattr(part.owner, patch.act_name, None)
        if isinstance(act, GatedActivation):
            setattr(part.owner, patch.act_name, act.inner)
    delattr(model, PATCH_ATTR)
    if patch.disable_compile is not None:
        model.generation_config.disable_compile = patch.disable_compile[0]
    for name in ("save_pretrained", "_reorder_cache"):  # the instance attributes apply set
        model.__dict__.pop(name, None)
    if hasattr(model.config, CONFIG_KEY):  # a dense model declares no artifact: saving it writes none
        delattr(model.config, CONFIG_KEY)


def applied_artifact(model: nn.Module) -> Artifact:
    """The artifact ``apply`` patched ``model`` with."""
    return _patch_of(model).artifact


def stats(model: nn.Module, reset: bool = False) -> dict:
    """Realised figures since the last reset: rule, tokens, mlp_sparsity, input_sparsity, mlp_reads_saved,
    attention_input_sparsity, attention_output_sparsity, attention_reads_saved (None unless the artifact sparsifies
    the attention projections), reads_saved (skipped bytes over all weight bytes a decode step reads), mlp_weight_share, relaxed_share,
    path_calls (gate inputs per backend name), decode_steps (sparse decode calls and token positions, of which in
    calls of several new tokens per row), backends (the choice per device, dtype and token rows), per_layer
    lists, and dense_products (None, or the calls of the projections left dense per product, "native" or "torch",
    and each measured choice: ``runtime.dense_products``)."""
    patch = _patch_of(model)
    out = patch.state.summary()
    out["dense_products"] = patch.dense_products.summary() if patch.dense_products is not None else None
    if patch.mlp_steps is not None:
        out.update(patch.mlp_steps.stats_entries())
    if reset:
        reset_stats(model)
    return out


def reset_stats(model: nn.Module) -> None:
    patch = _patch_of(model)
    patch.state.reset_stats()
    if patch.dense_products is not None:
        patch.dense_products.reset()


@torch.no_grad()
def set_thresholds(model: nn.Module, tau_in: torch.Tensor, tau_mid: torch.Tensor, *,
                   tau_attn_in: torch.Tensor | None = None, tau_attn_out: torch.Tensor | None = None) -> None:
    """Replace the base thresholds (L,) of the input side and the intermediate side (units of the artifact), and
    of the attention sides where given (an artifact that sparsifies attention)."""
    rule = _patch_of(model).state.rule
    given = {"in": tau_in, "mid": tau_mid, "attn_in": tau_attn_in, "attn_out": tau_attn_out}
    for side, tau in given.items():
        if tau is None:
            continue
        if side not in rule.tau:
            raise ValueError(f"set_thresholds: the applied artifact has no {side} side (it leaves attention dense)")
        tau = torch.as_tensor(tau, dtype=torch.float32)
        if tau.shape != rule.tau[side].shape:
            raise ValueError(f"set_thresholds: tau_{side} has shape {tuple(tau.shape)}, "
                             f"model needs {tuple(rule.tau[side].shape)}")
        rule.set_tau(side, tau)


def multiplier(model: nn.Module) -> torch.Tensor | None:
    """The threshold multiplier of the calling thread's running call (None: the call runs dense)."""
    return _patch_of(model).state.multiplier


@contextmanager
def _driven(model: nn.Module, value: torch.Tensor | None, observing: bool) -> Iterator[None]:
    patch = _patch_of(model)
    call = patch.state.call  # the calling thread's (runtime.calls)
    saved = (call.tracking, call.observing)
    call.tracking, call.multiplier, call.observing = False, value, observing
    try:
        yield
    finally:
        (call.tracking, call.observing), call.multiplier = saved, None


def dense(model: nn.Module):
    """Context manager: calls made inside run exactly dense (load signals off) and record nothing."""
    return _driven(model, None, observing=False)


def fixed_multiplier(model: nn.Module, value: float | torch.Tensor = 1.0):
    """Context manager: every token of every call made inside is a sparse step whose thresholds are the base
    thresholds times ``value`` (a number, or a tensor with one value per token row, e.g. (B, T) for calls of
    B rows of T tokens); the load signals are off and the relaxed share counts ``value < 1``."""
    patch = _patch_of(model)
    device = patch.state.rule.tau["in"].device
    value = torch.as_tensor(value, dtype=torch.float32, device=device)
    patch.state.record_multiplier(value)
    return _driven(model, value, observing=True)
