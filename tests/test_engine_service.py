"""tessera.engine.v1.Engine as a real server process on loopback."""
from __future__ import annotations

import re
import signal
import threading
import time
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from servers import ServerProcess, free_port
from tessera.engine.engine import EngineConfig, LLMEngine
from tessera.sampling_params import SamplingParams
from tessera.engine.v1 import engine_pb2, engine_pb2_grpc
from tiny_checkpoints import preset_checkpoint

PROMPT = [5, 17, 33, 80, 101, 7, 64, 200, 13, 9]


def greedy(max_tokens=16, **fields):
    return engine_pb2.GenerateRequest(
        prompt_token_ids=PROMPT,
        sampling=engine_pb2.SamplingParams(temperature=0.0),
        stopping=engine_pb2.StoppingParams(max_tokens=max_tokens, ignore_eos=True),
        **fields,
    )


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    # A long context, so that a stream cannot finish before a short deadline expires.
    return preset_checkpoint(tmp_path_factory, "llama", max_position_embeddings=4096)


@pytest.fixture(scope="module")
def engine_server(model_dir):
    metrics_port = free_port()
    with ServerProcess("engine", "--model", str(model_dir), "--block-size", "4", "--kv-cache-memory", "4MiB",
                       "--metrics-port", str(metrics_port)) as server:
        server.metrics_port = metrics_port
        yield server


@pytest.fixture
def stub(engine_server):
    with grpc.insecure_channel(engine_server.address) as channel:
        yield engine_pb2_grpc.EngineStub(channel)


def wait_idle(stub, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        load = stub.GetLoad(engine_pb2.GetLoadRequest())
        if load.kv_blocks_in_use == 0 and load.num_running == 0 and load.num_waiting == 0:
            return load
        time.sleep(0.02)
    raise AssertionError(f"engine still busy: {load}")


STREAMED = 40  # tokens of the streamed-equality test


def test_streamed_tokens_equal_the_in_process_engine(stub, model_dir):
    expected = LLMEngine(EngineConfig(model=str(model_dir), block_size=4)).generate(
        [PROMPT], SamplingParams(temperature=0.0, max_tokens=STREAMED, ignore_eos=True, logprobs=2))[0]
    responses = list(stub.Generate(greedy(STREAMED, output=engine_pb2.OutputOptions(logprobs=2))))
    assert [t for r in responses for t in r.token_ids] == expected.token_ids
    # Really streamed: one response per step, except that a reader who falls behind (this one shares two cores
    # with the engine's spinning compute threads) gets the steps that queued up merged into one message. A step
    # of this tiny model takes well under a millisecond: 40 of them outlast a scheduler's time slice or two.
    assert 4 <= len(responses) <= STREAMED and all(r.token_ids for r in responses)
    assert [lp.logprob for r in responses for lp in r.logprobs] == pytest.approx(
        [lp.logprob for lp in expected.logprobs], abs=1e-5)
    last = responses[-1]
    assert last.finish_reason == engine_pb2.FINISH_REASON_LENGTH
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (len(PROMPT), STREAMED)
    assert all(r.finish_reason == engine_pb2.FINISH_REASON_UNSPECIFIED for r in responses[:-1])


def test_n_samples_are_multiplexed_by_index(stub):
    request = engine_pb2.GenerateRequest(
        prompt_token_ids=PROMPT, n=3,
        sampling=engine_pb2.SamplingParams(temperature=1.0, seed=7),
        stopping=engine_pb2.StoppingParams(max_tokens=8, ignore_eos=True),
    )
    samples = {}
    for response in stub.Generate(request):
        samples.setdefault(response.index, []).extend(response.token_ids)
    assert sorted(samples) == [0, 1, 2] and all(len(s) == 8 for s in samples.values())
    again = {}
    for response in stub.Generate(request):
        again.setdefault(response.index, []).extend(response.token_ids)
    assert again == samples  # seeded: reproducible
    assert len({tuple(s) for s in samples.values()}) > 1  # seed + index: the samples differ


def test_a_client_id_naming_another_calls_sample_runs_beside_it(stub):
    """Engine ids are namespaced per call: a client id "victim/0" while "victim" runs with n=2 is a request of its
    own that runs to its end, and finishing it leaves the victim's samples running to theirs."""
    victim = stub.Generate(greedy(max_tokens=200, request_id="victim", n=2))
    next(victim)  # running
    other = list(stub.Generate(greedy(max_tokens=4, request_id="victim/0")))
    assert other[-1].finish_reason == engine_pb2.FINISH_REASON_LENGTH and other[-1].request_id == "victim/0"
    reasons = {r.index: r.finish_reason for r in victim if r.finish_reason}
    assert reasons == {0: engine_pb2.FINISH_REASON_LENGTH, 1: engine_pb2.FINISH_REASON_LENGTH}


def test_calls_sharing_an_id_run_apart_and_abort_ends_every_one(stub):
    first = stub.Generate(greedy(max_tokens=3000, request_id="shared"))
    second = stub.Generate(greedy(max_tokens=3000, request_id="shared"))
    next(first), next(second)  # both running
    assert stub.Abort(engine_pb2.AbortRequest(request_ids=["shared"])).num_aborted == 2
    for call in (first, second):
        assert [r.finish_reason for r in call if r.finish_reason] == [engine_pb2.FINISH_REASON_ABORT]
    assert stub.Abort(engine_pb2.AbortRequest(request_ids=["shared"])).num_aborted == 0
    alone = list(stub.Generate(greedy(max_tokens=3, request_id="shared")))  # the id is free again
    assert alone[-1].finish_reason == engine_pb2.FINISH_REASON_LENGTH


def test_request_id_comes_from_the_field_or_metadata(stub):
    assert next(stub.Generate(greedy(max_tokens=1, request_id="abc"))).request_id == "abc"
    response = next(stub.Generate(greedy(max_tokens=1), metadata=[("x-request-id", "from-metadata")]))
    assert response.request_id == "from-metadata"


@pytest.mark.parametrize("mutate, code, field", [
    (lambda r: r.ClearField("prompt_token_ids"), grpc.StatusCode.INVALID_ARGUMENT, "prompt_token_ids"),
    (lambda r: r.prompt_token_ids.append(256), grpc.StatusCode.INVALID_ARGUMENT, "prompt_token_ids"),
    (lambda r: r.prompt_token_ids.extend([1] * 4100), grpc.StatusCode.OUT_OF_RANGE, "prompt_token_ids"),
    (lambda r: setattr(r.sampling, "temperature", -0.5), grpc.StatusCode.INVALID_ARGUMENT, "sampling.temperature"),
    (lambda r: setattr(r.sampling, "top_p", 1.5), grpc.StatusCode.INVALID_ARGUMENT, "sampling.top_p"),
    (lambda r: setattr(r.sampling, "top_p", 0.0), grpc.StatusCode.INVALID_ARGUMENT, "sampling.top_p"),
    (lambda r: setattr(r.sampling, "top_k", -2), grpc.StatusCode.INVALID_ARGUMENT, "sampling.top_k"),
    (lambda r: setattr(r.sampling, "min_p", 2.0), grpc.StatusCode.INVALID_ARGUMENT, "sampling.min_p"),
    (lambda r: r.sampling.logit_bias.update({999: 1.0}), grpc.StatusCode.INVALID_ARGUMENT, "sampling.logit_bias"),
    (lambda r: setattr(r.stopping, "max_tokens", 0), grpc.StatusCode.INVALID_ARGUMENT, "stopping.max_tokens"),
    (lambda r: setattr(r.stopping, "max_tokens", 5000), grpc.StatusCode.INVALID_ARGUMENT, "stopping.max_tokens"),
    (lambda r: r.stopping.stop.append("\n"), grpc.StatusCode.INVALID_ARGUMENT, "stopping.stop"),
    (lambda r: setattr(r.output, "logprobs", 50), grpc.StatusCode.INVALID_ARGUMENT, "output.logprobs"),
])
def test_bad_input_gets_a_status_naming_the_field(stub, mutate, code, field):
    request = greedy()
    mutate(request)
    with pytest.raises(grpc.RpcError) as error:
        list(stub.Generate(request))
    assert error.value.code() == code
    assert error.value.details().startswith(field)
    assert [t for r in stub.Generate(greedy(max_tokens=2)) for t in r.token_ids]  # still serving


def test_cancel_frees_the_blocks_within_a_step(stub):
    call = stub.Generate(greedy(max_tokens=200))
    next(call), next(call)
    assert stub.GetLoad(engine_pb2.GetLoadRequest()).kv_blocks_in_use > 0
    call.cancel()
    wait_idle(stub, timeout=5)


def test_deadline_aborts_and_frees_the_blocks(stub):
    with pytest.raises(grpc.RpcError) as error:
        for _ in stub.Generate(greedy(max_tokens=4000), timeout=0.5):
            pass
    assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_idle(stub, timeout=5)


def test_abort_rpc_ends_the_stream_with_finish_reason_abort(stub):
    call = stub.Generate(greedy(max_tokens=200, request_id="to-abort"))
    next(call)
    assert stub.Abort(engine_pb2.AbortRequest(request_ids=["to-abort", "unknown"])).num_aborted == 1
    last = list(call)[-1]
    assert last.finish_reason == engine_pb2.FINISH_REASON_ABORT
    wait_idle(stub)


def test_model_info_and_load(stub):
    info = stub.GetModelInfo(engine_pb2.GetModelInfoRequest())
    assert (info.architecture, info.vocab_size, info.max_model_len) == ("LlamaForCausalLM", 256, 4096)
    assert list(info.eos_token_ids) == [2, 3] and info.block_size == 4 and info.dtype == "float32"
    # 4 MiB of KV: 2 layers * 2 kv heads * 16 dims * 2 (k, v) * 4 bytes = 512 bytes a token, 2048 a block.
    assert info.kv_blocks_total == 2048
    load = wait_idle(stub)
    assert load.kv_blocks_total == 2048


def test_reflection_lists_the_services(engine_server):
    with grpc.insecure_channel(engine_server.address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        response = next(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
    names = {s.name for s in response.list_services_response.service}
    assert {"tessera.engine.v1.Engine", "grpc.health.v1.Health"} <= names


def test_metrics_count_requests_and_show_kv_use(stub, engine_server):
    list(stub.Generate(greedy(max_tokens=2)))
    text = urllib.request.urlopen(f"http://127.0.0.1:{engine_server.metrics_port}/metrics").read().decode()
    assert 'tessera_requests_total{code="OK",method="Generate"}' in text
    assert "tessera_time_to_first_token_seconds_count" in text
    assert "tessera_kv_blocks_total 2048.0" in text


def test_metrics_count_every_call_finished_or_cancelled(stub, engine_server):
    """A stream the client drops counts too (as CANCELLED), mid-way or just after its last message, as the
    tokenizer drops its engine calls."""
    def counts():
        text = urllib.request.urlopen(f"http://127.0.0.1:{engine_server.metrics_port}/metrics").read().decode()
        return {code: float(value) for code, value in
                re.findall(r'^tessera_requests_total\{code="(\w+)",method="Generate"\} (\S+)$', text, re.MULTILINE)}

    before = counts()
    for _ in range(3):
        list(stub.Generate(greedy(max_tokens=2)))
    for _ in range(3):
        call = stub.Generate(greedy(max_tokens=200))
        next(call)
        call.cancel()
    for _ in range(10):  # as the tokenizer does: cancel at once after the message that finishes the request
        call = stub.Generate(greedy(max_tokens=1))
        assert next(call).finish_reason
        call.cancel()
    wait_idle(stub)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        after = counts()
        if sum(after.values()) - sum(before.values()) >= 16:
            break
        time.sleep(0.1)
    assert after.get("OK", 0) - before.get("OK", 0) >= 3  # the 10 cancelled at their end count either way
    assert after.get("CANCELLED", 0) - before.get("CANCELLED", 0) >= 3
    assert sum(after.values()) - sum(before.values()) == 16


def test_full_queue_is_resource_exhausted(model_dir):
    with ServerProcess("engine", "--model", str(model_dir), "--max-num-seqs", "1", "--max-queue", "0") as server:
        with grpc.insecure_channel(server.address) as channel:
            stub = engine_pb2_grpc.EngineStub(channel)
            running = stub.Generate(greedy(max_tokens=200))
            next(running)
            with pytest.raises(grpc.RpcError) as error:
                list(stub.Generate(greedy(max_tokens=2)))
            assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            running.cancel()


def test_sigterm_drains_in_flight_streams(model_dir):
    server = ServerProcess("engine", "--model", str(model_dir), "--grace", "20").start()
    try:
        with grpc.insecure_channel(server.address) as channel:
            watch = health_pb2_grpc.HealthStub(channel).Watch(
                health_pb2.HealthCheckRequest(service="tessera.engine.v1.Engine"))
            assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
            call = engine_pb2_grpc.EngineStub(channel).Generate(greedy(max_tokens=1500))  # seconds of work
            first = next(call)
            threading.Timer(0.05, server.process.send_signal, [signal.SIGTERM]).start()
            # Watchers learn of the drain at once, while the in-flight stream still completes.
            assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
            rest = list(call)
        assert len(first.token_ids) + sum(len(r.token_ids) for r in rest) == 1500
        assert rest[-1].finish_reason == engine_pb2.FINISH_REASON_LENGTH
        assert server.process.wait(30) == 0
    finally:
        server.stop()


def test_a_draining_engine_says_not_serving_refuses_new_calls_and_exits_once_streams_end(model_dir):
    """During the drain the port stays open: a new connection's health check gets NOT_SERVING (not "connection
    refused"), a new Generate gets UNAVAILABLE, Abort still works, the in-flight stream runs to its end, and the
    process exits 0 then, well before the grace period is over."""
    server = ServerProcess("engine", "--model", str(model_dir), "--grace", "120").start()
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = engine_pb2_grpc.EngineStub(channel)
            running = stub.Generate(greedy(max_tokens=4000, request_id="in-flight"))  # seconds of work
            first = next(running)
            to_abort = stub.Generate(greedy(max_tokens=4000, request_id="to-abort"))
            next(to_abort)
            server.process.send_signal(signal.SIGTERM)
            with grpc.insecure_channel(server.address) as fresh:  # a new connection: the listener is still open
                health = health_pb2_grpc.HealthStub(fresh)
                deadline = time.monotonic() + 10
                while health.Check(health_pb2.HealthCheckRequest(), timeout=5).status != \
                        health_pb2.HealthCheckResponse.NOT_SERVING:
                    assert time.monotonic() < deadline, "still SERVING 10 s after SIGTERM"
                    time.sleep(0.02)
                assert health.Check(health_pb2.HealthCheckRequest(service="tessera.engine.v1.Engine"),
                                    timeout=5).status == health_pb2.HealthCheckResponse.NOT_SERVING
                with pytest.raises(grpc.RpcError) as error:
                    list(engine_pb2_grpc.EngineStub(fresh).Generate(greedy(max_tokens=2), timeout=10))
                assert error.value.code() == grpc.StatusCode.UNAVAILABLE and "draining" in error.value.details()
                with pytest.raises(grpc.RpcError) as error:
                    engine_pb2_grpc.EngineStub(fresh).GetLoad(engine_pb2.GetLoadRequest(), timeout=10)
                assert error.value.code() == grpc.StatusCode.UNAVAILABLE  # a router stops choosing it
                aborted = engine_pb2_grpc.EngineStub(fresh).Abort(engine_pb2.AbortRequest(request_ids=["to-abort"]))
                assert aborted.num_aborted == 1
            assert list(to_abort)[-1].finish_reason == engine_pb2.FINISH_REASON_ABORT
            rest = list(running)
        assert len(first.token_ids) + sum(len(r.token_ids) for r in rest) == 4000
        assert rest[-1].finish_reason == engine_pb2.FINISH_REASON_LENGTH
        assert server.process.wait(60) == 0  # once the streams ended, not after the 120 s grace
    finally:
        server.stop()


def test_a_stalled_reader_does_not_stall_other_streams(stub):
    """A client that stops reading fills its flow-control window and blocks its own handler; the engine and
    every other stream go on (big top-20 logprob messages fill the window quickly)."""
    stalled = stub.Generate(greedy(max_tokens=3000, request_id="stalled", output=engine_pb2.OutputOptions(logprobs=20)))
    next(stalled)  # then never read again while the others run
    try:
        for _ in range(3):
            tokens = [t for r in stub.Generate(greedy(max_tokens=50), timeout=60) for t in r.token_ids]
            assert len(tokens) == 50
        load = stub.GetLoad(engine_pb2.GetLoadRequest())
        assert load.num_running == 1  # the stalled request is still alive, and not in anyone's way
    finally:
        stalled.cancel()
    wait_idle(stub)


# --- engine thread -> event loop hand-off ----------------------------------------------------------------------

def test_outputs_waiting_for_a_lagging_stream_merge_per_sample():
    import asyncio

    from tessera.engine.request import FinishReason, RequestOutput, Usage
    from tessera.engine.service import coalesce
    from tessera.step import TokenLogprobs

    def lp(token):
        return TokenLogprobs(token, -0.5, [])

    async def scenario():
        queue = asyncio.Queue()
        usage = Usage(prompt_tokens=3, completion_tokens=3, cached_tokens=0)
        queue.put_nowait((1, RequestOutput("r/1", [7], [lp(7)])))
        queue.put_nowait((0, RequestOutput("r/0", [5], [lp(5)], finish_reason=FinishReason.LENGTH, usage=usage)))
        queue.put_nowait((1, RequestOutput("r/1", [8], [lp(8)])))
        first = (0, RequestOutput("r/0", [4], [lp(4)], prompt_logprobs=[lp(1)]))
        merged = coalesce([first], queue)
        assert queue.empty()
        assert [(i, out.new_token_ids, [e.token_id for e in out.new_logprobs]) for i, out in merged] == [
            (0, [4, 5], [4, 5]), (1, [7, 8], [7, 8])]
        assert merged[0][1].prompt_logprobs == [lp(1)] and merged[0][1].finished and merged[0][1].usage == usage
        assert not merged[1][1].finished

        queue.put_nowait((0, ConnectionError("worker lost")))
        with pytest.raises(ConnectionError):
            coalesce([(0, RequestOutput("r/0", [9]))], queue)

    asyncio.run(scenario())


def test_loop_outbox_delivers_in_order_with_one_wake_up_per_burst():
    import asyncio

    from tessera.engine.loop_outbox import LoopOutbox

    async def scenario():
        loop = asyncio.get_running_loop()
        wake_ups = 0
        original = loop.call_soon_threadsafe

        def counting(callback, *args):
            nonlocal wake_ups
            wake_ups += 1
            return original(callback, *args)

        loop.call_soon_threadsafe = counting
        outbox, queues = LoopOutbox(loop), [asyncio.Queue() for _ in range(4)]

        def engine_thread():  # 50 "steps" of one output per stream, as the engine loop delivers them
            for step in range(50):
                for number, queue in enumerate(queues):
                    outbox.put(queue, (step, number))

        await asyncio.to_thread(engine_thread)
        for number, queue in enumerate(queues):
            assert [await queue.get() for _ in range(50)] == [(step, number) for step in range(50)]
        assert 1 <= wake_ups < 50 * len(queues) / 2  # the event loop was busy awaiting: few flushes took many items

    asyncio.run(scenario())


def test_loop_outbox_wait_delivered_returns_after_the_woken_consumers_ran():
    """The engine thread's handoff (EngineLoop.handoff): once wait_delivered returns, each stream woken by the
    items has taken its item, so the next step's tokens go out as a message of their own."""
    import asyncio

    from tessera.engine.loop_outbox import LoopOutbox

    async def scenario():
        loop = asyncio.get_running_loop()
        outbox, queues = LoopOutbox(loop), [asyncio.Queue() for _ in range(3)]
        handled: list[tuple[int, int]] = []

        async def stream(number, queue):
            for _ in range(20):
                handled.append((await queue.get(), number))

        consumers = [asyncio.create_task(stream(n, q)) for n, q in enumerate(queues)]
        seen_by_engine: list[list[tuple[int, int]]] = []

        def engine_thread():
            for step in range(20):
                for queue in queues:
                    outbox.put(queue, step)
                outbox.wait_delivered(timeout=5.0)
                seen_by_engine.append(sorted(handled))

        await asyncio.to_thread(engine_thread)
        await asyncio.gather(*consumers)
        for step, seen in enumerate(seen_by_engine):
            assert seen == sorted((s, n) for s in range(step + 1) for n in range(3)), (step, seen)

    asyncio.run(scenario())
