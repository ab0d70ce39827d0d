"""Prefix-driven sparsity (artifact format 6): each sequence's dense prefill gives its channels a prompt prior that
scales the decode-step scores of the MLP sides; per batch row, in every backend, forgotten when a new sequence
starts, carried by the artifact."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from clada import runtime
from clada.artifacts import ArtifactError, load_artifact, save_artifact
from clada.runtime.backends import BACKENDS
from clada.runtime.compat import cache_kwargs, output_cache
from tests.conftest import make_artifact, tiny_model

GATHERING = [name for name, b in BACKENDS.items() if b.gathers and b.accepts(torch.device("cpu"), torch.float32, 2)]


def prefix_artifact(model, alpha: float = 0.5, tau_in: float = 0.1, tau_mid: float = 0.0002):
    art = make_artifact(model, tau_in=tau_in, tau_mid=tau_mid)
    L = art.num_layers
    return dataclasses.replace(art, prefix_in=torch.full((L,), float(alpha)), prefix_mid=torch.full((L,), float(alpha)))


def decode(model, prompt: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """Logits (B, S, V) of feeding ``steps`` (B, S) one token at a time after the prefill of ``prompt`` (B, P)."""
    with torch.no_grad():
        cache = output_cache(model(input_ids=prompt, use_cache=True))
        out = []
        for t in range(steps.shape[1]):
            step = model(input_ids=steps[:, t : t + 1], **cache_kwargs(model, cache))
            cache = output_cache(step)
            out.append(step.logits[:, -1])
    return torch.stack(out, 1)


def ids(shape, seed):
    return torch.randint(4, 100, shape, generator=torch.Generator().manual_seed(seed))


def test_prior_is_the_column_norm_of_the_row_normalised_prompt_activations():
    model = tiny_model("llama")
    art = prefix_artifact(model, alpha=0.7)
    seen = {}
    reference = copy.deepcopy(model)
    mlp = reference.model.layers[1].mlp
    mlp.down_proj.register_forward_pre_hook(lambda m, a: seen.setdefault("h", a[0].detach().clone()))
    mlp.gate_proj.register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0].detach().clone()))
    prompt = ids((1, 9), 0)
    with torch.no_grad():
        reference(input_ids=prompt)
    runtime.apply(model, art, backend="masked")
    with torch.no_grad():
        model(input_ids=prompt, use_cache=True)
    rule = runtime.patch._patch_of(model).state.rule
    for side, key, weight in (("in", "x", art.channel_weight_in[1]), ("mid", "h", art.channel_weight_mid[1])):
        h = seen[key][0]
        p = (h / h.norm(dim=-1, keepdim=True)).norm(dim=0) ** 0.7
        want = weight * p / p.mean()
        got = rule.keep_weight(1, side, torch.zeros(1, h.shape[-1]))
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    runtime.remove(model)


@pytest.mark.parametrize("backend", ["masked", *GATHERING])
def test_each_batch_row_decodes_under_its_own_prompt_prior(backend):
    model = tiny_model("llama")
    art = prefix_artifact(model)
    prompts, steps = ids((2, 10), 1), ids((2, 3), 2)
    runtime.apply(model, art, backend=backend)
    together = decode(model, prompts, steps)
    alone = torch.cat([decode(model, prompts[i : i + 1], steps[i : i + 1]) for i in range(2)])
    assert runtime.stats(model)["path_calls"][backend] > 0
    runtime.remove(model)
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-4)
    runtime.apply(model, dataclasses.replace(art, prefix_in=None, prefix_mid=None), backend=backend)
    plain = decode(model, prompts, steps)
    runtime.remove(model)
    assert not torch.allclose(plain, together, atol=1e-4)  # the prior changed which channels were kept


@pytest.mark.parametrize("backend", GATHERING)
def test_gathering_backends_keep_what_the_masked_reference_keeps(backend):
    model = tiny_model("llama")
    art = prefix_artifact(model)
    prompts, steps = ids((3, 8), 3), ids((3, 4), 4)
    results, stats = {}, {}
    for name in ("masked", backend):
        runtime.apply(model, art, backend=name)
        results[name] = decode(model, prompts, steps)
        stats[name] = runtime.stats(model)
        runtime.remove(model)
    torch.testing.assert_close(results[backend], results["masked"], rtol=1e-4, atol=1e-4)
    assert stats[backend]["mlp_reads_saved"] == pytest.approx(stats["masked"]["mlp_reads_saved"], abs=1e-6)
    assert 0.05 < stats["masked"]["mlp_reads_saved"] < 0.95


def test_zero_exponents_are_the_base_rule_and_a_new_sequence_forgets_the_last_prompt():
    model = tiny_model("llama")
    prompts, steps = ids((1, 12), 5), ids((1, 3), 6)
    art = prefix_artifact(model, alpha=0.0)
    assert not art.has_prefix and not runtime.observes_prefill(art)
    runtime.apply(model, dataclasses.replace(art, prefix_in=None, prefix_mid=None), backend="masked")
    plain = decode(model, prompts, steps)
    runtime.remove(model)
    runtime.apply(model, art, backend="masked")
    torch.testing.assert_close(decode(model, prompts, steps), plain, rtol=0, atol=0)
    runtime.remove(model)
    runtime.apply(model, prefix_artifact(model), backend="masked")
    decode(model, prompts, steps)
    rule = runtime.patch._patch_of(model).state.rule
    assert rule.sequences
    with torch.no_grad():  # a one-token prompt: a new sequence whose first call is already a decode step
        model(input_ids=steps[:, :1], use_cache=True)
    assert not rule.sequences
    runtime.remove(model)


def test_a_prompt_prefilled_in_chunks_gets_the_prior_of_the_whole_prompt():
    model = tiny_model("llama")
    art = prefix_artifact(model)
    prompt = ids((1, 40), 7)
    runtime.apply(model, art, backend="masked")
    rule = runtime.patch._patch_of(model).state.rule
    with torch.no_grad():
        model(input_ids=prompt, use_cache=True)
    whole = {k: v[1].clone() for k, v in rule.sequences.items()}
    with torch.no_grad():  # two chunks of 20 new tokens (more than a decode step's 16): both dense, observed
        first = model(input_ids=prompt[:, :20], use_cache=True)
        model(input_ids=prompt[:, 20:], **cache_kwargs(model, output_cache(first)))
    assert set(rule.sequences) == set(whole)
    for key, weight in whole.items():
        torch.testing.assert_close(rule.sequences[key][1], weight, rtol=1e-5, atol=1e-6)
    runtime.remove(model)


def test_prefix_exponents_round_trip_in_format_6_and_are_checked(tmp_path):
    from safetensors import safe_open

    model = tiny_model("llama")
    art = prefix_artifact(model, alpha=0.25)
    path = save_artifact(art, tmp_path / "a.safetensors")
    with safe_open(str(path), "pt") as fh:
        assert fh.metadata()["format_version"] == "6"
    back = load_artifact(path)
    assert back.has_prefix and torch.equal(back.prefix_mid, art.prefix_mid)
    with pytest.raises(ArtifactError, match="must come together"):
        dataclasses.replace(art, prefix_in=None).validate()
    with pytest.raises(ArtifactError, match="prefix_mid"):
        dataclasses.replace(art, prefix_mid=torch.full((2,), -0.5)).validate()
    with pytest.raises(ArtifactError, match="prefix_in has shape"):
        dataclasses.replace(art, prefix_in=torch.zeros(3)).validate()


def test_the_evaluators_see_the_prefill_of_a_prefix_artifact():
    """The proxy and teacher-forced evaluations run the patched model's own prefill, so they equal the generation
    regime for a prompt-prior artifact without adaptation (and differ from the artifact without its prior)."""
    from clada.calibrate.evaluate import ProxyEvaluator, Sparsifier, TeacherForcedEvaluator, generation_eval

    model = tiny_model("llama")
    tokens = ids((6, 8 + 10 + 1), 8)
    art = prefix_artifact(model, alpha=1.0)
    proxy = ProxyEvaluator(model, tokens, 8, batch_size=3)(art)
    teacher = TeacherForcedEvaluator(model, tokens, 8, batch_size=3)
    runtime.apply(model, art, backend="masked")
    method = Sparsifier(model)
    assert method.needs_prompt and not method.adaptive
    exact = generation_eval(model, tokens, 8, batch_size=3, progress=False, method=method)
    fast = teacher(method)
    runtime.remove(model)
    plain = ProxyEvaluator(model, tokens, 8, batch_size=3)(dataclasses.replace(art, prefix_in=None, prefix_mid=None))
    for key in ("ppl_increase", "kl", "mlp_reads_saved"):
        assert proxy[key] == pytest.approx(exact[key], rel=1e-4, abs=1e-7), key
        assert fast[key] == pytest.approx(exact[key], rel=1e-4, abs=1e-7), key
    assert plain["mlp_reads_saved"] != pytest.approx(exact["mlp_reads_saved"], abs=1e-6)


def test_the_search_tries_the_prompt_prior_and_its_point_carries_it():
    from clada.calibrate.pipeline import point_artifact
    from clada.calibrate.search import Point, SearchSettings, warm_start_points

    points = warm_start_points(SearchSettings(prefix=True))
    assert [p["prefix"] for p in points].count(0.0) == len(points) - 2
    assert {p["prefix"] for p in points} == {0.0, 0.25, 0.5}
    assert all("prefix" not in p for p in warm_start_points(SearchSettings()))
    model = tiny_model("llama")
    base = make_artifact(model)
    point = Point(params={}, tau_in=[0.1, 0.1], tau_mid=[0.0, 0.0], lam=0.0, gam=0.0, tau_s=1.0, tau_H=1.0)
    args = (base.channel_weight_in, base.channel_weight_mid, base.fingerprint)
    assert not point_artifact(point, *args).has_prefix
    point.prefix = 0.3
    art = point_artifact(point, *args)
    assert art.has_prefix and art.prefix_in.tolist() == pytest.approx([0.3, 0.3]) and torch.equal(art.prefix_in, art.prefix_mid)


def test_recipe_prefix_setting_and_study_name():
    from clada.calibrate.pipeline import study_name
    from clada.calibrate.recipe import parse_recipe
    from clada.calibrate.search import SearchSettings

    plain = parse_recipe({})
    assert not plain.search.prefix
    assert study_name(plain) == study_name(parse_recipe({"search": {"prefix": False}}))  # the study from before
    with_prior = parse_recipe({"search": {"prefix": True}})
    assert study_name(with_prior) != study_name(plain)
    assert SearchSettings.from_recipe(with_prior, "sqlite://", "s").prefix
    with pytest.raises(Exception, match="search.prefix"):
        parse_recipe({"search": {"prefix": "yes"}})


def test_left_padding_does_not_count_in_the_prompt_prior():
    model = tiny_model("llama")
    runtime.apply(model, prefix_artifact(model), backend="masked")
    rule = runtime.patch._patch_of(model).state.rule
    prompt = ids((1, 9), 9)
    with torch.no_grad():
        model(input_ids=prompt, use_cache=True)
    alone = {k: v[1].clone() for k, v in rule.sequences.items()}
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), prompt], 1)
    batch = torch.cat([padded, ids((1, 12), 10)])
    mask = torch.ones_like(batch)
    mask[0, :3] = 0
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        model(input_ids=batch, attention_mask=mask, position_ids=positions, use_cache=True)
    for key, weight in alone.items():
        torch.testing.assert_close(rule.sequences[key][1][0], weight, rtol=1e-4, atol=1e-5)
    with torch.no_grad():  # without the mask the padding counts
        model(input_ids=batch, position_ids=positions, use_cache=True)
    assert not all(torch.allclose(rule.sequences[k][1][0], w, atol=1e-5) for k, w in alone.items())
    runtime.remove(model)


def test_inspect_shows_the_prefix_exponents(tmp_path):
    import json

    from click.testing import CliRunner

    from clada.calibrate.cli import main

    model = tiny_model("llama")
    path = save_artifact(prefix_artifact(model, alpha=0.25), tmp_path / "a.safetensors")
    result = CliRunner().invoke(main, ["inspect", str(path)])
    assert result.exit_code == 0 and "prefix_mid" in result.output and "0.25 0.25" in result.output
    result = CliRunner().invoke(main, ["inspect", str(path), "--json"])
    assert json.loads(result.output)["prefix_in"] == [0.25, 0.25]
