"""The Triton kernels compile for the GPUs they are tuned for, without a GPU.

CI runs the kernels only in the interpreter, which accepts code the compiler rejects (and the
reverse); compiling here catches that. Arguments get the specializations the JIT gives real
launches (16-byte aligned pointers, strides and sizes divisible by 16).

* Elementwise kernels (sm_90): the PTX must move 16-byte vectors (ld.global.v4) as it will on the GPU.
* Attention: every entry of the launch tables in kernels/attention.py and every fallback, for the
  GPU generation it is chosen for (sm_90a for Hopper, sm_80 for Ampere), and the backward's prep
  kernel, compile to cubins that fit that GPU's shared memory, multiply on the tensor cores (the
  forward with wgmma on Hopper at head dims 64 and 128; the backward tables trade wgmma for no
  spills where they must, see their comment), and, for head dims up to 128, spill at most their
  SPILL_BUDGET to local memory (ptxas's stack frame, read with the cuobjdump that ships with triton).
  A spilling configuration runs, correctly, several times slower: nothing else would show it before
  a GPU does. The backward's tables come in two layouts, each compiled as the JIT specializes its
  launches: general (head-dim strides unknown) and contiguous (head-dim strides the constant 1,
  other sizes multiples of 16; kernels/attention.py's _contiguous_launch picks it at launch).
* The proof for Hopper: on sm_90a, bf16, D = 128, the contiguous launches of both Triton backward
  kernels multiply with wgmma (HGMMA in the SASS) and use no stack and no local memory; the forward's
  key loops issue only wgmma with N >= 64, no local memory and at most 3 barriers per iteration.
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
CROSS_ENTROPY = dict(logits_ptr=BF16, row_stride="i32", targets_ptr="*i64", loss_ptr="*fp32", V="i32",
                     ignore_index="i32")
# Runtime arguments not specialized as divisible by 16 (head counts, strides of size-1 dims, ...).
UNALIGNED = {"q_sd", "k_sd", "S", "Hq", "Hkv", "rows", "ignore_index"}

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
    ("cross-entropy rows", "cross_entropy", "cross_entropy_kernel", CROSS_ENTROPY,
     dict(BLOCK=4096, WRITE_GRAD=True), 8, True),
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


# ------------------------------------------------------------------------------------------------
# Attention: every launch-table entry on the GPU generation it is tuned for
# ------------------------------------------------------------------------------------------------
ARCHS = {9: 90, 8: 80}  # table row (compute capability major) -> target compiled for
SHARED_LIMIT = {90: 227 * 1024, 80: 163 * 1024}  # opt-in shared memory per block: H100, A100
# Bytes of ptxas stack frame tolerated at head dims <= 128: none for the table entries and the
# backward's prep kernel (their comments in kernels/attention.py say zero, and this holds them to
# that; the forward's entries spilled 16-144 B while it rotated K in its loop), a little for every fallback.
# Packed documents (SEGMENTED) reuse the batched entries: their bound loads and masks cost a few registers
# (backward kv D64 on sm_90 spilled 40 B under triton 3.9 when added); held to the fallbacks' budget.
SPILL_BUDGET = {"tuned": 0, "tuned backward": 0, "fallback": 256, "packed": 256}
FP32_POINTERS = {"stats_ptr", "delta_ptr", "cos_ptr", "sin_ptr"}
FP32_SCALARS = {"qk_scale", "sm_scale"}
HEAD_COUNTS = {"num_heads", "num_kv_heads"}
INT32_POINTERS = {"seg_ptr", "seg_start_ptr", "seg_end_ptr"}  # packed documents' bounds
# The batched launches: no document bounds (their pointer is None, a constexpr).
UNSEGMENTED = {"forward": dict(SEGMENTED=False, seg_ptr=None),
               "backward kv": dict(SEGMENTED=False, seg_end_ptr=None),
               "backward q": dict(SEGMENTED=False, seg_start_ptr=None)}


def _base(label: str) -> str:
    """The kernel of a case label: "backward kv contiguous" -> "backward kv"."""
    return label.removesuffix(" contiguous")


def _contiguous_strides(kernel_name: str) -> dict:
    """The head-dim strides of a kernel as the JIT specializes a contiguous launch: the constant 1."""
    from llama_fast.kernels import attention as attn

    return {a: 1 for a in getattr(attn, kernel_name).arg_names if a.startswith("stride_") and a.endswith("d")}


def _attention_cases() -> list:
    """(name, kernel, arch, constexprs, num_warps, num_stages, spill budget or None, wants wgmma, contiguous)."""
    from llama_fast.kernels import attention as attn

    kernels = [("forward", "_attention_forward_kernel", attn._FORWARD_CONFIGS, attn._FORWARD_FALLBACKS, False),
               ("forward contiguous", "_attention_forward_kernel", attn._FORWARD_CONTIGUOUS_CONFIGS,
                attn._FORWARD_FALLBACKS, True),
               ("backward kv", "_attention_backward_kv_kernel", attn._BACKWARD_KV_CONFIGS, attn._BACKWARD_KV_FALLBACKS,
                False),
               ("backward q", "_attention_backward_q_kernel", attn._BACKWARD_Q_CONFIGS, attn._BACKWARD_Q_FALLBACKS,
                False),
               ("backward kv contiguous", "_attention_backward_kv_kernel", attn._BACKWARD_KV_CONTIGUOUS_CONFIGS,
                attn._BACKWARD_KV_FALLBACKS, True),
               ("backward q contiguous", "_attention_backward_q_kernel", attn._BACKWARD_Q_CONTIGUOUS_CONFIGS,
                attn._BACKWARD_Q_FALLBACKS, True)]
    cases = []
    for row, arch in ARCHS.items():
        for label, kernel_name, table, fallbacks, contiguous in kernels:
            tuned_budget = SPILL_BUDGET["tuned backward" if label.startswith("backward") else "tuned"]
            entries = [("", d_pad, config, tuned_budget) for d_pad, config in table[row].items()]
            entries += [("fallback ", 128, config, SPILL_BUDGET["fallback"]) for config in fallbacks]
            for kind, d_pad, (block_m, block_n, warps, stages), budget in entries:
                constexprs = dict(GROUP=4, CAUSAL=True, BLOCK_M=block_m, BLOCK_N=block_n, D_PAD=d_pad,
                                  HALF_PAD=d_pad // 2, PRECISION="tf32", **UNSEGMENTED[_base(label)])
                if contiguous:
                    constexprs.update(_contiguous_strides(kernel_name))
                # wgmma on Hopper at head dims 64 and 128: the forward, and the backward's contiguous entries.
                wants_wgmma = (_base(label) == "forward" or contiguous) and not kind and arch == 90 and d_pad <= 128
                cases.append((f"{label} {kind}D{d_pad} sm_{arch} {(block_m, block_n, warps, stages)}", kernel_name,
                              arch, constexprs, warps, stages, budget if d_pad <= 128 else None, wants_wgmma,
                              contiguous))
        # Specializations the tables also serve on Hopper: no grouping and no causal mask (a plain
        # multi-head, non-causal call), and head dims up to 32 (padded to 32, run with the D64 entry).
        if arch == 90:
            for label, kernel_name, table, _, contiguous in kernels:
                budget = SPILL_BUDGET["tuned backward" if label.startswith("backward") else "tuned"]
                for d_pad, table_d, group, causal in ((128, 128, 1, False), (32, 64, 4, True)):
                    block_m, block_n, warps, stages = table[row][table_d]
                    constexprs = dict(GROUP=group, CAUSAL=causal, BLOCK_M=block_m, BLOCK_N=block_n, D_PAD=d_pad,
                                      HALF_PAD=d_pad // 2, PRECISION="tf32", **UNSEGMENTED[_base(label)])
                    if contiguous:
                        constexprs.update(_contiguous_strides(kernel_name))
                    cases.append((f"{label} D{d_pad} sm_{arch} GROUP={group} causal={causal}", kernel_name, arch,
                                  constexprs, warps, stages, budget, (_base(label) == "forward" or contiguous) and d_pad >= 64,
                                  contiguous))
                # Packed documents (ops.attention with cu_seqlens) run the same entries with SEGMENTED (the
                # forward: its packed tables).
                if _base(label) == "forward":
                    table = attn._forward_table(contiguous, packed=True)
                for d_pad in (64, 128):
                    block_m, block_n, warps, stages = table[row][d_pad]
                    constexprs = dict(GROUP=4, CAUSAL=True, SEGMENTED=True, BLOCK_M=block_m, BLOCK_N=block_n,
                                      D_PAD=d_pad, HALF_PAD=d_pad // 2, PRECISION="tf32")
                    if contiguous:
                        constexprs.update(_contiguous_strides(kernel_name))
                    cases.append((f"{label} D{d_pad} sm_{arch} packed documents", kernel_name, arch, constexprs,
                                  warps, stages, SPILL_BUDGET["packed"], _base(label) == "forward", contiguous))
        # fp32 inputs: the q kernel's delta pass (and its dQ pass) on the configurations an fp32 launch can take
        # (the tables are sized for 16-bit tiles; _launch_first_fitting falls back): each must compile.
        for delta_pass in (True, False):
            for block_m, block_n, warps, stages in attn._BACKWARD_Q_FALLBACKS:
                constexprs = dict(GROUP=4, CAUSAL=True, BLOCK_M=block_m, BLOCK_N=block_n, D_PAD=128, HALF_PAD=64,
                                  PRECISION="ieee", DELTA_PASS=delta_pass, **UNSEGMENTED["backward q"])
                cases.append((f"backward q fp32 delta_pass={delta_pass} D128 sm_{arch} "
                              f"{(block_m, block_n, warps, stages)}", "_attention_backward_q_kernel", arch, constexprs,
                              warps, stages, None, False, False))
        for d_pad in (64, 128, 256):
            for delta in (True, False):
                constexprs = dict(DELTA=delta, BLOCK_M=attn._prep_rows(d_pad), D_PAD=d_pad, HALF_PAD=d_pad // 2)
                cases.append((f"backward prep D{d_pad} sm_{arch} delta={delta}", "_backward_prep_kernel", arch,
                              constexprs, 4, 3, 0, False, False))
    return cases


def _cuobjdump(cubin: bytes, *flags: str) -> str:
    """cuobjdump's output for a cubin (the cuobjdump that ships with triton)."""
    import tempfile

    import triton

    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([cuobjdump, *flags, f.name], capture_output=True, text=True, check=True).stdout


def _resource_usage(cubin: bytes) -> dict:
    """{'REG': n, 'STACK': bytes, 'SHARED': bytes, ...} of the one kernel in a cubin."""
    out = _cuobjdump(cubin, "--dump-resource-usage")
    return {k: int(v) for k, v in re.findall(r"(\w+):(\d+)", out.split("Resource usage:")[-1])}


def _compile_attention_kernel(kernel_name: str, arch: int, constexprs: dict, warps: int, stages: int,
                              contiguous: bool, dtype: str = BF16):
    """Compiles one attention kernel (bf16, fp32 statistics and tables) with the specialization the
    JIT gives its launches: pointers 16-byte aligned and row strides multiples of 16 always; for a
    contiguous launch also the head-dim strides as the constant 1 (in constexprs) and every other
    integer a multiple of 16 but the head counts (GQA groups of 8 kv heads are common)."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = getattr(importlib.import_module("llama_fast.kernels.attention"), kernel_name)
    if "DELTA_PASS" in kernel.arg_names:  # the q kernel's fp32-only delta pass: the dQ pass is what is tuned
        constexprs = {"DELTA_PASS": False, **constexprs}
    signature, attrs = {}, {}
    for i, arg in enumerate(kernel.arg_names):
        if arg in constexprs:
            signature[arg] = "constexpr"
        elif arg.endswith("_ptr"):
            signature[arg] = "*fp32" if arg in FP32_POINTERS else "*i32" if arg in INT32_POINTERS else dtype
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[arg] = "fp32" if arg in FP32_SCALARS else "i32"
            row_stride = arg.startswith("stride_") and not arg.endswith("d")
            if arg not in FP32_SCALARS and (row_stride or (contiguous and arg not in HEAD_COUNTS)):
                attrs[(i,)] = [["tt.divisibility", 16]]
    return triton.compile(
        ASTSource(kernel, signature, constexprs, attrs), target=GPUTarget("cuda", arch, 32),
        options={"num_warps": warps, "num_stages": stages},
    )


def compile_attention() -> dict:
    """Compiles each attention case (causal, GQA group 4, bf16); {name: error or "ok"}."""
    results = {}
    for name, kernel_name, arch, constexprs, warps, stages, budget, wants_wgmma, contiguous in _attention_cases():
        try:
            dtype = "*fp32" if constexprs.get("PRECISION") == "ieee" else BF16
            compiled = _compile_attention_kernel(kernel_name, arch, constexprs, warps, stages, contiguous, dtype)
            usage = _resource_usage(compiled.asm["cubin"])
        except Exception as exc:  # reported per case by the test
            results[name] = f"does not compile: {type(exc).__name__}: {str(exc)[:500]}"
            continue
        ptx = compiled.asm["ptx"]
        problems = []
        if compiled.metadata.shared > SHARED_LIMIT[arch]:
            problems.append(f"{compiled.metadata.shared} B of shared memory > {SHARED_LIMIT[arch]}")
        if budget is not None and usage["STACK"] > budget:
            problems.append(f"spills: {usage['STACK']} B stack frame ({usage['REG']} registers) > {budget}")
        # prep is elementwise: no matmul; fp32 ("ieee") dots run on the FMA units, not the tensor cores
        if kernel_name != "_backward_prep_kernel" and dtype == BF16 and not re.search(
            r"wgmma\.mma_async" if wants_wgmma else r"(wgmma\.mma_async|mma\.sync)", ptx):
            problems.append("no " + ("wgmma" if wants_wgmma else "tensor-core") + " instruction in the PTX")
        results[name] = "; ".join(problems) or "ok"
    return results


def prove_backward_wgmma() -> dict:
    """Compiles both Triton backward kernels at their contiguous sm_90 D = 128 table entries for
    sm_90a (bf16, GQA group 4, causal; and one plain multi-head non-causal case), as the JIT
    specializes a contiguous launch; {case: {"entry", "HGMMA", "HMMA", "STACK", "LOCAL"}}: wgmma
    instructions, mma.sync ones, stack frame bytes and local-memory loads and stores in the SASS."""
    from llama_fast.kernels import attention as attn

    results = {}
    for label, kernel_name, table in (("kv", "_attention_backward_kv_kernel", attn._BACKWARD_KV_CONTIGUOUS_CONFIGS),
                                      ("q", "_attention_backward_q_kernel", attn._BACKWARD_Q_CONTIGUOUS_CONFIGS)):
        block_m, block_n, warps, stages = table[9][128]
        for group, causal in ((4, True), (1, False)):
            constexprs = dict(GROUP=group, CAUSAL=causal, BLOCK_M=block_m, BLOCK_N=block_n, D_PAD=128, HALF_PAD=64,
                              PRECISION="tf32", **UNSEGMENTED[f"backward {label}"], **_contiguous_strides(kernel_name))
            compiled = _compile_attention_kernel(kernel_name, 90, constexprs, warps, stages, True)
            sass = _cuobjdump(compiled.asm["cubin"], "-sass")
            results[f"backward {label} GROUP={group} causal={causal}"] = {
                "entry": [block_m, block_n, warps, stages],
                "HGMMA": len(re.findall(r"\bHGMMA\.", sass)),
                "HMMA": len(re.findall(r"\bHMMA\.", sass)),
                "STACK": _resource_usage(compiled.asm["cubin"])["STACK"],
                "LOCAL": len(re.findall(r"\b(?:LDL|STL)\b", sass)),
            }
    return results


def sass_loops(sass: str) -> list[dict]:
    """The loops of a kernel's SASS (each backward branch and the code it jumps back over), each as
    {"HGMMA": [N of each wgmma], "HMMA": mma.sync count, "BAR": barriers (BAR.SYNC / ARV / RED), "LOCAL":
    local-memory loads and stores}, for the loops that multiply."""
    code = [(int(a, 16), text) for a, text in re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)]
    loops = []
    for addr, text in code:
        jump = re.search(r"\bBRA\s+(0x[0-9a-f]+)", text)
        if jump and int(jump.group(1), 16) < addr:
            body = "\n".join(t for a, t in code if int(jump.group(1), 16) <= a <= addr)
            loop = {"HGMMA": [int(n) for n in re.findall(r"\bHGMMA\.\d+x(\d+)x\d+", body)],
                    "HMMA": len(re.findall(r"\bHMMA\.", body)),
                    "BAR": len(re.findall(r"\bBAR\.(?:SYNC|ARV|RED)\b", body)),
                    "LOCAL": len(re.findall(r"\b(?:LDL|STL)\b", body))}
            if loop["HGMMA"] or loop["HMMA"]:
                loops.append(loop)
    return loops


def prove_forward_wgmma() -> dict:
    """Compiles the forward at its contiguous sm_90 D = 128 entries for sm_90a (bf16; GQA group 4 causal,
    and plain multi-head non-causal; batched and packed documents) as the JIT specializes a contiguous
    launch; {case: {"entry", "STACK", "loops": sass_loops}}."""
    from llama_fast.kernels import attention as attn

    results = {}
    for group, causal, segmented in ((4, True, False), (1, False, False), (8, True, True)):
        block_m, block_n, warps, stages = attn._forward_table(contiguous=True, packed=segmented)[9][128]
        constexprs = dict(GROUP=group, CAUSAL=causal, BLOCK_M=block_m, BLOCK_N=block_n, D_PAD=128, HALF_PAD=64,
                          PRECISION="tf32", **_contiguous_strides("_attention_forward_kernel"))
        constexprs.update(dict(SEGMENTED=True) if segmented else UNSEGMENTED["forward"])
        compiled = _compile_attention_kernel("_attention_forward_kernel", 90, constexprs, warps, stages, True)
        ptx = compiled.asm["ptx"]
        # The forward's only fp32 parameter is qk_scale: no fused multiply-add may take it (S2 is the rounded
        # product; fused into exp2's subtraction it would break the row-statistics contract).
        f32_params = re.findall(r"\.param \.f32 (\w+)", ptx)
        scale_regs = {reg for name in f32_params for reg in re.findall(rf"ld\.param\.\w+\s+(%r\d+), \[{name}\]", ptx)}
        fused = [line.strip() for line in ptx.splitlines()
                 if re.match(r"\s*fma\.", line) and scale_regs & set(re.findall(r"%r\d+", line.split(",", 1)[-1]))]
        results[f"forward GROUP={group} causal={causal} packed={segmented}"] = {
            "entry": [block_m, block_n, warps, stages],
            "STACK": _resource_usage(compiled.asm["cubin"])["STACK"],
            "loops": sass_loops(_cuobjdump(compiled.asm["cubin"], "-sass")),
            "scale_params": len(scale_regs), "fused_scale": fused[:3],
        }
    return results


def _run_in_subprocess(what: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    run = subprocess.run([sys.executable, __file__, what], capture_output=True, text=True, env=env)
    if run.returncode != 0 and "No module named 'triton" in run.stderr:
        pytest.skip("triton is not installed")
    assert run.returncode == 0, run.stderr[-5000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_kernels_compile_for_sm90_with_vector_loads():
    assert _run_in_subprocess("elementwise") == {case[0]: "ok" for case in CASES}


def test_attention_launch_tables_compile_fit_and_do_not_spill():
    results = _run_in_subprocess("attention")
    assert set(results) == {case[0] for case in _attention_cases()}
    assert {name: r for name, r in results.items() if r != "ok"} == {}


def test_triton_attention_backward_uses_wgmma_without_spills_on_hopper():
    """Issue 16: on sm_90a, bf16, D = 128, the launches real models make (contiguous head dim) run
    both backward kernels on wgmma, with no stack frame and no local memory. With one table for
    every layout (its entries chosen for arbitrary strides) the kv kernel multiplied with mma.sync."""
    results = _run_in_subprocess("wgmma")
    assert len(results) == 4
    bad = {name: r for name, r in results.items() if not (r["HGMMA"] > 0 and r["STACK"] == 0 and r["LOCAL"] == 0)}
    assert bad == {}, f"want HGMMA > 0, STACK == 0 and LOCAL == 0: {bad}"


def test_triton_attention_forward_key_loop_is_the_tutorial_loop_on_hopper():
    """Issue 16 item 1: on sm_90a, bf16, D = 128, a contiguous launch's key loops multiply with wgmma
    only, every one at least 64 keys wide (N), with at most 3 barriers per iteration, no local memory
    and no stack. The forward that rotated K in the loop failed each of these at its (128, 32, 8, 3)
    entry (triton 3.9): 8 HGMMA.64x32x16 per iteration (N = 32) beside 2 HGMMA.64x128x16, and 6
    barriers (plus 3 fences); with rot(K) from a workspace and one QK dot the (128, 128, 8, 2) entry
    issues 16 HGMMA.64x128x16 per 128 keys behind 3 barriers. And the scores' scale is a rounded product:
    `qk * qk_scale` compiled to fma.rn.f32 with exp2's subtraction in the unmasked blocks (the row
    sum then saw the product's rounding error that the saved row max and the backward do not)."""
    results = _run_in_subprocess("forward")
    assert len(results) == 3
    bad = {}
    for name, r in results.items():
        loops = r["loops"]
        if not loops or r["STACK"] or r["scale_params"] != 1 or r["fused_scale"] or any(
                not loop["HGMMA"] or loop["HMMA"] or min(loop["HGMMA"]) < 64 or loop["BAR"] > 3 or loop["LOCAL"]
                for loop in loops):
            bad[name] = r
    assert bad == {}, (f"want every key loop: wgmma only, N >= 64, <= 3 barriers, no local memory, no stack; and "
                       f"qk_scale in no fused multiply-add: {bad}")


if __name__ == "__main__":
    print(json.dumps({"elementwise": compile_all, "attention": compile_attention,
                      "wgmma": prove_backward_wgmma, "forward": prove_forward_wgmma}[sys.argv[1]]()))
