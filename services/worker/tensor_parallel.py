"""Tensor parallelism: which slice of each weight a rank holds, and the collectives that join the slices.

Megatron-style, over torch.distributed (gloo on CPU, NCCL on CUDA). Each rank holds 1/N of the attention heads
(and of the KV heads; when N exceeds the KV heads, each KV head is replicated on the ranks whose query heads
use it), 1/N of the MLP's intermediate dimension, and 1/N of the vocabulary (embedding and LM head). q/k/v and
gate/up are split by output rows (column-parallel), o_proj and down_proj by input columns (row-parallel, then
one all-reduce each); the embedding looks up its own vocabulary rows and all-reduces; the LM head's logits are
gathered on rank 0, which alone samples. The same control flow runs on every rank, so collectives always pair up.

SINGLE is the one-rank case: every slice is the whole tensor and every collective is a no-op.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from datetime import timedelta

import torch


@dataclass
class TensorParallel:
    rank: int = 0
    size: int = 1
    # Time spent in collectives, waiting for the other ranks included: the cost of the split (bench, metrics).
    collective_seconds: float = field(default=0.0, compare=False)
    broadcast_seconds: float = field(default=0.0, compare=False)  # of which the step plans' broadcasts

    # -- what this rank holds --------------------------------------------------------------------------------

    def heads(self, num_heads: int) -> tuple[int, int]:
        """[start, end) of this rank's attention heads."""
        per_rank = num_heads // self.size
        return self.rank * per_rank, (self.rank + 1) * per_rank

    def kv_heads(self, num_heads: int, num_kv_heads: int) -> tuple[int, int]:
        """[start, end) of the KV heads this rank's query heads attend to: its 1/N, or the one it shares."""
        if num_kv_heads >= self.size:
            per_rank = num_kv_heads // self.size
            return self.rank * per_rank, (self.rank + 1) * per_rank
        first_query_head = self.heads(num_heads)[0]
        kv_head = first_query_head // (num_heads // num_kv_heads)
        return kv_head, kv_head + 1

    def part(self, total: int) -> tuple[int, int]:
        """[start, end) of an evenly split dimension (MLP intermediate)."""
        per_rank = total // self.size
        return self.rank * per_rank, (self.rank + 1) * per_rank

    def vocab_rows(self, vocab_size: int) -> int:
        """Rows of this rank's vocabulary slice, the same on every rank (the last is padded)."""
        return -(-vocab_size // self.size)

    def vocab(self, vocab_size: int) -> tuple[int, int]:
        """[start, end) of this rank's real vocabulary rows (end - start may fall short of vocab_rows)."""
        rows = self.vocab_rows(vocab_size)
        return min(self.rank * rows, vocab_size), min((self.rank + 1) * rows, vocab_size)

    def check(self, num_heads: int, num_kv_heads: int, intermediate_size: int) -> None:
        """The shapes this split needs; ValueError naming what does not divide."""
        problems = []
        if num_heads % self.size:
            problems.append(f"{num_heads} attention heads")
        if num_kv_heads % self.size and self.size % num_kv_heads:
            problems.append(f"{num_kv_heads} KV heads (neither divides the other)")
        if intermediate_size % self.size:
            problems.append(f"an MLP intermediate size of {intermediate_size}")
        if problems:
            raise ValueError(f"--tensor-parallel-size {self.size} does not divide {', '.join(problems)}")

    # -- collectives ------------------------------------------------------------------------------------------

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            start = time.perf_counter()
            torch.distributed.all_reduce(x)
            self.collective_seconds += time.perf_counter() - start
        return x

    def gather_vocab(self, local_logits: torch.Tensor, vocab_size: int) -> torch.Tensor | None:
        """Every rank's logits for its vocabulary slice, joined on rank 0 ([rows, vocab_size]); None elsewhere."""
        if self.size == 1:
            return local_logits
        local_logits = local_logits.contiguous()
        parts = [torch.empty_like(local_logits) for _ in range(self.size)] if self.rank == 0 else None
        start = time.perf_counter()
        torch.distributed.gather(local_logits, parts, dst=0)
        self.collective_seconds += time.perf_counter() - start
        return torch.cat(parts, dim=-1)[..., :vocab_size] if self.rank == 0 else None

    def broadcast_object(self, obj=None):
        """rank 0's `obj` on every rank (pickled: the step plan)."""
        if self.size == 1:
            return obj
        box = [obj]
        start = time.perf_counter()
        torch.distributed.broadcast_object_list(box, src=0)
        elapsed = time.perf_counter() - start
        self.collective_seconds += elapsed
        self.broadcast_seconds += elapsed
        return box[0]

    def broadcast_ids(self, ids: list[int]) -> list[int]:
        """rank 0's list of token ids on every rank (the others pass a list of the right length)."""
        if self.size == 1 or not ids:
            return ids
        tensor = torch.tensor(ids, dtype=torch.long)
        torch.distributed.broadcast(tensor, src=0)
        return tensor.tolist()

    def min_int(self, value: int) -> int:
        """The smallest `value` over the ranks (the KV block count: every rank must fit it)."""
        if self.size == 1:
            return value
        tensor = torch.tensor([value], dtype=torch.long)
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MIN)
        return int(tensor.item())


SINGLE = TensorParallel()


def init_tensor_parallel(size: int, rank: int | None = None, backend: str = "gloo",
                         timeout_s: float = 120.0) -> TensorParallel:
    """Joins the group through torch.distributed's env:// rendezvous (MASTER_ADDR, MASTER_PORT, and RANK /
    WORLD_SIZE as torchrun sets them, or `rank` and `size` given here); a collective that waits longer than
    timeout_s (a dead or hung rank) raises instead of hanging the step."""
    if size == 1:
        return SINGLE
    rank = int(os.environ["RANK"]) if rank is None else rank
    world = int(os.environ.get("WORLD_SIZE", size))
    if world != size:
        raise ValueError(f"WORLD_SIZE is {world} but --tensor-parallel-size is {size}")
    torch.distributed.init_process_group(backend, init_method="env://", rank=rank, world_size=size,
                                         timeout=timedelta(seconds=timeout_s))
    return TensorParallel(rank, size)
