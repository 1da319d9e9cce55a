"""Store each new token's keys and values into the paged cache at its slot (block_id * block_size + offset).

One program per token moves all its KV heads at once. A negative slot means "write nowhere": CUDA graph padding
rows use it. Slots are int64 and the cache offset is computed in 64 bits, since a large cache has more than
2**31 elements.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _kv_write_kernel(
    k_ptr, v_ptr, key_cache_ptr, value_cache_ptr, slot_mapping_ptr,
    num_kv_heads, block_size,
    stride_kt, stride_kh, stride_vt, stride_vh,  # k and v may be strided views of the fused qkv output
    stride_cb, stride_cs, stride_ch,  # caches: [num_blocks, block_size, num_kv_heads, head_dim]
    HEAD_DIM: tl.constexpr,
    HEADS_PAD: tl.constexpr,
    HEAD_PAD: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot < 0:
        return
    h = tl.arange(0, HEADS_PAD)[:, None]
    d = tl.arange(0, HEAD_PAD)[None, :]
    mask = (h < num_kv_heads) & (d < HEAD_DIM)
    dst = (slot // block_size) * stride_cb + (slot % block_size) * stride_cs + h * stride_ch + d
    k = tl.load(k_ptr + token * stride_kt + h * stride_kh + d, mask=mask)
    v = tl.load(v_ptr + token * stride_vt + h * stride_vh + d, mask=mask)
    tl.store(key_cache_ptr + dst, k.to(key_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(value_cache_ptr + dst, v.to(value_cache_ptr.dtype.element_ty), mask=mask)


def kv_write(
    k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    v: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    key_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    value_cache: torch.Tensor,  # same shape and strides as key_cache
    slot_mapping: torch.Tensor,  # int64 [num_tokens]; < 0: skip the token
) -> None:
    num_tokens, num_kv_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    assert key_cache.stride() == value_cache.stride(), "key and value caches must share one layout"
    assert k.stride(2) == 1 and v.stride(2) == 1 and key_cache.stride(3) == 1
    _kv_write_kernel[(num_tokens,)](
        k, v, key_cache, value_cache, slot_mapping,
        num_kv_heads, key_cache.shape[1],
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        HEAD_DIM=head_dim, HEADS_PAD=triton.next_power_of_2(num_kv_heads), HEAD_PAD=triton.next_power_of_2(head_dim),
    )
