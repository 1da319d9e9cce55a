"""Faults under load, on real servers over loopback: a cancel storm through the whole chain (client -> tokenizer
-> engine -> remote worker), kill -9 of the worker and of the engine mid-storm, and SIGTERM drains of the engine
and of the tokenizer mid-storm.

Every case checks that no stream hangs (the storm as a whole has a bound), that each stream ends with the status
it should (CANCELLED or DEADLINE_EXCEEDED where the client gave up, UNAVAILABLE where a process died under it,
and promptly), that every stream that completed has exactly the tokens the same request gives alone (greedy, and
the KV cache is small, so storms preempt and recompute), and that afterwards the engine holds no request and no
KV block.

The servers are shared by the module (a start costs seconds on two cores): `Chain` restarts, on the same ports,
whatever an earlier test killed, so each test also runs alone.
"""
from __future__ import annotations

import asyncio
import os
import random
import shutil
import signal
import subprocess
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from servers import ServerProcess, wait_serving
from tessera.engine.v1 import engine_pb2, engine_pb2_grpc
from tessera.model_config import ModelConfig
from tessera.tokenizer.v1 import tokenizer_pb2, tokenizer_pb2_grpc
from tiny_checkpoints import make_tiny_checkpoint

DEMO = Path(__file__).resolve().parents[1] / "models" / "tessera-demo"
TEXT_GENERATION = "tessera.tokenizer.v1.TextGeneration"
TOKENIZER = "tessera.tokenizer.v1.Tokenizer"
ENGINE = "tessera.engine.v1.Engine"
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
OK, CANCELLED, DEADLINE, UNAVAILABLE = (grpc.StatusCode.OK, grpc.StatusCode.CANCELLED,
                                        grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE)

# 96 blocks of 4 tokens: a storm's requests (2-27 prompt tokens, up to 64 more) fill it many times over, so
# requests wait, and running ones are preempted and recomputed.
BLOCK_SIZE, NUM_BLOCKS = 4, 96
PROMPTS = [
    "def fibonacci(n):",
    "The quick brown fox jumps over the lazy dog.",
    "import os\nimport sys\n\ndef main():\n    print('hello world')\n",
    "Once upon a time, in a land far away, there lived a",
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):",
    "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,",
    "SELECT name, price FROM products WHERE price > 100 ORDER BY price DESC;",
    "Hello",
]
SHORT, LONG = (8, 24, 48), (32, 64)  # max_tokens of the cancel storm, and of the storms a fault cuts into
# max_tokens of the streams the client gives up on: were they not aborted, they would keep the engine busy for
# a minute after the storm, not for the moment its last step takes.
GIVE_UP_TOKENS = 200
STORM_TIMEOUT = 120.0  # seconds for a whole storm: a stream still open then has hung
END_AFTER_KILL = 10.0  # seconds within which every stream must end after its worker or engine was killed


# -- the servers --------------------------------------------------------------------------------------------


class Chain:
    """worker <- engine --worker <- tokenizer, each on a fixed port; ensure() (re)starts what is not running."""

    def __init__(self, model_dir: Path):
        self.kv_bytes = NUM_BLOCKS * BLOCK_SIZE * ModelConfig.from_pretrained(model_dir).kv_bytes_per_token
        env = {"OMP_NUM_THREADS": "1"}  # four busy processes on two cores: no OpenMP threads spinning on each
        model = str(model_dir)
        self.worker = ServerProcess("worker", "--model", model, "--block-size", str(BLOCK_SIZE),
                                    "--kv-cache-memory", str(self.kv_bytes), env=env)
        self.engine = ServerProcess("engine", "--model", model, "--worker", self.worker.address, "--grace", "120",
                                    env=env)
        self.tokenizer = ServerProcess("tokenizer", "--model", model, "--engine", self.engine.address,
                                       "--grace", "120", env=env)
        self.servers = (self.worker, self.engine, self.tokenizer)

    def ensure(self) -> None:
        down = [s for s in self.servers if s.process is None or s.process.poll() is not None]
        for server in down:  # all at once: the engine waits for its worker, the tokenizer polls its engine
            server.process = subprocess.Popen(server.command, env={**os.environ, "PYTHONUNBUFFERED": "1", **server.env})
        for server in down:
            wait_serving(server.address, timeout=120, process=server.process)
        wait_serving(self.tokenizer.address, timeout=30, service=TEXT_GENERATION)

    def stop(self) -> None:
        for server in reversed(self.servers):
            if server.process is not None:
                server.stop()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny random Llama with the demo model's tokenizer."""
    path = make_tiny_checkpoint(tmp_path_factory.mktemp("faults"), "llama", vocab_size=8192, bos_token_id=None,
                                eos_token_id=0, generation=dict(eos_token_id=0))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(DEMO / name, path / name)
    return path


@pytest.fixture(scope="module")
def chain(model_dir):
    servers = Chain(model_dir)
    try:
        servers.ensure()
        yield servers
    finally:
        servers.stop()


@pytest.fixture(scope="module")
def prompt_ids(chain) -> list[list[int]]:
    with grpc.insecure_channel(chain.tokenizer.address) as channel:
        stub = tokenizer_pb2_grpc.TokenizerStub(channel)
        return [list(stub.Tokenize(tokenizer_pb2.TokenizeRequest(text=text), timeout=10).token_ids)
                for text in PROMPTS]


@pytest.fixture(scope="module")
def reference(chain) -> dict[tuple[int, int], tuple[list[int], int]]:
    """(prompt, max_tokens) -> (tokens, finish reason) of that request alone: each prompt runs alone through the
    chain once, for the most tokens any case asks; greedy with ignore_eos, a shorter max_tokens gives a prefix
    (the cancel storm checks one such request alone too)."""
    table = {}
    longest = max(*SHORT, *LONG, GIVE_UP_TOKENS)
    with grpc.insecure_channel(chain.tokenizer.address) as channel:
        stub = tokenizer_pb2_grpc.TextGenerationStub(channel)
        for prompt in range(len(PROMPTS)):
            responses = list(stub.Generate(text_request(prompt, longest), timeout=60))
            tokens = [t for r in responses for t in r.token_ids]
            assert len(tokens) == longest and responses[-1].finish_reason == engine_pb2.FINISH_REASON_LENGTH
            for max_tokens in {*SHORT, *LONG, GIVE_UP_TOKENS}:
                table[prompt, max_tokens] = tokens[:max_tokens], engine_pb2.FINISH_REASON_LENGTH
    return table


# -- one storm ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stream:
    prompt: int  # index into PROMPTS
    max_tokens: int
    n: int = 1
    via: str = "tokenizer"  # or "engine": Engine/Generate on the tokenized prompt
    cancel_after: int | None = None  # cancel once this many messages came (0: before the first)
    cancel_delay: float = 0.0  # with cancel_after 0: how long after the call started
    deadline: float | None = None  # seconds

    @property
    def key(self) -> tuple[int, int]:
        return self.prompt, self.max_tokens


@dataclass
class Outcome:
    code: grpc.StatusCode
    details: str
    tokens: dict[int, list[int]]  # per sample index
    finish: dict[int, int]
    ended: float  # time.monotonic()


def sampling_fields(max_tokens: int, n: int) -> dict:
    return dict(n=n, sampling=engine_pb2.SamplingParams(temperature=0.0),
                stopping=engine_pb2.StoppingParams(max_tokens=max_tokens, ignore_eos=True))


def text_request(prompt: int, max_tokens: int, n: int = 1) -> tokenizer_pb2.GenerateRequest:
    return tokenizer_pb2.GenerateRequest(text=PROMPTS[prompt], **sampling_fields(max_tokens, n))


class Progress:
    """What the storm's streams have seen so far."""

    def __init__(self):
        self.finished = 0  # samples with their finish reason


async def run_stream(stream: Stream, channels, prompt_ids, progress: Progress) -> Outcome:
    tokenizer_channel, engine_channel = channels
    if stream.via == "tokenizer":
        call = tokenizer_pb2_grpc.TextGenerationStub(tokenizer_channel).Generate(
            text_request(stream.prompt, stream.max_tokens, stream.n), timeout=stream.deadline)
    else:
        request = engine_pb2.GenerateRequest(prompt_token_ids=prompt_ids[stream.prompt],
                                             **sampling_fields(stream.max_tokens, stream.n))
        call = engine_pb2_grpc.EngineStub(engine_channel).Generate(request, timeout=stream.deadline)
    tokens, finish = defaultdict(list), {}
    try:
        if stream.cancel_after == 0:
            await asyncio.sleep(stream.cancel_delay)
            call.cancel()
        messages = 0
        async for response in call:
            messages += 1
            tokens[response.index].extend(response.token_ids)
            if response.finish_reason:
                finish[response.index] = response.finish_reason
                progress.finished += 1
            if stream.cancel_after and messages >= stream.cancel_after:
                call.cancel()
                break
    except grpc.aio.AioRpcError:
        pass
    except asyncio.CancelledError:
        if not call.cancelled():
            raise  # the storm's own timeout, not ours to swallow
    return Outcome(await call.code(), await call.details() or "", dict(tokens), finish, time.monotonic())


async def all_in_the_engine(engine_channel, streams: list[Stream], progress: Progress) -> None:
    """Until every sample of the storm has reached the engine (running, waiting or finished): a fault then
    catches each stream in flight, none on its way in."""
    stub = engine_pb2_grpc.EngineStub(engine_channel)
    total = sum(s.n for s in streams)
    while True:
        load = await stub.GetLoad(engine_pb2.GetLoadRequest(), timeout=10)
        if load.num_running + load.num_waiting + progress.finished >= total:
            return
        await asyncio.sleep(0.02)


async def storm(streams: list[Stream], chain: Chain, prompt_ids, fault=None, probe=None):
    """Runs every stream at once and returns their outcomes, in order, when the fault came, and what the probe
    returned. `fault()` is called once every stream is in the engine; `probe()`, a coroutine, then runs alongside
    the rest of the storm."""
    async with grpc.aio.insecure_channel(chain.tokenizer.address) as tokenizer_channel, \
            grpc.aio.insecure_channel(chain.engine.address) as engine_channel:
        channels = tokenizer_channel, engine_channel
        progress = Progress()
        tasks = [asyncio.create_task(run_stream(s, channels, prompt_ids, progress)) for s in streams]
        fired = probed = None
        if fault is not None:
            await asyncio.wait_for(all_in_the_engine(engine_channel, streams, progress), timeout=STORM_TIMEOUT)
            assert progress.finished < sum(s.n for s in streams) // 2, "the storm was half over before the fault"
            fired = time.monotonic()
            fault()
            if probe is not None:
                probed = await probe()
        _, pending = await asyncio.wait(tasks, timeout=STORM_TIMEOUT)
        for task in pending:
            task.cancel()
        hung = [streams[i] for i, task in enumerate(tasks) if task in pending]
        assert not hung, f"{len(hung)} of {len(streams)} streams still open after {STORM_TIMEOUT:g} s: {hung[:5]}"
        return [task.result() for task in tasks], fired, probed


def assert_complete(stream: Stream, outcome: Outcome, reference) -> None:
    """Every sample has exactly the tokens of the request alone (greedy: n samples alike)."""
    tokens, finish_reason = reference[stream.key]
    assert sorted(outcome.tokens) == list(range(stream.n)), (stream, outcome)
    for index in range(stream.n):
        assert outcome.tokens[index] == tokens, f"{stream} sample {index}: not the tokens it gives alone"
        assert outcome.finish[index] == finish_reason, (stream, outcome)


def assert_prefix(stream: Stream, outcome: Outcome, reference) -> None:
    """A stream cut short got a prefix of the tokens it gives alone (and no finish reason)."""
    tokens, _ = reference[stream.key]
    for index, got in outcome.tokens.items():
        assert got == tokens[: len(got)], f"{stream} sample {index}: {outcome.code.name} after wrong tokens"


def engine_load(address: str, timeout: float = 10.0) -> engine_pb2.GetLoadResponse:
    with grpc.insecure_channel(address) as channel:
        return engine_pb2_grpc.EngineStub(channel).GetLoad(engine_pb2.GetLoadRequest(), timeout=timeout)


def wait_engine_idle(address: str, timeout: float = 10.0) -> engine_pb2.GetLoadResponse:
    """Frees happen within a step of the abort: poll until nothing runs, waits or holds a KV block."""
    deadline = time.monotonic() + timeout
    while True:
        load = engine_load(address)
        if (load.num_running, load.num_waiting, load.kv_blocks_in_use) == (0, 0, 0):
            return load
        assert time.monotonic() < deadline, f"the engine is not idle {timeout:g} s after the storm: {load}"
        time.sleep(0.05)


def health(address: str, service: str = "") -> int:
    with grpc.insecure_channel(address) as channel:
        request = health_pb2.HealthCheckRequest(service=service)
        return health_pb2_grpc.HealthStub(channel).Check(request, timeout=5).status


def wait_health(address: str, service: str, status: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while (now := health(address, service)) != status:
        assert time.monotonic() < deadline, f"{address} {service or '(server)'}: {now}, not {status} in {timeout:g} s"
        time.sleep(0.05)


async def drain_probe(address: str, service: str, new_call) -> None:
    """Right after SIGTERM, on a new connection: health NOT_SERVING (overall and `service`) within seconds, and
    `new_call(channel)` refused with UNAVAILABLE, while the storm's streams go on."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        deadline = time.monotonic() + 5
        while (await stub.Check(health_pb2.HealthCheckRequest(), timeout=5)).status != NOT_SERVING:
            assert time.monotonic() < deadline, "still SERVING 5 s after SIGTERM"
            await asyncio.sleep(0.02)
        assert (await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)).status == NOT_SERVING
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await new_call(channel)
        assert error.value.code() == UNAVAILABLE and "draining" in error.value.details()


def fault_storm(seed: int, count: int, vias=("tokenizer", "engine")) -> list[Stream]:
    """Streams long enough to be mid-flight when a fault comes; some with n=2."""
    rng = random.Random(seed)
    return [Stream(rng.randrange(len(PROMPTS)), rng.choice(LONG), n=2 if rng.random() < 0.2 else 1,
                   via=rng.choice(vias)) for _ in range(count)]


def assert_ended_by_the_fault(streams, outcomes, killed: float, reference, address: str) -> int:
    """Each stream completed with the right tokens or ended UNAVAILABLE naming `address`, within END_AFTER_KILL
    seconds of the kill. Returns how many ended UNAVAILABLE."""
    unavailable = 0
    for stream, outcome in zip(streams, outcomes):
        assert outcome.ended - killed < END_AFTER_KILL, f"{stream} ended {outcome.ended - killed:.1f} s after the kill"
        if outcome.code == OK:
            assert_complete(stream, outcome, reference)
            continue
        assert outcome.code == UNAVAILABLE, (stream, outcome.code, outcome.details)
        assert address in outcome.details, (stream, outcome.details)
        assert_prefix(stream, outcome, reference)
        unavailable += 1
    return unavailable


def rerun(streams, chain, prompt_ids, reference) -> None:
    """The same requests, at once, all complete with the tokens they give alone."""
    outcomes, _, _ = asyncio.run(storm(streams, chain, prompt_ids))
    for stream, outcome in zip(streams, outcomes):
        assert outcome.code == OK, (stream, outcome.code, outcome.details)
        assert_complete(stream, outcome, reference)


# -- the cases ----------------------------------------------------------------------------------------------


def test_a_cancel_storm_leaks_nothing_and_the_completed_streams_have_their_tokens_alone(chain, prompt_ids,
                                                                                         reference):
    """200 streams (3 in 4 through the tokenizer, the rest straight to the engine; 1 in 5 with n=2) of which about
    half are given up on: cancelled before the first token, cancelled mid-stream, or cut by a short deadline."""
    chain.ensure()
    rng = random.Random(1)
    streams = []
    for _ in range(200):
        fields = dict(prompt=rng.randrange(len(PROMPTS)), max_tokens=rng.choice(SHORT),
                      n=2 if rng.random() < 0.2 else 1, via="tokenizer" if rng.random() < 0.75 else "engine")
        fault = rng.random()
        if fault < 0.15:
            fields.update(cancel_after=0, cancel_delay=rng.uniform(0.0, 0.05), max_tokens=GIVE_UP_TOKENS)
        elif fault < 0.35:
            fields.update(cancel_after=rng.randint(1, 4), max_tokens=GIVE_UP_TOKENS)
        elif fault < 0.5:
            fields.update(deadline=rng.uniform(0.05, 1.5), max_tokens=GIVE_UP_TOKENS)
        streams.append(Stream(**fields))
    preemptions_before = engine_load(chain.engine.address).num_preemptions

    outcomes, _, _ = asyncio.run(storm(streams, chain, prompt_ids))

    seen = defaultdict(int)
    for stream, outcome in zip(streams, outcomes):
        if outcome.code == OK:  # a stream may finish before its cancel or deadline comes
            assert_complete(stream, outcome, reference)
            seen["completed"] += 1
            continue
        if stream.cancel_after is not None:
            assert outcome.code == CANCELLED, (stream, outcome.code, outcome.details)
        else:
            assert stream.deadline is not None and outcome.code == DEADLINE, (stream, outcome.code, outcome.details)
        assert_prefix(stream, outcome, reference)
        seen[outcome.code.name, "mid-stream" if outcome.tokens else "before any token"] += 1
    # The storm did what it says (how many deadlines expire before the first token depends on the machine).
    assert seen["CANCELLED", "before any token"] and seen["CANCELLED", "mid-stream"], dict(seen)
    assert seen["DEADLINE_EXCEEDED", "before any token"] + seen["DEADLINE_EXCEEDED", "mid-stream"], dict(seen)

    load = wait_engine_idle(chain.engine.address)
    assert load.num_preemptions > preemptions_before, "the storm never ran out of KV blocks"
    # The tokenizer still serves; alone, a request asking for fewer tokens gets a prefix of the longest one.
    with grpc.insecure_channel(chain.tokenizer.address) as channel:
        responses = list(tokenizer_pb2_grpc.TextGenerationStub(channel).Generate(text_request(3, 24), timeout=30))
    assert [t for r in responses for t in r.token_ids] == reference[3, 24][0]


def test_kill_9_of_the_worker_mid_storm_fails_every_stream_promptly_and_a_restarted_worker_serves_again(
        chain, model_dir, prompt_ids, reference):
    """100 streams (half through the tokenizer, half straight to the engine, some n=2) all in the engine, then
    kill -9 of its worker: every stream not yet complete ends UNAVAILABLE naming the worker within seconds, the
    engine stays up with nothing running and no KV block held, NOT_SERVING, and once the worker is back on its
    port (a different one is refused) SERVING again, with the same tokens for the same requests."""
    chain.ensure()
    streams = fault_storm(seed=2, count=100)

    outcomes, killed, _ = asyncio.run(storm(streams, chain, prompt_ids, fault=chain.worker.process.kill))

    chain.worker.process.wait()
    unavailable = assert_ended_by_the_fault(streams, outcomes, killed, reference, chain.worker.address)
    assert unavailable >= 50, f"only {unavailable} of {len(streams)} streams were cut by the kill"
    assert chain.engine.process.poll() is None, "the engine died with its worker"
    wait_engine_idle(chain.engine.address)
    # Without a worker the engine still answers: its health says NOT_SERVING (a load balancer stops sending it
    # requests that could only fail), and each new request fails fast with UNAVAILABLE naming the worker (and dials
    # it again).
    wait_health(chain.engine.address, ENGINE, NOT_SERVING, timeout=5)
    request = engine_pb2.GenerateRequest(prompt_token_ids=prompt_ids[0], **sampling_fields(8, 1))
    with grpc.insecure_channel(chain.engine.address) as channel:
        for _ in range(2):
            with pytest.raises(grpc.RpcError) as error:
                list(engine_pb2_grpc.EngineStub(channel).Generate(request, timeout=END_AFTER_KILL))
            assert error.value.code() == UNAVAILABLE and chain.worker.address in error.value.details()
        # A worker that comes back on that port but differs from the one the engine sized itself for is refused.
        smaller = ServerProcess("worker", "--model", str(model_dir), "--block-size", str(BLOCK_SIZE),
                                "--kv-cache-memory", str(chain.kv_bytes // 2), port=chain.worker.port,
                                env=chain.worker.env)
        with smaller:
            with pytest.raises(grpc.RpcError) as error:
                list(engine_pb2_grpc.EngineStub(channel).Generate(request, timeout=END_AFTER_KILL))
            assert error.value.code() == UNAVAILABLE and "came back as" in error.value.details()
    wait_engine_idle(chain.engine.address)

    chain.worker.start()  # the right one, on the same port: the engine's next step dials it again
    wait_health(chain.engine.address, ENGINE, SERVING, timeout=10)
    rerun(streams[:30], chain, prompt_ids, reference)
    wait_engine_idle(chain.engine.address)


def test_kill_9_of_the_engine_mid_storm_fails_the_tokenizers_streams_promptly_and_it_recovers(
        chain, prompt_ids, reference):
    """100 streams through the tokenizer all in the engine, then kill -9 of the engine: every stream not yet
    complete ends UNAVAILABLE naming the engine within seconds; the tokenizer stays up, answers health (its
    Tokenizer service SERVING, TextGeneration NOT_SERVING) and tokenizes, and once the engine is back on its port
    TextGeneration serves again with the same tokens."""
    chain.ensure()
    streams = fault_storm(seed=3, count=100, vias=("tokenizer",))

    outcomes, killed, _ = asyncio.run(storm(streams, chain, prompt_ids, fault=chain.engine.process.kill))

    chain.engine.process.wait()
    unavailable = assert_ended_by_the_fault(streams, outcomes, killed, reference, chain.engine.address)
    assert unavailable >= 50, f"only {unavailable} of {len(streams)} streams were cut by the kill"
    address = chain.tokenizer.address
    assert chain.tokenizer.process.poll() is None, "the tokenizer died with its engine"
    # It answers health: text work goes on, generation waits for an engine.
    wait_health(address, TEXT_GENERATION, NOT_SERVING, timeout=5)
    assert health(address, TOKENIZER) == SERVING
    with grpc.insecure_channel(address) as channel:
        tokenized = tokenizer_pb2_grpc.TokenizerStub(channel).Tokenize(
            tokenizer_pb2.TokenizeRequest(text=PROMPTS[1]), timeout=10)
        assert list(tokenized.token_ids) == prompt_ids[1]
        with pytest.raises(grpc.RpcError) as error:
            list(tokenizer_pb2_grpc.TextGenerationStub(channel).Generate(text_request(0, 8), timeout=END_AFTER_KILL))
        assert error.value.code() == UNAVAILABLE

    chain.engine.start()  # on the same port
    wait_health(address, TEXT_GENERATION, SERVING, timeout=10)
    rerun(streams[:30], chain, prompt_ids, reference)
    wait_engine_idle(chain.engine.address)


def test_sigterm_of_the_tokenizer_mid_storm_drains_it_with_every_stream_complete(chain, prompt_ids, reference):
    """100 streams through the tokenizer, then SIGTERM of the tokenizer: its health says NOT_SERVING within
    seconds, a new Generate gets UNAVAILABLE, every stream completes with its tokens alone, and the tokenizer
    exits 0 once they have, leaving the engine idle."""
    chain.ensure()
    streams = fault_storm(seed=5, count=100, vias=("tokenizer",))
    tokenizer = chain.tokenizer

    async def probe():
        await drain_probe(tokenizer.address, TEXT_GENERATION, lambda channel: tokenizer_pb2_grpc.TextGenerationStub(
            channel).Generate(text_request(0, 8), timeout=10).read())

    outcomes, _, _ = asyncio.run(storm(streams, chain, prompt_ids, probe=probe,
                                       fault=lambda: tokenizer.process.send_signal(signal.SIGTERM)))

    for stream, outcome in zip(streams, outcomes):
        assert outcome.code == OK, (stream, outcome.code, outcome.details)
        assert_complete(stream, outcome, reference)
    assert tokenizer.process.wait(30) == 0  # once its streams ended, long before the 120 s grace
    wait_engine_idle(chain.engine.address)


def test_sigterm_of_the_engine_mid_storm_drains_it_with_every_stream_complete(chain, prompt_ids, reference):
    """100 streams (half through the tokenizer) all in the engine, then SIGTERM of the engine: its health says
    NOT_SERVING within seconds, a new Generate gets UNAVAILABLE (straight or through the tokenizer), every stream
    completes with its tokens alone, and the engine exits 0 once they have. Last: nothing restarts it."""
    chain.ensure()
    streams = fault_storm(seed=4, count=100)
    engine = chain.engine

    async def probe():
        request = engine_pb2.GenerateRequest(prompt_token_ids=prompt_ids[0], **sampling_fields(8, 1))
        await drain_probe(engine.address, ENGINE,
                          lambda channel: engine_pb2_grpc.EngineStub(channel).Generate(request, timeout=10).read())
        # Through the tokenizer a new request finds no engine that takes it.
        async with grpc.aio.insecure_channel(chain.tokenizer.address) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await tokenizer_pb2_grpc.TextGenerationStub(channel).Generate(text_request(0, 8), timeout=10).read()
            assert error.value.code() == UNAVAILABLE

    outcomes, _, _ = asyncio.run(storm(streams, chain, prompt_ids, probe=probe,
                                       fault=lambda: engine.process.send_signal(signal.SIGTERM)))

    for stream, outcome in zip(streams, outcomes):
        assert outcome.code == OK, (stream, outcome.code, outcome.details)
        assert_complete(stream, outcome, reference)
    assert engine.process.wait(30) == 0  # once its streams ended, long before the 120 s grace
