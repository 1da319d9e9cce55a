"""How close decode comes to the GPU's memory bandwidth (GPU only; on a machine without one it says so and exits 0).

    python bench/attention_bandwidth.py [--model CHECKPOINT_DIR] [--layers N]

Decoding is memory-bound: each step reads every weight once, and attention reads each request's whole KV cache
while doing little arithmetic per byte. So the yardstick is bytes moved per second against what the memory can do:

- peak: a large device-to-device copy, measured here (reads + writes / time), next to the datasheet figure when
  the GPU is one we know;
- attention: the K and V bytes of the batch's contexts / the paged-attention kernel's time, for decode batches
  of several sizes and context lengths (L2 is flushed before each run, so the bytes really come from memory);
- decode at batch 1: tokens/s of the model forward + logits, eager and with CUDA graphs, against the limit
  peak / bytes read per token (the weights, less the embedding table of which one row is read, plus the KV).

Without --model it builds a Llama-3.2-1B-shaped model with random weights in memory (no download, no disk).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

# Datasheet HBM/GDDR bandwidth, bytes/s; the first name contained in the device's name wins.
DATASHEET = [("H200", 4.8e12), ("H100 NVL", 3.9e12), ("H100 PCIe", 2.0e12), ("H100", 3.35e12),
             ("A100 80GB PCIe", 1.94e12), ("A100-SXM4-80GB", 2.04e12), ("A100", 1.56e12), ("L40S", 0.864e12),
             ("L4", 0.3e12), ("A10", 0.6e12)]

# Llama 3.2 1B: GQA 32 query heads on 8 KV heads of 128, the head shape of Llama 3 8B and 70B too.
SYNTHETIC = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                 num_key_value_heads=8, head_dim=128, vocab_size=128256, rope_theta=500000.0, max_model_len=8192)
ATTENTION_SHAPES = [(1, 32768), (8, 8192), (32, 4096), (64, 2048), (128, 1024), (256, 1024)]  # (batch, context)
BLOCK_SIZE = 16


def milliseconds(fn) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")  # flushes L2 between runs


def measured_peak() -> float:
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * src.numel() / (milliseconds(lambda: dst.copy_(src)) / 1e3)  # each byte is read once, written once


def attention_bandwidth(peak: float) -> None:
    from tessera.kernels.paged_attention import paged_attention

    heads, kv_heads, head_dim, dtype = 32, 8, 128, torch.bfloat16
    num_blocks = max(b * -(-c // BLOCK_SIZE) for b, c in ATTENTION_SHAPES)
    key_cache = torch.randn(num_blocks, BLOCK_SIZE, kv_heads, head_dim, device="cuda", dtype=dtype)
    value_cache = torch.randn_like(key_cache)
    print(f"\npaged attention, decode, {heads} query / {kv_heads} KV heads of {head_dim}, bf16, block {BLOCK_SIZE}")
    print(f"{'batch':>6} {'context':>8} {'KV MiB':>8} {'us':>9} {'GB/s':>8} {'of peak':>8}")
    for batch, context in ATTENTION_SHAPES:
        blocks_each = -(-context // BLOCK_SIZE)
        # Every request's blocks scattered over the cache, as after a while of serving.
        block_tables = torch.randperm(num_blocks, device="cuda")[: batch * blocks_each].view(batch, blocks_each)
        block_tables = block_tables.to(torch.int32)
        q = torch.randn(batch, heads, head_dim, device="cuda", dtype=dtype)
        query_start_loc = torch.arange(batch + 1, device="cuda", dtype=torch.int32)
        seq_lens = torch.full((batch,), context, device="cuda", dtype=torch.int32)
        ms = milliseconds(lambda: paged_attention(q, key_cache, value_cache, query_start_loc, seq_lens, block_tables,
                                                  1, head_dim**-0.5))
        kv_bytes = 2 * batch * context * kv_heads * head_dim * dtype.itemsize
        moved = kv_bytes + 2 * q.numel() * q.element_size() + block_tables.numel() * 4  # + q in, out, tables
        rate = moved / (ms / 1e3)
        print(f"{batch:>6} {context:>8} {kv_bytes / 2**20:>8.0f} {ms * 1e3:>9.1f} {rate / 1e9:>8.0f} "
              f"{rate / peak:>8.0%}")


def build_model(args):
    from tessera.worker.attention.triton_backend import TritonAttentionBackend
    from tessera.worker.checkpoint import load_model
    from tessera.model_config import ModelConfig
    from tessera.worker.models import model_class
    from tessera.worker.models.rope import RotaryEmbedding

    backend = TritonAttentionBackend()
    if args.model:
        return load_model(args.model, backend, "bfloat16", "cuda")
    shape = {**SYNTHETIC, "num_hidden_layers": args.layers or SYNTHETIC["num_hidden_layers"]}
    config = ModelConfig(
        model_dir=Path("synthetic"), architecture="LlamaForCausalLM", rms_norm_eps=1e-5, rope_scaling=None,
        tie_word_embeddings=True, attention_bias=False, qk_norm=False, sliding_window=None, dtype=torch.bfloat16,
        eos_token_ids=[], bos_token_id=None, generation_defaults={},
        sliding_window_layers=[False] * shape["num_hidden_layers"], **shape,
    )
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("meta"):
            model = model_class(config.architecture)(config, backend)
    finally:
        torch.set_default_dtype(previous)
    model.to_empty(device="cuda")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.fill_(1.0)
            else:
                param.normal_(0.0, 0.02)
    for module in model.modules():
        if isinstance(module, RotaryEmbedding):
            module.cos_sin_cache = module.compute_cache().to("cuda")
    return model.eval(), config


@torch.inference_mode()
def decode_batch_one(peak: float, args) -> None:
    from tessera.worker.attention.backend import AttentionMetadata
    from tessera.worker.cuda_graphs import CudaGraphRunner

    model, config = build_model(args)
    context = min(args.context, config.max_model_len - 1)
    num_blocks = -(-(context + 1) // BLOCK_SIZE)
    shape = (2, num_blocks, BLOCK_SIZE, config.num_key_value_heads, config.head_dim)
    kv_caches = [torch.zeros(shape, dtype=config.dtype, device="cuda") for _ in range(config.num_hidden_layers)]
    meta = AttentionMetadata(
        query_start_loc=torch.tensor([0, 1], dtype=torch.int32, device="cuda"),
        seq_lens=torch.tensor([context + 1], dtype=torch.int32, device="cuda"),
        block_tables=torch.arange(num_blocks, dtype=torch.int32, device="cuda")[None],
        slot_mapping=torch.tensor([context], device="cuda"),  # the new token's KV, rewritten every step
        num_decodes=1, query_lens_cpu=[1], seq_lens_cpu=[context + 1],
    )
    input_ids = torch.tensor([1], device="cuda")
    positions = torch.tensor([context], device="cuda")
    graphs = CudaGraphRunner(model, kv_caches, BLOCK_SIZE, config.max_model_len, max_batch_size=1)
    graphs.capture()

    def eager():
        return model.compute_logits(model(input_ids, positions, kv_caches, meta))

    def graphed():
        return model.compute_logits(graphs.run(input_ids, positions, meta))

    params = sum(p.numel() * p.element_size() for p in model.parameters())
    embedding = model.embed_tokens.weight
    # One embedding row is read per token; the table is read whole only as a tied lm_head.
    weights = params - (0 if config.tie_word_embeddings else embedding.numel() * embedding.element_size())
    kv = context * config.kv_bytes_per_token
    print(f"\ndecode at batch 1, context {context}: {params / 2**30:.2f} GiB of weights, "
          f"{weights / 2**30:.2f} GiB read per token + {kv / 2**20:.0f} MiB of KV")
    print(f"limit from the weights alone: {peak / weights:8.0f} tokens/s; with the KV: {peak / (weights + kv):.0f}")
    for name, step in (("eager", eager), ("CUDA graphs", graphed)):
        ms = milliseconds(step)
        print(f"{name:>12}: {1e3 / ms:8.0f} tokens/s = {(weights + kv) / (ms / 1e3) / peak:.0%} of peak bandwidth")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="a Hugging Face checkpoint directory (default: a synthetic 1B model)")
    parser.add_argument("--layers", type=int, help="layers of the synthetic model (default 16)")
    parser.add_argument("--context", type=int, default=512, help="context length of the batch-1 decode")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("attention_bandwidth: no CUDA GPU here; this benchmark measures GPU memory bandwidth, so there is "
              "nothing to measure. Run it on a machine with an NVIDIA GPU (pip install -e .[cuda]).")
        return
    try:
        import triton  # noqa: F401
    except ImportError:
        print("attention_bandwidth: triton is not installed: pip install -e .[cuda]")
        return

    name = torch.cuda.get_device_name()
    spec = next((bandwidth for key, bandwidth in DATASHEET if key in name), None)
    peak = measured_peak()
    spec_text = f"datasheet {spec / 1e9:.0f} GB/s, the copy reaches {peak / spec:.0%} of it" if spec else "no datasheet"
    print(f"{name}: copy bandwidth {peak / 1e9:.0f} GB/s ({spec_text}); the shares below are of the copy's")
    attention_bandwidth(peak)
    decode_batch_one(peak, args)


if __name__ == "__main__":
    main()
