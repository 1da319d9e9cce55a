"""Paged attention over a flattened mixed batch, in one Triton launch.

Each program owns one tile of one request's query tokens, for one KV head and every query head that shares it
(GQA/MQA: the group's queries are stacked as extra rows, so the keys and values are read once per group). It
walks the request's context through its block table, BLOCK_N positions at a time, with an online softmax
(FlashAttention): keep each row's running max, running sum of exponentials and unnormalized output, rescale
them when the max grows, divide once at the end. A prefill chunk and a decode are the same thing here: query j
of a request sits at position seq_len - q_len + j and sees the keys at positions <= its own (and, with a
sliding window, > its own - window).

The key tile is gathered position by position (block id from the table, then the slot inside the block), so the
tile size does not depend on the block size, and any block table, in any order, works. Block ids are widened to
64 bits before they are multiplied by the block stride: a large cache has more than 2**31 elements.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# A window longer than any context, so "no window" needs no separate code path.
NO_WINDOW = 1 << 30


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    # Triton's interpreter (3.9) multiplies bfloat16 bit patterns as integers in tl.dot. There the operands are
    # widened first; the result is the same, since a GPU also multiplies 16-bit inputs exactly into float32.
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _paged_attention_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr,
    query_start_loc_ptr, seq_lens_ptr, block_tables_ptr,
    scale_log2,  # softmax scale * log2(e): the kernel uses exp2, the hardware's native exponential
    window, block_size,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_cb, stride_cs, stride_ch,  # key and value caches: [num_blocks, block_size, num_kv_heads, head_dim]
    stride_bt,
    GROUP: tl.constexpr,  # query heads per KV head
    GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_PAD: tl.constexpr,
    BLOCK_Q: tl.constexpr,  # query tokens per tile; rows per tile = BLOCK_Q * GROUP_PAD
    BLOCK_N: tl.constexpr,  # context positions per step
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    q_tile, kv_head, req = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    q_start = tl.load(query_start_loc_ptr + req)
    q_len = tl.load(query_start_loc_ptr + req + 1) - q_start
    if q_tile * BLOCK_Q >= q_len:  # the grid is sized for the longest query
        return
    seq_len = tl.load(seq_lens_ptr + req)
    context = seq_len - q_len  # tokens already cached before this step's

    # Row r of the tile: query token r // GROUP_PAD, query head kv_head * GROUP + r % GROUP_PAD.
    rows = tl.arange(0, BLOCK_Q * GROUP_PAD)
    q_idx = q_tile * BLOCK_Q + rows // GROUP_PAD
    head = kv_head * GROUP + rows % GROUP_PAD
    row_ok = (q_idx < q_len) & (rows % GROUP_PAD < GROUP)
    q_pos = context + q_idx
    d = tl.arange(0, HEAD_PAD)
    d_ok = d < HEAD_DIM

    token = (q_start + q_idx).to(tl.int64)
    q_offsets = token[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :]
    q = tl.load(q_ptr + q_offsets, mask=row_ok[:, None] & d_ok[None, :], other=0.0)

    # Only the context some row of this tile can see: from the window start of its first query to its last query.
    first_q = context + q_tile * BLOCK_Q
    hi = tl.minimum(seq_len, first_q + BLOCK_Q)
    lo = tl.maximum(first_q - window + 1, 0)

    # A finite start for the max: a row that sees nothing yet gets exp2(-inf - max) = 0, never NaN.
    row_max = tl.full([BLOCK_Q * GROUP_PAD], -1.0e30, dtype=tl.float32)
    row_sum = tl.zeros([BLOCK_Q * GROUP_PAD], dtype=tl.float32)
    acc = tl.zeros([BLOCK_Q * GROUP_PAD, HEAD_PAD], dtype=tl.float32)
    table = block_tables_ptr + req.to(tl.int64) * stride_bt
    for start in range(lo, hi, BLOCK_N):
        k_pos = start + tl.arange(0, BLOCK_N)
        k_ok = k_pos < hi
        block_id = tl.load(table + k_pos // block_size, mask=k_ok, other=0).to(tl.int64)
        kv_offsets = block_id * stride_cb + (k_pos % block_size) * stride_cs + kv_head * stride_ch  # [BLOCK_N]
        kv_mask = k_ok[:, None] & d_ok[None, :]
        k = tl.load(k_cache_ptr + kv_offsets[:, None] + d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_cache_ptr + kv_offsets[:, None] + d[None, :], mask=kv_mask, other=0.0)

        s = _dot(q, tl.trans(k), PRECISION, UPCAST) * scale_log2
        visible = (k_pos[None, :] <= q_pos[:, None]) & (k_pos[None, :] > q_pos[:, None] - window) & k_ok[None, :]
        s = tl.where(visible, s, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(s, axis=1))
        alpha = tl.exp2(row_max - new_max)  # rescales what was summed under the old max
        p = tl.exp2(s - new_max[:, None])
        row_sum = row_sum * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, PRECISION, UPCAST)
        row_max = new_max

    out = acc / tl.where(row_sum > 0, row_sum, 1.0)[:, None]  # rows that saw nothing (padding) come out as 0
    out_offsets = token[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :]
    tl.store(out_ptr + out_offsets, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


_INTERPRETED = not isinstance(_paged_attention_kernel, triton.runtime.JITFunction)  # TRITON_INTERPRET=1


def paged_attention(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    key_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    value_cache: torch.Tensor,  # same shape and strides as key_cache
    query_start_loc: torch.Tensor,  # int32 [num_reqs + 1]
    seq_lens: torch.Tensor,  # int32 [num_reqs]
    block_tables: torch.Tensor,  # int32 [num_reqs, max_blocks]
    max_query_len: int,  # sizes the grid; a host number so that launching never waits on the device
    scale: float,
    sliding_window: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = key_cache.shape[2]
    assert num_heads % num_kv_heads == 0, "query heads must be a multiple of KV heads"
    assert key_cache.stride() == value_cache.stride(), "key and value caches must share one layout"
    assert q.stride(2) == 1 and key_cache.stride(3) == 1 and block_tables.stride(1) == 1
    out = torch.empty_like(q) if out is None else out
    group = num_heads // num_kv_heads
    group_pad = triton.next_power_of_2(group)
    # tl.dot wants at least 16 rows and 16 columns: decodes get the smallest tile, prefills a bigger one.
    rows = 16 if max_query_len * group_pad <= 16 else 64
    block_q = max(rows // group_pad, 1)
    num_reqs = seq_lens.shape[0]
    grid = (triton.cdiv(max_query_len, block_q), num_kv_heads, num_reqs)
    _paged_attention_kernel[grid](
        q, key_cache, value_cache, out,
        query_start_loc, seq_lens, block_tables,
        scale * 1.4426950408889634, sliding_window or NO_WINDOW, key_cache.shape[1],
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        block_tables.stride(0),
        GROUP=group, GROUP_PAD=group_pad, HEAD_DIM=head_dim, HEAD_PAD=max(triton.next_power_of_2(head_dim), 16),
        # Smaller context steps where the tiles are big (fp32, wide heads), to fit any GPU's shared memory.
        BLOCK_Q=block_q, BLOCK_N=64 if head_dim <= 128 and q.element_size() <= 2 else 32,
        # fp32 models get true fp32 products (the default on GPUs would be TF32); 16-bit types ignore it.
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        UPCAST=_INTERPRETED and q.dtype == torch.bfloat16,
    )
    return out
