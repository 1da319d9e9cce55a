"""Which device the worker runs on, and what goes with it: the attention backend and the default dtype.

The choice is `--device auto|cpu|cuda|tpu` or the TESSERA_DEVICE environment variable (like vLLM's
VLLM_TARGET_DEVICE). `auto` takes the best device present: a CUDA GPU, else a TPU, else the CPU, so an install
with no accelerator at all just works. Asking for a device that is not there fails at once, saying what to
install, instead of falling back to the CPU without a word.
"""
from __future__ import annotations

import importlib.util
import os

import torch

from tessera.worker.attention.backend import AttentionBackend

DEVICE_ENV = "TESSERA_DEVICE"
DEVICES = ("auto", "cpu", "cuda", "tpu")


class DeviceError(RuntimeError):
    """The asked-for device is missing, or its software is not installed."""


def resolve_device(name: str | None = None) -> torch.device:
    """auto, cpu, cuda (or cuda:N), tpu; None reads TESSERA_DEVICE, and auto when that is unset too."""
    name = (name or os.environ.get(DEVICE_ENV) or "auto").strip().lower()
    kind = name.partition(":")[0]
    if kind == "auto":
        if torch.cuda.is_available():
            return _cuda_device("cuda")
        if _tpu_present():
            return _xla_device()
        return torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    if kind == "cuda":
        return _cuda_device(name)
    if name in ("tpu", "xla"):
        return _xla_device()
    raise DeviceError(f"device: '{name}' is not one of {', '.join(DEVICES)} (set by --device or {DEVICE_ENV})")


def attention_backend_for(device: torch.device) -> AttentionBackend:
    """cpu: PyTorch (gather + SDPA); cuda: the Triton kernels; xla: torch-xla's ragged paged attention."""
    if device.type == "cuda":
        from tessera.worker.attention.triton_backend import TritonAttentionBackend

        return TritonAttentionBackend()
    if device.type == "xla":
        try:
            from tessera.worker.attention.xla_backend import XlaAttentionBackend
        except ModuleNotFoundError as e:
            if e.name != "tessera.worker.attention.xla_backend":
                raise
            raise DeviceError("device 'tpu': this tessera has no XLA attention backend "
                              "(tessera/worker/attention/xla_backend.py)") from e
        return XlaAttentionBackend()
    from tessera.worker.attention.torch_backend import TorchAttentionBackend

    return TorchAttentionBackend()


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: oneDNN then runs bf16 matmuls natively, on half the bytes of fp32 weights."""
    checks = (getattr(torch.cpu, "_is_avx512_bf16_supported", None), getattr(torch.cpu, "_is_amx_tile_supported", None))
    return any(check is not None and check() for check in checks)


def default_dtype_for(device: torch.device, checkpoint_dtype: torch.dtype | None = None,
                      auto: bool = False) -> torch.dtype | None:
    """The dtype to run in when none is named; None keeps the checkpoint's own.

    CUDA: bf16, which has fp32's range, so no overflow in activations (fp16 before Ampere). `auto` on a CPU with
    native bf16 (AVX512-BF16, AMX) also serves an fp32 or fp16 checkpoint in bf16, as vLLM's CPU backend does:
    decode streams every weight once per step, so half the bytes is nearly twice the speed."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if auto and device.type == "cpu" and checkpoint_dtype in (torch.float32, torch.float16) and cpu_has_native_bf16():
        return torch.bfloat16
    return None


def _cuda_device(name: str) -> torch.device:
    if torch.version.cuda is None:
        raise DeviceError(f"device '{name}': this torch ({torch.__version__}) is built without CUDA. Install a CUDA "
                          "build of torch (https://pytorch.org/get-started), then `pip install -e .[cuda]`")
    if not torch.cuda.is_available():
        raise DeviceError(f"device '{name}': no CUDA GPU is visible (check nvidia-smi, the driver and "
                          "CUDA_VISIBLE_DEVICES), or run with --device cpu")
    if not _has_triton():
        raise DeviceError(f"device '{name}' runs attention with Triton, which is not installed: "
                          "`pip install -e .[cuda]`")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise DeviceError(f"device: '{name}' is not a valid CUDA device name (cuda or cuda:N)") from e
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise DeviceError(f"device '{name}': only {torch.cuda.device_count()} CUDA device(s) are visible")
    return device


def _xla_device() -> torch.device:
    try:
        import torch_xla
    except ImportError as e:
        raise DeviceError("device 'tpu' needs torch_xla: `pip install -e .[tpu]` on a TPU VM "
                          "(with PJRT_DEVICE=CPU it also runs on a CPU, for tests)") from e
    if hasattr(torch_xla, "device"):
        return torch_xla.device()
    import torch_xla.core.xla_model as xm  # torch_xla < 2.5

    return xm.xla_device()


def _tpu_present() -> bool:
    """torch_xla is installed and PJRT is told to use a TPU, or finds TPU chips on this host."""
    if importlib.util.find_spec("torch_xla") is None:
        return False
    pjrt_device = os.environ.get("PJRT_DEVICE")
    if pjrt_device:
        return pjrt_device.upper() == "TPU"
    try:
        from torch_xla._internal import tpu  # what torch_xla itself asks when PJRT_DEVICE is unset

        return tpu.num_available_chips() > 0
    except Exception:  # an internal module: if it moves, auto simply does not pick the TPU
        return False


def _has_triton() -> bool:
    return importlib.util.find_spec("triton") is not None
