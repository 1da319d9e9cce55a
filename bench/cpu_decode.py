"""CPU decode in float32, bfloat16 and int8, each with its KV cache in the activations' dtype and in int8
(--kv-cache-dtype int8), side by side in one run, on the benchmark model.

For each: one stream's decode tokens/s in-process, the decode step at batch 64 against the same linear layers
alone (weights in the engine's own form: oneDNN-packed fp32 / bf16, or int8), and the weight bytes a decode step
streams. Rounds alternate between the variants so that drift on a shared machine hits all of them alike.

    python bench/cpu_decode.py [--rounds 2] [--single-tokens 96] [--batch 64] [--kv auto,int8]
"""
from __future__ import annotations

import argparse
import random
import time

import torch
import torch.nn.functional as F

from bench_model import BENCH_SHAPE, build_bench_model, cpu_model, time_layers
from tessera.engine.engine import EngineConfig, LLMEngine
from tessera.sampling_params import SamplingParams
from tessera.worker.models.int8_linear import Int8Linear
from tessera.worker.models.packed_linear import PackedLinear, batch_matmul

WEIGHTS = {"float32": dict(dtype="float32"), "bfloat16": dict(dtype="bfloat16"),
           "int8": dict(dtype="float32", quantization="int8")}


def single_stream(engine: LLMEngine, tokens: int) -> float:
    prompt = [random.Random(0).randrange(3, 32000) for _ in range(32)]
    params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
    engine.generate([prompt], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
    start = time.perf_counter()
    engine.generate([prompt], params)
    return tokens / (time.perf_counter() - start)


def batch_step(engine: LLMEngine, batch: int, context: int = 256, steps: int = 8) -> float:
    rng = random.Random(1)
    params = SamplingParams(temperature=0.0, max_tokens=steps + 4, ignore_eos=True)
    for _ in range(batch):
        engine.add_request([rng.randrange(3, 32000) for _ in range(context)], params)
    while engine.scheduler.waiting or any(r.num_computed_tokens < r.num_prompt_tokens
                                          for r in engine.scheduler.requests.values()):
        engine.step()
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
    elapsed = (time.perf_counter() - start) / steps
    while engine.has_unfinished_requests():
        engine.step()
    return elapsed


def linear_shapes() -> list[tuple[int, int]]:
    h, inter, vocab = BENCH_SHAPE["hidden_size"], BENCH_SHAPE["intermediate_size"], BENCH_SHAPE["vocab_size"]
    kv = h // BENCH_SHAPE["num_attention_heads"] * BENCH_SHAPE["num_key_value_heads"]
    return [(h + 2 * kv, h), (h, h), (2 * inter, h), (h, inter)] * BENCH_SHAPE["num_hidden_layers"] + [(vocab, h)]


def bare_linears(variant: str, batch: int, steps: int = 8) -> tuple[float, int]:
    """(seconds, weight bytes) of one decode step's linear layers alone, in the variant's form."""
    torch.manual_seed(0)
    weights = [torch.randn(shape) / shape[1] ** 0.5 for shape in linear_shapes()]
    if variant == "int8":
        layers, dtype = [Int8Linear(w, None) for w in weights], torch.float32
        nbytes = sum(w.numel() for w in weights)
    else:
        dtype = getattr(torch, variant)
        # What the worker runs batches on: oneDNN's packed weights, the native bf16 kernel where oneDNN cannot run
        # bf16 (no AVX-512), else PyTorch's matmul
        kind = batch_matmul(dtype)
        layers = [PackedLinear(w.to(dtype), None, batches=kind) if kind != "aten"
                  else (lambda x, w=w.to(dtype): F.linear(x, w)) for w in weights]
        nbytes = sum(w.numel() * dtype.itemsize for w in weights)
    inputs = [torch.randn(batch, w.shape[1], dtype=dtype) for w in weights]
    return time_layers(layers, inputs, steps), nbytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--single-tokens", type=int, default=96)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--model-dir", default="bench/out/bench-llama")
    parser.add_argument("--kv", default="auto,int8", help="KV cache dtypes to run each weight precision with")
    args = parser.parse_args()
    print(f"machine: {cpu_model()}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    model_dir = build_bench_model(args.model_dir)
    variants = {(weights, kv): dict(options, kv_cache_dtype=kv)
                for kv in args.kv.split(",") for weights, options in WEIGHTS.items()}
    engines = {variant: LLMEngine(EngineConfig(model=str(model_dir), kv_cache_memory=1 << 30, **options))
               for variant, options in variants.items()}
    results = {variant: {"single": [], "step": [], "bare": []} for variant in variants}
    nbytes = {}
    for _ in range(args.rounds):
        for (weights, kv), engine in engines.items():
            results[weights, kv]["single"].append(single_stream(engine, args.single_tokens))
            results[weights, kv]["step"].append(batch_step(engine, args.batch))
            bare, nbytes[weights] = bare_linears(weights, args.batch)
            results[weights, kv]["bare"].append(bare)
    base = max(results["float32", args.kv.split(",")[0]]["single"])  # the first KV choice of float32
    for (weights, kv), r in results.items():
        name = weights if kv == "auto" else f"{weights}, KV int8"
        single, step, bare = max(r["single"]), min(r["step"]), min(r["bare"])
        nbytes[name] = nbytes[weights]
        print(f"{name:18s} one stream {single:6.1f} tok/s ({single / base:.2f}x float32), "
              f"{nbytes[name] / 2**20:5.0f} MiB of weights/step -> {nbytes[name] * single / 1e9:5.2f} GB/s; "
              f"batch {args.batch} step {step * 1e3:6.1f} ms vs bare linears {bare * 1e3:6.1f} ms "
              f"(step = {step / bare:.2f}x bare), {args.batch / step:6.0f} tok/s", flush=True)


if __name__ == "__main__":
    main()
