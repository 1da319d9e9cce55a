"""Served throughput: the offline workload over gRPC through `tessera engine` against the in-process LLMEngine.

    python bench/served_throughput.py                                # 64 requests, prompts 32-512, outputs 16-256
    python bench/served_throughput.py --requests 16 --scale 0.25     # a quick run
    python bench/served_throughput.py --via-tokenizer                # text prompts through `tessera tokenizer`
    python bench/served_throughput.py --requests 16 --rounds 3       # a loaded machine: best of 3 each

One run, side by side, with a real `tessera engine` subprocess on 127.0.0.1 and an LLMEngine in this process
(same model, same config): the in-process engine runs the workload (greedy, EOS ignored) stepped on a second
thread, as the server's EngineLoop steps it (--main-thread: also on the main thread; the faster is the
baseline), then the server gets the same requests as concurrent Engine/Generate streams over grpc.aio. --rounds N
alternates the two N times and keeps the best of each (use it on a loaded machine). Then latency at a fixed
request rate: Poisson arrivals (fixed seed), a bounded number of requests, time to first token and inter-token
latency p50/p99 as the client sees them; then one stream alone, in-process and served (the single-user case).
The last line is the served / in-process throughput ratio (goal >= 0.9).

--via-tokenizer sends text to tessera.tokenizer.v1.TextGeneration (tokenizer -> engine, two hops). The text is
the workload's token ids, mapped into the demo tokenizer's vocabulary and decoded; the in-process engine gets
that text tokenized the same way, so both sides compute identical prompts. The client runs in this process and
shares the machine with the servers. What TLS costs on that path: bench/tls_cost.py (same workload and client).
"""
from __future__ import annotations

import argparse
import asyncio
import os
import random
import resource
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import torch

from bench_model import build_bench_model, cpu_model, make_workload
from tessera.engine.engine import EngineConfig, LLMEngine
from tessera.sampling_params import SamplingParams
from tessera.engine.v1 import engine_pb2, engine_pb2_grpc
from tessera.tokenizer.v1 import tokenizer_pb2, tokenizer_pb2_grpc

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from servers import ServerProcess  # noqa: E402  (real server subprocesses on loopback, as the tests use)

DEMO_TOKENIZER = ROOT / "models" / "tessera-demo"


def scaled(low: int, high: int, scale: float) -> tuple[int, int]:
    return max(1, round(low * scale)), max(1, round(high * scale))


class Client:
    """One grpc.aio channel to Engine/Generate (token ids) or, via_tokenizer, TextGeneration/Generate (text);
    plaintext, or TLS with `credentials` (grpc.ssl_channel_credentials: bench/tls_cost.py)."""

    def __init__(self, address: str, via_tokenizer: bool, timeout: float,
                 credentials: grpc.ChannelCredentials | None = None):
        self.channel = (grpc.aio.insecure_channel(address) if credentials is None
                        else grpc.aio.secure_channel(address, credentials))
        self.via_tokenizer = via_tokenizer
        self.timeout = timeout
        self.engine = engine_pb2_grpc.EngineStub(self.channel)
        self.text = tokenizer_pb2_grpc.TextGenerationStub(self.channel)

    def call(self, prompt, max_tokens: int):
        sampling = engine_pb2.SamplingParams(temperature=0.0)
        stopping = engine_pb2.StoppingParams(max_tokens=max_tokens, ignore_eos=True)
        if self.via_tokenizer:
            return self.text.Generate(tokenizer_pb2.GenerateRequest(text=prompt, sampling=sampling, stopping=stopping),
                                      timeout=self.timeout)
        return self.engine.Generate(engine_pb2.GenerateRequest(prompt_token_ids=prompt, sampling=sampling,
                                                               stopping=stopping), timeout=self.timeout)

    async def generate(self, prompt, max_tokens: int) -> tuple[list[int], list[float]]:
        """The token ids and the arrival time of each response that carried tokens."""
        tokens, arrivals = [], []
        async for response in self.call(prompt, max_tokens):
            if response.token_ids:
                arrivals.append(time.perf_counter())
                tokens.extend(response.token_ids)
        return tokens, arrivals

    async def close(self) -> None:
        await self.channel.close()


class InProcess:
    """The baseline: an LLMEngine in this process, built, warmed up and run on one thread of its own, as the
    server's EngineLoop does (one OpenMP team per process: see tessera.engine.engine_loop)."""

    def __init__(self, model_dir, kv_cache_memory: int, warm_up_prompt: list[int]):
        self.thread = ThreadPoolExecutor(1, thread_name_prefix="in-process-engine")
        self.engine = self.thread.submit(LLMEngine, EngineConfig(model=str(model_dir),
                                                                 kv_cache_memory=kv_cache_memory)).result()
        self.thread.submit(self.engine.generate, [warm_up_prompt],
                           SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)).result()

    def run(self, prompts, output_lens) -> tuple[float, list[list[int]]]:
        return self.thread.submit(self._run, prompts, output_lens).result()

    def _run(self, prompts, output_lens) -> tuple[float, list[list[int]]]:
        params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in output_lens]
        start = time.perf_counter()
        completions = self.engine.generate(prompts, params)
        return time.perf_counter() - start, [c.token_ids for c in completions]


async def run_served(client: Client, prompts, output_lens) -> tuple[float, list[list[int]]]:
    start = time.perf_counter()
    results = await asyncio.gather(*(client.generate(p, n) for p, n in zip(prompts, output_lens)))
    return time.perf_counter() - start, [tokens for tokens, _ in results]


async def run_at_rate(client: Client, prompts, output_lens, rate: float, seed: int):
    """Poisson arrivals at `rate` requests/s; returns TTFTs, inter-token gaps, output tokens and wall time."""
    rng = random.Random(seed)
    offsets, t = [], 0.0
    for _ in prompts:
        offsets.append(t)
        t += rng.expovariate(rate)

    async def one(prompt, max_tokens, offset, start):
        await asyncio.sleep(max(0.0, start + offset - time.perf_counter()))
        sent = time.perf_counter()
        tokens, arrivals = await client.generate(prompt, max_tokens)
        return arrivals[0] - sent, list(np.diff(arrivals)), len(tokens)

    start = time.perf_counter()
    results = await asyncio.gather(*(one(p, n, o, start) for p, n, o in zip(prompts, output_lens, offsets)))
    wall = time.perf_counter() - start
    ttfts = [r[0] for r in results]
    gaps = [gap for r in results for gap in r[1]]
    return ttfts, gaps, sum(r[2] for r in results), wall


def text_prompts(prompts: list[list[int]]) -> tuple[list[str], list[list[int]]]:
    """The workload's ids as demo-tokenizer text, and that text tokenized as the tokenizer server will."""
    from tessera.tokenizer.tokenizer import Tokenizer

    tokenizer = Tokenizer(DEMO_TOKENIZER)
    first = max(tokenizer.all_special_ids) + 1
    texts = [tokenizer.decode([first + t % (tokenizer.vocab_size - first) for t in p], True) for p in prompts]
    return texts, [tokenizer.encode(text, add_special_tokens=True) for text in texts]


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:8.1f} ms"


def cpu_seconds(pid: int | None = None) -> dict[int, float]:
    """CPU time (user + system) of each thread of process `pid`, by thread id (Linux's /proc); of this
    process under the key 0 when pid is None."""
    if pid is None:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return {0: usage.ru_utime + usage.ru_stime}
    ticks, seconds = os.sysconf("SC_CLK_TCK"), {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
        except OSError:  # the thread ended meanwhile
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        seconds[int(tid)] = (int(fields[11]) + int(fields[12])) / ticks
    return seconds


def cpu_split(before: dict, after: dict, main_tid: int) -> tuple[float, float]:
    """(main thread, all other threads) CPU seconds between two cpu_seconds snapshots of one process."""
    spent = {tid: after[tid] - before.get(tid, 0.0) for tid in after}
    main = spent.pop(main_tid, 0.0)
    return main, sum(spent.values())


async def measure(args, address, in_process: InProcess, engine_prompts, served_prompts, output_lens,
                  lat_prompts, lat_lens, server_pid: int):
    """Alternates in-process and served runs for --rounds rounds, then the latency run."""
    times = {"engine thread": [], "main thread": [], "served": []}
    expected = tokens = None
    client = Client(address, args.via_tokenizer, args.timeout)
    try:
        await client.generate(served_prompts[0][:8], 2)  # warm-up: connect, first call
        for round_ in range(args.rounds):
            # On its own thread, as `tessera engine` steps its engine (EngineLoop).
            seconds, expected = await asyncio.to_thread(in_process.run, engine_prompts, output_lens)
            times["engine thread"].append(seconds)
            if args.main_thread:
                times["main thread"].append(in_process._run(engine_prompts, output_lens)[0])
            seconds, tokens = await run_served(client, served_prompts, output_lens)
            times["served"].append(seconds)
            print(f"round {round_ + 1}/{args.rounds}: " + ", ".join(f"{k} {v[-1]:.1f} s" for k, v in times.items() if v),
                  flush=True)
        latency = await run_at_rate(client, lat_prompts, lat_lens, args.rate, args.seed)
        # One stream alone (the single-user case): best of 3 each, in-process then served.
        prompt, n = served_prompts[1][:32], ONE_STREAM_TOKENS
        one = {"in-process": min([(await asyncio.to_thread(in_process.run, [engine_prompts[1][:32]], [n]))[0]
                                  for _ in range(3)])}
        # Where a served token's CPU goes: the client (this process), the server's event loop (its main
        # thread: gRPC's Python side) and the rest of the server (the engine thread, OpenMP's team, gRPC's own).
        server_before, client_before = cpu_seconds(server_pid), cpu_seconds()
        one["served"] = min([await time_one(client, prompt, n) for _ in range(3)])
        loop_s, rest_s = cpu_split(server_before, cpu_seconds(server_pid), server_pid)
        one["cpu per token"] = ((cpu_seconds()[0] - client_before[0]) / (3 * n), loop_s / (3 * n), rest_s / (3 * n))
    finally:
        await client.close()
    return {k: v for k, v in times.items() if v}, expected, tokens, latency, one


ONE_STREAM_TOKENS = 128


async def time_one(client: Client, prompt, max_tokens: int) -> float:
    start = time.perf_counter()
    tokens, _ = await client.generate(prompt, max_tokens)
    assert len(tokens) == max_tokens
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=64, help="requests in the throughput workload")
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies prompt and output lengths (quick runs)")
    parser.add_argument("--rate", type=float, default=2.0, help="requests/s for the latency run (Poisson)")
    parser.add_argument("--latency-requests", type=int, default=32, help="requests in the latency run")
    parser.add_argument("--seed", type=int, default=0, help="seed of the arrival times")
    parser.add_argument("--via-tokenizer", action="store_true", help="text prompts through `tessera tokenizer`")
    parser.add_argument("--model-dir", default="bench/out/bench-llama")
    parser.add_argument("--kv-cache-memory", type=int, default=1 << 30, help="bytes, for both engines")
    parser.add_argument("--main-thread", action="store_true",
                        help="also time the in-process engine on the main thread (the faster is the baseline)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="alternate in-process and served runs this many times; the best of each counts")
    parser.add_argument("--timeout", type=float, default=900.0, help="deadline of each gRPC call, seconds")
    args = parser.parse_args()
    torch.manual_seed(0)

    model_dir = build_bench_model(args.model_dir)
    prompt_range, output_range = scaled(32, 512, args.scale), scaled(16, 256, args.scale)
    workload = make_workload(args.requests, prompt_range, output_range)
    latency_workload = make_workload(args.latency_requests, prompt_range, output_range, seed=1)
    engine_prompts, served_prompts = workload.prompts, workload.prompts
    lat_prompts = latency_workload.prompts
    if args.via_tokenizer:
        served_prompts, engine_prompts = text_prompts(workload.prompts)
        lat_prompts, _ = text_prompts(latency_workload.prompts)
    total = sum(workload.output_lens)
    path = "text via tokenizer -> engine" if args.via_tokenizer else "token ids, Engine/Generate"
    print(f"machine: {cpu_model()}; torch {torch.__version__}")
    print(f"workload: {args.requests} requests, prompts {prompt_range[0]}-{prompt_range[1]} "
          f"({sum(map(len, engine_prompts))} prompt tokens), outputs {output_range[0]}-{output_range[1]} "
          f"({total} output tokens), greedy, EOS ignored, fp32, {torch.get_num_threads()} torch threads; "
          f"served: {path}", flush=True)

    engine_args = ["--model", str(model_dir), "--kv-cache-memory", str(args.kv_cache_memory)]
    with ServerProcess("engine", *engine_args) as engine:
        servers = [engine]
        try:
            if args.via_tokenizer:
                servers.append(ServerProcess("tokenizer", "--model", str(DEMO_TOKENIZER), "--engine",
                                             engine.address).start())
            in_process = InProcess(model_dir, args.kv_cache_memory, engine_prompts[0][:8])
            times, expected, tokens, latency, one = asyncio.run(measure(
                args, servers[-1].address, in_process, engine_prompts, served_prompts, workload.output_lens,
                lat_prompts, latency_workload.output_lens, servers[-1].process.pid))
        finally:
            for server in servers[1:]:
                server.stop()
    assert sum(map(len, expected)) == total and sum(map(len, tokens)) == total
    same = sum(a == b for a, b in zip(tokens, expected))
    served_s = min(times.pop("served"))
    baseline = min(times, key=lambda name: min(times[name]))
    in_process_s = min(times[baseline])
    ttfts, gaps, lat_tokens, lat_wall = latency

    print()
    rounds = f"best of {args.rounds} rounds" if args.rounds > 1 else "1 round"
    print(f"{f'throughput ({rounds})':<38}{'tok/s':>10}{'seconds':>10}")
    for name, seconds in times.items():
        note = "   (the baseline: faster)" if name == baseline and len(times) > 1 else ""
        print(f"{f'in-process LLMEngine, {name}':<38}{total / min(seconds):10.1f}{min(seconds):10.1f}{note}")
    print(f"{f'served over gRPC ({args.requests} streams)':<38}{total / served_s:10.1f}{served_s:10.1f}"
          f"   same tokens as in-process: {same}/{args.requests} requests")
    print()
    print(f"latency over gRPC: {args.latency_requests} requests, Poisson {args.rate:g} req/s (seed {args.seed}), "
          f"{lat_tokens / lat_wall:.1f} tok/s over {lat_wall:.1f} s")
    print(f"{'':<38}{'p50':>11}{'p99':>11}")
    for name, values in (("time to first token", ttfts), ("inter-token latency", gaps)):
        p50, p99 = np.percentile(values, [50, 99])
        print(f"{name:<38}{ms(p50):>11}{ms(p99):>11}")
    print(f"one stream ({ONE_STREAM_TOKENS} tokens, best of 3): in-process {ONE_STREAM_TOKENS / one['in-process']:.1f} "
          f"tok/s, served {ONE_STREAM_TOKENS / one['served']:.1f} tok/s "
          f"({one['in-process'] / one['served']:.2f}x)")
    client_cpu, loop_cpu, rest_cpu = one["cpu per token"]
    print(f"one stream served, CPU per token: client {client_cpu * 1e3:.2f} ms, server event loop {loop_cpu * 1e3:.2f} ms, "
          f"rest of the server {rest_cpu * 1e3:.2f} ms (engine thread, OpenMP team, gRPC's threads), in "
          f"{one['served'] / ONE_STREAM_TOKENS * 1e3:.2f} ms of wall time a token")
    print(f"served / in-process throughput: {in_process_s / served_s:.2f}x (goal >= 0.9)")


if __name__ == "__main__":
    main()
