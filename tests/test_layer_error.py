"""The KL layer error (``calibration.layer_error: kl``): output gradients, their meaning, the tables, the search."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from clada.calibrate.measure import LayerErrorModel, channel_weights, collect_mlp_inputs, output_gradients
from clada.calibrate.recipe import RecipeError, parse_recipe
from clada.calibrate.search import SearchSettings, ThresholdSearch, warm_start_points
from clada.runtime.adapters import adapter_for

from .conftest import tiny_model
from .test_allocation import _FakeEvaluator, _table


def _tokens(n: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 120, (n, length), generator=torch.Generator().manual_seed(seed))


def _next_token_logp(model, tokens: torch.Tensor, layer: int | None = None, position: int = 0,
                     change: torch.Tensor | None = None) -> torch.Tensor:
    """(N, T, V) log-probabilities, optionally with ``change`` (D,) added to ``layer``'s MLP output at ``position``."""
    hook = None
    if change is not None:
        part = adapter_for(model).mlp_parts(model)[layer]

        def add(module, args, out):
            out = out.clone()
            out[:, position] += change
            return out
        hook = getattr(part.owner, part.out_name).register_forward_hook(add)
    try:
        with torch.no_grad():
            return torch.log_softmax(model(input_ids=tokens).logits.float(), dim=-1)
    finally:
        if hook is not None:
            hook.remove()


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_output_gradients_are_aligned_with_the_mlp_inputs_and_leave_the_model_as_it_was(family):
    model = tiny_model(family)
    adapter = adapter_for(model)
    tokens, prompt = _tokens(3, 12), 4
    inputs = collect_mlp_inputs(model, adapter, tokens, prompt, max_tokens=20)
    flags = [p.requires_grad for p in model.parameters()]
    grads = output_gradients(model, adapter, tokens, prompt, max_tokens=20, samples=3, progress=False)
    assert [p.requires_grad for p in model.parameters()] == flags and not any(p.grad is not None for p in model.parameters())
    assert len(grads) == len(inputs) == 2
    for g, x in zip(grads, inputs):
        assert g.shape == (3, x.shape[0], 32) and g.dtype == torch.float32 and x.shape[0] == 20
        assert bool(g.abs().sum(-1).gt(0).all())  # every token's output matters to some later prediction
    again = output_gradients(model, adapter, tokens, prompt, max_tokens=20, samples=3, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(grads, again))  # seeded draws
    other = output_gradients(model, adapter, tokens, prompt, max_tokens=20, samples=3, seed=1, progress=False)
    assert not torch.equal(grads[0], other[0])


def test_the_gradient_estimate_is_the_kl_a_change_of_one_token_output_causes():
    """0.5 * mean_k (g_k . d)^2 at token t equals sum over positions of KL(p || p') when layer l's MLP output at t
    moves by a small d (second order; one token's change has no cross terms), up to the sampling error."""
    model = tiny_model("llama", seed=3)
    adapter = adapter_for(model)
    tokens, prompt, layer, position = _tokens(1, 10, seed=5), 2, 0, 5
    grads = output_gradients(model, adapter, tokens, prompt, max_tokens=8, samples=1500, progress=False)
    g = grads[layer][:, position - prompt]  # (K, D)
    change = 0.002 * torch.randn(32, generator=torch.Generator().manual_seed(0))
    dense = _next_token_logp(model, tokens)[:, prompt:]
    moved = _next_token_logp(model, tokens, layer, position, change)[:, prompt:]
    kl = float((dense.exp() * (dense - moved)).sum())
    estimate = 0.5 * float((g @ change).pow(2).mean())
    assert kl > 1e-6 and estimate == pytest.approx(kl, rel=0.2)


def test_layer_error_model_with_gradients_measures_the_kl_estimate():
    model = tiny_model("llama")
    adapter = adapter_for(model)
    part = adapter.mlp_parts(model)[1]
    tokens, prompt = _tokens(2, 16), 4
    x = collect_mlp_inputs(model, adapter, tokens, prompt, max_tokens=24)[1]
    w_in, w_mid = channel_weights(model, adapter, "wina")
    g = torch.randn(2, x.shape[0], 32, generator=torch.Generator().manual_seed(0))
    probe = LayerErrorModel(adapter, part, x, w_in[1], w_mid[1], grads=g)
    plain = LayerErrorModel(adapter, part, x, w_in[1], w_mid[1])
    q_in, q_mid = 0.2, 0.4
    tau_in, tau_mid = probe.thresholds(q_in, q_mid)
    with torch.no_grad():
        keep_in = (x.abs() * w_in[1]) > tau_in
        h = adapter.intermediate(part, x * keep_in)
        h = h * ((h.abs() * w_mid[1]) > tau_mid)
        out = getattr(part.owner, part.out_name)
        change = out(h) - out(adapter.intermediate(part, x))
    expected = 0.5 * float((g * change).sum(-1).pow(2).mean())
    assert probe.error(q_in, q_mid) == pytest.approx(expected, rel=1e-4)
    assert probe.measure(q_in, tau_mid)[1] == plain.measure(q_in, tau_mid)[1]  # the same bytes skipped
    assert probe.error(0.0, 0.0) == 0.0 and plain.error(q_in, q_mid) != pytest.approx(expected, rel=1e-2)


def test_recipe_layer_error_settings_and_study_names():
    from clada.calibrate.pipeline import measurement_key, study_name

    plain = parse_recipe({})
    assert plain.calibration.layer_error == "kl" and plain.calibration.gradient_samples == 4
    relative = parse_recipe({"calibration": {"layer_error": "relative", "gradient_samples": 9}})
    assert study_name(relative) == study_name(parse_recipe({"calibration": {"layer_error": "relative"}}))
    assert study_name(plain) != study_name(relative)
    assert study_name(plain) != study_name(parse_recipe({"calibration": {"gradient_samples": 8}}))
    assert SearchSettings.from_recipe(relative, "sqlite://", "s").layer_error == "relative"
    key = partial(measurement_key, identity={"model": "m"}, fingerprint=torch.zeros(2), data_sha256="d")
    assert key(relative) == key(parse_recipe({"calibration": {"layer_error": "relative"}}))  # measurements kept
    assert key(plain) != key(relative) and key(plain) != key(parse_recipe({"calibration": {"gradient_samples": 8}}))
    with pytest.raises(RecipeError, match="calibration.layer_error"):
        parse_recipe({"calibration": {"layer_error": "fisher"}})
    with pytest.raises(RecipeError, match="calibration.gradient_samples"):
        parse_recipe({"calibration": {"gradient_samples": 0}})


class _Trial:
    """Enough of an optuna trial for ``ThresholdSearch.suggest``: every float is its range's low end."""

    def __init__(self):
        self.names: list[str] = []

    def suggest_float(self, name, low, high, log=False):
        self.names.append(name)
        return low


@pytest.mark.parametrize("layer_error", ["kl", "relative"])
def test_only_relative_errors_are_weighted_by_the_residual_ratio(layer_error):
    tables = [_table([0.0, 0.001, 0.002, 0.01, 0.05]), _table([0.0, 0.001, 0.002, 0.01, 0.05])]
    ratios = torch.tensor([1.0, 100.0])
    settings = SearchSettings(layer_error=layer_error)
    search = ThresholdSearch(tables, ratios, _FakeEvaluator(), settings, artifact_of=None)
    trial = _Trial()
    search.suggest(trial)
    assert ("mix" in trial.names) == (layer_error == "relative")
    assert all(("mix" in p) == (layer_error == "relative") for p in warm_start_points(settings))
    point = search.point({"price": 0.05, "depth_slope": 0.0, "mix": 1.0})
    if layer_error == "kl":  # the same tables, the same cell
        assert point.tau_mid[0] == point.tau_mid[1]
    else:  # the second layer's error counts 100 times more: it skips less
        assert point.tau_mid[1] < point.tau_mid[0]
