"""Kernel backends behind one interface (runtime/backends.py): every backend available on this machine keeps
exactly the channels of the one threshold rule, sums their rows, and generates the masked reference's tokens."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from clada import runtime
from clada.runtime.backends import BACKENDS, BackendChooser, BackendError
from clada.runtime.rules import threshold_keep
from tests.conftest import make_artifact, tiny_model

DATA = Path(__file__).parent / "data"
GATHERING = [name for name, b in BACKENDS.items()  # every gathering backend that runs on this machine
             if b.gathers and b.accepts(torch.device("cpu"), torch.float32, 1)]
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-3}


def available(name: str, dtype: torch.dtype = torch.float32, rows: int = 1) -> bool:
    return BACKENDS[name].accepts(torch.device("cpu"), dtype, rows)


@pytest.mark.parametrize("name", GATHERING)
@pytest.mark.parametrize("dtype", list(TOLERANCE), ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("n,channels,width", [(1, 37, 50), (2, 300, 129), (4, 64, 96), (8, 200, 64)])
def test_backend_keeps_exactly_the_rule_and_sums_its_rows(name, dtype, n, channels, width):
    """Per call: the kept count is the rule's, to the pair, and the output the float32 masked product."""
    if not available(name, dtype, n):
        pytest.skip(f"backend {name} does not run {dtype} here (its own tests say why)")
    gen = torch.Generator().manual_seed(channels + n)
    x = torch.randn(n, channels, generator=gen).to(dtype)
    weight = torch.rand(channels, generator=gen) + 0.5
    tau = (torch.rand(n, 1, generator=gen) * 1.5).float()
    tau[0] = 0.0  # a row keeping everything but exact zeros
    wide = torch.randn(channels, width + 20, generator=gen).to(dtype)
    rows = wide[:, 5 : 5 + width]  # a strided view, as the shared gate/up buffer's column blocks are
    out, kept = BACKENDS[name].gather(x, weight, tau, rows)
    keep = threshold_keep(x, weight, tau)
    assert int(kept) == int(keep.sum())
    want = (x.float() * keep) @ rows.float()
    assert out.dtype == dtype and out.shape == (n, width)
    torch.testing.assert_close(out.float(), want, rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype] * want.abs().max().item())


def generate(model, prompt, new_tokens=12):
    with torch.no_grad():
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    return out[:, prompt.shape[1]:]


@pytest.mark.parametrize("family", ["llama", "gpt2", "phi3"])
def test_every_backend_generates_the_masked_references_tokens(family):
    """apply(backend=NAME) for each backend available: the same greedy tokens as the masked reference, and
    path_calls shows that backend took every decode-step call."""
    model = tiny_model(family)
    art = make_artifact(model, tau_in=0.05, tau_mid=0.02, lam=-0.5, tau_s=0.5)
    prompt = torch.randint(4, 100, (2, 8), generator=torch.Generator().manual_seed(1))
    runtime.apply(model, art, backend="masked")
    want = generate(model, prompt)
    runtime.remove(model)
    ran = []
    for name in GATHERING:
        if not available(name, rows=2):
            continue
        runtime.apply(model, art, backend=name)
        got = generate(model, prompt)
        calls = runtime.stats(model)["path_calls"]
        runtime.remove(model)
        assert torch.equal(got, want), name
        assert calls[name] > 0 and sum(calls.values()) == calls[name], (name, calls)
        ran.append(name)
    assert "embedding_bag" in ran


def test_backend_choice_is_made_once_per_shape_and_named_in_stats():
    model = tiny_model("llama")
    runtime.apply(model, make_artifact(model, tau_in=0.05, tau_mid=0.05), backend="embedding_bag")
    generate(model, torch.randint(4, 100, (1, 8)), 3)
    st = runtime.stats(model)
    assert st["backends"] == {"cpu float32 1": "embedding_bag"} and st["rule"] == "threshold"
    runtime.remove(model)
    chooser = BackendChooser("auto")
    first = chooser.choose(torch.device("cpu"), torch.float32, 1)
    assert chooser.choose(torch.device("cpu"), torch.float32, 1) is first
    assert chooser.choose(torch.device("cpu"), torch.float32, 9).name == "masked"  # prefill-shaped: masked


def test_unknown_or_unavailable_backend_is_refused_before_patching():
    model = tiny_model("llama")
    art = make_artifact(model)
    with pytest.raises(BackendError, match="unknown backend"):
        runtime.apply(model, art, backend="cuda-magic")
    with pytest.raises(BackendError, match="cannot run|not installed"):
        runtime.apply(model, art, backend="triton")  # no GPU and no interpreter in this process
    assert not runtime.is_patched(model)
    assert all(p.is_contiguous() for p in model.parameters())


@pytest.mark.parametrize("backend", [GATHERING[0], "masked"])
def test_format1_artifact_loads_and_generates_what_it_did(backend):
    """tests/data holds an artifact written by clada 0.1.0 (format 1) and the tokens it generated then (``fast``:
    through the gathering path that ``auto`` took then)."""
    recorded = json.loads((DATA / "format1-tiny-llama.json").read_text())
    art = runtime.load_artifact(DATA / "format1-tiny-llama.safetensors")
    assert art.rule == {"name": "threshold"} and art.channel_weight_in.shape == (2, 32)
    model = tiny_model(recorded["family"], recorded["seed"])
    runtime.apply(model, art, backend=backend)
    got = generate(model, torch.tensor(recorded["prompt"]), recorded["new_tokens"])
    st = runtime.stats(model)
    expected = recorded["masked" if backend == "masked" else "fast"]
    assert got.tolist() == expected["tokens"]
    for key in ("mlp_sparsity", "input_sparsity", "relaxed_share"):
        assert st[key] == pytest.approx(expected[key], abs=1e-9)
