"""CUDA graphs for pure-decode steps.

A decode step of a small batch is a few hundred tiny kernel launches (per layer: norms, matmuls, rotary, KV
write, attention, MLP), and the GPU idles while the CPU issues them. A CUDA graph records the launches once and
replays them all with one call. A graph has fixed shapes and fixed addresses, so:

- one graph per padded batch size (1, 2, 4, ..., max_batch_size); n decodes replay the smallest size >= n;
- the step's inputs are copied into static buffers the graph reads, and its output is a static tensor;
- padding rows get slot -1 (the KV write skips them) and context length 0 (attention reads nothing and returns
  zeros), so they never touch a real request's cache and need no reserved block;
- the block-table buffer has as many columns as the longest request can have blocks.

Steps with a prefill chunk, or more decodes than the largest graph, run eagerly. Only backends that declare
`supports_cuda_graphs` (the Triton one: it reads no host copies of the metadata and launches a fixed grid for a
fixed batch) are captured. All graphs share one memory pool, so a graph's output is valid only until the next
replay: the worker reads it (the logits) before the next step.

Untested: the development machine has no GPU. The capture/replay protocol is the standard one (warm up outside
the capture so Triton compiles and cuBLAS initializes, capture largest first and share the pool).
"""
from __future__ import annotations

import torch
from torch import nn

from tessera.worker.attention.backend import AttentionMetadata


def capture_sizes(max_batch_size: int) -> list[int]:
    sizes = [1]
    while sizes[-1] < max_batch_size:
        sizes.append(min(sizes[-1] * 2, max_batch_size))
    return sizes


class CudaGraphRunner:
    def __init__(self, model: nn.Module, kv_caches: list[torch.Tensor], block_size: int, max_model_len: int,
                 max_batch_size: int = 128):
        self.model, self.kv_caches = model, kv_caches
        self.batch_sizes = capture_sizes(max_batch_size)
        n, max_blocks = self.batch_sizes[-1], -(-max_model_len // block_size)
        device = kv_caches[0].device
        self.input_ids = torch.zeros(n, dtype=torch.long, device=device)
        self.positions = torch.zeros(n, dtype=torch.long, device=device)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.long, device=device)
        self.seq_lens = torch.zeros(n, dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=device)  # one query token each
        self.block_tables = torch.zeros(n, max_blocks, dtype=torch.int32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}

    @torch.inference_mode()
    def capture(self) -> None:
        pool = None
        for size in reversed(self.batch_sizes):  # largest first: the smaller graphs then fit in its pool
            self._forward(size)  # warm-up, outside the graph: Triton compiles, cuBLAS picks its kernels
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[size] = self._forward(size)
            pool = graph.pool()
            self.graphs[size] = graph
        torch.cuda.synchronize()

    def fits(self, meta: AttentionMetadata) -> bool:
        return (meta.num_decodes == meta.num_reqs <= self.batch_sizes[-1]
                and meta.block_tables.shape[1] <= self.block_tables.shape[1])

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """The model's hidden states for a step that `fits`: [num_reqs, hidden_size]."""
        n = meta.num_reqs
        size = next(s for s in self.batch_sizes if s >= n)
        self.input_ids[:n].copy_(input_ids)
        self.positions[:n].copy_(positions)
        self.slot_mapping[:n].copy_(meta.slot_mapping)
        self.seq_lens[:n].copy_(meta.seq_lens)
        self.block_tables[:n, : meta.block_tables.shape[1]].copy_(meta.block_tables)
        # Rows a larger batch used before become padding again. Stale block-table columns past a request's
        # length are never read, and stale ids and positions are valid values.
        self.slot_mapping[n:size].fill_(-1)
        self.seq_lens[n:size].fill_(0)
        self.graphs[size].replay()
        return self.outputs[size][:n]

    def _forward(self, size: int) -> torch.Tensor:
        meta = AttentionMetadata(
            query_start_loc=self.query_start_loc[: size + 1],
            seq_lens=self.seq_lens[:size],
            block_tables=self.block_tables[:size],
            slot_mapping=self.slot_mapping[:size],
            num_decodes=size,
            # Host copies cannot follow a replay; backends that support graphs read only the query lengths,
            # which are 1 for every row of every replay.
            query_lens_cpu=[1] * size,
            seq_lens_cpu=[0] * size,
        )
        return self.model(self.input_ids[:size], self.positions[:size], self.kv_caches, meta)
