"""What an artifact is checked against: a model's architecture facts and a fingerprint of its MLP weights."""

from __future__ import annotations

import torch
from torch import nn

from ..artifacts import Artifact, ArtifactError
from .adapters import MLPAdapter, adapter_for

FINGERPRINT_RTOL = 1e-3


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
        rows.append([float(adapter.weight(p).double().norm()) for p in part.projections()])
    return torch.tensor(rows, dtype=torch.float64)


def check_compatible(artifact: Artifact, model: nn.Module, adapter: MLPAdapter, force: bool = False,
                     source: str = "artifact") -> None:
    """Raise ArtifactError if the artifact was not calibrated for this model (fingerprint unless ``force``)."""
    ident = model_identity(model, adapter)
    for key in ("num_layers", "hidden_size", "intermediate_size"):
        want = artifact.model.get(key)
        if want is not None and want != ident[key]:
            raise ArtifactError(f"{source}: calibrated for {key}={want}, model has {ident[key]}")
    shapes = {"channel_weight_in": ident["hidden_size"], "channel_weight_mid": ident["intermediate_size"]}
    if artifact.has_attention:  # the input widths of q/k/v and of o, layer 0's (every layer's is the same)
        part = adapter.attention_parts(model)[0]
        shapes.update({f"channel_weight_attn_{side}": int(adapter.weight(getattr(part.owner, name)).shape[1])
                       for side, name in (("in", part.in_names[0]), ("out", part.out_name))})
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
