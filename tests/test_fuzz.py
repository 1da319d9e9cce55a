"""Property-based fuzzing (hypothesis) of every RPC of every tessera server, enumerated from the descriptors.

Real servers on loopback, on a tiny checkpoint with small limits (so the fuzzer reaches each limit quickly): a
tokenizer in front of an engine that drives a remote worker, and a second worker that the fuzzer drives itself (a
worker takes one Execute stream at a time, and the engine holds the first one's).

Each RPC gets two kinds of input: messages built from the request's descriptor (extreme integers, NaN and
infinite floats, unicode, empty and long strings, long repeated fields and maps, nested messages, oneofs), alone
or merged into a valid request so the fuzzer gets past validation; and raw bytes (arbitrary, or a valid encoding
cut short or with a bit flipped) sent with no serializer. Every call must end before its deadline with a status
that the RPC's contract allows (`allowed`): never UNKNOWN, INTERNAL, UNIMPLEMENTED or DEADLINE_EXCEEDED.
Throughout, a thread checks each server's health every 50 ms: always SERVING, and fast. At the end the engine
holds no request and no KV block.
"""
from __future__ import annotations

import functools
import math
import shutil
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from google.protobuf import message_factory
from google.protobuf.descriptor import FieldDescriptor
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from servers import ServerProcess, free_port, wait_serving
from tessera.engine.v1 import engine_pb2, engine_pb2_grpc
from tessera.tokenizer.v1 import tokenizer_pb2, tokenizer_pb2_grpc
from tessera.worker.v1 import worker_pb2
from tiny_checkpoints import make_tiny_checkpoint

MAX_MODEL_LEN = 64  # so that a request without max_tokens is still cheap
DEADLINE = 5.0  # seconds per call: a call that needs longer counts as a hang
BLOCK_SIZE = 4
KV_CACHE = "256KiB"  # 128 blocks of the tiny model
WORKER_FLAGS = ["--block-size", str(BLOCK_SIZE), "--kv-cache-memory", KV_CACHE, "--max-request-bytes", "64KiB"]
ENGINE_FLAGS = ["--max-num-seqs", "4", "--max-queue", "4", "--max-n", "4", "--max-logit-bias", "8",
                "--max-stop-token-ids", "8", "--max-num-batched-tokens", "32", "--max-request-bytes", "64KiB",
                "--structured-output-timeout", "2"]
# The tokenizer keeps the default --max-request-bytes (4 MiB), so the table tests below reach its own limits.
TOKENIZER_FLAGS = ["--max-n", "4", "--max-prompt-bytes", "4KiB", "--max-stop-strings", "4",
                   "--max-stop-string-chars", "16", "--max-logit-bias", "8", "--max-stop-token-ids", "8"]
ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # a 2-core machine runs four servers and the fuzzer

# The services each server registers, by the proto files that define them: every method of each is fuzzed, and
# test_every_registered_service_is_fuzzed checks this against what the server lists in reflection.
COMMON = [health_pb2, reflection_pb2]
FILES = {"engine": [engine_pb2, *COMMON], "tokenizer": [tokenizer_pb2, *COMMON], "worker": [worker_pb2, *COMMON]}
SERVICES = {role: [s for f in files for s in f.DESCRIPTOR.services_by_name.values()] for role, files in FILES.items()}
METHODS = [(role, method) for role, services in SERVICES.items() for service in services for method in service.methods]


def path_of(method) -> str:
    return f"/{method.containing_service.full_name}/{method.name}"


OK, INVALID, OUT_OF_RANGE, EXHAUSTED = (grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT,
                                        grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.RESOURCE_EXHAUSTED)
# What any call may end with: done, a bad request (an undecodable message included), a prompt longer than the
# model allows, a message over --max-request-bytes (gRPC's own code for it).
BASE = {OK, INVALID, OUT_OF_RANGE, EXHAUSTED}
EXTRA = {
    # The health protocol: a service name the server does not have.
    "/grpc.health.v1.Health/Check": {grpc.StatusCode.NOT_FOUND},
}
# Not allowed here, though documented: ALREADY_EXISTS (a request_id already running) and the worker's
# FAILED_PRECONDITION (a second Execute stream) need two calls at once, and the fuzzer makes one at a time
# (test_streams_at_once_cancelled_and_past_their_deadline makes them at once, and allows for them);
# FAILED_PRECONDITION for a chat without a template cannot happen, the tiny tokenizer has one; UNAVAILABLE means
# a server is down or draining, and none is.

# Streams that never end by contract: the first message is the answer, then the client leaves.
ENDLESS = {"/grpc.health.v1.Health/Watch"}


def allowed(method) -> set[grpc.StatusCode]:
    return BASE | EXTRA.get(path_of(method), set())


# -- messages from descriptors --------------------------------------------------------------------------------------

T = FieldDescriptor
INT_RANGES = {
    T.TYPE_INT32: (-2**31, 2**31 - 1), T.TYPE_SINT32: (-2**31, 2**31 - 1), T.TYPE_SFIXED32: (-2**31, 2**31 - 1),
    T.TYPE_INT64: (-2**63, 2**63 - 1), T.TYPE_SINT64: (-2**63, 2**63 - 1), T.TYPE_SFIXED64: (-2**63, 2**63 - 1),
    T.TYPE_UINT32: (0, 2**32 - 1), T.TYPE_FIXED32: (0, 2**32 - 1),
    T.TYPE_UINT64: (0, 2**64 - 1), T.TYPE_FIXED64: (0, 2**64 - 1),
}
SPECIAL_FLOATS = [0.0, -0.0, 0.5, 1.0, 2.0, -1.0, 1e-45, 3.4e38, math.nan, math.inf, -math.inf]
# Strings that mean something to some server: roles, template syntax, grammar and schema snippets, request ids.
WORDS = ["", "user", "assistant", "system", "{{ messages }}", "{% for m in messages %}{{ m.content }}{% endfor %}",
         "{{ raise_exception('x') }}", "{% set x = 'a' * 1000000 %}", "root ::= \"a\"", "[a-z]+", "a{1,1000}",
         '{"type": "object"}', '{"type": "string", "maxLength": 4}', "victim", "victim/0", "a/1", "<|eot_id|>",
         "tessera.engine.v1.Engine", "grpc.health.v1.Health", "tessera/engine/v1/engine.proto", "\x00", "é日😀"]
MAX_DEPTH = 3


def integers(low: int, high: int) -> st.SearchStrategy[int]:
    # Small values get past validation (token ids, counts); the extremes and their neighbours find overflows.
    return st.one_of(st.integers(max(low, -2), min(high, 600)), st.sampled_from([low, low + 1, high - 1, high]),
                     st.integers(low, high))


def scalars(field) -> st.SearchStrategy:
    if field.type in INT_RANGES:
        return integers(*INT_RANGES[field.type])
    if field.type in (T.TYPE_FLOAT, T.TYPE_DOUBLE):
        width = 32 if field.type == T.TYPE_FLOAT else 64
        return st.one_of(st.sampled_from(SPECIAL_FLOATS), st.floats(width=width))
    if field.type == T.TYPE_BOOL:
        return st.booleans()
    if field.type == T.TYPE_ENUM:  # proto3 enums are open: unknown numbers decode too
        return st.one_of(st.sampled_from([v.number for v in field.enum_type.values]), integers(-2**31, 2**31 - 1))
    if field.type == T.TYPE_STRING:
        # Long ones stay under the servers' message limits mostly; the tokenizer's prompt limit is 4 KiB.
        return st.one_of(st.sampled_from(WORDS), st.text(max_size=24),
                         st.builds(lambda c, k: c * k, st.characters(codec="utf-8"), st.sampled_from([1000, 5000])))
    if field.type == T.TYPE_BYTES:
        return st.one_of(st.binary(max_size=40), st.builds(lambda b, k: b * k, st.binary(min_size=1, max_size=4),
                                                           st.sampled_from([69, 1000])))
    raise AssertionError(f"no strategy for {field.full_name} (type {field.type})")


def values(field, depth: int) -> st.SearchStrategy:
    """One value of `field` (for a repeated field, one element)."""
    return messages(field.message_type, depth + 1) if field.type == T.TYPE_MESSAGE else scalars(field)


def field_values(field, depth: int) -> st.SearchStrategy:
    if field.type == T.TYPE_MESSAGE and field.message_type.GetOptions().map_entry:
        key, value = field.message_type.fields_by_name["key"], field.message_type.fields_by_name["value"]
        small = st.dictionaries(values(key, depth), values(value, depth), max_size=6)
        if key.type not in INT_RANGES:
            return small
        # Many entries (logit_bias): over the servers' limits, some over the message size.
        many = st.builds(lambda k, v: {i: v for i in range(k)}, st.sampled_from([9, 100, 5000]), values(value, depth))
        return st.one_of(small, small, small, many)  # one in four: most requests get past the limits
    if field.is_repeated:
        small = st.lists(values(field, depth), max_size=5)
        # Long lists of one value: prompts over max_model_len, many stop ids, plans with many requests (the
        # longest near the top only, or a plan of many requests of many tokens takes seconds to build).
        lengths = [9, 65] if field.type == T.TYPE_MESSAGE or depth > 1 else [9, 65, 300, 5000]
        many = st.builds(lambda v, k: [v] * k, values(field, depth), st.sampled_from(lengths))
        return st.one_of(small, small, small, many)
    return values(field, depth)


_message_strategies: dict = {}


def messages(descriptor, depth: int = 0) -> st.SearchStrategy:
    """Any message of this type: each field set or not (setting a second field of a oneof clears the first, as
    on the wire), nested messages down to MAX_DEPTH."""
    key = (descriptor.full_name, depth)
    if key not in _message_strategies:
        cls = message_factory.GetMessageClass(descriptor)
        fields = {f.name: f for f in descriptor.fields if f.type != T.TYPE_MESSAGE or depth < MAX_DEPTH}
        optional = {name: field_values(field, depth) for name, field in fields.items()}
        _message_strategies[key] = st.fixed_dictionaries({}, optional=optional).map(
            lambda chosen: build(cls, fields, chosen))
    return _message_strategies[key]


def tweaks(descriptor, depth: int = 0) -> st.SearchStrategy:
    """A message with one field set (a nested message: with one of its own): merged into a valid request, it
    changes one thing, so the request gets as far as that one thing allows."""
    key = ("tweak", descriptor.full_name, depth)
    if key not in _message_strategies:
        cls = message_factory.GetMessageClass(descriptor)
        fields = [f for f in descriptor.fields if f.type != T.TYPE_MESSAGE or depth < MAX_DEPTH]

        def one(field):
            nested = field.type == T.TYPE_MESSAGE and not field.is_repeated
            value = tweaks(field.message_type, depth + 1) if nested else field_values(field, depth)
            return value.map(lambda v: build(cls, {field.name: field}, {field.name: v}))

        _message_strategies[key] = st.sampled_from(fields).flatmap(one) if fields else st.just(cls())
    return _message_strategies[key]


def build(cls, fields, chosen: dict):
    message = cls()
    for name, value in chosen.items():
        field = fields[name]
        target = getattr(message, name) if field.is_repeated or field.type == T.TYPE_MESSAGE else None
        if field.type == T.TYPE_MESSAGE and field.message_type.GetOptions().map_entry:
            if field.message_type.fields_by_name["value"].type == T.TYPE_MESSAGE:
                for k, v in value.items():
                    target[k].CopyFrom(v)
            else:
                target.update(value)
        elif field.is_repeated:
            target.extend(value)
        elif field.type == T.TYPE_MESSAGE:
            target.CopyFrom(value)
        else:
            setattr(message, name, value)
    return message


# -- valid requests to start from ----------------------------------------------------------------------------------

def _engine_generate(**fields):
    fields = {"prompt_token_ids": [5, 17, 33, 80], "sampling": engine_pb2.SamplingParams(temperature=0.0),
              "stopping": engine_pb2.StoppingParams(max_tokens=4), **fields}
    return engine_pb2.GenerateRequest(**fields)


def _text_generate(**fields):
    fields = {"sampling": engine_pb2.SamplingParams(temperature=0.8, seed=3),
              "stopping": engine_pb2.StoppingParams(max_tokens=4), **fields}
    return tokenizer_pb2.GenerateRequest(**fields)


def _plans():
    """A worker stream: a new request's prefill in two chunks, then a decode step."""
    params = worker_pb2.SamplingParams(temperature=0.0, top_p=1.0, repetition_penalty=1.0, max_tokens=8)
    new = worker_pb2.NewRequest(request_id="r", token_ids=[5, 6, 7, 8, 9], num_prompt_tokens=5, params=params,
                                block_ids=[0, 1])
    return [worker_pb2.ExecuteRequest(plan=worker_pb2.StepPlan(
                new_requests=[new], num_scheduled_tokens=[worker_pb2.ScheduledTokens(request_id="r", num_tokens=3)])),
            worker_pb2.ExecuteRequest(plan=worker_pb2.StepPlan(
                num_scheduled_tokens=[worker_pb2.ScheduledTokens(request_id="r", num_tokens=2)])),
            worker_pb2.ExecuteRequest(plan=worker_pb2.StepPlan(
                new_block_ids=[worker_pb2.RequestBlockIds(request_id="r", block_ids=[2])],
                num_scheduled_tokens=[worker_pb2.ScheduledTokens(request_id="r", num_tokens=1)]))]


# By method path; a method without one starts from the empty message (which is valid for most of them).
SEEDS = {
    "/tessera.engine.v1.Engine/Generate": [_engine_generate(), _engine_generate(n=2), _engine_generate(
        output=engine_pb2.OutputOptions(logprobs=2, prompt_logprobs=1))],
    "/tessera.tokenizer.v1.TextGeneration/Generate": [_text_generate(text="def f():"), _text_generate(
        messages=[tokenizer_pb2.ChatMessage(role="user", content="hi")]), _text_generate(text="x", n=2)],
    "/tessera.tokenizer.v1.Tokenizer/Tokenize": [tokenizer_pb2.TokenizeRequest(text="héllo wörld", return_offsets=True)],
    "/tessera.tokenizer.v1.Tokenizer/Detokenize": [tokenizer_pb2.DetokenizeRequest(token_ids=[5, 6, 7])],
    "/tessera.tokenizer.v1.Tokenizer/RenderChat": [tokenizer_pb2.RenderChatRequest(
        messages=[tokenizer_pb2.ChatMessage(role="user", content="hi")])],
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": [
        reflection_pb2.ServerReflectionRequest(list_services=""),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol="tessera.engine.v1.Engine")],
}


def merged(seed, *changes):
    message = type(seed)()
    message.CopyFrom(seed)
    for change in changes:
        message.MergeFrom(change)  # set scalars replace the seed's, repeated fields append
    return message


def requests(method) -> st.SearchStrategy:
    """One request (a short list of them for a client-streaming method): any message, or a valid one with any
    fields merged in, or with one to three single fields changed."""
    fuzzed = messages(method.input_type)
    seeds = st.sampled_from(SEEDS.get(path_of(method), [message_factory.GetMessageClass(method.input_type)()]))
    changed = st.builds(lambda seed, changes: merged(seed, *changes), seeds,
                        st.lists(tweaks(method.input_type), min_size=1, max_size=3))
    one = st.one_of(fuzzed, st.builds(merged, seeds, fuzzed), changed)
    if not method.client_streaming:
        return one
    if path_of(method) == "/tessera.worker.v1.Worker/Execute":
        # Fuzz one step of a valid stream, at any point of it: the steps before it keep the worker's state real.
        step = st.one_of(fuzzed, tweaks(method.input_type))
        return st.builds(lambda at, step, tail: _plans()[:at] + [merged(_plans()[at], step)] + _plans()[at + 1:][:tail],
                         st.integers(0, 2), step, st.integers(0, 2)) | st.lists(fuzzed, min_size=1, max_size=3)
    return st.lists(one, min_size=1, max_size=3)


def mutations(encoded: bytes) -> st.SearchStrategy[bytes]:
    """The bytes as they are, cut short anywhere, or with one bit flipped."""
    if not encoded:
        return st.just(encoded)
    cut = st.integers(0, len(encoded) - 1).map(lambda i: encoded[:i])
    flip = st.tuples(st.integers(0, len(encoded) - 1), st.integers(0, 7)).map(
        lambda ib: encoded[:ib[0]] + bytes([encoded[ib[0]] ^ (1 << ib[1])]) + encoded[ib[0] + 1:])
    return st.one_of(st.just(encoded), cut, flip)


def raw_messages(method) -> st.SearchStrategy[bytes]:
    # Garbage that opens with a plausible tag gets further into the parser than random bytes do.
    tagged = st.builds(lambda tag, rest: bytes([tag]) + rest, st.integers(0, 255), st.binary(max_size=60))
    encoded = messages(method.input_type).map(lambda m: m.SerializeToString()).flatmap(mutations)
    return st.one_of(st.binary(max_size=60), tagged, encoded)


def raw_requests(method) -> st.SearchStrategy:
    one = raw_messages(method)
    return st.lists(one, min_size=1, max_size=3) if method.client_streaming else one


# -- calls -----------------------------------------------------------------------------------------------------------

# An x-request-id (the servers' other source of a request id) on some calls: any value gRPC lets a client send.
METADATA = st.one_of(st.just(()), st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7e), max_size=200).map(
    lambda value: (("x-request-id", value),)))


def invoke(channel, method, request, serialize: bool, metadata=()):
    """(status code, details, responses) of one call; raw bytes go out as they are when not `serialize`."""
    path = path_of(method)
    response_class = message_factory.GetMessageClass(method.output_type)
    kind = {(False, False): channel.unary_unary, (False, True): channel.unary_stream,
            (True, False): channel.stream_unary, (True, True): channel.stream_stream}
    stub = kind[(method.client_streaming, method.server_streaming)](
        path, request_serializer=(lambda m: m.SerializeToString()) if serialize else None,
        response_deserializer=response_class.FromString)
    try:
        call = stub(iter(request) if method.client_streaming else request, timeout=DEADLINE, metadata=metadata)
        if not method.server_streaming:
            return OK, "", [call]
        if path in ENDLESS:
            first = next(call)
            call.cancel()
            return OK, "", [first]
        return OK, "", list(call)
    except grpc.RpcError as error:
        return error.code(), error.details(), []


def check_generate(method, request, responses) -> None:
    """A Generate that ends OK has finished every one of its samples."""
    if method.name == "Generate":
        finished = {r.index for r in responses if r.finish_reason != engine_pb2.FINISH_REASON_UNSPECIFIED}
        assert finished == set(range(max(request.n, 1))), (request, responses[-1:])


# -- servers ---------------------------------------------------------------------------------------------------------

class HealthMonitor(threading.Thread):
    """Checks the overall health of each server every ~50 ms, recording each latency and anything not SERVING."""

    def __init__(self, addresses: dict[str, str]):
        super().__init__(daemon=True, name="health-monitor")
        self.channels = {name: grpc.insecure_channel(address) for name, address in addresses.items()}
        self.latencies: dict[str, list[float]] = {name: [] for name in addresses}
        self.problems: list[tuple[str, str]] = []
        self.stopped = threading.Event()

    def run(self) -> None:
        stubs = {name: health_pb2_grpc.HealthStub(channel) for name, channel in self.channels.items()}
        while not self.stopped.wait(0.05):
            for name, stub in stubs.items():
                start = time.perf_counter()
                try:
                    status = stub.Check(health_pb2.HealthCheckRequest(), timeout=2).status
                except grpc.RpcError as error:
                    self.problems.append((name, error.code().name))
                    continue
                self.latencies[name].append(time.perf_counter() - start)
                if status != health_pb2.HealthCheckResponse.SERVING:
                    self.problems.append((name, health_pb2.HealthCheckResponse.ServingStatus.Name(status)))

    def stop(self) -> None:
        self.stopped.set()
        self.join()
        for channel in self.channels.values():
            channel.close()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random Llama with the vocabulary of the tiny Llama 3 tokenizer (and its chat template)."""
    from tessera.tokenizer.tokenizer import Tokenizer
    from tiny_tokenizers import tokenizer_dirs

    tokenizer = tokenizer_dirs()["llama3"]
    tok = Tokenizer(tokenizer)
    path = make_tiny_checkpoint(tmp_path_factory.mktemp("fuzz_tiny"), "llama", vocab_size=tok.vocab_size,
                                bos_token_id=tok.bos_token_id, eos_token_id=list(tok.eos_token_ids),
                                max_position_embeddings=MAX_MODEL_LEN)
    for file in tokenizer.iterdir():
        shutil.copy(file, path / file.name)
    return path


@pytest.fixture(scope="module")
def servers(model_dir):
    """{"engine", "tokenizer", "worker" (the fuzzer's), "engine-worker" (the engine's)}: ServerProcess each,
    started side by side (the engine waits for its worker, the tokenizer reports SERVING once the engine is up)."""
    model = str(model_dir)
    engine_worker = ServerProcess("worker", "--model", model, *WORKER_FLAGS, env=ONE_THREAD)
    procs = {
        "engine-worker": engine_worker,
        "worker": ServerProcess("worker", "--model", model, *WORKER_FLAGS, env=ONE_THREAD),
        "engine": ServerProcess("engine", "--model", model, "--worker", engine_worker.address, *ENGINE_FLAGS,
                                env=ONE_THREAD),
    }
    procs["tokenizer"] = ServerProcess("tokenizer", "--model", model, "--engine", procs["engine"].address,
                                       *TOKENIZER_FLAGS)
    def stop_all():
        with ThreadPoolExecutor(len(procs)) as pool:
            list(pool.map(lambda proc: proc.process is not None and proc.stop(), procs.values()))

    try:
        with ThreadPoolExecutor(len(procs)) as pool:
            for future in [pool.submit(proc.start) for proc in procs.values()]:
                future.result()
        yield procs
    finally:
        stop_all()


# A bare grpc health server: the yardstick for what this machine's load alone does to a health check.
CONTROL = """
import asyncio, sys
import grpc
from grpc_health.v1 import health, health_pb2_grpc

async def main():
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    server.add_insecure_port(sys.argv[1])
    await server.start()
    await server.wait_for_termination()

asyncio.run(main())
"""


@pytest.fixture(scope="module")
def monitor(servers):
    address = f"127.0.0.1:{free_port()}"
    control = subprocess.Popen([sys.executable, "-c", CONTROL, address])
    try:
        wait_serving(address, process=control)
        watch = HealthMonitor({"control": address, **{name: proc.address for name, proc in servers.items()}})
        watch.start()
        yield watch
        watch.stop()
    finally:
        control.terminate()
        control.wait()


@pytest.fixture(scope="module")
def channels(servers, monitor):
    """A channel to each fuzzed server; the health monitor runs while any test uses them."""
    opened = {role: grpc.insecure_channel(servers[role].address) for role in FILES}
    yield opened
    for channel in opened.values():
        channel.close()


# -- the services ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("role", list(FILES))
def test_every_registered_service_is_fuzzed(channels, role):
    stub = reflection_pb2_grpc.ServerReflectionStub(channels[role])
    [response] = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                           timeout=DEADLINE)
    listed = {service.name for service in response.list_services_response.service}
    assert listed == {service.full_name for service in SERVICES[role]}


# -- fuzzing ---------------------------------------------------------------------------------------------------------

# The RPCs with the most paths get more examples.
EXAMPLES = {"Generate": 100, "Execute": 100}
IDS = [f"{role}:{method.containing_service.name}/{method.name}" for role, method in METHODS]


def fuzz_settings(method):
    return settings(max_examples=EXAMPLES.get(method.name, 40), deadline=None, derandomize=True, database=None,
                    suppress_health_check=list(HealthCheck), print_blob=False)


@pytest.mark.parametrize("role, method", METHODS, ids=IDS)
def test_structured_requests(channels, role, method):
    @fuzz_settings(method)
    @given(requests(method), METADATA)
    def call(request, metadata):
        code, details, responses = invoke(channels[role], method, request, serialize=True, metadata=metadata)
        event(code.name)  # pytest --hypothesis-show-statistics: how far the inputs got
        assert code in allowed(method), (code, details)
        if code is OK:
            check_generate(method, request, responses)

    call()


@pytest.mark.parametrize("role, method", METHODS, ids=IDS)
def test_raw_bytes(channels, role, method):
    @fuzz_settings(method)
    @given(raw_requests(method))
    def call(request):
        code, details, _ = invoke(channels[role], method, request, serialize=False)
        event(code.name)
        assert code in allowed(method), (code, details)

    call()


# -- the cases named in the issue -----------------------------------------------------------------------------------
# Tested elsewhere: a 300k-entry logit_bias on the engine, request_ids with non-ASCII or control characters or over
# 16 KiB on both servers, a seed of 2**64 + 7, n >= 2 with a seed near 2**63 (test_limits.py); invalid UTF-8, an
# over-long varint, truncated bytes on every RPC (test_undecodable_requests.py); a request_id "victim/0" while
# "victim" runs with n=2 (test_engine_service.py).

BIG_BIAS = {i: 1.0 for i in range(100_000)}  # ~1 MB on the wire: within the tokenizer's 4 MiB
ENGINE_BIAS = {i: 1.0 for i in range(5_000)}  # ~50 KB: within the engine's 64 KiB
CASES = [  # (id, server, rpc, request, code, what the message starts with)
    ("n-uint32-max-big-bias", "tokenizer", "Generate", lambda: _text_generate(
        text="x", n=2**32 - 1, sampling=engine_pb2.SamplingParams(logit_bias=BIG_BIAS)), INVALID, "n: "),
    ("n-385-big-bias", "tokenizer", "Generate", lambda: _text_generate(
        text="x", n=385, sampling=engine_pb2.SamplingParams(logit_bias=BIG_BIAS)), INVALID, "n: "),
    ("engine-n-385-big-bias", "engine", "Generate", lambda: _engine_generate(
        n=385, sampling=engine_pb2.SamplingParams(logit_bias=ENGINE_BIAS)), INVALID, "n: "),
    ("stop-200k", "tokenizer", "Generate", lambda: _text_generate(
        text="x", stopping=engine_pb2.StoppingParams(stop=["a"] * 200_000)), INVALID, "stopping.stop: "),
    ("tokenize-4MiB", "tokenizer", "Tokenize", lambda: tokenizer_pb2.TokenizeRequest(text="x" * ((4 << 20) - 64)),
     INVALID, "text: "),
    ("tokenize-over-4MiB", "tokenizer", "Tokenize", lambda: tokenizer_pb2.TokenizeRequest(text="x" * (4 << 20)),
     EXHAUSTED, ""),  # gRPC's own refusal: over --max-request-bytes
]


@pytest.mark.parametrize("server, rpc, make, code, starts", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_an_expensive_request_is_refused_at_once(channels, server, rpc, make, code, starts):
    request, channel = make(), channels[server]
    stub = (engine_pb2_grpc.EngineStub(channel) if server == "engine" else
            tokenizer_pb2_grpc.TextGenerationStub(channel) if rpc == "Generate" else
            tokenizer_pb2_grpc.TokenizerStub(channel))
    start = time.perf_counter()
    with pytest.raises(grpc.RpcError) as error:
        result = getattr(stub, rpc)(request, timeout=DEADLINE)
        list(result) if rpc == "Generate" else result
    assert error.value.code() == code and error.value.details().startswith(starts), error.value.details()
    assert time.perf_counter() - start < 2.0  # a few MB over loopback and one check: no work behind it
    health_start = time.perf_counter()
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    assert time.perf_counter() - health_start < 0.5


# -- many at once ---------------------------------------------------------------------------------------------------

def test_streams_at_once_cancelled_and_past_their_deadline(channels):
    """More streams at once than the engine holds, on it and through the tokenizer, some sharing an id, some
    cancelled after their first message, some past a short deadline: each ends with a status it may, and
    test_no_request_or_kv_block_is_left_behind then finds nothing left over."""
    generate = {"engine": engine_pb2_grpc.EngineStub(channels["engine"]).Generate,
                "tokenizer": tokenizer_pb2_grpc.TextGenerationStub(channels["tokenizer"]).Generate}

    def run(i: int):
        server = ("engine", "tokenizer")[i % 2]
        make = _engine_generate if server == "engine" else functools.partial(_text_generate, text="def f():")
        request = make(request_id=f"shared-{i % 3}", n=1 + i % 3 // 2,
                       stopping=engine_pb2.StoppingParams(max_tokens=40, ignore_eos=True))
        cancel, expire = i % 4 == 1, i % 5 == 0
        call = generate[server](request, timeout=0.05 if expire else 4 * DEADLINE)
        try:
            for _ in call:
                if cancel:
                    call.cancel()
            code = OK
        except grpc.RpcError as error:
            code = error.code()
        # Over capacity: RESOURCE_EXHAUSTED. An id already running: ALREADY_EXISTS (while the engine refuses a
        # second call with a running call's id). CANCELLED and DEADLINE_EXCEEDED: only the client's own doing.
        may = {OK, EXHAUSTED, grpc.StatusCode.ALREADY_EXISTS}
        may |= {grpc.StatusCode.CANCELLED} if cancel else set()
        may |= {grpc.StatusCode.DEADLINE_EXCEEDED} if expire else set()
        return i, code, may

    with ThreadPoolExecutor(16) as pool:
        for i, code, may in pool.map(run, range(16)):
            assert code in may, (i, code)


# -- afterwards (these run last) ------------------------------------------------------------------------------------

def test_no_request_or_kv_block_is_left_behind(channels):
    stub = engine_pb2_grpc.EngineStub(channels["engine"])
    deadline = time.monotonic() + 10
    while True:  # an aborted stream frees its blocks within a step
        load = stub.GetLoad(engine_pb2.GetLoadRequest(), timeout=DEADLINE)
        if (load.num_running, load.num_waiting, load.kv_blocks_in_use) == (0, 0, 0) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert (load.num_running, load.num_waiting, load.kv_blocks_in_use) == (0, 0, 0), load
    # And the chain still generates.
    responses = list(tokenizer_pb2_grpc.TextGenerationStub(channels["tokenizer"]).Generate(
        _text_generate(text="def f():"), timeout=DEADLINE))
    assert responses[-1].finish_reason != engine_pb2.FINISH_REASON_UNSPECIFIED


def test_every_server_stayed_serving_and_answered_health_fast(monitor):
    # Never anything but SERVING, from every server, over a few hundred checks.
    assert not monitor.problems, monitor.problems[:10]
    # The 99th percentile under 250 ms and none over 1 s, beyond what the bare control server took: on a loaded
    # 2-core machine (four servers, the fuzzer, the rest of the suite) a check can wait for the scheduler or for
    # a server's GIL while it parses a fuzzed request, which no server can help (the engine's p99 reached 112 ms
    # against a 100 ms bound once, in a full CI run); a server that hangs or serializes checks behind work blows
    # far past either bound. On a quiet machine the control takes ~1 ms.
    summary = {name: (len(latencies), statistics.quantiles(latencies, n=100)[98] if len(latencies) > 1 else
                      max(latencies, default=math.inf), max(latencies, default=math.inf))
               for name, latencies in monitor.latencies.items()}
    shown = {name: f"{count} checks, p99 {p99 * 1000:.0f} ms, max {top * 1000:.0f} ms"
             for name, (count, p99, top) in summary.items()}
    _, control_p99, control_max = summary.pop("control")
    for count, p99, top in summary.values():
        assert p99 < 0.25 + control_p99 and top < 1.0 + control_max, shown
