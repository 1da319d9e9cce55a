"""tessera.engine.v1.Engine over grpc.aio, in front of an EngineLoop running on its own thread.

Each Generate call gets an asyncio queue; the engine thread hops its outputs onto the event loop (one wake-up
per step, loop_outbox.py), so the loop never blocks on a step and a slow stream only delays itself; a stream
that fell behind sends what has queued up as one message per sample. Leaving the stream for any reason (done,
cancelled, deadline, error) aborts whatever is still running, which frees its KV blocks within one step.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import time
import uuid
from dataclasses import replace

import grpc

from tessera.engine.convert import engine_params_from_request, output_to_proto, structured_output_from_proto
from tessera.engine.engine import LLMEngine
from tessera.engine.engine_loop import EngineLoop
from tessera.engine.loop_outbox import LoopOutbox
from tessera.engine.request import RequestOutput
from tessera.engine.v1 import engine_pb2, engine_pb2_grpc
from tessera.limits import (MAX_REQUEST_BYTES, REQUEST_ID_MAX_CHARS, SAMPLE_SUFFIX_CHARS, Limits, check_generation,
                            sample_seed)
from tessera.metrics import TIME_PER_OUTPUT_TOKEN, TIME_TO_FIRST_TOKEN
from tessera.sampling_params import InvalidParam
from tessera.serving import RpcError, request_id_from, rpc_method

log = logging.getLogger("tessera.engine")


class EngineService(engine_pb2_grpc.EngineServicer):
    def __init__(self, max_queue: int = 256, model_name: str = "", limits: Limits = Limits()):
        self.loop: EngineLoop | None = None  # set once the model is loaded
        self.max_queue = max_queue
        self.limits = limits
        self.model_name = model_name
        # Client ids may repeat (two clients, one counter); the engine's own ids add a call number, so a call can
        # only ever abort its own samples. Abort(id) ends every call running under that id.
        self.calls: dict[str, dict[int, list[str]]] = {}  # client request id -> call number -> its samples' ids
        self.call_numbers = itertools.count()

    def attach(self, engine_loop: EngineLoop) -> None:
        """Called on the server's event loop once the model is loaded."""
        self.loop = engine_loop
        self.outbox = LoopOutbox(asyncio.get_running_loop())
        device = getattr(self.engine.worker, "device", None)  # the in-process worker's; a remote one has none
        if getattr(device, "type", None) == "cpu":
            engine_loop.handoff = self.outbox.wait_delivered  # no core to spare: each step's tokens go out first

    @property
    def engine(self) -> LLMEngine:
        if self.loop is None:
            raise RpcError(grpc.StatusCode.UNAVAILABLE, "the engine is still loading its model")
        return self.loop.engine

    @rpc_method
    async def Generate(self, request, context):
        engine = self.engine
        # Bounded work first, before anything is copied, converted or submitted (limits.py). A tokenizer's
        # sample i is "<request_id>@<call tag>/<i>": room for that suffix.
        request_id = (request_id_from(context, request.request_id, REQUEST_ID_MAX_CHARS + SAMPLE_SUFFIX_CHARS)
                      or uuid.uuid4().hex)
        check_generation(request, self.limits)
        n = max(request.n, 1)
        capacity = engine.config.max_num_seqs + self.max_queue
        if n > capacity:  # no retry can fix this one: not RESOURCE_EXHAUSTED
            raise InvalidParam("n", f"{n} samples can never fit: this engine holds at most {capacity} requests "
                                    f"(max_num_seqs {engine.config.max_num_seqs} + max_queue {self.max_queue})")
        params = engine_params_from_request(request, engine.max_model_len)
        prompt = list(request.prompt_token_ids)
        engine.validate(prompt, params)
        spec = structured_output_from_proto(request.structured_output)
        # Compiled off the event loop and the engine thread (cached: a repeated constraint is ready at once);
        # meanwhile the request waits here, outside the batch. Bad or too slow: INVALID_ARGUMENT, nothing ran.
        constraint = await engine.grammars.compile_async(spec) if spec is not None else None
        if self.loop.num_unfinished() + n > capacity:
            raise RpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, f"the queue is full ({self.max_queue} waiting); retry later")

        outputs: asyncio.Queue = asyncio.Queue()
        call = next(self.call_numbers)
        # "<id>#<call>" or "<id>#<call>/<i>": unique whatever the client's id holds, since the call number is.
        ids = [f"{request_id}#{call}"] if n == 1 else [f"{request_id}#{call}/{i}" for i in range(n)]
        self.calls.setdefault(request_id, {})[call] = ids
        unfinished = set()  # the samples this call submitted that have not finished: only these are its to abort
        try:
            for index, engine_id in enumerate(ids):
                # Sample i of a seeded request uses seed + i (wrapped into int64), so the n samples differ but
                # stay reproducible.
                sample_params = params if params.seed is None else replace(params, seed=sample_seed(params.seed, index))
                def sink(out, index=index):
                    self.outbox.put(outputs, (index, out))

                self.loop.submit(prompt, sample_params, sink, engine_id, request.priority, constraint)
                unfinished.add(index)
            start = last = time.perf_counter()
            first = True
            while unfinished:
                for index, out in coalesce([await outputs.get()], outputs):
                    now = time.perf_counter()
                    if out.new_token_ids:
                        (TIME_TO_FIRST_TOKEN.observe(now - start) if first else
                         TIME_PER_OUTPUT_TOKEN.observe(now - last))
                        first, last = False, now
                    if out.finished:
                        unfinished.discard(index)
                    yield output_to_proto(request_id, index, out)
        finally:
            for index in unfinished:
                self.loop.abort(ids[index])
            calls = self.calls[request_id]
            del calls[call]
            if not calls:
                del self.calls[request_id]

    @rpc_method
    async def Abort(self, request, context):
        aborted = 0
        for request_id in request.request_ids:
            for ids in self.calls.get(request_id, {}).values():
                for engine_id in ids:
                    self.loop.abort(engine_id)
                aborted += 1
        return engine_pb2.AbortResponse(num_aborted=aborted)

    @rpc_method
    async def GetModelInfo(self, request, context):
        engine = self.engine
        mc, cfg = engine.model_config, engine.config
        return engine_pb2.GetModelInfoResponse(
            model_name=self.model_name,
            model_path=str(mc.model_dir),
            architecture=mc.architecture,
            max_model_len=engine.max_model_len,
            vocab_size=mc.vocab_size,
            eos_token_ids=mc.eos_token_ids,
            dtype=str(mc.dtype).removeprefix("torch."),
            device=str(getattr(engine.worker, "device", cfg.device)),
            block_size=engine.kv.block_size,
            kv_blocks_total=engine.kv.num_blocks,
            max_num_seqs=cfg.max_num_seqs,
            max_num_batched_tokens=cfg.max_num_batched_tokens,
            max_logprobs=cfg.max_logprobs,
            enable_prefix_caching=cfg.enable_prefix_caching,
            tensor_parallel_size=getattr(engine.worker, "tensor_parallel_size", 1),
        )

    @rpc_method
    async def GetLoad(self, request, context):
        stats = self.engine.stats()
        return engine_pb2.GetLoadResponse(
            num_running=stats["num_running"],
            num_waiting=stats["num_waiting"],
            kv_blocks_in_use=stats["kv_blocks_in_use"],
            kv_blocks_total=stats["kv_blocks_total"],
            prefix_cache_hit_rate=stats["prefix_cache_hit_rate"],
            num_preemptions=stats["num_preemptions"],
        )


def coalesce(first: list, outputs: asyncio.Queue) -> list[tuple[int, RequestOutput]]:
    """The items already waiting, merged per sample: a stream that fell behind sends one message per sample,
    not one per step. Raises the engine's error if one is queued (rpc_method maps it, UNAVAILABLE for a lost
    worker)."""
    merged: dict[int, RequestOutput] = {}
    items = first
    while not outputs.empty():
        items.append(outputs.get_nowait())
    for index, out in items:
        if isinstance(out, BaseException):
            raise out
        merged[index] = merged[index].merged(out) if index in merged else out
    return list(merged.items())


def build_engine(config, worker_address: str | None = None, worker_step_timeout: float = 120.0,
                 worker_tls=None, collective_timeout: float = 60.0) -> LLMEngine:
    if worker_address is None and config.tensor_parallel_size > 1:
        from tessera.engine.worker_group import LocalWorkerGroup

        return LLMEngine(config, worker=LocalWorkerGroup(config, worker_step_timeout, collective_timeout))
    if worker_address is None:
        return LLMEngine(config)
    from tessera.engine.remote_worker import RemoteWorker

    worker = RemoteWorker(worker_address, step_timeout=worker_step_timeout, tls=worker_tls)
    if config.tensor_parallel_size not in (1, worker.tensor_parallel_size):
        worker.close()
        raise ValueError(f"--tensor-parallel-size {config.tensor_parallel_size}, but the worker at {worker_address} "
                         f"is rank 0 of a group of {worker.tensor_parallel_size}")
    return LLMEngine(config, worker=worker)


async def follow_worker(server, worker, every_s: float = 0.5) -> None:
    """The engine is SERVING while its remote worker (or each rank of its group) is: NOT_SERVING while one is
    down or restarting, and SERVING again, without an engine restart, once it is back."""
    serving = True
    while True:
        await asyncio.sleep(every_s)
        healthy = await asyncio.to_thread(worker.healthy)
        if healthy != serving and not server.gate.draining:
            serving = healthy
            await server.set_serving(serving)
            log.warning("worker %s: engine %s", "back" if serving else "down", "SERVING" if serving else "NOT_SERVING")


def warm_up(engine: LLMEngine) -> None:
    """One short request through every stage, so the first client does not pay for lazy initialisation."""
    from tessera.engine.kv_cache_manager import PrefixCacheStats
    from tessera.sampling_params import SamplingParams

    engine.generate([[0] * 8], SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True))
    engine.kv.reset_prefix_cache()
    engine.kv.stats = PrefixCacheStats()


async def serve_engine(config, port: int, *, worker_address: str | None = None, host: str = "[::]",
                       metrics_port: int | None = None, max_queue: int = 256, model_name: str | None = None,
                       grace_seconds: float = 30.0, worker_step_timeout: float = 120.0,
                       limits: Limits = Limits(), max_request_bytes: int = MAX_REQUEST_BYTES,
                       tls=None, worker_tls=None, collective_timeout: float = 60.0) -> None:
    """tls: a serving.ServerTls to serve TLS with; worker_tls: a serving.ClientTls for the remote worker."""
    from pathlib import Path

    from tessera.serving import Server

    server = Server(port, host, grace_seconds, max_request_bytes, tls=tls)
    service = EngineService(max_queue, model_name or "", limits)
    server.add_servicer(service, engine_pb2.DESCRIPTOR.services_by_name["Engine"])
    bound = await server.start()
    log.info("engine on port %d (NOT_SERVING while loading); loading %s", bound, config.model)
    started = time.perf_counter()

    def build() -> LLMEngine:  # on the engine loop's thread, which runs all of the engine's compute
        engine = build_engine(config, worker_address, worker_step_timeout, worker_tls, collective_timeout)
        log.info("model loaded in %.1f s; warming up", time.perf_counter() - started)
        warm_up(engine)
        return engine

    engine_loop = EngineLoop(build)
    try:
        engine = await asyncio.wrap_future(engine_loop.ready)
    except BaseException:
        engine_loop.shutdown()
        await server.grpc.stop(0)
        raise
    service.model_name = service.model_name or Path(engine.model_config.model_dir).name
    service.attach(engine_loop)
    if metrics_port:
        server.serve_metrics(metrics_port, engine.stats)
    await server.set_serving(True)
    log.info("engine ready on port %d (%.1f s)", bound, time.perf_counter() - started)
    follower = asyncio.create_task(follow_worker(server, engine.worker)) if hasattr(engine.worker, "healthy") else None
    try:
        await server.serve_until_signalled()
    finally:
        if follower is not None:
            follower.cancel()
        engine_loop.shutdown()
        if hasattr(engine.worker, "close"):  # a worker group's processes go with the engine
            engine.worker.close()
