"""``clada bench``: what it measures and reports, on a tiny model (figures are timings: only their relations
and the model's state are asserted, never their size)."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from clada import runtime
from clada.runtime import native
from clada.artifacts import save_artifact
from clada.calibrate.bench import BenchConfig, run_bench, text_prompts
from clada.calibrate.cli import main
from clada.calibrate.methods import METHODS
from tests.conftest import make_artifact, synthetic_documents, tiny_checkpoint, tiny_model, word_tokenizer

KEYS = {"dense_tok_s", "clada_tok_s", "ratio", "mlp_sparsity", "mlp_reads_saved", "bound", "gain_of_bound",
        "signal_overhead", "mlp_share", "layout_tok_s", "prefill_overhead", "first_step_ms", "apply_ms"}


def test_text_prompts_are_consecutive_windows():
    tok = word_tokenizer()
    docs = synthetic_documents(4, 30)
    ids = text_prompts(tok, docs, batch=3, prompt_tokens=10)
    stream = [i for d in docs for i in tok(d, add_special_tokens=False)["input_ids"]]
    assert ids.shape == (3, 10) and ids.flatten().tolist() == stream[:30]
    with pytest.raises(ValueError, match="needs 1000"):
        text_prompts(tok, docs, batch=10, prompt_tokens=100)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_run_bench_reports_consistent_figures_and_restores_the_model(family):
    model = tiny_model(family)
    prompts = torch.randint(4, 90, (2, 8))
    with torch.no_grad():
        before = model(input_ids=prompts).logits
    art = make_artifact(model, tau_in=0.05, tau_mid=0.05, lam=-0.5, tau_s=0.3)
    r = run_bench(model, art, prompts, BenchConfig(batch=2, prompt_tokens=8, new_tokens=4, reps=2, warmup=0))
    assert KEYS <= set(r)
    assert r["ratio"] == pytest.approx(r["clada_tok_s"] / r["dense_tok_s"])
    assert 0 < r["mlp_share"] < 1 and 0 <= r["signal_overhead"] < 1
    assert 0 < r["mlp_reads_saved"] < 1
    assert r["bound"] == pytest.approx(1 / (1 - r["mlp_reads_saved"] * r["mlp_share"]))
    assert r["gain_of_bound"] == pytest.approx((r["ratio"] - 1) / (r["bound"] - 1))
    assert all(len(v) == 2 for v in r["decode_s"].values())
    assert set(r["first_step_ms"]) == set(r["decode_s"]) and all(ms > 0 for ms in r["first_step_ms"].values())
    assert set(r["apply_ms"]) == set(r["decode_s"]) and all(ms >= 0 for ms in r["apply_ms"].values())
    fastest = {mode: min(seconds) for mode, seconds in r["decode_s"].items()}
    assert r["best_ratio"] == pytest.approx(fastest["dense"] / fastest["clada"])
    assert r["best_sparsity_ratio"] == pytest.approx(fastest["layout"] / fastest["clada"])
    per_rep = sorted(d / c for d, c in zip(r["decode_s"]["dense"], r["decode_s"]["clada"]))
    assert r["paired_ratio"] == pytest.approx((per_rep[0] + per_rep[1]) / 2)  # the median of two
    assert r["clada_faster"] == sum(x > 1 for x in per_rep)
    assert sum(r["fast_path"].values()) == pytest.approx(1) and r["fast_path"]["masked"] == 0  # decode gathered
    # the model comes back unpatched, in its original layout, computing what it computed before
    assert not runtime.is_patched(model)
    assert all(p.is_contiguous() for p in model.parameters())
    with torch.no_grad():
        assert torch.equal(model(input_ids=prompts).logits, before)


def test_run_bench_realised_sparsity_is_that_of_the_runtime():
    model = tiny_model("llama")
    prompts = torch.randint(4, 90, (1, 8))
    art = make_artifact(model, tau_in=0.05, tau_mid=0.05)
    r = run_bench(model, art, prompts, BenchConfig(batch=1, prompt_tokens=8, new_tokens=5, reps=1, warmup=0))
    runtime.apply(model, art)
    model.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=5, min_new_tokens=5,
                   do_sample=False, pad_token_id=0)
    expected = runtime.stats(model)
    assert r["mlp_reads_saved"] == pytest.approx(expected["mlp_reads_saved"])
    assert r["mlp_sparsity"] == pytest.approx(expected["mlp_sparsity"])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    model = tiny_checkpoint(root / "ckpt")
    art = make_artifact(model, tau_in=0.05, tau_mid=0.05, lam=-0.5, tau_s=0.5)
    # the calibration documents of the baselines that need activations (clada bench --method teal ...)
    art.recipe = {"data": str(root / "docs.txt"), "prompt_tokens": 8, "scored_tokens": 16,
                  "calibration": {"activation_tokens": 64, "search_docs": 2}}
    save_artifact(art, root / "clada.safetensors")
    (root / "docs.txt").write_text("\n\n".join(synthetic_documents(10, 80)))
    return root


@pytest.mark.parametrize("method", list(METHODS))
def test_bench_cli_times_every_registered_method(checkpoint, method):
    """clada bench --method NAME [--sparsity Q]: every method runs through runtime.apply and is timed."""
    spec = METHODS[method]
    args = ["--sparsity", "0.3"] if spec.needs == "sparsity" else []
    out = checkpoint / f"bench-{method}.json"
    result = CliRunner().invoke(main, ["bench", "--model", str(checkpoint / "ckpt"), "--method", method, *args,
                                       "--artifact", str(checkpoint / "clada.safetensors"),
                                       "--data", str(checkpoint / "docs.txt"), "--prompt-tokens", "8",
                                       "--new-tokens", "3", "--reps", "1", "--warmup", "0", "--json", str(out)])
    assert result.exit_code == 0, result.output
    figures = json.loads(out.read_text())
    assert figures["method"] == method and figures["dense_tok_s"] > 0 and figures["clada_tok_s"] > 0
    rule = {"dense": "dense", "cats": "cats", "griffin": "griffin"}.get(method, "threshold")
    assert figures["rule"] == rule
    if method != "dense":
        assert figures["mlp_reads_saved"] > 0
    if rule == "threshold":  # gathered by a kernel backend; the others run the masked reference
        assert figures["fast_path"]["masked"] == 0 and figures["layout_ratio"] > 0
    if figures["dense_products"] is not None and native.gather_kernel() is not None:  # head and attention projections
        assert figures["dense_products"]["calls"]["native"] > 0 and "dense product" in result.output


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_bench_cli_writes_json_with_sweep(checkpoint, cache):
    out = checkpoint / "bench.json"
    result = CliRunner().invoke(main, ["bench", "--model", str(checkpoint / "ckpt"),
                                       "--artifact", str(checkpoint / "clada.safetensors"),
                                       "--data", str(checkpoint / "docs.txt"), "--prompt-tokens", "8",
                                       "--new-tokens", "4", "--reps", "1", "--warmup", "0", "--cache", cache,
                                       "--sweep", "16,32", "--sweep-new-tokens", "3", "--json", str(out)])
    assert result.exit_code == 0, result.output
    figures = json.loads(out.read_text())
    assert KEYS <= set(figures) and figures["batch"] == 1 and figures["prompt_tokens"] == 8
    assert figures["cache"] == cache and figures["mlp_reads_saved"] > 0
    assert [row["prompt_tokens"] for row in figures["sweep"]] == [16, 32]
    for row in figures["sweep"]:  # MLP time is measured inside the timed decode steps, so it is a part of them
        assert all(0 < row["mlp_step_ms"][m] < row["step_ms"][m] for m in ("dense", "clada"))
    assert "ratio" in result.output and "long-context sweep" in result.output


@pytest.mark.parametrize("args,match", [
    (["--sweep", "512,abc"], "--sweep: expected"),
    (["--sweep", "0"], "--sweep"),
    (["--prompt-tokens", "100000"], "needs"),
])
def test_bench_cli_bad_input_exits_2(checkpoint, args, match):
    result = CliRunner().invoke(main, ["bench", "--model", str(checkpoint / "ckpt"),
                                       "--artifact", str(checkpoint / "clada.safetensors"),
                                       "--data", str(checkpoint / "docs.txt")] + args)
    assert result.exit_code == 2 and match in result.output


def test_bench_cli_missing_artifact_exits_2(checkpoint, tmp_path):
    result = CliRunner().invoke(main, ["bench", "--model", str(checkpoint / "ckpt"),
                                       "--artifact", str(tmp_path / "none.safetensors")])
    assert result.exit_code == 2 and "none.safetensors" in result.output
