"""Shared fixtures: tiny random models of each MLP family, a word-level tokenizer, synthetic text."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from clada import runtime
from clada.artifacts import Artifact
from clada.calibrate.measure import channel_weights
from clada.runtime import selection
from clada.runtime.backends import first_gathering

WORDS = [f"w{i}" for i in range(90)]
GATHER = first_gathering(torch.device("cpu"), torch.float32, 8).name  # what a named gathering backend runs here
VOCAB = 128


_LLAMA_LIKE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=256)
_HEAD8 = dict(_LLAMA_LIKE, head_dim=8)
_NEOX_LIKE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=256)
# config.model_type -> (transformers config class, its tiny settings); one entry per registered family.
TINY_CONFIGS: dict[str, tuple[str, dict]] = {
    "llama": ("LlamaConfig", _LLAMA_LIKE),
    "mistral": ("MistralConfig", dict(_LLAMA_LIKE, sliding_window=None)),
    "qwen2": ("Qwen2Config", _LLAMA_LIKE),
    "qwen3": ("Qwen3Config", _HEAD8),
    "gemma": ("GemmaConfig", _HEAD8),
    "gemma2": ("Gemma2Config", dict(_HEAD8, sliding_window=16)),
    "gemma3_text": ("Gemma3TextConfig", dict(_HEAD8, sliding_window=16)),
    "granite": ("GraniteConfig", dict(_LLAMA_LIKE, residual_multiplier=0.5)),
    "olmo2": ("Olmo2Config", _LLAMA_LIKE),
    "phi3": ("Phi3Config", _LLAMA_LIKE),
    "opt": ("OPTConfig", dict(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                              max_position_embeddings=256, word_embed_proj_dim=32)),
    "gpt2": ("GPT2Config", dict(n_embd=32, n_layer=2, n_head=4, n_positions=256)),
    "gpt_neox": ("GPTNeoXConfig", _NEOX_LIKE),
    "phi": ("PhiConfig", _NEOX_LIKE),
    "falcon": ("FalconConfig", dict(hidden_size=32, ffn_hidden_size=64, num_hidden_layers=2, num_attention_heads=4)),
}


def fixed_timing(sparse_ms: float, dense_ms: float = 1.0, dense_rows_ms: float | None = None):
    """A stand-in for ``selection.measure`` reporting the same milliseconds per call for every case."""
    def measure(workload, gather, rows, density, dtype, device, clock=None, reps=None, graphs=False):
        return selection.Timing(rows, density, dense_ms, dense_ms if dense_rows_ms is None else dense_rows_ms,
                                sparse_ms)
    return measure


def fixed_product_timing(native_ms: float, torch_ms: float = 1.0):
    """A stand-in for ``selection.measure_products`` reporting the same milliseconds per call for every case."""
    def measure(weights, rows, clock=None, reps=None):
        return selection.ProductTiming(rows, torch_ms, native_ms)
    return measure


def fixed_wide_timing(float32_ms: float, torch_ms: float = 1.0):
    """A stand-in for ``selection.measure_wide`` reporting the same milliseconds per call for every case."""
    return lambda weight, clock=None, reps=None: {"torch": torch_ms, "float32": float32_ms}


@pytest.fixture(autouse=True)
def gathering_pays(monkeypatch, tmp_path):
    """``backend="auto"`` times dense against gathering per machine (runtime.selection), and a tiny random
    model's timings are noise: every test runs as on a machine where gathering pays, and where the compiled dense
    product beats torch's (runtime.dense_products), and where the dense calls of a re-laid weight run torch's product
    (runtime.selection.choose_wide_product), with its own timing cache. tests/test_selection.py and
    tests/test_dense_products.py test the measurements and the decisions themselves."""
    monkeypatch.setattr(selection, "measure", fixed_timing(0.5))
    monkeypatch.setattr(selection, "measure_products", fixed_product_timing(native_ms=0.5))
    monkeypatch.setattr(selection, "measure_wide", fixed_wide_timing(float32_ms=1.0))  # torch's product on re-laid weights
    monkeypatch.setattr(selection, "_cache_file", lambda device: tmp_path / "selection-cache.json")


def tiny_config(family: str):
    """A tiny random-model config (2 layers, hidden 32, intermediate 64, vocabulary VOCAB) of ``family``."""
    import transformers

    if family not in TINY_CONFIGS:
        raise ValueError(family)
    cls_name, settings = TINY_CONFIGS[family]
    return getattr(transformers, cls_name)(vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                           **settings)


def tiny_model(family: str, seed: int = 0, **config):
    """A random ``family`` model of ``tiny_config`` (``config``: fields to override)."""
    torch.manual_seed(seed)
    cfg = tiny_config(family)
    for key, value in config.items():
        setattr(cfg, key, value)
    model = AutoModelForCausalLM.from_config(cfg)
    return model.eval()


FAMILIES = ["llama", "gpt2", "opt"]


@pytest.fixture(params=FAMILIES)
def family_model(request):
    return tiny_model(request.param)


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a module of tiny-model tests: thread hand-offs would dominate (5x on a busy host)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_artifact(model, tau_in: float | torch.Tensor = 0.0, tau_mid: float | torch.Tensor = 0.0,
                  lam: float = 0.0, gam: float = 0.0, tau_s: float = 1.0, tau_H: float = 1.0,
                  score: str = "wina") -> Artifact:
    """An artifact for ``model`` with the given thresholds (scalars broadcast over layers)."""
    adapter = runtime.adapter_for(model)
    weight_in, weight_mid = channel_weights(model, adapter, score)
    L = weight_in.shape[0]
    as_layers = lambda v: (v if isinstance(v, torch.Tensor) else torch.full((L,), float(v))).float()
    return Artifact(as_layers(tau_in), as_layers(tau_mid), weight_in, weight_mid,
                    runtime.mlp_fingerprint(model, adapter), lam=lam, gam=gam, tau_s=tau_s, tau_H=tau_H,
                    model=runtime.model_identity(model, adapter))


def word_tokenizer() -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[PAD]": 0, "[BOS]": 1, "[EOS]": 2, "[UNK]": 3}
    vocab.update({w: i + 4 for i, w in enumerate(WORDS)})
    # single characters too (ids after the words): transformers rebuilds the tokenizer of a qwen2 checkpoint as
    # Qwen2Tokenizer (byte-level BPE from this vocabulary, no merges), which then still finds "w", "1", "2", ...
    vocab.update({c: len(WORDS) + 4 + i for i, c in enumerate("w0123456789")})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                   bos_token="[BOS]", eos_token="[EOS]")


def synthetic_documents(n: int, words: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS[: 10 + (d % 80)]) for _ in range(words)) for d in range(n)]


class MaskRecorder:
    """Records what a patched model's gates see at every sparse call, and recomputes the masks from it.

    Per layer and sparse call (threshold multiplier set): the MLP input x entering the input projections,
    the intermediate h entering the output projection, and the per-row multiplier. ``check`` then asserts
    that the runtime's realised sparsity is the share of channels those recomputed masks skip, and that h
    was computed from the input-masked x (skipped entries replaced by the artifact's ``center_in`` if it has one).
    """

    def __init__(self, model):
        self.model = model
        self.adapter = runtime.adapter_for(model)
        self.calls: list[list[dict]] = []
        self.hooks = []
        for part in self.adapter.mlp_parts(model):
            calls: list[dict] = []
            self.calls.append(calls)

            def grab_x(module, args, calls=calls):
                m = runtime.multiplier(model)
                if m is not None:
                    calls.append({"x": args[0].detach().clone(), "multiplier": m.detach().clone()})

            def grab_h(module, args, calls=calls):
                if runtime.multiplier(model) is not None:
                    calls[-1]["h"] = args[0].detach().clone()

            self.hooks.append(getattr(part.owner, part.in_names[0]).register_forward_pre_hook(grab_x))
            self.hooks.append(getattr(part.owner, part.out_name).register_forward_pre_hook(grab_h))

    def close(self) -> None:
        for hook in self.hooks:
            hook.remove()

    def expected(self, artifact: Artifact) -> tuple[list[float], list[float]]:
        """Per-layer skipped share of input channels and of intermediate neurons over all recorded rows.

        Also asserts that each recorded h equals the dense intermediate of the input-masked x; call it
        after ``runtime.remove`` so that the dense projections compute that reference.
        """
        skipped_in, skipped_mid = [], []
        center_of = lambda side, l: 0.0 if artifact.center(side) is None else artifact.center(side)[l]
        for l, (part, calls) in enumerate(zip(self.adapter.mlp_parts(self.model), self.calls)):
            keep_in, keep_mid = [], []
            c_in, c_mid = center_of("in", l), center_of("mid", l)  # compensation: scored as x - c, a skipped entry is c
            for call in calls:
                x, h = call["x"], call["h"]
                m = call["multiplier"].reshape(x.shape[:-1] + (1,))
                k_in = (x - c_in).abs() * artifact.channel_weight_in[l] > artifact.tau_base_in[l] * m
                x_in = torch.where(k_in, x, torch.as_tensor(c_in, dtype=x.dtype))
                with torch.no_grad():
                    torch.testing.assert_close(h, self.adapter.intermediate(part, x_in), rtol=1e-4, atol=1e-5)
                keep_in.append(k_in.reshape(-1, x.shape[-1]))
                keep_mid.append(((h - c_mid).abs() * artifact.channel_weight_mid[l] > artifact.tau_base_mid[l] * m)
                                .reshape(-1, h.shape[-1]))
            skipped_in.append(1 - torch.cat(keep_in).float().mean().item())
            skipped_mid.append(1 - torch.cat(keep_mid).float().mean().item())
        return skipped_in, skipped_mid

    def check(self, stats: dict, artifact: Artifact) -> None:
        """Assert the realised per-layer sparsity in ``stats`` is what the recomputed masks say."""
        skipped_in, skipped_mid = self.expected(artifact)
        rows = sum(c["x"].reshape(-1, c["x"].shape[-1]).shape[0] for c in self.calls[0])
        assert stats["tokens"] == rows > 0
        assert stats["per_layer"]["input_sparsity"] == pytest.approx(skipped_in, abs=1e-5)  # stats round to 5 digits
        assert stats["per_layer"]["mlp_sparsity"] == pytest.approx(skipped_mid, abs=1e-5)


def run_recipe(root, recipe: dict) -> str:
    """Write ``recipe`` to ``root/recipe.yaml`` and run ``clada-calibrate`` on it in process; returns its output."""
    import yaml
    from click.testing import CliRunner

    from clada.calibrate.cli import calibrate_main

    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    result = CliRunner().invoke(calibrate_main, [str(root / "recipe.yaml"), "--quiet"])
    assert result.exit_code == 0, result.output
    return result.output


def tiny_recipe(root, model: str, trials: int = 6, max_ppl_increase: float = 0.05, allocation: str = "marginal") -> dict:
    """A small recipe calibrating ``model`` on synthetic text (written to ``root/docs.txt``), output ``root/out``."""
    (root / "docs.txt").write_text("\n\n".join(synthetic_documents(40, 60)))
    return {
        "model": model, "data": str(root / "docs.txt"), "output": str(root / "out"),
        "prompt_tokens": 16, "scored_tokens": 24,
        "calibration": {"activation_tokens": 128, "search_docs": 4, "q_in": [0.0, 0.2], "q_mid": [0.0, 0.3]},
        "search": {"trials": trials, "max_ppl_increase": max_ppl_increase, "allocation": allocation},
        "eval": {"heldout_docs": 4, "batch_size": 4},
    }


def tiny_checkpoint(folder, family: str = "llama"):
    """Save ``tiny_model(family)`` and the word tokenizer as a checkpoint folder; returns the model."""
    model = tiny_model(family)
    model.save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    return model


def tiny_job(root, family: str = "llama", trials: int = 6, max_ppl_increase: float = 0.05,
             allocation: str = "marginal") -> dict:
    """Write ``root/ckpt`` (``tiny_model(family)`` + word tokenizer) and ``root/docs.txt`` (synthetic text);
    return a recipe (dict) calibrating them quickly into ``root/out``."""
    tiny_checkpoint(root / "ckpt", family)
    return tiny_recipe(root, str(root / "ckpt"), trials, max_ppl_increase, allocation)


def calibrate_tiny(root, family: str = "llama", trials: int = 6, max_ppl_increase: float = 0.05,
                   allocation: str = "marginal") -> str:
    """Calibrate ``tiny_job(root, family, ...)`` through ``clada-calibrate``, in process; returns its output.

    Besides ``root/ckpt`` and ``root/docs.txt`` it writes ``root/recipe.yaml`` and the job's outputs in ``root/out``.
    """
    return run_recipe(root, tiny_job(root, family, trials, max_ppl_increase, allocation))


def load_script(name: str):
    """The module of ``benchmarks/<name>.py`` (benchmarks/ is not a package), imported from its file."""
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
