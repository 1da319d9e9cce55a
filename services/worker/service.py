"""tessera.worker.v1.Worker over grpc.aio: a Worker in its own process, driven by one engine.

Steps run on one dedicated thread (the model loads there too), so the event loop stays free for health checks,
all torch compute stays on one thread, and a step still running for a stream that just went away finishes
before the next stream's first step (or its reset) can start.
"""
from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor

import grpc

from tessera.limits import MAX_WORKER_REQUEST_BYTES
from tessera.serving import RpcError, Server, rpc_method
from tessera.step import plan_from_proto, result_to_proto
from tessera.worker.v1 import worker_pb2, worker_pb2_grpc
from tessera.worker.worker import Worker, WorkerConfig

log = logging.getLogger("tessera.worker")

# On SIGTERM there is no point in waiting for the engine's stream: it never ends by itself, and the engine
# fails its requests once the worker goes, whenever that is.
GRACE_SECONDS = 2.0


def describe(worker: Worker) -> worker_pb2.DescribeResponse:
    """The loaded model and the KV cache of an in-process Worker."""
    mc = worker.model_config
    return worker_pb2.DescribeResponse(
        model_path=str(mc.model_dir),
        architecture=mc.architecture,
        vocab_size=mc.vocab_size,
        max_model_len=mc.max_model_len,
        eos_token_ids=mc.eos_token_ids,
        dtype=str(mc.dtype).removeprefix("torch."),
        device=str(worker.device),
        attention_backend=worker.attn_backend.name,
        num_blocks=worker.num_blocks,
        block_size=worker.block_size,
        kv_bytes_per_token=mc.kv_bytes_per_token,
        kv_cache_bytes=worker.num_blocks * worker.block_size * mc.kv_bytes_per_token,
    )


class WorkerService(worker_pb2_grpc.WorkerServicer):
    def __init__(self, worker: Worker | None = None):
        self.worker = worker  # None while the model loads
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="tessera-worker")
        self._engine_connected = False

    def _ready(self) -> Worker:
        if self.worker is None:
            raise RpcError(grpc.StatusCode.UNAVAILABLE, "the worker is still loading its model")
        return self.worker

    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    @rpc_method
    async def Execute(self, request_iterator, context):
        worker = self._ready()
        if self._engine_connected:
            raise RpcError(grpc.StatusCode.FAILED_PRECONDITION,
                           "another engine is driving this worker (one Execute stream at a time)")
        self._engine_connected = True
        try:
            # A new stream is a new engine connection: whatever the last one left running is gone.
            await self._run(worker.requests.clear)
            async for request in request_iterator:
                result = await self._run(worker.execute, plan_from_proto(request.plan))
                yield worker_pb2.ExecuteResponse(result=result_to_proto(result))
        finally:
            self._engine_connected = False

    @rpc_method
    async def Describe(self, request, context):
        return describe(self._ready())


async def start_worker_server(config: WorkerConfig, port: int = 0, host: str = "[::]",
                              grace_seconds: float = GRACE_SECONDS,
                              max_request_bytes: int = MAX_WORKER_REQUEST_BYTES,
                              tls=None) -> tuple[Server, int]:
    """Binds (health NOT_SERVING), loads the model off the event loop, turns SERVING; returns the bound port."""
    server = Server(port, host, grace_seconds, max_request_bytes, tls=tls)
    service = WorkerService()
    server.add_servicer(service, worker_pb2.DESCRIPTOR.services_by_name["Worker"])
    port = await server.start()
    log.info("worker on port %d (NOT_SERVING while loading); loading %s", port, config.model)
    try:
        # On the thread that will run every step: one OpenMP team in the process (see engine_loop.EngineLoop).
        service.worker = await service._run(Worker, config)
    except BaseException:
        await server.grpc.stop(0)
        raise
    await server.set_serving(True)
    log.info("worker ready on port %d", port)
    return server, port


async def serve_worker(config: WorkerConfig, port: int, host: str = "[::]", metrics_port: int | None = None,
                       grace_seconds: float = GRACE_SECONDS,
                       max_request_bytes: int = MAX_WORKER_REQUEST_BYTES, tls=None) -> None:
    """`tessera worker`: serves until SIGTERM or SIGINT; tls: a serving.ServerTls to serve TLS with."""
    server, _ = await start_worker_server(config, port, host, grace_seconds, max_request_bytes, tls)
    if metrics_port is not None:
        server.serve_metrics(metrics_port)
    await server.serve_until_signalled()
