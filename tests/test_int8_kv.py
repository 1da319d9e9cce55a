"""The int8 KV cache (--kv-cache-dtype int8, services/worker/attention/int8_kv.py): what its rows hold, and the
engine serving on it: the demo model's quality against its own-dtype cache, where it is refused, the CLI."""
from __future__ import annotations

import math
from pathlib import Path

import grpc
import pytest
import torch
from servers import ServerProcess
from test_int8 import validation_windows

from tessera.engine.engine import EngineConfig, LLMEngine
from tessera.engine.v1 import engine_pb2, engine_pb2_grpc
from tessera.sampling_params import SamplingParams
from tessera.tokenizer.tokenizer import Tokenizer
from tessera.worker.attention import int8_kv
from tessera.worker.worker import Worker, WorkerConfig


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_row_keeps_each_value_within_half_a_step_of_its_scale(dtype):
    x = (torch.randn(7, 3, 64, generator=torch.Generator().manual_seed(0)) * 5).to(dtype)
    rows = int8_kv.quantize(x)
    assert rows.dtype == torch.int8 and rows.shape == (7, 3, 68)
    scale = rows[..., 64:].contiguous().view(torch.float32)
    torch.testing.assert_close(scale, x.float().abs().amax(-1, keepdim=True) / 127)
    assert rows[..., :64].abs().max() == 127  # the largest value of each row maps to +-127
    error = (int8_kv.dequantize(rows, torch.float32) - x.float()).abs()
    assert (error <= scale / 2 * (1 + 1e-6)).all()
    assert int8_kv.dequantize(rows, dtype).dtype == dtype


def test_a_row_of_zeros_stays_zero_and_rounding_is_to_even():
    x = torch.zeros(2, 1, 8)
    x[1, 0, :] = torch.tensor([127.0, 0.5, 1.5, 2.5, -0.5, -1.5, 0.0, -127.0])  # scale 1: exact halves
    rows = int8_kv.quantize(x)
    assert torch.equal(int8_kv.dequantize(rows, torch.float32)[0], torch.zeros(1, 8))
    assert rows[1, 0, :8].tolist() == [127, 0, 2, 2, 0, -2, 0, -127]


def test_the_head_dim_must_leave_the_scales_aligned():
    assert int8_kv.row_width(64) == 68
    with pytest.raises(ValueError, match="divisible by 4"):
        int8_kv.row_width(66)


# The engine with an int8 cache, on the shipped demo model.

DEMO = Path(__file__).resolve().parents[1] / "models" / "tessera-demo"


def quality(kv_cache_dtype: str):
    """Perplexity of validation windows prefilled 16 tokens a step (so that attention reads the cache, not the
    step's own keys), each position's most likely next token there, and greedy completions of their first 24."""
    engine = LLMEngine(EngineConfig(model=str(DEMO), dtype="float32", kv_cache_dtype=kv_cache_dtype,
                                    kv_cache_memory=64 << 20, max_num_batched_tokens=16))
    windows = validation_windows(Tokenizer(DEMO))
    scored = engine.generate(windows, SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=1))
    logprobs = [e.logprob for c in scored for e in c.prompt_logprobs[1:]]
    top = [e.top[0][0] for c in scored for e in c.prompt_logprobs[1:]]
    completions = engine.generate([w[:24] for w in windows],
                                  SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True))
    return engine, math.exp(-sum(logprobs) / len(logprobs)), top, [c.token_ids for c in completions]


def test_an_int8_kv_cache_keeps_the_demo_models_perplexity_and_greedy_choices():
    plain, plain_ppl, plain_top, plain_tokens = quality("auto")
    int8, int8_ppl, int8_top, int8_tokens = quality("int8")
    assert plain.worker.kv_caches[0].dtype == torch.float32 and int8.worker.kv_caches[0].dtype == torch.int8
    # 6 layers x 2 planes x 4 KV heads x 16 tokens a block, a row of 32 values: 128 bytes in float32, 32 + 4 in int8
    assert (plain.worker.num_blocks, int8.worker.num_blocks) == ((64 << 20) // (2 * 6 * 4 * 16 * 128),
                                                                 (64 << 20) // (2 * 6 * 4 * 16 * 36))
    assert abs(int8_ppl / plain_ppl - 1) < 0.01, (plain_ppl, int8_ppl)
    # The greedy choice at each of the ~1,000 positions, on the same context; free-running completions part
    # for good at the first near-tie, so of those only the tokens before it are compared.
    assert sum(a == b for a, b in zip(int8_top, plain_top)) >= 0.98 * len(plain_top)
    leading = sum(next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), len(x))
                  for x, y in zip(int8_tokens, plain_tokens))
    assert leading >= 0.5 * sum(map(len, plain_tokens))


def test_an_int8_kv_cache_is_refused_where_it_does_not_run_and_unknown_dtypes_are_named():
    with pytest.raises(ValueError, match="kv_cache_dtype: 'fp8'"):
        Worker(WorkerConfig(str(DEMO), "float32", "cpu", kv_cache_memory=1 << 22, kv_cache_dtype="fp8"))
    triton = pytest.importorskip("tessera.worker.attention.triton_backend")
    with pytest.raises(ValueError, match="int8 runs on the CPU's PyTorch attention only"):
        Worker(WorkerConfig(str(DEMO), "float32", "cpu", kv_cache_memory=1 << 22, kv_cache_dtype="int8"),
               triton.TritonAttentionBackend())


def test_an_engine_started_with_an_int8_kv_cache_serves_it_over_the_wire():
    prompt = Tokenizer(DEMO).encode("def fibonacci(n):")
    with ServerProcess("engine", "--model", str(DEMO), "--kv-cache-dtype", "int8", "--kv-cache-memory", "16MiB",
                       "--max-num-batched-tokens", "4") as server:
        with grpc.insecure_channel(server.address) as channel:
            request = engine_pb2.GenerateRequest(
                prompt_token_ids=prompt, sampling=engine_pb2.SamplingParams(temperature=0.0),
                stopping=engine_pb2.StoppingParams(max_tokens=16, ignore_eos=True))
            tokens = [t for r in engine_pb2_grpc.EngineStub(channel).Generate(request, timeout=60) for t in r.token_ids]
    engine = LLMEngine(EngineConfig(model=str(DEMO), kv_cache_dtype="int8", kv_cache_memory=16 << 20,
                                    max_num_batched_tokens=4, dtype="auto"))
    assert engine.worker.kv_caches[0].dtype == torch.int8
    expected = engine.generate([prompt], SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True))[0]
    assert tokens == expected.token_ids
