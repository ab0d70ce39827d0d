"""Runtime semantics on tiny random models of every family: exactness, masks, relaxation, batching."""

from __future__ import annotations

import math

import pytest
import torch

from clada import runtime
from clada.runtime import native
from clada.runtime.compat import cache_kwargs, output_cache
from clada.runtime.patch import _patch_of
from clada.runtime.signals import load_signals, relax_multiplier
from tests.conftest import GATHER, MaskRecorder, make_artifact, tiny_model

PROMPT = torch.tensor([[5, 9, 17, 33, 8, 21, 40, 11], [7, 7, 19, 50, 61, 3, 12, 90]])


def greedy(model, ids, n=12, **kw):
    return model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=0, **kw)


def decode_logits(model, ids, steps=6):
    """Logits of a manual KV-cached decode: prefill ids, then feed argmax tokens one at a time."""
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True)
        logits = [out.logits[:, -1]]
        for _ in range(steps):
            nxt = logits[-1].argmax(-1, keepdim=True)
            out = model(input_ids=nxt, **cache_kwargs(model, output_cache(out)))
            logits.append(out.logits[:, -1])
    return torch.stack(logits, 1)


def test_zero_thresholds_equal_dense_exactly(family_model):
    """The masked reference with nothing skipped is the dense model, bit for bit."""
    dense = decode_logits(family_model, PROMPT)
    runtime.apply(family_model, make_artifact(family_model), backend="masked")
    sparse = decode_logits(family_model, PROMPT)
    assert torch.equal(dense, sparse)


def test_fast_path_with_zero_thresholds_equals_dense(family_model):
    """The gathering path sums the same products in another order: equal to float32 rounding."""
    dense = decode_logits(family_model, PROMPT)
    runtime.apply(family_model, make_artifact(family_model))
    torch.testing.assert_close(decode_logits(family_model, PROMPT), dense, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("path", ["native", "embedding_bag"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 2e-3)])
def test_fast_path_matches_masked_reference(family_model, dtype, tol, path):
    """Gathered rows (fast: the compiled kernel, or embedding_bag) and zeroed channels (reference) give the same
    logits and the same realised sparsity."""
    if path == "native" and dtype not in getattr(native.gather_kernel(), "dtypes", ()):
        pytest.skip(f"no compiled kernel for {dtype} on this machine (tests/test_native.py says why)")
    model = family_model.to(dtype)
    art = make_artifact(model, tau_in=0.05, tau_mid=0.02, lam=-0.5, tau_s=0.5)
    figures = {}
    for fast in (False, True):
        runtime.apply(model, art, backend=path if fast else "masked")
        figures[fast] = (decode_logits(model, PROMPT).float(), runtime.stats(model))
        runtime.remove(model)
    (ref, ref_stats), (got, got_stats) = figures[False], figures[True]
    torch.testing.assert_close(got, ref, rtol=tol, atol=tol)
    assert got_stats["tokens"] == ref_stats["tokens"] > 0
    assert ref_stats["path_calls"]["masked"] > 0 and got_stats["path_calls"][path] > 0
    assert sum(got_stats["path_calls"].values()) == got_stats["path_calls"][path]  # every decode step took it
    # one implementation of the keep rule: layer 0's input (computed identically on both paths) keeps exactly the
    # same channels in every dtype; later layers see inputs rounded differently in half precision (summation order)
    assert got_stats["per_layer"]["input_sparsity"][0] == ref_stats["per_layer"]["input_sparsity"][0]
    for key in ("mlp_sparsity", "input_sparsity", "mlp_reads_saved", "relaxed_share"):
        assert got_stats[key] == pytest.approx(ref_stats[key], abs=0.005 if dtype != torch.float32 else 1e-9)


def test_fast_path_reads_transposed_storage_without_copies(family_model):
    """apply with a gathering backend re-lays weights in place (rows contiguous, no second copy); remove restores
    the layout. (``auto`` re-lays them at the first decode call, where measurement says gathering pays:
    tests/test_selection.py.)"""
    adapter = runtime.adapter_for(family_model)
    params_before = sum(p.numel() for p in family_model.parameters())
    runtime.apply(family_model, make_artifact(family_model, tau_in=0.05, tau_mid=0.05), backend=GATHER)
    for part in adapter.mlp_parts(family_model):
        ins = [getattr(part.owner, n) for n in part.in_names]
        group = ins[0].group
        assert (group is not None) == (len(ins) == 2)  # every two-input-projection family here is plain Linear
        if group is not None:  # gate and up: column blocks of one (in, gate + up) buffer, rows contiguous
            assert len(ins) == 2 and all(p.group is group for p in ins)
            full = group.full_rows()
            assert full is not None and full.is_contiguous()
            for p, (a, b) in zip(ins, group.bounds):
                assert torch.equal(full[:, a:b], adapter.weight(p).t())
        else:
            assert all(adapter.weight(p).t().is_contiguous() for p in ins)
        assert adapter.weight(getattr(part.owner, part.out_name)).t().is_contiguous()
    assert sum(p.numel() for p in family_model.parameters()) == params_before
    runtime.remove(family_model)
    assert all(p.is_contiguous() for p in family_model.parameters())


def test_shared_rows_fall_back_when_the_buffer_is_no_longer_shared():
    """If gate/up stop sharing their buffer (a parameter re-laid by someone else), the fast path still equals
    the masked reference: first each member's own contiguous rows, then the reference for non-contiguous ones."""
    model = tiny_model("llama")
    art = make_artifact(model, tau_in=0.05, tau_mid=0.05)
    runtime.apply(model, art, backend="masked")
    ref, ref_stats = decode_logits(model, PROMPT), runtime.stats(model)
    runtime.remove(model)
    runtime.apply(model, art, backend=GATHER)
    part = runtime.adapter_for(model).mlp_parts(model)[0]
    gate, up = (getattr(part.owner, n) for n in part.in_names)
    assert gate.group.full_rows() is not None
    for proj in (gate, up):  # own (in, out) rows, contiguous, same values
        proj.inner.weight.data = proj.inner.weight.data.t().contiguous().t()
    assert gate.group.full_rows() is None
    torch.testing.assert_close(decode_logits(model, PROMPT), ref, rtol=1e-5, atol=1e-5)
    got_stats = runtime.stats(model, reset=True)  # gate and up gather separately: their input is counted once
    for key in ("mlp_sparsity", "input_sparsity", "mlp_reads_saved"):
        assert got_stats[key] == pytest.approx(ref_stats[key], abs=1e-9)
    up.inner.weight.data = up.inner.weight.data.contiguous()  # original layout: masked reference for up
    torch.testing.assert_close(decode_logits(model, PROMPT), ref, rtol=1e-5, atol=1e-5)
    runtime.remove(model)


def test_static_kv_cache_generates_what_the_dynamic_cache_does():
    """A preallocated KV cache (cache_implementation="static", as engines use) changes nothing for the runtime."""
    model = tiny_model("llama")
    runtime.apply(model, make_artifact(model, tau_in=0.05, tau_mid=0.05, lam=-0.5, tau_s=0.3))
    dynamic = greedy(model, PROMPT)
    dynamic_stats = runtime.stats(model, reset=True)
    static = greedy(model, PROMPT, cache_implementation="static")
    assert torch.equal(static, dynamic)
    assert runtime.stats(model)["mlp_reads_saved"] == pytest.approx(dynamic_stats["mlp_reads_saved"], abs=1e-9)
    runtime.remove(model)


@pytest.mark.parametrize("before", [None, False, True])
def test_patched_model_turns_off_generates_automatic_compile(before):
    """transformers compiles generate's forward for static caches on a GPU; the runtime's hooks cannot be traced, so
    apply sets generation_config.disable_compile and remove puts back what was there."""
    model = tiny_model("llama")
    if not hasattr(model.generation_config, "disable_compile"):
        pytest.skip("this transformers has no generation_config.disable_compile (no automatic compile)")
    model.generation_config.disable_compile = before
    runtime.apply(model, make_artifact(model, tau_in=0.05, tau_mid=0.05))
    assert model.generation_config.disable_compile is True
    runtime.remove(model)
    assert model.generation_config.disable_compile is before


def test_compiled_patched_model_decodes_as_eager():
    """torch.compile (dynamo; transformers' own compile of generate, or a user's) over a patched model gives the eager
    logits: the first decode step's measured choice runs outside the traced graph (selection.select is never
    traced; on an H200 with torch 2.11 dynamo failed inside it), and gathering still takes the decode calls."""
    model = tiny_model("llama")
    art = make_artifact(model, tau_in=0.05, tau_mid=0.02, lam=-0.5, tau_s=0.5)
    ids = torch.randint(4, 100, (2, 6), generator=torch.Generator().manual_seed(0))

    def prefill_and_step(m):
        with torch.no_grad():
            out = m(input_ids=ids, use_cache=True)
            step = m(input_ids=out.logits[:, -1:].argmax(-1), **cache_kwargs(model, output_cache(out)))
        return step.logits

    runtime.apply(model, art)
    eager = prefill_and_step(model)
    runtime.remove(model)
    runtime.apply(model, art)
    torch._dynamo.reset()
    try:
        compiled = prefill_and_step(torch.compile(model, backend="eager"))
    finally:
        torch._dynamo.reset()
    calls = runtime.stats(model)["path_calls"]
    runtime.remove(model)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
    assert sum(v for k, v in calls.items() if k not in ("masked", "dense")) > 0, calls


def test_cuda_graphs_flag_reaches_the_measured_choice():
    """apply(cuda_graphs=True) makes auto time GPU candidates as graph replays (cached apart from launched ones)."""
    from clada.runtime.selection import Shape, case_key

    model = tiny_model("llama")
    for flag in (False, True):
        runtime.apply(model, make_artifact(model, tau_in=0.05, tau_mid=0.05), cuda_graphs=flag)
        assert _patch_of(model).state.chooser.selector.__self__.graphs is flag
        runtime.remove(model)
    shape = Shape(64, 320, 2)
    assert case_key("triton", torch.bfloat16, shape, 1, 0.6, True) != case_key("triton", torch.bfloat16, shape, 1, 0.6)


def test_remove_restores_bit_exact_dense(family_model):
    dense = decode_logits(family_model, PROMPT)
    dense_gen = greedy(family_model, PROMPT)
    runtime.apply(family_model, make_artifact(family_model, tau_in=0.05, tau_mid=0.05))
    assert not torch.equal(decode_logits(family_model, PROMPT), dense)
    runtime.remove(family_model)
    assert torch.equal(decode_logits(family_model, PROMPT), dense)
    assert torch.equal(greedy(family_model, PROMPT), dense_gen)
    assert not any("Gated" in type(m).__name__ for m in family_model.modules())


def test_prefill_stays_dense(family_model):
    with torch.no_grad():
        dense = family_model(input_ids=PROMPT).logits
        runtime.apply(family_model, make_artifact(family_model, tau_in=0.1, tau_mid=0.1))
        sparse = family_model(input_ids=PROMPT).logits
    assert torch.equal(dense, sparse)
    assert runtime.stats(family_model)["tokens"] == 0


def test_realised_sparsity_matches_masks(family_model):
    """Stats equal the masks recomputed by hand from the activations the patched model saw."""
    art = make_artifact(family_model, tau_in=0.05, tau_mid=0.02)
    runtime.apply(family_model, art)
    recorder = MaskRecorder(family_model)
    with torch.no_grad():
        out = family_model(input_ids=PROMPT[:, :-1], use_cache=True)
        family_model(input_ids=PROMPT[:, -1:], **cache_kwargs(family_model, output_cache(out)))
    recorder.close()
    st = runtime.stats(family_model)
    runtime.remove(family_model)
    recorder.check(st, art)
    assert st["tokens"] == PROMPT.shape[0] and 0 < st["mlp_reads_saved"] < 1


@pytest.mark.parametrize("tied", [False, True])
def test_reads_saved_counts_every_weight_a_decode_step_reads(tied):
    """reads_saved = skipped MLP bytes / (all Linear weights: attention, MLP, head; a tied head once)."""
    model = tiny_model("llama", tie_word_embeddings=tied)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    linear = {id(m.weight): m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)}
    total = sum(w.numel() * w.element_size() for w in linear.values())
    mlp = sum(getattr(layer.mlp, n).weight.numel() * 4 for layer in model.model.layers for n in
              ("gate_proj", "up_proj", "down_proj"))
    runtime.apply(model, make_artifact(model, tau_in=0.05, tau_mid=0.02))
    decode_logits(model, PROMPT)
    st = runtime.stats(model)
    runtime.remove(model)
    assert 0 < st["mlp_reads_saved"] < 1 and st["mlp_weight_share"] == pytest.approx(mlp / total)
    assert st["reads_saved"] == pytest.approx(st["mlp_reads_saved"] * mlp / total)


def test_full_relaxation_gives_dense_and_counts_relaxed_tokens(family_model):
    dense = decode_logits(family_model, PROMPT)
    runtime.apply(family_model, make_artifact(family_model, tau_in=0.2, tau_mid=0.2, lam=-1.0, tau_s=0.0), backend="masked")
    assert torch.equal(decode_logits(family_model, PROMPT), dense)
    st = runtime.stats(family_model)
    assert st["relaxed_share"] == 1.0 and st["input_sparsity"] == 0.0  # (ReLU zeros still count as skipped)


def test_no_relaxation_when_thresholds_unreachable(family_model):
    runtime.apply(family_model, make_artifact(family_model, tau_in=0.05, tau_mid=0.05, lam=-1.0, gam=-1.0,
                                              tau_s=50.0, tau_H=2.0))
    decode_logits(family_model, PROMPT)
    st = runtime.stats(family_model)
    assert st["relaxed_share"] == 0.0 and st["mlp_sparsity"] > 0


def test_signals_units():
    V = 64
    uniform = torch.zeros(2, V)
    s, H = load_signals(uniform, torch.tensor([3, 5]))
    assert torch.allclose(s, torch.ones(2)) and torch.allclose(H, torch.ones(2))
    peaked = torch.full((1, V), -1e4)
    peaked[0, 7] = 0.0
    s, H = load_signals(peaked, torch.tensor([7]))
    assert s.item() == pytest.approx(0.0, abs=1e-6) and H.item() == pytest.approx(0.0, abs=1e-6)
    s, _ = load_signals(torch.log(torch.tensor([[0.5, 0.5] + [1e-30] * 2])), torch.tensor([0]))
    assert s.item() == pytest.approx(math.log(2) / math.log(4), rel=1e-5)


def test_relax_multiplier_formula():
    s = torch.tensor([0.1, 0.9, 0.9, 0.1])
    H = torch.tensor([0.1, 0.1, 0.9, 0.9])
    m = relax_multiplier(s, H, lam=-0.5, gam=-0.25, tau_s=0.5, tau_H=0.5)
    assert m.tolist() == [1.0, 0.5, 0.25, 0.75]
    assert relax_multiplier(s, H, -1.0, -1.0, 0.5, 0.5).min().item() == 0.0


def test_rows_have_independent_multipliers():
    model = tiny_model("llama")
    runtime.apply(model, make_artifact(model, tau_in=0.05, tau_mid=0.05, lam=-1.0, tau_s=0.0))
    history = _patch_of(model).state.call
    with torch.no_grad():
        out = model(input_ids=PROMPT, use_cache=True)
        # make row 0's fed token certain (surprisal 0, not relaxed) and row 1's surprising (relaxed)
        logits = torch.full_like(history.history.logits, -1e4)
        logits[:, -1, 4] = 0.0
        history.history.logits = logits
        model(input_ids=torch.tensor([[4], [9]]), **cache_kwargs(model, output_cache(out)))
        m = runtime.multiplier(model)
    assert m.shape == (2, 1) and m[0, 0] == 1.0 and m[1, 0] == 0.0


def test_batched_decode_matches_single_rows():
    model = tiny_model("llama")
    runtime.apply(model, make_artifact(model, tau_in=0.05, tau_mid=0.05, lam=-0.5, gam=-0.5, tau_s=0.5, tau_H=0.9))
    both = decode_logits(model, PROMPT)
    for row in range(PROMPT.shape[0]):
        single = decode_logits(model, PROMPT[row : row + 1])
        assert torch.allclose(both[row], single[0], atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
def test_generate_with_padding_and_sampling(family):
    model = tiny_model(family)
    ids = PROMPT.clone()
    mask = torch.ones_like(ids)
    ids[1, :3], mask[1, :3] = 0, 0  # left padding on row 1
    runtime.apply(model, make_artifact(model, tau_in=0.03, tau_mid=0.03, lam=-0.5, tau_s=0.3))
    out = greedy(model, ids, attention_mask=mask)
    assert out.shape == (2, ids.shape[1] + 12)
    st = runtime.stats(model)
    assert st["tokens"] == 2 * 11 and st["mlp_sparsity"] > 0
    torch.manual_seed(0)
    sampled = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=True, top_k=20, pad_token_id=0)
    assert sampled.shape == (2, ids.shape[1] + 8)


def test_apply_twice_refused_and_remove_without_apply_refused():
    model = tiny_model("llama")
    runtime.apply(model, make_artifact(model))
    with pytest.raises(RuntimeError, match="already"):
        runtime.apply(model, make_artifact(model))
    runtime.remove(model)
    with pytest.raises(RuntimeError, match="no CLADA artifact"):
        runtime.remove(model)


def test_unsupported_model_lists_supported():
    from transformers import BertConfig, BertForMaskedLM

    model = BertForMaskedLM(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64))
    with pytest.raises(runtime.UnsupportedModelError, match="supported: .*llama"):
        runtime.adapter_for(model)


def test_runtime_import_is_light():
    import subprocess
    import sys

    # torch._dynamo and triton too: importing dynamo (torch.compiler.disable at import) took 1.4 s and imported Triton
    # built for the GPU, which then refused the interpreter's tests in the same process
    code = ("import sys, clada.runtime; print(sorted(m for m in ('optuna','datasets','click','yaml','torch._dynamo',"
            "'triton') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_a_dense_prefill_leaves_no_activation_alive():
    """The gates remember the last dense input only weakly: a prefill's activations are freed when the forward
    ends (a strong reference kept every layer's until the next call: 1.13-1.22x a dense 8192-token prefill)."""
    model = tiny_model("llama")
    runtime.apply(model, make_artifact(model, 0.05, 0.02))
    with torch.no_grad():
        model(input_ids=torch.randint(4, 100, (2, 30)))
    gates = [m for m in model.modules() if type(m).__name__ == "ChannelGate"]
    assert gates and all(g._observed is not None and g._observed() is None for g in gates)
    runtime.remove(model)


def test_step_thresholds_follow_set_thresholds_under_one_multiplier():
    """The gathering path computes every layer's step thresholds once per multiplier; set_thresholds inside the
    same fixed_multiplier context still takes effect at the next call."""
    model = tiny_model("llama")
    runtime.apply(model, make_artifact(model, 0.0, 0.0), backend=GATHER)
    ids = torch.randint(4, 100, (1, 1))
    with torch.no_grad(), runtime.fixed_multiplier(model, 1.0):
        model(input_ids=ids)
        assert runtime.stats(model, reset=True)["mlp_reads_saved"] < 0.05
        runtime.set_thresholds(model, torch.full((2,), 1e3), torch.full((2,), 1e3))
        model(input_ids=ids)
    assert runtime.stats(model)["mlp_reads_saved"] == pytest.approx(1.0)
    runtime.remove(model)
