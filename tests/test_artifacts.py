"""Artifact format: round trip, validation against the model, corrupt files, atomic writes."""

from __future__ import annotations

import dataclasses
import json
import os
import stat

import pytest
import torch
from safetensors.torch import load_file, save_file

from clada import runtime
from clada.artifacts import ArtifactError, load_artifact, save_artifact, write_atomic
from clada.artifacts.format import DIGEST_KEY, _digests, _split
from tests.conftest import make_artifact, synthetic_documents, tiny_model, word_tokenizer


@pytest.fixture
def model():
    return tiny_model("llama")


@pytest.fixture
def saved(model, tmp_path):
    art = make_artifact(model, tau_in=0.05, tau_mid=0.02, lam=-0.3, gam=-0.1, tau_s=0.4, tau_H=0.6)
    art.figures = {"heldout": {"ppl_increase": 0.01}}
    return art, save_artifact(art, tmp_path / "clada.safetensors")


def test_round_trip(saved):
    art, path = saved
    back = load_artifact(path)
    for name in ("tau_base_in", "tau_base_mid", "channel_weight_in", "channel_weight_mid", "fingerprint"):
        assert torch.equal(getattr(back, name), getattr(art, name))
    assert (back.lam, back.gam) == pytest.approx((-0.3, -0.1))
    assert (back.tau_s, back.tau_H) == pytest.approx((0.4, 0.6))
    assert back.figures == art.figures and back.model == art.model


def test_atomic_write_leaves_no_temp_files(saved):
    _, path = saved
    assert sorted(os.listdir(path.parent)) == ["clada.safetensors"]


def test_failed_write_keeps_old_artifact(saved):
    art, path = saved
    before = path.read_bytes()
    art.lam = 0.5  # invalid: validation fails before anything is written
    with pytest.raises(ArtifactError, match="lam"):
        save_artifact(art, path)
    assert path.read_bytes() == before
    assert sorted(os.listdir(path.parent)) == ["clada.safetensors"]


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def umask():
    """``umask(mask)`` sets the process umask within one test; the old one is restored afterwards."""
    old = os.umask(0o022)
    yield os.umask
    os.umask(old)


def test_atomic_writes_give_the_mode_of_a_plain_write(tmp_path, umask):
    umask(0o027)
    write_atomic(tmp_path / "new.txt", b"x")
    with open(tmp_path / "plain.txt", "w"):
        pass
    assert mode(tmp_path / "new.txt") == mode(tmp_path / "plain.txt") == 0o640
    os.chmod(tmp_path / "new.txt", 0o604)
    write_atomic(tmp_path / "new.txt", b"y")  # an existing file keeps its mode, as open(path, "w") keeps it
    assert mode(tmp_path / "new.txt") == 0o604 and (tmp_path / "new.txt").read_bytes() == b"y"


def _rewrite(path, mutate_tensors=None, mutate_meta=None):
    """Rewrite the file with changed tensors (and their digests recomputed, as a careless tool would) or
    changed metadata."""
    tensors = load_file(str(path))
    meta = _split(path.read_bytes(), path)[0]["__metadata__"]
    if mutate_tensors:
        mutate_tensors(tensors)
        save_file(tensors, str(path))
        meta[DIGEST_KEY] = json.dumps(_digests(*_split(path.read_bytes(), path)))
    if mutate_meta:
        mutate_meta(meta)
    save_file(tensors, str(path), metadata=meta)


@pytest.mark.parametrize("mutate_tensors,mutate_meta,match", [
    (lambda t: t.__setitem__("tau_base_in", torch.full_like(t["tau_base_in"], float("nan"))), None, "NaN"),
    (lambda t: t.__setitem__("tau_base_mid", -t["tau_base_mid"] - 1), None, "negative"),
    (lambda t: t.pop("lam"), None, "missing"),
    (lambda t: t.__setitem__("extra", torch.zeros(1)), None, "unexpected"),
    (lambda t: t.__setitem__("tau_base_in", t["tau_base_in"].double()), None, "dtype"),
    (lambda t: t.__setitem__("tau_base_mid", torch.zeros(5)), None, "shape"),
    (lambda t: t.__setitem__("tau_base_mid", torch.full_like(t["tau_base_mid"], float("inf"))), None, "inf"),
    (lambda t: t.__setitem__("fingerprint", t["fingerprint"].float()), None, "fingerprint has dtype"),
    (lambda t: t.__setitem__("channel_weight_in", t["channel_weight_in"][0]), None, "channel_weight_in has shape"),
    (lambda t: t.__setitem__("lam", torch.zeros(1)), None, "0-dim"),
    (lambda t: t.__setitem__("gam", torch.tensor(0.5)), None, "gam=0.5 is outside"),
    (lambda t: t.__setitem__("tau_H", torch.tensor(float("nan"))), None, "tau_H=nan"),
    (None, lambda m: m.__setitem__("model", "{not json"), "not valid JSON"),
    (None, lambda m: m.__setitem__("figures", "[1, 2]"), "must be a JSON object"),
    (None, lambda m: m.__setitem__("format_version", "one"), "not an integer"),
    (None, lambda m: m.pop("format"), "'format' is None"),
    (None, lambda m: m.__setitem__("format_version", "99"), "newer"),
    (None, lambda m: m.__setitem__("format", "other"), "format"),
    (None, lambda m: m.pop("sha256"), "'sha256' is missing"),
    (None, lambda m: m.__setitem__("sha256", "{}"), "does not name exactly the file's tensors"),
])
def test_corrupt_artifacts_raise_artifact_error(saved, mutate_tensors, mutate_meta, match):
    _, path = saved
    _rewrite(path, mutate_tensors, mutate_meta)
    with pytest.raises(ArtifactError, match=match):
        load_artifact(path)


def test_format_2_without_digests_still_loads(saved):
    art, path = saved
    _rewrite(path, mutate_meta=lambda m: (m.pop("sha256"), m.__setitem__("format_version", "2")))
    assert torch.equal(load_artifact(path).tau_base_in, art.tau_base_in)


def test_truncated_and_garbage_files(saved, tmp_path):
    _, path = saved
    data = path.read_bytes()
    for i, blob in enumerate([data[: len(data) // 2], data[:5], b"\xff" * 64, b""]):
        bad = tmp_path / f"bad{i}.safetensors"
        bad.write_bytes(blob)
        with pytest.raises(ArtifactError):
            load_artifact(bad)
    with pytest.raises(ArtifactError, match="not found"):
        load_artifact(tmp_path / "missing.safetensors")


def test_bit_flips_in_header_and_threshold(saved, tmp_path):
    _, path = saved
    data = bytearray(path.read_bytes())
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    start = 8 + n + header["tau_base_in"]["data_offsets"][0]
    low = bytearray(data)
    low[start] ^= 0x01  # lowest mantissa bit of the first float32 threshold: a valid, slightly different value
    signed = bytearray(data)
    signed[start + 3] ^= 0x80  # sign bit of the first float32 threshold (little endian): now negative
    brace = bytearray(data)
    brace[8] ^= 0x01  # the header's opening '{' becomes 'z'
    for blob, match in ((low, "tensor tau_base_in does not match its sha256 digest"),
                        (signed, "tensor tau_base_in does not match its sha256 digest"),
                        (brace, "header is not valid JSON")):
        bad = tmp_path / "flipped.safetensors"
        bad.write_bytes(bytes(blob))
        with pytest.raises(ArtifactError, match=match):
            load_artifact(bad)


def test_apply_refuses_other_weights_unless_forced(saved):
    _, path = saved
    other = tiny_model("llama", seed=1)
    with pytest.raises(ArtifactError, match="fingerprint"):
        runtime.apply(other, path)
    assert not runtime.is_patched(other)
    runtime.apply(other, path, force=True)
    runtime.remove(other)


def test_eval_cli_refuses_other_weights_unless_forced(saved, tmp_path):
    from click.testing import CliRunner

    from clada.calibrate.cli import main

    _, path = saved
    ckpt = tmp_path / "other"
    tiny_model("llama", seed=1).save_pretrained(ckpt)
    word_tokenizer().save_pretrained(ckpt)
    (tmp_path / "docs.txt").write_text("\n\n".join(synthetic_documents(4, 40)))
    args = ["eval", "--model", str(ckpt), "--artifact", str(path), "--data", str(tmp_path / "docs.txt"),
            "--docs", "2", "--prompt-tokens", "8", "--scored-tokens", "8", "--quiet"]
    refused = CliRunner().invoke(main, args)
    assert refused.exit_code == 2 and refused.output.count("\n") == 1, refused.output
    assert "fingerprint" in refused.output and "--force" in refused.output
    assert str(path) in refused.output  # names the file, though eval hands the runtime a loaded artifact
    forced = CliRunner().invoke(main, args + ["--force"])
    assert forced.exit_code == 0, forced.output
    assert "mlp_reads_saved" in forced.output


def test_apply_refuses_other_shapes(saved):
    _, path = saved
    with pytest.raises(ArtifactError, match="calibrated for|shape"):
        runtime.apply(tiny_model("gpt2"), path)


def test_fingerprint_survives_bf16(model, saved):
    _, path = saved
    runtime.apply(model.to(torch.bfloat16), path)
    out = model.generate(torch.tensor([[5, 6, 7, 8]]), max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 8)


def test_export_declares_artifact_beside_checkpoint(model, saved, tmp_path):
    from click.testing import CliRunner

    from clada.calibrate.cli import main

    _, path = saved
    ckpt = tmp_path / "ckpt"
    model.save_pretrained(ckpt)
    os.chmod(ckpt / "config.json", 0o644)
    old = os.umask(0o077)
    try:
        result = CliRunner().invoke(main, ["export", "--artifact", str(path), "--checkpoint", str(ckpt)])
    finally:
        os.umask(old)
    assert result.exit_code == 0, result.output
    assert mode(ckpt / "config.json") == 0o644  # kept
    assert mode(ckpt / "clada.safetensors") == 0o600  # new: what open(path, "w") gives under umask 0o077
    assert json.loads((ckpt / "config.json").read_text())["clada"]["file"] == "clada.safetensors"
    loaded = runtime.from_pretrained(ckpt)
    assert runtime.applied_artifact(loaded).tau_base_in.tolist() == pytest.approx([0.05, 0.05])
    runtime.remove(loaded)
    runtime.apply(loaded)  # no path: finds the declared artifact next to the checkpoint
    runtime.remove(loaded)
    result = CliRunner().invoke(main, ["export", "--artifact", str(path), "--checkpoint", str(tmp_path / "nope")])
    assert result.exit_code == 2 and "no config.json" in result.output


def test_apply_without_declared_artifact_is_clear(model):
    with pytest.raises(ArtifactError, match="none found beside the checkpoint"):
        runtime.apply(model)


def test_decode_digest_tells_apart_what_changes_decoding(saved):
    art = load_artifact(saved[1])
    base = art.decode_digest()
    assert base == dataclasses.replace(art, figures={"x": 1}, recipe={"y": 2}, signals={}).decode_digest()
    assert base == load_artifact(save_artifact(art, saved[1].with_name("copy.safetensors"))).decode_digest()
    moved = art.tau_base_mid.clone()
    moved[0] += 1e-3
    assert base != dataclasses.replace(art, tau_base_mid=moved).decode_digest()
    assert base != dataclasses.replace(art, center_in=torch.zeros_like(art.channel_weight_in)).decode_digest()
    plain = dataclasses.replace(art, lam=0.0, gam=0.0)  # no adaptation: tau_s and tau_H decide nothing
    assert plain.decode_digest() == dataclasses.replace(plain, tau_s=0.1, tau_H=0.9).decode_digest()
    surprisal = dataclasses.replace(art, lam=-0.5, gam=0.0)
    assert surprisal.decode_digest() != dataclasses.replace(surprisal, tau_s=surprisal.tau_s + 0.1).decode_digest()
    assert surprisal.decode_digest() == dataclasses.replace(surprisal, tau_H=surprisal.tau_H + 0.1).decode_digest()
