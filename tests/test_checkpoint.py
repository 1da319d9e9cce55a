"""Reading checkpoint directories: config parsing, safetensors (plain and sharded), dtypes, and clear errors."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_checkpoints import preset_checkpoint

from tessera.worker.attention.torch_backend import TorchAttentionBackend
from tessera.worker.checkpoint import CheckpointError, checkpoint_files, iter_weights, load_model
from tessera.model_config import ModelConfig


def editable_copy(tmp_path_factory, tmp_path: Path, preset: str, **extra) -> Path:
    """A private copy of a preset checkpoint that a test may damage."""
    return Path(shutil.copytree(preset_checkpoint(tmp_path_factory, preset, **extra), tmp_path / "ckpt"))


def write_config(tmp_path: Path, **fields) -> Path:
    config = dict(architectures=["LlamaForCausalLM"], hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=256, max_position_embeddings=256,
                  hidden_act="silu")
    config.update(fields)  # a field set to ... is left out
    (tmp_path / "config.json").write_text(json.dumps({k: v for k, v in config.items() if v is not ...}))
    return tmp_path


# --- config.json / generation_config.json ---------------------------------------------------------------------


def test_config_of_a_llama_checkpoint(tmp_path_factory):
    config = ModelConfig.from_pretrained(preset_checkpoint(tmp_path_factory, "llama"))
    assert config.architecture == "LlamaForCausalLM"
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (64, 2, 4)
    assert (config.num_key_value_heads, config.head_dim, config.vocab_size) == (2, 16, 256)
    assert config.max_model_len == 256 and config.rope_theta == 10000.0 and config.rope_scaling is None
    assert config.dtype == torch.float32
    assert not (config.tie_word_embeddings or config.attention_bias or config.qk_norm)
    assert config.sliding_window is None
    assert config.eos_token_ids == [2, 3]  # config.json says 2, generation_config.json [2, 3]
    assert config.bos_token_id == 1
    assert config.generation_defaults == {"temperature": 0.7, "top_p": 0.9, "top_k": 20}
    assert config.kv_bytes_per_token == 2 * 2 * 2 * 16 * 4


def test_config_flags_per_architecture(tmp_path_factory):
    def config(preset):
        return ModelConfig.from_pretrained(preset_checkpoint(tmp_path_factory, preset))

    qwen2, qwen3 = config("qwen2"), config("qwen3")
    assert qwen2.attention_bias and not qwen2.qk_norm and qwen2.sliding_window is None
    assert qwen3.qk_norm and not qwen3.attention_bias and qwen3.head_dim == 32
    mistral = config("mistral")
    assert mistral.sliding_window == 8 and [mistral.layer_sliding_window(i) for i in range(2)] == [8, 8]
    qwen2_sliding = config("qwen2_sliding")
    assert [qwen2_sliding.layer_sliding_window(i) for i in range(2)] == [None, 8]
    assert config("llama_tied").tie_word_embeddings
    assert config("llama_mqa").num_key_value_heads == 1


def test_transformers4_config_keys(tmp_path_factory):
    config = ModelConfig.from_pretrained(preset_checkpoint(tmp_path_factory, "llama3_rope"))
    assert config.rope_theta == 10000.0
    assert config.rope_scaling == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 64}


def test_handwritten_legacy_config(tmp_path):
    write_config(tmp_path, architectures=["Qwen2ForCausalLM"], torch_dtype="bfloat16", rope_theta=1e6,
                 rope_scaling=None, use_sliding_window=False, sliding_window=4096, eos_token_id=[5, 6],
                 tie_word_embeddings=True, auto_map={"AutoModelForCausalLM": "evil.Model"})
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 6, "repetition_penalty": 1.05,
                                                                 "max_new_tokens": 64, "top_k": None}))
    config = ModelConfig.from_pretrained(tmp_path)
    assert config.dtype == torch.bfloat16 and config.rope_theta == 1e6 and config.rope_scaling is None
    assert config.sliding_window is None and config.attention_bias and config.tie_word_embeddings
    assert config.eos_token_ids == [5, 6]
    assert config.generation_defaults == {"repetition_penalty": 1.05, "max_new_tokens": 64}


@pytest.mark.parametrize("rope_key", ["rope_scaling", "rope_parameters"])
def test_rope_scaling_is_normalized(tmp_path, rope_key):
    write_config(tmp_path, **{rope_key: {"type": "linear", "factor": 2.0}})
    assert ModelConfig.from_pretrained(tmp_path).rope_scaling == {"rope_type": "linear", "factor": 2.0}
    write_config(tmp_path, **{rope_key: {"rope_type": "dynamic", "factor": 2.0}})
    config = ModelConfig.from_pretrained(tmp_path)
    assert config.rope_scaling["rope_type"] == "dynamic"
    assert config.max_model_len == 512  # the base is scaled once for the longer context


def test_dtype_argument_overrides_the_config(tmp_path):
    write_config(tmp_path, dtype="bfloat16")
    assert ModelConfig.from_pretrained(tmp_path).dtype == torch.bfloat16
    assert ModelConfig.from_pretrained(tmp_path, "float16").dtype == torch.float16
    assert ModelConfig.from_pretrained(tmp_path, torch.float32).dtype == torch.float32
    assert ModelConfig.from_pretrained(tmp_path, "auto").dtype == torch.bfloat16
    with pytest.raises(ValueError, match="dtype"):
        ModelConfig.from_pretrained(tmp_path, "int8")


@pytest.mark.parametrize("fields, words", [
    ({"architectures": ["GPT2LMHeadModel"]}, ["config.json", "GPT2LMHeadModel"]),
    ({"hidden_act": "gelu"}, ["config.json", "hidden_act", "gelu"]),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, ["config.json", "yarn"]),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, ["config.json", "low_freq_factor"]),
    ({"vocab_size": ...}, ["config.json", "vocab_size"]),
    ({"torch_dtype": "float64"}, ["config.json", "float64"]),
])
def test_unsupported_config_is_a_clear_error(tmp_path, fields, words):
    write_config(tmp_path, **fields)
    with pytest.raises(CheckpointError) as error:
        ModelConfig.from_pretrained(tmp_path)
    for word in words:
        assert word in str(error.value)


def test_missing_or_invalid_config_json(tmp_path):
    with pytest.raises(CheckpointError, match="config.json"):
        ModelConfig.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json"):
        ModelConfig.from_pretrained(tmp_path)
    write_config(tmp_path)
    (tmp_path / "generation_config.json").write_text("[")
    with pytest.raises(CheckpointError, match="generation_config.json"):
        ModelConfig.from_pretrained(tmp_path)


# --- safetensors ----------------------------------------------------------------------------------------------


def test_sharded_checkpoint_loads_the_same_weights(tmp_path_factory):
    backend = TorchAttentionBackend()
    sharded = preset_checkpoint(tmp_path_factory, "qwen2", shards=3)
    assert len(checkpoint_files(sharded)) >= 3
    plain_model, _ = load_model(preset_checkpoint(tmp_path_factory, "qwen2"), backend)
    sharded_model, _ = load_model(sharded, backend)
    torch.testing.assert_close(sharded_model.state_dict(), plain_model.state_dict(), atol=0, rtol=0)


def test_weights_are_loaded_into_fused_projections(tmp_path_factory):
    path = preset_checkpoint(tmp_path_factory, "llama_mqa")
    model, _ = load_model(path, TorchAttentionBackend())
    hf = dict(iter_weights(path))
    qkv = model.layers[1].self_attn.qkv_proj.weight
    expected = torch.cat([hf[f"model.layers.1.self_attn.{p}_proj.weight"] for p in "qkv"])
    assert torch.equal(qkv, expected)
    assert not any(t.is_meta for t in list(model.parameters()) + list(model.buffers()))


def test_tied_embeddings_ignore_a_stored_lm_head(tmp_path_factory, tmp_path):
    path = editable_copy(tmp_path_factory, tmp_path, "llama_tied")
    tensors = load_file(path / "model.safetensors")
    tensors["lm_head.weight"] = torch.zeros_like(tensors["model.embed_tokens.weight"])
    save_file(tensors, path / "model.safetensors")
    model, config = load_model(path, TorchAttentionBackend())
    assert config.tie_word_embeddings and not hasattr(model, "lm_head")
    hidden = torch.randn(3, config.hidden_size)
    torch.testing.assert_close(model.compute_logits(hidden), hidden @ tensors["model.embed_tokens.weight"].T)


@pytest.mark.parametrize("dtype, expected", [(None, torch.bfloat16), ("float32", torch.float32),
                                             (torch.float16, torch.float16), ("bfloat16", torch.bfloat16)])
def test_dtype_of_loaded_weights(tmp_path_factory, dtype, expected):
    path = preset_checkpoint(tmp_path_factory, "qwen3", dtype="bfloat16")
    model, config = load_model(path, TorchAttentionBackend(), dtype=dtype)
    assert config.dtype == expected
    assert {p.dtype for p in model.parameters()} == {expected}


def test_missing_safetensors(tmp_path_factory, tmp_path):
    path = editable_copy(tmp_path_factory, tmp_path, "llama")
    (path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_model(path, TorchAttentionBackend())
    (path / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(CheckpointError, match=r"\.bin"):
        load_model(path, TorchAttentionBackend())


def test_truncated_safetensors(tmp_path_factory, tmp_path):
    path = editable_copy(tmp_path_factory, tmp_path, "llama")
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_model(path, TorchAttentionBackend())


def test_index_naming_a_missing_shard(tmp_path_factory, tmp_path):
    path = editable_copy(tmp_path_factory, tmp_path, "llama", shards=2)
    shard = checkpoint_files(path)[-1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=shard.name):
        load_model(path, TorchAttentionBackend())


def test_wrong_tensor_shape(tmp_path_factory, tmp_path):
    path = editable_copy(tmp_path_factory, tmp_path, "llama")
    tensors = load_file(path / "model.safetensors")
    tensors["model.layers.1.self_attn.k_proj.weight"] = torch.zeros(16, 64)
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(CheckpointError) as error:
        load_model(path, TorchAttentionBackend())
    assert "model.layers.1.self_attn.k_proj.weight" in str(error.value)
    assert "[16, 64]" in str(error.value) and "[32, 64]" in str(error.value)


def test_missing_and_unexpected_tensors(tmp_path_factory, tmp_path):
    path = editable_copy(tmp_path_factory, tmp_path, "qwen3")
    tensors = load_file(path / "model.safetensors")
    del tensors["model.layers.0.self_attn.k_norm.weight"]
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing.*model\.layers\.0\.self_attn\.k_norm\.weight"):
        load_model(path, TorchAttentionBackend())

    tensors["model.layers.0.self_attn.k_norm.weight"] = torch.ones(32)
    tensors["model.layers.0.mlp.extra.weight"] = torch.ones(3)
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"unexpected.*model\.layers\.0\.mlp\.extra\.weight"):
        load_model(path, TorchAttentionBackend())
