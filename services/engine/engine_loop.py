"""Runs an LLMEngine on its own thread so that callers can stream and abort while it steps.

Callers hand in a sink per request (a function called with each RequestOutput, on the engine thread). A sync
caller uses `stream()`; an asyncio server passes a sink that hops onto its event loop, so the engine never
blocks the event loop and a slow consumer never stalls the other streams.
"""
from __future__ import annotations

import logging
import queue
import threading
import uuid
from concurrent.futures import Future
from typing import Callable, Iterator, Sequence

from tessera.engine.engine import LLMEngine
from tessera.engine.request import RequestOutput
from tessera.engine.structured_output import CompiledConstraint
from tessera.sampling_params import InvalidParam, SamplingParams

log = logging.getLogger("tessera.engine")

Sink = Callable[[RequestOutput | BaseException], None]


class EngineLoop:
    """`engine`: an LLMEngine, or a function that builds one, called on the loop's own thread (`ready` tells when
    it is built and warmed up). A server passes the function, so that every torch op of the process (the model
    load, the warm-up, each step) runs on this one thread. That keeps OpenMP fast: libgomp gives each thread that
    starts parallel regions its own team, and once it manages more threads than there are CPUs it stops letting
    them spin between regions, which put a ~0.15 ms wake-up on every parallel op (matmuls included); a batch-1
    decode ran ~30% slower on a second thread than on the first (bench/served_throughput.py, its one-stream line).

    `handoff`, if set, is called on this thread after a step that delivered 1..HANDOFF_MAX_OUTPUTS outputs and
    may block until the consumers have taken them (LoopOutbox.wait_delivered). A server computing on the CPU sets
    it: there the step's OpenMP team fills every core, and the event loop, left to find a core of its own while
    the next steps run, got to a fast model's stream only every few steps, so that its tokens left in bursts
    (16 steps merged into one message on the 2-core EPYC Zen 5). Waiting costs nothing measurable: a served
    bf16 stream ran at 0.98-1.00x of the loop without it (30 alternating rounds). Bigger steps do not wait:
    their streams are many and the steps long."""

    HANDOFF_MAX_OUTPUTS = 4

    def __init__(self, engine: LLMEngine | Callable[[], LLMEngine]):
        self.ready: Future = Future()
        if isinstance(engine, LLMEngine):
            self.engine = engine
            self.ready.set_result(engine)
        else:
            self._build = engine
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._sinks: dict[str, Sink] = {}  # owned by the engine thread
        self._live_ids: set[str] = set()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = False
        self.handoff: Callable[[], None] | None = None
        self._thread = threading.Thread(target=self._run, name="tessera-engine", daemon=True)
        self._thread.start()

    def submit(
        self,
        prompt_token_ids: Sequence[int],
        params: SamplingParams,
        sink: Sink,
        request_id: str | None = None,
        priority: int = 0,
        constraint: CompiledConstraint | None = None,
    ) -> str:
        """Validates in the caller's thread (raising InvalidParam), then queues the request for the engine. A
        structured output comes compiled (engine.grammars), so that nothing slow runs on the engine thread."""
        self.engine.validate(prompt_token_ids, params)
        request_id = request_id or uuid.uuid4().hex
        with self._lock:
            if request_id in self._live_ids:
                raise InvalidParam("request_id", f"{request_id!r} is already running")
            self._live_ids.add(request_id)
        self._send(("add", self.engine.new_request(request_id, prompt_token_ids, params, priority, constraint), sink))
        return request_id

    def abort(self, request_id: str) -> None:
        self._send(("abort", request_id))

    def stream(self, prompt_token_ids: Sequence[int], params: SamplingParams, **kwargs) -> Iterator[RequestOutput]:
        """Yields outputs as they come; closing the iterator early aborts the request."""
        outputs: queue.SimpleQueue = queue.SimpleQueue()
        request_id = self.submit(prompt_token_ids, params, outputs.put, **kwargs)
        finished = False
        try:
            while not finished:
                out = outputs.get()
                if isinstance(out, BaseException):
                    raise out
                finished = out.finished
                yield out
        finally:
            if not finished:
                self.abort(request_id)

    def num_unfinished(self) -> int:
        with self._lock:
            return len(self._live_ids)

    def shutdown(self) -> None:
        self._stopping = True
        self._wake.set()
        self._thread.join()

    def _send(self, command: tuple) -> None:
        self._inbox.put(command)
        self._wake.set()

    def _run(self) -> None:
        if not self.ready.done():
            if not self.ready.set_running_or_notify_cancel():
                return  # nobody waits for this engine any more
            try:
                self.engine = self._build()
            except BaseException as error:
                self.ready.set_exception(error)
                return
            self.ready.set_result(self.engine)
        while not self._stopping:
            self._drain_inbox()
            if not self.engine.has_unfinished_requests():
                self._wake.wait()
                self._wake.clear()
                continue
            try:
                outputs = self.engine.step()
            except Exception as error:  # a broken worker fails every request rather than hanging them
                log.exception("engine step failed")
                self._fail_all(error)
                continue
            for out in outputs:
                self._deliver(out)
            if self.handoff is not None and 0 < len(outputs) <= self.HANDOFF_MAX_OUTPUTS:
                self.handoff()

    def _drain_inbox(self) -> None:
        while True:
            try:
                command = self._inbox.get_nowait()
            except queue.Empty:
                return
            if command[0] == "add":
                _, request, sink = command
                self._sinks[request.request_id] = sink
                self.engine.scheduler.add(request)
            else:
                final = self.engine.abort_request(command[1])
                if final is not None:
                    self._deliver(final)

    def _deliver(self, out: RequestOutput) -> None:
        sink = self._sinks.get(out.request_id)
        if out.finished:
            self._sinks.pop(out.request_id, None)
            with self._lock:
                self._live_ids.discard(out.request_id)
        if sink is not None:
            try:
                sink(out)
            except Exception:  # a consumer's failure is its own; the engine goes on
                log.exception("sink for %s failed", out.request_id)

    def _fail_all(self, error: Exception) -> None:
        for request_id in list(self._sinks):
            self.engine.abort_request(request_id)
            sink = self._sinks.pop(request_id)
            with self._lock:
                self._live_ids.discard(request_id)
            sink(error)
        # The worker may have restarted with empty KV tensors: cached blocks would then point at nothing.
        self.engine.kv.reset_prefix_cache()
