"""PyTorch references for the Triton kernels: small, slow and obviously correct. The tests hold the kernels to them."""
from __future__ import annotations

import torch

from tessera.worker.models.rope import apply_rotary


def paged_attention_ref(q, key_cache, value_cache, query_start_loc, seq_lens, block_tables, scale,
                        sliding_window=None) -> torch.Tensor:
    """Request by request: gather the context through the block table, mask, softmax in float32."""
    out = torch.empty_like(q)
    group = q.shape[1] // key_cache.shape[2]
    block_size = key_cache.shape[1]
    for i, seq_len in enumerate(seq_lens.tolist()):
        start, end = query_start_loc[i].item(), query_start_loc[i + 1].item()
        positions = torch.arange(seq_len)
        slots = block_tables[i, positions // block_size].long() * block_size + positions % block_size
        keys = key_cache.flatten(0, 1)[slots].float().repeat_interleave(group, dim=1)  # [seq_len, heads, dim]
        values = value_cache.flatten(0, 1)[slots].float().repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q[start:end].float(), keys) * scale
        q_pos = torch.arange(seq_len - (end - start), seq_len)[:, None]
        visible = positions[None, :] <= q_pos
        if sliding_window is not None:
            visible &= positions[None, :] > q_pos - sliding_window
        probs = scores.masked_fill(~visible, float("-inf")).softmax(dim=-1)
        out[start:end] = torch.einsum("hqk,khd->qhd", probs, values).to(q.dtype)
    return out


def kv_write_ref(k, v, key_cache, value_cache, slot_mapping) -> None:
    keep = slot_mapping >= 0
    key_cache.flatten(0, 1)[slot_mapping[keep]] = k[keep].to(key_cache.dtype)
    value_cache.flatten(0, 1)[slot_mapping[keep]] = v[keep].to(value_cache.dtype)


def rms_norm_ref(x, weight, eps, residual=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's RMSNorm (llama.RMSNorm) after the residual add the decoder layer does."""
    if residual is not None:
        x = x + residual
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype), x


def apply_rotary_ref(q, k, positions, cos_sin_cache) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's rotation (rope.apply_rotary), computed in float32 like the kernel, then rounded once."""
    cos, sin = cos_sin_cache[positions].unsqueeze(1).chunk(2, dim=-1)
    return apply_rotary(q.float(), cos, sin).to(q.dtype), apply_rotary(k.float(), cos, sin).to(k.dtype)
