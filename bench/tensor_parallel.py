"""Tensor parallelism on CPU: one worker on every core vs two ranks on one core each (gloo), side by side.

Part 1, the decode step in-process (the ranks as processes here, rank 0 driving an LLMEngine): time per step at
batch 1 and batch 32, and of that the time rank 0 spends in collectives (all-reduces, the logits' gather, the
plan's broadcast; waiting for the other rank included), and the plan broadcast alone.
Part 2, served: `tessera engine` vs `tessera engine --tensor-parallel-size 2` over gRPC, token ids in: one
stream, and 32 concurrent streams.

On a CPU, two ranks share the memory bandwidth one worker already has, so this shows the overhead of the split
(what a multi-socket or multi-GPU machine pays for the extra memory or bandwidth), not a speed-up.

    python bench/tensor_parallel.py [--rounds 2] [--tokens 64] [--streams 32]
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import random
import sys
import time
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from bench_model import build_bench_model, cpu_model  # noqa: E402
from servers import ServerProcess, free_port  # noqa: E402
from tessera.engine.v1 import engine_pb2, engine_pb2_grpc  # noqa: E402

KV = 256 << 20


def decode_steps(engine, tp, batch: int, steps: int = 16) -> tuple[float, float, float]:
    """(seconds per decode step, of it in collectives, of that in the plan's broadcast) at `batch` running
    requests of 128-token context."""
    from tessera.sampling_params import SamplingParams

    rng = random.Random(batch)
    params = SamplingParams(temperature=0.0, max_tokens=steps + 4, ignore_eos=True)
    for _ in range(batch):
        engine.add_request([rng.randrange(3, 32000) for _ in range(128)], params)
    while engine.scheduler.waiting or any(r.num_computed_tokens < r.num_prompt_tokens
                                          for r in engine.scheduler.requests.values()):
        engine.step()
    collective, broadcast, start = tp.collective_seconds, tp.broadcast_seconds, time.perf_counter()
    for _ in range(steps):
        engine.step()
    elapsed = time.perf_counter() - start
    collective, broadcast = tp.collective_seconds - collective, tp.broadcast_seconds - broadcast
    while engine.has_unfinished_requests():
        engine.step()
    return elapsed / steps, collective / steps, broadcast / steps


def rank_main(rank: int, size: int, model_dir: str, port: int, cores: list[int], out) -> None:
    os.sched_setaffinity(0, set(cores))
    import torch

    torch.set_num_threads(len(cores))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from tessera.engine.engine import EngineConfig, LLMEngine
    from tessera.worker.tensor_parallel import init_tensor_parallel
    from tessera.worker.worker import Worker, WorkerConfig

    tp = init_tensor_parallel(size, rank)
    worker = Worker(WorkerConfig(model_dir, dtype="float32", kv_cache_memory=KV), tp=tp)
    if rank > 0:
        worker.follow()
        return
    engine = LLMEngine(EngineConfig(model=model_dir, dtype="float32"), worker=worker)
    results = {batch: decode_steps(engine, tp, batch) for batch in (1, 32)}
    worker.stop_followers()
    out.put(results)


def in_process(model_dir: str, size: int) -> dict:
    cores = sorted(os.sched_getaffinity(0))
    shares = [cores] if size == 1 else [cores[r::size] for r in range(size)]
    context = multiprocessing.get_context("spawn")
    out, port = context.Queue(), free_port()
    ranks = [context.Process(target=rank_main, args=(r, size, model_dir, port, shares[r], out)) for r in range(size)]
    for process in ranks:
        process.start()
    result = out.get(timeout=600)
    for process in ranks:
        process.join(60)
    return result


def served(model_dir: str, size: int, tokens: int, streams: int) -> tuple[float, float]:
    """(one stream's tok/s, `streams` concurrent streams' total tok/s) through `tessera engine`."""
    args = ["--model", model_dir, "--kv-cache-memory", str(KV)]
    if size > 1:
        args += ["--tensor-parallel-size", str(size)]
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 32000) for _ in range(rng.randrange(32, 128))] for _ in range(streams)]

    def request(prompt):
        return engine_pb2.GenerateRequest(prompt_token_ids=prompt, sampling=engine_pb2.SamplingParams(temperature=0),
                                          stopping=engine_pb2.StoppingParams(max_tokens=tokens, ignore_eos=True))

    with ServerProcess("engine", *args) as engine, grpc.insecure_channel(engine.address) as channel:
        stub = engine_pb2_grpc.EngineStub(channel)
        list(stub.Generate(request(prompts[0][:8])))  # warm
        start = time.perf_counter()
        one = sum(len(r.token_ids) for r in stub.Generate(request(prompts[0])))
        single = one / (time.perf_counter() - start)
        start = time.perf_counter()
        calls = [stub.Generate(request(p)) for p in prompts]
        total = sum(len(r.token_ids) for call in calls for r in call)
        return single, total / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--streams", type=int, default=32)
    parser.add_argument("--model-dir", default="bench/out/bench-llama")
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0))
    print(f"machine: {cpu_model()}, {cores} cores; TP=1: one worker on {cores} cores; TP=2: two ranks on "
          f"{max(cores // 2, 1)} core(s) each, gloo", flush=True)
    model_dir = str(build_bench_model(args.model_dir))
    steps = {1: [], 2: []}
    serving = {1: [], 2: []}
    for round_ in range(args.rounds):
        for size in ((1, 2) if round_ % 2 == 0 else (2, 1)):  # alternate: drift hits both alike
            steps[size].append(in_process(model_dir, size))
            serving[size].append(served(model_dir, size, args.tokens, args.streams))
    for batch in (1, 32):
        one = min(r[batch][0] for r in steps[1])
        two = min(r[batch][0] for r in steps[2])
        collective = min(r[batch][1] for r in steps[2])
        broadcast = min(r[batch][2] for r in steps[2])
        print(f"decode step, batch {batch:2d}: TP=1 {one * 1e3:6.2f} ms, TP=2 {two * 1e3:6.2f} ms ({two / one:.2f}x), "
              f"of which collectives {collective * 1e3:5.2f} ms on rank 0 (the plan's broadcast "
              f"{broadcast * 1e3:4.2f} ms)", flush=True)
    for i, name in enumerate(("one stream", f"{args.streams} streams")):
        one, two = max(r[i] for r in serving[1]), max(r[i] for r in serving[2])
        print(f"served, {name}: TP=1 {one:6.1f} tok/s, TP=2 {two:6.1f} tok/s ({two / one:.2f}x)")


if __name__ == "__main__":
    main()
