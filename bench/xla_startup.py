"""The XLA lane's start-up: compile counts, and a cold start against a warm one on the same cache directory.

    PJRT_DEVICE=CPU python bench/xla_startup.py [--preset llama] [--requests 50] [--cache-dir DIR]

Runs two fresh processes one after the other with the same persistent cache (a new temporary one unless
--cache-dir): each starts an XLA worker (PJRT client, weights, warm-up of every bucket), then serves `--requests`
requests of varied lengths and sampling parameters through the engine, and counts what compiled after warm-up.
Prints both start times, the graphs each start compiled or loaded, and `compilations after warm-up: N`.
tests/xla/test_xla_backend.py runs the same children.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Small on purpose: XLA compiles on a CPU are slow, and the lane must stay short. Token buckets 16/32/64, request
# buckets 1/2/4/8: 12 shapes, each a device and a host graph.
ENGINE = dict(block_size=4, num_kv_blocks=128, max_num_batched_tokens=64, max_num_seqs=8, max_model_len=128)
BUCKETS = dict(min_token_bucket=16, min_request_bucket=1, padding_gap=0)


def workload(count: int, seed: int = 0):
    """Prompts of 1 to 60 tokens, 1 to 20 new tokens; greedy, random (some seeded), and host-sampled rows."""
    from tessera.sampling_params import SamplingParams

    rng = random.Random(seed)
    prompts, params = [], []
    for i in range(count):
        prompts.append([rng.randrange(4, 256) for _ in range(rng.randint(1, 60))])
        common = dict(max_tokens=rng.randint(1, 20), ignore_eos=True)
        kind = i % 10
        if kind < 4:
            params.append(SamplingParams(temperature=0.0, **common))
        elif kind < 8:
            params.append(SamplingParams(temperature=0.8, top_k=20, top_p=0.9, min_p=0.05,
                                         seed=i if kind % 2 else None, logprobs=kind - 4, **common))
        elif kind == 8:  # penalties and logit bias run on the host
            params.append(SamplingParams(temperature=0.0, repetition_penalty=1.3, presence_penalty=0.5,
                                         logit_bias={5: 2.0}, **common))
        else:  # prompt logprobs come from the host variant too
            params.append(SamplingParams(temperature=0.0, prompt_logprobs=2, **common))
    return prompts, params


def child(model_dir: str, cache_dir: str, requests: int) -> dict:
    """One start and one workload in this process; returns what the parent prints."""
    from tessera.engine.engine import EngineConfig, LLMEngine
    from tessera.engine.local_worker import worker_config
    from tessera.worker.xla.model_runner import XlaWorker, compile_counts, xla_config_for

    config = EngineConfig(model=model_dir, **ENGINE)
    start = time.perf_counter()
    worker = XlaWorker(worker_config(config), xla_config_for(config, cache_path=cache_dir, **BUCKETS))
    start_s = time.perf_counter() - start
    engine = LLMEngine(config, worker=worker)
    prompts, params = workload(requests)
    begin = time.perf_counter()
    completions = engine.generate(prompts, params)
    return {
        "start_s": start_s,
        "warm_up_s": worker.warm_up_seconds,
        "warm_up": worker.warm_up_counts,
        "shapes": 2 * len(worker.bucket_pairs()),
        "requests": len(completions),
        "tokens": sum(len(c.token_ids) for c in completions),
        "serve_s": time.perf_counter() - begin,
        "compilations_after_warm_up": worker.compilations_after_warm_up,
        "total": compile_counts(),
    }


def run_child(model_dir: str | Path, cache_dir: str | Path, requests: int = 50) -> dict:
    """`child` in a fresh process (so that nothing is cached in memory), with PJRT on the CPU unless set."""
    env = {**os.environ, "PJRT_DEVICE": os.environ.get("PJRT_DEVICE", "CPU")}
    out = subprocess.run(
        [sys.executable, __file__, "--child", "--model", str(model_dir), "--cache-dir", str(cache_dir),
         "--requests", str(requests)],
        env=env, capture_output=True, text=True, timeout=900,
    )
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode or not lines:
        raise RuntimeError(f"child failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def report(name: str, result: dict) -> None:
    w = result["warm_up"]
    print(f"{name}: start {result['start_s']:.1f} s (warm-up {result['warm_up_s']:.1f} s for {result['shapes']} "
          f"shapes: {w['graphs']} new graphs, {w['compiled']} compiled in {w['compile_s']:.1f} s, persistent cache "
          f"{w['PersistentCacheHit']} "
          f"hits / {w['PersistentCacheMiss']} misses / {w['PersistentCacheDeserializeFailure']} unreadable); "
          f"{result['requests']} requests, {result['tokens']} tokens in {result['serve_s']:.1f} s; "
          f"compilations after warm-up: {result['compilations_after_warm_up']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="llama", help="a tests/tiny_checkpoints.py preset")
    parser.add_argument("--model", help="a checkpoint directory instead of a tiny preset")
    parser.add_argument("--cache-dir", help="persistent XLA cache (default: a new temporary directory)")
    parser.add_argument("--requests", type=int, default=50)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.model, args.cache_dir, args.requests)), flush=True)
        return

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model
        if model_dir is None:
            sys.path.insert(0, str(REPO / "tests"))
            from tiny_checkpoints import PRESETS, make_tiny_checkpoint

            model_dir = make_tiny_checkpoint(Path(tmp) / args.preset, **PRESETS[args.preset])
        cache_dir = args.cache_dir or Path(tmp) / "xla_cache"
        cold = run_child(model_dir, cache_dir, args.requests)
        report("cold", cold)
        warm = run_child(model_dir, cache_dir, args.requests)
        report("warm", warm)
        print(f"compilations after warm-up: {cold['compilations_after_warm_up'] + warm['compilations_after_warm_up']}")
        print(f"cold start: {cold['start_s']:.1f} s, warm start: {warm['start_s']:.1f} s")


if __name__ == "__main__":
    main()
