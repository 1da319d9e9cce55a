"""The pool of fixed-size KV blocks: ref counts, an LRU free queue and the prefix-cache map.

Logical only: a block is an id into the worker's KV tensors. A block whose ref count drops to 0 goes back
to the free queue but keeps its hash, so a later request with the same prefix can take it back ("re-hit")
until fresh allocations reach it at the head of the queue and evict it.

Block hashes form a chain over full blocks, `hash_i = sha256(hash_{i-1} + tokens_i)`, so one hash names a
whole prefix. hashlib (never Python's salted `hash`) keeps them identical across processes and restarts.
"""
from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict
from collections.abc import Iterable, Sequence

# Parent of the first block of every sequence.
ROOT_HASH = bytes(32)


def hash_block_tokens(parent: bytes | None, token_ids: Sequence[int]) -> bytes:
    """The hash of one block given its parent's hash (None for the first block): sha256 over the
    parent hash followed by the token ids as little-endian int64."""
    data = struct.pack(f"<{len(token_ids)}q", *token_ids)
    return hashlib.sha256((ROOT_HASH if parent is None else parent) + data).digest()


def hash_prompt_blocks(token_ids: Sequence[int], block_size: int) -> list[bytes]:
    """The chain of hashes of every full block of `token_ids` (a trailing partial block has none)."""
    hashes: list[bytes] = []
    parent = None
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = hash_block_tokens(parent, token_ids[start:start + block_size])
        hashes.append(parent)
    return hashes


class Block:
    __slots__ = ("block_id", "ref_count", "hash")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_count = 0
        self.hash: bytes | None = None  # set while the block is in the prefix cache

    def __repr__(self) -> str:
        h = self.hash.hex()[:8] if self.hash else None
        return f"Block({self.block_id}, ref={self.ref_count}, hash={h})"


class BlockPool:
    def __init__(self, num_blocks: int):
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Blocks with ref count 0; the head is evicted first. An OrderedDict gives O(1) pop, append and
        # removal from the middle (a re-hit on a free cached block).
        self.free_queue: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.cached: dict[bytes, int] = {}  # block hash -> block id

    @property
    def num_free(self) -> int:
        return len(self.free_queue)

    def lookup(self, block_hash: bytes) -> int | None:
        return self.cached.get(block_hash)

    def take(self, n: int) -> list[int]:
        """Take `n` blocks from the head of the free queue, evicting any hash they still hold."""
        assert n <= len(self.free_queue), "caller checks the free supply first"
        taken = []
        for _ in range(n):
            block_id, _ = self.free_queue.popitem(last=False)
            block = self.blocks[block_id]
            if block.hash is not None:
                del self.cached[block.hash]
                block.hash = None
            block.ref_count = 1
            taken.append(block_id)
        return taken

    def share(self, block_ids: Iterable[int]) -> None:
        """Add a reference to cached blocks, pulling free ones out of the free queue (a re-hit)."""
        for block_id in block_ids:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self.free_queue[block_id]
            block.ref_count += 1

    def release(self, block_ids: Iterable[int]) -> None:
        """Drop one reference from each block, in the order given. A cached block that becomes free goes to
        the tail (evicted last); one without a hash has nothing worth keeping, so it goes to the head and is
        reused before any cached block is evicted."""
        for block_id in block_ids:
            block = self.blocks[block_id]
            block.ref_count -= 1
            assert block.ref_count >= 0, f"double free of block {block_id}"
            if block.ref_count == 0:
                self.free_queue[block_id] = None
                if block.hash is None:
                    self.free_queue.move_to_end(block_id, last=False)

    def cache(self, block_id: int, block_hash: bytes) -> bool:
        """Register a computed full block under its hash. If another block already holds that hash, keep
        the existing mapping (its KV is identical) and leave this one uncached; returns whether it cached."""
        if block_hash in self.cached:
            return False
        block = self.blocks[block_id]
        assert block.hash is None, f"block {block_id} is already cached"
        block.hash = block_hash
        self.cached[block_hash] = block_id
        return True

    def reset_prefix_cache(self) -> None:
        for block_id in self.cached.values():
            self.blocks[block_id].hash = None
        self.cached.clear()
