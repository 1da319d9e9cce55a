"""The prompt attention over the paged cache (kernels/prefill_attention_cpu.cpp) against the PyTorch path it
replaces (gather + SDPA) and against float64, float32 and bf16, and through whole models."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tessera.kernels import paged_attention_cpu

prefill = paged_attention_cpu.load("prefill_attention")
pytestmark = pytest.mark.skipif(prefill is None or not torch.ops.tessera.paged_prefill_available(),
                                reason="the native prompt attention needs AVX512-BF16 and a C++ compiler")


def reference(q, key_cache, value_cache, table, seq_len, scale, window, dtype):
    """SDPA over the gathered context, in `dtype`: query j at position seq_len - q_len + j."""
    block_size = key_cache.shape[1]
    blocks = table[: -(-seq_len // block_size)]
    k = key_cache.index_select(0, blocks).flatten(0, 1)[:seq_len].to(dtype)
    v = value_cache.index_select(0, blocks).flatten(0, 1)[:seq_len].to(dtype)
    q_pos = torch.arange(seq_len - q.shape[0], seq_len).unsqueeze(1)
    k_pos = torch.arange(seq_len).unsqueeze(0)
    mask = (k_pos <= q_pos) & ((k_pos > q_pos - window) if window else True)
    out = F.scaled_dot_product_attention(q.to(dtype).transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                         attn_mask=mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    return out.transpose(0, 1)


CASES = [  # q_len, seq_len, heads, kv_heads, head_dim, block_size, window
    (192, 192, 8, 4, 64, 16, 0),  # a whole prompt
    (37, 37, 8, 4, 64, 16, 0),  # lengths off the 16-token steps
    (20, 100, 8, 2, 64, 16, 0),  # a later chunk: most of the context cached before
    (50, 50, 4, 4, 128, 16, 0),  # no grouping, head_dim 128
    (64, 200, 8, 8, 64, 8, 0),  # cache blocks smaller than a step
    (45, 45, 8, 1, 32, 16, 0),  # one KV head for all, head_dim 32
    (100, 100, 8, 4, 64, 16, 30),  # a sliding window
    (33, 90, 8, 4, 128, 32, 17),  # a window on a later chunk, blocks larger than a step
    (1, 40, 8, 4, 64, 16, 0),  # a one-token chunk
]


@pytest.mark.parametrize("int8_cache", [False, True], ids=["cache-dtype", "cache-int8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("q_len, seq_len, heads, kv_heads, head_dim, block_size, window", CASES)
def test_prompt_attention_is_as_close_to_float64_as_pytorchs_sdpa(q_len, seq_len, heads, kv_heads, head_dim,
                                                                  block_size, window, dtype, int8_cache):
    """Against SDPA on the same keys and values: for an int8 cache, its rows dequantized (int8_kv.dequantize)."""
    from tessera.worker.attention import int8_kv

    g = torch.Generator().manual_seed(q_len * 1000 + seq_len)
    num_blocks = 64
    key_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g).to(dtype)
    value_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g).to(dtype)
    cached = (key_cache, value_cache)
    if int8_cache:
        cached = tuple(int8_kv.quantize(c) for c in cached)
        key_cache, value_cache = (int8_kv.dequantize(c, dtype) for c in cached)
    table = torch.randperm(num_blocks, generator=g)[: -(-seq_len // block_size) + 1].to(torch.int32)  # scattered
    # Query rows as strided views of a wider projection, as the model's qkv output gives them.
    qkv = torch.randn(q_len, heads * head_dim + 64, generator=g).to(dtype)
    q = qkv[:, : heads * head_dim].view(q_len, heads, head_dim)
    scale = head_dim**-0.5
    got = prefill(q, *cached, table, seq_len, scale, window)
    assert got.shape == q.shape and got.dtype == dtype
    exact = reference(q, key_cache, value_cache, table, seq_len, scale, window, torch.float64)
    theirs = reference(q, key_cache, value_cache, table, seq_len, scale, window, dtype)
    error, their_error = (got.double() - exact).abs().max().item(), (theirs.double() - exact).abs().max().item()
    if dtype == torch.bfloat16:  # both within the output's rounding
        assert error <= their_error * 1.25 + 1e-3, (error, their_error)
        torch.testing.assert_close(got.float(), theirs.float(), atol=2e-2, rtol=0)
    else:
        assert error < 1e-5, error
        torch.testing.assert_close(got, theirs, atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("q_len, heads, kv_heads, head_dim, window", [(192, 8, 4, 64, 0), (45, 8, 1, 32, 0),
                                                                     (50, 4, 4, 128, 0), (100, 8, 4, 64, 30)])
def test_a_whole_prompt_on_its_own_keys_gives_what_the_cache_would(q_len, heads, kv_heads, head_dim, window, dtype):
    """prompt_attention reads k and v as computed (strided views of the qkv output): bit for bit what the paged
    kernel gives once they are cached, in any block order."""
    g = torch.Generator().manual_seed(q_len)
    q_size, kv_size = heads * head_dim, kv_heads * head_dim
    qkv = torch.randn(q_len, q_size + 2 * kv_size, generator=g).to(dtype)
    q = qkv[:, :q_size].view(q_len, heads, head_dim)
    k = qkv[:, q_size : q_size + kv_size].view(q_len, kv_heads, head_dim)
    v = qkv[:, q_size + kv_size :].view(q_len, kv_heads, head_dim)
    block_size, num_blocks = 16, 32
    table = torch.randperm(num_blocks, generator=g)[: -(-q_len // block_size)].to(torch.int32)
    caches = [torch.zeros(num_blocks * block_size, kv_heads, head_dim, dtype=dtype) for _ in range(2)]
    slots = (table.long()[:, None] * block_size + torch.arange(block_size)).flatten()[:q_len]
    for cache, x in zip(caches, (k, v)):
        cache[slots] = x
    key_cache, value_cache = (c.view(num_blocks, block_size, kv_heads, head_dim) for c in caches)
    scale = head_dim**-0.5
    got = torch.ops.tessera.prompt_attention(q, k, v, scale, window)
    assert torch.equal(got, prefill(q, key_cache, value_cache, table, q_len, scale, window))
    exact = reference(q, key_cache, value_cache, table, q_len, scale, window, torch.float64)
    theirs = reference(q, key_cache, value_cache, table, q_len, scale, window, dtype)
    assert (got.double() - exact).abs().max() <= (theirs.double() - exact).abs().max() * 1.25 + 1e-5


def test_prompt_attention_refuses_what_it_cannot_compute():
    cache = torch.zeros(4, 16, 2, 64, dtype=torch.bfloat16)
    q = torch.zeros(8, 4, 64, dtype=torch.bfloat16)
    table = torch.arange(4, dtype=torch.int32)
    with pytest.raises(RuntimeError, match="float32 or bfloat16 q"):
        prefill(q.half(), cache.half(), cache.half(), table, 8, 0.125, 0)
    with pytest.raises(RuntimeError, match="of q's dtype"):
        prefill(q.float(), cache, cache, table, 8, 0.125, 0)
    with pytest.raises(RuntimeError, match="head_dim 32, 64 or 128"):
        prefill(q[..., :48].contiguous(), cache[..., :48].contiguous(), cache[..., :48].contiguous(), table, 8, 0.1, 0)
    with pytest.raises(RuntimeError, match="1 <= q_len <= seq_len"):
        prefill(q, cache, cache, table, 4, 0.125, 0)
    with pytest.raises(RuntimeError, match="covering seq_len"):
        prefill(q, cache, cache, table[:1], 40, 0.125, 0)
    with pytest.raises(RuntimeError, match="outside the cache"):
        prefill(q, cache, cache, torch.tensor([0, 9], dtype=torch.int32), 20, 0.125, 0)
    kv = torch.zeros(8, 2, 64, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match=r"k and v \[q_len, kv_heads, head_dim\] of q's dtype"):
        torch.ops.tessera.prompt_attention(q, kv[:7], kv[:7], 0.125, 0)
    with pytest.raises(RuntimeError, match="heads a multiple of kv_heads"):
        torch.ops.tessera.prompt_attention(q, kv.repeat(1, 3, 1)[:, :3], kv.repeat(1, 3, 1)[:, :3], 0.125, 0)


# bf16: both paths round every op to bf16, in other orders (the same bound as test_cpu_decode_kernels.py's)
@pytest.mark.parametrize("dtype, atol, int8_cache", [("float32", 1e-4, False), ("bfloat16", 0.25, False),
                                                     ("bfloat16", 0.25, True)])
@pytest.mark.parametrize("preset", ["llama", "llama_mqa", "mistral"])
def test_a_model_prefills_through_it_with_the_sdpa_paths_logits(preset, dtype, atol, int8_cache, tmp_path_factory):
    """Whole prompts and chunked ones (a prompt in two steps), past the sliding window, head_dim 64: the native
    backend's logits against the pure PyTorch backend's, in one dtype; with an int8 cache the whole prompts take
    the kernel on their own keys, the later chunk the kernel on the cache dequantized."""
    from test_model import empty_kv_caches, make_batch, random_prompt, scattered_block_table
    from tiny_checkpoints import preset_checkpoint

    from tessera.worker.attention import int8_kv
    from tessera.worker.attention.torch_backend import TorchAttentionBackend
    from tessera.worker.checkpoint import load_model

    path = preset_checkpoint(tmp_path_factory, preset, hidden_size=128, num_attention_heads=2,
                             num_key_value_heads=1 if preset == "llama_mqa" else 2, head_dim=64)
    logits = []
    for backend in (TorchAttentionBackend(native_decode=False), TorchAttentionBackend()):
        model, config = load_model(path, backend, dtype=dtype)
        assert config.head_dim == 64
        kv_caches = empty_kv_caches(model, backend)
        if int8_cache:
            kv_caches = [torch.zeros(*c.shape[:-1], int8_kv.row_width(c.shape[-1]), dtype=torch.int8)
                         for c in kv_caches]
        tables = [scattered_block_table(8, seed) for seed in range(2)]  # disjoint enough: 16 blocks, 8 each
        tables = [tables[0], [b for b in range(16) if b not in tables[0]][:8]]
        prompts = [random_prompt(13, config.vocab_size, 0), random_prompt(29, config.vocab_size, 1)]

        def step(requests):
            input_ids, positions, meta = make_batch(requests)
            return model.compute_logits(model(input_ids, positions, kv_caches, meta))

        with torch.inference_mode():
            first = step([(tables[0], prompts[0], 0), (tables[1], prompts[1][:11], 0)])
            rest = step([(tables[1], prompts[1][11:], 11)])
        logits.append(torch.cat([first, rest]))
    pure, native = logits
    torch.testing.assert_close(native, pure, atol=atol, rtol=0)
