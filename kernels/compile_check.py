"""Compile every kernel for NVIDIA GPUs on a machine without one: `python -m tessera.kernels.compile_check 80 90`.
`--launcher` instead builds what Triton compiles with the machine's C compiler at the first launch (the CUDA
image runs it at build time: without a compiler and Python's headers the engine would fail at its first step).

Triton's interpreter (how the tests run the kernels on a CPU) accepts code the GPU compiler rejects, e.g. a
tl.dot smaller than 16x16 or a tile too big for shared memory. Compilation needs no GPU (the triton wheel ships
ptxas), so this catches those errors anywhere. It must run without TRITON_INTERPRET, which turns the kernels
into Python functions that cannot be compiled.
"""
from __future__ import annotations

import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from tessera.kernels import kv_write, paged_attention, rms_norm, rotary


def _attention(dtype: str, group: int, head_dim: int, rows: int):
    group_pad = triton.next_power_of_2(group)
    pointers = dict(q_ptr=dtype, k_cache_ptr=dtype, v_cache_ptr=dtype, out_ptr=dtype,
                    query_start_loc_ptr="i32", seq_lens_ptr="i32", block_tables_ptr="i32")
    constants = dict(GROUP=group, GROUP_PAD=group_pad, HEAD_DIM=head_dim,
                     HEAD_PAD=max(triton.next_power_of_2(head_dim), 16), BLOCK_Q=max(rows // group_pad, 1),
                     BLOCK_N=64 if head_dim <= 128 and dtype != "fp32" else 32,
                     PRECISION="ieee" if dtype == "fp32" else "tf32", UPCAST=False)
    return paged_attention._paged_attention_kernel, pointers, dict(scale_log2="fp32"), constants


# (name, kernel, pointer element types, other non-i32 scalars, constexprs): the shapes production launches.
CASES = {
    "paged_attention bf16 decode, GQA 4, head 128": _attention("bf16", 4, 128, 16),
    "paged_attention bf16 prefill, GQA 4, head 128": _attention("bf16", 4, 128, 64),
    "paged_attention fp32 prefill, MHA, head 64": _attention("fp32", 1, 64, 64),
    "kv_write bf16": (kv_write._kv_write_kernel,
                      dict(k_ptr="bf16", v_ptr="bf16", key_cache_ptr="bf16", value_cache_ptr="bf16",
                           slot_mapping_ptr="i64"), {}, dict(HEAD_DIM=128, HEADS_PAD=8, HEAD_PAD=128)),
    "rms_norm bf16": (rms_norm._add_rms_norm_kernel,
                      dict.fromkeys(["x_ptr", "residual_ptr", "weight_ptr", "out_ptr", "residual_out_ptr"], "bf16"),
                      dict(eps="fp32"), dict(HAS_RESIDUAL=True, BLOCK=4096)),
    "rotary bf16": (rotary._rotary_kernel,
                    dict(q_ptr="bf16", k_ptr="bf16", positions_ptr="i64", cos_sin_ptr="fp32"), {},
                    dict(HALF=64, HALF_PAD=64, Q_HEADS_PAD=32, K_HEADS_PAD=8)),
}


def compile_case(kernel, pointers: dict, scalars: dict, constants: dict, arch: int):
    signature = {}
    for name in kernel.arg_names:
        if name in constants:
            signature[name] = "constexpr"
        elif name in pointers:
            signature[name] = "*" + pointers[name]
        else:
            signature[name] = scalars.get(name, "i32")
    constexprs = {(kernel.arg_names.index(name),): value for name, value in constants.items()}
    return triton.compile(ASTSource(kernel, signature, constexprs), target=GPUTarget("cuda", arch, 32))


def check_launcher() -> None:
    """Build Triton's CUDA driver module (driver.c, which every launch needs) as Triton itself does at run time,
    minus linking libcuda, which only a GPU host has: proves the C compiler, Python.h and cuda.h are there."""
    import os
    import tempfile

    from triton.backends.nvidia import driver
    from triton.runtime.build import _build

    with tempfile.TemporaryDirectory() as directory:
        source = os.path.join(driver.dirname, "driver.c")
        built = _build("cuda_utils", source, directory, [], driver.include_dirs, [], [])
        print(f"triton launcher build: ok ({os.path.getsize(built)} bytes)", flush=True)


def main(archs: list[int]) -> None:
    if not isinstance(paged_attention._paged_attention_kernel, triton.runtime.JITFunction):
        sys.exit("unset TRITON_INTERPRET: interpreted kernels cannot be compiled")
    for arch in archs:
        for name, case in CASES.items():
            compiled = compile_case(*case, arch=arch)
            print(f"sm_{arch} {name}: ok, {compiled.metadata.shared} bytes of shared memory", flush=True)


if __name__ == "__main__":
    if sys.argv[1:] == ["--launcher"]:
        check_launcher()
    else:
        main([int(arch) for arch in sys.argv[1:]] or [80, 90])
