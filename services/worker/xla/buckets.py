"""Bucket sizes that token and request counts are padded to, so that XLA sees a few static shapes.

Sizes double from `min_size` while they stay within `padding_gap`, then grow by multiples of it: small batches
waste little padding, large ones need few graphs. The last bucket is `max_size` itself, so every count fits:

>>> padding_buckets(16, 1000, 256)
[16, 32, 64, 128, 256, 512, 768, 1000]
>>> padding_buckets(1, 8, 0)  # no gap: powers of two all the way
[1, 2, 4, 8]
>>> pick_bucket(100, [16, 32, 64, 128, 256])
128
"""
from __future__ import annotations

import bisect


def padding_buckets(min_size: int, max_size: int, padding_gap: int) -> list[int]:
    """Ascending sizes from min_size to max_size (both included); padding_gap <= 0 means powers of two only."""
    if not 1 <= min_size <= max_size:
        raise ValueError(f"bucket sizes need 1 <= min_size <= max_size, got {min_size} and {max_size}")
    buckets = [min_size]
    while buckets[-1] < max_size:
        last = buckets[-1]
        doubling = padding_gap <= 0 or 2 * last <= padding_gap
        buckets.append(min(2 * last if doubling else (last // padding_gap + 1) * padding_gap, max_size))
    return buckets


def pick_bucket(n: int, buckets: list[int]) -> int:
    """The smallest bucket that holds n."""
    i = bisect.bisect_left(buckets, n)
    if i == len(buckets):
        raise ValueError(f"{n} exceeds the largest bucket {buckets[-1]}")
    return buckets[i]
