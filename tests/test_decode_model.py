"""torch.classes.tessera.DecodeModel (kernels/decode_ops_cpu.cpp): a decode step of one to four requests in one
native call, against the layer-by-layer path it replaces (bit for bit: it runs the same kernels in the same
order), and the worker's use of it."""
from __future__ import annotations

import pytest
import torch
from test_model import empty_kv_caches, make_batch, random_prompt, scattered_block_table
from tiny_checkpoints import preset_checkpoint

from tessera.kernels import paged_attention_cpu
from tessera.worker.attention.torch_backend import TorchAttentionBackend
from tessera.worker.checkpoint import load_model
from tessera.worker.models.fused_ops import native_decode_layers, native_decoder, layer_kernels_built
from tessera.worker.models.int8_linear import quantize_linear_layers
from tessera.worker.models.packed_linear import batch_matmul, pack_linear_layers

pytestmark = pytest.mark.skipif(
    paged_attention_cpu.load("decode_ops") is None or not layer_kernels_built()
    or not torch.ops.tessera.gemv_available(torch.float32),
    reason="the native decoder needs the native kernels (a C++ compiler, AVX2)")


def native_model(tmp_path_factory, preset: str, weights: str):
    """A model whose decodes run natively: GEMV copies of its linears (float32, bfloat16) or int8 ones."""
    backend = TorchAttentionBackend()
    dtype = "float32" if weights == "int8" else weights
    model, config = load_model(preset_checkpoint(tmp_path_factory, preset), backend, dtype=dtype)
    if weights == "int8":
        quantize_linear_layers(model)
    else:
        pack_linear_layers(model, gemv=True, batches=batch_matmul(getattr(torch, dtype)))
    model.native_layers = native_decode_layers(model)
    kv_caches = empty_kv_caches(model, backend)
    return model, config, kv_caches


@pytest.mark.parametrize("preset", ["llama", "llama_tied", "llama_bias", "mistral", "qwen2_sliding"])
@pytest.mark.parametrize("weights", ["float32", "bfloat16", "int8"])
@torch.inference_mode()
def test_a_decode_step_in_one_call_gives_the_layer_by_layer_logits_bit_for_bit(preset, weights, tmp_path_factory):
    if weights == "bfloat16" and not torch.ops.tessera.gemv_available(torch.bfloat16):
        pytest.skip("no bf16 GEMV on this CPU")
    if weights == "int8" and paged_attention_cpu.load("int8_linear") is None:
        pytest.skip("no native int8 kernel")
    model, config, kv_caches = native_model(tmp_path_factory, preset, weights)
    decoder = native_decoder(model, kv_caches)
    assert decoder is not None
    blocks = scattered_block_table(16)
    tables = [blocks[i : i + 4] for i in range(0, 16, 4)]
    prompts = [random_prompt(length, config.vocab_size, seed) for seed, length in enumerate((5, 9, 1, 10))]
    # Past the sliding window (8) of the presets that have one; contexts of different lengths in one step.
    input_ids, positions, meta = make_batch([(t, p, 0) for t, p in zip(tables, prompts)])
    model(input_ids, positions, kv_caches, meta)  # the prefill: every request's keys and values cached
    lengths = [len(p) for p in prompts]
    for step in range(5):
        rows = [0, 1, 2, 3][: 1 + step % 4]  # one to four requests a step
        batch = [(tables[i], [(7 * i + step) % config.vocab_size], lengths[i]) for i in rows]
        input_ids, positions, meta = make_batch(batch)
        # The Python path writes this step's keys and values; the decoder then rewrites the same slots.
        expected = model.compute_logits(model(input_ids, positions, kv_caches, meta))
        args = (input_ids, positions, meta.block_tables, meta.seq_lens, meta.slot_mapping)
        logits = decoder.step(*args)
        assert logits.dtype == torch.float32 and torch.equal(logits, expected)
        assert torch.equal(decoder.greedy_step(*args, config.vocab_size), expected.argmax(-1))
        for i in rows:
            lengths[i] += 1


@torch.inference_mode()
def test_the_decode_model_refuses_what_it_cannot_run(tmp_path_factory):
    model, config, kv_caches = native_model(tmp_path_factory, "llama", "float32")
    empty = torch.classes.tessera.DecodeModel(model.embed_tokens.weight, model.rotary_emb.cos_sin_cache)
    ids = torch.tensor([1])
    with pytest.raises(RuntimeError, match="add_layer and set_head first"):
        empty.step(ids, ids, torch.zeros(1, 1, dtype=torch.int32), torch.ones(1, dtype=torch.int32), ids)
    layer = model.native_layers[0]
    with pytest.raises(RuntimeError, match="4 projections"):
        empty.add_layer(layer.input_norm, layer.post_norm, layer.eps, layer.weights[:3], layer.biases,
                        layer.num_heads, layer.num_kv_heads, layer.head_dim, layer.intermediate, kv_caches[0],
                        layer.scale, layer.window)
    decoder = native_decoder(model, kv_caches)
    _, positions, meta = make_batch([(scattered_block_table(1), [3], 0)])
    with pytest.raises(RuntimeError, match="vocab within the head's outputs"):
        decoder.greedy_step(ids, positions, meta.block_tables, meta.seq_lens, meta.slot_mapping, config.vocab_size + 1)
    with pytest.raises(IndexError):  # a token id outside the embedding table
        decoder.step(torch.tensor([config.vocab_size]), positions, meta.block_tables, meta.seq_lens, meta.slot_mapping)


def test_no_decoder_without_the_native_layers(tmp_path_factory):
    model, _ = load_model(preset_checkpoint(tmp_path_factory, "qwen3"), TorchAttentionBackend())
    pack_linear_layers(model, gemv=True, batches=batch_matmul(torch.float32))
    model.native_layers = native_decode_layers(model)  # None: Qwen3's per-head norms keep the Python layer
    assert model.native_layers is None and native_decoder(model, []) is None


def test_the_worker_decodes_in_one_call_with_the_tokens_and_logprobs_of_the_layer_by_layer_path(tmp_path_factory,
                                                                                                 caplog):
    """Greedy requests (the greedy_step), sampled and logprob-reporting ones (step, then the sampler) and a
    mix, through the engine: the same tokens and logprobs with the decoder as without it."""
    from tessera.engine.engine import EngineConfig, LLMEngine
    from tessera.sampling_params import SamplingParams

    path = preset_checkpoint(tmp_path_factory, "llama_bias")
    with caplog.at_level("INFO", logger="tessera.worker"):
        engine = LLMEngine(EngineConfig(model=str(path), device="cpu", dtype="float32", num_kv_blocks=64))
    worker = engine.worker
    assert worker.native_decoder is not None and "one native call from the token ids to the logits" in caplog.text
    calls = {"step": 0, "greedy_step": 0}

    class Counting:  # the decoder, counting which of its calls the worker makes
        def __init__(self, decoder):
            self.decoder = decoder

        def __getattr__(self, name):
            calls[name] += 1
            return getattr(self.decoder, name)

    prompts = [[5, 9, 3, 7, 11], [2, 4, 6, 8, 10, 12, 14], [13, 1]]
    cases = [
        [SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)] * 3,
        [SamplingParams(temperature=0.8, top_k=5, seed=3, max_tokens=6, ignore_eos=True),
         SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=2),
         SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, repetition_penalty=1.3)],
    ]
    decoder = worker.native_decoder
    for params in cases:
        worker.native_decoder = None
        expected = engine.generate(prompts, params)
        worker.native_decoder = Counting(decoder)
        got = engine.generate(prompts, params)
        for a, b in zip(got, expected):
            assert a.token_ids == b.token_ids and len(a.token_ids) == 6
            assert [(x.token_id, x.logprob) for x in a.logprobs] == [(x.token_id, x.logprob) for x in b.logprobs]
    assert calls["greedy_step"] >= 5 and calls["step"] >= 5
