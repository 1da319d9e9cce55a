"""Which model class runs which Hugging Face architecture (the `architectures[0]` of config.json)."""
from __future__ import annotations

from torch import nn

from tessera.model_config import CheckpointError
from tessera.worker.models.llama import LlamaForCausalLM

MODEL_REGISTRY: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
    "Qwen3ForCausalLM": LlamaForCausalLM,
}


def model_class(architecture: str) -> type[nn.Module]:
    if architecture not in MODEL_REGISTRY:
        raise CheckpointError(f"architecture '{architecture}' is not supported ({', '.join(MODEL_REGISTRY)})")
    return MODEL_REGISTRY[architecture]
