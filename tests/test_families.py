"""Every registered MLP family on a tiny random model: calibrated through the real pipeline, then applied.

For each family: (a) the artifact with its thresholds at zero leaves the outputs exactly dense, (b) with the
calibrated thresholds, greedy generation with KV cache at batch 2 with left padding runs and the realised
sparsity is what the masks recomputed from the gates' inputs say, (c) ``runtime.remove`` restores dense.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from clada import runtime
from clada.artifacts import load_artifact
from tests.conftest import TINY_CONFIGS, MaskRecorder, calibrate_tiny, make_artifact, tiny_model
from tests.test_runtime import PROMPT, decode_logits, greedy

NEW_TOKENS = 8
pytestmark = pytest.mark.usefixtures("one_thread")


def padded_prompt() -> tuple[torch.Tensor, torch.Tensor]:
    """PROMPT with row 1 left-padded by 3 tokens: (ids, attention_mask), both (2, T)."""
    ids, mask = PROMPT.clone(), torch.ones_like(PROMPT)
    ids[1, :3], mask[1, :3] = 0, 0
    return ids, mask


def test_every_registered_family_has_a_tiny_config():
    assert sorted(TINY_CONFIGS) == runtime.supported_model_types()


def test_unsupported_architecture_lists_every_family_and_the_guide():
    from transformers import BertConfig, BertForMaskedLM

    model = BertForMaskedLM(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64))
    with pytest.raises(runtime.UnsupportedModelError) as err:
        runtime.adapter_for(model)
    message = str(err.value)
    assert "'bert'" in message and "docs/adding-an-architecture.md" in message and "\n" not in message
    assert all(t in message for t in runtime.supported_model_types())


@pytest.mark.parametrize("family", runtime.supported_model_types())
def test_sizes_and_weight_bytes_follow_the_config(family):
    """Identity and per-layer byte counts from the config alone (Phi-3: intermediate I, fused (2I, D) in-bytes)."""
    model = tiny_model(family)
    cfg = model.config
    D, L = cfg.hidden_size, cfg.num_hidden_layers
    I = next((getattr(cfg, a) for a in ("intermediate_size", "ffn_dim", "ffn_hidden_size", "n_inner")
              if getattr(cfg, a, None)), 4 * D)
    ident = runtime.model_identity(model)
    assert (ident["num_layers"], ident["hidden_size"], ident["intermediate_size"]) == (L, D, I)
    runtime.apply(model, make_artifact(model))
    in_width = 2 if ident["gated"] else 1  # gate and up (fused or not) vs a single fc1
    adapter = runtime.adapter_for(model)
    sizes = [adapter.projection_bytes(part) for part in adapter.mlp_parts(model)]
    assert sizes == [(in_width * I * D * 4, I * D * 4)] * L


@pytest.mark.parametrize("family", runtime.supported_model_types())
def test_residual_write_is_what_the_layer_adds(family):
    """Shifting ``residual_write``'s output by d shifts the decoder layer's output by d * residual_scale.

    That is what makes ``residual_ratios`` the MLP's share of the residual stream (Gemma 2/3 and OLMo 2
    normalise the MLP output first, Granite scales it).
    """
    model = tiny_model(family)
    adapter = runtime.adapter_for(model)
    layer, part = adapter.layers(model)[0], adapter.mlp_parts(model)[0]
    outputs = []
    grab = layer.register_forward_hook(lambda m, a, o: outputs.append(o[0] if isinstance(o, tuple) else o))
    shift = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(0)) * 1e-2
    with torch.no_grad():
        model(input_ids=PROMPT)
        with_shift = adapter.residual_write(layer, part).register_forward_hook(lambda m, a, o: o + shift)
        model(input_ids=PROMPT)
    with_shift.remove()
    grab.remove()
    delta = (outputs[1] - outputs[0]).reshape(-1, shift.shape[0])
    torch.testing.assert_close(delta, (shift * adapter.residual_scale(model)).expand_as(delta), rtol=0, atol=1e-5)


@pytest.fixture(scope="module", params=runtime.supported_model_types())
def calibrated(request, tmp_path_factory):
    """(family, artifact): a 3-trial calibration of ``tiny_model(family)`` with a loose quality budget."""
    root = tmp_path_factory.mktemp(request.param)
    # budget allocation: these tests are about the runtime on each family; tiny random MLPs have output errors
    # far above what the default (marginal) rule's warm-start prices accept, so 3 trials of it may skip nothing
    calibrate_tiny(root, request.param, trials=3, max_ppl_increase=0.5, allocation="budget")
    return request.param, load_artifact(root / "out" / "clada.safetensors")


def test_zero_thresholds_equal_dense(calibrated):
    family, art = calibrated
    model = tiny_model(family)
    dense = decode_logits(model, PROMPT)
    zero = dataclasses.replace(art, tau_base_in=torch.zeros_like(art.tau_base_in),
                               tau_base_mid=torch.zeros_like(art.tau_base_mid))
    runtime.apply(model, zero, backend="masked")  # masked reference: bit for bit
    assert torch.equal(decode_logits(model, PROMPT), dense)
    runtime.remove(model)
    runtime.apply(model, zero)  # gathering fast path: the same sums in another order
    torch.testing.assert_close(decode_logits(model, PROMPT), dense, rtol=1e-5, atol=1e-5)


def test_padded_batch_generation_realises_the_masks(calibrated):
    family, art = calibrated
    model = tiny_model(family)
    assert art.tau_base_in.max() > 0 or art.tau_base_mid.max() > 0, "calibration chose no sparsity"
    ids, mask = padded_prompt()
    runtime.apply(model, art)
    recorder = MaskRecorder(model)
    out = greedy(model, ids, n=NEW_TOKENS, attention_mask=mask)
    st = runtime.stats(model)
    recorder.close()
    runtime.remove(model)
    assert out.shape == (2, ids.shape[1] + NEW_TOKENS)
    assert st["tokens"] == 2 * (NEW_TOKENS - 1) and 0 < st["mlp_reads_saved"] < 1
    recorder.check(st, art)


def test_remove_restores_dense(calibrated):
    family, art = calibrated
    model = tiny_model(family)
    ids, mask = padded_prompt()
    dense, dense_gen = decode_logits(model, PROMPT), greedy(model, ids, n=NEW_TOKENS, attention_mask=mask)
    runtime.apply(model, art)
    greedy(model, ids, n=NEW_TOKENS, attention_mask=mask)
    runtime.remove(model)
    assert torch.equal(decode_logits(model, PROMPT), dense)
    assert torch.equal(greedy(model, ids, n=NEW_TOKENS, attention_mask=mask), dense_gen)
    assert not any(isinstance(m, runtime.sparse.GatedProjection) for m in model.modules())


@pytest.mark.parametrize("family", sorted(TINY_CONFIGS))
def test_attention_parts_name_every_attention_projection(family):
    """Per layer: the projections reading the attention input (D in-features) and the output projection (D out-
    features) are all the modules with a 2-D weight in the attention block."""
    model = tiny_model(family)
    adapter = runtime.adapter_for(model)
    parts = adapter.attention_parts(model)
    assert len(parts) == len(adapter.mlp_parts(model))
    hidden = model.config.hidden_size
    for part in parts:
        assert all(adapter.weight(getattr(part.owner, n)).shape[1] == hidden for n in part.in_names)
        assert adapter.weight(getattr(part.owner, part.out_name)).shape[0] == hidden
        projections = {name for name, m in part.owner.named_modules()
                       if isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.dim() == 2}
        assert projections == {*part.in_names, part.out_name}
