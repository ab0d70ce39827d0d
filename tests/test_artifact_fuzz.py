"""Property-based corruption of artifact files: every damaged file gives ArtifactError, never a crash."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clada.artifacts import ArtifactError, load_artifact, save_artifact
from tests.conftest import make_artifact, tiny_model

_GOOD: dict = {}


def good_bytes(tmp_dir) -> bytes:
    if "bytes" not in _GOOD:
        path = save_artifact(make_artifact(tiny_model("llama"), 0.05, 0.02), tmp_dir / "good.safetensors")
        _GOOD["bytes"] = path.read_bytes()
    return _GOOD["bytes"]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_damaged_files_raise_artifact_error_or_load_valid(tmp_path, data):
    blob = bytearray(good_bytes(tmp_path))
    kind = data.draw(st.sampled_from(["truncate", "flip", "splice"]))
    if kind == "truncate":
        blob = blob[: data.draw(st.integers(0, len(blob) - 1))]
    elif kind == "flip":
        for _ in range(data.draw(st.integers(1, 8))):
            i = data.draw(st.integers(0, len(blob) - 1))
            blob[i] ^= 1 << data.draw(st.integers(0, 7))
    else:
        i = data.draw(st.integers(0, len(blob)))
        blob[i:i] = data.draw(st.binary(min_size=1, max_size=32))
    path = tmp_path / "damaged.safetensors"
    path.write_bytes(bytes(blob))
    try:
        art = load_artifact(path)
    except ArtifactError as exc:
        assert str(path) in str(exc) and "\n" not in str(exc)
        return
    art.validate()  # a flip that left a valid file (e.g. in a float's low bits) must still be a valid artifact


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_flip_in_the_data_section_is_refused_naming_the_tensor(tmp_path, data):
    """The header checks cannot see changed tensor bytes; the sha256 digests (format 3) do, whatever byte."""
    blob = bytearray(good_bytes(tmp_path))
    size = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8 : 8 + size])
    i = data.draw(st.integers(8 + size, len(blob) - 1))
    blob[i] ^= data.draw(st.integers(1, 255))
    [name] = [k for k, v in header.items() if k != "__metadata__"
              and v["data_offsets"][0] <= i - 8 - size < v["data_offsets"][1]]
    path = tmp_path / "flipped.safetensors"
    path.write_bytes(bytes(blob))
    with pytest.raises(ArtifactError, match=f"tensor {name} does not match its sha256 digest") as exc:
        load_artifact(path)
    assert str(path) in str(exc.value) and "\n" not in str(exc.value)


@pytest.mark.parametrize("payload", [b"", b"\x00" * 8, (10**12).to_bytes(8, "little") + b"{}", (2).to_bytes(8, "little") + b"[]"])
def test_malformed_headers(tmp_path, payload):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(payload)
    with pytest.raises(ArtifactError):
        load_artifact(path)
