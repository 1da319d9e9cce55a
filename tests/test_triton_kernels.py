"""The Triton kernels against their PyTorch references (kernels/reference.py), and the Triton backend against the
torch backend, kernel by kernel and through the whole engine.

Without a GPU everything runs in Triton's interpreter (TRITON_INTERPRET=1: the kernels execute as numpy on the
CPU, program by program). That is slow, so shapes are small, but each still crosses the boundaries that matter:
query tiles, context steps and blocks. With a GPU the same tests run the compiled kernels on it.

Tolerances: float32 compares to 1e-5 (the same math in a different order); bfloat16 to 1.6e-2, about four units
in the last place at the output's magnitude (~1), since the kernel rounds the softmax weights to bfloat16 before
multiplying by the values, as FlashAttention does, and the reference does not.
"""
from __future__ import annotations

import os
import random
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

if not torch.cuda.is_available():
    # Read when the kernels are defined, so it must be set before they are imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton", reason="triton is not installed (pip install -e .[test])")

from tiny_checkpoints import preset_checkpoint  # noqa: E402

from tessera.worker.attention.backend import AttentionMetadata  # noqa: E402
from tessera.worker.attention.torch_backend import TorchAttentionBackend  # noqa: E402
from tessera.worker.attention.triton_backend import TritonAttentionBackend  # noqa: E402
from tessera.worker.cuda_graphs import CudaGraphRunner  # noqa: E402
from tessera.engine.engine import EngineConfig, LLMEngine  # noqa: E402
from tessera.engine.local_worker import worker_config  # noqa: E402
from tessera.worker.models.rope import RotaryEmbedding, apply_rotary  # noqa: E402
from tessera.sampling_params import SamplingParams  # noqa: E402
from tessera.worker.worker import Worker  # noqa: E402
from tessera.kernels.kv_write import kv_write  # noqa: E402
from tessera.kernels.paged_attention import paged_attention  # noqa: E402
from tessera.kernels.reference import apply_rotary_ref, kv_write_ref, paged_attention_ref, rms_norm_ref  # noqa: E402
from tessera.kernels.rms_norm import rms_norm  # noqa: E402
from tessera.kernels.rotary import apply_rotary_  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCE = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2)}
# Triton's interpreter (3.9) truncates float32 -> bfloat16 where a GPU rounds to nearest: bit-exact checks of
# bfloat16 results hold on a GPU only.
EXACT_ROUNDING = DEVICE == "cuda"
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])

# (query length, context length after the step): decodes over a short, a one-block and a several-block context;
# prefill chunks after a cached prefix and from scratch; one chunk longer than any query tile (64 rows).
MIXED = [(1, 1), (1, 17), (1, 33), (5, 21), (3, 3), (70, 83)]


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def make_batch(requests, num_heads, num_kv_heads, head_dim, block_size, dtype, seed=0):
    """Random q and caches; each request's blocks drawn from a shuffled pool, so tables are out of order."""
    g = torch.Generator().manual_seed(seed)
    needed = [cdiv(seq_len, block_size) for _, seq_len in requests]
    num_blocks = sum(needed) + 5  # some blocks nobody owns
    pool = torch.randperm(num_blocks, generator=g).tolist()
    block_tables = torch.zeros(len(requests), max(needed), dtype=torch.int32)
    for i, n in enumerate(needed):
        block_tables[i, :n] = torch.tensor([pool.pop() for _ in range(n)])
    q_lens = [q_len for q_len, _ in requests]
    cache_shape = (num_blocks, block_size, num_kv_heads, head_dim)
    return SimpleNamespace(
        q=torch.randn(sum(q_lens), num_heads, head_dim, generator=g).to(DEVICE, dtype),
        key_cache=torch.randn(cache_shape, generator=g).to(DEVICE, dtype),
        value_cache=torch.randn(cache_shape, generator=g).to(DEVICE, dtype),
        query_start_loc=torch.tensor([0] + q_lens).cumsum(0).to(DEVICE, torch.int32),
        seq_lens=torch.tensor([s for _, s in requests], dtype=torch.int32, device=DEVICE),
        block_tables=block_tables.to(DEVICE),
        max_query_len=max(q_lens),
    )


def attend(b, scale, window=None):
    ours = paged_attention(b.q, b.key_cache, b.value_cache, b.query_start_loc, b.seq_lens, b.block_tables,
                           b.max_query_len, scale, window)
    ref = paged_attention_ref(b.q.cpu(), b.key_cache.cpu(), b.value_cache.cpu(), b.query_start_loc.cpu(),
                              b.seq_lens.cpu(), b.block_tables.cpu(), scale, window)
    return ours.cpu(), ref


# (query heads, KV heads, head dim, block size): MHA; Llama-3-style GQA; a group of 3 with a head dim and a block
# size that are not powers of two; MQA with the tiny Qwen3 head dim.
LAYOUTS = [(4, 4, 64, 16), (8, 2, 128, 16), (6, 2, 80, 5), (4, 1, 32, 4)]


@DTYPES
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda layout: "h{}-kv{}-d{}-bs{}".format(*layout))
def test_triton_paged_attention_mixed_batch(dtype, layout):
    num_heads, num_kv_heads, head_dim, block_size = layout
    b = make_batch(MIXED, num_heads, num_kv_heads, head_dim, block_size, dtype)
    ours, ref = attend(b, head_dim**-0.5)
    torch.testing.assert_close(ours, ref, **TOLERANCE[dtype])


@DTYPES
def test_triton_paged_attention_sliding_window_and_any_request_order(dtype):
    # Prefills before decodes here: the kernel does not rely on the worker's decodes-first order.
    requests = [(40, 45), (1, 30), (2, 9), (1, 3)]
    b = make_batch(requests, 4, 2, 32, 8, dtype, seed=1)
    for window in (1, 8, 21):
        ours, ref = attend(b, 0.3, window)
        torch.testing.assert_close(ours, ref, **TOLERANCE[dtype])


@DTYPES
def test_triton_backend_matches_torch_backend(dtype):
    """Same metadata, same cache layout: the KV write and the attention of both backends agree."""
    requests = [(1, 9), (1, 26), (7, 19), (12, 12)]  # decodes first, as the worker lays them out
    b = make_batch(requests, 4, 2, 16, 4, dtype, seed=2)
    slots = []
    for i, (q_len, seq_len) in enumerate(requests):
        slots += [b.block_tables[i, p // 4].item() * 4 + p % 4 for p in range(seq_len - q_len, seq_len)]
    meta = AttentionMetadata(b.query_start_loc, b.seq_lens, b.block_tables, torch.tensor(slots, device=DEVICE),
                             num_decodes=2, query_lens_cpu=[q for q, _ in requests],
                             seq_lens_cpu=[s for _, s in requests])
    # k and v as the model hands them over: strided views of one fused projection.
    kv = torch.randn(len(slots), 2, 2 * 16, device=DEVICE).to(dtype)
    k, v = kv[..., :16], kv[..., 16:]
    kv_cache = torch.stack([b.key_cache, b.value_cache])
    ours = TritonAttentionBackend().forward(b.q, k, v, kv_cache, meta, 0.25)
    expected_cache = kv_cache.cpu().clone()
    expected = TorchAttentionBackend().forward(b.q.cpu(), k.cpu(), v.cpu(), expected_cache, _on_cpu(meta), 0.25)
    assert torch.equal(kv_cache.cpu(), expected_cache)
    torch.testing.assert_close(ours.cpu(), expected, **TOLERANCE[dtype])


def _on_cpu(meta: AttentionMetadata) -> AttentionMetadata:
    return AttentionMetadata(meta.query_start_loc.cpu(), meta.seq_lens.cpu(), meta.block_tables.cpu(),
                             meta.slot_mapping.cpu(), meta.num_decodes, meta.query_lens_cpu, meta.seq_lens_cpu)


@DTYPES
def test_triton_kv_write_by_slot_mapping(dtype):
    num_blocks, block_size, num_kv_heads, head_dim = 9, 5, 3, 24
    g = torch.Generator().manual_seed(3)
    slots = torch.randperm(num_blocks * block_size, generator=g)[:20]
    slots[[4, 11]] = -1  # padding rows: written nowhere
    qkv = torch.randn(20, num_kv_heads, 3 * head_dim, generator=g).to(dtype)
    k, v = qkv[..., head_dim : 2 * head_dim], qkv[..., 2 * head_dim :]  # strided views, like the model's
    caches = torch.randn(2, num_blocks, block_size, num_kv_heads, head_dim, generator=g).to(dtype)
    ours = caches.to(DEVICE)
    kv_write(k.to(DEVICE), v.to(DEVICE), ours[0], ours[1], slots.to(DEVICE))
    kv_write_ref(k, v, caches[0], caches[1], slots)
    assert torch.equal(ours.cpu(), caches)  # a copy: bit for bit


def test_kernel_offsets_beyond_32_bits():
    """Block id * block stride past 2**32 elements, where 32-bit offset arithmetic would wrap around.

    The caches are real tensors of 2**32 + a few blocks' elements (8 GiB of bfloat16 each), but the memory is
    only reserved: Linux gives a page physical memory when it is first written, and the test writes only the
    handful of blocks it uses (torch.empty never touches the rest, and neither does the interpreter's argument
    handling). No view tricks or special launcher arguments are needed, so the kernels run exactly as in
    production. Blocks sit at ids from 2**32 / stride up, where a 32-bit offset would wrap to the start of the
    same cache: a bug reads or writes the wrong, still-mapped block and fails the comparison (it does not crash).
    On a GPU the 16 GiB are really allocated; the test skips if they do not fit.
    """
    block_size, num_kv_heads, head_dim = 16, 1, 16
    first = 2**32 // (block_size * num_kv_heads * head_dim)
    shape = (first + 8, block_size, num_kv_heads, head_dim)
    try:
        key_cache = torch.empty(shape, dtype=torch.bfloat16, device=DEVICE)
        value_cache = torch.empty(shape, dtype=torch.bfloat16, device=DEVICE)
    except (RuntimeError, torch.OutOfMemoryError) as e:
        pytest.skip(f"cannot reserve 2 x 8 GiB of address space here: {e}")
    for cache in (key_cache, value_cache):
        cache[:8].zero_()  # where a wrapped offset would land: zeros, so a wrong read shows
    block_tables = torch.tensor([[first + 5, first + 1, first + 7], [first + 2, 0, 0]], dtype=torch.int32)
    seq_lens, q_lens = [40, 9], [1, 9]
    slots = torch.tensor([block_tables[i, p // block_size].item() * block_size + p % block_size
                          for i, seq_len in enumerate(seq_lens) for p in range(seq_len)])
    g = torch.Generator().manual_seed(4)
    k, v = (torch.randn(len(slots), num_kv_heads, head_dim, generator=g).bfloat16() for _ in range(2))

    # The whole context is written in one go (a prefill of every position), then read back through the table.
    kv_write(k.to(DEVICE), v.to(DEVICE), key_cache, value_cache, slots.to(DEVICE))
    assert torch.equal(key_cache.flatten(0, 1)[slots.to(DEVICE)].cpu(), k)
    assert torch.equal(value_cache.flatten(0, 1)[slots.to(DEVICE)].cpu(), v)

    q = torch.randn(sum(q_lens), 2, head_dim, generator=g).bfloat16()
    query_start_loc = torch.tensor([0, 1, 10], dtype=torch.int32)
    seq_lens_t = torch.tensor(seq_lens, dtype=torch.int32)
    ours = paged_attention(q.to(DEVICE), key_cache, value_cache, query_start_loc.to(DEVICE), seq_lens_t.to(DEVICE),
                           block_tables.to(DEVICE), max(q_lens), 0.25)
    # The reference over small copies of just the blocks in use, renumbered.
    used = block_tables.unique()
    renumbered = torch.searchsorted(used, block_tables).to(torch.int32)
    small_k, small_v = key_cache[used.to(DEVICE).long()].cpu(), value_cache[used.to(DEVICE).long()].cpu()
    ref = paged_attention_ref(q, small_k, small_v, query_start_loc, seq_lens_t, renumbered, 0.25)
    torch.testing.assert_close(ours.cpu(), ref, **TOLERANCE[torch.bfloat16])


@DTYPES
@pytest.mark.parametrize("with_residual", [True, False], ids=["residual", "no-residual"])
def test_triton_fused_add_rms_norm(dtype, with_residual):
    g = torch.Generator().manual_seed(5)
    x, residual = (torch.randn(13, 96, generator=g).mul(3).to(dtype) for _ in range(2))
    weight = torch.randn(96, generator=g).add(1).to(dtype)
    out, new_residual = rms_norm(x.to(DEVICE), weight.to(DEVICE), 1e-6, residual.to(DEVICE) if with_residual else None)
    ref_out, ref_residual = rms_norm_ref(x, weight, 1e-6, residual if with_residual else None)
    if EXACT_ROUNDING or dtype == torch.float32:
        assert torch.equal(new_residual.cpu(), ref_residual)  # the add rounds once, like torch's
    torch.testing.assert_close(new_residual.cpu(), ref_residual, **TOLERANCE[dtype])
    # Within a unit in the last place: the kernel sums the squares in another order than torch's mean.
    torch.testing.assert_close(out.cpu(), ref_out, **TOLERANCE[dtype])


@DTYPES
def test_triton_rotary_in_place(dtype):
    head_dim, num_heads, num_kv_heads = 32, 4, 2
    rope = RotaryEmbedding(head_dim, 64, 10000.0, None)
    g = torch.Generator().manual_seed(6)
    positions = torch.randint(0, 64, (11,), generator=g)
    qkv = torch.randn(11, (num_heads + 2 * num_kv_heads) * head_dim, generator=g).to(dtype)
    q = qkv[:, : num_heads * head_dim].view(11, num_heads, head_dim)  # strided views of the fused projection
    k = qkv[:, num_heads * head_dim : (num_heads + num_kv_heads) * head_dim].view(11, num_kv_heads, head_dim)
    ref_q, ref_k = apply_rotary_ref(q, k, positions, rope.cos_sin_cache)
    eager = rope(positions, dtype)
    eager_q, eager_k = apply_rotary(q, *eager), apply_rotary(k, *eager)

    ours = qkv.to(DEVICE)
    ours_q = ours[:, : num_heads * head_dim].view(11, num_heads, head_dim)
    ours_k = ours[:, num_heads * head_dim : (num_heads + num_kv_heads) * head_dim].view(11, num_kv_heads, head_dim)
    apply_rotary_(ours_q, ours_k, positions.to(DEVICE), rope.cos_sin_cache.to(DEVICE))
    same = dict(atol=1e-6, rtol=1e-6) if EXACT_ROUNDING or dtype == torch.float32 else TOLERANCE[dtype]
    torch.testing.assert_close(ours_q.cpu(), ref_q, **same)
    torch.testing.assert_close(ours_k.cpu(), ref_k, **same)
    torch.testing.assert_close(ours_q.cpu(), eager_q, **TOLERANCE[dtype])  # and near the model's eager path
    torch.testing.assert_close(ours_k.cpu(), eager_k, **TOLERANCE[dtype])
    v_start = (num_heads + num_kv_heads) * head_dim
    assert torch.equal(ours[:, v_start:].cpu(), qkv[:, v_start:])  # v untouched


@pytest.mark.skipif(DEVICE == "cuda", reason="on a GPU the other tests compile and run the kernels for real")
def test_triton_kernels_compile_for_gpus():
    """The interpreter runs code a GPU compiler would reject (a tl.dot under 16x16, too much shared memory...):
    compile every kernel for sm_80 and sm_90, which needs no GPU since the triton wheel ships ptxas."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-m", "tessera.kernels.compile_check", "80", "90"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr[-5000:]
    assert done.stdout.count(": ok") == 12


# --- The engine end to end: greedy tokens with the Triton backend equal those with the torch backend. ---

def engine_config(model_dir, **overrides) -> EngineConfig:
    # A 16-token budget chunks every prompt longer than that; 4-token blocks give every request several.
    fields = dict(model=str(model_dir), dtype="float32", block_size=4, kv_cache_memory=1 << 22,
                  max_num_batched_tokens=16)
    return EngineConfig(**{**fields, **overrides})


def requests(seed: int):
    rng = random.Random(seed)
    prompts = [[rng.randrange(4, 256) for _ in range(n)] for n in (1, 9, 23, 40, 6)]
    prompts.append(prompts[3][:20] + [7, 8])  # shares the prefix cache with the fourth
    params = [SamplingParams(temperature=0.0, max_tokens=rng.randint(3, 8), ignore_eos=True) for _ in prompts]
    return prompts, params


def torch_backend_tokens(model_dir, prompts, params):
    config = engine_config(model_dir)
    engine = LLMEngine(config, worker=Worker(worker_config(config), TorchAttentionBackend()))
    return [c.token_ids for c in engine.generate(prompts, params)]


def spy(monkeypatch, module, name: str) -> list[int]:
    """Wrap module.name so that every call is counted (and still runs the real function)."""
    calls, real = [], getattr(module, name)

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)
    monkeypatch.setattr(module, name, counted)
    return calls


# GQA; a sliding window shorter than the prompts; per-head q/k norm before the rotary kernel; tied embeddings.
@pytest.mark.parametrize("preset", ["llama", "mistral", "qwen3", "llama_tied"])
def test_triton_backend_engine_greedy_tokens_match_torch_backend(tmp_path_factory, monkeypatch, preset):
    import tessera.kernels.rms_norm
    import tessera.kernels.rotary
    model_dir = preset_checkpoint(tmp_path_factory, preset)
    prompts, params = requests(seed=7)
    config = engine_config(model_dir, device=DEVICE)
    # The model picks the fused kernels when it is built, so spy on them before.
    norm_calls = spy(monkeypatch, tessera.kernels.rms_norm, "rms_norm")
    rotary_calls = spy(monkeypatch, tessera.kernels.rotary, "apply_rotary_")
    # On a GPU the worker picks the Triton backend (and CUDA graphs) by itself.
    worker = Worker(worker_config(config), None if DEVICE == "cuda" else TritonAttentionBackend())
    assert worker.attn_backend.name == "triton"
    got = LLMEngine(config, worker=worker).generate(prompts, params)
    assert norm_calls and rotary_calls  # the model ran the fused RMSNorm and rotary kernels
    norm_calls.clear()
    rotary_calls.clear()
    assert [c.token_ids for c in got] == torch_backend_tokens(model_dir, prompts, params)
    assert not norm_calls and not rotary_calls  # and the torch backend's model did not


class EagerGraphs(CudaGraphRunner):
    """The graph runner's static buffers and padding, with "replay" running the forward it would have captured.

    No GPU here, so nothing is captured; but every replay reads only the static buffers, exactly as a graph
    would, so what is checked is that the buffers, the padding rows and the worker's hook are right.
    """

    @torch.inference_mode()
    def capture(self) -> None:
        for size in self.batch_sizes:
            self.outputs[size] = self._forward(size)  # all padding rows: must not fail nor write the cache
            self.graphs[size] = SimpleNamespace(replay=lambda size=size: self.outputs[size].copy_(self._forward(size)))


def test_cuda_graph_runner_buffers_and_padding_with_triton_kernels(tmp_path_factory):
    model_dir = preset_checkpoint(tmp_path_factory, "llama")
    prompts, params = requests(seed=8)
    config = engine_config(model_dir)
    worker = Worker(worker_config(config), TritonAttentionBackend())
    cache_before = [c.clone() for c in worker.kv_caches]
    worker.cuda_graphs = EagerGraphs(worker.model, worker.kv_caches, worker.block_size,
                                     worker.model_config.max_model_len, max_batch_size=4)
    worker.cuda_graphs.capture()
    assert all(torch.equal(a, b) for a, b in zip(worker.kv_caches, cache_before))
    assert worker.cuda_graphs.batch_sizes == [1, 2, 4]

    replays = []
    run = worker.cuda_graphs.run
    worker.cuda_graphs.run = lambda *args: replays.append(args[2].num_reqs) or run(*args)
    got = LLMEngine(config, worker=worker).generate(prompts, params)
    assert {3, 4} <= set(replays)  # padded (3 -> 4) and full replays both happened; 5-6 decodes ran eagerly
    assert [c.token_ids for c in got] == torch_backend_tokens(model_dir, prompts, params)
