"""Every way a transformers user decodes, under the runtime: beam search, multi-token decode steps (speculative
verification), batch invariance of each backend, concurrent callers. Tiny random models of a gated (llama) and a
non-gated (gpt2) family; tests/test_real_model.py repeats the beam and batch checks on SmolLM2-135M."""

from __future__ import annotations

import threading

import pytest
import torch
from transformers import DynamicCache

from clada import runtime
from clada.runtime.compat import cache_kwargs, output_cache
from clada.runtime.signals import MAX_DECODE_TOKENS, load_signals, relax_multiplier
from tests.conftest import GATHER, make_artifact, tiny_model

FAMILIES = ["llama", "gpt2"]  # gated and non-gated MLPs
PROMPT = torch.tensor([[5, 9, 17, 33, 8, 21, 40, 11]])
ADAPTIVE = dict(tau_in=0.05, tau_mid=0.05, lam=-0.75, gam=-0.75)  # tau_s, tau_H: the model's median signals


@torch.no_grad()
def adaptive(family: str, backend: str = "auto", seed: int = 0):
    """A tiny model with peaked next-token distributions (its head scaled) under an artifact whose load-signal
    thresholds are the median surprisal and entropy along its own dense beams: about half the tokens are
    relaxed, depending on each row's own history, so signals read from another row's distribution change the
    results (a beam search that does not follow the reorders misses its replay by 1e-4..1e-2 per token)."""
    model = tiny_model(family, seed)
    model.get_output_embeddings().weight.mul_(4.0)
    model.generation_config.eos_token_id = None  # every beam runs to the full length
    model.generation_config.pad_token_id = 0
    beams = model.generate(PROMPT, num_beams=3, num_return_sequences=3, max_new_tokens=16, do_sample=False)
    start = PROMPT.shape[1]
    surprisal, entropy = load_signals(model(input_ids=beams).logits[:, start - 1 : -1], beams[:, start:])
    signals = dict(tau_s=float(surprisal.median()), tau_H=float(entropy.median()))
    runtime.apply(model, make_artifact(model, **ADAPTIVE, **signals), backend=backend)
    model.signals = signals
    return model


def expected_multiplier(model, logits: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
    s, H = load_signals(logits, token)
    return relax_multiplier(s, H, ADAPTIVE["lam"], ADAPTIVE["gam"], model.signals["tau_s"], model.signals["tau_H"])


def replayed_scores(model, prompt: torch.Tensor, sequences: torch.Tensor) -> torch.Tensor:
    """(B,) summed log-probabilities of each row of ``sequences`` after ``prompt``, replayed as one batch of B
    rows: a dense prefill of the prompt, then each row's tokens fed one decode step at a time."""
    rows = sequences.shape[0]
    with torch.no_grad():
        out = model(input_ids=prompt.expand(rows, -1), use_cache=True)
        total = torch.zeros(rows, dtype=torch.float64)
        for t in range(prompt.shape[1], sequences.shape[1]):
            token = sequences[:, t]
            logp = torch.log_softmax(out.logits[:, -1].float(), -1)
            total += logp.gather(1, token[:, None]).squeeze(1).double()
            out = model(input_ids=token[:, None], **cache_kwargs(model, output_cache(out)))
    return total


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("backend", ["auto", "masked"])
def test_beam_search_scores_equal_a_replay_of_the_beams(family, backend):
    """Each beam's score is the sum of its tokens' log-probabilities through the same patched model, with the load
    signals following the beams as transformers reorders them (length_penalty 0: no normalisation)."""
    model = adaptive(family, backend)
    new = 16
    with torch.no_grad():
        out = model.generate(PROMPT, num_beams=3, num_return_sequences=3, max_new_tokens=new, do_sample=False,
                             length_penalty=0.0, output_scores=True, return_dict_in_generate=True)
    assert 0.1 < runtime.stats(model)["relaxed_share"] < 0.99  # adaptation is on, and depends on the row
    replay = replayed_scores(model, PROMPT, out.sequences)
    gap = (replay - out.sequences_scores.double()).abs().max().item() / new
    assert gap < 1e-5, gap


def test_beam_history_follows_reorders():
    """A reorder of the cache reorders the rows' signal history with it."""
    model = adaptive("llama")
    with torch.no_grad():
        out = model(input_ids=PROMPT.expand(3, -1).contiguous(), **cache_kwargs(model, DynamicCache()))
    cache = output_cache(out)
    model(input_ids=torch.tensor([[1], [2], [3]]), **cache_kwargs(model, cache))  # wraps the cache's reorder
    call = runtime.patch._patch_of(model).state.call
    before = call.history.logits.clone()
    cache.reorder_cache(torch.tensor([2, 2, 0]))
    assert torch.equal(call.history.logits, before[[2, 2, 0]])


def test_multi_token_step_runs_sparse_with_the_first_positions_signals():
    """k new tokens on top of a cache: a sparse decode step whose k positions share the multiplier of the first,
    from the distribution that predicted it; counted in stats()['decode_steps']."""
    model = adaptive("llama", backend="masked")
    ids = torch.cat([PROMPT, PROMPT + 1])
    draft = torch.tensor([[3, 4, 5, 6], [60, 61, 62, 63]])
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True)
        prev = out.logits[:, -1]
        runtime.reset_stats(model)
        step = model(input_ids=draft, **cache_kwargs(model, output_cache(out))).logits
        m = runtime.multiplier(model)
    expected = expected_multiplier(model, prev, draft[:, 0])
    assert torch.equal(m[:, 0], expected)
    steps = runtime.stats(model)["decode_steps"]
    assert steps == {"calls": 1, "positions": 8, "multi_token_calls": 1, "multi_token_positions": 8}
    with torch.no_grad():  # the same call with that multiplier on every position: the same logits
        fresh = model(input_ids=ids, use_cache=True)
        with runtime.fixed_multiplier(model, expected[:, None].expand(2, 4)):
            fixed = model(input_ids=draft, **cache_kwargs(model, output_cache(fresh))).logits
        with runtime.dense(model):
            dense = model(input_ids=draft, **cache_kwargs(model, output_cache(model(input_ids=ids, use_cache=True)))).logits
    assert torch.equal(step, fixed)
    assert not torch.equal(step, dense)  # it was sparse


def test_after_a_cropped_verification_the_next_step_uses_the_accepted_positions_distribution():
    """Speculative decoding crops the cache to the accepted tokens: the next step's signals come from the
    distribution at the last accepted position, not from the end of the verification call."""
    model = adaptive("llama", backend="masked")
    with torch.no_grad():
        out = model(input_ids=PROMPT, **cache_kwargs(model, DynamicCache()))
        cache = output_cache(out)
        verify = model(input_ids=torch.tensor([[3, 4, 5, 6]]), **cache_kwargs(model, cache))
        cache = output_cache(verify)
        cache.crop(-2)  # tokens 3 and 4 accepted; the next token is predicted at the position of 4
        model(input_ids=torch.tensor([[77]]), **cache_kwargs(model, cache))
        m = runtime.multiplier(model)
    expected = expected_multiplier(model, verify.logits[:, 1], torch.tensor([77]))
    assert torch.equal(m[:, 0], expected)


def test_long_calls_on_a_cache_run_dense():
    """More than MAX_DECODE_TOKENS new tokens per row on a cache is chunked prefill: dense."""
    model = adaptive("llama", backend="masked")
    with torch.no_grad():
        out = model(input_ids=PROMPT, use_cache=True)
        model(input_ids=torch.arange(MAX_DECODE_TOKENS + 1)[None] + 2, **cache_kwargs(model, output_cache(out)))
    assert runtime.multiplier(model) is None
    assert runtime.stats(model)["decode_steps"]["calls"] == 0


@pytest.mark.parametrize("family", FAMILIES)
def test_prompt_lookup_and_assisted_decoding_run_sparse(family):
    """prompt_lookup_num_tokens= and assistant_model= generate through multi-token sparse decode steps."""
    model = adaptive(family)
    prompt = torch.tensor([[5, 6, 7, 8, 9, 5, 6, 7, 8, 9, 5, 6, 7]])
    with torch.no_grad():
        # an end token that min_new_tokens suppresses (transformers 4.45's prompt lookup needs one)
        looked_up = model.generate(prompt, max_new_tokens=12, min_new_tokens=12, eos_token_id=127, do_sample=False,
                                   prompt_lookup_num_tokens=3)
    steps = runtime.stats(model, reset=True)["decode_steps"]
    assert looked_up.shape[1] >= prompt.shape[1] + 12  # transformers 4.45 may accept one token past the limit
    assert steps["multi_token_calls"] > 0 and steps["multi_token_positions"] >= 2 * steps["multi_token_calls"]
    draft = tiny_model(family, seed=1)
    with torch.no_grad():
        assisted = model.generate(prompt, max_new_tokens=12, min_new_tokens=12, eos_token_id=127, do_sample=False,
                                  assistant_model=draft)
    assert assisted.shape[1] >= prompt.shape[1] + 12
    assert runtime.stats(model)["decode_steps"]["multi_token_calls"] > 0


def _row_logits(model, rows: torch.Tensor, steps: int = 6) -> torch.Tensor:
    """(B, steps, V) logits of a teacher-forced decode: dense prefill of ``rows``, then each row's own next
    tokens (a fixed function of the row) fed one step at a time."""
    with torch.no_grad():
        out = model(input_ids=rows, use_cache=True)
        logits = []
        for t in range(steps):
            token = (rows[:, t : t + 1] * 7 + t) % 100 + 1
            out = model(input_ids=token, **cache_kwargs(model, output_cache(out)))
            logits.append(out.logits[:, -1])
    return torch.stack(logits, 1)


def companion_logits(model, target: torch.Tensor, companions: list[torch.Tensor]) -> list[torch.Tensor]:
    """``target`` (T,) decoded as row 0 of a batch with each (B-1, T) of ``companions``: its logits per batch."""
    return [_row_logits(model, torch.cat([target[None], c]))[0] for c in companions]


COMPANIONS = [torch.tensor([[3, 3, 3, 3, 3, 3, 3, 3], [90, 80, 70, 60, 50, 40, 30, 20]]),
              torch.tensor([[11, 22, 33, 44, 55, 66, 77, 88], [1, 2, 1, 2, 1, 2, 1, 2]])]


def assert_batch_invariant(family: str, backend: str) -> None:
    """One prompt at one place in batches of the same size with different companions gets bitwise the same logits
    through ``backend`` (float32), with sparsity really on."""
    model = adaptive(family, backend)
    first, second = companion_logits(model, PROMPT[0], COMPANIONS)
    assert torch.equal(first, second)
    stats = runtime.stats(model)
    assert stats["mlp_sparsity"] > 0.05 and stats["path_calls"][backend] > 0


@pytest.mark.parametrize("backend", sorted({"native", GATHER, "embedding_bag", "masked"}))
@pytest.mark.parametrize("family", FAMILIES)
def test_a_rows_logits_do_not_depend_on_its_companions(backend, family):
    """Batch invariance of each backend (the dense model's GEMMs may round a row differently at another place in
    the batch: 6e-8 here, so the place is kept). The Triton backend: tests/test_triton.py."""
    if backend == "native" and GATHER != "native":
        pytest.skip("no compiled kernel on this machine")  # GATHER covers the gathering backend there is
    assert_batch_invariant(family, backend)


def concurrent_and_serial(model, prompts: list[torch.Tensor], new: int = 16) -> tuple[list, list]:
    """Greedy generations of each prompt, one after another, then all at once from one thread each."""
    generate = lambda p: model.generate(p, max_new_tokens=new, min_new_tokens=new, do_sample=False)
    with torch.no_grad():
        serial = [generate(p) for p in prompts]
    results: list = [None] * len(prompts)
    start = threading.Barrier(len(prompts))

    def worker(i: int) -> None:
        start.wait()
        with torch.no_grad():
            results[i] = generate(prompts[i])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return serial, results


@pytest.mark.parametrize("backend", ["auto", "masked"])
def test_concurrent_generate_calls_equal_serial_ones(backend):
    """Four threads generating on one patched model each get exactly what they get alone."""
    model = adaptive("llama", backend)
    prompts = [torch.tensor([[5 + i, 9, 17 + 3 * i, 33, 8, 21 - i, 40, 11 + i]]) for i in range(4)]
    serial, concurrent = concurrent_and_serial(model, prompts)
    assert all(torch.equal(s, r) for s, r in zip(serial, concurrent))
    assert runtime.stats(model)["relaxed_share"] > 0.05
