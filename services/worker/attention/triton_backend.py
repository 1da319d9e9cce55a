"""Attention with the Triton kernels: the KV write by slot mapping, then one paged-attention launch for the whole
mixed batch (decodes and prefill chunks alike).

It keeps the torch backend's cache layout (keys and values in separate planes of [num_blocks, block_size,
num_kv_heads, head_dim]), so the two backends can be checked against each other on the same cache. On a CPU it
runs under TRITON_INTERPRET=1, which is how it is tested without a GPU. It never reads host copies of the
sequence lengths and launches with a fixed grid for a fixed batch, so a pure-decode step can be captured in a
CUDA graph.
"""
from __future__ import annotations

import torch

from tessera.worker.attention.backend import AttentionBackend, AttentionMetadata
from tessera.kernels.kv_write import kv_write
from tessera.kernels.paged_attention import paged_attention


class TritonAttentionBackend(AttentionBackend):
    name = "triton"
    supports_cuda_graphs = True

    def forward(self, q, k, v, kv_cache, meta: AttentionMetadata, scale, sliding_window=None) -> torch.Tensor:
        key_cache, value_cache = kv_cache[0], kv_cache[1]
        kv_write(k, v, key_cache, value_cache, meta.slot_mapping)
        return paged_attention(
            q, key_cache, value_cache, meta.query_start_loc, meta.seq_lens, meta.block_tables,
            max(meta.query_lens_cpu), scale, sliding_window,
        )
