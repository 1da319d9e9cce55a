"""Which kernels run a Llama layer's small ops (the residual add + RMSNorm, the rotary embedding, SiLU * up),
chosen once per model from its attention backend:

- Triton's (kernels/rms_norm.py, kernels/rotary.py) with the Triton backend: CUDA, or Triton's CPU interpreter
  in the tests; SiLU * up stays in PyTorch there;
- the native CPU ones (kernels/decode_ops_cpu.cpp) with the PyTorch backend when its native kernels are built: a
  decode step of one request is ~100 such ops, and each PyTorch op is a dispatch and a parallel region of its own;
- none (the PyTorch ops in llama.py) otherwise: XLA, TESSERA_NATIVE_CPU_KERNELS=0, no compiler.

Each rounds like the PyTorch code it replaces, which stays the reference.
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
