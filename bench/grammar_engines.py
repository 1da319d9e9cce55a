"""xgrammar vs llguidance on this machine: what tessera's structured outputs would cost with each, side by side.

    pip install llguidance            # xgrammar is a tessera dependency; llguidance only for this comparison
    python bench/grammar_engines.py

For the demo model's 8192-token vocabulary and the benchmark model's 32000-token one (bench_model.py), and for a
set of JSON Schemas: the time to set up the vocabulary, to compile (xgrammar) or construct (llguidance) each
grammar, and to compute the allowed-token bitmask at every step of a walk through an output the grammar accepts
(always taking an allowed token, so both engines see the same states), median and maximum over all steps.
"""
from __future__ import annotations

import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from bench_model import build_bench_model, build_bench_tokenizer, cpu_model  # noqa: E402
from structured_output import SCHEMA  # noqa: E402
from test_structured_output import SCHEMAS  # noqa: E402

STEPS = 64


def allowed_tokens(mask: torch.Tensor, vocab: int) -> list[int]:
    from tessera.worker.sampler import unpack_bitmask

    return unpack_bitmask(mask, vocab)[0].nonzero().flatten().tolist()


def walk(fill, consume, done, vocab: int, eos: int, seed: int) -> list[float]:
    """Seconds per mask over one walk: a random allowed token (EOS only when nothing else is) each step."""
    rng, times = random.Random(seed), []
    mask = torch.zeros((1, (vocab + 31) // 32), dtype=torch.int32)
    for _ in range(STEPS):
        if done():
            break
        start = time.perf_counter()
        fill(mask)
        times.append(time.perf_counter() - start)
        allowed = [t for t in allowed_tokens(mask, vocab) if t != eos]
        if not allowed:
            break
        consume(rng.choice(allowed))
    return times


def bench_xgrammar(tokenizer_file: Path, vocab: int, eos: int, schemas: list[str]):
    import xgrammar
    from transformers import PreTrainedTokenizerFast

    start = time.perf_counter()
    info = xgrammar.TokenizerInfo.from_huggingface(PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_file)),
                                                   vocab_size=vocab, stop_token_ids=[eos])
    compiler = xgrammar.GrammarCompiler(info, max_threads=1, cache_enabled=False)
    setup = time.perf_counter() - start
    compiles, masks = [], []
    for i, schema in enumerate(schemas):
        start = time.perf_counter()
        grammar = compiler.compile_json_schema(schema, any_whitespace=False)
        compiles.append(time.perf_counter() - start)
        matcher = xgrammar.GrammarMatcher(grammar)
        masks += walk(lambda m: matcher.fill_next_token_bitmask(m, 0), matcher.accept_token, matcher.is_terminated,
                      vocab, eos, seed=i)
    return setup, compiles, masks


def bench_llguidance(tokenizer_file: Path, vocab: int, eos: int, schemas: list[str]):
    import llguidance
    import llguidance.torch

    start = time.perf_counter()
    tokenizer = llguidance.LLTokenizer(tokenizer_file.read_text(), n_vocab=vocab, eos_token=eos)
    setup = time.perf_counter() - start
    compiles, masks = [], []
    for i, schema in enumerate(schemas):
        start = time.perf_counter()
        grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False})
        matcher = llguidance.LLMatcher(tokenizer, grammar, log_level=0)
        compiles.append(time.perf_counter() - start)
        assert not matcher.is_error(), matcher.get_error()
        masks += walk(lambda m: llguidance.torch.fill_next_token_bitmask(matcher, m, 0), matcher.consume_token,
                      matcher.is_stopped, vocab, eos, seed=i)
    return setup, compiles, masks


def main():
    schemas = [json.dumps(s) for s in SCHEMAS] + [SCHEMA]
    bench_dir = build_bench_model("bench/out/bench-llama")
    vocabularies = [("demo, 8192 tokens", ROOT / "models/tessera-demo/tokenizer.json", 8192, 0),
                    ("bench, 32000 tokens", build_bench_tokenizer(bench_dir), 32000, 2)]
    print(f"machine: {cpu_model()}; {len(schemas)} JSON Schemas, walks of up to {STEPS} steps each")
    print(f"{'':<34}{'vocab setup':>12}{'compile p50':>13}{'max':>9}{'mask p50':>11}{'max':>9}")
    for name, path, vocab, eos in vocabularies:
        for engine, run in (("xgrammar", bench_xgrammar), ("llguidance", bench_llguidance)):
            try:
                setup, compiles, masks = run(path, vocab, eos, schemas)
            except ImportError as error:
                print(f"{engine + ', ' + name:<34} not installed ({error.name})")
                continue
            print(f"{engine + ', ' + name:<34}{setup * 1e3:9.0f} ms{statistics.median(compiles) * 1e3:10.2f} ms"
                  f"{max(compiles) * 1e3:6.1f} ms{statistics.median(masks) * 1e6:8.0f} us{max(masks) * 1e6:6.0f} us")


if __name__ == "__main__":
    main()
