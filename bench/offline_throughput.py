"""Offline throughput: tessera's engine against transformers' generate on the same requests, in one run.

    python bench/offline_throughput.py [--requests 64] [--hf-batch-sizes 8,16,32]

Prints tokens/s for both and their ratio (last line), the decode step against the bare matmuls of the same
shapes (our share of the machine's roofline), and the time-to-first-token gain of a prefix-cache hit.
"""
from __future__ import annotations

import argparse
import random
import time

import torch
import torch.nn.functional as F

from bench_model import BENCH_SHAPE, build_bench_model, make_workload, time_layers
from tessera.engine.engine import EngineConfig, LLMEngine
from tessera.worker.models.packed_linear import PackedLinear, onednn_available
from tessera.sampling_params import SamplingParams


def run_tessera(model_dir, workload, kv_cache_memory, cpu_matmul) -> tuple[float, int, LLMEngine]:
    engine = LLMEngine(EngineConfig(model=str(model_dir), kv_cache_memory=kv_cache_memory, cpu_matmul=cpu_matmul))
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in workload.output_lens]
    engine.generate([workload.prompts[0][:8]], SamplingParams(temperature=0.0, max_tokens=2))  # warm-up
    start = time.perf_counter()
    completions = engine.generate(workload.prompts, params)
    elapsed = time.perf_counter() - start
    tokens = sum(len(c.token_ids) for c in completions)
    assert tokens == sum(workload.output_lens)
    return elapsed, tokens, engine


def run_transformers(model_dir, workload, batch_size) -> float:
    """Static batches, left padding, each batch running to its longest output; only requested tokens count."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None  # ignore EOS, as tessera does here
    order = sorted(range(len(workload.prompts)), key=lambda i: len(workload.prompts[i]))  # less padding
    start = time.perf_counter()
    for first in range(0, len(order), batch_size):
        batch = order[first : first + batch_size]
        width = max(len(workload.prompts[i]) for i in batch)
        input_ids = torch.zeros(len(batch), width, dtype=torch.long)
        attention_mask = torch.zeros(len(batch), width, dtype=torch.long)
        for row, i in enumerate(batch):
            prompt = workload.prompts[i]
            input_ids[row, width - len(prompt) :] = torch.tensor(prompt)
            attention_mask[row, width - len(prompt) :] = 1
        new_tokens = max(workload.output_lens[i] for i in batch)
        with torch.inference_mode():
            model.generate(
                input_ids=input_ids, attention_mask=attention_mask, do_sample=False,
                max_new_tokens=new_tokens, pad_token_id=0,
            )
    return time.perf_counter() - start


def decode_roofline(engine: LLMEngine, batch: int = 64, context: int = 256, steps: int = 8) -> tuple[float, float]:
    """Mean decode-step time with `batch` running requests against the same matmuls alone."""
    rng = random.Random(1)
    params = SamplingParams(temperature=0.0, max_tokens=steps + 4, ignore_eos=True)
    for _ in range(batch):
        engine.add_request([rng.randrange(3, 32000) for _ in range(context)], params)
    while any(r.num_computed_tokens < r.num_prompt_tokens for r in engine.scheduler.requests.values()) or \
            engine.scheduler.waiting:
        engine.step()
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
    step_time = (time.perf_counter() - start) / steps
    while engine.has_unfinished_requests():
        engine.step()

    return step_time, bare_matmuls(batch, steps)


def bare_matmuls(batch: int, steps: int) -> dict[str, float]:
    """One decode step's linear layers alone ([batch, hidden] activations), timed with PyTorch's own matmul (aten)
    and with the oneDNN packed weights the engine uses on CPU."""
    h, inter, vocab = BENCH_SHAPE["hidden_size"], BENCH_SHAPE["intermediate_size"], BENCH_SHAPE["vocab_size"]
    kv = h // BENCH_SHAPE["num_attention_heads"] * BENCH_SHAPE["num_key_value_heads"]
    shapes = [(h + 2 * kv, h), (h, h), (2 * inter, h), (h, inter)] * BENCH_SHAPE["num_hidden_layers"] + [(vocab, h)]
    weights = [torch.randn(shape) / shape[1] ** 0.5 for shape in shapes]
    inputs = [torch.randn(batch, w.shape[1]) for w in weights]
    times = {}
    for kind in ("aten", "onednn"):
        if kind == "onednn" and not onednn_available():
            continue
        layers = [PackedLinear(w, None) if kind == "onednn" else (lambda x, w=w: F.linear(x, w)) for w in weights]
        times[kind] = time_layers(layers, inputs, steps)
    return times


def prefix_hit_ttft(model_dir, prefix_len=512, suffix_len=16, trials=3) -> tuple[float, float]:
    """Time to first token of a request whose 512-token prefix is cached, against the same request cold."""
    rng = random.Random(2)
    engine = LLMEngine(EngineConfig(model=str(model_dir), kv_cache_memory=1 << 29))
    params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)

    def ttft(prompt):
        start = time.perf_counter()
        engine.generate([prompt], params)
        return time.perf_counter() - start

    cold, warm = [], []
    for _ in range(trials):
        prefix = [rng.randrange(3, 32000) for _ in range(prefix_len)]
        cold.append(ttft(prefix + [rng.randrange(3, 32000) for _ in range(suffix_len)]))
        warm.append(ttft(prefix + [rng.randrange(3, 32000) for _ in range(suffix_len)]))
    return sorted(cold)[len(cold) // 2], sorted(warm)[len(warm) // 2]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--hf-batch-sizes", default="8,16,32")
    parser.add_argument("--model-dir", default="bench/out/bench-llama")
    parser.add_argument("--kv-cache-memory", type=int, default=2 << 30)
    parser.add_argument("--cpu-matmul", default="auto", choices=["auto", "onednn", "aten"])
    args = parser.parse_args()
    torch.manual_seed(0)
    model_dir = build_bench_model(args.model_dir)
    workload = make_workload(args.requests)
    print(f"workload: {args.requests} requests, prompts 32-512, outputs 16-256 tokens "
          f"({sum(workload.output_lens)} output tokens), fp32, {torch.get_num_threads()} threads")

    elapsed, tokens, engine = run_tessera(model_dir, workload, args.kv_cache_memory, args.cpu_matmul)
    ours = tokens / elapsed
    print(f"tessera:      {ours:8.1f} tok/s  ({elapsed:.1f} s, {engine.scheduler.num_preemptions} preemptions, "
          f"{engine.worker.cpu_matmul} matmuls)")

    best = None
    for batch_size in map(int, args.hf_batch_sizes.split(",")):
        hf_elapsed = run_transformers(model_dir, workload, batch_size)
        rate = tokens / hf_elapsed
        print(f"transformers: {rate:8.1f} tok/s  ({hf_elapsed:.1f} s, static batch {batch_size})")
        best = max(best or 0.0, rate)

    step_time, matmuls = decode_roofline(engine)
    bare = ", ".join(f"{kind} {t * 1e3:.1f} ms" for kind, t in matmuls.items())
    print(f"decode step (batch 64, context 256): {step_time * 1e3:.1f} ms ({engine.worker.cpu_matmul} matmuls); "
          f"bare matmuls: {bare} -> the fastest bare matmuls are {min(matmuls.values()) / step_time:.0%} of the step")
    cold, warm = prefix_hit_ttft(model_dir)
    print(f"TTFT with a 512-token prefix: cold {cold * 1e3:.0f} ms, cached {warm * 1e3:.0f} ms -> {cold / warm:.1f}x faster")
    print(f"throughput ratio tessera / transformers (best static batch): {ours / best:.2f}x")


if __name__ == "__main__":
    main()
