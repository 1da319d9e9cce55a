"""The in-process wiring: the one engine module that reaches into the worker role.

By default the engine drives a worker in its own process, with no network hop; everything else in the engine
talks to a worker only through the step contract (tessera.step), in-process or over gRPC.
"""
from __future__ import annotations

from tessera.engine.engine import EngineConfig, WorkerClient


def worker_config(config: EngineConfig):
    """The worker's share of the engine's configuration."""
    from tessera.worker.worker import WorkerConfig

    return WorkerConfig(config.model, config.dtype, config.device, config.block_size, config.kv_cache_memory,
                        config.num_kv_blocks, config.enforce_eager, config.cpu_matmul, config.quantization,
                        kv_cache_dtype=config.kv_cache_dtype)


def make_local_worker(config: EngineConfig) -> WorkerClient:
    """The in-process worker for the configured device: XLA needs its own static-shape runner."""
    from tessera.worker.device import resolve_device

    if resolve_device(config.device).type == "xla":
        from tessera.worker.xla.model_runner import XlaWorker, xla_config_for

        return XlaWorker(worker_config(config), xla_config_for(config))
    from tessera.worker.worker import Worker

    return Worker(worker_config(config))
