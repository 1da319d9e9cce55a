"""Prometheus metrics, served on --metrics-port (metrics_server.py). Engine gauges are read at scrape time, so steps pay nothing."""
from __future__ import annotations

from typing import Callable

from prometheus_client import Counter, Histogram
from prometheus_client.core import REGISTRY, GaugeMetricFamily

REQUESTS = Counter("tessera_requests", "Finished RPCs by method and gRPC status code", ["method", "code"])
TIME_TO_FIRST_TOKEN = Histogram(
    "tessera_time_to_first_token_seconds", "From request arrival to its first generated token",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
TIME_PER_OUTPUT_TOKEN = Histogram(
    "tessera_time_per_output_token_seconds", "Between consecutive generated tokens of one request",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)

# A worker process's steps (rank 0 of a tensor-parallel group: the ranks run in lockstep, so its step time is
# the group's), and how much of that went to collectives (waiting for the other ranks included).
WORKER_STEP = Histogram(
    "tessera_worker_step_seconds", "One step on the worker: plan in, sampled tokens out",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10),
)
COLLECTIVE_SECONDS = Counter("tessera_collective_seconds",
                             "Tensor parallelism: time rank 0 spent in all-reduces, gathers and broadcasts")

GAUGES = {
    "num_running": "Requests running in the current step set",
    "num_waiting": "Requests queued, not yet admitted (the queue length)",
    "kv_blocks_in_use": "KV blocks held by live requests",
    "kv_blocks_total": "KV blocks in the cache",
    "prefix_cache_hit_rate": "Prompt tokens found in the prefix cache / prompt tokens looked up",
    "num_preemptions": "Requests preempted since start",
}


class StatsCollector:
    def __init__(self, stats: Callable[[], dict[str, float]]):
        self.stats = stats

    def collect(self):
        values = self.stats()
        for name, help_text in GAUGES.items():
            if name in values:
                yield GaugeMetricFamily(f"tessera_{name}", help_text, value=values[name])


def register_stats(stats: Callable[[], dict[str, float]]) -> None:
    """The engine's gauges, read at each scrape (the endpoint: metrics_server.py, started by Server)."""
    REGISTRY.register(StatsCollector(stats))
