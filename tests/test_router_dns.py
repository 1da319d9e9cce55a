"""`--engine dns:///host:port`: the tokenizer's router resolves the name itself, one engine per address, so it
balances across the pods behind a headless Service and follows the answer as pods come and go.

Two real engines of the demo model share a port, one on 127.0.0.1 and one on ::1: the two addresses of a name.
The name is `localhost` for a real tokenizer process where it resolves to both; otherwise, and for the router's
bookkeeping, an injected resolver gives the answer (DNS is the one edge faked here).
"""
from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import signal
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from servers import ServerProcess, free_port
from tessera.engine.v1 import engine_pb2, engine_pb2_grpc
from tessera.serving import Server
from tessera.tokenizer.router import EngineRouter, address_of
from tessera.tokenizer.service import TextGenerationService
from tessera.tokenizer.tokenizer import Tokenizer
from tessera.tokenizer.v1 import tokenizer_pb2, tokenizer_pb2_grpc

DEMO = Path(__file__).resolve().parents[1] / "models" / "tessera-demo"
LONG = 900  # tokens: seconds on a CPU, so a request is still running when the test looks (max_model_len 1024)
NAME = "tessera-engine"


def shared_port() -> int:
    """A port free on both 127.0.0.1 and ::1."""
    while True:
        port = free_port()
        with socket.socket(socket.AF_INET6) as s, contextlib.suppress(OSError):
            s.bind(("::1", port))
            return port


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


pytestmark = pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback (::1) to run the second engine on")


class Engine(ServerProcess):
    """A demo-model engine on `ip`:`port`."""

    def __init__(self, ip: str, port: int):
        super().__init__("engine", "--model", str(DEMO), "--kv-cache-memory", "64MiB", "--grace", "60", port=port,
                         env={"OMP_NUM_THREADS": "1"})
        self.command[-3] = f"[{ip}]" if ":" in ip else ip  # in place of ServerProcess's --host 127.0.0.1
        self.address = address_of(ip, port)


@pytest.fixture(scope="module")
def engines():
    port = shared_port()
    a, b = Engine("127.0.0.1", port), Engine("::1", port)
    try:
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(Engine.start, (a, b)))
        yield a, b
    finally:
        for engine in (a, b):
            if engine.process is not None:
                engine.stop()


@pytest.fixture
def both(engines):
    """Both engines, B (re)started if an earlier test stopped it."""
    a, b = engines
    if b.process.poll() is not None:
        b.start()
    return a, b


def request(max_tokens: int) -> tokenizer_pb2.GenerateRequest:
    return tokenizer_pb2.GenerateRequest(
        text="The quick brown fox", sampling=engine_pb2.SamplingParams(temperature=0.0),
        stopping=engine_pb2.StoppingParams(max_tokens=max_tokens, ignore_eos=True))


async def until(condition, what: str, timeout: float = 60.0) -> None:
    """Waits (generously: two shared cores) for `condition`, a function or coroutine function, to hold."""
    deadline = time.monotonic() + timeout
    while True:
        held = condition()
        if inspect.isawaitable(held):
            held = await held
        if held:
            return
        assert time.monotonic() < deadline, f"not {what} after {timeout} s"
        await asyncio.sleep(0.05)


async def last_of(call):
    """The last response of a stream (read() to its end: async iteration must not follow a read())."""
    last = None
    while (response := await call.read()) is not grpc.aio.EOF:
        last = response
    return last


async def generate(textgen, max_tokens: int) -> None:
    """A whole generation, checked to have run to its length."""
    last = await last_of(textgen.Generate(request(max_tokens), timeout=120))
    assert last.finish_reason == engine_pb2.FINISH_REASON_LENGTH, last


# -- the tokenizer in front of both -----------------------------------------------------------------------------


async def spread_drain_and_return(front: str, a: Engine, b: Engine, leave=lambda: None, come_back=lambda: None):
    """Requests spread over A and B; B drains (and `leave`s DNS) with no error to the client; once B is back
    (and has `come_back` to DNS) requests reach it again. Where a request runs: each engine's GetLoad, while
    it runs (an engine's request counter misses streams the tokenizer closes as they end)."""
    async with grpc.aio.insecure_channel(front) as channel:
        textgen = tokenizer_pb2_grpc.TextGenerationStub(channel)

        # Sixteen at once: least-loaded routing puts some on each engine.
        calls = [textgen.Generate(request(LONG), timeout=120) for _ in range(16)]
        for call in calls:
            assert (await call.read()).token_ids  # placed, and generating for seconds more
        running = [await asyncio.to_thread(busy, e) for e in (a, b)]
        assert all(running), f"16 concurrent requests: {running[0]} running on A, {running[1]} on B"
        for call in calls:
            call.cancel()
        await until(lambda: not (busy(a) or busy(b)), "both engines idle again")

        # B is told to stop while it streams: its streams finish (the drain), new requests go to A.
        calls = await open_until_busy(textgen, b, "a long request on B")
        b.process.send_signal(signal.SIGTERM)
        leave()
        for _ in range(8):
            await generate(textgen, 8)
        for call in calls:  # those on B were drained, not cut
            assert (await last_of(call)).finish_reason == engine_pb2.FINISH_REASON_LENGTH
        assert await asyncio.to_thread(b.process.wait, 120) == 0
        await asyncio.gather(*(generate(textgen, 8) for _ in range(8)))  # B is gone: A serves them all

        # B back: the router finds it (a poll, or a re-resolution) and sends it requests again.
        await asyncio.to_thread(b.start)
        come_back()
        for call in await open_until_busy(textgen, b, "B used again after its restart"):
            call.cancel()


async def open_until_busy(textgen, engine: Engine, what: str) -> list:
    """Opens long requests, one by one, until one of them runs on `engine`; returns them, all running.
    (More than one, where the loads the router last saw make another engine look idler.)"""
    calls = []

    async def one_more():
        calls.append(textgen.Generate(request(LONG), timeout=120))
        assert (await calls[-1].read()).token_ids
        return await asyncio.to_thread(busy, engine)
    await until(one_more, what, timeout=120)
    return calls


def busy(engine: Engine) -> int:
    """Requests running or waiting on `engine`."""
    load = load_of(engine)
    return load.num_running + load.num_waiting


def load_of(engine: Engine) -> engine_pb2.GetLoadResponse:
    with grpc.insecure_channel(engine.address) as channel:
        return engine_pb2_grpc.EngineStub(channel).GetLoad(engine_pb2.GetLoadRequest(), timeout=10)


def localhost_addresses() -> set[str]:
    return {info[4][0] for info in socket.getaddrinfo("localhost", 1, type=socket.SOCK_STREAM)}


@pytest.mark.skipif(not {"127.0.0.1", "::1"} <= localhost_addresses(),
                    reason=f"localhost resolves to {sorted(localhost_addresses())} here, not to 127.0.0.1 and ::1 "
                           "(the in-process test below covers the same ground with an injected answer)")
def test_a_tokenizer_at_dns_localhost_balances_over_both_addresses_and_survives_a_drain(both):
    a, b = both
    port = a.address.rsplit(":", 1)[1]
    with ServerProcess("tokenizer", "--model", str(DEMO), f"--engine=dns:///localhost:{port}") as front:
        asyncio.run(spread_drain_and_return(front.address, a, b))


@contextlib.asynccontextmanager
async def in_process_tokenizer(router: EngineRouter):
    """TextGeneration over `router`, served on a free loopback port (as serve_tokenizer does)."""
    server = Server(0, "127.0.0.1")
    server.add_servicer(TextGenerationService(Tokenizer(DEMO), router),
                        tokenizer_pb2.DESCRIPTOR.services_by_name["TextGeneration"])
    port = await server.start()
    await router.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.grpc.stop(None)
        await router.close()


def test_an_in_process_tokenizer_balances_over_the_answer_and_lets_a_leaving_engine_drain(both):
    """As above with a name whose answer the test controls: B also leaves DNS as it drains (a pod deleted in
    Kubernetes), and its handle goes once its streams end; back in DNS, it gets a new one."""
    a, b = both
    port = int(a.address.rsplit(":", 1)[1])
    answer = ["127.0.0.1", "::1"]

    async def resolve(host, port_):
        assert (host, port_) == (NAME, port)
        return list(answer)

    async def main():
        router = EngineRouter([f"dns:///{NAME}:{port}"], poll_seconds=0.1, resolve_seconds=0.2, resolve=resolve)
        async with in_process_tokenizer(router) as front:
            assert sorted(e.address for e in router.engines) == sorted([a.address, b.address])
            await spread_drain_and_return(front, a, b, leave=lambda: answer.remove("::1"),
                                          come_back=lambda: answer.append("::1"))
            assert sorted(e.address for e in router.engines) == sorted([a.address, b.address])

    asyncio.run(main())


# -- the router's bookkeeping ------------------------------------------------------------------------------------


class Answer:
    """An injected resolver: the addresses in `ips`, or a failure while `failing`; counts its calls."""

    def __init__(self, *ips: str):
        self.ips, self.failing, self.calls = list(ips), False, 0

    async def __call__(self, host: str, port: int) -> list[str]:
        self.calls += 1
        if self.failing:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return list(self.ips)

    async def answered(self, times: int = 2) -> None:
        """Until the router has asked `times` more times (so it has acted on the current answer)."""
        target = self.calls + times
        await until(lambda: self.calls >= target, f"{times} more resolutions")


def addresses(router: EngineRouter) -> list[str]:
    return sorted(e.address for e in router.engines)


def test_dns_values_become_targets_and_plain_ones_stay_one_channel():
    async def main():
        router = EngineRouter(["dns:///engine.ns.svc:50052", "dns:engine:7", "dns:///[fd00::1]:9", "localhost:1234",
                               "dns://10.0.0.10/engine:50052"])
        assert [(t.host, t.port) for t in router.targets] == [("engine.ns.svc", 50052), ("engine", 7), ("fd00::1", 9)]
        # gRPC resolves these itself, as before: one engine each (a DNS server of its own, too, is its to use).
        assert [e.address for e in router.engines] == ["localhost:1234", "dns://10.0.0.10/engine:50052"]
        await router.close()

    asyncio.run(main())


def test_the_system_resolver_gives_one_engine_per_address_of_localhost(both):
    a, _ = both
    port = int(a.address.rsplit(":", 1)[1])

    async def main():
        router = EngineRouter([f"dns:///localhost:{port}"])
        await router.start()
        try:
            assert addresses(router) == sorted(address_of(ip, port) for ip in localhost_addresses())
            assert next(e for e in router.engines if e.address == a.address).up
            assert router.any_info() is not None
        finally:
            await router.close()

    asyncio.run(main())


def test_new_addresses_get_engines_and_a_vanished_one_keeps_its_channel_until_its_call_ends(both):
    a, b = both
    port = int(a.address.rsplit(":", 1)[1])
    answer = Answer("127.0.0.1")

    async def main():
        router = EngineRouter([f"dns:///{NAME}:{port}"], poll_seconds=0.05, resolve_seconds=0.05, resolve=answer)
        await router.start()
        try:
            assert addresses(router) == [a.address] and router.engines[0].up  # polled before first use
            answer.ips.append("::1")
            await until(lambda: [e.up for e in router.candidates()] == [True, True], "B's engine added and up")
            assert addresses(router) == sorted([a.address, b.address])
            on_b = next(e for e in router.engines if e.address == b.address)

            # A call open on B, counted as TextGenerationService counts its calls.
            call = on_b.stub.Generate(engine_pb2.GenerateRequest(
                prompt_token_ids=[5, 6, 7], sampling=engine_pb2.SamplingParams(temperature=0.0),
                stopping=engine_pb2.StoppingParams(max_tokens=200, ignore_eos=True)))
            on_b.in_flight += 1
            try:
                assert (await call.read()).token_ids
                answer.ips.remove("::1")
                await until(lambda: on_b.leaving, "B's engine leaving")
                assert [e.address for e in router.candidates()] == [a.address]  # no new calls for B
                await answer.answered(5)
                assert on_b in router.engines  # still there: its call is running
                # and runs to its end over the same channel
                assert (await last_of(call)).finish_reason == engine_pb2.FINISH_REASON_LENGTH
            finally:
                on_b.in_flight -= 1
            await until(lambda: on_b not in router.engines, "B's engine removed once its call ended")
            assert addresses(router) == [a.address]

            answer.ips.append("::1")  # back: a new engine for it
            await until(lambda: addresses(router) == sorted([a.address, b.address]), "B's address added again")
            assert next(e for e in router.engines if e.address == b.address) is not on_b
        finally:
            await router.close()

    asyncio.run(main())


def test_a_failed_resolution_keeps_the_engines_and_warns_once_per_streak(both, caplog):
    a, _ = both
    port = int(a.address.rsplit(":", 1)[1])
    answer = Answer("127.0.0.1")
    caplog.set_level(logging.INFO, logger="tessera.tokenizer")

    def warnings():
        return [r for r in caplog.records if r.levelno == logging.WARNING and "cannot resolve" in r.getMessage()]

    async def main():
        router = EngineRouter([f"dns:///{NAME}:{port}"], poll_seconds=0.05, resolve_seconds=0.05, resolve=answer)
        await router.start()
        try:
            added = [r.getMessage() for r in caplog.records if "added" in r.getMessage()]
            assert added == [f"dns:///{NAME}:{port}: added {a.address}; removed none"]
            for streak in (1, 2):
                answer.failing = True
                await answer.answered(5)
                assert addresses(router) == [a.address] and router.engines[0].up
                assert len(warnings()) == streak
                answer.failing = False
                await answer.answered()
            answer.ips = []  # an empty answer, too, is a failure, not "no engines"
            await answer.answered(3)
            assert addresses(router) == [a.address] and len(warnings()) == 3
        finally:
            await router.close()

    asyncio.run(main())


def test_a_target_whose_engines_are_all_down_is_resolved_again_without_waiting(both):
    a, _ = both
    port = int(a.address.rsplit(":", 1)[1])
    answer = Answer("127.0.0.2")  # nothing listens there

    async def main():
        # An hour between scheduled resolutions: only "every engine is down" can make it ask again.
        router = EngineRouter([f"dns:///{NAME}:{port}"], poll_seconds=0.05, resolve_seconds=3600, resolve=answer)
        await router.start()
        try:
            assert addresses(router) == [f"127.0.0.2:{port}"] and not router.engines[0].up
            answer.ips = ["127.0.0.1"]
            await until(lambda: addresses(router) == [a.address] and router.engines[0].up, "the moved engine found")
            calls = answer.calls
            await asyncio.sleep(0.5)  # ten polls with an engine up: no more resolutions
            assert answer.calls == calls
        finally:
            await router.close()

    asyncio.run(main())
