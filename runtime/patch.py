"""Apply a CLADA artifact to a transformers model, report its realised sparsity, and remove it again."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from clada.artifacts import FORMAT_VERSION, Artifact, ArtifactError, load_artifact, write_atomic
from clada.runtime.adapters import MLPAdapter, MLPParts, adapter_for
from clada.runtime.signals import SignalTracker
from clada.runtime.sparse import ChannelGate, GatedProjection, RowGroup, SparsityState

ARTIFACT_FILENAME = "clada.safetensors"
FINGERPRINT_RTOL = 1e-3


@dataclass
class Patch:
    """Everything ``apply`` changed on a model, so that ``remove`` can undo it exactly."""

    state: SparsityState
    tracker: SignalTracker
    parts: list[MLPParts]
    hooks: list
    artifact: Artifact


def model_identity(model: nn.Module, adapter: MLPAdapter | None = None) -> dict:
    """Architecture facts an artifact is checked against."""
    adapter = adapter or adapter_for(model)
    parts = adapter.mlp_parts(model)
    out_weight = adapter.weight(getattr(parts[0].owner, parts[0].out_name))
    return {
        "model_type": model.config.model_type,
        "architecture": type(model).__name__,
        "num_layers": len(parts),
        "hidden_size": int(out_weight.shape[0]),
        "intermediate_size": int(out_weight.shape[1]),
        "vocab_size": int(model.config.vocab_size),
        "gated": adapter.gated,
    }


@torch.no_grad()
def mlp_fingerprint(model: nn.Module, adapter: MLPAdapter | None = None) -> torch.Tensor:
    """(L, P) float64 Frobenius norms of each layer's MLP projection weights (dtype-robust identity)."""
    adapter = adapter or adapter_for(model)
    rows = []
    for part in adapter.mlp_parts(model):
        names = part.in_names + (part.out_name,)
        rows.append([float(adapter.weight(getattr(part.owner, n)).double().norm()) for n in names])
    return torch.tensor(rows, dtype=torch.float64)


def _layer_bytes(adapter: MLPAdapter, part: MLPParts) -> tuple[float, float]:
    """Weight bytes read per token by the input projections and by the output projection."""
    def size(name: str) -> float:
        w = adapter.weight(getattr(part.owner, name))
        return float(w.numel() * w.element_size())
    return sum(size(n) for n in part.in_names), size(part.out_name)


def check_compatible(artifact: Artifact, model: nn.Module, adapter: MLPAdapter, force: bool = False,
                     source: str = "artifact") -> None:
    """Raise ArtifactError if the artifact was not calibrated for this model (fingerprint unless ``force``)."""
    ident = model_identity(model, adapter)
    for key in ("num_layers", "hidden_size", "intermediate_size"):
        want = artifact.model.get(key)
        if want is not None and want != ident[key]:
            raise ArtifactError(f"{source}: calibrated for {key}={want}, model has {ident[key]}")
    shapes = {"channel_scale_in": ident["hidden_size"], "channel_scale_mid": ident["intermediate_size"]}
    for name, width in shapes.items():
        t = getattr(artifact, name)
        if t.shape != (ident["num_layers"], width):
            raise ArtifactError(f"{source}: {name} has shape {tuple(t.shape)}, model needs {(ident['num_layers'], width)}")
    if not force:
        mine = mlp_fingerprint(model, adapter)
        theirs = artifact.fingerprint
        if mine.shape != theirs.shape or not torch.allclose(mine, theirs, rtol=FINGERPRINT_RTOL, atol=0):
            raise ArtifactError(f"{source}: weight fingerprint does not match this model (calibrated on other "
                                "weights); recalibrate, or pass force=True (--force on the command line) to override")


def find_declared_artifact(model: nn.Module) -> Path:
    """The artifact stored beside the model's checkpoint (config ``clada.file`` or clada.safetensors)."""
    folder = getattr(model.config, "_name_or_path", "") or getattr(model, "name_or_path", "")
    declared = getattr(model.config, "clada", None)
    name = declared.get("file", ARTIFACT_FILENAME) if isinstance(declared, dict) else ARTIFACT_FILENAME
    path = Path(folder) / name
    if not folder or not path.is_file():
        raise ArtifactError(f"no artifact path given and none found beside the checkpoint ({path})")
    return path


def _store_rows_contiguous(adapter: MLPAdapter, proj: nn.Module) -> bool:
    """Re-lay the projection's weight in place so its (in_features, out_features) rows are contiguous.

    The parameter keeps its shape and values (it becomes a transposed view of new storage; no copy is kept).
    Returns whether the rows are now contiguous (False for layouts this cannot change).
    """
    if adapter.weight_of(proj).t().is_contiguous():
        return True  # e.g. GPT-2's Conv1D already stores (in, out)
    param = getattr(proj, "weight", None)
    if isinstance(param, nn.Parameter) and param.data.is_contiguous():
        param.data = param.data.t().contiguous().t()
    return adapter.weight_of(proj).t().is_contiguous()


def _store_rows_shared(adapter: MLPAdapter, projs: list[nn.Module]) -> bool:
    """Lay the (in, out) rows of input projections that read the same input side by side in one buffer
    (in_features, sum of out_features), in place: each parameter becomes a transposed view of its column
    block (no copy is kept). Returns False, changing nothing, where the weights are not plain Linear weights."""
    params = [getattr(p, "weight", None) for p in projs]
    if len(projs) < 2 or not all(isinstance(q, nn.Parameter) and adapter.weight_of(p) is q and q.dim() == 2
                                 for p, q in zip(projs, params)):
        return False
    first = params[0]
    if any(q.shape[1] != first.shape[1] or q.dtype != first.dtype or q.device != first.device for q in params):
        return False
    buffer = torch.empty(first.shape[1], sum(q.shape[0] for q in params), dtype=first.dtype, device=first.device)
    start = 0
    for q in params:
        block = buffer[:, start : start + q.shape[0]]
        block.copy_(q.data.t())
        q.data = block.t()
        start += q.shape[0]
    return True


def _rows_of(adapter: MLPAdapter):
    """proj -> its weight as (in_features, out_features), a view of the storage it computes with."""
    return lambda proj: adapter.weight_of(proj).t()


def _restore_layout(proj: nn.Module) -> None:
    param = getattr(proj, "weight", None)
    if isinstance(param, nn.Parameter) and not param.data.is_contiguous():
        param.data = param.data.contiguous()


def apply(model: nn.Module, artifact: Artifact | str | os.PathLike | None = None, *, force: bool = False,
          fast: bool = True) -> SparsityState:
    """Validate ``artifact`` against ``model`` and patch its MLPs for adaptive sparse decoding.

    ``fast``: store MLP weights transposed (same memory) so decode steps read only the weights of active
    channels; False keeps the original layout and runs the masked reference (reads every weight).
    Nothing is changed if validation fails. Returns the shared SparsityState.
    """
    if getattr(model, "_clada_patch", None) is not None:
        raise RuntimeError("model already has a CLADA artifact applied; call runtime.remove(model) first")
    adapter = adapter_for(model)
    if artifact is None:
        artifact = find_declared_artifact(model)
    if not isinstance(artifact, Artifact):
        artifact = load_artifact(artifact)
    check_compatible(artifact, model, adapter, force=force, source=artifact.source)

    parts = adapter.mlp_parts(model)
    sizes = [_layer_bytes(adapter, part) for part in parts]
    state = SparsityState(artifact.tau_base_in, artifact.tau_base_mid, [s[0] for s in sizes], [s[1] for s in sizes])
    device = next(model.parameters()).device
    state.to(device)
    state.fast = fast
    rows_of = _rows_of(adapter) if fast else None
    for layer, part in enumerate(parts):
        gate_in = ChannelGate(state, layer, "in", artifact.channel_scale_in[layer]).to(device)
        gate_mid = ChannelGate(state, layer, "mid", artifact.channel_scale_mid[layer]).to(device)
        ins = [getattr(part.owner, n) for n in part.in_names]
        group = RowGroup(ins, rows_of) if fast and _store_rows_shared(adapter, ins) else None
        for member, name in enumerate(part.in_names):
            if fast and group is None:
                _store_rows_contiguous(adapter, ins[member])
            setattr(part.owner, name, GatedProjection(ins[member], gate_in, rows_of, group, member))
        out_proj = getattr(part.owner, part.out_name)
        if fast:
            _store_rows_contiguous(adapter, out_proj)
        setattr(part.owner, part.out_name, GatedProjection(out_proj, gate_mid, rows_of))
    tracker = SignalTracker(state, artifact.lam, artifact.gam, artifact.tau_s, artifact.tau_H)
    hooks = [
        model.register_forward_pre_hook(tracker.pre_forward, with_kwargs=True),
        model.register_forward_hook(tracker.post_forward, with_kwargs=True),
    ]
    model._clada_patch = Patch(state, tracker, parts, hooks, artifact)
    return state


def _patch_of(model: nn.Module) -> Patch:
    patch = getattr(model, "_clada_patch", None)
    if patch is None:
        raise RuntimeError("model has no CLADA artifact applied (call runtime.apply first)")
    return patch


def remove(model: nn.Module) -> None:
    """Undo ``apply``: the original projection modules are put back, hooks removed; outputs are dense again."""
    patch = _patch_of(model)
    for hook in patch.hooks:
        hook.remove()
    for part in patch.parts:
        for name in part.in_names + (part.out_name,):
            wrapped = getattr(part.owner, name)
            if isinstance(wrapped, GatedProjection):
                _restore_layout(wrapped.inner)
                setattr(part.owner, name, wrapped.inner)
    del model._clada_patch


def state(model: nn.Module) -> SparsityState:
    """The SparsityState of a patched model (thresholds, current multiplier, accumulators)."""
    return _patch_of(model).state


def tracker(model: nn.Module) -> SignalTracker:
    """The SignalTracker of a patched model; ``tracker(model).enabled = False`` hands ``scale`` to the caller."""
    return _patch_of(model).tracker


def stats(model: nn.Module, reset: bool = False) -> dict:
    """Realised sparsity since the last reset: mlp_sparsity, input_sparsity, mlp_reads_saved, relaxed_share, per layer."""
    st = _patch_of(model).state
    out = st.summary()
    if reset:
        st.reset_stats()
    return out


def reset_stats(model: nn.Module) -> None:
    _patch_of(model).state.reset_stats()


def declare_in_checkpoint(artifact_path: str | os.PathLike, checkpoint: str | os.PathLike) -> Path:
    """Copy an artifact into a checkpoint folder and declare it in that folder's config.json.

    The declaration is a small ``"clada": {"file": ..., "format_version": ...}`` entry, the way quantisation
    configs travel; both files are written atomically. Returns the artifact's new path.
    """
    artifact = load_artifact(artifact_path)  # refuse to ship a corrupt file
    folder = Path(checkpoint)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ArtifactError(f"{folder}: not a checkpoint folder (no config.json)")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError:
        raise ArtifactError(f"{config_path}: not valid JSON") from None
    model_type = config.get("model_type")
    if artifact.model.get("model_type") not in (None, model_type):
        raise ArtifactError(f"{artifact_path}: calibrated for model_type {artifact.model.get('model_type')!r}, "
                            f"checkpoint is {model_type!r}")
    target = folder / ARTIFACT_FILENAME
    if Path(artifact_path).resolve() != target.resolve():
        write_atomic(target, Path(artifact_path).read_bytes())
    config["clada"] = {"file": ARTIFACT_FILENAME, "format_version": FORMAT_VERSION}
    write_atomic(config_path, (json.dumps(config, indent=2) + "\n").encode())
    return target


def from_pretrained(checkpoint: str | os.PathLike, *, force: bool = False, **kwargs) -> nn.Module:
    """``AutoModelForCausalLM.from_pretrained(checkpoint, **kwargs)`` with the declared artifact applied."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(checkpoint, **kwargs)
    apply(model, force=force)  # no path: apply finds the declared artifact
    return model
