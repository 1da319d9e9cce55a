"""Linear layers in int8 for the CPU (`--quantization int8`): int8 weights, int8 activations, int32 products.

Weights are quantized once at load, symmetric per output channel (scale = max |row| / 127), from the
checkpoint's own weights. Activations are quantized on every call, symmetric per token (per row of x), so one
outlier token does not cost the others their precision. The product runs in torch._int_mm, which on the CPU
is oneDNN's int8 GEMM: AVX512-VNNI (or AMX-INT8) dot products on both AMD and Intel, reading a quarter of
fp32's weight bytes, and at batch sizes where decode is bound by streaming weights that is most of the step.
The int32 result is rescaled by both scales into the activations' dtype.

For a decode step of one to a few requests (at most NATIVE_ROWS rows) the layer runs as one native kernel
instead (kernels/int8_linear_cpu.cpp): the same arithmetic in one pass, reading each weight row once, with the
same result bit for bit; oneDNN's GEMM streams the weights at a fraction of the bandwidth at one row. For more
rows the quantization and the rescale around oneDNN's GEMM are one native pass each (where the kernels built),
again bit for bit: as a dozen small PyTorch ops they took twice the GEMM's time at 64 rows.

Chosen over the alternatives measured side by side (2-core EPYC, AVX512-VNNI): ATen's weight-only
_weight_int8pack_mm was 1.6x faster than fp32 for one token but 2-4x slower than fp32 from 16 rows on;
FBGEMM's dynamic quantized linear was as fast but scales activations per tensor and rests on PyTorch's quantized
tensors, which are deprecated.
"""
from __future__ import annotations

import torch
from torch import nn

from tessera.int8_checkpoint import Int8Checkpoint
from tessera.kernels import paged_attention_cpu
from tessera.model_config import CheckpointError
from tessera.worker.models.packed_linear import padded_rows, replace_linear_layers

NATIVE_ROWS = 4  # up to this many rows (decode of a few requests) the native kernel; above, oneDNN's GEMM


def native_rows() -> int:
    """Rows up to which the native kernel runs: NATIVE_ROWS, or every count on a CPU without AVX-512, where
    oneDNN's int8 GEMM has no fast path (the bench model's linears at 64 rows: 1.4 s, ~30x float32's)
    and the kernel, which reads each weight row once for all rows of x, is the faster GEMM too."""
    return NATIVE_ROWS if torch.ops.tessera.int8_dot() in ("vnni", "avx512bw") else 1 << 62


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 values, fp32 scale per row) with x ~= values * scale; an all-zero row gets scale 1."""
    x = x.float()
    scale = x.abs().amax(dim=1, keepdim=True).div_(127.0)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.round(x / scale).clamp_(-127, 127).to(torch.int8), scale


class Int8Linear(nn.Module):
    """y = x W^T + b with W in int8 per output channel and x quantized per token on the fly."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, scale: torch.Tensor | None = None):
        """weight: float [out, in], quantized here; or, with `scale` ([out, 1]: a pre-quantized checkpoint's, see
        int8_checkpoint.py), its int8 values already, held in a float tensor, which holds them exactly."""
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        if scale is None:
            values, scale = quantize_rows(weight.detach())
        else:
            values = weight.detach().to(torch.int8)
        self.weight = values  # [out, in], row-major: the native kernel's layout
        self.weight_sums = values.sum(dim=1, dtype=torch.int32)  # the kernel's VNNI path takes them back off
        self.weight_t = values.t()  # [in, out]: _int_mm's layout, a view of the same bytes
        self.weight_scale = scale.reshape(1, -1)  # [1, out]
        self.bias = None if bias is None else bias.detach().float().clone()
        self.native = paged_attention_cpu.load("int8_linear")  # None without a compiler: oneDNN only
        self.native_rows = NATIVE_ROWS if self.native is None else native_rows()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[0]
        if rows <= self.native_rows and self.native is not None:
            return self.native(x, self.weight, self.weight_scale, self.weight_sums, self.bias)
        padded = padded_rows(rows)  # oneDNN compiles per row count, as in packed_linear.py
        if self.native is not None:  # the same arithmetic, the quantization and the rescale one pass each
            values, scale = torch.ops.tessera.int8_quantize_rows(x, padded)
            return torch.ops.tessera.int8_rescale(torch._int_mm(values, self.weight_t), scale, self.weight_scale,
                                                  self.bias, x.dtype)
        values, scale = quantize_rows(x)
        if padded != rows:
            values = torch.nn.functional.pad(values, (0, 0, 0, padded - rows))
        out = torch._int_mm(values, self.weight_t)[:rows].float().mul_(scale).mul_(self.weight_scale)
        if self.bias is not None:
            out.add_(self.bias)
        return out.to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


QUANTIZATIONS = ("int8",)


def quantize_linear_layers(model: nn.Module) -> int:
    """Replaces the model's nn.Linear layers and its LM head with Int8Linear; returns how many. Layers a
    pre-quantized checkpoint filled (add_weight_scales) keep its int8 values and scales; the rest are quantized."""
    count = 0
    for module_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and hasattr(child, "weight_scale"):
                values = child.weight.detach()
                if not (torch.equal(values, values.round()) and values.abs().max() <= 128):
                    raise CheckpointError(f"{module_name}.{name}: its weight is not int8 values, though "
                                          "quantization_config says the checkpoint stores them so")
                setattr(parent, name, Int8Linear(values, child.bias, child.weight_scale.detach().float()))
                count += 1
    return count + replace_linear_layers(model, Int8Linear)


def add_weight_scales(model: nn.Module, checkpoint: Int8Checkpoint) -> int:
    """Gives each linear layer that the int8 checkpoint holds quantized a float32 `weight_scale` [out, 1] to load
    (a fused layer's parts side by side, as its weight's rows); returns how many. Call on the unloaded model."""
    count = 0
    fused = getattr(model, "FUSED", {})
    for module_name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear):
            continue
        hf_name = module_name if module_name.startswith("lm_head") else f"model.{module_name}"
        parent, _, leaf = hf_name.rpartition(".")
        parts = [f"{parent}.{part}" if parent else part for part in fused.get(leaf, (leaf,))]
        quantized = [checkpoint.quantized(part) for part in parts]
        if any(quantized) != all(quantized):
            raise CheckpointError(f"quantization_config.ignore leaves only some of {', '.join(parts)} in floating "
                                  f"point; tessera runs them as one layer ({hf_name})")
        if all(quantized):
            module.weight_scale = nn.Parameter(torch.empty(module.out_features, 1, dtype=torch.float32,
                                                           device=module.weight.device), requires_grad=False)
            count += 1
    return count
