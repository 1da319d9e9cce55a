"""What the engine and the worker need to know about a model, read from a Hugging Face checkpoint directory.

Only config.json and generation_config.json are read; `auto_map` and any Python in the checkpoint are ignored,
so a checkpoint can never run code here. Both config dialects are accepted: transformers 4 (`torch_dtype`,
`rope_theta`, `rope_scaling`), which most checkpoints in the wild use, and transformers 5 (`dtype`,
`rope_parameters`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tessera.int8_checkpoint import Int8Checkpoint, read_int8_checkpoint

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
ARCHITECTURE_BY_MODEL_TYPE = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                              "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
ROPE_TYPES = ("default", "linear", "dynamic", "llama3")
DTYPES = {"float32": torch.float32, "float": torch.float32, "fp32": torch.float32,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "half": torch.float16, "fp16": torch.float16}
GENERATION_DEFAULT_KEYS = ("temperature", "top_p", "top_k", "repetition_penalty", "max_new_tokens")


class CheckpointError(ValueError):
    """A checkpoint directory is missing something, is corrupt, or describes a model we do not support."""


@dataclass
class ModelConfig:
    model_dir: Path
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None  # None for plain RoPE; otherwise always has "rope_type"
    max_model_len: int
    tie_word_embeddings: bool
    attention_bias: bool  # q/k/v projections have a bias
    qk_norm: bool  # RMSNorm on each head of q and k before RoPE (Qwen3)
    sliding_window: int | None
    dtype: torch.dtype
    eos_token_ids: list[int]
    bos_token_id: int | None
    generation_defaults: dict[str, Any]
    o_proj_bias: bool = False  # Llama and Qwen3 put attention_bias on o_proj too; Qwen2 does not
    mlp_bias: bool = False
    # Which layers use the sliding window: all of them for Mistral, the top ones for Qwen (max_window_layers).
    sliding_window_layers: list[bool] = field(default_factory=list)
    int8_checkpoint: Int8Checkpoint | None = None  # int8 ahead of time (compressed-tensors W8A8)

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.num_hidden_layers * self.num_key_value_heads * self.head_dim * self.dtype.itemsize

    def layer_sliding_window(self, layer: int) -> int | None:
        return self.sliding_window if self.sliding_window_layers[layer] else None

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, dtype: str | torch.dtype | None = None) -> ModelConfig:
        model_dir = Path(model_dir)
        config_path = model_dir / "config.json"
        if not config_path.is_file():
            raise CheckpointError(f"{config_path}: not found (is {model_dir} a Hugging Face checkpoint directory?)")
        config = _read_json(config_path)
        generation_path = model_dir / "generation_config.json"
        generation = _read_json(generation_path) if generation_path.is_file() else {}

        def required(key: str) -> Any:
            if config.get(key) is None:
                raise CheckpointError(f"{config_path}: missing field '{key}'")
            return config[key]

        architecture = _architecture(config, config_path)
        if config.get("hidden_act", "silu") != "silu":
            raise CheckpointError(f"{config_path}: hidden_act '{config['hidden_act']}' is not supported (only 'silu')")

        hidden_size, num_heads = required("hidden_size"), required("num_attention_heads")
        num_layers = required("num_hidden_layers")
        max_position_embeddings = required("max_position_embeddings")
        rope_theta, rope_scaling = _rope(config, config_path, max_position_embeddings)
        max_model_len = max_position_embeddings
        if rope_scaling and rope_scaling["rope_type"] == "dynamic":
            # The base is scaled once for the longer context (see rope.py), so that context becomes the limit.
            max_model_len = int(rope_scaling["original_max_position_embeddings"] * rope_scaling["factor"])

        sliding_window, sliding_window_layers = _sliding_window(config, architecture, num_layers)
        # Mistral and Qwen2 hard-code their biases; Llama and Qwen3 read the flag.
        attention_bias = architecture in ("LlamaForCausalLM", "Qwen3ForCausalLM") and bool(config.get("attention_bias"))
        return cls(
            model_dir=model_dir,
            architecture=architecture,
            vocab_size=required("vocab_size"),
            hidden_size=hidden_size,
            intermediate_size=required("intermediate_size"),
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            num_key_value_heads=config.get("num_key_value_heads") or num_heads,
            head_dim=config.get("head_dim") or hidden_size // num_heads,
            rms_norm_eps=config.get("rms_norm_eps", 1e-6),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_model_len=max_model_len,
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            attention_bias=attention_bias or architecture == "Qwen2ForCausalLM",
            qk_norm=architecture == "Qwen3ForCausalLM",
            sliding_window=sliding_window,
            dtype=_dtype(dtype, config, config_path),
            eos_token_ids=_union(_as_list(config.get("eos_token_id")), _as_list(generation.get("eos_token_id"))),
            bos_token_id=_first_not_none(config.get("bos_token_id"), generation.get("bos_token_id")),
            generation_defaults={k: generation[k] for k in GENERATION_DEFAULT_KEYS if generation.get(k) is not None},
            o_proj_bias=attention_bias,
            mlp_bias=architecture == "LlamaForCausalLM" and bool(config.get("mlp_bias", False)),
            sliding_window_layers=sliding_window_layers,
            int8_checkpoint=read_int8_checkpoint(config, config_path, CheckpointError),
        )


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ValueError(f"dtype: {dtype} is not supported (float32, bfloat16 or float16)")
        return dtype
    name = dtype.removeprefix("torch.").lower()
    if name not in DTYPES:
        raise ValueError(f"dtype: '{dtype}' is not supported (float32, bfloat16 or float16)")
    return DTYPES[name]


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def _architecture(config: dict, config_path: Path) -> str:
    architectures = config.get("architectures") or []
    if architectures:
        architecture = architectures[0]
    else:
        architecture = ARCHITECTURE_BY_MODEL_TYPE.get(config.get("model_type"), f"model_type={config.get('model_type')}")
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise CheckpointError(f"{config_path}: architecture '{architecture}' is not supported "
                              f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
    return architecture


def _rope(config: dict, config_path: Path, max_position_embeddings: int) -> tuple[float, dict | None]:
    """(theta, scaling) from either `rope_parameters` (transformers 5) or `rope_theta` + `rope_scaling` (4)."""
    params = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    theta = float(params.pop("rope_theta", None) or config.get("rope_theta") or 10000.0)
    rope_type = params.pop("rope_type", None) or params.pop("type", None) or "default"
    params.pop("type", None)
    if rope_type not in ROPE_TYPES:
        raise CheckpointError(f"{config_path}: rope type '{rope_type}' is not supported ({', '.join(ROPE_TYPES)})")
    if rope_type == "default":
        return theta, None
    required = {"linear": ("factor",), "dynamic": ("factor",),
                "llama3": ("factor", "low_freq_factor", "high_freq_factor")}[rope_type]
    for key in required:
        if params.get(key) is None:
            raise CheckpointError(f"{config_path}: rope scaling '{rope_type}' needs field '{key}'")
    if rope_type in ("llama3", "dynamic"):
        params.setdefault("original_max_position_embeddings", max_position_embeddings)
    return theta, {"rope_type": rope_type, **params}


def _sliding_window(config: dict, architecture: str, num_layers: int) -> tuple[int | None, list[bool]]:
    window = config.get("sliding_window")
    if architecture in ("Qwen2ForCausalLM", "Qwen3ForCausalLM") and not config.get("use_sliding_window", False):
        window = None
    if window is None:
        return None, [False] * num_layers
    if architecture == "MistralForCausalLM":
        return window, [True] * num_layers
    layer_types = config.get("layer_types")
    if layer_types:
        return window, [t == "sliding_attention" for t in layer_types]
    # Qwen puts the window on layers >= max_window_layers only.
    first = config.get("max_window_layers", 0)
    return window, [i >= first for i in range(num_layers)]


def _dtype(requested: str | torch.dtype | None, config: dict, config_path: Path) -> torch.dtype:
    if requested is not None and requested != "auto":
        return parse_dtype(requested)
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    try:
        return parse_dtype(name)
    except ValueError:
        raise CheckpointError(f"{config_path}: dtype '{name}' is not supported (float32, bfloat16 or float16)") from None


def _as_list(value: int | list[int] | None) -> list[int]:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _first_not_none(*values):
    return next((v for v in values if v is not None), None)


def _union(first: list[int], second: list[int]) -> list[int]:
    return list(dict.fromkeys(first + second))
