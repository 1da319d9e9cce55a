"""Tensor parallelism on CPU with gloo: an engine driving two worker ranks gives the greedy tokens of one worker
and of transformers, each rank holds half the weights, and a rank that dies or hangs fails the requests with
UNAVAILABLE naming it, after which the group restarts and serves the same tokens again.

Real processes throughout: `tessera engine --tensor-parallel-size 2` starts its two `tessera worker` ranks
(engine/worker_group.py), which meet through torch.distributed's env:// rendezvous.
"""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from hf_reference import hf_model
from servers import ServerProcess, free_port, run_ranks, wait_serving
from tessera.engine.engine import EngineConfig, LLMEngine
from tessera.engine.v1 import engine_pb2, engine_pb2_grpc
from tessera.sampling_params import SamplingParams
from tessera.worker.tensor_parallel import TensorParallel
from tiny_checkpoints import preset_checkpoint

PROMPTS = [[1, 5, 9, 13, 17, 21, 25, 29, 33, 37, 41, 45], [7, 8, 9], list(range(60, 80)), [200, 3, 4, 99, 17]]
NEW_TOKENS = 24
# Per rank: 48-96 tokens of KV at TP=2 for the tiny models, less than the four requests need at once (preemption);
# prefill in chunks of 8 tokens.
ENGINE_ARGS = ("--kv-cache-memory", "24KiB", "--block-size", "4", "--max-num-batched-tokens", "8")


def greedy_request(prompt: list[int], max_tokens: int = NEW_TOKENS, request_id: str = "") -> engine_pb2.GenerateRequest:
    return engine_pb2.GenerateRequest(prompt_token_ids=prompt, request_id=request_id,
                                      sampling=engine_pb2.SamplingParams(temperature=0.0),
                                      stopping=engine_pb2.StoppingParams(max_tokens=max_tokens, ignore_eos=True))


def tp_engine(model_dir: Path, *extra: str) -> ServerProcess:
    return ServerProcess("engine", "--model", str(model_dir), "--tensor-parallel-size", "2", *ENGINE_ARGS, *extra)


def generate_all(address: str, prompts, max_tokens: int = NEW_TOKENS) -> list[list[int]]:
    """The prompts as concurrent streams (one batch), each one's tokens."""
    with grpc.insecure_channel(address) as channel:
        stub = engine_pb2_grpc.EngineStub(channel)
        calls = [stub.Generate(greedy_request(p, max_tokens), timeout=120) for p in prompts]
        return [[t for r in call for t in r.token_ids] for call in calls]


def one_worker_tokens(model_dir: Path, prompts) -> list[list[int]]:
    engine = LLMEngine(EngineConfig(str(model_dir), dtype="float32", num_kv_blocks=256, block_size=4))
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    return [c.token_ids for c in engine.generate(prompts, params)]


def transformers_tokens(model_dir: Path, prompts) -> list[list[int]]:
    model = hf_model(model_dir)
    out = []
    with torch.inference_mode():
        for prompt in prompts:
            ids = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                 do_sample=False, max_new_tokens=NEW_TOKENS)
            out.append(ids[0, len(prompt):].tolist())
    return out


# -- which slice a rank holds -----------------------------------------------------------------------------------

def test_heads_split_and_kv_heads_replicate_when_ranks_outnumber_them():
    assert [TensorParallel(r, 2).heads(8) for r in range(2)] == [(0, 4), (4, 8)]
    assert [TensorParallel(r, 4).kv_heads(8, 2) for r in range(4)] == [(0, 1), (0, 1), (1, 2), (1, 2)]
    assert [TensorParallel(r, 2).kv_heads(8, 4) for r in range(2)] == [(0, 2), (2, 4)]
    assert [TensorParallel(r, 2).kv_heads(4, 1) for r in range(2)] == [(0, 1), (0, 1)]  # MQA
    # An uneven vocabulary: equal slices, the last one padded.
    assert [TensorParallel(r, 2).vocab(255) for r in range(2)] == [(0, 128), (128, 255)]
    assert TensorParallel(1, 2).vocab_rows(255) == 128


def test_shapes_that_do_not_divide_are_refused_naming_them():
    with pytest.raises(ValueError, match="does not divide 6 attention heads, 3 KV heads"):
        TensorParallel(0, 4).check(6, 3, 128)
    TensorParallel(0, 4).check(8, 2, 128)  # 2 KV heads, 4 ranks: replicated


# -- same tokens over the wire --------------------------------------------------------------------------------

@pytest.mark.parametrize("preset, extra", [
    ("llama", {}),  # grouped-query attention
    ("llama_mqa", {}),  # one KV head, replicated on both ranks
    ("llama_tied", {"vocab_size": 255}),  # tied embeddings, a vocabulary that does not split evenly
    ("llama_bias", {}),  # qkv, o_proj and MLP biases (the row-parallel ones added once)
    ("qwen2", {}),  # qkv bias only
    ("qwen3", {}),  # head_dim apart from hidden/heads, q/k norms
])
def test_two_ranks_give_the_tokens_of_one_worker_and_of_transformers(tmp_path_factory, preset, extra):
    model_dir = preset_checkpoint(tmp_path_factory, preset, **extra)
    with tp_engine(model_dir) as engine:
        tokens = generate_all(engine.address, PROMPTS)
        with grpc.insecure_channel(engine.address) as channel:
            stub = engine_pb2_grpc.EngineStub(channel)
            info = stub.GetModelInfo(engine_pb2.GetModelInfoRequest())
            load = stub.GetLoad(engine_pb2.GetLoadRequest())
    assert info.tensor_parallel_size == 2
    assert load.num_preemptions > 0 and load.kv_blocks_in_use == 0  # the KV cache really ran out
    assert tokens == one_worker_tokens(model_dir, PROMPTS)
    assert tokens == transformers_tokens(model_dir, PROMPTS)


# -- each rank loads its shard --------------------------------------------------------------------------------

def rank_weight_bytes(rank: int, model_dir: str, port: int, out) -> None:
    from tessera.worker.attention.torch_backend import TorchAttentionBackend
    from tessera.worker.checkpoint import load_model
    from tessera.worker.tensor_parallel import init_tensor_parallel

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    model, _ = load_model(model_dir, TorchAttentionBackend(), "float32", tp=init_tensor_parallel(2, rank))
    out.put((rank, sum(p.numel() * p.element_size() for p in model.parameters())))
    torch.distributed.destroy_process_group()


def test_each_rank_holds_about_half_of_the_weights(tmp_path_factory):
    model_dir = preset_checkpoint(tmp_path_factory, "llama_bias")
    from tessera.worker.attention.torch_backend import TorchAttentionBackend
    from tessera.worker.checkpoint import load_model

    model, _ = load_model(model_dir, TorchAttentionBackend(), "float32")
    whole = sum(p.numel() * p.element_size() for p in model.parameters())
    shares = run_ranks(rank_weight_bytes, str(model_dir))
    # Half of everything but the norms and rank 0's row-parallel biases, which are whole (a few hundred bytes).
    for rank, nbytes in shares.items():
        assert 0.5 * whole <= nbytes <= 0.52 * whole, (rank, nbytes, whole)


# -- a rank that dies or hangs --------------------------------------------------------------------------------

def rank_pid(engine: ServerProcess, rank: int) -> int:
    """The pid of the engine's worker rank `rank` (its child with RANK=<rank> in its environment)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            environ = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == engine.process.pid and f"RANK={rank}".encode() in environ:
            return int(entry.name)
    raise AssertionError(f"no rank {rank} under the engine")


def engine_health(address: str) -> int:
    with grpc.insecure_channel(address) as channel:
        try:
            return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2).status
        except grpc.RpcError:
            return -1


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"not {what} after {timeout} s"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def faulty(tmp_path_factory):
    model_dir = preset_checkpoint(tmp_path_factory, "llama")
    with tp_engine(model_dir, "--kv-cache-memory", "1MiB", "--collective-timeout", "3",
                   "--worker-step-timeout", "20") as engine:
        yield engine, generate_all(engine.address, PROMPTS[:2])


@pytest.mark.parametrize("fault, sig, within", [("killed", signal.SIGKILL, 10.0), ("hung", signal.SIGSTOP, 15.0)])
def test_a_rank_that_dies_or_hangs_fails_its_streams_and_the_group_comes_back(faulty, fault, sig, within):
    engine, expected = faulty
    with grpc.insecure_channel(engine.address) as channel:
        stub = engine_pb2_grpc.EngineStub(channel)
        streams = [stub.Generate(greedy_request(p, max_tokens=200, request_id=f"{fault}-{i}"))
                   for i, p in enumerate(PROMPTS[:2])]
        for stream in streams:
            next(stream)  # running
        os.kill(rank_pid(engine, 1), sig)
        started = time.monotonic()
        for stream in streams:
            with pytest.raises(grpc.RpcError) as error:
                list(stream)
            assert error.value.code() == grpc.StatusCode.UNAVAILABLE, error.value.details()
        assert time.monotonic() - started < within
        if fault == "killed":
            assert "rank 1 exited with signal SIGKILL" in error.value.details()
        wait_for(lambda: stub.GetLoad(engine_pb2.GetLoadRequest()).kv_blocks_in_use == 0, 5, "free of KV blocks")
        # NOT_SERVING while the group restarts, then SERVING again: the engine itself never restarted.
        wait_for(lambda: engine_health(engine.address) == health_pb2.HealthCheckResponse.NOT_SERVING, 10,
                 "NOT_SERVING")
        wait_for(lambda: engine_health(engine.address) == health_pb2.HealthCheckResponse.SERVING, 60, "SERVING")
        assert engine.process.poll() is None
    assert generate_all(engine.address, PROMPTS[:2]) == expected


# -- a group started by torchrun ------------------------------------------------------------------------------

def test_a_group_started_by_torchrun_serves_an_engine_through_rank_0(tmp_path_factory):
    """The multi-host path, on one host: torchrun sets RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT; rank 0
    serves gRPC and the engine drives it with --worker."""
    import shutil
    import subprocess
    import sys

    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    model_dir = preset_checkpoint(tmp_path_factory, "llama")
    port = free_port()
    group = subprocess.Popen([torchrun, "--nproc-per-node", "2", "--master-port", str(free_port()), "-m", "tessera.cli",
                              "--log-level", "WARNING", "worker", "--model", str(model_dir), "--dtype", "float32",
                              "--tensor-parallel-size", "2", "--kv-cache-memory", "1MiB", "--host", "127.0.0.1",
                              "--port", str(port)])
    try:
        wait_serving(f"127.0.0.1:{port}", timeout=120, process=group)
        with ServerProcess("engine", "--model", str(model_dir), "--worker", f"127.0.0.1:{port}",
                           "--tensor-parallel-size", "2") as engine:
            with grpc.insecure_channel(engine.address) as channel:
                info = engine_pb2_grpc.EngineStub(channel).GetModelInfo(engine_pb2.GetModelInfoRequest())
            assert info.tensor_parallel_size == 2
            assert generate_all(engine.address, PROMPTS[:2]) == one_worker_tokens(model_dir, PROMPTS[:2])
    finally:
        group.terminate()
        group.wait(60)
