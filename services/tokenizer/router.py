"""Which engine gets the next request: the least loaded one that is up.

Loads come from Engine/GetLoad, polled in the background so that choosing costs nothing on the request path;
between polls, the requests this tokenizer itself sent count too, so a burst does not pile onto one engine.
An engine whose call fails with UNAVAILABLE is marked down until a poll finds it answering again.
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

import grpc

from tessera.engine.v1 import engine_pb2, engine_pb2_grpc
from tessera.serving import CHANNEL_OPTIONS

log = logging.getLogger("tessera.tokenizer")


@dataclass
class EngineHandle:
    address: str
    channel: grpc.aio.Channel
    stub: engine_pb2_grpc.EngineStub
    up: bool = False
    queued: int = 0  # running + waiting at the last poll
    in_flight: int = 0  # calls this tokenizer has open on it now
    info: engine_pb2.GetModelInfoResponse | None = field(default=None, repr=False)

    @property
    def load(self) -> int:
        return max(self.queued, 0) + self.in_flight


class EngineRouter:
    def __init__(self, addresses: list[str], poll_seconds: float = 0.5):
        self.engines = []
        for address in addresses:
            channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
            self.engines.append(EngineHandle(address, channel, engine_pb2_grpc.EngineStub(channel)))
        self.poll_seconds = poll_seconds
        self._poller: asyncio.Task | None = None

    async def start(self) -> None:
        await self.poll()
        self._poller = asyncio.create_task(self._poll_forever())

    async def close(self) -> None:
        if self._poller:
            self._poller.cancel()
        for engine in self.engines:
            await engine.channel.close()

    async def poll(self) -> None:
        await asyncio.gather(*(self._poll_one(engine) for engine in self.engines))

    async def _poll_one(self, engine: EngineHandle) -> None:
        try:
            load = await engine.stub.GetLoad(engine_pb2.GetLoadRequest(), timeout=2)
            if engine.info is None:
                engine.info = await engine.stub.GetModelInfo(engine_pb2.GetModelInfoRequest(), timeout=2)
        except grpc.aio.AioRpcError as error:
            if engine.up:
                log.warning("engine %s is down: %s", engine.address, error.code().name)
            engine.up = False
            return
        if not engine.up:
            log.info("engine %s is up", engine.address)
        engine.up, engine.queued = True, load.num_running + load.num_waiting

    async def _poll_forever(self) -> None:
        while True:
            await asyncio.sleep(self.poll_seconds)
            await self.poll()

    def candidates(self) -> list[EngineHandle]:
        """Engines to try, best first: those up by load, then the ones believed down (they may be back)."""
        return sorted(self.engines, key=lambda e: (not e.up, e.load))

    def mark_down(self, engine: EngineHandle) -> None:
        engine.up = False

    def any_info(self) -> engine_pb2.GetModelInfoResponse | None:
        return next((e.info for e in self.engines if e.info is not None), None)
