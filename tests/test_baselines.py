"""Baselines, CLADA ablations, teacher-forced evaluation, greedy agreement, multiple choice and the eval CLI,
on tiny random models."""

from __future__ import annotations

import dataclasses
import io
import math
import json
import tarfile

import pytest
import torch
from click.testing import CliRunner

from clada import runtime
from clada.calibrate.baselines import (CalibrationActivations, MethodError, baseline_artifacts, cats_artifact,
                                       magnitude_error_model, teal_greedy_path)
from clada.calibrate.cli import main
from clada.calibrate.compare import threshold_sensitivity
from clada.calibrate.evaluate import (TeacherForcedEvaluator, generation_eval, greedy_agreement,
                                      nll_increase_by_document, ppl_increase_interval)
from clada.calibrate.measure import LayerErrorModel
from clada.calibrate.methods import METHODS, build_method, method_artifact
from clada.runtime.rules import threshold_keep
from clada.calibrate.multiple_choice import (bigbench_questions, jsonl_questions, load_questions,
                                             multiple_choice_eval, score_question)
from clada.runtime.compat import cache_kwargs, output_cache
from clada.runtime.patch import _patch_of
from clada.runtime.signals import load_signals
from tests.conftest import calibrate_tiny, make_artifact, tiny_model, word_tokenizer

PROMPT = 8
torch.manual_seed(0)
TOKENS = torch.randint(4, 128, (6, PROMPT + 12 + 1))
CALIB_TOKENS = torch.randint(4, 128, (8, PROMPT + 24 + 1))


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    pass


def calibration(model) -> CalibrationActivations:
    return CalibrationActivations.collect(model, CALIB_TOKENS, PROMPT, max_tokens=10_000)


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
def test_teal_quantile_zeroes_that_share_of_entries_per_layer(family):
    """teal at q: per layer, ~q of the calibration |x| entries are at or below tau_in and ~q of |h'| below tau_mid;
    in the model, layer 0 (whose input sparsity cannot change) skips that share on the calibration tokens."""
    model = tiny_model(family)
    calib = calibration(model)
    q = 0.3
    art = baseline_artifacts("teal", model, calib, [q])[0]
    adapter = runtime.adapter_for(model)
    def is_quantile(values, threshold):  # ReLU families: q may fall in the mass of exact zeros
        return (values < threshold).float().mean() <= q + 0.01 and (values <= threshold).float().mean() >= q - 0.01

    for layer, (x, part) in enumerate(zip(calib.inputs, adapter.mlp_parts(model))):
        assert is_quantile(x.abs(), art.tau_base_in[layer])
        with torch.no_grad():
            h = adapter.intermediate(part, x * (x.abs() > art.tau_base_in[layer]))
        assert is_quantile(h.abs(), art.tau_base_mid[layer]) and art.tau_base_mid[layer] >= 0
    assert torch.equal(art.channel_weight_in, torch.ones_like(art.channel_weight_in)) and art.lam == art.gam == 0
    method = build_method("teal", model, sparsity=q, calibration=calib)
    figures = TeacherForcedEvaluator(model, CALIB_TOKENS, PROMPT)(method)
    assert figures["per_layer"]["input_sparsity"][0] == pytest.approx(q, abs=0.01)
    if family != "opt":  # OPT's ReLU leaves about half of h exactly zero
        assert figures["per_layer"]["mlp_sparsity"][0] == pytest.approx(q, abs=0.01)
        assert figures["mlp_reads_saved"] == pytest.approx(q, abs=0.1)


def test_uniform_thresholds_only_the_down_input():
    model = tiny_model("llama")
    art = baseline_artifacts("uniform", model, calibration(model), [0.5])[0]
    assert torch.equal(art.tau_base_in, torch.zeros_like(art.tau_base_in)) and (art.tau_base_mid > 0).all()


def test_uniform_quantile_zero_is_dense():
    model = tiny_model("llama")
    dense = TeacherForcedEvaluator(model, TOKENS, PROMPT)
    method = build_method("uniform", model, sparsity=0.0, calibration=calibration(model))
    assert not method.artifact.tau_base_in.any() and not method.artifact.tau_base_mid.any()
    for figures in (dense(method), generation_eval(model, TOKENS, PROMPT, progress=False, method=method)):
        assert figures["ppl_increase"] == pytest.approx(0.0, abs=1e-6)
        assert figures["kl"] == pytest.approx(0.0, abs=1e-7)  # float summation order only (weights re-laid)
        assert figures["mlp_reads_saved"] == 0.0
    assert greedy_agreement(model, TOKENS[:, :PROMPT], method, new_tokens=12) == 1.0


def test_teal_greedy_steps_where_error_grows_least_until_target():
    model = tiny_model("llama")
    adapter = runtime.adapter_for(model)
    part = adapter.mlp_parts(model)[1]
    probe = magnitude_error_model(adapter, part, calibration(model).inputs[1])
    frac_in = 2 / 3
    path = teal_greedy_path(probe, frac_in, target=0.4)
    assert path[0] == (0.0, 0.0)
    for (qi, qm), (ni, nm) in zip(path, path[1:]):
        assert (ni - qi, nm - qm) in ((pytest.approx(0.05), 0.0), (0.0, pytest.approx(0.05)))
        other = (qi, qm + 0.05) if ni > qi else (qi + 0.05, qm)
        assert probe.error(ni, nm) <= probe.error(*other) + 1e-12
    reached = [frac_in * a + (1 - frac_in) * b for a, b in path]
    assert reached[-1] >= 0.4 - 1e-9 > reached[-2]
    arts = baseline_artifacts("teal-greedy", model, calibration(model), [0.2, 0.4])
    assert (arts[1].tau_base_in >= arts[0].tau_base_in).all() and (arts[1].tau_base_mid >= arts[0].tau_base_mid).all()


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_grid_tables_and_the_greedy_walk_share_one_layer_error_model(family):
    """The grid search's table (sampled quantiles) and TEAL-greedy's probe (exact quantiles) agree cell for cell
    below the subsampling limit, and the table's thresholds keep what the runtime's rule keeps."""
    model = tiny_model(family)
    adapter = runtime.adapter_for(model)
    part = adapter.mlp_parts(model)[0]
    x = calibration(model).inputs[0]
    probe = magnitude_error_model(adapter, part, x)
    ones_in, ones_mid = probe.weight_in, probe.weight_mid
    q_in, q_mid = torch.tensor([0.0, 0.2, 0.5]), torch.tensor([0.0, 0.3, 0.6])
    table = LayerErrorModel(adapter, part, x, ones_in, ones_mid, quantiles="sampled").table(q_in, q_mid)
    for i, qi in enumerate(q_in.tolist()):
        for j, qj in enumerate(q_mid.tolist()):
            tau_in, tau_mid = probe.thresholds(qi, qj)
            assert table.tau_in[i].item() == pytest.approx(tau_in, rel=1e-6)
            assert table.tau_mid[i, j].item() == pytest.approx(tau_mid, rel=1e-5, abs=1e-9)
            assert table.error[i, j].item() == pytest.approx(probe.error(qi, qj), rel=1e-4, abs=1e-9)
    keep = threshold_keep(x, ones_in, table.tau_in[1].item())
    assert (1 - keep.float().mean()).item() == pytest.approx(0.2, abs=0.01)


def test_cats_masks_act_gate_and_skips_up_rows_and_down_columns():
    """On a decode step: the MLP output is down((act(gate x) * [|act(gate x)| > t]) * up x), it does not change
    when the weights of the skipped neurons' up rows and down columns are zeroed, and reads count them."""
    model = tiny_model("llama")
    calib = calibration(model)
    t = cats_artifact(model, calib, 0.5).tau_base_mid
    mlp = model.model.layers[1].mlp
    with torch.no_grad():
        a = mlp.act_fn(mlp.gate_proj(calib.inputs[1]))
    assert (a.abs() <= t[1]).float().mean().item() == pytest.approx(0.5, abs=0.01)
    seen = {}
    hooks = [mlp.register_forward_pre_hook(lambda m, args: seen.update(x=args[0].detach().clone())),
             mlp.register_forward_hook(lambda m, args, out: seen.update(y=out.detach().clone()))]
    method = build_method("cats", model, sparsity=0.5, calibration=calib)
    with torch.no_grad():
        cache = output_cache(model(input_ids=TOKENS[:1, :PROMPT], use_cache=True))
        model(input_ids=TOKENS[:1, PROMPT : PROMPT + 1], **cache_kwargs(model, cache))
    for h in hooks:
        h.remove()
    x, y = seen["x"], seen["y"]
    stats = method.stats()
    with torch.no_grad(), runtime.dense(model):  # the reference, nothing skipped
        a = mlp.act_fn(mlp.gate_proj(x))
        keep = a.abs() > t[1]
        torch.testing.assert_close(y, mlp.down_proj(a * keep * mlp.up_proj(x)))
        skipped = ~keep.flatten()
        assert 0 < skipped.sum() < skipped.numel()
        assert stats["tokens"] == 1 and stats["per_layer"]["mlp_sparsity"][1] == pytest.approx(skipped.float().mean().item(), abs=1e-5)
    with torch.no_grad(), runtime.fixed_multiplier(model, 1.0):  # a sparse step again
        mlp.up_proj.weight[skipped] = 0.0
        mlp.down_proj.weight[:, skipped] = 0.0
        torch.testing.assert_close(mlp(x), y)
    assert stats["mlp_reads_saved"] == pytest.approx(stats["mlp_sparsity"] * 2 / 3)  # up + down of gate, up, down
    assert stats["input_sparsity"] == 0.0


def test_griffin_neurons_are_the_prompt_top_k_and_fixed_while_decoding():
    model = tiny_model("llama")
    parts = runtime.adapter_for(model).mlp_parts(model)
    prompt_h = {}
    hooks = [p.down_proj.register_forward_pre_hook(lambda m, args, l=l: prompt_h.setdefault(l, args[0].detach().clone()))
             for l, p in enumerate(p.owner for p in parts)]
    with torch.no_grad():
        model(input_ids=TOKENS[:2, :PROMPT])
    for h in hooks:
        h.remove()
    method = build_method("griffin", model, sparsity=0.75)
    k = 16  # 25% of 64 neurons
    fed = {l: [] for l in range(len(parts))}
    hooks = [p.owner.down_proj.inner.register_forward_pre_hook(lambda m, args, l=l: fed[l].append(args[0].detach().clone()))
             for l, p in enumerate(parts)]  # what the original down projection computes with, after the gate
    out = model.generate(TOKENS[:2, :PROMPT], attention_mask=torch.ones(2, PROMPT, dtype=torch.long), max_new_tokens=5,
                         do_sample=False, pad_token_id=0)
    for h in hooks:
        h.remove()
    assert out.shape == (2, PROMPT + 5)
    for layer, calls in fed.items():
        z = prompt_h[layer] / prompt_h[layer].norm(dim=-1, keepdim=True)
        expected = torch.zeros(2, 64, dtype=torch.bool).scatter_(1, z.norm(dim=1).topk(k, dim=-1).indices, True)
        assert torch.equal(_patch_of(model).state.rule.masks[layer], expected)
        assert len(calls) == 5 and calls[0].shape[1] == PROMPT  # prefill dense, then 4 decode steps
        for h in calls[1:]:
            assert not (h[:, 0] * ~expected).any()  # nothing outside the prompt's neurons
    stats = method.stats()
    assert stats["mlp_sparsity"] == pytest.approx(0.75) and stats["mlp_reads_saved"] == pytest.approx(0.75)
    assert stats["tokens"] == 2 * 4


@pytest.mark.parametrize("name", ["uniform", "teal", "teal-greedy", "cats", "griffin", "clada-noadapt", "dense"])
def test_teacher_forced_equals_generation_regime_without_adaptation(name):
    """What the benchmark relies on: for methods without adaptation the one-forward evaluation is exact."""
    model = tiny_model("llama")
    art = make_artifact(model, tau_in=0.05, tau_mid=0.02, lam=-0.5, tau_s=0.5)
    method = build_method(name, model, sparsity=0.5 if name in ("uniform", "teal", "teal-greedy", "cats", "griffin") else None,
                          artifact=art if name.startswith("clada") else None, calibration=calibration(model))
    assert not method.adaptive
    fast = TeacherForcedEvaluator(model, TOKENS, PROMPT, batch_size=4)(method)
    exact = generation_eval(model, TOKENS, PROMPT, batch_size=4, progress=False, method=method)
    for key in ("ppl_increase", "kl", "mlp_sparsity", "input_sparsity", "mlp_reads_saved"):
        assert fast[key] == pytest.approx(exact[key], rel=1e-4, abs=1e-7), key
    assert fast["tokens"] == exact["tokens"]
    if name != "dense":
        assert exact["mlp_reads_saved"] > 0.1
    method.remove()


def test_ppl_increase_interval_resamples_whole_documents():
    def interval(sparse, dense):
        return ppl_increase_interval(nll_increase_by_document(sparse, dense))

    dense = torch.rand(2, 5)
    # two documents whose sparse NLL is 0 and 1 nat above dense: resampled means 0, 0.5, 1 with odds 1/4, 1/2, 1/4
    low, high = interval(dense + torch.tensor([[0.0], [1.0]]), dense)
    assert low == pytest.approx(0.0, abs=1e-12) and high == pytest.approx(torch.e - 1.0)
    assert interval(dense + 0.01, dense) == pytest.approx([0.01005017] * 2, rel=1e-5)  # no spread: a point
    spread = torch.linspace(-0.03, 0.03, 32).unsqueeze(1)  # per-document differences around a mean of 0.01 nat
    base = torch.rand(32, 8)
    narrow = interval(base + 0.01 + 0.5 * spread, base)
    wide = interval(base + 0.01 + spread, base)
    assert wide[0] < narrow[0] < 0.01005 < narrow[1] < wide[1]  # both around the point estimate expm1(0.01)
    assert interval(base + 0.01 + spread, base) == wide  # a fixed seed: the same figures, the same interval


def test_evaluations_report_the_interval_around_their_ppl_increase():
    model = tiny_model("llama")
    method = build_method("clada", model, artifact=make_artifact(model, tau_in=0.05, tau_mid=0.05))
    for figures in (generation_eval(model, TOKENS, PROMPT, batch_size=4, progress=False, method=method),
                    TeacherForcedEvaluator(model, TOKENS, PROMPT, batch_size=4)(method)):
        low, high = figures["ppl_increase_interval"]
        assert low <= figures["ppl_increase"] <= high and low < high
        assert figures["documents"] == TOKENS.shape[0]
        per_document = figures["per_document"]  # what a paired comparison of two methods takes, document by document
        assert len(per_document["nll_increase"]) == len(per_document["kl"]) == TOKENS.shape[0]
        mean_increase = sum(per_document["nll_increase"]) / TOKENS.shape[0]
        assert math.expm1(mean_increase) == pytest.approx(figures["ppl_increase"], rel=1e-9, abs=1e-12)
        assert sum(per_document["kl"]) / TOKENS.shape[0] == pytest.approx(figures["kl"], rel=1e-6)
    method.remove()


def test_generation_eval_reuses_a_dense_reference():
    model = tiny_model("llama")
    reference = TeacherForcedEvaluator(model, TOKENS, PROMPT, batch_size=4)
    method = build_method("clada", model, artifact=make_artifact(model, tau_in=0.05, tau_mid=0.05, lam=-0.5, tau_s=0.5))
    fresh = generation_eval(model, TOKENS, PROMPT, batch_size=4, progress=False, method=method)
    reused = generation_eval(model, TOKENS, PROMPT, batch_size=4, progress=False, method=method, reference=reference)
    for key in ("ppl_increase", "kl", "mlp_reads_saved", "relaxed_share"):
        assert reused[key] == pytest.approx(fresh[key], rel=1e-5, abs=1e-8)
    with pytest.raises(ValueError, match="other tokens"):
        generation_eval(model, TOKENS, PROMPT, batch_size=2, progress=False, method=method, reference=reference)


def test_adaptive_methods_refuse_teacher_forcing():
    model = tiny_model("llama")
    method = build_method("clada", model, artifact=make_artifact(model, lam=-0.5, tau_s=0.5))
    with pytest.raises(ValueError, match="adaptation"):
        TeacherForcedEvaluator(model, TOKENS, PROMPT)(method)


def test_ablations_set_lam_and_gam():
    model = tiny_model("llama")
    art = make_artifact(model, tau_in=0.05, tau_mid=0.05, lam=-0.3, gam=-0.4, tau_s=0.5, tau_H=0.5)
    L, D = art.channel_weight_in.shape
    art = dataclasses.replace(art, center_in=torch.ones_like(art.channel_weight_in),
                              tau_base_attn_in=torch.full((L,), 0.1), tau_base_attn_out=torch.full((L,), 0.1),
                              channel_weight_attn_in=torch.ones(L, D), channel_weight_attn_out=torch.ones(L, D),
                              prefix_in=torch.full((L,), 0.5), prefix_mid=torch.full((L,), 0.5))
    expected = {"clada": (-0.3, -0.4), "clada-surprisal": (-0.3, 0.0), "clada-entropy": (0.0, -0.4),
                "clada-noadapt": (0.0, 0.0), "clada-nocomp": (-0.3, -0.4), "clada-noattention": (-0.3, -0.4),
                "clada-noprefix": (-0.3, -0.4)}
    assert {n for n in METHODS if n.startswith("clada")} == set(expected)
    for name, (lam, gam) in expected.items():
        variant = method_artifact(name, model, artifact=art)
        assert (variant.lam, variant.gam) == pytest.approx((lam, gam))
        assert torch.equal(variant.tau_base_in, art.tau_base_in) and variant.tau_s == art.tau_s
        assert (variant.center_in is None) == (name == "clada-nocomp")
        assert variant.has_attention == (name != "clada-noattention")
        assert variant.has_prefix == (name != "clada-noprefix")
        method = build_method(name, model, artifact=art)
        assert method.adaptive == (name != "clada-noadapt")
        assert (method.artifact.lam, method.artifact.gam) == pytest.approx((lam, gam))
        method.remove()
    assert (art.lam, art.gam) == pytest.approx((-0.3, -0.4))  # the original is untouched


def test_method_errors():
    model = tiny_model("llama")
    with pytest.raises(MethodError, match="unknown method"):
        build_method("magic", model)
    with pytest.raises(MethodError, match="needs an artifact"):
        build_method("clada-entropy", model)
    with pytest.raises(MethodError, match="needs a sparsity"):
        build_method("griffin", model)
    with pytest.raises(MethodError, match="outside"):
        build_method("teal", model, sparsity=1.5, calibration=calibration(model))
    with pytest.raises(MethodError, match="applies to"):
        build_method("dense", model, sparsity=0.5)
    assert set(METHODS) >= {"dense", "uniform", "teal", "teal-greedy", "cats", "griffin"}


def test_greedy_agreement():
    model = tiny_model("llama")
    prompts = TOKENS[:4, :PROMPT]
    dense = build_method("dense", model)
    assert greedy_agreement(model, prompts, dense, new_tokens=16) == 1.0
    dense.remove()
    method = build_method("griffin", model, sparsity=0.9)
    agreement = greedy_agreement(model, prompts, method, new_tokens=16)
    assert 0.0 <= agreement < 1.0


def test_threshold_sensitivity_moves_tau_s_and_tau_H():
    model = tiny_model("llama")
    with torch.no_grad():
        logits = model(input_ids=TOKENS).logits
    surprisal, _ = load_signals(logits[:, PROMPT - 1 : -2], TOKENS[:, PROMPT:-1])
    low, mid, high = torch.quantile(surprisal.flatten(), torch.tensor([0.2, 0.5, 0.8])).tolist()
    delta = (high - low) / 2  # random tiny models: signals spread little around 1
    art = make_artifact(model, tau_in=0.05, tau_mid=0.05, lam=-0.9, tau_s=mid, tau_H=0.5)
    rows = threshold_sensitivity(model, art, TOKENS, PROMPT, delta=delta)
    assert [r["variant"] for r in rows] == ["base", f"tau_s-{delta:g}", f"tau_s+{delta:g}", f"tau_H-{delta:g}", f"tau_H+{delta:g}"]
    got = [v for r in rows for v in (r["tau_s"], r["tau_H"])]
    assert got == pytest.approx([mid, 0.5, mid - delta, 0.5, mid + delta, 0.5, mid, 0.5 - delta, mid, 0.5 + delta])
    assert rows[0]["d_ppl_increase"] == 0.0 and rows[3]["d_mlp_reads_saved"] == 0.0  # gam = 0: tau_H is inert
    assert rows[1]["relaxed_share"] > rows[0]["relaxed_share"] > rows[2]["relaxed_share"]
    # lower thresholds relax more tokens (or as many): fewer reads saved
    assert rows[1]["relaxed_share"] >= rows[0]["relaxed_share"] >= rows[2]["relaxed_share"]
    assert rows[1]["d_mlp_reads_saved"] <= 0 <= rows[2]["d_mlp_reads_saved"]
    assert not runtime.is_patched(model)


# ---- multiple choice ---------------------------------------------------------------------------------------

def brute_force_loglik(model, tokenizer, context: str, choice: str) -> float:
    ctx = tokenizer(context)["input_ids"]
    cont = tokenizer(choice, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([ctx + cont])).logits[0].float(), -1)
    return sum(logp[len(ctx) - 1 + i, t].item() for i, t in enumerate(cont))


def test_multiple_choice_picks_the_higher_likelihood_choice(tmp_path):
    model, tokenizer = tiny_model("llama"), word_tokenizer()
    rows = [("w1 w2 w3 w4", ["w5 w6", "w7", "w8 w9 w10"]), ("w11 w12", ["w13", "w14 w15"])]
    best = []
    dense_method = build_method("dense", model)
    for context, choices in rows:
        with runtime.dense(model):
            scores = [brute_force_loglik(model, tokenizer, context, c) for c in choices]
        best.append(max(range(len(choices)), key=scores.__getitem__))
        ctx, conts = tokenizer(context)["input_ids"], [tokenizer(c, add_special_tokens=False)["input_ids"] for c in choices]
        dense, sparse = score_question(model, dense_method, ctx, conts)
        torch.testing.assert_close(dense, torch.tensor(scores), rtol=1e-4, atol=1e-4)
        assert torch.equal(dense, sparse)
    path = tmp_path / "mc.jsonl"
    labels = [best[0], 1 - best[1]]  # first labelled with its best choice, second with the other one
    path.write_text("\n".join(json.dumps({"context": c, "choices": ch, "label": l}) for (c, ch), l in zip(rows, labels)))
    questions = load_questions(str(path))
    result = multiple_choice_eval(model, tokenizer, questions, dense_method, progress=False)
    assert result == {"questions": 2, "accuracy_dense": 0.5, "accuracy_sparse": 0.5, "chance": pytest.approx((1 / 3 + 1 / 2) / 2),
                      "same_choice": 1.0}


@pytest.mark.parametrize("adaptive", [False, True])
def test_multiple_choice_sparse_scores_follow_the_generation_regime(adaptive):
    """Sparse choice scores = teacher-forced sum of log-probs of a run where the context is a dense prefill."""
    model, tokenizer = tiny_model("llama"), word_tokenizer()
    art = make_artifact(model, tau_in=0.1, tau_mid=0.05, lam=-0.5 if adaptive else 0.0, tau_s=0.3)
    ctx, conts = tokenizer("w1 w2 w3 w4 w5")["input_ids"], [[20, 21, 22], [23, 24]]
    method = build_method("clada", model, artifact=art)
    _, sparse = score_question(model, method, ctx, conts)
    for row, cont in enumerate(conts):  # one choice at a time, token by token, through generate's regime
        with torch.no_grad():
            out = model(input_ids=torch.tensor([ctx]), use_cache=True)
            logp, cache = torch.log_softmax(out.logits[0, -1], -1)[cont[0]].item(), output_cache(out)
            for i in range(1, len(cont)):
                out = model(input_ids=torch.tensor([[cont[i - 1]]]), **cache_kwargs(model, cache))
                cache = output_cache(out)
                logp += torch.log_softmax(out.logits[0, -1], -1)[cont[i]].item()
        assert sparse[row].item() == pytest.approx(logp, abs=1e-4)


def test_bad_multiple_choice_file(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"context": "a", "choices": ["x", "y"], "label": 0}) + "\n"
                    + json.dumps({"context": "a", "choices": ["x"], "label": 0}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: 'choices'"):
        jsonl_questions(path)


def test_bigbench_format():
    task = {"task_prefix": "Pick.", "example_input_prefix": "\nexample: ", "example_output_prefix": "\nanswer: ",
            "examples": [{"input": "sky?", "target_scores": {"green": 0, "blue": 1}},
                         {"input": "free text", "target": "no scores"}]}
    (q,) = bigbench_questions(task)
    assert q.choices == ("blue", "green") and q.label == 0
    assert q.context == "Pick.\nexample: sky?\n  choice: blue\n  choice: green\nanswer: "
    task["append_choices_to_input"] = False
    assert bigbench_questions(task)[0].context == "Pick.\nexample: sky?\nanswer: "


def test_bigbench_extracts_only_the_named_task(tmp_path, monkeypatch):
    """From a stand-in sdist: only TASK's task.json files are extracted, cached, and the subtasks joined."""
    monkeypatch.setenv("CLADA_CACHE", str(tmp_path))
    (tmp_path / "sdists").mkdir()

    def task(examples):
        return json.dumps({"examples": examples}).encode()

    members = {
        "bigbench-1.0.0/bigbench/benchmark_tasks/other/task.json": task([{"input": "o", "target_scores": {"a": 1, "b": 0}}]),
        "bigbench-1.0.0/bigbench/benchmark_tasks/mytask/task.json": task([]),
        "bigbench-1.0.0/bigbench/benchmark_tasks/mytask/README.md": b"readme",
        "bigbench-1.0.0/bigbench/benchmark_tasks/mytask/one/task.json": task([{"input": "1", "target_scores": {"a": 1, "b": 0}}]),
        "bigbench-1.0.0/bigbench/benchmark_tasks/mytask/two/task.json": task([{"input": "2", "target_scores": {"a": 0, "b": 1}}]),
    }
    with tarfile.open(tmp_path / "sdists" / "bigbench-1.0.0.tar.gz", "w:gz") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    questions = load_questions("bigbench:mytask")
    assert [(q.source, q.label) for q in questions] == [("mytask/one", 0), ("mytask/two", 1)]
    extracted = sorted(p.relative_to(tmp_path / "files").as_posix() for p in (tmp_path / "files").rglob("*.json"))
    assert extracted == ["bigbench-1.0.0/benchmark_tasks/mytask.files.json", "bigbench-1.0.0/benchmark_tasks/mytask/one/task.json",
                         "bigbench-1.0.0/benchmark_tasks/mytask/task.json", "bigbench-1.0.0/benchmark_tasks/mytask/two/task.json"]
    assert len(load_questions("bigbench:mytask/two")) == 1
    with pytest.raises(ValueError, match="not in bigbench"):
        load_questions("bigbench:absent")
    with pytest.raises(ValueError, match="expected TASK"):
        load_questions("bigbench:../etc")


# ---- command line ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def job(tmp_path_factory):
    root = tmp_path_factory.mktemp("baselines")
    calibrate_tiny(root, "llama", trials=4)
    return root


@pytest.mark.parametrize("args", [["--method", "teal", "--sparsity", "0.3"], ["--method", "griffin", "--sparsity", "0.5"],
                                  ["--method", "clada-noadapt"]])
def test_eval_cli_methods(job, args):
    out = job / "m.json"
    result = CliRunner().invoke(main, ["eval", "--model", str(job / "ckpt"), "--artifact", str(job / "out" / "clada.safetensors"),
                                       "--data", str(job / "docs.txt"), "--docs", "3", "--greedy-prompts", "2",
                                       "--json", str(out), "--quiet", *args])
    assert result.exit_code == 0, result.output
    figures = json.loads(out.read_text())
    assert {"ppl_increase", "kl", "mlp_sparsity", "mlp_reads_saved", "greedy_agreement"} <= set(figures)
    assert 0.0 <= figures["greedy_agreement"] <= 1.0 and figures["method"] == args[1]
    assert "greedy_agreement" in result.output


def test_eval_cli_multiple_choice_and_errors(job, tmp_path):
    mc = tmp_path / "q.jsonl"
    mc.write_text(json.dumps({"context": "w1 w2", "choices": ["w3", "w4 w5"], "label": 1}) + "\n")
    base = ["eval", "--model", str(job / "ckpt"), "--quiet"]
    result = CliRunner().invoke(main, base + ["--method", "dense", "--mc", str(mc)])
    assert result.exit_code == 0, result.output
    assert "accuracy_dense" in result.output and "chance           0.5000" in result.output
    for args, message in [(["--method", "clada"], "needs an artifact"), (["--method", "nope"], "is not one of"),
                          (["--method", "teal"], "needs a sparsity"), ([], "needs an artifact")]:
        result = CliRunner().invoke(main, base + args)
        assert result.exit_code == 2 and message in result.output, result.output


def test_eval_cli_reads_questions_and_documents_before_the_model(job, tmp_path, monkeypatch):
    from clada.calibrate import models

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was checked")
    monkeypatch.setattr(models, "load_model", no_model)
    base = ["eval", "--model", str(job / "ckpt"), "--method", "dense", "--quiet"]
    for args, message in [(["--mc", str(tmp_path / "none.jsonl")], "none.jsonl: cannot read"),
                          (["--data", str(tmp_path / "none.txt")], "none.txt")]:
        result = CliRunner().invoke(main, base + args)
        assert result.exit_code == 2 and message in result.output, result.output
