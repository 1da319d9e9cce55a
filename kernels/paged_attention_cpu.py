"""The native CPU paged decode-attention kernel (paged_attention_cpu.cpp): built on first use, then loaded.

The PyTorch backend gathers every decode's KV blocks into a padded copy before SDPA, which moves the KV cache
through memory three times; the kernel reads each block in place once. It is compiled with the machine's C++
compiler by torch.utils.cpp_extension (ninja) for the vector ISA PyTorch detected, and cached in
$TORCH_EXTENSIONS_DIR/tessera (default ~/.cache/torch_extensions/tessera), so only the first start on a machine
pays the ~15 s build. With no compiler, or TESSERA_NATIVE_CPU_KERNELS=0, load() returns None and the backend
keeps its PyTorch path (the kernel's reference, tests/test_cpu_kernel.py).
"""
from __future__ import annotations

import fcntl
import logging
import os
import re
import threading
import time
from pathlib import Path

import torch

log = logging.getLogger("tessera.kernels")

SOURCE = Path(__file__).with_suffix(".cpp")
ISA_FLAGS = {  # what torch.backends.cpu.get_cpu_capability() reports -> the flags that let loops use it
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma"],
    "AVX2": ["-mavx2", "-mfma"],
}

_lock = threading.Lock()
_loaded: dict[str, object] = {}


def enabled() -> bool:
    return os.environ.get("TESSERA_NATIVE_CPU_KERNELS", "1") != "0"


def load():
    """torch.ops.tessera.paged_decode_attention, building it if needed; None when it cannot be had."""
    if not enabled():
        return None
    with _lock:
        if "op" not in _loaded:
            _loaded["op"] = _build()
        return _loaded["op"]


def build_directory() -> Path:
    """$TORCH_EXTENSIONS_DIR/tessera/<name>: one build per vector ISA and torch version, since both change the
    binary and venvs may share the cache."""
    capability = torch.backends.cpu.get_cpu_capability()
    name = f"paged_attention_cpu_{capability.lower()}_torch{re.sub(r'[^0-9A-Za-z]', '_', torch.__version__)}"
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions"
    return Path(root) / "tessera" / name


def _build():
    from torch.utils import cpp_extension

    capability = torch.backends.cpu.get_cpu_capability()
    directory = build_directory()
    start = time.perf_counter()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with open(directory / "tessera.lock", "w") as lock:
            # torch guards a build with a lock *file* that a killed build leaves behind, and then every later
            # start waits on it forever. An flock dies with its process: whoever holds it is the only builder,
            # so a torch lock file found then is stale.
            fcntl.flock(lock, fcntl.LOCK_EX)
            (directory / "lock").unlink(missing_ok=True)
            cpp_extension.load(
                name=f"tessera_{directory.name}",
                sources=[str(SOURCE)],
                # -ffast-math lets the dot products reassociate into vector lanes; scores are never inf or NaN.
                extra_cflags=["-O3", "-ffast-math", "-fopenmp", *ISA_FLAGS.get(capability, [])],
                extra_ldflags=["-fopenmp"],
                build_directory=str(directory),
                is_python_module=False,
            )
    except Exception as e:  # no compiler, no ninja, a read-only cache...: the PyTorch path still works
        log.warning("native CPU attention kernel unavailable, using PyTorch gather + SDPA instead: %s",
                    str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__)
        return None
    log.info("native CPU attention kernel ready (%s, %.1f s)", capability, time.perf_counter() - start)
    return torch.ops.tessera.paged_decode_attention
