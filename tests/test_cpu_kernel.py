"""The native CPU paged decode-attention kernel (kernels/paged_attention_cpu.cpp) against the PyTorch reference
(kernels/reference.py), on its own and inside the torch backend.

The kernel accumulates in float32 whatever the cache dtype, so float32 agrees to 1e-5 (the same sums in another
order) and bfloat16 to 1.6e-2, a few units in the last place at the output's magnitude (~1).
"""
from __future__ import annotations

import random

import pytest
import torch

from tessera.worker.attention import int8_kv
from tessera.worker.attention.backend import AttentionMetadata
from tessera.worker.attention.torch_backend import TorchAttentionBackend
from tessera.kernels import paged_attention_cpu
from tessera.kernels.reference import paged_attention_ref

op = paged_attention_cpu.load()
pytestmark = pytest.mark.skipif(op is None, reason="the native CPU kernel could not be built (see the log)")

TOLERANCE = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2)}
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
# (query heads, KV heads, head dim, block size): MHA, GQA, a group of 3 with odd sizes, MQA; and for the AVX-512
# path (head_dim 64 and 128), which pairs the heads of a KV head when their group is even, one of each kind.
LAYOUTS = [(4, 4, 64, 16), (8, 2, 128, 16), (6, 3, 64, 16), (3, 1, 128, 8), (6, 2, 80, 5), (4, 1, 32, 4)]


def decode_batch(seq_lens, num_heads, num_kv_heads, head_dim, block_size, dtype, seed=0):
    """Random q and caches; tables drawn from a shuffled pool (out of order, some blocks unowned)."""
    g = torch.Generator().manual_seed(seed)
    needed = [-(-s // block_size) for s in seq_lens]
    num_blocks = sum(needed) + 3
    pool = torch.randperm(num_blocks, generator=g).tolist()
    tables = torch.zeros(len(seq_lens), max(needed), dtype=torch.int32)
    for i, n in enumerate(needed):
        tables[i, :n] = torch.tensor([pool.pop() for _ in range(n)], dtype=torch.int32)
    kv_cache = torch.randn(2, num_blocks, block_size, num_kv_heads, head_dim, generator=g).to(dtype)
    q = torch.randn(len(seq_lens), num_heads, head_dim, generator=g).to(dtype)
    return q, kv_cache, tables, torch.tensor(seq_lens, dtype=torch.int32)


def reference(q, kv_cache, tables, seq_lens, scale, window=None):
    query_start_loc = torch.arange(len(seq_lens) + 1, dtype=torch.int32)
    return paged_attention_ref(q, kv_cache[0], kv_cache[1], query_start_loc, seq_lens, tables, scale, window)


@DTYPES
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda layout: "h{}-kv{}-d{}-bs{}".format(*layout))
def test_cpu_kernel_decode_matches_reference(dtype, layout):
    num_heads, num_kv_heads, head_dim, block_size = layout
    # One token, a partial block, exactly one block, many blocks with a ragged end; sorted, as the worker sends them.
    seq_lens = [1, 3, block_size, 2 * block_size + 1, 77, 300]
    q, kv_cache, tables, lens = decode_batch(seq_lens, *layout, dtype)
    scale = head_dim**-0.5
    ours = op(q, kv_cache[0], kv_cache[1], tables, lens, scale, 0)
    assert ours.dtype == dtype and ours.shape == q.shape
    torch.testing.assert_close(ours, reference(q, kv_cache, tables, lens, scale), **TOLERANCE[dtype])


@DTYPES
@pytest.mark.parametrize("head_dim", [32, 64])  # the portable loops, the AVX-512 path
def test_cpu_kernel_sliding_window(dtype, head_dim):
    q, kv_cache, tables, lens = decode_batch([2, 9, 30, 45], 4, 2, head_dim, 8, dtype, seed=1)
    for window in (1, 8, 21, 100):
        ours = op(q, kv_cache[0], kv_cache[1], tables, lens, 0.3, window)
        torch.testing.assert_close(ours, reference(q, kv_cache, tables, lens, 0.3, window), **TOLERANCE[dtype])


@DTYPES
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda layout: "h{}-kv{}-d{}-bs{}".format(*layout))
def test_cpu_kernel_reads_an_int8_cache_as_the_values_it_stands_for(dtype, layout):
    """An int8 cache (attention/int8_kv.py) against the reference on its dequantized float32 values: the kernel
    takes each row's scale out of the score and the value weight, the same sums otherwise."""
    num_heads, num_kv_heads, head_dim, block_size = layout
    seq_lens = [1, 3, block_size, 2 * block_size + 1, 77, 300]
    q, kv_cache, tables, lens = decode_batch(seq_lens, *layout, torch.float32, seed=5)
    rows = int8_kv.quantize(kv_cache)
    assert rows.dtype == torch.int8 and rows.shape[-1] == head_dim + 4
    scale = head_dim**-0.5
    ours = op(q.to(dtype), rows[0], rows[1], tables, lens, scale, 0)
    assert ours.dtype == dtype and ours.shape == q.shape
    expected = reference(q.to(dtype).float(), int8_kv.dequantize(rows, torch.float32), tables, lens, scale)
    torch.testing.assert_close(ours.float(), expected, **TOLERANCE[dtype])
    for window in (1, 21):
        torch.testing.assert_close(op(q.to(dtype), rows[0], rows[1], tables, lens, scale, window).float(),
                                   reference(q.to(dtype).float(), int8_kv.dequantize(rows, torch.float32), tables,
                                             lens, scale, window), **TOLERANCE[dtype])


@DTYPES
@pytest.mark.parametrize("head_dim", [32, 64])  # the portable loops, the AVX-512 path
def test_cpu_kernel_reads_queries_in_place_from_a_wider_projection(dtype, head_dim):
    # The model hands the kernel q as a view of the qkv projection's output: tokens apart, heads contiguous.
    q, kv_cache, tables, lens = decode_batch([5, 40, 77], 4, 2, head_dim, 16, dtype, seed=3)
    qkv = torch.cat([q.flatten(1), torch.randn(3, 2 * 2 * head_dim).to(dtype)], dim=1)
    view = qkv[:, : 4 * head_dim].view(3, 4, head_dim)
    assert not view.is_contiguous()
    ours = op(view, kv_cache[0], kv_cache[1], tables, lens, head_dim**-0.5, 0)
    assert ours.is_contiguous()
    assert torch.equal(ours, op(q, kv_cache[0], kv_cache[1], tables, lens, head_dim**-0.5, 0))


def test_cpu_kernel_many_threads_and_uneven_lengths_match_one_thread():
    rng = random.Random(4)
    seq_lens = sorted(rng.randint(1, 400) for _ in range(37))
    q, kv_cache, tables, lens = decode_batch(seq_lens, 8, 2, 64, 16, torch.float32, seed=2)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = op(q, kv_cache[0], kv_cache[1], tables, lens, 0.125, 0)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(op(q, kv_cache[0], kv_cache[1], tables, lens, 0.125, 0), one)  # same math per item


@DTYPES
@pytest.mark.parametrize("int8_cache", [False, True], ids=["cache-dtype", "cache-int8"])
def test_long_contexts_of_fewer_requests_than_threads_are_split_and_combined(dtype, int8_cache):
    """One or a few requests: each long context is split into parts of >= 256 tokens across the threads (each
    part's own max and sum, then combined). Four threads here, so one request of 1,500 tokens runs in four parts,
    two requests in two each, with and without a sliding window; against the reference and against one thread."""
    threads = torch.get_num_threads()
    for seq_lens in ([1500], [300, 1100], [700, 40, 2000]):
        q, kv_cache, tables, lens = decode_batch(seq_lens, 8, 2, 64, 16, torch.float32, seed=len(seq_lens))
        rows = int8_kv.quantize(kv_cache) if int8_cache else kv_cache.to(dtype)
        values = int8_kv.dequantize(rows, torch.float32) if int8_cache else rows.float()
        for window in (0, 600):
            try:
                torch.set_num_threads(4)
                split = op(q.to(dtype), rows[0], rows[1], tables, lens, 0.125, window)
                torch.set_num_threads(1)
                whole = op(q.to(dtype), rows[0], rows[1], tables, lens, 0.125, window)
            finally:
                torch.set_num_threads(threads)
            expected = reference(q.to(dtype).float(), values, tables, lens, 0.125, window or None)
            torch.testing.assert_close(split.float(), expected, **TOLERANCE[dtype])
            torch.testing.assert_close(split, whole, **TOLERANCE[dtype])  # the same but for the sums' order


def test_cpu_kernel_rejects_bad_inputs_with_a_message():
    q, kv_cache, tables, lens = decode_batch([5, 9], 4, 2, 32, 4, torch.float32)
    with pytest.raises(RuntimeError, match="int32"):
        op(q, kv_cache[0], kv_cache[1], tables.long(), lens, 1.0, 0)
    with pytest.raises(RuntimeError, match="q.s dtype, or int8"):
        op(q.double(), kv_cache[0], kv_cache[1], tables, lens, 1.0, 0)
    with pytest.raises(RuntimeError, match="inconsistent shapes"):
        op(q[:, :3], kv_cache[0], kv_cache[1], tables, lens, 1.0, 0)
    with pytest.raises(RuntimeError, match="inconsistent shapes"):  # int8 rows carry 4 bytes of scale
        op(q, kv_cache[0].to(torch.int8), kv_cache[1].to(torch.int8), tables, lens, 1.0, 0)
    with pytest.raises(RuntimeError, match="q's dtype, or int8"):
        op(q, kv_cache[0].bfloat16(), kv_cache[1].bfloat16(), tables, lens, 1.0, 0)


@DTYPES
@pytest.mark.parametrize("int8_cache", [False, True], ids=["cache-dtype", "cache-int8"])
def test_cpu_kernel_in_the_torch_backend_matches_the_pure_pytorch_path(dtype, int8_cache):
    """A mixed step (three decodes, two prefill chunks): the native decodes change nothing but speed; with an
    int8 cache both write the same rows and the prefill chunks read them dequantized."""
    requests = [(1, 9), (1, 26), (1, 40), (7, 19), (12, 12)]  # (query length, context after the step)
    block_size, num_kv_heads, head_dim = 4, 2, 16
    g = torch.Generator().manual_seed(3)
    needed = [-(-s // block_size) for _, s in requests]
    pool = torch.randperm(sum(needed) + 2, generator=g).tolist()
    tables = torch.zeros(len(requests), max(needed), dtype=torch.int32)
    slots, positions_of = [], []
    for i, ((q_len, seq_len), n) in enumerate(zip(requests, needed)):
        tables[i, :n] = torch.tensor([pool.pop() for _ in range(n)], dtype=torch.int32)
        for p in range(seq_len - q_len, seq_len):
            slots.append(int(tables[i, p // block_size]) * block_size + p % block_size)
            positions_of.append(p)
    tokens = len(slots)
    meta = AttentionMetadata(
        query_start_loc=torch.tensor([0] + [q for q, _ in requests]).cumsum(0).to(torch.int32),
        seq_lens=torch.tensor([s for _, s in requests], dtype=torch.int32), block_tables=tables,
        slot_mapping=torch.tensor(slots), num_decodes=3, query_lens_cpu=[q for q, _ in requests],
        seq_lens_cpu=[s for _, s in requests],
    )
    q = torch.randn(tokens, 4, head_dim, generator=g).to(dtype)
    k, v = (torch.randn(tokens, num_kv_heads, head_dim, generator=g).to(dtype) for _ in range(2))
    cache = torch.randn(2, len(pool) + sum(needed), block_size, num_kv_heads, head_dim, generator=g).to(dtype)
    if int8_cache:
        cache = int8_kv.quantize(cache)

    native, plain = TorchAttentionBackend(), TorchAttentionBackend(native_decode=False)
    assert native.native_decode is not None and plain.native_decode is None
    native_cache, plain_cache = cache.clone(), cache.clone()
    for window in (None, 6):
        ours = native.forward(q, k, v, native_cache, meta, 0.25, window)
        expected = plain.forward(q, k, v, plain_cache, meta, 0.25, window)
        torch.testing.assert_close(ours, expected, **TOLERANCE[dtype])
    assert torch.equal(native_cache, plain_cache)


def test_cpu_kernel_can_be_switched_off(monkeypatch):
    monkeypatch.setenv("TESSERA_NATIVE_CPU_KERNELS", "0")
    assert paged_attention_cpu.load() is None
    assert TorchAttentionBackend().native_decode is None


def test_cpu_kernel_loads_past_a_lock_file_left_by_a_killed_build(tmp_path):
    """torch's build lock is a plain file: a build killed mid-way (SIGTERM during a first start) leaves it, and
    torch alone would then wait for it forever. Here a copy of the built cache holds such a file."""
    import os
    import shutil
    import subprocess
    import sys

    built = paged_attention_cpu.build_directory()
    copy = tmp_path / "tessera" / built.name
    shutil.copytree(built, copy)
    (copy / "lock").write_text("")
    (copy / paged_attention_cpu.BUILT).unlink()  # the killed build never finished
    script = "from tessera.kernels import paged_attention_cpu as k; print(k.load() is not None)"
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.split()[-1] == "True", out.stderr[-2000:]
    assert not (copy / "lock").exists()


def test_a_complete_cpu_kernel_build_loads_with_no_compiler(tmp_path):
    """What the CPU image relies on: a kernel built once (there, one per ISA at image build) loads where no
    compiler or ninja can be found; an unfinished build (no stamp) in the same place is not trusted."""
    import os
    import shutil
    import subprocess
    import sys

    built = paged_attention_cpu.build_directory()
    copy = tmp_path / "tessera" / built.name
    shutil.copytree(built, copy)
    script = "from tessera.kernels import paged_attention_cpu as k; print(k.load() is not None)"
    # Only the interpreter's own folder on PATH, and a compiler that does not exist.
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(tmp_path), PATH=os.path.dirname(sys.executable),
               CXX="/nonexistent/c++")
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.split()[-1] == "True", out.stderr[-2000:]

    (copy / paged_attention_cpu.BUILT).unlink()
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.split()[-1] == "False", out.stderr[-2000:]
    assert "native CPU paged_attention kernel unavailable" in out.stderr


def test_kernels_for_another_isa_are_built_without_being_loaded(tmp_path):
    """The CPU image builds every ISA's kernels on whatever machine builds it; an AVX-512 library loaded on an
    AVX2 machine dies of SIGILL, so a build for an ISA other than this CPU's only compiles (and stamps) it."""
    import os
    import subprocess
    import sys

    other = "AVX2" if torch.backends.cpu.get_cpu_capability() == "AVX512" else "AVX512"
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(tmp_path))
    out = subprocess.run([sys.executable, "-m", "tessera.kernels.paged_attention_cpu", other], env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    for kernel in paged_attention_cpu.KERNELS:
        assert f"native CPU {kernel} kernel built ({other}" in out.stderr
        directory = tmp_path / "tessera" / paged_attention_cpu.build_directory(other, kernel).name
        assert (directory / paged_attention_cpu.BUILT).exists()
        assert (directory / f"tessera_{directory.name}.so").stat().st_size > 0
