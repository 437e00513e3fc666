"""The Triton kernels compile for an H100 (sm_90) without a GPU, and their hot loads vectorize.

CI runs the kernels only in the interpreter, which accepts code the compiler rejects (and the
reverse); compiling to PTX here catches that. Arguments get the specializations the JIT gives real
launches (16-byte aligned pointers, strides and sizes divisible by 16), so the PTX must move
16-byte vectors (ld.global.v4) as it will on the GPU.
"""
import json
import os
import re
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU, the gpu tests compile and run these")

BF16 = "*bf16"
RMS_FWD = dict(x_ptr=BF16, x_row_stride="i32", res_ptr=BF16, res_row_stride="i32", w_ptr="*fp32", y_ptr=BF16,
               sum_ptr=BF16, rstd_ptr="*fp32", N="i32", eps="fp32")
RMS_BWD = dict(dy_ptr=BF16, dy_row_stride="i32", x_ptr=BF16, x_row_stride="i32", w_ptr=BF16, rstd_ptr="*fp32",
               dsum_ptr=BF16, dx_ptr=BF16, partial_ptr="*fp32", rows="i32", N="i32")
SWIGLU_FWD = dict(gate_ptr=BF16, gate_row_stride="i32", up_ptr=BF16, up_row_stride="i32", y_ptr=BF16, F="i32")
SWIGLU_BWD = dict(dy_ptr=BF16, dy_row_stride="i32", gate_ptr=BF16, gate_row_stride="i32", up_ptr=BF16,
                  up_row_stride="i32", dgate_ptr=BF16, dup_ptr=BF16, d_row_stride="i32", F="i32")
ROPE = dict(q_ptr=BF16, q_sb="i32", q_ss="i32", q_sh="i32", q_sd="i32", k_ptr=BF16, k_sb="i32", k_ss="i32",
            k_sh="i32", k_sd="i32", q_out_ptr=BF16, k_out_ptr=BF16, cos_ptr="*fp32", sin_ptr="*fp32",
            cs_row_stride="i32", S="i32", Hq="i32", Hkv="i32", HALF="i32")
# Runtime arguments not specialized as divisible by 16 (head counts, strides of size-1 dims, ...).
UNALIGNED = {"q_sd", "k_sd", "S", "Hq", "Hkv", "rows"}

# (name, module, kernel, signature, constexprs, num_warps, must use 16-byte loads)
CASES = [
    ("rms_norm fwd + residual", "rms_norm", "rms_norm_forward_kernel", RMS_FWD,
     dict(HAS_RESIDUAL=True, BLOCK=4096, ONE_BLOCK=True), 8, True),
    ("rms_norm fwd, wide rows", "rms_norm", "rms_norm_forward_kernel", RMS_FWD,
     dict(HAS_RESIDUAL=False, BLOCK=8192, ONE_BLOCK=False), 16, True),
    ("rms_norm bwd", "rms_norm", "rms_norm_backward_kernel", RMS_BWD,
     dict(HAS_DSUM=True, BLOCK=4096, ONE_BLOCK=True), 8, True),
    ("rms_norm bwd, wide rows", "rms_norm", "rms_norm_backward_kernel", RMS_BWD,
     dict(HAS_DSUM=False, BLOCK=8192, ONE_BLOCK=False), 16, False),
    ("swiglu fwd", "swiglu", "swiglu_forward_kernel", SWIGLU_FWD, dict(BLOCK=2048), 8, True),
    ("swiglu bwd", "swiglu", "swiglu_backward_kernel", SWIGLU_BWD, dict(BLOCK=2048), 8, True),
    ("rope", "rope", "rope_kernel", ROPE,
     dict(BACKWARD=False, HALF_BLOCK=64, BLOCK_H=32, Q_D_CONTIGUOUS=True, K_D_CONTIGUOUS=True), 8, True),
    ("rope bwd, strided head dim", "rope", "rope_kernel", ROPE,
     dict(BACKWARD=True, HALF_BLOCK=64, BLOCK_H=32, Q_D_CONTIGUOUS=False, K_D_CONTIGUOUS=True), 8, False),
]


def compile_all() -> dict:
    """Compiles every case to PTX for sm_90; {name: error message or "ok"}. Needs a process
    without TRITON_INTERPRET, where @triton.jit gives real JIT functions."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    results = {}
    for name, module, kernel_name, signature, constexprs, num_warps, vectorized in CASES:
        kernel = getattr(importlib.import_module(f"llama_fast.kernels.{module}"), kernel_name)
        full = {arg: "constexpr" if arg in constexprs else signature[arg] for arg in kernel.arg_names}
        attrs = {
            (i,): [["tt.divisibility", 16]]
            for i, arg in enumerate(kernel.arg_names)
            if arg not in constexprs and arg not in UNALIGNED and signature[arg][0] in "*i"
        }
        try:
            compiled = triton.compile(
                ASTSource(kernel, full, constexprs, attrs), target=GPUTarget("cuda", 90, 32),
                options={"num_warps": num_warps},
            )
        except Exception as exc:  # reported per case by the test
            results[name] = f"does not compile: {type(exc).__name__}: {exc}"
            continue
        ptx = compiled.asm["ptx"]
        scalar_bf16 = re.findall(r"ld\.global(?:\.\w+)*\.b16", ptx)
        if vectorized and (scalar_bf16 or not re.search(r"ld\.global(?:\.\w+)*\.v4", ptx)):
            results[name] = f"compiles, but {len(scalar_bf16)} scalar bf16 loads (expected 16-byte vectors)"
        else:
            results[name] = "ok"
    return results


def test_kernels_compile_for_sm90_with_vector_loads():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    run = subprocess.run([sys.executable, __file__], capture_output=True, text=True, env=env)
    if run.returncode != 0 and "No module named 'triton" in run.stderr:
        pytest.skip("triton is not installed")
    assert run.returncode == 0, run.stderr[-5000:]
    results = json.loads(run.stdout.strip().splitlines()[-1])
    assert results == {case[0]: "ok" for case in CASES}


if __name__ == "__main__":
    print(json.dumps(compile_all()))
