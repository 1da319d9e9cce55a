"""Hands engine-thread outputs to asyncio queues with one event-loop wake-up per burst, not one per token.

A decode step yields one output per running request; waking the event loop for each (a self-pipe write and a
loop iteration apiece) made streaming cost grow with the batch. The engine thread appends to a shared list and
schedules a single flush while none is pending; the flush fans the items out to their queues.

`wait_delivered` lets the engine thread wait until the loop has taken what it put and run the streams it woke,
for when the machine has no core to spare for doing that alongside the next step (see EngineLoop).
"""
from __future__ import annotations

import asyncio
import threading


class LoopOutbox:
    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self._lock = threading.Lock()
        self._pending: list[tuple[asyncio.Queue, object]] = []
        self._delivered = threading.Event()
        self._delivered.set()

    def put(self, queue: asyncio.Queue, item: object) -> None:
        """Thread-safe: item reaches queue.put_nowait on the loop, in the order of put calls."""
        with self._lock:
            self._pending.append((queue, item))
            if len(self._pending) > 1:
                return  # a flush is already scheduled and will take this item too
            self._delivered.clear()
        self._loop.call_soon_threadsafe(self._flush)

    def _flush(self) -> None:
        with self._lock:
            items, self._pending = self._pending, []
        for queue, item in items:
            queue.put_nowait(item)
        # The streams woken above run before this callback, in the order call_soon queued them.
        self._loop.call_soon(self._mark_delivered)

    def _mark_delivered(self) -> None:
        with self._lock:
            if not self._pending:  # else items put since the flush wait for the flush they scheduled
                self._delivered.set()

    def wait_delivered(self, timeout: float = 0.05) -> None:
        """From another thread: returns once the items put so far reached their queues and the consumers they
        woke have run up to their next await (a stream: its message handed to gRPC), or after `timeout` seconds."""
        self._delivered.wait(timeout)
