"""Checkpoints of patched models: save_pretrained round trip, remove then save is dense, the model card."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from clada import runtime
from clada.artifacts import ArtifactError, load_artifact, save_artifact
from clada.runtime.checkpoint import CARD_BEGIN, write_model_card
from tests.conftest import GATHER, make_artifact, tiny_model

PROMPT = torch.tensor([[5, 9, 17, 33, 8, 21, 40, 11]])


def greedy(model) -> torch.Tensor:
    return model.generate(PROMPT, max_new_tokens=12, do_sample=False, pad_token_id=0)


def last_logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=PROMPT).logits[:, -1]


def artifact_for(model):
    return make_artifact(model, tau_in=0.05, tau_mid=0.03, lam=-0.3, tau_s=0.4)


@pytest.mark.parametrize("family,backend", [("llama", "auto"), ("llama", GATHER), ("llama", "masked"),
                                            ("gpt2", "auto"), ("opt", GATHER)])
def test_patched_model_saves_and_loads_back_the_same(tmp_path, family, backend):
    model = tiny_model(family)
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    runtime.apply(model, artifact_for(model), backend=backend)
    tokens = greedy(model)  # the first decode step: auto re-lays the weights here
    assert runtime.stats(model)["mlp_reads_saved"] > 0
    saved = model.state_dict()
    assert saved.keys() == dense.keys()  # no "inner." in the names
    assert all(torch.equal(saved[k], v) and saved[k].is_contiguous() for k, v in dense.items())

    model.save_pretrained(tmp_path / "ckpt")
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["clada"]["file"] == "clada.safetensors"
    loaded = runtime.from_pretrained(tmp_path / "ckpt", backend=backend)
    assert torch.equal(greedy(loaded), tokens)
    assert runtime.stats(loaded)["mlp_reads_saved"] == pytest.approx(runtime.stats(model)["mlp_reads_saved"])
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")  # the weights on disk are the dense ones
    assert all(torch.equal(plain.state_dict()[k], v) for k, v in dense.items())


def test_save_writes_the_thresholds_the_model_runs_with(tmp_path):
    model = tiny_model("llama")
    runtime.apply(model, artifact_for(model))
    runtime.set_thresholds(model, torch.tensor([0.1, 0.2]), torch.tensor([0.0, 0.04]))
    model.save_pretrained(tmp_path)
    art = load_artifact(tmp_path / "clada.safetensors")
    assert art.tau_base_in.tolist() == pytest.approx([0.1, 0.2]) and art.tau_base_mid.tolist() == pytest.approx([0, 0.04])
    assert art.lam == pytest.approx(-0.3)


def test_removed_model_saves_a_dense_checkpoint(tmp_path):
    """An exported checkpoint, loaded with its artifact, removed, saved elsewhere: a plain dense checkpoint."""
    model = tiny_model("llama")
    dense = last_logits(model)
    model.save_pretrained(tmp_path / "exported")
    runtime.declare_in_checkpoint(save_artifact(artifact_for(model), tmp_path / "a.safetensors"), tmp_path / "exported")
    loaded = runtime.from_pretrained(tmp_path / "exported")
    greedy(loaded)
    runtime.remove(loaded)
    loaded.save_pretrained(tmp_path / "dense")
    assert "clada" not in json.loads((tmp_path / "dense" / "config.json").read_text())
    assert not (tmp_path / "dense" / "clada.safetensors").exists()
    assert torch.equal(last_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "dense")), dense)
    with pytest.raises(ArtifactError, match="none found beside the checkpoint"):
        runtime.from_pretrained(tmp_path / "dense")


def test_dense_state_dict_loads_into_a_patched_model():
    model, other = tiny_model("llama"), tiny_model("llama", seed=1)
    runtime.apply(model, artifact_for(model), backend=GATHER)
    model.load_state_dict(other.state_dict())
    runtime.remove(model)
    assert torch.equal(last_logits(model), last_logits(other))


def test_model_card_section_is_added_once_and_keeps_the_card(tmp_path):
    (tmp_path / "README.md").write_text("---\nlicense: apache-2.0\n---\n\n# My model\n\nNotes.\n")
    write_model_card(tmp_path)
    write_model_card(tmp_path)
    text = (tmp_path / "README.md").read_text()
    assert text.startswith("---\nlicense: apache-2.0\n---\n\n# My model\n\nNotes.\n")
    assert text.count(CARD_BEGIN) == 1 and "runtime.from_pretrained(" in text
    (tmp_path / "new").mkdir()
    write_model_card(tmp_path / "new")
    assert (tmp_path / "new" / "README.md").read_text().startswith("---\ntags:\n- clada\n---\n")


def test_plain_load_of_an_exported_checkpoint_is_dense_and_the_card_line_applies_it(tmp_path):
    """What transformers alone gives (the dense model, the artifact ignored), and the one line the model card
    written by export shows."""
    model = tiny_model("llama")
    dense = last_logits(model)
    model.save_pretrained(tmp_path)
    runtime.declare_in_checkpoint(save_artifact(artifact_for(model), tmp_path / "a.safetensors"), tmp_path)
    assert "model = runtime.from_pretrained(" in (tmp_path / "README.md").read_text()
    plain = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert not runtime.is_patched(plain) and torch.equal(last_logits(plain), dense)
    runtime.apply(plain)  # the card's line for a model already loaded
    assert torch.equal(greedy(plain), greedy(runtime.from_pretrained(tmp_path)))
    assert runtime.stats(plain)["mlp_reads_saved"] > 0
