"""Our Llama-family model through the paged KV cache against Hugging Face transformers, preset by preset."""
from __future__ import annotations

import pytest
import torch
from tiny_checkpoints import PRESETS, preset_checkpoint

from tessera.worker.attention.backend import AttentionMetadata
from tessera.worker.attention.torch_backend import TorchAttentionBackend
from tessera.worker.checkpoint import load_model
from tessera.model_config import CheckpointError
from tessera.worker.models.packed_linear import (PackedLinear, onednn_available, pack_linear_layers, padded_rows,
                                                resolve_cpu_matmul)
from tessera.worker.models.rope import inverse_frequencies

BLOCK_SIZE = 4
NUM_BLOCKS = 16
ATOL = 1e-4


def make_batch(requests: list[tuple[list[int], list[int], int]]):
    """requests: (block_table, new token ids, tokens already cached), single-token ones first.

    Returns the flat input_ids and positions and the AttentionMetadata, as a model runner would build them.
    """
    input_ids, positions, slots = [], [], []
    query_lens, seq_lens = [], []
    for table, new_ids, num_cached in requests:
        span = range(num_cached, num_cached + len(new_ids))
        input_ids += new_ids
        positions += span
        slots += [table[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE for p in span]
        query_lens.append(len(new_ids))
        seq_lens.append(num_cached + len(new_ids))
    max_blocks = max(len(table) for table, _, _ in requests)
    block_tables = torch.tensor([table + [0] * (max_blocks - len(table)) for table, _, _ in requests],
                                dtype=torch.int32)
    num_decodes = next((i for i, n in enumerate(query_lens) if n != 1), len(query_lens))
    meta = AttentionMetadata(
        query_start_loc=torch.tensor([0] + query_lens, dtype=torch.int32).cumsum(0).to(torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        block_tables=block_tables,
        slot_mapping=torch.tensor(slots, dtype=torch.int64),
        num_decodes=num_decodes,
        query_lens_cpu=query_lens,
        seq_lens_cpu=seq_lens,
    )
    return torch.tensor(input_ids), torch.tensor(positions), meta


def empty_kv_caches(model, backend):
    config = model.config
    shape = backend.kv_cache_shape(NUM_BLOCKS, BLOCK_SIZE, config.num_key_value_heads, config.head_dim)
    return [torch.zeros(shape, dtype=config.dtype) for _ in range(config.num_hidden_layers)]


@torch.no_grad()
def run(model, kv_caches, requests) -> torch.Tensor:
    input_ids, positions, meta = make_batch(requests)
    return model.compute_logits(model(input_ids, positions, kv_caches, meta))


def random_prompt(n: int, vocab_size: int, seed: int = 0) -> list[int]:
    return torch.randint(3, vocab_size, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def scattered_block_table(num_blocks: int, seed: int = 0) -> list[int]:
    """Out-of-order physical blocks, so that a layout bug cannot hide behind an identity mapping."""
    return torch.randperm(NUM_BLOCKS, generator=torch.Generator().manual_seed(seed))[:num_blocks].tolist()


@pytest.fixture(scope="module")
def backend():
    return TorchAttentionBackend()


@pytest.mark.parametrize("preset", list(PRESETS))
@torch.no_grad()
def test_prefill_then_decode_matches_transformers(preset, tmp_path_factory, backend):
    from transformers import AutoModelForCausalLM

    path = preset_checkpoint(tmp_path_factory, preset)
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model, config = load_model(path, backend)
    kv_caches = empty_kv_caches(model, backend)
    table = scattered_block_table(7)  # 20 prompt + 5 decoded tokens = 25 slots

    tokens = random_prompt(20, config.vocab_size)
    logits = run(model, kv_caches, [(table, tokens, 0)])
    expected = reference(torch.tensor([tokens])).logits[0]
    torch.testing.assert_close(logits, expected, atol=ATOL, rtol=0)

    for _ in range(5):
        tokens.append(int(logits[-1].argmax()))
        logits = run(model, kv_caches, [(table, tokens[-1:], len(tokens) - 1)])
        expected = reference(torch.tensor([tokens])).logits[0, -1:]
        torch.testing.assert_close(logits, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("preset", ["llama", "mistral"])
def test_decode_and_prefill_in_one_batch_match_each_alone(preset, tmp_path_factory, backend):
    model, config = load_model(preset_checkpoint(tmp_path_factory, preset), backend)
    kv_caches = empty_kv_caches(model, backend)
    table_a, table_b = [5, 2, 9], [1, 12, 4]
    prompt_a, prompt_b = random_prompt(10, config.vocab_size, seed=1), random_prompt(11, config.vocab_size, seed=2)
    run(model, kv_caches, [(table_a, prompt_a, 0)])
    decode_a = (table_a, [7], len(prompt_a))
    prefill_b = (table_b, prompt_b, 0)

    alone_caches = [kv.clone() for kv in kv_caches]
    alone_a = run(model, alone_caches, [decode_a])
    alone_b = run(model, alone_caches, [prefill_b])
    together = run(model, kv_caches, [decode_a, prefill_b])

    torch.testing.assert_close(together[:1], alone_a, atol=1e-5, rtol=0)
    torch.testing.assert_close(together[1:], alone_b, atol=1e-5, rtol=0)


def test_chunked_prefill_matches_one_prefill(tmp_path_factory, backend):
    model, config = load_model(preset_checkpoint(tmp_path_factory, "qwen3"), backend)
    table = scattered_block_table(5)
    tokens = random_prompt(20, config.vocab_size)
    whole = run(model, empty_kv_caches(model, backend), [(table, tokens, 0)])

    kv_caches = empty_kv_caches(model, backend)
    chunks = [run(model, kv_caches, [(table, tokens[start:end], start)]) for start, end in [(0, 8), (8, 16), (16, 20)]]
    torch.testing.assert_close(torch.cat(chunks), whole, atol=1e-5, rtol=0)


def test_bf16_model_runs_close_to_fp32(tmp_path_factory, backend):
    path = preset_checkpoint(tmp_path_factory, "llama")
    requests = [([3, 0, 5], random_prompt(12, 256), 0)]
    logits = {}
    for dtype in ("float32", "bfloat16"):
        model, _ = load_model(path, backend, dtype=dtype)
        logits[dtype] = run(model, empty_kv_caches(model, backend), requests)
    assert logits["bfloat16"].dtype == torch.float32
    torch.testing.assert_close(logits["bfloat16"], logits["float32"], atol=0.25, rtol=0.05)


@pytest.mark.parametrize("scaling", [
    {"rope_type": "linear", "factor": 4.0},
    # Llama 3.1's own numbers
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 8192},
])
def test_rope_frequencies_match_transformers_at_full_size(scaling):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = LlamaConfig(hidden_size=4096, num_attention_heads=32, max_position_embeddings=131072,
                         rope_parameters={**scaling, "rope_theta": 500000.0})
    expected, _ = ROPE_INIT_FUNCTIONS[scaling["rope_type"]](config, "cpu")
    assert torch.equal(inverse_frequencies(128, 500000.0, scaling), expected)


def test_unknown_rope_type_is_a_checkpoint_error():
    with pytest.raises(CheckpointError, match="yarn"):
        inverse_frequencies(64, 10000.0, {"rope_type": "yarn", "factor": 4.0})


# --- oneDNN packed linear layers (the worker's default on CPU) -------------------------------------------------

needs_onednn = pytest.mark.skipif(not onednn_available(), reason="this PyTorch build has no oneDNN")


@needs_onednn
@pytest.mark.parametrize("preset", ["llama", "llama_tied", "llama_bias", "qwen2", "qwen3"])
@pytest.mark.parametrize("dtype, atol", [("float32", 1e-4), ("bfloat16", 0.25)])
def test_packed_linear_layers_give_the_plain_models_logits(preset, dtype, atol, tmp_path_factory, backend):
    if not onednn_available(getattr(torch, dtype)):
        pytest.skip("oneDNN packs bfloat16 only on CPUs with AVX-512 or AVX-NE-CONVERT")
    path = preset_checkpoint(tmp_path_factory, preset)
    plain, config = load_model(path, backend, dtype=dtype)
    packed, _ = load_model(path, backend, dtype=dtype)
    linears = sum(isinstance(m, torch.nn.Linear) for m in plain.modules())
    assert pack_linear_layers(packed) == linears + config.tie_word_embeddings  # a tied head gets a packed copy
    assert not any(isinstance(m, torch.nn.Linear) for m in packed.modules())
    assert isinstance(packed.lm_head, PackedLinear)

    table, prompt = scattered_block_table(6), random_prompt(19, config.vocab_size)
    requests = [(table, prompt, 0)]
    expected = run(plain, empty_kv_caches(plain, backend), requests)
    logits = run(packed, empty_kv_caches(packed, backend), requests)
    assert not torch.equal(logits, torch.zeros_like(logits))
    torch.testing.assert_close(logits, expected, atol=atol, rtol=0)
    assert torch.equal(logits.argmax(-1), expected.argmax(-1)) or dtype == "bfloat16"


@needs_onednn
def test_packed_linear_pads_row_counts_to_few_kernels_and_returns_exactly_the_rows():
    weight, bias = torch.randn(96, 40), torch.randn(96)
    layer = PackedLinear(weight, bias)
    for rows in (1, 127, 128, 129, 143, 144, 1000):
        x = torch.randn(rows, 40)
        out = layer(x)
        assert out.shape == (rows, 96)
        torch.testing.assert_close(out, torch.nn.functional.linear(x, weight, bias), atol=1e-4, rtol=1e-5)
    counts = {padded_rows(rows) for rows in range(1, 2049)}
    assert len(counts) == 128 + (2048 - 128) // 16  # every decode batch size, then one kernel per 16 rows
    assert all(0 <= padded_rows(rows) - rows < 16 for rows in range(1, 2049))


def test_cpu_matmul_choice():
    cpu = torch.device("cpu")
    assert resolve_cpu_matmul("aten", cpu, torch.float32) == "aten"
    assert resolve_cpu_matmul("auto", cpu, torch.float16) == "aten"  # oneDNN's CPU matmul takes fp32/bf16
    assert resolve_cpu_matmul("auto", torch.device("meta"), torch.float32) == "aten"
    if onednn_available():
        assert resolve_cpu_matmul("auto", cpu, torch.float32) == "onednn"
    if onednn_available(torch.bfloat16):
        assert resolve_cpu_matmul("onednn", cpu, torch.bfloat16) == "onednn"
    else:  # a CPU without AVX-512: oneDNN cannot pack bf16, so auto takes aten and onednn is refused
        assert resolve_cpu_matmul("auto", cpu, torch.bfloat16) == "aten"
        with pytest.raises(ValueError, match="bfloat16: a CPU with AVX-512"):
            resolve_cpu_matmul("onednn", cpu, torch.bfloat16)
    with pytest.raises(ValueError, match="cpu_matmul 'onednn' needs .* float32 or bfloat16"):
        resolve_cpu_matmul("onednn", cpu, torch.float16)
    with pytest.raises(ValueError, match="cpu_matmul must be one of auto, onednn, aten, got 'mkl'"):
        resolve_cpu_matmul("mkl", cpu, torch.float32)
