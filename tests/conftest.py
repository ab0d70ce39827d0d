"""Shared fixtures: tiny random models of each MLP family, a word-level tokenizer, synthetic text."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, OPTConfig, PreTrainedTokenizerFast

from clada import runtime
from clada.artifacts import Artifact
from clada.calibrate.measure import channel_scales

WORDS = [f"w{i}" for i in range(90)]
VOCAB = 128


def tiny_config(family: str):
    common = dict(vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if family == "llama":
        return LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, max_position_embeddings=256, **common)
    if family == "gpt2":
        return GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=256, **common)
    if family == "opt":
        return OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                         max_position_embeddings=256, word_embed_proj_dim=32, **common)
    raise ValueError(family)


def tiny_model(family: str, seed: int = 0):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family))
    return model.eval()


FAMILIES = ["llama", "gpt2", "opt"]


@pytest.fixture(params=FAMILIES)
def family_model(request):
    return tiny_model(request.param)


def make_artifact(model, tau_in: float | torch.Tensor = 0.0, tau_mid: float | torch.Tensor = 0.0,
                  lam: float = 0.0, gam: float = 0.0, tau_s: float = 1.0, tau_H: float = 1.0,
                  score: str = "wina") -> Artifact:
    """An artifact for ``model`` with the given thresholds (scalars broadcast over layers)."""
    adapter = runtime.adapter_for(model)
    scale_in, scale_mid = channel_scales(model, adapter, score)
    L = scale_in.shape[0]
    as_layers = lambda v: (v if isinstance(v, torch.Tensor) else torch.full((L,), float(v))).float()
    return Artifact(as_layers(tau_in), as_layers(tau_mid), scale_in, scale_mid,
                    runtime.mlp_fingerprint(model, adapter), lam=lam, gam=gam, tau_s=tau_s, tau_H=tau_H,
                    model=runtime.model_identity(model, adapter))


def word_tokenizer() -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[PAD]": 0, "[BOS]": 1, "[EOS]": 2, "[UNK]": 3}
    vocab.update({w: i + 4 for i, w in enumerate(WORDS)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                   bos_token="[BOS]", eos_token="[EOS]")


def synthetic_documents(n: int, words: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS[: 10 + (d % 80)]) for _ in range(words)) for d in range(n)]
