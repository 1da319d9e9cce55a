"""The native CPU kernels: paged decode attention (paged_attention_cpu.cpp), the int8 and the float32/bfloat16
linear layers for a few rows (int8_linear_cpu.cpp, dense_gemv_cpu.cpp), a layer's small ops fused
(decode_ops_cpu.cpp) and bf16 prompt attention over the paged cache (prefill_attention_cpu.cpp), each its own
library, built on first use, then loaded.

The PyTorch backend gathers every decode's KV blocks into a padded copy before SDPA, which moves the KV cache
through memory three times; the kernel reads each block in place once. It is compiled with the machine's C++
compiler by torch.utils.cpp_extension (ninja) for the vector ISA PyTorch detected, and cached in
$TORCH_EXTENSIONS_DIR/tessera (default ~/.cache/torch_extensions/tessera), so only the first start on a machine
pays the ~15 s build; a complete build is loaded as is, with no compiler (the CPU image ships one per ISA, built
with `python -m tessera.kernels.paged_attention_cpu <ISA>`). With no compiler, or TESSERA_NATIVE_CPU_KERNELS=0, load() returns None and the backend
keeps its PyTorch path (the kernel's reference, tests/test_cpu_kernel.py).
"""
from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import re
import threading
import time
from pathlib import Path

import torch

log = logging.getLogger("tessera.kernels")

SOURCE = Path(__file__).with_suffix(".cpp")  # the attention kernel
# kernel -> (source, the op load() returns (others it registers are in torch.ops.tessera once it is loaded), whether
# -ffast-math may reorder its float math). The attention's dot products want reassociation; the int8 layer and the
# small ops must round exactly as their PyTorch paths do (true division, no reciprocals, no fused multiply-adds).
KERNELS = {
    "paged_attention": (SOURCE, "paged_decode_attention", True),
    "int8_linear": (SOURCE.with_name("int8_linear_cpu.cpp"), "int8_linear_rows", False),
    "decode_ops": (SOURCE.with_name("decode_ops_cpu.cpp"), "add_rms_norm", False),
    "dense_gemv": (SOURCE.with_name("dense_gemv_cpu.cpp"), "gemv", False),
    "prefill_attention": (SOURCE.with_name("prefill_attention_cpu.cpp"), "paged_prefill_attention", False),
}
ISA_FLAGS = {  # what torch.backends.cpu.get_cpu_capability() reports -> the flags that let loops use it
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma"],
    "AVX2": ["-mavx2", "-mfma"],
}

BUILT = "built"  # written after a complete build: its presence means the library can be loaded as is
_lock = threading.Lock()
_loaded: dict[str, object] = {}


def enabled() -> bool:
    return os.environ.get("TESSERA_NATIVE_CPU_KERNELS", "1") != "0"


def load(kernel: str = "paged_attention"):
    """The kernel's op (torch.ops.tessera.paged_decode_attention by default), building it if needed; None when it
    cannot be had."""
    if not enabled():
        return None
    with _lock:
        if kernel not in _loaded:
            _loaded[kernel] = _build(kernel=kernel)
        return _loaded[kernel]


def build_directory(capability: str | None = None, kernel: str = "paged_attention") -> Path:
    """$TORCH_EXTENSIONS_DIR/tessera/<name>: one build per vector ISA, torch version and source, since each
    changes the binary and venvs may share the cache."""
    capability = capability or torch.backends.cpu.get_cpu_capability()
    path = KERNELS[kernel][0]
    headers = b"".join(header.read_bytes() for header in sorted(path.parent.glob("*.h")))  # e.g. vec_exp.h
    source = path.read_bytes() + headers + repr(compile_flags(capability, kernel)).encode()
    digest = hashlib.sha256(source).hexdigest()[:12]
    name = f"{path.stem}_{capability.lower()}_torch{re.sub(r'[^0-9A-Za-z]', '_', torch.__version__)}_{digest}"
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions"
    return Path(root) / "tessera" / name


def compile_flags(capability: str, kernel: str) -> list[str]:
    # -ffast-math lets the dot products reassociate into vector lanes; scores are never inf or NaN.
    fast_math = KERNELS[kernel][2]
    return ["-O3", "-ffast-math" if fast_math else "-ffp-contract=off", "-fopenmp", *ISA_FLAGS.get(capability, [])]


def _build(capability: str | None = None, kernel: str = "paged_attention", load_library: bool = True):
    """The kernel's op, built first if needed. load_library=False only builds it (True when it is built): a
    library for another ISA than this CPU's may not even load here (an AVX-512 one dies of SIGILL on an AVX2
    machine building a multi-ISA image)."""
    capability = capability or torch.backends.cpu.get_cpu_capability()
    path, op, _ = KERNELS[kernel]
    directory = build_directory(capability, kernel)
    library = directory / f"tessera_{directory.name}.so"
    start = time.perf_counter()
    try:
        if (directory / BUILT).exists():  # built before (an image, an earlier start): no compiler needed
            if not load_library:
                return True
            torch.ops.load_library(str(library))
            return getattr(torch.ops.tessera, op)
        from torch.utils import cpp_extension

        directory.mkdir(parents=True, exist_ok=True)
        with open(directory / "tessera.lock", "w") as lock:
            # torch guards a build with a lock *file* that a killed build leaves behind, and then every later
            # start waits on it forever. An flock dies with its process: whoever holds it is the only builder,
            # so a torch lock file found then is stale.
            fcntl.flock(lock, fcntl.LOCK_EX)
            (directory / "lock").unlink(missing_ok=True)
            log.info("building the native CPU %s kernel for %s (first start on this machine, ~20 s)...", kernel,
                     capability)
            options = dict(name=f"tessera_{directory.name}", sources=[str(path)],
                           extra_cflags=compile_flags(capability, kernel), extra_ldflags=["-fopenmp"],
                           build_directory=str(directory))
            if load_library:
                cpp_extension.load(**options, is_python_module=False)
            else:  # what load() runs before it loads the library (a private function of torch's, stable in 2.x)
                cpp_extension._write_ninja_file_and_build_library(
                    **options, extra_cuda_cflags=None, extra_sycl_cflags=None, extra_include_paths=None,
                    verbose=False, with_cuda=False, with_sycl=False)
            (directory / BUILT).touch()  # last: a build killed before this point is redone
    except Exception as e:  # no compiler, no ninja, a read-only cache...: the PyTorch path still works
        log.warning("native CPU %s kernel unavailable, using its PyTorch path instead: %s", kernel,
                    str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__)
        return None
    log.info("native CPU %s kernel %s (%s, %.1f s)", kernel, "ready" if load_library else "built", capability,
             time.perf_counter() - start)
    return getattr(torch.ops.tessera, op) if load_library else True


if __name__ == "__main__":
    # `python -m tessera.kernels.paged_attention_cpu AVX2` builds the kernel for that ISA whatever this machine
    # has (images ship one per ISA, so no container needs a compiler). One ISA per process: each build registers
    # the same op name.
    import sys

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    isa = sys.argv[1] if len(sys.argv) > 1 else torch.backends.cpu.get_cpu_capability()
    native = isa == torch.backends.cpu.get_cpu_capability()  # only this CPU's own ISA is loaded to check it
    sys.exit(0 if all(_build(isa, kernel, load_library=native) for kernel in KERNELS) else 1)
