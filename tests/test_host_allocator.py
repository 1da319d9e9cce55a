"""The worker's glibc malloc settings: a step's large temporaries come from the heap, where freed memory is
reused, instead of fresh mmaps that page-fault in again every step."""
from __future__ import annotations

import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt only")

# Where does a fresh 16 MiB malloc land: in the [heap] mapping, or in a mapping of its own?
SCRIPT = """
import ctypes, sys
from tessera.worker.host_allocator import keep_large_allocations_in_heap
if sys.argv[1] == "tuned":
    assert keep_large_allocations_in_heap() and keep_large_allocations_in_heap()  # idempotent
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
address = libc.malloc(16 << 20)
for line in open("/proc/self/maps"):
    span, name = line.split()[0], line.split()[-1]
    low, high = (int(x, 16) for x in span.split("-"))
    if low <= address < high:
        print("heap" if name == "[heap]" else "mmap")
"""


def placement(mode: str) -> str:
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True)
    return out.stdout.strip()


def test_large_temporaries_come_from_the_heap():
    assert placement("default") == "mmap"
    assert placement("tuned") == "heap"
