"""torch-xla attention over the paged KV cache, in static shapes: every tensor is padded to a bucket.

Layout is the one torch-xla's ragged_paged_attention reads: one tensor per layer, [num_blocks + 1, block_size,
2 * num_kv_heads, head_dim] with keys and values interleaved by head (k0, v0, k1, v1, ...). The extra block at the
end is the padding sink: padded tokens write their KV there and padded requests point their block tables at it, so
the engine never hands it out (it allocates from the first num_blocks only).

On a TPU attention is torch-xla's Pallas kernel. Elsewhere it is `static_ragged_paged_attention` below: the same
inputs and semantics in fixed shapes. torch-xla's own use_kernel=False path is not used for serving because it loops
over the sequences in Python and reads their lengths, so it compiles a new graph for every batch composition; it is
the oracle the static version is tested against.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from tessera.worker.attention.backend import AttentionBackend, AttentionMetadata

# Large and finite, as in torch-xla: a padded query whose keys are all masked gets uniform weights, not NaN.
MASK_VALUE = -0.7 * torch.finfo(torch.float32).max


@dataclass
class XlaAttentionMetadata(AttentionMetadata):
    """The batch layout with every tensor padded: tokens to a token bucket, requests to a request bucket.

    query_start_loc [R + 1] repeats the real token count for padded requests, seq_lens [R] is 0 for them, and
    block_tables [R, max_blocks_per_seq] is padded with the sink block. num_seqs [1] holds the real request count on
    the device, so that a different count is new data, not a new graph.
    """

    num_seqs: torch.Tensor  # int32 [1]


class XlaAttentionBackend(AttentionBackend):
    """Reads XlaAttentionMetadata, which only the XlaWorker (xla/model_runner.py) builds."""

    name = "xla"

    def __init__(self, use_kernel: bool | None = None):
        if use_kernel is None:
            import torch_xla.runtime as xr

            use_kernel = xr.device_type() == "TPU"
        self.use_kernel = use_kernel

    def kv_cache_shape(self, num_blocks, block_size, num_kv_heads, head_dim):
        return (num_blocks + 1, block_size, 2 * num_kv_heads, head_dim)  # + 1: the padding sink

    def forward(self, q, k, v, kv_cache, meta: XlaAttentionMetadata, scale, sliding_window=None):
        write_kv(k, v, kv_cache, meta.slot_mapping)
        args = (q, kv_cache, meta.seq_lens, meta.block_tables, meta.query_start_loc, meta.num_seqs)
        if self.use_kernel:
            import torch_xla.experimental.custom_kernel  # noqa: F401  (registers torch.ops.xla.ragged_paged_attention)

            return torch.ops.xla.ragged_paged_attention(*args, sm_scale=scale, sliding_window=sliding_window,
                                                        use_kernel=True)
        return static_ragged_paged_attention(*args, sm_scale=scale, sliding_window=sliding_window)


def write_kv(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """One scatter of [num_tokens] rows into the flattened cache; padded tokens all land in the sink block."""
    num_tokens, num_kv_heads, head_dim = k.shape
    kv = torch.stack((k, v), dim=2).reshape(num_tokens, 2 * num_kv_heads, head_dim)  # k0, v0, k1, v1, ...
    kv_cache.view(-1, 2 * num_kv_heads, head_dim).index_copy_(0, slot_mapping, kv.to(kv_cache.dtype))


def static_ragged_paged_attention(
    q: torch.Tensor,  # [T, num_heads, head_dim]
    kv_pages: torch.Tensor,  # [num_pages, page_size, 2 * num_kv_heads, head_dim]
    kv_lens: torch.Tensor,  # int32 [R]
    page_indices: torch.Tensor,  # int32 [R, pages_per_seq]
    cu_q_lens: torch.Tensor,  # int32 [R + 1]
    num_seqs: torch.Tensor,  # int32 [1]
    *,
    sm_scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:  # [T, num_heads, head_dim]; zeros for padded tokens
    """ragged_paged_attention's semantics with shapes that depend only on the buckets.

    Each token gathers its own request's pages and masks by position, which costs T x context memory: fine for
    the CPU lane and small batches, while a TPU runs the kernel instead.
    """
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = kv_pages.shape[2] // 2
    token = torch.arange(num_tokens, device=q.device)
    # Request of each token: how many requests end at or before it (padded tokens clamp to the last row).
    request = (token[:, None] >= cu_q_lens[None, 1:].long()).sum(-1).clamp_max(kv_lens.shape[0] - 1)
    q_start = cu_q_lens.long()[request]
    q_len = cu_q_lens.long()[request + 1] - q_start
    kv_len = kv_lens.long()[request]
    position = kv_len - q_len + token - q_start  # absolute position of each query token
    valid = token < cu_q_lens.long()[num_seqs.long()]  # [T]

    pages = kv_pages[page_indices.long()[request]].flatten(1, 2)  # [T, context, 2 * kv_heads, head_dim]
    keys, values = pages[:, :, 0::2].float(), pages[:, :, 1::2].float()
    key_pos = torch.arange(pages.shape[1], device=q.device)[None, :]
    visible = (key_pos <= position[:, None]) & (key_pos < kv_len[:, None])
    if sliding_window is not None:
        visible &= key_pos > position[:, None] - sliding_window

    grouped = q.float().view(num_tokens, num_kv_heads, num_heads // num_kv_heads, head_dim)
    scores = torch.einsum("tkgd,tlkd->tkgl", grouped, keys) * sm_scale
    scores = scores.masked_fill(~visible[:, None, None, :], MASK_VALUE)
    out = torch.einsum("tkgl,tlkd->tkgd", scores.softmax(dim=-1), values).reshape(num_tokens, num_heads, head_dim)
    return torch.where(valid[:, None, None], out, 0.0).to(q.dtype)
