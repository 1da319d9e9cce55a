"""Sampling in fixed shapes, so that it compiles into the step's graph: greedy, temperature, top-k, top-p, min-p, seed.

Every row runs every stage with its own parameters as tensors ([R] each): no row subsets, no Python branches on
data, no device RNG state. The draw is the exponential race the CPU sampler uses (argmax p_i / E_i), with its
uniforms from a counter-based hash of a per-row 32-bit key and the token id. The worker derives the key from
(seed, step) for seeded rows, so a seeded request gets the same tokens whatever else is in the batch; unseeded rows
get a fresh random key each step. The draws differ from the CPU sampler's (another noise source); greedy agrees.

Penalties, logit bias and min_tokens are not here: rows that use them are sampled on the host (see model_runner).
"""
from __future__ import annotations

import hashlib
import math

import torch

# murmur3's 32-bit finalizer constants, as signed int32 (the tensors are int32, and their products wrap).
_M1, _M2, _GOLDEN = 0x85EBCA6B - 2**32, 0xC2B2AE35 - 2**32, 0x9E3779B9 - 2**32


def seed_key(seed: int, step: int) -> int:
    """The 32-bit key of a seeded row at a step: one stream per (seed, step), like the CPU sampler's generators."""
    digest = hashlib.blake2b(f"{seed}/{step}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little", signed=True)


def sample(
    logits: torch.Tensor,  # float32 [R, V]
    temperature: torch.Tensor,  # float32 [R]; 0 = greedy
    top_k: torch.Tensor,  # int32 [R]; <= 0 = off
    top_p: torch.Tensor,  # float32 [R]; 1 = off
    min_p: torch.Tensor,  # float32 [R]; 0 = off
    keys: torch.Tensor,  # int32 [R]
    num_top: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(token ids [R], their raw logprobs [R], top ids [R, num_top], top logprobs [R, num_top])."""
    vocab = logits.shape[-1]
    raw = logits.log_softmax(dim=-1)
    x = logits / temperature.clamp_min(1e-6)[:, None]

    # Top-k then top-p on one full sort; a static shape costs a little more than the CPU sampler's partial sort.
    sorted_x, order = x.sort(dim=-1, descending=True)
    rank = torch.arange(vocab, device=x.device)[None, :]
    k = torch.where(top_k > 0, top_k.clamp_max(vocab), vocab)
    sorted_x = sorted_x.masked_fill(rank >= k[:, None], -math.inf)
    probs = sorted_x.softmax(dim=-1)
    p = top_p[:, None]
    sorted_x = sorted_x.masked_fill((probs.cumsum(dim=-1) - probs >= p) & (p < 1.0), -math.inf)
    x = torch.full_like(x, -math.inf).scatter(-1, order, sorted_x)

    # p >= min_p * p_max  <=>  logit >= max logit + log(min_p); log(0) = -inf keeps everything.
    x = x.masked_fill(x < (x.amax(dim=-1) + min_p.log())[:, None], -math.inf)

    noise = -_uniform(keys, vocab).log()  # Exponential(1)
    drawn = (x.softmax(dim=-1) / noise).argmax(dim=-1)
    tokens = torch.where(temperature == 0.0, logits.argmax(dim=-1), drawn)
    top_values, top_ids = raw.topk(num_top, dim=-1)
    return tokens, raw.gather(1, tokens[:, None]).squeeze(1), top_ids, top_values


def _uniform(keys: torch.Tensor, n: int) -> torch.Tensor:
    """[R, n] floats in (0, 1), a pure function of (key, column): 24 bits of a murmur3-mixed hash."""
    column = _fmix32(torch.arange(n, dtype=torch.int32, device=keys.device) * _GOLDEN)
    bits = _fmix32(column[None, :] ^ keys[:, None])
    return (((bits >> 8) & 0xFFFFFF).float() + 0.5) * 2.0**-24


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    """murmur3's finalizer on int32 (masks turn the arithmetic shifts into logical ones)."""
    h = h ^ ((h >> 16) & 0xFFFF)
    h = h * _M1
    h = h ^ ((h >> 13) & 0x7FFFF)
    h = h * _M2
    return h ^ ((h >> 16) & 0xFFFF)
