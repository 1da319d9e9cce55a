"""tessera.worker.v1.Worker over grpc.aio: a Worker in its own process, driven by one engine.

Steps run on one dedicated thread (the model loads there too), so the event loop stays free for health checks,
all torch compute stays on one thread, and a step still running for a stream that just went away finishes
before the next stream's first step (or its reset) can start.
"""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import grpc

from tessera.limits import MAX_WORKER_REQUEST_BYTES
from tessera.metrics import COLLECTIVE_SECONDS, WORKER_STEP
from tessera.serving import RpcError, Server, rpc_method
from tessera.step import plan_from_proto, result_to_proto
from tessera.worker.v1 import worker_pb2, worker_pb2_grpc
from tessera.worker.device import resolve_device
from tessera.worker.tensor_parallel import init_tensor_parallel
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
        tensor_parallel_size=worker.tp.size,
    )


class GroupBroken(RpcError):
    """A step failed on a tensor-parallel group: a rank died or hung at a collective (or failed itself), and the
    ranks are no longer in step. Only a restart of the group mends that."""

    def __init__(self, error: BaseException):
        super().__init__(grpc.StatusCode.UNAVAILABLE, f"the tensor-parallel group broke during a step (a rank died, "
                                                      f"hung or failed; the group restarts): {error}")


def step(worker: Worker, message: worker_pb2.StepPlan):
    """One step, on the worker's thread: a plan of up to --max-request-bytes takes a while to convert. Checked
    first (InvalidParam: INVALID_ARGUMENT), since whoever connects can send one."""
    plan = plan_from_proto(message)
    worker.check_plan(plan)
    if worker.tp.size == 1:
        return worker.execute(plan)
    try:
        return worker.execute(plan)
    except Exception as error:
        raise GroupBroken(error) from error


class WorkerService(worker_pb2_grpc.WorkerServicer):
    def __init__(self, worker: Worker | None = None):
        self.worker = worker  # None while the model loads
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="tessera-worker")
        self._engine_connected = False
        self.broken = False  # a tensor-parallel step failed: this process is on its way out
        self.last_step = time.monotonic()

    async def keep_ranks_waiting(self, every_s: float) -> None:
        """Tensor parallelism: while no step runs, tell the other ranks so now and then, so that their wait for
        the next plan (a collective with a timeout) never times out on an idle engine."""
        while not self.broken:
            await asyncio.sleep(every_s)
            if time.monotonic() - self.last_step >= every_s and not self.broken:
                await self._run(self.worker.keepalive)
                self.last_step = time.monotonic()

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
            await self._run(worker.reset)
            async for request in request_iterator:
                try:
                    started, collectives = time.perf_counter(), worker.tp.collective_seconds
                    result = await self._run(step, worker, request.plan)
                    WORKER_STEP.observe(time.perf_counter() - started)
                    COLLECTIVE_SECONDS.inc(worker.tp.collective_seconds - collectives)
                    self.last_step = time.monotonic()
                except GroupBroken as error:
                    self.broken = True
                    log.error("%s; stopping this rank so that the group restarts", error)
                    os.kill(os.getpid(), signal.SIGTERM)  # health NOT_SERVING now, then exit (drain)
                    raise
                yield worker_pb2.ExecuteResponse(result=result_to_proto(result))
        finally:
            self._engine_connected = False

    @rpc_method
    async def Describe(self, request, context):
        return describe(self._ready())


def make_worker(config: WorkerConfig) -> Worker:
    """This process's Worker; with tensor_parallel_size > 1, rank $RANK of the group, joined first."""
    backend = "nccl" if resolve_device(config.device).type == "cuda" else "gloo"
    tp = init_tensor_parallel(config.tensor_parallel_size, backend=backend, timeout_s=config.collective_timeout)
    if tp.size > 1:
        log.info("tensor-parallel rank %d of %d", tp.rank, tp.size)
    return Worker(config, tp=tp)


def follow(config: WorkerConfig) -> None:
    """`tessera worker` as a tensor-parallel rank other than 0: no server; it runs the steps rank 0 broadcasts,
    and exits when rank 0 stops the group (0) or the group breaks (1: whoever supervises restarts the group)."""
    worker = make_worker(config)
    try:
        worker.follow()
    except Exception as error:
        log.error("rank %d: the tensor-parallel group broke: %s", worker.tp.rank, error)
        sys.exit(1)
    log.info("rank %d: rank 0 stopped the group", worker.tp.rank)


async def start_worker_server(config: WorkerConfig, port: int = 0, host: str = "[::]",
                              grace_seconds: float = GRACE_SECONDS,
                              max_request_bytes: int = MAX_WORKER_REQUEST_BYTES,
                              tls=None, with_service: bool = False) -> tuple[Server, int]:
    """Binds (health NOT_SERVING), loads the model off the event loop, turns SERVING; returns the bound port.
    Under tensor parallelism this is rank 0, and loading waits for the other ranks to join."""
    server = Server(port, host, grace_seconds, max_request_bytes, tls=tls)
    service = WorkerService()
    server.add_servicer(service, worker_pb2.DESCRIPTOR.services_by_name["Worker"])
    port = await server.start()
    log.info("worker on port %d (NOT_SERVING while loading); loading %s", port, config.model)
    try:
        # On the thread that will run every step: one OpenMP team in the process (see engine_loop.EngineLoop).
        service.worker = await service._run(make_worker, config)
    except BaseException:
        await server.grpc.stop(0)
        raise
    await server.set_serving(True)
    log.info("worker ready on port %d", port)
    return (server, service) if with_service else (server, port)


async def serve_worker(config: WorkerConfig, port: int, host: str = "[::]", metrics_port: int | None = None,
                       grace_seconds: float = GRACE_SECONDS,
                       max_request_bytes: int = MAX_WORKER_REQUEST_BYTES, tls=None) -> None:
    """`tessera worker`: serves until SIGTERM or SIGINT; tls: a serving.ServerTls to serve TLS with."""
    server, service = await start_worker_server(config, port, host, grace_seconds, max_request_bytes, tls,
                                                with_service=True)
    if metrics_port is not None:
        server.serve_metrics(metrics_port)
    keepalive = asyncio.create_task(service.keep_ranks_waiting(config.collective_timeout / 4)) \
        if config.tensor_parallel_size > 1 else None
    await server.serve_until_signalled()
    if keepalive is not None:
        keepalive.cancel()
    if not service.broken:  # the other ranks exit too (a broken group's do on their own)
        try:
            await service._run(service.worker.stop_followers)
        except RuntimeError as error:  # one had gone already
            log.info("stopping the other ranks: %s", error)
