"""Attention projections (artifact format 5): the attention input (columns of q/k/v or the fused projection) and
output (columns of o) under the same threshold rule as the MLP, in every backend and family, counted in the
statistics, carried by the artifact, calibrated from a recipe setting, and removed without a trace."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch

from clada import runtime
from clada.artifacts import ArtifactError, load_artifact, save_artifact
from clada.calibrate.measure import attention_thresholds
from clada.runtime.backends import BACKENDS
from tests.conftest import make_artifact, run_recipe, tiny_job, tiny_model

GATHERING = [name for name, b in BACKENDS.items() if b.gathers and b.accepts(torch.device("cpu"), torch.float32, 2)]
ATTENTION_FAMILIES = ["llama", "gpt2", "opt", "phi3", "gemma3_text", "gpt_neox"]


def attention_artifact(model, sparsity: float = 0.4, tau_in: float = 0.0, tau_mid: float = 0.0):
    """``make_artifact`` plus attention thresholds that skip ``sparsity`` of the channels of random text
    (``measure.attention_thresholds``, the calibration's)."""
    ids = torch.randint(4, 100, (4, 12), generator=torch.Generator().manual_seed(7))
    attention = attention_thresholds(model, runtime.adapter_for(model), ids, 0, 48, max(sparsity, 0.1), "wina")
    if not sparsity:  # thresholds 0: only exact zeros skipped
        attention.update({k: torch.zeros_like(v) for k, v in attention.items() if k.startswith("tau")})
    return dataclasses.replace(make_artifact(model, tau_in=tau_in, tau_mid=tau_mid), **attention)


class AttentionMasks:
    """Pre-hooks on a dense copy's attention projections that zero what the artifact skips: the reference."""

    def __init__(self, model, art):
        adapter = runtime.adapter_for(model)
        self.hooks, self.kept = [], {"in": [], "out": []}
        for l, part in enumerate(adapter.attention_parts(model)):
            for side, names in (("in", part.in_names), ("out", (part.out_name,))):
                w, tau = art.channel_weight(f"attn_{side}")[l], art.tau_base(f"attn_{side}")[l]
                for i, name in enumerate(names):
                    def mask(module, args, w=w, tau=tau, side=side, first=i == 0):
                        keep = args[0].abs() * w > tau
                        if first:
                            self.kept[side].append(keep.float().mean().item())
                        return (args[0] * keep,)
                    self.hooks.append(getattr(part.owner, name).register_forward_pre_hook(mask))


@pytest.mark.parametrize("backend", ["masked", *GATHERING])
@pytest.mark.parametrize("family", ATTENTION_FAMILIES)
def test_every_backend_and_family_computes_the_masked_attention(family, backend):
    model = tiny_model(family)
    reference = copy.deepcopy(model)
    art = attention_artifact(model)
    masks = AttentionMasks(reference, art)
    runtime.apply(model, art, backend=backend)
    ids = torch.randint(4, 100, (1, 5), generator=torch.Generator().manual_seed(2))  # 5 rows: a gathering call
    with torch.no_grad(), runtime.fixed_multiplier(model, 1.0):
        got = model(input_ids=ids).logits
    with torch.no_grad():
        want = reference(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    stats = runtime.stats(model)
    assert stats["path_calls"][backend] > 0
    skipped_in = [1 - k for k in masks.kept["in"]]  # one entry per layer: the reference ran once
    assert stats["attention_input_sparsity"] == pytest.approx(sum(skipped_in) / len(skipped_in), abs=1e-4)
    assert 0.05 < stats["attention_input_sparsity"] < 0.95 and 0.0 < stats["attention_output_sparsity"] < 0.95
    assert 0.0 < stats["attention_reads_saved"] < 1.0
    assert stats["reads_saved"] > 0.0
    runtime.remove(model)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_remove_restores_the_attention_modules_and_dense_outputs(family):
    model = tiny_model(family)
    ids = torch.randint(4, 100, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    modules = {name: type(m) for name, m in model.named_modules()}
    art = attention_artifact(model, 0.5)
    runtime.apply(model, art, backend=GATHERING[0] if GATHERING else "masked")
    with torch.no_grad(), runtime.fixed_multiplier(model, 1.0):
        sparse = model(input_ids=ids[:, :4]).logits
    assert not torch.allclose(sparse, before[:, :4], atol=1e-4)  # the attention thresholds changed something
    runtime.remove(model)
    assert {name: type(m) for name, m in model.named_modules()} == modules
    assert all(p.is_contiguous() for p in model.parameters())
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=0, atol=0)


def test_zero_attention_thresholds_and_artifacts_without_attention():
    model = tiny_model("llama")
    ids = torch.randint(4, 100, (1, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        dense = model(input_ids=ids).logits
    runtime.apply(model, attention_artifact(model, 0.0))
    with torch.no_grad(), runtime.fixed_multiplier(model, 1.0):
        torch.testing.assert_close(model(input_ids=ids).logits, dense, rtol=1e-5, atol=1e-5)
    runtime.set_thresholds(model, torch.zeros(2), torch.zeros(2),
                           tau_attn_in=attention_artifact(model, 0.5).tau_base_attn_in)
    with torch.no_grad(), runtime.fixed_multiplier(model, 1.0):
        assert not torch.allclose(model(input_ids=ids).logits, dense, atol=1e-4)
    assert runtime.stats(model)["attention_input_sparsity"] > 0.0
    runtime.remove(model)
    runtime.apply(model, make_artifact(model, 0.05, 0.02))  # no attention tensors: attention stays dense
    assert not any("attn" in n and "inner" in n for n, _ in model.named_modules())
    with torch.no_grad(), runtime.fixed_multiplier(model, 1.0):
        model(input_ids=ids)
    stats = runtime.stats(model)
    assert stats["attention_reads_saved"] is None and stats["attention_input_sparsity"] is None
    with pytest.raises(ValueError, match="no attn_in side"):
        runtime.set_thresholds(model, torch.zeros(2), torch.zeros(2), tau_attn_in=torch.zeros(2))
    runtime.remove(model)


def test_attention_tensors_round_trip_in_format_5_and_are_checked(tmp_path):
    model = tiny_model("llama")
    art = attention_artifact(model)
    path = save_artifact(art, tmp_path / "a.safetensors")
    from safetensors import safe_open

    with safe_open(str(path), "pt") as fh:
        assert fh.metadata()["format_version"] == "5"
    back = load_artifact(path)
    assert back.has_attention and torch.equal(back.tau_base_attn_out, art.tau_base_attn_out)
    assert torch.equal(back.channel_weight_attn_in, art.channel_weight_attn_in)
    with pytest.raises(ArtifactError, match="must come together"):
        dataclasses.replace(art, tau_base_attn_out=None).validate()
    with pytest.raises(ArtifactError, match="channel_weight_attn_out"):
        dataclasses.replace(art, channel_weight_attn_out=-art.channel_weight_attn_out).validate()
    wide = dataclasses.replace(art, channel_weight_attn_out=torch.ones(2, 48))
    with pytest.raises(ArtifactError, match="channel_weight_attn_out has shape"):
        runtime.apply(model, wide)
    assert not runtime.is_patched(model)


def test_save_pretrained_keeps_the_attention_thresholds(tmp_path):
    model = tiny_model("llama")
    runtime.apply(model, attention_artifact(model))
    runtime.set_thresholds(model, torch.zeros(2), torch.zeros(2), tau_attn_out=torch.tensor([0.01, 0.03]))
    model.save_pretrained(tmp_path / "ckpt")
    runtime.remove(model)
    saved = load_artifact(tmp_path / "ckpt" / "clada.safetensors")
    assert saved.tau_base_attn_out.tolist() == pytest.approx([0.01, 0.03])


def test_recipe_attention_sparsity_calibrates_attention_thresholds(tmp_path):
    recipe = tiny_job(tmp_path, trials=3)
    recipe["calibration"]["attention_sparsity"] = 0.3
    output = run_recipe(tmp_path, recipe)
    assert "attention thresholds skipping 30%" in output
    art = load_artifact(tmp_path / "out" / "clada.safetensors")
    assert art.has_attention and (art.tau_base_attn_in > 0).all() and (art.tau_base_attn_out > 0).all()
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    held = report["heldout"]
    assert 0.1 < held["attention_input_sparsity"] < 0.6 and 0.1 < held["attention_output_sparsity"] < 0.6
    assert held["reads_saved"] > held["attention_reads_saved"] * 0.1
    assert "attention_reads_saved" in (tmp_path / "out" / "report.md").read_text()


def test_recipe_without_attention_keeps_its_study(tmp_path):
    from clada.calibrate.pipeline import study_name
    from clada.calibrate.recipe import parse_recipe

    plain = parse_recipe({})
    assert study_name(plain) == study_name(parse_recipe({"calibration": {"attention_sparsity": 0.0}}))
    assert study_name(plain) != study_name(parse_recipe({"calibration": {"attention_sparsity": 0.2}}))
    with pytest.raises(Exception, match="calibration.attention_sparsity"):
        parse_recipe({"calibration": {"attention_sparsity": 0.95}})
