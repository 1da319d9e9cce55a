"""The native CPU kernels of a decode step (kernels/decode_ops_cpu.cpp, kernels/dense_gemv_cpu.cpp) against the
PyTorch code they replace, op by op and through whole models, and the choice of when they run."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_model import BLOCK_SIZE, NUM_BLOCKS, empty_kv_caches, random_prompt, run, scattered_block_table
from tiny_checkpoints import preset_checkpoint

from tessera.kernels import paged_attention_cpu
from tessera.worker.attention.torch_backend import TorchAttentionBackend
from tessera.worker.checkpoint import load_model
from tessera.worker.models.fused_ops import native_decode_layers
from tessera.worker.models import packed_linear
from tessera.worker.models.packed_linear import (GEMV_ROWS, PackedLinear, batch_matmul, onednn_available,
                                                 pack_linear_layers, use_gemv)
from tessera.worker.models.rope import RotaryEmbedding, apply_rotary

decode_ops = paged_attention_cpu.load("decode_ops")
gemv = paged_attention_cpu.load("dense_gemv")
needs_ops = pytest.mark.skipif(decode_ops is None, reason="no C++ compiler: the native CPU kernels cannot be built")


def gemv_runs(dtype: torch.dtype) -> bool:
    return gemv is not None and torch.ops.tessera.gemv_available(dtype)


def reference_rms_norm(x, residual, weight, eps):
    """models/llama.py's PyTorch RMSNorm."""
    total = x + residual if residual is not None else x
    x32 = total.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype), total


def one_ulp(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


@needs_ops
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows, dim", [(1, 512), (3, 40), (37, 33)])
def test_add_rms_norm_matches_pytorch(dtype, rows, dim):
    g = torch.Generator().manual_seed(rows * dim)
    x, residual = (torch.randn(rows, dim, generator=g).to(dtype) for _ in range(2))
    weight = torch.randn(dim, generator=g).to(dtype)
    for res in (residual, None):
        out, total = torch.ops.tessera.add_rms_norm(x, res, weight, 1e-6)
        expected, expected_total = reference_rms_norm(x, res, weight, 1e-6)
        assert out.dtype == dtype and out.shape == x.shape
        if res is not None:
            assert torch.equal(total, expected_total)  # the residual stream: one rounding, exact
        else:
            assert total.numel() == 0  # the caller keeps x (no output may alias an input)
        # Only the mean's summation order differs: a last-bit difference at most.
        torch.testing.assert_close(out, expected, rtol=2 * one_ulp(dtype), atol=1e-6)


@needs_ops
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [32, 48, 128])  # a half of 16, 24 (not a multiple of 16) and 64
def test_rotary_in_place_is_bit_for_bit_the_pytorch_rotation_on_strided_views(dtype, head_dim):
    heads, kv_heads, tokens = 4, 2, 40  # more tokens than one thread's share
    rope = RotaryEmbedding(head_dim, 300, 10000.0, None)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim).to(dtype)
    q, k, _ = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    q, k = q.view(tokens, heads, head_dim), k.view(tokens, kv_heads, head_dim)  # strided: rows of qkv
    positions = torch.tensor([0, 1, 17, 100, 250, 299] + list(range(120, 120 + tokens - 6)))
    cos, sin = rope(positions, dtype)
    expected_q, expected_k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    untouched = qkv[:, (heads + kv_heads) * head_dim:].clone()
    torch.ops.tessera.rotary_(q, k, positions, rope.cos_sin_cache)
    assert torch.equal(q, expected_q) and torch.equal(k, expected_k)
    assert torch.equal(qkv[:, (heads + kv_heads) * head_dim:], untouched)  # v is left alone
    with pytest.raises(RuntimeError, match="position 300 outside the table of 300"):
        torch.ops.tessera.rotary_(q, k, torch.tensor([300] + [0] * (tokens - 1)), rope.cos_sin_cache)


@needs_ops
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_mul_matches_pytorch(dtype):
    torch.manual_seed(0)
    gate_up = (torch.randn(5, 2 * 300) * 4).to(dtype)
    gate, up = gate_up.chunk(2, dim=-1)
    out = torch.ops.tessera.silu_mul(gate_up)
    # exp's last float bits may differ from PyTorch's vectorized one (up to 2 ulp of a float32 product seen), so a
    # bfloat16 result may be one bit off.
    torch.testing.assert_close(out, F.silu(gate) * up, rtol=one_ulp(dtype) * (3 if dtype == torch.float32 else 1),
                               atol=1e-6)


@pytest.mark.skipif(not gemv_runs(torch.float32), reason="the native GEMV needs AVX2 (or AVX-512) and a C++ compiler")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n, k", [(64, 512), (255, 96), (17, 7), (1, 1), (300, 1408)])
def test_gemv_matches_a_float64_matmul_for_one_to_four_rows(dtype, n, k):
    if not gemv_runs(dtype):
        pytest.skip("this CPU lacks AVX512-BF16")
    g = torch.Generator().manual_seed(n * k)
    weight, bias = torch.randn(n, k, generator=g).to(dtype), torch.randn(n, generator=g)
    packed = torch.ops.tessera.gemv_pack(weight)
    for rows in range(1, GEMV_ROWS + 1):
        x = torch.randn(rows, k, generator=g).to(dtype)
        for b in (bias, None):
            expected = x.double() @ weight.double().t() + (b.double() if b is not None else 0)
            out = torch.ops.tessera.gemv(x, packed, b, n)
            assert out.dtype == dtype and out.shape == (rows, n)
            # float32 sums (a different order than oneDNN's), then one rounding to the dtype
            tolerance = 1e-5 * k**0.5 if dtype == torch.float32 else one_ulp(dtype)
            torch.testing.assert_close(out.double(), expected, rtol=tolerance, atol=tolerance * 4)


@pytest.mark.skipif(not gemv_runs(torch.float32), reason="the native GEMV needs AVX2 (or AVX-512) and a C++ compiler")
def test_the_gemvs_avx2_path_matches_too_where_the_cpu_has_avx512():
    """CPUs without AVX-512 take the AVX2 path; TESSERA_GEMV=avx2 makes any CPU take it, in a process of its own
    (the choice is made once), where the float64 comparison above runs again."""
    import os
    import subprocess
    import sys

    check = ("import torch; from tessera.kernels import paged_attention_cpu as p; p.load('dense_gemv'); "
             "print(torch.ops.tessera.gemv_isa(torch.float32), torch.ops.tessera.gemv_isa(torch.bfloat16))")
    env = {**os.environ, "TESSERA_GEMV": "avx2"}
    isa = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, env=env, timeout=300)
    assert isa.stdout.split() == ["avx2", "avx2"], isa.stderr[-2000:]
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k",
                             "test_gemv_matches_a_float64_matmul"], capture_output=True, text=True, env=env,
                            timeout=600, cwd=os.path.dirname(__file__))
    assert result.returncode == 0 and " passed" in result.stdout and "skipped" not in result.stdout, \
        result.stdout[-2000:]


STEP_TEAM_CHECK = """
import sys, threading, time
from pathlib import Path
import torch
from tessera.kernels import paged_attention_cpu
from tessera.worker.models.int8_linear import Int8Linear
paged_attention_cpu.load("dense_gemv")
torch.set_num_threads(2)
g = torch.Generator().manual_seed(0)
cases = []  # (layer, inputs of one to four rows)
for dtype in (torch.float32, torch.bfloat16):
    if torch.ops.tessera.gemv_available(dtype):
        packed = torch.ops.tessera.gemv_pack(torch.randn(1000, 512, generator=g).to(dtype))
        cases.append((lambda x, packed=packed: torch.ops.tessera.gemv(x, packed, None, 1000),
                      [torch.randn(rows, 512, generator=g).to(dtype) for rows in (1, 2, 3, 4)]))
cases.append((Int8Linear(torch.randn(1000, 512, generator=g) / 512 ** 0.5, None),
              [torch.randn(rows, 512, generator=g) for rows in (1, 2, 3, 4)]))
outs = [[layer(x) for x in inputs] for layer, inputs in cases]
torch.save(outs, sys.argv[1])

def again():  # the same calls from several threads at once: a busy team runs a second caller's job alone
    for _ in range(50):
        for (layer, inputs), expected in zip(cases, outs):
            assert all(torch.equal(layer(x), y) for x, y in zip(inputs, expected))
threads = [threading.Thread(target=again) for _ in range(3)]
for t in threads: t.start()
for t in threads: t.join()

def team_threads():
    return [t for t in Path("/proc/self/task").iterdir() if (t / "comm").read_text().strip() == "tessera-team"]
def team_cpu():  # seconds of CPU the team's workers have used
    return sum(sum(map(int, (t / "stat").read_text().rsplit(")", 1)[1].split()[11:13])) for t in team_threads()) / 100
time.sleep(0.05)
before = team_cpu()
time.sleep(0.5)
print(len(team_threads()), team_cpu() - before)
"""


@pytest.mark.skipif(not gemv_runs(torch.float32), reason="the native GEMV needs AVX2 (or AVX-512) and a C++ compiler")
def test_the_step_team_gives_the_openmp_results_and_sleeps_between_steps(tmp_path):
    """TESSERA_STEP_TEAM=1 (kernels/step_team.h) runs the GEMVs (float32, bf16, int8; one to four rows) on a team
    of its own: bit for bit what OpenMP's threads give, also from several threads at once, and its worker uses
    no CPU once idle (a spinning one would use the whole 0.5 s). Without it there is no team."""
    import os
    import subprocess
    import sys

    runs = {}
    for team in ("1", "0"):
        env = {**os.environ, "TESSERA_STEP_TEAM": team, "OMP_NUM_THREADS": "2"}
        result = subprocess.run([sys.executable, "-c", STEP_TEAM_CHECK, str(tmp_path / f"{team}.pt")],
                                capture_output=True, text=True, env=env, timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
        workers, idle = result.stdout.split()
        runs[team] = int(workers), float(idle), torch.load(tmp_path / f"{team}.pt")
    assert runs["1"][0] == 1 and runs["0"][0] == 0
    assert runs["1"][1] <= 0.05, runs["1"][1]
    for ours, theirs in zip(runs["1"][2], runs["0"][2]):
        assert all(torch.equal(a, b) for a, b in zip(ours, theirs))


@pytest.mark.skipif(not gemv_runs(torch.float32), reason="the native GEMV needs AVX2 (or AVX-512) and a C++ compiler")
def test_gemv_refuses_what_it_cannot_compute():
    packed = torch.ops.tessera.gemv_pack(torch.randn(40, 24))
    with pytest.raises(RuntimeError, match="1 <= m <= 4"):
        torch.ops.tessera.gemv(torch.randn(5, 24), packed, None, 40)
    with pytest.raises(RuntimeError, match="packed by gemv_pack with k = 23"):
        torch.ops.tessera.gemv(torch.randn(1, 23), packed, None, 40)
    with pytest.raises(RuntimeError, match="n = 70 does not fit"):
        torch.ops.tessera.gemv(torch.randn(1, 24), packed, None, 70)
    with pytest.raises(RuntimeError, match="one dtype"):
        torch.ops.tessera.gemv(torch.randn(1, 24).bfloat16(), packed, None, 40)


@pytest.mark.skipif(not (onednn_available() and gemv_runs(torch.float32)), reason="needs oneDNN and the GEMV")
def test_a_packed_layer_with_a_gemv_copy_gives_onednns_results_at_every_row_count():
    weight, bias = torch.randn(96, 40), torch.randn(96)
    with_copy, without = PackedLinear(weight, bias, gemv=True), PackedLinear(weight, bias)
    assert with_copy.gemv_weight is not None and without.gemv_weight is None
    for rows in (1, 2, 3, 4, 5, 64):
        x = torch.randn(rows, 40)
        torch.testing.assert_close(with_copy(x), without(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(with_copy(x), F.linear(x, weight, bias), atol=1e-4, rtol=1e-5)


def bf16_matmul_runs() -> bool:
    return gemv is not None and torch.ops.tessera.bf16_matmul_available()


@pytest.mark.skipif(not bf16_matmul_runs(), reason="the native bf16 matmul needs AVX2 and a C++ compiler")
@pytest.mark.parametrize("m, n, k", [(1, 16, 2), (3, 70, 33), (4, 64, 64), (5, 100, 40), (9, 17, 7), (64, 200, 130),
                                     (130, 64, 512)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_the_bf16_matmul_gives_float32_sums_rounded_to_bf16_at_any_row_count(m, n, k, with_bias):
    """Every tile of rows (4, and the 1-3 left over), strips cut by n, odd k padded: the float64 result rounded
    to bf16, or the bf16 next to it where the float32 sums' own error crosses a rounding boundary."""
    torch.manual_seed(m * 1000 + n + k)
    weight, x = torch.randn(n, k).bfloat16(), torch.randn(m, k).bfloat16()
    bias = torch.randn(n) if with_bias else None
    got = torch.ops.tessera.bf16_matmul(x, torch.ops.tessera.gemv_pack(weight), bias, n)
    assert got.dtype == torch.bfloat16 and got.shape == (m, n)
    exact = x.double() @ weight.double().T + (bias.double() if with_bias else 0)
    scale = (x.double().abs() @ weight.double().abs().T).max()  # what the float32 sums' rounding scales with
    torch.testing.assert_close(got.double(), exact.bfloat16().double(), rtol=2 ** -7, atol=1e-6 * scale.item())


@pytest.mark.skipif(not bf16_matmul_runs(), reason="the native bf16 matmul needs AVX2 and a C++ compiler")
def test_the_bf16_matmul_rejects_what_it_cannot_run():
    packed = torch.ops.tessera.gemv_pack(torch.randn(40, 24).bfloat16())
    with pytest.raises(RuntimeError, match="bfloat16"):
        torch.ops.tessera.bf16_matmul(torch.randn(8, 24), packed, None, 40)
    with pytest.raises(RuntimeError, match="k = 26"):
        torch.ops.tessera.bf16_matmul(torch.randn(8, 26).bfloat16(), packed, None, 40)
    with pytest.raises(RuntimeError, match="n = 70 does not fit"):
        torch.ops.tessera.bf16_matmul(torch.randn(8, 24).bfloat16(), packed, None, 70)
    with pytest.raises(RuntimeError, match="a bias of n values"):
        torch.ops.tessera.bf16_matmul(torch.randn(8, 24).bfloat16(), packed, torch.randn(39), 40)


@pytest.mark.skipif(not bf16_matmul_runs(), reason="the native bf16 matmul needs AVX2 and a C++ compiler")
def test_a_layer_with_native_batches_keeps_one_copy_and_runs_every_row_count():
    """Where oneDNN cannot run bf16 (no AVX-512): the GEMV up to GEMV_ROWS rows, the bf16 matmul above, both on
    the one packed weight."""
    weight, bias = torch.randn(96, 40).bfloat16(), torch.randn(96).bfloat16()
    layer = PackedLinear(weight, bias, batches="native")
    assert layer.packed_weight is None and layer.gemv_weight is not None and not hasattr(layer, "weight")
    for rows in (1, 4, 5, 64):
        x = torch.randn(rows, 40).bfloat16()
        expected = F.linear(x.double(), weight.double(), bias.double())
        torch.testing.assert_close(layer(x).double(), expected, atol=0.1, rtol=1e-2)
    with pytest.raises(ValueError, match="bf16 only"):
        PackedLinear(torch.randn(96, 40), None, batches="native")


@pytest.mark.skipif(not gemv_runs(torch.bfloat16), reason="the native GEMV needs AVX2 and a C++ compiler")
def test_a_bf16_worker_without_onednns_bf16_keeps_the_native_decode_layers(monkeypatch, tmp_path_factory, caplog):
    """A bf16 model on a CPU where oneDNN cannot run bf16 (AVX2 only: it raised at load before): the native bf16
    matmul for prefill and large batches, and for decodes of 1-4 requests the GEMV and the native layers, all on
    one packed copy of the weights; against PyTorch's own bf16 model."""
    from tessera.engine.engine import EngineConfig, LLMEngine
    from tessera.engine.request import SamplingParams

    monkeypatch.setattr(packed_linear, "onednn_available", lambda dtype=torch.float32: dtype != torch.bfloat16)
    model_dir = preset_checkpoint(tmp_path_factory, "llama")
    with caplog.at_level("INFO", logger="tessera.worker"):
        engine = LLMEngine(EngineConfig(model=str(model_dir), device="cpu", dtype="bfloat16", num_kv_blocks=64))
    worker = engine.worker
    assert worker.cpu_matmul == "native" and "native bf16 matmuls" in caplog.text
    layers = [m for m in worker.model.modules() if isinstance(m, PackedLinear)]
    assert layers and all(m.batches == "native" and m.packed_weight is None and m.gemv_weight is not None
                          for m in layers)
    assert worker.model.native_layers is not None
    reference = LLMEngine(EngineConfig(model=str(model_dir), device="cpu", dtype="bfloat16", num_kv_blocks=64,
                                       cpu_matmul="aten"))
    prompts = [[5, 9, 3, 7, 11], [2, 4, 6, 8, 10, 12, 14]]
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=2)
    got, want = engine.generate(prompts, params), reference.generate(prompts, params)
    for a, b in zip(got, want):  # bf16 sums in another order: the same tokens but where two nearly tie
        assert len(a.token_ids) == 8
        for mine, theirs in zip(a.logprobs, b.logprobs):
            assert abs(mine.logprob - theirs.logprob) < 0.05
            if mine.token_id != theirs.token_id:
                assert theirs.top[0][1] - theirs.top[1][1] < 0.1
                break


def decode_steps(model, backend, config, steps: int = 6, kv_caches=None):
    """Logits of a prefill of 3 requests of 5 tokens, then `steps` decode steps of the 3 at once (GEMV-sized
    batches); 11 tokens each, past the sliding window of the presets that have one (8)."""
    kv_caches = empty_kv_caches(model, backend) if kv_caches is None else kv_caches
    blocks = scattered_block_table(9)
    tables = [blocks[0:3], blocks[3:6], blocks[6:9]]
    prompts = [random_prompt(5, config.vocab_size, seed) for seed in range(3)]
    out = [run(model, kv_caches, [(table, prompt, 0) for table, prompt in zip(tables, prompts)])]
    for step in range(steps):
        out.append(run(model, kv_caches, [(table, [7 + i + step], 5 + step) for i, table in enumerate(tables)]))
    return torch.cat(out)


@needs_ops
@pytest.mark.parametrize("preset", ["llama", "llama_tied", "llama_bias", "mistral", "qwen2", "qwen2_sliding", "qwen3"])
@pytest.mark.parametrize("dtype, atol", [("float32", 1e-4), ("bfloat16", 0.25)])
def test_a_model_on_the_native_kernels_gives_the_pytorch_models_logits(preset, dtype, atol, tmp_path_factory):
    """The native small ops and, where it runs, the GEMV copy and the native decoder layer, against the pure
    PyTorch model: the same checkpoint, a prefill and then decode steps of three requests (which take the GEMV
    and, but for Qwen3's per-head norms, one decode_layer call per layer)."""
    path = preset_checkpoint(tmp_path_factory, preset)
    pure_backend, native_backend = TorchAttentionBackend(native_decode=False), TorchAttentionBackend()
    pure, config = load_model(path, pure_backend, dtype=dtype)
    native, _ = load_model(path, native_backend, dtype=dtype)
    assert pure.fused is None and native.fused is not None and native.fused.name == "native"
    assert native_decode_layers(native) is None  # not before the projections hold GEMV copies
    if gemv_runs(getattr(torch, dtype)):  # oneDNN for larger batches where it runs this dtype, else native bf16
        pack_linear_layers(native, gemv=True, batches=batch_matmul(getattr(torch, dtype)))
        assert all(m.gemv_weight is not None for m in native.modules() if isinstance(m, PackedLinear))
        native.native_layers = native_decode_layers(native)
        assert (native.native_layers is None) == config.qk_norm
        if preset == "mistral":
            assert {layer.window for layer in native.native_layers} == {config.sliding_window}
        if preset == "qwen2_sliding":  # the first layer attends to everything, the others to a window
            assert [layer.window for layer in native.native_layers][:2] == [0, config.sliding_window]
    expected = decode_steps(pure, pure_backend, config)
    logits = decode_steps(native, native_backend, config)
    assert not torch.equal(logits, torch.zeros_like(logits))
    torch.testing.assert_close(logits, expected, atol=atol, rtol=0)
    if dtype == "float32":
        assert torch.equal(logits.argmax(-1), expected.argmax(-1))


@needs_ops
def test_the_native_kernels_are_off_with_the_pure_pytorch_backend_and_with_the_switch(monkeypatch, tmp_path_factory):
    path = preset_checkpoint(tmp_path_factory, "llama")
    assert load_model(path, TorchAttentionBackend(native_decode=False))[0].fused is None
    monkeypatch.setenv("TESSERA_NATIVE_CPU_KERNELS", "0")
    assert load_model(path, TorchAttentionBackend())[0].fused is None


@pytest.mark.skipif(not gemv_runs(torch.float32), reason="the native GEMV needs AVX2 (or AVX-512) and a C++ compiler")
def test_the_gemv_copy_is_made_only_for_auto_and_when_it_fits_in_memory(monkeypatch, tmp_path_factory, caplog):
    model, _ = load_model(preset_checkpoint(tmp_path_factory, "llama"), TorchAttentionBackend())
    assert use_gemv(model, "auto")
    assert not use_gemv(model, "onednn")  # one copy of the weights, oneDNN's
    copy = packed_linear.linear_weight_bytes(model)
    monkeypatch.setattr(packed_linear, "available_memory", lambda: 4 * copy - 1)
    with caplog.at_level("INFO", logger="tessera.worker"):
        assert not use_gemv(model, "auto")
    assert "would exceed a quarter of the" in caplog.text
    monkeypatch.setattr(packed_linear, "available_memory", lambda: 4 * copy)
    assert use_gemv(model, "auto")


@needs_ops
@pytest.mark.skipif(paged_attention_cpu.load("int8_linear") is None, reason="no native int8 kernel")
@pytest.mark.parametrize("preset", ["llama", "llama_bias"])
def test_an_int8_model_runs_its_layers_natively_with_the_python_layers_results(preset, tmp_path_factory):
    from tessera.worker.models.int8_linear import quantize_linear_layers

    path = preset_checkpoint(tmp_path_factory, preset)
    backend = TorchAttentionBackend()
    model, config = load_model(path, backend)
    quantize_linear_layers(model)
    expected = decode_steps(model, backend, config)  # the Python layers, on the same int8 weights
    model.native_layers = native_decode_layers(model)
    assert model.native_layers is not None and len(model.native_layers[0].weights) == 12
    logits = decode_steps(model, backend, config)
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=0)
    assert torch.equal(logits.argmax(-1), expected.argmax(-1))


@needs_ops
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_the_native_argmax_is_torch_argmax_with_ties_nans_and_infinities(dtype):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(9, 1000, generator=g)
    logits[1, 7] = logits[1, 900] = 50.0  # a tie: the first index
    logits[2, :] = float("-inf")  # all -inf: index 0
    logits[3, 500] = float("inf")
    logits[4, 333] = float("nan")  # a NaN counts as the largest
    logits[5, 999] = 60.0  # in the tail of the vector loop
    logits[6, 0] = 60.0
    logits = logits.to(dtype)  # bf16: many more ties, each still the first index
    out = torch.ops.tessera.argmax_rows(logits)
    assert out.dtype == torch.int64 and torch.equal(out, logits.argmax(dim=-1))
    for vocab in (1, 15, 17, 32000):  # below, at and past one vector of 16
        x = torch.randn(4, vocab, generator=g).to(dtype)
        assert torch.equal(torch.ops.tessera.argmax_rows(x), x.argmax(dim=-1))
    assert torch.equal(torch.ops.tessera.argmax_rows(logits[:, ::2]), logits[:, ::2].argmax(dim=-1))  # strided
    rows = logits[:, :999]  # rows apart, as a padded head narrowed to the vocabulary
    assert torch.equal(torch.ops.tessera.argmax_rows(rows), rows.argmax(dim=-1))


@needs_ops
def test_the_native_softmax_exp_keeps_attention_at_the_pytorch_paths_values():
    """vec_exp.h's exp within float rounding of expf, through the attention kernel's softmax: long contexts, large
    score ranges (a scale of 10 makes most probabilities underflow)."""
    g = torch.Generator().manual_seed(1)
    heads, kv_heads, head_dim, block, blocks = 4, 2, 64, 16, 40  # 64: the AVX-512 path where it runs
    cache = torch.randn(2, blocks, block, kv_heads, head_dim, generator=g)
    q = torch.randn(3, heads, head_dim, generator=g)
    tables = torch.stack([torch.randperm(blocks, generator=g)[:12] for _ in range(3)]).to(torch.int32)
    lens = torch.tensor([1, 100, 190], dtype=torch.int32)
    for scale in (head_dim**-0.5, 10.0):
        out = torch.ops.tessera.paged_decode_attention(q, cache[0], cache[1], tables, lens, scale, 0)
        for r in range(3):
            n = int(lens[r])
            keys = cache[0][tables[r].long()].flatten(0, 1)[:n].repeat_interleave(heads // kv_heads, dim=1)
            values = cache[1][tables[r].long()].flatten(0, 1)[:n].repeat_interleave(heads // kv_heads, dim=1)
            p = torch.softmax(torch.einsum("hd,thd->ht", q[r], keys) * scale, dim=-1)
            torch.testing.assert_close(out[r], torch.einsum("ht,thd->hd", p, values), atol=2e-5, rtol=1e-4)


@needs_ops
def test_greedy_sampling_takes_the_native_argmax_on_the_cpu(monkeypatch):
    from tessera.sampling_params import SamplingParams
    from tessera.worker.sampler import Sampler, SamplingRow

    calls = []
    real = torch.ops.tessera.argmax_rows

    class Spy:
        def __getattr__(self, name):
            return getattr(torch.ops.tessera, name)

        @staticmethod
        def argmax_rows(logits):
            calls.append(logits.shape)
            return real(logits)

    logits = torch.randn(3, 300)
    rows = [SamplingRow(SamplingParams(temperature=0.0), [], []) for _ in range(3)]
    monkeypatch.setattr(torch.ops, "tessera", Spy())
    out = Sampler(300, [2])(logits, rows)
    assert calls == [(3, 300)] and torch.equal(out.token_ids, logits.argmax(dim=-1))


def test_available_memory_respects_a_containers_cgroup_limit(monkeypatch, tmp_path):
    (tmp_path / "max").write_text("1073741824\n")  # a 1 GiB limit, 768 MiB of it in use
    (tmp_path / "current").write_text(str(768 << 20))
    monkeypatch.setattr(packed_linear, "CGROUP_MEMORY_FILES", ((tmp_path / "max", tmp_path / "current"),))
    assert packed_linear.available_memory() == 256 << 20
    (tmp_path / "max").write_text("max\n")  # no limit: the machine's free memory
    assert packed_linear.available_memory() > 256 << 20
    monkeypatch.setattr(packed_linear, "CGROUP_MEMORY_FILES", ((tmp_path / "none", tmp_path / "none"),))
    assert packed_linear.available_memory() > 256 << 20


@needs_ops
@pytest.mark.skipif(not gemv_runs(torch.float32), reason="the native decoder layer needs the GEMV")
@pytest.mark.parametrize("dtype, atol", [("float32", 1e-4), ("bfloat16", 0.25)])
def test_an_int8_kv_cache_gets_the_same_rows_and_logits_from_the_native_layer_as_from_python(dtype, atol,
                                                                                           tmp_path_factory):
    """decode_layer quantizes each token's keys and values as attention/int8_kv.py does (bit for bit: the same
    IEEE steps), and the native attention reads them as the PyTorch path's dequantized copy."""
    from tessera.worker.attention import int8_kv

    path = preset_checkpoint(tmp_path_factory, "llama")
    pure_backend, native_backend = TorchAttentionBackend(native_decode=False), TorchAttentionBackend()
    pure, config = load_model(path, pure_backend, dtype=dtype)
    native, _ = load_model(path, native_backend, dtype=dtype)
    pack_linear_layers(native, gemv=True, batches=batch_matmul(getattr(torch, dtype)))
    native.native_layers = native_decode_layers(native)
    assert native.native_layers is not None

    def int8_caches(model, backend):
        shape = backend.kv_cache_shape(NUM_BLOCKS, BLOCK_SIZE, config.num_key_value_heads,
                                       int8_kv.row_width(config.head_dim))
        return [torch.zeros(shape, dtype=torch.int8) for _ in range(config.num_hidden_layers)]

    pure_caches, native_caches = int8_caches(pure, pure_backend), int8_caches(native, native_backend)
    expected = decode_steps(pure, pure_backend, config, kv_caches=pure_caches)
    logits = decode_steps(native, native_backend, config, kv_caches=native_caches)
    torch.testing.assert_close(logits, expected, atol=atol, rtol=0)
    # The same rows where the same keys went in. The GEMV's sums round differently from oneDNN's: in float32 that
    # moves a value across a rounding boundary at most (one step); bf16 keys differ by an ulp or so.
    for ours, theirs in zip(native_caches, pure_caches):
        assert ours.abs().sum() > 0
        if dtype == "float32":
            assert (ours[..., :-4].int() - theirs[..., :-4].int()).abs().max() <= 1
        torch.testing.assert_close(int8_kv.dequantize(ours, torch.float32), int8_kv.dequantize(theirs, torch.float32),
                                   rtol=0.02, atol=0.02 if dtype == "float32" else 0.1)
    # ... and within int8's error of the model on a cache in its own dtype
    torch.testing.assert_close(logits, decode_steps(pure, pure_backend, config), atol=0.5 if dtype == "float32" else 1.0,
                               rtol=0)


@needs_ops
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("int8", [False, True], ids=["cache-dtype", "cache-int8"])
def test_the_native_kv_write_is_bit_for_bit_the_pytorch_write(dtype, int8):
    """torch.ops.tessera.write_kv_ against attention/torch_backend.py's write_kv (and int8_kv.quantize), on k and v
    that are strided views of one qkv row, as the layers hand them over; a zero row and exact halves included."""
    from tessera.worker.attention import int8_kv
    from tessera.worker.attention.torch_backend import write_kv

    g = torch.Generator().manual_seed(7)
    tokens, heads, head_dim = 70, 2, 64  # more tokens than the op's parallel grain
    qkv = (torch.randn(tokens, 4 * heads * head_dim, generator=g) * 3).to(dtype)
    qkv[3] = 0
    qkv[5, 2 * heads * head_dim:] = torch.arange(-63.5, 64.5, 1.0).repeat(2 * heads)[: 2 * heads * head_dim].to(dtype)
    k = qkv[:, 2 * heads * head_dim:3 * heads * head_dim].view(tokens, heads, head_dim)
    v = qkv[:, 3 * heads * head_dim:].view(tokens, heads, head_dim)
    row = int8_kv.row_width(head_dim) if int8 else head_dim
    shape = (2, 12, 8, heads, row)
    ours, theirs = (torch.zeros(shape, dtype=torch.int8 if int8 else dtype) for _ in range(2))
    slots = torch.randperm(96, generator=g)[:tokens]
    torch.ops.tessera.write_kv_(k, v, ours, slots)
    write_kv(k, v, theirs, slots)
    assert torch.equal(ours, theirs) and ours.abs().sum() > 0
    with pytest.raises(RuntimeError, match="outside the cache"):
        torch.ops.tessera.write_kv_(k, v, ours, slots + 96)
    with pytest.raises(RuntimeError, match="head_dim \\+ 4"):
        torch.ops.tessera.write_kv_(k, v, torch.zeros(2, 12, 8, heads, head_dim, dtype=torch.int8), slots)
