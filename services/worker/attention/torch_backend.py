"""PyTorch attention over the paged KV cache: gather each request's context, then scaled dot-product attention.

It runs anywhere PyTorch does, and it is the oracle the Triton and XLA backends are tested against. On the CPU,
decodes go through the native kernel (kernels/paged_attention_cpu.cpp) when it could be built: it reads the
blocks in place instead of gathering a padded copy; on CPUs with AVX512-BF16, float32 and bf16 prefills go
through kernels/prefill_attention_cpu.cpp (3-6x SDPA's speed there): whole prompts on their keys as computed,
later chunks on the cache in place (an int8 cache's dequantized as the kernel reads them); others stay on SDPA.

An int8 cache (attention/int8_kv.py) is written quantized and read dequantized (prefill chunks, the pure PyTorch
decodes) or in place (the native kernel). A whole prompt attends to its own keys as computed, before rounding.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from tessera.worker.attention import int8_kv
from tessera.worker.attention.backend import AttentionBackend, AttentionMetadata


def write_kv(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    if kv_cache.dtype == torch.int8:
        k, v = int8_kv.quantize(k), int8_kv.quantize(v)
    num_kv_heads, row = k.shape[1], k.shape[2]
    kv_cache[0].view(-1, num_kv_heads, row).index_copy_(0, slot_mapping, k)
    kv_cache[1].view(-1, num_kv_heads, row).index_copy_(0, slot_mapping, v)


def gather_context(kv_plane: torch.Tensor, block_table: torch.Tensor, length: int, dtype: torch.dtype) -> torch.Tensor:
    """[length, num_kv_heads, head_dim] keys (or values) of one request, in position order, in dtype."""
    block_size = kv_plane.shape[1]
    num_blocks = -(-length // block_size)
    return _values(kv_plane.index_select(0, block_table[:num_blocks]).flatten(0, 1)[:length], dtype)


def _values(rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return int8_kv.dequantize(rows, dtype) if rows.dtype == torch.int8 else rows


DECODE_GROUP = 16  # decodes attended together; sorted by length, so padding stays small


class TorchAttentionBackend(AttentionBackend):
    name = "torch"

    def __init__(self, native_decode: bool = True):
        """native_decode: use the native CPU decode kernel if it builds (False: the pure PyTorch path)."""
        self.native_decode = self.native_write = self.native_prefill = None
        if native_decode:
            from tessera.kernels import paged_attention_cpu

            self.native_decode = paged_attention_cpu.load()
            if paged_attention_cpu.load("decode_ops") is not None:
                self.native_write = torch.ops.tessera.write_kv_  # decode_ops_cpu.cpp: one pass, int8 included
            prefill = paged_attention_cpu.load("prefill_attention")
            if prefill is not None and torch.ops.tessera.paged_prefill_available():  # AVX512-BF16
                self.native_prefill = prefill

    def forward(self, q, k, v, kv_cache, meta: AttentionMetadata, scale, sliding_window=None):
        if (self.native_write is not None and k.device.type == "cpu" and k.dtype in (torch.float32, torch.bfloat16)
                and k.stride(2) == v.stride(2) == 1 and k.stride(1) == v.stride(1) == k.shape[2]):
            self.native_write(k, v, kv_cache, meta.slot_mapping)
        else:
            write_kv(k, v, kv_cache, meta.slot_mapping)
        decodes = meta.num_decodes
        native = decodes and self.native_decode is not None and q.device.type == "cpu"
        if native and decodes == meta.num_reqs:  # a decode-only step: the kernel's output is the whole answer
            return self.native_decode(q, kv_cache[0], kv_cache[1], meta.block_tables, meta.seq_lens, scale,
                                      sliding_window or 0)
        out = torch.empty_like(q)
        if native:
            out[:decodes] = self.native_decode(q[:decodes], kv_cache[0], kv_cache[1], meta.block_tables[:decodes],
                                               meta.seq_lens[:decodes], scale, sliding_window or 0)
            decodes = 0
        # Decodes come sorted by context length: each group pads only to its own longest context.
        for first in range(0, decodes, DECODE_GROUP):
            last = min(first + DECODE_GROUP, decodes)
            out[first:last] = self._decodes(q[first:last], kv_cache, meta, first, last, scale, sliding_window)
        start = meta.num_decodes
        native_prompts = (self.native_prefill is not None and q.device.type == "cpu" and k.dtype == q.dtype
                          and q.dtype in (torch.float32, torch.bfloat16) and q.shape[2] in (32, 64, 128))
        native_chunks = native_prompts and kv_cache.dtype in (q.dtype, torch.int8)
        for i in range(meta.num_decodes, meta.num_reqs):
            q_len, seq_len = meta.query_lens_cpu[i], meta.seq_lens_cpu[i]
            if native_prompts and q_len == seq_len:  # a whole prompt: its keys as computed, whatever the cache
                out[start : start + q_len] = torch.ops.tessera.prompt_attention(
                    q[start : start + q_len], k[start : start + q_len], v[start : start + q_len], scale,
                    sliding_window or 0)
                start += q_len
                continue
            if native_chunks:  # the chunk's keys and values are in the cache by now: it reads them in place
                out[start : start + q_len] = self.native_prefill(q[start : start + q_len], kv_cache[0], kv_cache[1],
                                                                 meta.block_tables[i], seq_len, scale,
                                                                 sliding_window or 0)
                start += q_len
                continue
            if q_len == seq_len:
                # A whole prompt at once: its keys are this step's (nothing gathered, none rounded by an int8
                # cache), and causal attention needs no mask but a window's (SDPA skips the blocks above the
                # diagonal).
                mask = None
                if sliding_window is not None:
                    pos = torch.arange(q_len)
                    mask = ((pos[None, :] <= pos[:, None]) & (pos[None, :] > pos[:, None] - sliding_window))[None]
                out[start : start + q_len] = _sdpa(q[start : start + q_len].unsqueeze(0), k[start : start + q_len]
                                                   .unsqueeze(0), v[start : start + q_len].unsqueeze(0), mask, scale)[0]
                start += q_len
                continue
            keys = gather_context(kv_cache[0], meta.block_tables[i], seq_len, q.dtype)
            values = gather_context(kv_cache[1], meta.block_tables[i], seq_len, q.dtype)
            # Query j sits at absolute position seq_len - q_len + j and sees keys up to it.
            q_pos = torch.arange(seq_len - q_len, seq_len).unsqueeze(1)
            k_pos = torch.arange(seq_len).unsqueeze(0)
            mask = k_pos <= q_pos
            if sliding_window is not None:
                mask &= k_pos > q_pos - sliding_window
            out[start : start + q_len] = _sdpa(q[start : start + q_len].unsqueeze(0), keys.unsqueeze(0),
                                               values.unsqueeze(0), mask.unsqueeze(0), scale)[0]
            start += q_len
        return out

    def _decodes(self, q, kv_cache, meta, first, last, scale, sliding_window):
        """Single-token queries of requests [first, last) at once: contexts padded to the longest and masked."""
        seq_lens = meta.seq_lens[first:last].to(torch.long)
        max_len = max(meta.seq_lens_cpu[first:last])
        block_size = kv_cache.shape[2]
        num_blocks = -(-max_len // block_size)
        blocks = meta.block_tables[first:last, :num_blocks].flatten()
        # index_select on the block axis gathers several times faster than advanced indexing on CPU.
        context = (last - first, num_blocks * block_size, *kv_cache.shape[3:])
        keys = _values(kv_cache[0].index_select(0, blocks).view(context)[:, :max_len], q.dtype)  # [n, len, kv_heads, d]
        values = _values(kv_cache[1].index_select(0, blocks).view(context)[:, :max_len], q.dtype)
        k_pos = torch.arange(max_len).unsqueeze(0)
        mask = k_pos < seq_lens.unsqueeze(1)
        if sliding_window is not None:
            mask &= k_pos >= (seq_lens - sliding_window).unsqueeze(1)
        return _sdpa(q.unsqueeze(1), keys, values, mask.unsqueeze(1), scale).squeeze(1)


def _sdpa(q, k, v, mask, scale):
    """q [b, q_len, heads, d], k/v [b, kv_len, kv_heads, d], mask [b, q_len, kv_len] -> [b, q_len, heads, d].
    mask None: causal, with q_len == kv_len."""
    # enable_gqa lets query-head groups share a KV head without copying keys and values per group.
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale, enable_gqa=q.shape[2] != k.shape[2],
        **(dict(is_causal=True) if mask is None else dict(attn_mask=mask.unsqueeze(1))),
    )
    return out.transpose(1, 2)
