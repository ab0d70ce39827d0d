"""The CLADA threshold artifact: a safetensors file of per-layer thresholds plus JSON metadata.

See docs/artifact-format.md for the specification.
"""

from .atomic import atomic_path, write_atomic
from .format import (
    ATTENTION_KEYS,
    FORMAT_NAME,
    FORMAT_VERSION,
    PREFIX_KEYS,
    Artifact,
    ArtifactError,
    load_artifact,
    save_artifact,
)

__all__ = ["ATTENTION_KEYS", "atomic_path", "write_atomic", "FORMAT_NAME", "FORMAT_VERSION", "PREFIX_KEYS", "Artifact", "ArtifactError", "load_artifact", "save_artifact"]
