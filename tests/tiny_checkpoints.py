"""Tiny random-weight Hugging Face checkpoints, built locally with transformers (no model hub needed).

`PRESETS` names one checkpoint per model feature worth testing; `preset_checkpoint` builds each once per session.
Weights are drawn with a large std (and norms and biases are randomized too) so that logits are well separated,
greedy decoding is not a coin toss between near ties, and a weight loaded into the wrong place shows.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

TINY = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    vocab_size=256, max_position_embeddings=256, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2,
    tie_word_embeddings=False,
)

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               # With head_dim 16 this puts frequencies in all three bands: kept, smoothed and divided.
               "original_max_position_embeddings": 64}

PRESETS: dict[str, dict[str, Any]] = {
    "llama": dict(arch="llama"),
    "llama_tied": dict(arch="llama", tie_word_embeddings=True),
    "llama_mqa": dict(arch="llama", num_key_value_heads=1),
    "llama_bias": dict(arch="llama", attention_bias=True, mlp_bias=True),
    # Written with the transformers 4 keys (torch_dtype, rope_theta, rope_scaling), as most real checkpoints are.
    "llama3_rope": dict(arch="llama", rope_scaling=LLAMA3_ROPE, rope_theta=10000.0, legacy_config=True),
    "mistral": dict(arch="mistral", sliding_window=8),
    "qwen2": dict(arch="qwen2"),
    "qwen2_sliding": dict(arch="qwen2", use_sliding_window=True, sliding_window=8, max_window_layers=1),
    "qwen3": dict(arch="qwen3", head_dim=32),
}

GENERATION = dict(bos_token_id=1, eos_token_id=[2, 3], do_sample=True, temperature=0.7, top_p=0.9, top_k=20)


def make_tiny_checkpoint(path: str | Path, arch: str, *, shards: int = 1, dtype: str = "float32",
                         legacy_config: bool = False, generation: dict | None = None, seed: int = 0,
                         std: float = 0.15, **overrides) -> Path:
    """Save a random `arch` model ("llama", "mistral", "qwen2", "qwen3") to `path` with `save_pretrained`.

    overrides: config fields; rope_theta / rope_scaling are accepted and become transformers 5 rope_parameters.
    shards: split the weights over (at least) this many safetensors files with an index. legacy_config: rewrite config.json
    with the transformers 4 keys afterwards.
    """
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM
    from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM
    from transformers.utils import logging

    logging.disable_progress_bar()

    config_class, model_class = {
        "llama": (LlamaConfig, LlamaForCausalLM), "mistral": (MistralConfig, MistralForCausalLM),
        "qwen2": (Qwen2Config, Qwen2ForCausalLM), "qwen3": (Qwen3Config, Qwen3ForCausalLM),
    }[arch]
    fields = {**TINY, **overrides}
    rope = {"rope_type": "default", **(fields.pop("rope_scaling", None) or {})}
    rope["rope_theta"] = fields.pop("rope_theta", 10000.0)
    if arch == "qwen3":
        fields.setdefault("head_dim", fields["hidden_size"] // fields["num_attention_heads"])
    config = config_class(**fields, rope_parameters=rope)

    torch.manual_seed(seed)
    model = model_class(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.normal_(1.0, 0.2)
            else:
                param.normal_(0.0, std)
    model = model.to(getattr(torch, dtype))
    model.generation_config = GenerationConfig(**(GENERATION if generation is None else generation))

    path = Path(path)
    total_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    model.save_pretrained(path, max_shard_size=total_bytes // shards + 1 if shards > 1 else "50GB")
    if legacy_config:
        _rewrite_legacy(path / "config.json")
    return path


def _rewrite_legacy(config_path: Path) -> None:
    """transformers 5 keys -> the transformers 4 ones real checkpoints carry."""
    config = json.loads(config_path.read_text())
    config["torch_dtype"] = config.pop("dtype")
    rope = dict(config.pop("rope_parameters"))
    config["rope_theta"] = rope.pop("rope_theta")
    config["rope_scaling"] = None if rope.get("rope_type") == "default" else rope
    config_path.write_text(json.dumps(config, indent=2))


_built: dict[str, Path] = {}


def preset_checkpoint(tmp_path_factory, name: str, **extra) -> Path:
    """The checkpoint for PRESETS[name] (plus `extra` arguments), built once per test session."""
    key = f"{name}{sorted(extra.items())}"
    if key not in _built:
        path = tmp_path_factory.mktemp(name)
        _built[key] = make_tiny_checkpoint(path, **{**PRESETS[name], **extra})
    return _built[key]
