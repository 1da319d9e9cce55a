"""The logical paged KV cache the scheduler talks to: block tables per request, with prefix caching.

A step for a request goes: `get_computed_blocks` (waiting requests only: which leading full blocks are
already cached), `allocate_slots` (grow the block table to cover the tokens computed so far plus the ones
scheduled now), the worker runs, then `cache_blocks` (publish the newly completed full blocks so later
requests can share them). `free` on finish, abort or preemption.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from tessera.engine.block_pool import BlockPool, hash_block_tokens


@dataclass
class PrefixCacheStats:
    queried_tokens: int = 0
    hit_tokens: int = 0

    def record(self, queried: int, hit: int) -> None:
        self.queried_tokens += queried
        self.hit_tokens += hit

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.queried_tokens if self.queried_tokens else 0.0


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.pool = BlockPool(num_blocks)
        self.stats = PrefixCacheStats()
        self._tables: dict[str, list[int]] = {}
        # The hash chain of each request's full blocks registered so far, so `cache_blocks` is incremental.
        # It can run ahead of what the pool holds: a duplicate block keeps its hash here (its children's
        # hashes chain from it) but is not in the pool's map.
        self._block_hashes: dict[str, list[bytes]] = {}

    def get_computed_blocks(self, token_ids: Sequence[int]) -> tuple[list[int], int]:
        if not self.enable_prefix_caching:
            return [], 0
        bs = self.block_size
        # Leave at least one token to compute: the model must produce logits for the last one.
        max_blocks = (len(token_ids) - 1) // bs
        blocks: list[int] = []
        parent = None
        for i in range(max_blocks):  # hash lazily: stop at the first miss
            parent = hash_block_tokens(parent, token_ids[i * bs:(i + 1) * bs])
            block_id = self.pool.lookup(parent)
            if block_id is None:
                break
            blocks.append(block_id)
        return blocks, len(blocks) * bs

    def allocate_slots(self, request_id: str, num_tokens: int,
                       computed_blocks: Sequence[int] = ()) -> list[int] | None:
        table = self._tables.get(request_id)
        if table is not None and computed_blocks:
            raise ValueError(f"request {request_id!r} already has a block table; computed_blocks only "
                             "apply to its first allocation")
        if any(self.pool.blocks[b].hash is None for b in computed_blocks):
            raise ValueError("computed_blocks must be cached blocks from get_computed_blocks, "
                             "with no allocation in between")
        num_have = (len(table) if table is not None else 0) + len(computed_blocks)
        num_new = max(0, -(-num_tokens // self.block_size) - num_have)
        # Free cached blocks we are about to share leave the free queue, so they count against the supply.
        num_revived = sum(1 for b in computed_blocks if self.pool.blocks[b].ref_count == 0)
        if num_new > self.pool.num_free - num_revived:
            return None

        self.pool.share(computed_blocks)  # before `take`, so fresh blocks can never evict them
        delta = list(computed_blocks) + self.pool.take(num_new)
        if table is None:
            self._tables[request_id] = delta.copy()
            self._block_hashes[request_id] = [self.pool.blocks[b].hash for b in computed_blocks]
        else:
            table.extend(delta)
        return delta

    def cache_blocks(self, request_id: str, token_ids: Sequence[int], num_computed_tokens: int) -> None:
        if not self.enable_prefix_caching:
            return
        table = self._tables[request_id]
        hashes = self._block_hashes[request_id]
        bs = self.block_size
        num_full = num_computed_tokens // bs
        assert num_full <= len(table), "cache_blocks called for tokens that have no slots"
        for i in range(len(hashes), num_full):
            block_hash = hash_block_tokens(hashes[-1] if hashes else None, token_ids[i * bs:(i + 1) * bs])
            hashes.append(block_hash)
            self.pool.cache(table[i], block_hash)

    def free(self, request_id: str) -> None:
        table = self._tables.pop(request_id, None)
        self._block_hashes.pop(request_id, None)
        if table is not None:
            # Deepest blocks first: a chain's tail is evicted before the prefix it extends.
            self.pool.release(reversed(table))

    def block_table(self, request_id: str) -> list[int]:
        return list(self._tables.get(request_id, ()))

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free

    @property
    def num_blocks_in_use(self) -> int:
        return self.num_blocks - self.pool.num_free

    @property
    def usage(self) -> float:
        return self.num_blocks_in_use / self.num_blocks

    @property
    def num_cached_blocks(self) -> int:
        return len(self.pool.cached)

    def reset_prefix_cache(self) -> bool:
        """Forget every cached hash; only when no block is in use (live tables still chain from them)."""
        if self.num_blocks_in_use:
            return False
        self.pool.reset_prefix_cache()
        return True
