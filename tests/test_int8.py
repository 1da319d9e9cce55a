"""`--quantization int8`: int8 linear layers (per-channel weights, per-token activations, oneDNN's int8 GEMM, and
the native kernel for a few rows) against float32, from one layer to the demo model's perplexity and greedy completions, in-process and served."""
from __future__ import annotations

import math
import sysconfig
from pathlib import Path

import grpc
import pytest
import torch
import torch.nn.functional as F

from servers import ServerProcess
from tessera.engine.engine import EngineConfig, LLMEngine
from tessera.engine.v1 import engine_pb2, engine_pb2_grpc
from tessera.sampling_params import SamplingParams
from tessera.tokenizer.tokenizer import Tokenizer
from tessera.worker.models.int8_linear import Int8Linear, quantize_rows
from tessera.worker.worker import Worker, WorkerConfig

DEMO = Path(__file__).resolve().parents[1] / "models" / "tessera-demo"


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return ((ours.float() - reference).norm() / reference.norm()).item()


@pytest.mark.parametrize("rows", [1, 7, 130])  # 130: above 128, rows are padded for oneDNN's kernel cache
def test_an_int8_layer_is_within_int8_rounding_of_float32(rows):
    torch.manual_seed(0)
    weight, bias = torch.randn(96, 64) * 0.05, torch.randn(96)
    layer = Int8Linear(weight, bias)
    x = torch.randn(rows, 64)
    reference = F.linear(x, weight, bias)
    out = layer(x)
    assert out.shape == (rows, 96) and out.dtype == torch.float32
    assert relative_error(out, reference) < 0.02
    # bf16 activations come back in bf16; a zero row stays zero (plus the bias).
    assert layer(x.bfloat16()).dtype == torch.bfloat16
    assert torch.allclose(layer(torch.zeros(2, 64)), bias.expand(2, 96))


NATIVE_CHECK = """
import torch
from tessera.worker.models.int8_linear import NATIVE_ROWS, Int8Linear
torch.manual_seed(0)
for k, n in ((512, 1024), (1408, 96), (77, 33)):  # 77: not a whole number of vector widths
    for bias in (None, torch.randn(n)):
        layer = Int8Linear(torch.randn(n, k) / k ** 0.5, bias)
        assert layer.native is not None, "the native int8 kernel did not build"
        layer.native_rows = 1 << 62  # more rows run natively on CPUs without AVX-512: check those here too
        for dtype in (torch.float32, torch.bfloat16):
            for rows in (*range(1, NATIVE_ROWS + 1), 5, 64, 130):  # 130: padded for oneDNN
                x = (torch.randn(rows, k) * 3).to(dtype)
                x[0] = 0.0  # an all-zero row: scale 1
                native = layer(x)
                layer.native_rows = NATIVE_ROWS  # above it: oneDNN's GEMM between the native quantize and rescale
                batched = layer(x)
                kernel, layer.native = layer.native, None
                reference = layer(x)  # the PyTorch path: quantize, oneDNN's GEMM, rescale
                layer.native, layer.native_rows = kernel, 1 << 62
                assert native.dtype == reference.dtype and torch.equal(native, reference), (k, n, dtype, rows)
                assert batched.dtype == reference.dtype and torch.equal(batched, reference), (k, n, dtype, rows)
print("identical")
"""


@pytest.mark.parametrize("dot", ["best", "avx512bw", "avx2", "plain"])
def test_the_native_int8_kernel_for_a_few_rows_is_bit_for_bit_the_pytorch_path(dot):
    """Each of its dot products (VNNI where the CPU has it, AVX512-BW, AVX2, plain C++; a forced one the CPU lacks
    falls back to the next), in a process of its own since the choice is made once."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "TESSERA_INT8_DOT": dot}
    result = subprocess.run([sys.executable, "-c", NATIVE_CHECK], capture_output=True, text=True, env=env,
                            timeout=300)
    assert result.returncode == 0 and "identical" in result.stdout, result.stderr[-2000:]


def test_quantize_rows_is_symmetric_per_row():
    x = torch.tensor([[1.0, -2.0, 0.5], [0.0, 0.0, 0.0]])
    values, scale = quantize_rows(x)
    assert values.dtype == torch.int8 and values[0].tolist() == [64, -127, 32]
    assert scale[0].item() == pytest.approx(2 / 127) and scale[1].item() == 1.0


def validation_windows(tokenizer: Tokenizer, count: int = 4, length: int = 256) -> list[list[int]]:
    text = (Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py").read_text()
    ids = tokenizer.encode(text)
    return [ids[i * length:(i + 1) * length] for i in range(count)]


def perplexity(engine: LLMEngine, windows: list[list[int]]) -> float:
    completions = engine.generate(windows, SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0))
    logprobs = [e.logprob for c in completions for e in c.prompt_logprobs[1:]]
    return math.exp(-sum(logprobs) / len(logprobs))


def test_int8_keeps_the_demo_models_perplexity_and_greedy_completions():
    tokenizer = Tokenizer(DEMO)
    windows = validation_windows(tokenizer)
    prompts = [w[:24] for w in windows]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    results = {}
    for quantization in (None, "int8"):
        engine = LLMEngine(EngineConfig(model=str(DEMO), dtype="float32", quantization=quantization,
                                        kv_cache_memory=64 << 20))
        assert engine.worker.cpu_matmul == (quantization or "onednn")
        results[quantization] = perplexity(engine, windows), [c.token_ids for c in engine.generate(prompts, params)]
    (fp32_ppl, fp32_tokens), (int8_ppl, int8_tokens) = results[None], results["int8"]
    assert abs(int8_ppl / fp32_ppl - 1) < 0.01, (fp32_ppl, int8_ppl)
    same = sum(a == b for ours, ref in zip(int8_tokens, fp32_tokens) for a, b in zip(ours, ref))
    assert same >= 0.9 * sum(map(len, fp32_tokens))


def test_int8_is_refused_off_the_cpu_and_unknown_schemes_are_named():
    with pytest.raises(ValueError, match="quantization: 'int4'"):
        Worker(WorkerConfig(str(DEMO), "float32", "cpu", kv_cache_memory=1 << 22, quantization="int4"))


def test_an_int8_engine_serves_over_the_wire():
    prompt = Tokenizer(DEMO).encode("def fibonacci(n):")
    with ServerProcess("engine", "--model", str(DEMO), "--quantization", "int8", "--kv-cache-memory", "16MiB") as server:
        with grpc.insecure_channel(server.address) as channel:
            stub = engine_pb2_grpc.EngineStub(channel)
            request = engine_pb2.GenerateRequest(
                prompt_token_ids=prompt, sampling=engine_pb2.SamplingParams(temperature=0.0),
                stopping=engine_pb2.StoppingParams(max_tokens=16, ignore_eos=True))
            tokens = [t for r in stub.Generate(request, timeout=60) for t in r.token_ids]
    engine = LLMEngine(EngineConfig(model=str(DEMO), dtype="float32", quantization="int8", kv_cache_memory=16 << 20))
    expected = engine.generate([prompt], SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True))[0]
    assert tokens == expected.token_ids
