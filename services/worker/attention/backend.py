"""The one attention interface every device implements, and the batch layout it reads.

A step's tokens are concatenated request after request ("ragged" batch). Requests whose query length is 1
(decodes) come first, shortest context first, so backends can treat them as dense batches of similar length.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    query_start_loc: torch.Tensor  # int32 [num_reqs + 1]: request i owns tokens [qsl[i], qsl[i + 1])
    seq_lens: torch.Tensor  # int32 [num_reqs]: context length after this step (cached + new tokens)
    block_tables: torch.Tensor  # int32 [num_reqs, max_blocks]: physical block ids, padded with 0
    slot_mapping: torch.Tensor  # int64 [num_tokens]: block_id * block_size + offset of each new token's KV
    num_decodes: int  # the first num_decodes requests have exactly one query token, by ascending seq_len
    # Host copies, so that CPU-side loops never wait on a device.
    query_lens_cpu: list[int]
    seq_lens_cpu: list[int]

    @property
    def num_reqs(self) -> int:
        return len(self.seq_lens_cpu)


class AttentionBackend(ABC):
    """Writes the step's new keys and values into the paged cache, then attends over each request's context."""

    name: str

    def kv_cache_shape(self, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int) -> tuple[int, ...]:
        """Shape of one layer's KV tensor; the default keeps keys and values in separate planes."""
        return (2, num_blocks, block_size, num_kv_heads, head_dim)

    @abstractmethod
    def forward(
        self,
        q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        v: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        kv_cache: torch.Tensor,  # kv_cache_shape(...)
        meta: AttentionMetadata,
        scale: float,
        sliding_window: int | None = None,
    ) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
        ...
