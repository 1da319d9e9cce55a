"""What bf16, int8 weights and an int8 KV cache cost in quality, measured on the shipped demo model through the
engine itself.

Perplexity on the demo model's own validation split (the 2 % of the standard library's files it never trained
on, demo_model/train.py), from prompt logprobs of 512-token windows prefilled 64 tokens a step (so that attention
reads the KV cache, not only a step's own keys), the share of those positions whose most likely next token is
float32's, and greedy agreement with float32 on a fixed prompt set: the share of generated tokens equal to
float32's, and of completions identical to it.

    python bench/quantization_quality.py [--windows 48] [--prompts 32] [--tokens 48]
"""
from __future__ import annotations

import argparse
import math
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "demo_model"))
sys.path.insert(0, str(ROOT / "bench"))

from bench_model import cpu_model  # noqa: E402
from train import load_corpus  # noqa: E402  (the demo model's own split)

from tessera.engine.engine import EngineConfig, LLMEngine  # noqa: E402
from tessera.sampling_params import SamplingParams  # noqa: E402
from tessera.tokenizer.tokenizer import Tokenizer  # noqa: E402

DEMO = ROOT / "models" / "tessera-demo"
VARIANTS = {"float32": dict(dtype="float32"), "bfloat16": dict(dtype="bfloat16"),
            "int8": dict(dtype="float32", quantization="int8"),
            "float32, KV int8": dict(dtype="float32", kv_cache_dtype="int8"),
            "bfloat16, KV int8": dict(dtype="bfloat16", kv_cache_dtype="int8")}


def windows(tokenizer: Tokenizer, count: int, length: int = 512) -> list[list[int]]:
    _, val, _ = load_corpus(Path(sysconfig.get_paths()["stdlib"]), quick=False)
    stream: list[int] = []
    for _, text in val:
        stream += tokenizer.encode(text) + [0]  # <|endoftext|> separates files, as in training
    step = max(length, (len(stream) - length) // count)
    return [stream[i:i + length] for i in range(0, len(stream) - length, step)][:count]


def perplexity(engine: LLMEngine, sequences: list[list[int]]) -> tuple[float, list[int]]:
    """The perplexity, and the most likely next token at every position scored."""
    params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=1)
    total, count, top = 0.0, 0, []
    for completion in engine.generate(sequences, params):
        entries = [e for e in completion.prompt_logprobs if e is not None][1:] if completion.prompt_logprobs else []
        total += sum(e.logprob for e in entries)
        count += len(entries)
        top += [e.top[0][0] for e in entries]
    return math.exp(-total / count), top


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--windows", type=int, default=48, help="512-token validation windows")
    parser.add_argument("--prompts", type=int, default=32, help="greedy prompts (the first 32 tokens of windows)")
    parser.add_argument("--tokens", type=int, default=48, help="greedy tokens per prompt")
    args = parser.parse_args()
    print(f"machine: {cpu_model()}")
    tokenizer = Tokenizer(DEMO)
    sequences = windows(tokenizer, args.windows)
    prompts = [s[:32] for s in windows(tokenizer, args.prompts)]
    greedy = SamplingParams(temperature=0.0, max_tokens=args.tokens, ignore_eos=True)
    print(f"demo model, {len(sequences)} validation windows of 512 tokens; {len(prompts)} prompts x {args.tokens} "
          "greedy tokens")
    reference = None
    for name, options in VARIANTS.items():
        engine = LLMEngine(EngineConfig(model=str(DEMO), kv_cache_memory=256 << 20, max_num_batched_tokens=64,
                                        **options))
        ppl, top = perplexity(engine, sequences)
        tokens = [c.token_ids for c in engine.generate(prompts, greedy)]
        if reference is None:
            reference = ppl, top, tokens
        reference_ppl, reference_top, reference_tokens = reference
        choices = sum(a == b for a, b in zip(top, reference_top)) / len(top)
        same = sum(a == b for ours, ref in zip(tokens, reference_tokens) for a, b in zip(ours, ref))
        identical = sum(ours == ref for ours, ref in zip(tokens, reference_tokens))
        print(f"{name:17s} perplexity {ppl:7.3f} ({(ppl / reference_ppl - 1) * 100:+.2f} % vs float32), next-token "
              f"choice float32's {choices:6.1%}; greedy tokens equal to float32's "
              f"{same / (len(prompts) * args.tokens):6.1%}, completions identical {identical}/{len(prompts)}",
              flush=True)


if __name__ == "__main__":
    main()
