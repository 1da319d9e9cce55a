"""Rotary position embedding in the "rotate half" layout Hugging Face Llama uses, looked up by absolute position.

The cos/sin tables are computed once for every position up to max_model_len, in float32 with the same
expressions as transformers, so that the rotations match it bit for bit before the cast to the model dtype.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from tessera.model_config import CheckpointError


def inverse_frequencies(head_dim: int, theta: float, scaling: dict[str, Any] | None) -> torch.Tensor:
    """[head_dim // 2] float32 angular frequencies, after the checkpoint's scaling."""
    rope_type = scaling["rope_type"] if scaling else "default"
    if rope_type == "dynamic":
        # Hugging Face grows the base with the current sequence length, but a paged KV cache holds keys that were
        # rotated once and cannot be re-rotated. So, like vLLM, scale the base once for the longest context
        # (original length * factor). Short sequences therefore see different angles than in transformers.
        factor, original = scaling["factor"], scaling["original_max_position_embeddings"]
        max_len = original * factor
        theta = theta * ((factor * max_len / original) - (factor - 1)) ** (head_dim / (head_dim - 2))
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).to(torch.float) / head_dim))
    if rope_type in ("default", "dynamic"):
        return inv_freq
    if rope_type == "linear":
        return inv_freq / scaling["factor"]
    if rope_type == "llama3":
        return _llama3(inv_freq, scaling)
    raise CheckpointError(f"rope scaling type '{rope_type}' is not supported (default, linear, dynamic, llama3)")


def _llama3(inv_freq: torch.Tensor, scaling: dict[str, Any]) -> torch.Tensor:
    """Llama 3.1: keep high frequencies, divide low ones by `factor`, blend smoothly in between."""
    factor = scaling["factor"]
    low_freq_factor, high_freq_factor = scaling["low_freq_factor"], scaling["high_freq_factor"]
    original = scaling["original_max_position_embeddings"]
    low_freq_wavelen = original / low_freq_factor
    high_freq_wavelen = original / high_freq_factor

    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (original / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, max_len: int, theta: float, scaling: dict[str, Any] | None):
        super().__init__()
        self.head_dim, self.max_len, self.theta, self.scaling = head_dim, max_len, theta, scaling
        self.register_buffer("cos_sin_cache", self.compute_cache(), persistent=False)

    def compute_cache(self) -> torch.Tensor:
        """[max_len, head_dim]: cos of every (position, frequency) in the first half, sin in the second."""
        inv_freq = inverse_frequencies(self.head_dim, self.theta, self.scaling)
        freqs = torch.outer(torch.arange(self.max_len, dtype=torch.float), inv_freq)
        return torch.cat((freqs.cos(), freqs.sin()), dim=-1)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [num_tokens, 1, head_dim // 2] for `positions` [num_tokens]; looked up once, used by every layer."""
        cos, sin = self.cos_sin_cache[positions].to(dtype).unsqueeze(1).chunk(2, dim=-1)
        return cos, sin


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [num_tokens, heads, head_dim] rotated; same as x * cat(cos, cos) + rotate_half(x) * cat(sin, sin)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
