"""Structured outputs: served throughput with half of the requests constrained to a JSON Schema vs none, one run.

    python bench/structured_output.py                    # 64 requests, prompts 32-512, outputs 16-256
    python bench/structured_output.py --requests 16 --scale 0.25 --rounds 1    # a quick run

The offline workload (bench_model.py: the random-weight benchmark model, now with a 32000-token tokenizer trained
on the standard library) as concurrent Engine/Generate streams to one `tessera engine` process on loopback:
all requests unconstrained, then the same requests with every other one constrained to a JSON Schema of records
(greedy, EOS ignored, each request runs to its max_tokens: the schema asks for at least 100 records, more than
any output holds, so both runs produce the same number of tokens). The runs alternate for --rounds rounds, in
turns first, and the best of each counts. Then,
in this process: the grammar compile time of the schema (cold: a fresh compiler, including the vocabulary; cold
again on a warm compiler; cached), and the per-step mask time of the same half-constrained workload on an
LLMEngine (the scheduler's fill of every constrained row's bitmask, and the worker's apply, timed separately).
The last line is the constrained / unconstrained throughput ratio (goal >= 0.9: at most 10% lost).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

import grpc
import torch

from bench_model import build_bench_model, build_bench_tokenizer, cpu_model, make_workload
from tessera.engine.engine import EngineConfig, LLMEngine
from tessera.engine.structured_output import GrammarCompiler, StructuredOutput
from tessera.engine.v1 import engine_pb2, engine_pb2_grpc
from tessera.sampling_params import SamplingParams

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from servers import ServerProcess  # noqa: E402

SCHEMA = json.dumps({"type": "array", "minItems": 100, "maxItems": 500, "items": {
    "type": "object", "required": ["id", "name", "active"], "properties": {
        "id": {"type": "integer", "minimum": 0, "maximum": 100000},
        "name": {"type": "string", "maxLength": 24},
        "email": {"type": "string", "pattern": "^[a-z]{1,12}@[a-z]{1,8}\\.com$"},
        "tags": {"type": "array", "maxItems": 4, "items": {"enum": ["red", "green", "blue"]}},
        "score": {"type": "number", "minimum": 0, "maximum": 1},
        "active": {"type": "boolean"}}}})


async def run_served(address, prompts, output_lens, constrained: list[bool]) -> tuple[float, int]:
    """All requests at once; (seconds, output tokens)."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = engine_pb2_grpc.EngineStub(channel)

        async def one(prompt, max_tokens, constrain):
            request = engine_pb2.GenerateRequest(
                prompt_token_ids=prompt, sampling=engine_pb2.SamplingParams(temperature=0.0),
                stopping=engine_pb2.StoppingParams(max_tokens=max_tokens, ignore_eos=True),
                structured_output=engine_pb2.StructuredOutput(json_schema=SCHEMA) if constrain else None)
            return sum([len(r.token_ids) async for r in stub.Generate(request, timeout=900)])

        await one(prompts[0][:8], 2, True)  # connect, and compile the schema once: the cached case is measured
        start = time.perf_counter()
        counts = await asyncio.gather(*(one(p, n, c) for p, n, c in zip(prompts, output_lens, constrained)))
        return time.perf_counter() - start, sum(counts)


def compile_times(model_dir: Path, vocab_size: int) -> tuple[float, float, float]:
    spec = StructuredOutput(json_schema=SCHEMA)
    start = time.perf_counter()
    compiler = GrammarCompiler(model_dir, vocab_size, [2])
    compiler.compile(spec)
    cold = time.perf_counter() - start
    start = time.perf_counter()
    compiler.compile(StructuredOutput(json_schema=SCHEMA.replace("500", "501")))  # new schema, warm compiler
    warm = time.perf_counter() - start
    start = time.perf_counter()
    compiler.compile(spec)
    cached = time.perf_counter() - start
    return cold, warm, cached


def mask_times(model_dir, kv_cache_memory, prompts, output_lens, constrained) -> tuple[int, float, float, float]:
    """(steps with constrained rows, seconds filling their bitmasks (scheduler), seconds applying them (sampler))."""
    from tessera.worker import sampler as sampler_module

    engine = LLMEngine(EngineConfig(model=str(model_dir), kv_cache_memory=kv_cache_memory))
    fill, fill_time = engine.scheduler._fill_token_masks, [0.0, 0]

    def timed_fill(plan):
        start = time.perf_counter()
        fill(plan)
        if plan.token_masks:
            fill_time[0] += time.perf_counter() - start
            fill_time[1] += 1

    apply, apply_time = sampler_module.apply_token_masks, [0.0]

    def timed_apply(logits, bitmask):
        start = time.perf_counter()
        masked = apply(logits, bitmask)
        apply_time[0] += time.perf_counter() - start
        return masked

    engine.scheduler._fill_token_masks = timed_fill
    sampler_module.apply_token_masks = timed_apply
    try:
        params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in output_lens]
        specs = [StructuredOutput(json_schema=SCHEMA) if c else None for c in constrained]
        engine.generate(prompts, params, specs)
    finally:
        sampler_module.apply_token_masks = apply
    return fill_time[1], fill_time[0], apply_time[0]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies prompt and output lengths (quick runs)")
    parser.add_argument("--rounds", type=int, default=3, help="alternate the two runs; the best of each counts")
    parser.add_argument("--model-dir", default="bench/out/bench-llama")
    parser.add_argument("--kv-cache-memory", type=int, default=1 << 30)
    args = parser.parse_args()

    model_dir = build_bench_model(args.model_dir)
    build_bench_tokenizer(model_dir)
    scale = lambda low, high: (max(1, round(low * args.scale)), max(1, round(high * args.scale)))  # noqa: E731
    workload = make_workload(args.requests, scale(32, 512), scale(16, 256))
    half = [i % 2 == 0 for i in range(args.requests)]
    none = [False] * args.requests
    total = sum(workload.output_lens)
    print(f"machine: {cpu_model()}, {torch.get_num_threads()} torch threads; torch {torch.__version__}")
    print(f"workload: {args.requests} requests, {total} output tokens, greedy, EOS ignored, fp32; "
          f"constrained run: every other request to a JSON Schema of records", flush=True)

    times = {"unconstrained": [], "half constrained": []}
    with ServerProcess("engine", "--model", str(model_dir), "--kv-cache-memory", str(args.kv_cache_memory)) as engine:
        for round_ in range(args.rounds):
            runs = [("unconstrained", none), ("half constrained", half)]
            for name, constrained in runs if round_ % 2 == 0 else runs[::-1]:  # warm-up costs hit both sides
                seconds, tokens = asyncio.run(run_served(engine.address, workload.prompts, workload.output_lens,
                                                         constrained))
                assert tokens == total, (name, tokens, total)
                times[name].append(seconds)
            print(f"round {round_ + 1}/{args.rounds}: " + ", ".join(f"{k} {v[-1]:.1f} s" for k, v in times.items()),
                  flush=True)

    vocab_size = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    cold, warm, cached = compile_times(model_dir, vocab_size)
    steps, fill_s, apply_s = mask_times(model_dir, args.kv_cache_memory, workload.prompts, workload.output_lens, half)

    print()
    print(f"{'served over gRPC, ' + str(args.requests) + ' streams':<40}{'tok/s':>10}{'seconds':>10}")
    for name, seconds in times.items():
        print(f"{name:<40}{total / min(seconds):10.1f}{min(seconds):10.1f}")
    print()
    print(f"compile the schema ({vocab_size}-token vocabulary): cold {cold * 1e3:.0f} ms (a fresh compiler, "
          f"vocabulary included), new schema {warm * 1e3:.1f} ms, cached {cached * 1e6:.0f} us")
    print(f"mask per step (in-process, {steps} steps with constrained rows, up to {sum(half)} rows): "
          f"fill {fill_s / steps * 1e3:.2f} ms, apply {apply_s / steps * 1e3:.2f} ms")
    ratio = min(times["unconstrained"]) / min(times["half constrained"])
    print(f"half constrained / unconstrained throughput: {ratio:.2f}x (goal >= 0.9)")


if __name__ == "__main__":
    main()
