"""Rotary position embedding applied in place to q and k, "rotate half" layout, looked up by absolute position.

One program per token rotates all its query and key heads: the cos/sin row is read once, q and k once each, and
nothing is allocated (the eager path builds cos/sin copies, two halves and a concatenation per tensor). The
rotation is computed in float32 from the float32 table and rounded once, so in 16-bit types it can differ from
the eager path (which rounds cos, sin and each product) by one unit in the last place.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rotate(ptr, stride_h, num_heads, cos, sin, HALF: tl.constexpr, HEADS_PAD: tl.constexpr, HALF_PAD: tl.constexpr):
    h = tl.arange(0, HEADS_PAD)[:, None]
    i = tl.arange(0, HALF_PAD)[None, :]
    mask = (h < num_heads) & (i < HALF)
    first = ptr + h * stride_h + i
    x1 = tl.load(first, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(first + HALF, mask=mask, other=0.0).to(tl.float32)
    tl.store(first, (x1 * cos - x2 * sin).to(ptr.dtype.element_ty), mask=mask)
    tl.store(first + HALF, (x2 * cos + x1 * sin).to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_kernel(
    q_ptr, k_ptr, positions_ptr, cos_sin_ptr,
    num_heads, num_kv_heads,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_cs,
    HALF: tl.constexpr,
    HALF_PAD: tl.constexpr,
    Q_HEADS_PAD: tl.constexpr,
    K_HEADS_PAD: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    pos = tl.load(positions_ptr + token).to(tl.int64)
    i = tl.arange(0, HALF_PAD)[None, :]
    row = cos_sin_ptr + pos * stride_cs
    cos = tl.load(row + i, mask=i < HALF, other=0.0)
    sin = tl.load(row + HALF + i, mask=i < HALF, other=0.0)
    _rotate(q_ptr + token * stride_qt, stride_qh, num_heads, cos, sin, HALF, Q_HEADS_PAD, HALF_PAD)
    _rotate(k_ptr + token * stride_kt, stride_kh, num_kv_heads, cos, sin, HALF, K_HEADS_PAD, HALF_PAD)


def apply_rotary_(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim], rotated in place (may be a strided view)
    k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim], rotated in place
    positions: torch.Tensor,  # [num_tokens]
    cos_sin_cache: torch.Tensor,  # float32 [max_len, head_dim]: cos in the first half, sin in the second
) -> None:
    num_tokens, num_heads, head_dim = q.shape
    assert q.stride(2) == 1 and k.stride(2) == 1 and cos_sin_cache.stride(1) == 1
    if num_tokens == 0:
        return
    half = head_dim // 2
    _rotary_kernel[(num_tokens,)](
        q, k, positions, cos_sin_cache,
        num_heads, k.shape[1],
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos_sin_cache.stride(0),
        HALF=half, HALF_PAD=triton.next_power_of_2(half),
        Q_HEADS_PAD=triton.next_power_of_2(num_heads), K_HEADS_PAD=triton.next_power_of_2(k.shape[1]),
    )
