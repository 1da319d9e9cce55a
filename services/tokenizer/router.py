"""Which engine gets the next request: the least loaded one that is up.

Loads come from Engine/GetLoad, polled in the background so that choosing costs nothing on the request path;
between polls, the requests this tokenizer itself sent count too, so a burst does not pile onto one engine.
An engine whose call fails with UNAVAILABLE is marked down until a poll finds it answering again.

An `--engine dns:///host:port` (or `dns:host:port`) is resolved here, not by gRPC, into one engine per address,
so requests balance across the pods behind a headless Service (gRPC's pick_first would stick to one). It is
re-resolved every few seconds, and at once while all its engines are down. An address that leaves the answer
(a draining pod) takes no new requests; its channel closes once the calls it carries have ended. With TLS, such a
channel dials the IP address but checks the engine's certificate against the DNS name (the certificates name the
Service, not pod IPs). When the TLS files change (a rotated client certificate), every engine gets a new channel
made with them, and the old one closes once its calls have ended: gRPC would otherwise keep presenting the old
certificate each time it reconnects.
"""
from __future__ import annotations

import asyncio
import logging
import re
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import grpc

from tessera.engine.v1 import engine_pb2, engine_pb2_grpc
from tessera.serving import CHANNEL_OPTIONS, ClientTls

log = logging.getLogger("tessera.tokenizer")

# dns:///host:port or dns:host:port; dns://server/host:port (a DNS server of its own) is left to gRPC.
DNS_TARGET = re.compile(r"dns:(?:///)?(\[[^\]/]+\]|[^:/\[\]]+):(\d+)")
Resolver = Callable[[str, int], Awaitable[list[str]]]  # (host, port) -> IP addresses
# gRPC's default reconnect backoff grows to 120 s, so an engine back from a long outage (a restart that loads a
# big model) would stay unused for up to two minutes more; redial a down engine at least every 2 s instead.
ENGINE_CHANNEL = [*CHANNEL_OPTIONS, ("grpc.initial_reconnect_backoff_ms", 500), ("grpc.min_reconnect_backoff_ms", 500),
                  ("grpc.max_reconnect_backoff_ms", 2000)]


async def resolve_host(host: str, port: int) -> list[str]:
    """The system resolver (hosts file, search domains, as gRPC's would), off the event loop."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [info[4][0] for info in infos if info[0] in (socket.AF_INET, socket.AF_INET6)]


@dataclass
class DnsTarget:
    name: str  # as given, for logs
    host: str
    port: int
    next_resolve: float = 0.0
    failing: bool = False  # warn once per streak of failed resolutions


@dataclass
class EngineHandle:
    address: str
    channel: grpc.aio.Channel
    stub: engine_pb2_grpc.EngineStub
    up: bool = False
    queued: int = 0  # running + waiting at the last poll
    in_flight: int = 0  # calls this tokenizer has open on it now
    info: engine_pb2.GetModelInfoResponse | None = field(default=None, repr=False)
    target: DnsTarget | None = field(default=None, repr=False)  # the DNS name it came from
    leaving: bool = False  # gone from DNS: no new calls; closed once in_flight is 0

    @property
    def load(self) -> int:
        return max(self.queued, 0) + self.in_flight


def address_of(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


class EngineRouter:
    def __init__(self, addresses: list[str], poll_seconds: float = 0.5, resolve_seconds: float = 5.0,
                 resolve: Resolver = resolve_host, tls: ClientTls | None = None):
        self.tls = tls
        self.tls_stamp = tls.stamp() if tls is not None else None
        self.engines: list[EngineHandle] = []  # replaced, never changed in place: iterating it needs no copy
        self.targets: list[DnsTarget] = []
        for address in addresses:
            if match := DNS_TARGET.fullmatch(address):
                self.targets.append(DnsTarget(address, match[1].strip("[]"), int(match[2])))
            else:
                self.engines.append(self._open(address))  # gRPC resolves it: one engine
        self.poll_seconds = poll_seconds
        self.resolve_seconds = resolve_seconds
        self._resolve = resolve
        self._tasks: list[asyncio.Task] = []

    def _open(self, address: str, target: DnsTarget | None = None) -> EngineHandle:
        if self.tls is None:
            channel = grpc.aio.insecure_channel(address, options=ENGINE_CHANNEL)
        else:
            # A resolved address is an IP: the certificate is checked against the name it was resolved from.
            name = [("grpc.ssl_target_name_override", target.host)] if target is not None else []
            channel = grpc.aio.secure_channel(address, self.tls.credentials(), options=[*ENGINE_CHANNEL, *name])
        return EngineHandle(address, channel, engine_pb2_grpc.EngineStub(channel), target=target)

    async def start(self) -> None:
        await self.resolve()
        await self.poll()
        # Apart, so that a slow DNS server does not hold up the load polls.
        self._tasks = [asyncio.create_task(self._every_poll(self.poll)),
                       asyncio.create_task(self._every_poll(self.resolve))]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for engine in self.engines:
            await engine.channel.close()

    async def poll(self) -> None:
        if self.tls is not None and self.tls.stamp() != self.tls_stamp:
            self._redial()
        gone = [e for e in self.engines if e.leaving and e.in_flight == 0]
        if gone:
            self.engines = [e for e in self.engines if e not in gone]
            await asyncio.gather(*(e.channel.close() for e in gone))
        await asyncio.gather(*(self._poll_one(engine) for engine in self.engines if not engine.leaving))

    def _redial(self) -> None:
        """New channels with the TLS files as they are now; the old ones drain like an engine that left DNS."""
        try:
            if self.tls.cert:  # a certificate written before its key (or after) is not a pair yet
                ssl.create_default_context().load_cert_chain(self.tls.cert, self.tls.key)
            replacements = [(old, self._open(old.address, old.target)) for old in self.engines if not old.leaving]
        except (OSError, ssl.SSLError) as error:  # mid-rotation: try again at the next poll
            log.warning("TLS files changed but cannot be read yet: %s", error)
            return
        self.tls_stamp = self.tls.stamp()
        for old, new in replacements:
            new.up, new.queued, new.info = old.up, old.queued, old.info
            old.leaving = True
        self.engines = [*self.engines, *(new for _, new in replacements)]
        log.info("TLS files changed: dialling the engines again with them")

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
        if engine.leaving:
            return  # it left DNS while we asked
        if not engine.up:
            log.info("engine %s is up", engine.address)
        engine.up, engine.queued = True, load.num_running + load.num_waiting

    async def _every_poll(self, step: Callable[[], Awaitable[None]]) -> None:
        while True:
            await asyncio.sleep(self.poll_seconds)
            await step()

    async def resolve(self) -> None:
        """Resolves the DNS targets that are due, and those with no engine up (the pods may have moved)."""
        now = time.monotonic()
        due = [t for t in self.targets
               if now >= t.next_resolve or not any(e.up for e in self.engines if e.target is t and not e.leaving)]
        await asyncio.gather(*(self._resolve_one(t) for t in due))

    async def _resolve_one(self, target: DnsTarget) -> None:
        target.next_resolve = time.monotonic() + self.resolve_seconds
        try:
            wanted = {address_of(ip, target.port) for ip in await self._resolve(target.host, target.port)}
            if not wanted:
                raise OSError("no addresses")
        except (OSError, UnicodeError) as error:  # gaierror, a bad name: keep what we have, a DNS blip is no outage
            if not target.failing:
                log.warning("cannot resolve %s (keeping its engines): %s", target.name, error)
            target.failing = True
            return
        target.failing = False
        # After the await (poll() may reap); a channel being replaced (leaving) ranks below its replacement.
        mine = {e.address: e for e in sorted(self.engines, key=lambda e: not e.leaving) if e.target is target}
        current = {a for a, e in mine.items() if not e.leaving}
        added, removed = sorted(wanted - current), sorted(current - wanted)
        if not (added or removed):
            return
        log.info("%s: added %s; removed %s", target.name, ", ".join(added) or "none", ", ".join(removed) or "none")
        for address in removed:
            mine[address].leaving, mine[address].up = True, False
        for address in added:
            if address in mine:
                mine[address].leaving = False  # back before its calls ended: keep the channel
        new = [self._open(address, target) for address in added if address not in mine]
        self.engines = [*self.engines, *new]
        await asyncio.gather(*(self._poll_one(e) for e in new))  # usable now rather than at the next poll

    def candidates(self) -> list[EngineHandle]:
        """Engines to try, best first: those up by load, then the ones believed down (they may be back)."""
        return sorted((e for e in self.engines if not e.leaving), key=lambda e: (not e.up, e.load))

    def mark_down(self, engine: EngineHandle) -> None:
        engine.up = False

    def any_info(self) -> engine_pb2.GetModelInfoResponse | None:
        return next((e.info for e in self.engines if e.info is not None), None)
