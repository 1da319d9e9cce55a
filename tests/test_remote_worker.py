"""The worker role over gRPC: an engine driving a worker process gets the very same tokens as in-process."""
from __future__ import annotations

import random
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import given, settings
from hypothesis import strategies as st

from tessera.engine.engine import EngineConfig, LLMEngine
from tessera.engine.engine_loop import EngineLoop
from tessera.model_config import ModelConfig
from tessera.engine.remote_worker import RemoteWorker, WorkerUnavailable
from tessera.sampling_params import SamplingParams
from tessera.step import (
    SERVICE_NAME, NewRequest, StepPlan, StepResult, TokenLogprobs, params_from_proto, params_to_proto, plan_from_proto,
    plan_to_proto, result_from_proto, result_to_proto,
)
from tessera.worker.service import describe
from tessera.worker.v1 import worker_pb2, worker_pb2_grpc
from servers import ServerProcess, free_port
from tiny_checkpoints import preset_checkpoint

BLOCK_SIZE, NUM_BLOCKS, BUDGET = 4, 24, 16  # few blocks and a small budget: chunked prefill and preemption


def worker_process(model_dir, port=None) -> ServerProcess:
    """`tessera worker` with exactly NUM_BLOCKS blocks of KV cache."""
    kv_bytes = NUM_BLOCKS * BLOCK_SIZE * ModelConfig.from_pretrained(model_dir).kv_bytes_per_token
    return ServerProcess("worker", "--model", str(model_dir), "--block-size", str(BLOCK_SIZE),
                         "--kv-cache-memory", str(kv_bytes), port=port)


def local_engine(model_dir) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(model_dir), block_size=BLOCK_SIZE, num_kv_blocks=NUM_BLOCKS,
                                  max_num_batched_tokens=BUDGET))


def remote_engine(model_dir, worker: RemoteWorker) -> LLMEngine:
    # block_size and the block count come from the worker (Describe), not from the config.
    return LLMEngine(EngineConfig(model=str(model_dir), max_num_batched_tokens=BUDGET), worker=worker)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return preset_checkpoint(tmp_path_factory, "llama")


@pytest.fixture(scope="module")
def worker(model_dir):
    with worker_process(model_dir) as process:
        remote = RemoteWorker(process.address)
        yield remote
        remote.close()


def mixed_batch(count=14, seed=0):
    """Greedy with logprobs, seeded sampling with every filter, prompt logprobs, penalties, bias, min_tokens."""
    rng = random.Random(seed)
    prompts = [[rng.randrange(4, 256) for _ in range(rng.randint(1, 40))] for _ in range(count)]
    kinds = [
        dict(temperature=0.0, logprobs=3),
        dict(temperature=0.9, top_p=0.9, top_k=40, min_p=0.05, logprobs=0),
        dict(temperature=0.0, prompt_logprobs=2),
        dict(temperature=1.1, repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.3,
             logit_bias={7: 3.5, 9: -1.25}, min_tokens=4, stop_token_ids=[11]),
    ]
    params = [SamplingParams(**kinds[i % 4], seed=100 + i, max_tokens=rng.randint(4, 20)) for i in range(count)]
    return prompts, params


def test_same_tokens_logprobs_and_prompt_logprobs_as_in_process(model_dir, worker):
    prompts, params = mixed_batch()
    local = local_engine(model_dir)
    remote = remote_engine(model_dir, worker)
    expected, got = local.generate(prompts, params), remote.generate(prompts, params)
    for want, have in zip(expected, got):
        assert have.token_ids == want.token_ids
        assert (have.finish_reason, have.usage) == (want.finish_reason, want.usage)
        # Logprobs are float32 on the worker, so float32 on the wire carries them bit for bit.
        assert have.logprobs == want.logprobs
        assert have.prompt_logprobs == want.prompt_logprobs
    assert remote.scheduler.num_preemptions == local.scheduler.num_preemptions > 0
    assert any(c.prompt_logprobs for c in got) and any(c.logprobs for c in got)
    assert remote.kv.num_blocks_in_use == 0


def test_describe_reports_the_model_and_kv_capacity_and_health_is_serving(model_dir, worker):
    assert worker.info == describe(local_engine(model_dir).worker)
    assert (worker.num_blocks, worker.block_size, worker.info.kv_cache_bytes) == (NUM_BLOCKS, BLOCK_SIZE,
                                                                                   NUM_BLOCKS * BLOCK_SIZE * 512)
    assert worker.model_config.eos_token_ids == [2, 3] and worker.model_config.vocab_size == 256
    with grpc.insecure_channel(worker.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", SERVICE_NAME):
            response = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert response.status == health_pb2.HealthCheckResponse.SERVING


def test_one_engine_at_a_time_and_a_plan_no_engine_sends_is_invalid_argument(model_dir, worker):
    remote_engine(model_dir, worker).generate([[5, 6, 7]], SamplingParams(max_tokens=2))  # holds the stream
    empty = worker_pb2.ExecuteRequest(plan=worker_pb2.StepPlan())
    unknown = worker_pb2.ExecuteRequest(plan=worker_pb2.StepPlan(
        num_scheduled_tokens=[worker_pb2.ScheduledTokens(request_id="nobody", num_tokens=1)]))
    with grpc.insecure_channel(worker.address) as channel:
        stub = worker_pb2_grpc.WorkerStub(channel)
        with pytest.raises(grpc.RpcError) as error:
            next(stub.Execute(iter([empty])))
        assert error.value.code() is grpc.StatusCode.FAILED_PRECONDITION
        assert "another engine" in error.value.details()

        worker.close()  # the worker notices the cancel soon after
        for _ in range(50):
            responses = stub.Execute(iter([empty, unknown]))
            try:
                first = next(responses)
                break
            except grpc.RpcError:
                time.sleep(0.05)
        else:
            pytest.fail("the worker still refuses a new engine after the first one left")
        assert first.result == worker_pb2.StepResult()
        with pytest.raises(grpc.RpcError) as error:  # a plan naming a request the worker does not know
            next(responses)
        assert error.value.code() is grpc.StatusCode.INVALID_ARGUMENT and "nobody" in error.value.details()


def test_a_killed_worker_fails_the_step_and_a_restarted_one_serves_again(model_dir):
    greedy = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    prompt = list(range(10, 40))
    expected = local_engine(model_dir).generate([prompt], greedy)[0].token_ids
    port = free_port()
    process = worker_process(model_dir, port).start()
    remote = RemoteWorker(process.address)
    engine = remote_engine(model_dir, remote)
    loop = EngineLoop(engine)
    try:
        assert [t for out in loop.stream(prompt, greedy) for t in out.new_token_ids] == expected

        process.process.kill()
        process.process.wait()
        for _ in range(2):  # the broken stream, then a failed reconnect
            with pytest.raises(WorkerUnavailable, match=f"worker at 127.0.0.1:{port} is unavailable"):
                list(loop.stream(prompt, greedy))
        assert loop.num_unfinished() == 0 and engine.kv.num_blocks_in_use == 0

        process = worker_process(model_dir, port).start()
        outputs = list(loop.stream(prompt, greedy))
        assert [t for out in outputs for t in out.new_token_ids] == expected
        # The prefix cache was dropped with the old worker's KV: a hit would have read the new one's zeros.
        assert outputs[-1].usage.cached_tokens == 0
    finally:
        loop.shutdown()
        remote.close()
        process.stop()


def test_no_worker_is_a_clear_error_naming_the_address():
    address = f"127.0.0.1:{free_port()}"
    with pytest.raises(WorkerUnavailable, match=f"worker at {address} is unavailable: not SERVING after"):
        RemoteWorker(address, connect_timeout=0.5)


# -- conversions round-trip exactly ---------------------------------------------------------------------------

u32 = st.integers(0, 2**32 - 1)
f32 = st.floats(width=32, allow_nan=False)  # what a float32 field can hold
ids = st.text(max_size=6)
token_logprobs = st.builds(TokenLogprobs, u32, f32, st.lists(st.tuples(u32, f32), max_size=3))
sampling_params = st.builds(
    SamplingParams,
    temperature=f32, top_p=f32, top_k=st.integers(-(2**31), 2**31 - 1), min_p=f32,
    seed=st.none() | st.integers(-(2**63), 2**63 - 1),
    repetition_penalty=f32, presence_penalty=f32, frequency_penalty=f32,
    logit_bias=st.dictionaries(u32, f32, max_size=3),
    max_tokens=u32, min_tokens=u32, stop_token_ids=st.lists(u32, max_size=3), ignore_eos=st.booleans(),
    logprobs=st.none() | u32, prompt_logprobs=st.none() | u32,
)
plans = st.builds(
    StepPlan,
    new_requests=st.lists(st.builds(NewRequest, ids, st.lists(u32, max_size=6), u32, sampling_params,
                                    st.lists(u32, max_size=4), u32), max_size=3),
    new_block_ids=st.dictionaries(ids, st.lists(u32, max_size=4), max_size=3),
    num_scheduled_tokens=st.dictionaries(ids, u32, max_size=4),
    finished_request_ids=st.lists(ids, max_size=3),
)


@st.composite
def results(draw):
    sampled = draw(st.dictionaries(ids, u32, max_size=4))
    asked = draw(st.lists(st.sampled_from(sorted(sampled)), unique=True)) if sampled else []
    logprobs = {request_id: draw(token_logprobs) for request_id in asked}  # only for sampled requests
    return StepResult(sampled, logprobs, draw(st.dictionaries(ids, st.lists(token_logprobs, max_size=3), max_size=3)))


@settings(max_examples=100, deadline=None)
@given(plans)
def test_plan_round_trip(plan):
    wire = worker_pb2.StepPlan.FromString(plan_to_proto(plan).SerializeToString())
    back = plan_from_proto(wire)
    assert back == plan
    assert list(back.num_scheduled_tokens) == list(plan.num_scheduled_tokens)  # the batch order survives


@settings(max_examples=100, deadline=None)
@given(results())
def test_result_round_trip(result):
    wire = worker_pb2.StepResult.FromString(result_to_proto(result).SerializeToString())
    assert result_from_proto(wire) == result


def test_unset_optionals_stay_none_and_python_floats_arrive_as_float32():
    params = SamplingParams(temperature=0.7, top_p=0.9, logit_bias={5: 0.1})
    back = params_from_proto(params_to_proto(params))
    assert (back.seed, back.logprobs, back.prompt_logprobs) == (None, None, None)
    assert back.temperature == pytest.approx(0.7, rel=1e-7) and back.logit_bias == {5: pytest.approx(0.1, rel=1e-7)}
    zero = params_from_proto(params_to_proto(SamplingParams(seed=0, logprobs=0, prompt_logprobs=0)))
    assert (zero.seed, zero.logprobs, zero.prompt_logprobs) == (0, 0, 0)  # zero is set, not unset


def test_engine_service_over_a_remote_worker_reports_a_dead_worker_as_unavailable(model_dir):
    """`tessera engine --worker ADDR`: the same tokens as in-process, UNAVAILABLE naming the worker once it dies,
    and the engine itself keeps answering."""
    from tessera.engine.v1 import engine_pb2, engine_pb2_grpc

    expected = local_engine(model_dir).generate([[5, 6, 7, 8]], SamplingParams(temperature=0.0, max_tokens=12,
                                                                                 ignore_eos=True))[0].token_ids
    request = engine_pb2.GenerateRequest(prompt_token_ids=[5, 6, 7, 8], sampling=engine_pb2.SamplingParams(
        temperature=0.0), stopping=engine_pb2.StoppingParams(max_tokens=12, ignore_eos=True))
    worker_server = worker_process(model_dir).start()
    try:
        with ServerProcess("engine", "--model", str(model_dir), "--worker", worker_server.address) as engine, \
                grpc.insecure_channel(engine.address) as channel:
            stub = engine_pb2_grpc.EngineStub(channel)
            assert [t for r in stub.Generate(request, timeout=60) for t in r.token_ids] == expected
            worker_server.process.kill()
            worker_server.process.wait()
            with pytest.raises(grpc.RpcError) as error:
                list(stub.Generate(request, timeout=60))
            assert error.value.code() == grpc.StatusCode.UNAVAILABLE
            assert worker_server.address in error.value.details()
            load = stub.GetLoad(engine_pb2.GetLoadRequest(), timeout=10)
            assert load.num_running == 0 and load.kv_blocks_in_use == 0
    finally:
        worker_server.stop()


def test_a_hung_worker_times_out_instead_of_hanging_the_engine(model_dir):
    """SIGSTOP freezes the worker without closing its socket: only the step deadline can notice."""
    import signal

    prompt, params = [5, 6, 7, 8], SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    expected = local_engine(model_dir).generate([prompt], params)[0].token_ids
    with worker_process(model_dir) as process:
        remote = RemoteWorker(process.address, step_timeout=2.0)
        try:
            process.process.send_signal(signal.SIGSTOP)
            started = time.monotonic()
            with pytest.raises(WorkerUnavailable, match="no answer to a step in 2 s"):
                remote_engine(model_dir, remote).generate([prompt], params)
            assert time.monotonic() - started < 30
            process.process.send_signal(signal.SIGCONT)
            # Back: a new stream (the worker may still be closing the old one for a moment) gives right tokens.
            for attempt in range(20):
                try:
                    assert remote_engine(model_dir, remote).generate([prompt], params)[0].token_ids == expected
                    break
                except WorkerUnavailable:
                    time.sleep(0.25)
            else:
                raise AssertionError("the worker did not serve again after SIGCONT")
        finally:
            process.process.send_signal(signal.SIGCONT)
            remote.close()
