"""The int8 KV cache (--kv-cache-dtype int8): each token's key (and value) of each KV head is one row of head_dim
int8 values followed by its float32 scale, four bytes, in the same int8 tensor, so that blocks, prefix sharing
and the block tables work unchanged and a kernel finds a row's scale next to its values.

Symmetric, one scale per token and head (absmax / 127, rounded to nearest even): about half the bytes of a
bfloat16 cache (68 for 128), so a decode step reads half as much cache and twice the tokens fit in its memory.
The native paths (kernels/decode_ops_cpu.cpp's KV write, kernels/paged_attention_cpu.cpp) round the same way.
"""
from __future__ import annotations

import torch

SCALE_BYTES = 4  # the float32 after each row's values


def row_width(head_dim: int) -> int:
    """int8 elements per cached row of one head."""
    if head_dim % SCALE_BYTES:
        raise ValueError(f"the int8 KV cache needs head_dim divisible by {SCALE_BYTES}, not {head_dim}")
    return head_dim + SCALE_BYTES


def quantize(x: torch.Tensor) -> torch.Tensor:
    """[..., head_dim] float -> [..., head_dim + 4] int8 rows: the values, then the scale's bytes."""
    x = x.float()
    scale = x.abs().amax(-1, keepdim=True) / 127
    values = torch.round(x / scale.clamp_min(torch.finfo(torch.float32).tiny)).clamp_(-127, 127).to(torch.int8)
    return torch.cat([values, scale.view(torch.int8)], dim=-1)


def dequantize(rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[..., head_dim + 4] int8 rows -> [..., head_dim] in dtype."""
    values, scale = rows[..., :-SCALE_BYTES], rows[..., -SCALE_BYTES:].contiguous().view(torch.float32)
    return (values.float() * scale).to(dtype)
