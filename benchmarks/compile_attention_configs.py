"""Offline compile sweep of the Triton attention kernels' launch configurations, without a GPU: how
kernels/attention.py's table entries were picked (their comment gives the rule and the
numbers), and how to re-pick them after a kernel change.

    python benchmarks/compile_attention_configs.py --kernel kv --arch 90 --dim 128 --layout contiguous
    python benchmarks/compile_attention_configs.py --kernel q --arch 80 --dim 64 --layout general \
        --configs 128,32,8,3 64,64,8,3

Each candidate (block_m, block_n, num_warps, num_stages) is compiled by triton.compile for the target
(sm_90a for --arch 90, sm_80), bf16, GROUP 4, causal, with the specialization Triton's JIT gives the
launches of that layout: general (pointers aligned, row strides multiples of 16, head-dim strides
unknown), contiguous (also head-dim strides the constant 1 and every other integer a multiple of 16
but the head counts; --heads-aligned adds those). One JSON line per candidate: stack (spill) bytes and
registers from cuobjdump, shared memory, HGMMA (wgmma) and HMMA (mma.sync) instructions in the SASS.
Then the zero-stack candidates that fit in shared memory, best first by the tables' rule: at least 2
stages, the larger block_m * block_n, more stages, the larger per-program block. Run it under each
triton version the project supports (e.g. PYTHONPATH=<a --target install of triton 3.6>) and keep
entries with zero stack under all. Needs a process without TRITON_INTERPRET.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile

KERNELS = {"fwd": "_attention_forward_kernel", "kv": "_attention_backward_kv_kernel", "q": "_attention_backward_q_kernel"}
SHARED_LIMIT = {90: 227 * 1024, 80: 163 * 1024}
FP32_POINTERS = {"lse_ptr", "stats_ptr", "delta_ptr", "cos_ptr", "sin_ptr"}
FP32_SCALARS = {"qk_scale", "sm_scale"}
HEAD_COUNTS = {"num_heads", "num_kv_heads"}
INT32_POINTERS = {"seg_ptr", "seg_start_ptr", "seg_end_ptr"}  # packed documents' bounds


def grid(kernel: str) -> list[tuple[int, int, int, int]]:
    """The sweep of the tables' comment: kv block_n a multiple of block_m, q and fwd block_m of block_n."""
    if kernel == "kv":
        blocks = [(m, n) for m in (16, 32, 64) for n in (32, 64, 128) if n % m == 0]
    else:
        blocks = [(m, n) for m in (32, 64, 128) for n in (16, 32, 64, 128) if m % n == 0]
    return [(m, n, w, s) for (m, n), w, s in itertools.product(blocks, (4, 8), (1, 2, 3))]


def cuobjdump(cubin: bytes, *flags: str) -> str:
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([tool, *flags, f.name], capture_output=True, text=True, check=True).stdout


def compile_config(kernel_name: str, arch: int, d_pad: int, layout: str, heads_aligned: bool, config,
                   packed: bool = False) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from llama_fast.kernels import attention

    kernel = getattr(attention, kernel_name)
    block_m, block_n, warps, stages = config
    constexprs = dict(GROUP=4, CAUSAL=True, BLOCK_M=block_m, BLOCK_N=block_n, D_PAD=d_pad, HALF_PAD=d_pad // 2,
                      PRECISION="tf32", SEGMENTED=packed)
    if not packed:  # batched, not packed documents: no bounds pointer
        constexprs.update({arg: None for arg in kernel.arg_names if arg in INT32_POINTERS})
    if "DELTA_PASS" in kernel.arg_names:  # the q kernel's fp32-only delta pass: the dQ pass is what is tuned
        constexprs["DELTA_PASS"] = False
    contiguous = layout == "contiguous"
    signature, attrs = {}, {}
    for i, arg in enumerate(kernel.arg_names):
        if arg in constexprs:
            signature[arg] = "constexpr"
        elif contiguous and arg.startswith("stride_") and arg.endswith("d"):
            constexprs[arg] = 1
            signature[arg] = "constexpr"
        elif arg.endswith("_ptr"):
            signature[arg] = "*fp32" if arg in FP32_POINTERS else "*i32" if arg in INT32_POINTERS else "*bf16"
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[arg] = "fp32" if arg in FP32_SCALARS else "i32"
            row_stride = arg.startswith("stride_") and not arg.endswith("d")
            sized = contiguous and (arg not in HEAD_COUNTS or heads_aligned)
            if arg not in FP32_SCALARS and (row_stride or sized):
                attrs[(i,)] = [["tt.divisibility", 16]]
    result = {"config": list(config)}
    try:
        compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=GPUTarget("cuda", arch, 32),
                                  options={"num_warps": warps, "num_stages": stages})
    except Exception as exc:  # a candidate the compiler rejects is reported, not fatal
        return {**result, "error": f"{type(exc).__name__}: {str(exc)[:200]}"}
    cubin = compiled.asm["cubin"]
    usage = {k: int(v) for k, v in re.findall(r"(\w+):(\d+)", cuobjdump(cubin, "--dump-resource-usage")
                                              .split("Resource usage:")[-1])}
    sass = cuobjdump(cubin, "-sass")
    return {**result, "stack": usage["STACK"], "registers": usage["REG"], "shared": compiled.metadata.shared,
            "HGMMA": len(re.findall(r"\bHGMMA\.", sass)), "HMMA": len(re.findall(r"\bHMMA\.", sass))}


def rank(kernel: str, result: dict) -> tuple:
    block_m, block_n, _, stages = result["config"]
    per_program = block_n if kernel == "kv" else block_m
    return (stages >= 2, block_m * block_n, stages, per_program)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kernel", choices=sorted(KERNELS), required=True)
    parser.add_argument("--arch", type=int, choices=sorted(SHARED_LIMIT), required=True)
    parser.add_argument("--dim", type=int, choices=(64, 128, 256), required=True, help="padded head dim")
    parser.add_argument("--layout", choices=("general", "contiguous"), required=True)
    parser.add_argument("--heads-aligned", action="store_true", help="head counts multiples of 16 too")
    parser.add_argument("--packed", action="store_true", help="packed documents (SEGMENTED, with document bounds)")
    parser.add_argument("--configs", nargs="*", help="block_m,block_n,warps,stages (default: the sweep)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("unset TRITON_INTERPRET: the interpreter does not compile")
    configs = [tuple(int(x) for x in c.split(",")) for c in args.configs] if args.configs else grid(args.kernel)
    results = []
    for config in configs:
        result = compile_config(KERNELS[args.kernel], args.arch, args.dim, args.layout, args.heads_aligned, config,
                                args.packed)
        print(json.dumps(result), flush=True)
        results.append(result)
    fit = [r for r in results if r.get("stack") == 0 and r["shared"] <= SHARED_LIMIT[args.arch]]
    import triton

    print(f"# zero stack, best first (triton {triton.__version__}, sm_{args.arch}, D {args.dim}, {args.layout}):")
    for r in sorted(fit, key=lambda r: rank(args.kernel, r), reverse=True):
        print(f"{tuple(r['config'])}  {r['registers']} registers, {r['shared'] / 1024:.0f} KB, "
              f"{r['HGMMA']} HGMMA, {r['HMMA']} HMMA")
    return 0


if __name__ == "__main__":
    sys.exit(main())
