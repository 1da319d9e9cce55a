"""Which kernels run a Llama layer's small ops (the residual add + RMSNorm, the rotary embedding, SiLU * up),
chosen once per model from its attention backend:

- Triton's (kernels/rms_norm.py, kernels/rotary.py) with the Triton backend: CUDA, or Triton's CPU interpreter
  in the tests; SiLU * up stays in PyTorch there;
- the native CPU ones (kernels/decode_ops_cpu.cpp) with the PyTorch backend when its native kernels are built: a
  decode step of one request is ~100 such ops, and each PyTorch op is a dispatch and a parallel region of its own;
- none (the PyTorch ops in llama.py) otherwise: XLA, TESSERA_NATIVE_CPU_KERNELS=0, no compiler.

Each rounds like the PyTorch code it replaces, which stays the reference.

On top of the native ops, native_decode_layers(model) gathers what torch.ops.tessera.decode_layer needs to run a
whole decoder layer in one call for a decode step of up to GEMV_ROWS requests: a layer is ~40 PyTorch calls
from Python, ~0.2 ms on the 2-core EPYC, more than its weights take to stream at batch 1.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class FusedOps:
    name: str
    rms_norm: Callable  # (x, weight, eps, residual | None) -> (RMSNorm(x + residual), x + residual)
    rotary_: Callable  # (q, k, positions, float32 cos_sin_cache): rotates q and k in place
    silu_mul: Callable | None  # gate_up -> SiLU(gate) * up; None: PyTorch's


def _native_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
                     residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    out, total = torch.ops.tessera.add_rms_norm(x, residual, weight, eps)
    return out, (x if residual is None else total)


def fused_ops_for(attn_backend) -> FusedOps | None:
    if attn_backend.name == "triton":  # triton is an optional dependency: import it only on this path
        from tessera.kernels.rms_norm import rms_norm
        from tessera.kernels.rotary import apply_rotary_

        return FusedOps("triton", rms_norm, apply_rotary_, None)
    if attn_backend.name == "torch" and getattr(attn_backend, "native_decode", None) is not None:
        from tessera.kernels import paged_attention_cpu

        if paged_attention_cpu.load("decode_ops") is not None:
            return FusedOps("native", _native_rms_norm, torch.ops.tessera.rotary_, torch.ops.tessera.silu_mul)
    return None


@dataclass(frozen=True)
class NativeLayer:
    """One decoder layer's arguments to torch.ops.tessera.decode_layer, but for the step's tensors."""
    input_norm: torch.Tensor
    post_norm: torch.Tensor
    eps: float
    weights: list[torch.Tensor]  # qkv, o, gate_up, down: gemv-packed, or int8 (values, scales, row sums) each
    biases: list[torch.Tensor | None]
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate: int
    scale: float
    window: int  # sliding window, 0 for none


def native_decode_layers(model) -> list[NativeLayer] | None:
    """A NativeLayer per layer when the whole layer can run natively: the native ops, one rank, no per-head q/k
    norm (Qwen3 keeps the Python layer), and every projection holding a GEMV copy (packed_linear.py) or every
    one int8 with its native kernel (int8_linear.py); else None."""
    from tessera.worker.models.int8_linear import Int8Linear
    from tessera.worker.models.packed_linear import PackedLinear

    if model.fused is None or model.fused.name != "native" or model.tp.size != 1 or model.config.qk_norm:
        return None
    if not layer_kernels_built():
        return None
    layers = []
    for layer in model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        projections = [attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj]
        if all(isinstance(p, PackedLinear) and p.gemv_weight is not None for p in projections):
            weights, biases = [p.gemv_weight for p in projections], [p.gemv_bias for p in projections]
        elif all(isinstance(p, Int8Linear) and p.native is not None for p in projections):
            weights = [t for p in projections for t in (p.weight, p.weight_scale, p.weight_sums)]
            biases = [p.bias for p in projections]
        else:
            return None
        layers.append(NativeLayer(
            layer.input_layernorm.weight, layer.post_attention_layernorm.weight, layer.input_layernorm.eps,
            weights, biases, attn.num_heads,
            attn.num_kv_heads, attn.head_dim, mlp.intermediate_size, attn.scale, attn.sliding_window or 0))
    return layers


def layer_kernels_built() -> bool:
    """Whether the attention and GEMV kernels decode_layer calls are built (loading them registers their ops)."""
    from tessera.kernels import paged_attention_cpu

    return all(paged_attention_cpu.load(kernel) is not None for kernel in ("paged_attention", "dense_gemv"))


def native_decoder(model, kv_caches: list[torch.Tensor]):
    """A torch.classes.tessera.DecodeModel holding the model's decode-time tensors and its KV caches, for the
    worker's decode steps of up to GEMV_ROWS requests: model.native_layers set, one rank, and an LM head the
    native kernels run (a GEMV copy, or int8 with its native kernel for that many rows); else None."""
    from tessera.worker.models.int8_linear import Int8Linear
    from tessera.worker.models.packed_linear import GEMV_ROWS, PackedLinear

    head = getattr(model, "lm_head", None)
    if getattr(model, "native_layers", None) is None or model.tp.size != 1:
        return None
    if isinstance(head, PackedLinear) and head.gemv_weight is not None:
        head_weights, head_bias = [head.gemv_weight], head.gemv_bias
    elif isinstance(head, Int8Linear) and head.native is not None and head.native_rows >= GEMV_ROWS:
        head_weights, head_bias = [head.weight, head.weight_scale, head.weight_sums], head.bias
    else:
        return None
    decoder = torch.classes.tessera.DecodeModel(model.embed_tokens.weight, model.rotary_emb.cos_sin_cache)
    for layer, kv_cache in zip(model.native_layers, kv_caches, strict=True):
        decoder.add_layer(layer.input_norm, layer.post_norm, layer.eps, layer.weights, layer.biases, layer.num_heads,
                          layer.num_kv_heads, layer.head_dim, layer.intermediate, kv_cache, layer.scale, layer.window)
    decoder.set_head(model.norm.weight, model.norm.eps, head_weights, head_bias, head.out_features)
    return decoder
