"""The logical KV cache: block pool, prefix caching, eviction order, and a stateful model of a scheduler."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from tessera.engine.block_pool import ROOT_HASH, hash_block_tokens, hash_prompt_blocks
from tessera.engine.kv_cache_manager import KVCacheManager, PrefixCacheStats


def ref_counts(mgr: KVCacheManager, block_ids) -> list[int]:
    return [mgr.pool.blocks[b].ref_count for b in block_ids]


def snapshot(mgr: KVCacheManager, request_ids) -> tuple:
    """Everything allocate_slots could change, to check that a failed call changed nothing."""
    return (
        list(mgr.pool.free_queue),
        [(b.ref_count, b.hash) for b in mgr.pool.blocks],
        dict(mgr.pool.cached),
        {r: mgr.block_table(r) for r in request_ids},
    )


def run_prefill(mgr: KVCacheManager, request_id: str, token_ids: list[int]) -> tuple[list[int], int]:
    """Admit a request and compute its whole prompt in one step, as the scheduler would."""
    computed, num_cached = mgr.get_computed_blocks(token_ids)
    assert mgr.allocate_slots(request_id, len(token_ids), computed) is not None
    mgr.cache_blocks(request_id, token_ids, len(token_ids))
    return computed, num_cached


# ---------------------------------------------------------------------------------------------- hashing

def independent_chain(token_ids: list[int], block_size: int) -> list[bytes]:
    hashes, parent = [], ROOT_HASH
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        data = b"".join(t.to_bytes(8, "little", signed=True) for t in token_ids[start:start + block_size])
        parent = hashlib.sha256(parent + data).digest()
        hashes.append(parent)
    return hashes


def test_hash_chain_matches_an_independent_sha256():
    tokens = [0, 1, 2**40, 151_643, -1, 7, 7, 7, 9]
    assert hash_prompt_blocks(tokens, 4) == independent_chain(tokens, 4)
    assert len(hash_prompt_blocks(tokens, 4)) == 2  # the partial last block has no hash
    assert hash_block_tokens(None, tokens[:4]) == hash_prompt_blocks(tokens, 4)[0]
    # A block's hash names its whole prefix: same tokens after a different parent hash differently.
    assert hash_block_tokens(hash_block_tokens(None, [1, 2]), [3, 4]) != hash_block_tokens(
        hash_block_tokens(None, [2, 1]), [3, 4])


def test_hash_is_stable_across_processes():
    tokens = list(range(100, 117))
    code = ("from tessera.engine.block_pool import hash_prompt_blocks; "
            f"print(','.join(h.hex() for h in hash_prompt_blocks({tokens!r}, 4)))")
    env = dict(os.environ, PYTHONHASHSEED="12345")  # a different salt for Python's own hash()
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip().split(",") == [h.hex() for h in hash_prompt_blocks(tokens, 4)]


# ------------------------------------------------------------------------------------------ prefix hits

def test_prefix_hit_shares_full_blocks_only():
    bs = 4
    mgr = KVCacheManager(num_blocks=16, block_size=bs)
    prompt_a = list(range(14))  # 3 full blocks + 2 tokens
    computed, num_cached = run_prefill(mgr, "a", prompt_a)
    assert (computed, num_cached) == ([], 0)
    assert mgr.num_cached_blocks == 3
    table_a = mgr.block_table("a")
    assert len(table_a) == 4

    # Same 3-block prefix, different tail: 3 blocks, 12 tokens.
    prompt_b = prompt_a[:12] + [99, 98, 97]
    computed, num_cached = mgr.get_computed_blocks(prompt_b)
    assert (computed, num_cached) == (table_a[:3], 12)
    delta = mgr.allocate_slots("b", len(prompt_b), computed)
    assert delta[:3] == table_a[:3] and len(delta) == 4
    assert delta[3] != table_a[3]  # the partial last block is never shared
    assert ref_counts(mgr, table_a) == [2, 2, 2, 1]

    # The identical prompt hits the 3 full blocks, not the partial one.
    assert mgr.get_computed_blocks(prompt_a) == (table_a[:3], 12)
    # A prompt that is exactly the cached 3 blocks keeps its last block to compute.
    assert mgr.get_computed_blocks(prompt_a[:12]) == (table_a[:2], 8)
    assert mgr.get_computed_blocks(prompt_a[:13]) == (table_a[:3], 12)
    assert mgr.get_computed_blocks(prompt_a[:1]) == ([], 0)
    assert mgr.get_computed_blocks([]) == ([], 0)

    # Lookups are pure: no ref count or stat moved.
    assert ref_counts(mgr, table_a) == [2, 2, 2, 1]
    assert mgr.stats == PrefixCacheStats()

    mgr.free("a")
    assert ref_counts(mgr, table_a[:3]) == [1, 1, 1]
    mgr.free("b")
    assert mgr.num_blocks_in_use == 0 and mgr.num_free_blocks == 16
    assert mgr.num_cached_blocks == 3  # free but still reusable
    assert mgr.get_computed_blocks(prompt_b) == (table_a[:3], 12)


def test_stats_hit_rate():
    stats = PrefixCacheStats()
    assert stats.hit_rate == 0.0
    stats.record(queried=20, hit=12)
    stats.record(queried=20, hit=0)
    assert (stats.queried_tokens, stats.hit_tokens, stats.hit_rate) == (40, 12, 0.3)


def test_chunked_prefill_and_decode_cache_incrementally():
    bs = 4
    mgr = KVCacheManager(num_blocks=8, block_size=bs)
    tokens = list(range(10))
    assert len(mgr.allocate_slots("r", 3)) == 1
    mgr.cache_blocks("r", tokens, 3)
    assert mgr.num_cached_blocks == 0
    assert len(mgr.allocate_slots("r", 9)) == 2
    mgr.cache_blocks("r", tokens, 9)
    assert mgr.num_cached_blocks == 2
    assert mgr.allocate_slots("r", 10) == []  # still fits in the third block
    tokens.append(42)  # the sampled token
    mgr.cache_blocks("r", tokens, 10)
    assert mgr.num_cached_blocks == 2
    assert len(mgr.allocate_slots("r", 13)) == 1
    mgr.cache_blocks("r", tokens + [1, 2], 13)
    assert mgr.num_cached_blocks == 3
    assert mgr.get_computed_blocks(tokens + [1, 2, 3]) == (mgr.block_table("r")[:3], 12)


def test_duplicate_block_keeps_the_existing_mapping():
    mgr = KVCacheManager(num_blocks=8, block_size=2)
    prompt = [1, 2, 3, 4, 5]
    # Both are admitted before either is cached, so both compute the same blocks.
    assert mgr.get_computed_blocks(prompt) == ([], 0)
    mgr.allocate_slots("a", 5)
    mgr.allocate_slots("b", 5)
    mgr.cache_blocks("a", prompt, 5)
    mgr.cache_blocks("b", prompt, 5)
    table_a, table_b = mgr.block_table("a"), mgr.block_table("b")
    assert mgr.num_cached_blocks == 2
    assert mgr.get_computed_blocks(prompt) == (table_a[:2], 4)
    assert all(mgr.pool.blocks[b].hash is None for b in table_b)
    # b's continuation chains from the shared hashes even though b's own blocks are uncached.
    mgr.allocate_slots("b", 7)
    mgr.cache_blocks("b", prompt + [6, 7], 7)
    assert mgr.get_computed_blocks(prompt + [6, 7, 8]) == (table_a[:2] + [table_b[2]], 6)


# -------------------------------------------------------------------------------------------- eviction

def test_eviction_is_lru_and_deepest_block_first():
    bs = 2
    mgr = KVCacheManager(num_blocks=8, block_size=bs)
    prompt_a = [1, 1, 2, 2, 3, 3, 4]  # 3 full blocks + 1
    prompt_b = [5, 5, 6, 6, 7]        # 2 full blocks + 1
    run_prefill(mgr, "a", prompt_a)
    table_a = mgr.block_table("a")
    mgr.free("a")  # a's chain is now the least recently used
    run_prefill(mgr, "b", prompt_b)
    table_b = mgr.block_table("b")
    mgr.free("b")
    assert mgr.num_free_blocks == 8 and mgr.num_cached_blocks == 5

    # The 3 never-cached blocks (b's partial block among them) go before any cached block is evicted.
    filler = mgr.allocate_slots("c", 3 * bs)
    assert table_b[2] in filler and mgr.num_cached_blocks == 5
    # Next comes a's deepest block, then its parent: a keeps a shorter prefix, b keeps all of its own.
    assert mgr.allocate_slots("d", bs) == [table_a[2]]
    assert mgr.get_computed_blocks(prompt_a) == (table_a[:2], 4)
    assert mgr.allocate_slots("e", bs) == [table_a[1]]
    assert mgr.get_computed_blocks(prompt_a) == (table_a[:1], 2)
    assert mgr.get_computed_blocks(prompt_b) == (table_b[:2], 4)


def test_rehit_takes_blocks_out_of_the_free_queue_and_refreshes_them():
    bs = 2
    mgr = KVCacheManager(num_blocks=6, block_size=bs)
    prompt_a, prompt_b = [1, 1, 2, 2, 3], [4, 4, 5, 5, 6]
    run_prefill(mgr, "a", prompt_a)
    table_a = mgr.block_table("a")
    mgr.free("a")
    run_prefill(mgr, "b", prompt_b)
    table_b = mgr.block_table("b")
    mgr.free("b")

    # Re-hit a (the older chain): its cached blocks leave the free queue while in use ...
    computed, _ = mgr.get_computed_blocks(prompt_a + [9])
    assert computed == table_a[:2]
    mgr.allocate_slots("a2", 6, computed)
    assert not set(computed) & set(mgr.pool.free_queue)
    assert mgr.num_blocks_in_use == 3
    mgr.free("a2")
    # ... and come back as the most recent, so b's chain is evicted first now.
    # (The first 2 blocks taken are the never-cached ones.)
    assert mgr.allocate_slots("c", 4 * bs)[2:] == [table_b[1], table_b[0]]
    assert mgr.get_computed_blocks(prompt_a) == (table_a[:2], 4)
    assert mgr.get_computed_blocks(prompt_b) == ([], 0)


# ------------------------------------------------------------------------------------ allocation limits

def test_allocation_failure_returns_none_and_changes_nothing():
    bs = 2
    mgr = KVCacheManager(num_blocks=4, block_size=bs)
    prompt = [1, 2, 3, 4, 5, 6]
    run_prefill(mgr, "a", prompt)
    table_a = mgr.block_table("a")
    mgr.free("a")  # 4 free blocks, 3 of them cached

    longer = prompt + [7, 8, 9]
    computed, num_cached = mgr.get_computed_blocks(longer)
    assert (computed, num_cached) == (table_a, 6)
    # 5 blocks needed: 3 revived from the free queue + 2 fresh, but only 1 is free besides them.
    before = snapshot(mgr, ["a", "b"])
    assert mgr.allocate_slots("b", 9, computed) is None
    assert snapshot(mgr, ["a", "b"]) == before
    # One token fewer fits exactly.
    assert len(mgr.allocate_slots("b", 8, computed)) == 4
    assert mgr.num_free_blocks == 0 and mgr.usage == 1.0

    before = snapshot(mgr, ["b", "c"])
    assert mgr.allocate_slots("b", 9) is None
    assert mgr.allocate_slots("c", 1) is None
    assert snapshot(mgr, ["b", "c"]) == before
    assert mgr.block_table("c") == []


def test_disabled_prefix_caching():
    mgr = KVCacheManager(num_blocks=8, block_size=2, enable_prefix_caching=False)
    prompt = [1, 2, 3, 4, 5]
    run_prefill(mgr, "a", prompt)
    assert mgr.num_cached_blocks == 0
    assert mgr.get_computed_blocks(prompt) == ([], 0)
    run_prefill(mgr, "b", prompt)
    assert not set(mgr.block_table("a")) & set(mgr.block_table("b"))
    mgr.free("a")
    mgr.free("b")
    assert mgr.num_free_blocks == 8


def test_reset_prefix_cache_only_when_idle():
    mgr = KVCacheManager(num_blocks=8, block_size=2)
    run_prefill(mgr, "a", [1, 2, 3, 4, 5])
    assert not mgr.reset_prefix_cache()
    assert mgr.num_cached_blocks == 2
    mgr.free("a")
    mgr.free("a")  # unknown id: no-op
    assert mgr.reset_prefix_cache()
    assert mgr.num_cached_blocks == 0
    assert mgr.get_computed_blocks([1, 2, 3, 4, 5]) == ([], 0)


def test_computed_blocks_only_on_first_allocation():
    mgr = KVCacheManager(num_blocks=8, block_size=2)
    run_prefill(mgr, "a", [1, 2, 3, 4, 5])
    computed, _ = mgr.get_computed_blocks([1, 2, 3, 4, 5])
    mgr.allocate_slots("b", 5, computed)
    with pytest.raises(ValueError):
        mgr.allocate_slots("b", 7, computed)


# ----------------------------------------------------------------------------- stateful scheduler model

@dataclass
class Req:
    tokens: list[int]
    num_computed: int = 0
    num_slots: int = 0  # token slots the block table was last asked to cover
    running: bool = False


class KVCacheMachine(RuleBasedStateMachine):
    """A scheduler in miniature: requests from a 2-token alphabet (so prefixes collide), admitted with
    prefix hits, computed in random chunks (chunked prefill, then decode one token at a time), finished,
    aborted mid-prefill, or preempted (freed and re-admitted from scratch)."""

    @initialize(block_size=st.sampled_from([1, 2, 4]), num_blocks=st.integers(2, 20), caching=st.booleans())
    def setup(self, block_size, num_blocks, caching):
        self.mgr = KVCacheManager(num_blocks, block_size, enable_prefix_caching=caching)
        self.reqs: dict[str, Req] = {}
        self.next_id = 0

    def running(self) -> list[str]:
        return sorted(r for r, req in self.reqs.items() if req.running)

    def waiting(self) -> list[str]:
        return sorted(r for r, req in self.reqs.items() if not req.running)

    def run_step(self, rid: str, chunk: int, sampled: int) -> None:
        """Schedule up to `chunk` tokens of a running request; on success the 'worker' computes them."""
        req, mgr = self.reqs[rid], self.mgr
        num_new = min(chunk, len(req.tokens) - req.num_computed)
        before = snapshot(mgr, self.reqs)
        if mgr.allocate_slots(rid, req.num_computed + num_new) is None:
            assert snapshot(mgr, self.reqs) == before
            return
        req.num_slots = max(req.num_slots, req.num_computed + num_new)
        req.num_computed += num_new
        if req.num_computed == len(req.tokens):
            req.tokens.append(sampled)  # prefill done or a decode step: the model produced a token
        mgr.cache_blocks(rid, req.tokens, req.num_computed)

    @rule(system=st.sampled_from([[], [1] * 8, [0, 1, 1, 0, 1, 0, 0, 1]]),
          tokens=st.lists(st.integers(0, 1), min_size=1, max_size=12))
    def add_request(self, system, tokens):
        self.reqs[f"r{self.next_id}"] = Req(system + tokens)  # a shared "system prompt" or none
        self.next_id += 1

    @precondition(lambda self: self.waiting())
    @rule(data=st.data(), chunk=st.integers(1, 8), sampled=st.integers(0, 1))
    def admit(self, data, chunk, sampled):
        rid = data.draw(st.sampled_from(self.waiting()))
        req, mgr, bs = self.reqs[rid], self.mgr, self.mgr.block_size
        computed, num_cached = mgr.get_computed_blocks(req.tokens)
        assert num_cached == len(computed) * bs < len(req.tokens)
        expected = hash_prompt_blocks(req.tokens, bs)
        assert [mgr.pool.blocks[b].hash for b in computed] == expected[:len(computed)]
        if len(computed) < (len(req.tokens) - 1) // bs:  # the longest hit: the next block is a miss
            assert expected[len(computed)] not in mgr.pool.cached
        num_new = min(chunk, len(req.tokens) - num_cached)
        before = snapshot(mgr, self.reqs)
        delta = mgr.allocate_slots(rid, num_cached + num_new, computed)
        if delta is None:
            assert snapshot(mgr, self.reqs) == before
            return
        mgr.stats.record(len(req.tokens), num_cached)
        assert 0.0 <= mgr.stats.hit_rate <= 1.0
        assert delta[:len(computed)] == computed
        req.running, req.num_computed, req.num_slots = True, num_cached + num_new, num_cached + num_new
        if req.num_computed == len(req.tokens):
            req.tokens.append(sampled)
        mgr.cache_blocks(rid, req.tokens, req.num_computed)

    @precondition(lambda self: self.running())
    @rule(data=st.data())
    def step(self, data):
        # One engine step: every running request gets a chunk (a decode is a chunk of one token).
        for rid in self.running():
            self.run_step(rid, data.draw(st.integers(1, 8)), data.draw(st.integers(0, 1)))

    @precondition(lambda self: self.running())
    @rule(data=st.data())
    def finish(self, data):
        rid = data.draw(st.sampled_from(self.running()))
        self.mgr.free(rid)
        del self.reqs[rid]

    @precondition(lambda self: self.reqs)
    @rule(data=st.data())
    def abort(self, data):
        # Mid-prefill or still waiting (freeing a request with no table is a no-op).
        mid_prefill = [r for r, q in self.reqs.items() if q.num_computed < len(q.tokens)]
        rid = data.draw(st.sampled_from(sorted(mid_prefill or self.reqs)))
        self.mgr.free(rid)
        del self.reqs[rid]

    @precondition(lambda self: self.running())
    @rule(data=st.data())
    def preempt(self, data):
        rid = data.draw(st.sampled_from(self.running()))
        self.mgr.free(rid)
        self.reqs[rid] = Req(self.reqs[rid].tokens)  # recompute prompt + output from scratch

    @rule()
    def reset_prefix_cache(self):
        idle = self.mgr.num_blocks_in_use == 0
        assert self.mgr.reset_prefix_cache() == idle
        if idle:
            assert self.mgr.num_cached_blocks == 0

    @invariant()
    def ref_counts_match_live_tables(self):
        holders = Counter(b for rid in self.running() for b in self.mgr.block_table(rid))
        assert [blk.ref_count for blk in self.mgr.pool.blocks] == [holders[i] for i in
                                                                   range(self.mgr.num_blocks)]

    @invariant()
    def free_queue_holds_exactly_the_unreferenced_blocks(self):
        mgr = self.mgr
        free = list(mgr.pool.free_queue)
        assert sorted(free) == [blk.block_id for blk in mgr.pool.blocks if blk.ref_count == 0]
        assert mgr.num_free_blocks + mgr.num_blocks_in_use == mgr.num_blocks
        assert mgr.usage == mgr.num_blocks_in_use / mgr.num_blocks

    @invariant()
    def hash_map_agrees_with_block_hashes(self):
        pool = self.mgr.pool
        assert all(pool.blocks[b].hash == h for h, b in pool.cached.items())
        assert sorted(pool.cached.values()) == [blk.block_id for blk in pool.blocks if blk.hash is not None]
        if not self.mgr.enable_prefix_caching:
            assert not pool.cached

    @invariant()
    def tables_cover_their_tokens_and_cached_content_is_right(self):
        mgr, bs = self.mgr, self.mgr.block_size
        for rid in self.running():
            req, table = self.reqs[rid], mgr.block_table(rid)
            assert len(table) == -(-req.num_slots // bs) and req.num_computed <= req.num_slots
            for block_id, h in zip(table, hash_prompt_blocks(req.tokens[:req.num_computed], bs)):
                blk = mgr.pool.blocks[block_id]
                assert blk.hash in (h, None)
                assert blk.ref_count == 1 or blk.hash is not None  # only cached blocks are shared

    def teardown(self):
        if not hasattr(self, "mgr"):
            return
        for rid in list(self.reqs):
            self.mgr.free(rid)
        assert self.mgr.num_blocks_in_use == 0
        assert self.mgr.num_free_blocks == self.mgr.num_blocks


KVCacheMachine.TestCase.settings = settings(
    max_examples=150, stateful_step_count=60, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
test_kv_cache_state_machine = KVCacheMachine.TestCase
