"""Linear layers on oneDNN with pre-packed weights, for the CPU.

PyTorch's CPU matmul goes through MKL, which takes its AVX2 path on AMD processors; oneDNN picks its kernels
from the instruction set itself (AVX-512 on Zen 4/5) and, with the weight reordered once into its blocked
layout, ran the benchmark model's matmuls 2-3x faster at every batch size from 2 to 2048 on the 2-core EPYC
CI machine (bench/offline_throughput.py prints the bare-matmul figures for both). Sums are reassociated, so
logits move by float rounding (~1e-6 relative), not more.

pack_linear_layers(model) swaps every nn.Linear, and the (possibly tied) LM head, for a PackedLinear after the
weights are loaded: the worker's choice, so load_model keeps returning the plain checkpoint-shaped model.

A decode step of one to GEMV_ROWS requests runs on a second copy of the weight instead, packed for the native
GEMV kernel (kernels/dense_gemv_cpu.cpp): at one row a matmul only streams its weights, and oneDNN's blocked
kernels stream them at about half the memory bandwidth (measured: bf16 ~11-14 GB/s vs ~20-31 GB/s for the
kernel, 2-core EPYC). The copy doubles the linear layers' memory, so it is made only where the CPU runs the
kernel and the weights take at most a quarter of the memory available at load, a container's limit included
(`--cpu-matmul onednn`: never).

Where oneDNN cannot run bf16 (CPUs without AVX-512), a bf16 model's layers keep only that packed copy and
every batch size runs on the native kernels (batches="native": the GEMV up to GEMV_ROWS rows, bf16_matmul
above), as PyTorch's own bf16 matmul there ran 3-4x slower than the native kernel.
"""
from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger("tessera.worker")

CHOICES = ("auto", "onednn", "aten")
GEMV_ROWS = 4  # up to this many rows, the native GEMV on its own copy of the weight (when there is one)
PACKABLE_DTYPES = (torch.float32, torch.bfloat16)  # what oneDNN's CPU matmul takes; float16 stays on aten


def onednn_available(dtype: torch.dtype = torch.float32) -> bool:
    """Whether oneDNN's packed matmul runs here for dtype: bfloat16 needs AVX-512 (or AVX-NE-CONVERT) to pack."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        return False
    return dtype != torch.bfloat16 or torch.ops.mkldnn._is_mkldnn_bf16_supported()


def padded_rows(rows: int) -> int:
    """oneDNN compiles a kernel for every new row count (~2 ms each) and keeps 1024 in its cache by default, so a
    server whose steps take every token count from 1 to the budget would compile on most steps. Every count up
    to 128 (decode batches) runs as is; above, counts round up to a multiple of 16 (at most 11% more rows, ~1% at
    the budget's usual sizes), which leaves ~250 kernels per weight shape for a 2048-token budget."""
    return rows if rows <= 128 else -(-rows // 16) * 16


def native_bf16_batches(dtype: torch.dtype) -> bool:
    """Whether bf16 batches take the native kernel on the GEMV's packed weight (kernels/dense_gemv_cpu.cpp,
    bf16_matmul): where oneDNN cannot run bf16 and the CPU has AVX2 with FMA."""
    from tessera.kernels import paged_attention_cpu

    return (dtype == torch.bfloat16 and not onednn_available(dtype)
            and paged_attention_cpu.load("dense_gemv") is not None and torch.ops.tessera.bf16_matmul_available())


def batch_matmul(dtype: torch.dtype) -> str:
    """What the worker's --cpu-matmul auto runs batches of dtype on here: onednn, native (PackedLinear's two
    kinds) or aten (PyTorch's own matmul, no PackedLinear)."""
    return "onednn" if onednn_available(dtype) else "native" if native_bf16_batches(dtype) else "aten"


class PackedLinear(nn.Module):
    """y = x W^T + b with W held in oneDNN's layout (or only in the native kernels' one); x is [tokens, in_features]."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, gemv: bool = False, batches: str = "onednn"):
        """gemv: also keep the weight packed for the native GEMV kernel (loaded by the caller). batches: what
        takes more rows than the GEMV: onednn, or native (bf16 only: the native kernel on the GEMV's packed
        weight, which is then the layer's one copy; batch_matmul says where)."""
        super().__init__()
        if batches not in ("onednn", "native"):
            raise ValueError(f"batches must be onednn or native, got {batches!r}")
        if batches == "native" and weight.dtype != torch.bfloat16:
            raise ValueError(f"native batches are bf16 only, got {weight.dtype}")
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        # The batch-size hint only picks the initial blocking; every batch size runs on the same packed weight.
        self.packed_weight = (torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 64) if batches == "onednn"
                              else None)
        self.bias = None if bias is None else bias.detach().clone()
        gemv = gemv or batches == "native"
        self.gemv_weight = torch.ops.tessera.gemv_pack(weight.detach()) if gemv else None
        self.gemv_bias = None if bias is None or not gemv else bias.detach().float().clone()
        self.batches = batches

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[0]
        if rows <= GEMV_ROWS and self.gemv_weight is not None:
            return torch.ops.tessera.gemv(x, self.gemv_weight, self.gemv_bias, self.out_features)
        if self.batches == "native":
            return torch.ops.tessera.bf16_matmul(x.contiguous(), self.gemv_weight, self.gemv_bias, self.out_features)
        padded = padded_rows(rows)
        if padded != rows:
            x = F.pad(x, (0, 0, 0, padded - rows))
        out = torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.packed_weight, self.bias, "none", [], "")
        return out[:rows]

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"batches={self.batches}, gemv={self.gemv_weight is not None}")


def resolve_cpu_matmul(choice: str, device: torch.device, dtype: torch.dtype) -> str:
    """'onednn' or 'aten' for this device and dtype; an explicit 'onednn' that cannot run is an error."""
    if choice not in CHOICES:
        raise ValueError(f"cpu_matmul must be one of {', '.join(CHOICES)}, got {choice!r}")
    usable = device.type == "cpu" and dtype in PACKABLE_DTYPES and onednn_available(dtype)
    if choice == "onednn" and not usable:
        raise ValueError(f"cpu_matmul 'onednn' needs the CPU device, a float32 or bfloat16 model (bfloat16: a CPU "
                         f"with AVX-512) and a PyTorch built with oneDNN (device {device.type}, dtype {dtype})")
    if choice == "auto":
        return "onednn" if usable else "aten"
    return choice


# Kernels compiled for (weight shape, padded row count) pairs: ~250 per weight shape for a 2048-token budget, so
# oneDNN's default cache of 1024 would still evict and recompile in a model with 5 weight shapes. Read by oneDNN
# when it first builds a kernel; an explicit setting in the environment wins.
PRIMITIVE_CACHE_CAPACITY = "4096"


@torch.no_grad()
def replace_linear_layers(model: nn.Module, make_layer) -> int:
    """Swaps every nn.Linear, and the (possibly tied) LM head, for make_layer(weight, bias); returns how many."""
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, name, make_layer(child.weight, child.bias))
                count += 1
    if not hasattr(model, "lm_head"):  # tied: the embedding keeps its dense table for lookups, the head its own copy
        model.lm_head = make_layer(model.embed_tokens.weight, None)
        count += 1
    return count


def linear_weight_bytes(model: nn.Module) -> int:
    """Bytes of the weights replace_linear_layers would replace (the tied LM head counted once more)."""
    total = sum(m.weight.numel() * m.weight.element_size() for m in model.modules() if isinstance(m, nn.Linear))
    if not hasattr(model, "lm_head"):
        total += model.embed_tokens.weight.numel() * model.embed_tokens.weight.element_size()
    return total


CGROUP_MEMORY_FILES = (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),  # cgroup v2
                       ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"))


def available_memory() -> int:
    """Bytes this process may still allocate: the machine's free memory, or less under a cgroup limit (a
    container's, whose OOM killer does not care what the host has free)."""
    try:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 0
    for limit_file, usage_file in CGROUP_MEMORY_FILES:
        try:
            limit = open(limit_file).read().strip()
            usage = int(open(usage_file).read().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit():  # "max" (v2) or a huge number (v1): no limit
            free = min(free, max(int(limit) - usage, 0))
        break
    return free


def use_gemv(model: nn.Module, choice: str) -> bool:
    """Whether PackedLinear keeps a GEMV copy: `auto`, the kernel runs on this CPU for the model's dtype, and the
    copy fits in a quarter of the memory available now (it doubles the linear layers' bytes)."""
    if choice != "auto":
        return False
    from tessera.kernels import paged_attention_cpu

    dtype = next(model.parameters()).dtype
    if paged_attention_cpu.load("dense_gemv") is None or not torch.ops.tessera.gemv_available(dtype):
        return False
    copy, available = linear_weight_bytes(model), available_memory()
    if copy > available // 4:
        log.info("no GEMV copy of the weights for small decode batches: %.0f MiB would exceed a quarter of the "
                 "%.0f MiB available", copy / 2**20, available / 2**20)
        return False
    return True


def pack_linear_layers(model: nn.Module, gemv: bool = False, batches: str = "onednn") -> int:
    """Replaces the model's nn.Linear layers and its LM head with PackedLinear; returns how many were packed.
    gemv: each also keeps a copy for the native GEMV kernel (use_gemv decides); batches: as PackedLinear."""
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", PRIMITIVE_CACHE_CAPACITY)
    return replace_linear_layers(model, lambda weight, bias: PackedLinear(weight, bias, gemv, batches))
