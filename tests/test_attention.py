"""llama_fast.ops.attention (Triton forward, every backward) against llama_fast.reference.attention.

On the CPU the Triton kernels run in the interpreter (conftest sets TRITON_INTERPRET=1), in fp32
and fp16 (the interpreter's bf16 tl.dot is broken); bf16 runs in the gpu-marked tests.
"""

import importlib

import pytest
import torch

import llama_fast._extension as ext
from llama_fast import reference
from llama_fast.kernels import attention as kernels
from llama_fast.ops import attention
from llama_fast.ops.attention import _attention_op, _backward_math, _forward_math, lse_from_stats
from llama_fast.testing import assert_within_2x, default_floor

GPU = torch.device("cuda")


def make_inputs(B, S, Hq, Hkv, D, dtype, device="cpu", layout="bshd", table_extra=3):
    """Fresh random q, k, v [B, S, H, D] (as views when layout != "bshd") and rotary tables."""
    if layout == "bhsd":  # [B, H, S, D] storage seen through transpose(1, 2)
        q = torch.randn(B, Hq, S, D, dtype=dtype, device=device).transpose(1, 2)
        k = torch.randn(B, Hkv, S, D, dtype=dtype, device=device).transpose(1, 2)
        v = torch.randn(B, Hkv, S, D, dtype=dtype, device=device).transpose(1, 2)
    elif layout == "qkv":  # split views of one fused projection output [B, S, (Hq + 2 Hkv) * D]
        qkv = torch.randn(B, S, (Hq + 2 * Hkv) * D, dtype=dtype, device=device)
        q, k, v = qkv.split([Hq * D, Hkv * D, Hkv * D], dim=-1)
        q, k, v = q.unflatten(-1, (Hq, D)), k.unflatten(-1, (Hkv, D)), v.unflatten(-1, (Hkv, D))
    else:
        q = torch.randn(B, S, Hq, D, dtype=dtype, device=device)
        k = torch.randn(B, S, Hkv, D, dtype=dtype, device=device)
        v = torch.randn(B, S, Hkv, D, dtype=dtype, device=device)
    cos, sin = reference.rope_tables(S + table_extra, D, device=device)
    return q, k, v, cos, sin


def reference_run(q, k, v, cos, sin, causal, dout, dtype, device="cpu"):
    """(O, LSE, dq, dk, dv) from autograd through the reference with inputs cast to `dtype`."""
    q, k, v = (t.detach().to(device=device, dtype=dtype).requires_grad_() for t in (q, k, v))
    cos, sin = cos.to(device), sin.to(device)
    out, lse = reference.attention(q, k, v, cos, sin, causal, return_lse=True)
    grads = torch.autograd.grad(out, (q, k, v), dout.to(device=device, dtype=dtype))
    return (out, lse) + grads


def check_all(name, got, high, low, dtype, S):
    floor = default_floor(dtype)
    for label, a, hi, lo in zip(("out", "lse", "dq", "dk", "dv"), got, high, low):
        # The LSE is fp32 everywhere. The gradients' rounding grows with S, but so does PyTorch's own
        # error in the same dtype, which the 2x term already allows: no S-dependent floor.
        f = default_floor(torch.float32) * 10 if label == "lse" else floor
        assert_within_2x(f"{name} {label}", a.cpu(), hi.cpu(), lo.cpu(), floor=f)


def run_ops(q, k, v, cos, sin, causal, dout):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out, lse = attention(q, k, v, cos, sin, causal, return_lse=True)
    out.backward(dout)
    return out, lse, q.grad, k.grad, v.grad


CASES = [
    # B, S, Hq, Hkv, D
    (1, 1, 1, 1, 64),
    (2, 17, 4, 1, 64),
    (1, 113, 8, 1, 80),
    (3, 128, 2, 2, 128),
    (1, 70, 4, 4, 32),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", CASES, ids=lambda s: "B{}_S{}_Hq{}_Hkv{}_D{}".format(*s))
def test_matches_reference(shape, dtype):
    """Triton forward + the compiled (or fallback) backward through the op, and the Triton backward."""
    B, S, Hq, Hkv, D = shape
    q, k, v, cos, sin = make_inputs(B, S, Hq, Hkv, D, dtype)
    dout = torch.randn(B, S, Hq, D, dtype=dtype)
    high = reference_run(q, k, v, cos, sin, True, dout, torch.float64)
    low = reference_run(q, k, v, cos, sin, True, dout, dtype)
    got = run_ops(q, k, v, cos, sin, True, dout)
    assert got[0].dtype == dtype and got[1].dtype == torch.float32 and got[1].shape == (B, Hq, S)
    check_all("op", got, high, low, dtype, S)
    out, stats = kernels.attention_forward(q, k, v, cos, sin, True)
    triton_grads = kernels.attention_backward(dout, q, k, v, out, stats, cos, sin, True)
    check_all("triton", (out, lse_from_stats(stats)) + triton_grads, high, low, dtype, S)


@pytest.mark.parametrize(
    "shape, layout",
    [((2, 45, 4, 2, 64), "bhsd"), ((1, 33, 4, 1, 64), "qkv"), ((2, 40, 2, 1, 48), "bshd")],
)
@pytest.mark.parametrize("causal", [True, False])
def test_views_and_non_causal(shape, layout, causal):
    B, S, Hq, Hkv, D = shape
    q, k, v, cos, sin = make_inputs(B, S, Hq, Hkv, D, torch.float32, layout=layout)
    if layout != "bshd":
        assert not q.is_contiguous()
    dout = torch.randn(B, S, Hq, D).transpose(0, 1).contiguous().transpose(0, 1)  # a strided dO as well
    high = reference_run(q, k, v, cos, sin, causal, dout, torch.float64)
    low = reference_run(q, k, v, cos, sin, causal, dout, torch.float32)
    got = run_ops(q, k, v, cos, sin, causal, dout)
    check_all(f"op {layout}", got, high, low, torch.float32, S)
    out, stats = kernels.attention_forward(q, k, v, cos, sin, causal)
    triton_grads = kernels.attention_backward(dout, q, k, v, out, stats, cos, sin, causal)
    check_all(f"triton {layout}", (out, lse_from_stats(stats)) + triton_grads, high, low, torch.float32, S)
    out, stats = _forward_math(q, k, v, cos, sin, causal)
    math_grads = _backward_math(dout, q, k, v, out, stats, cos, sin, causal)
    check_all(f"math {layout}", (out, lse_from_stats(stats)) + math_grads, high, low, torch.float32, S)


@pytest.mark.parametrize(
    "S, backward",
    # Interpreted, S=2049 costs ~10 s forward and ~25 s more backward: CI checks its forward here
    # (the backward's long rows at 1023), the slow-marked case and the GPU tests the rest.
    [(1023, True), (2049, False), pytest.param(2049, True, marks=pytest.mark.slow)],
)
def test_long_sequences(S, backward):
    """Rows longer than many blocks, lengths one off a multiple of the block (B 1, 1 head, D 64)."""
    q, k, v, cos, sin = make_inputs(1, S, 1, 1, 64, torch.float32)
    dout = torch.randn(1, S, 1, 64)
    high = reference_run(q, k, v, cos, sin, True, dout, torch.float64)
    low = reference_run(q, k, v, cos, sin, True, dout, torch.float32)
    out, stats = kernels.attention_forward(q, k, v, cos, sin, True)
    lse = lse_from_stats(stats)
    if backward:
        check_all("triton", (out, lse) + kernels.attention_backward(dout, q, k, v, out, stats, cos, sin, True),
                  high, low, torch.float32, S)
    else:
        check_all("triton forward", (out, lse), high[:2], low[:2], torch.float32, S)


# The kv kernel's rows for keys past the end overflow too, harmlessly (they are never stored); the
# interpreter's numpy warns about it.
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning", "ignore:invalid value:RuntimeWarning")
def test_triton_backward_masks_keys_past_the_end():
    """Scores near -110 (q and k anti-aligned, identity rotary tables): for a key row past the end
    (read as zeros) exp2((0 - m2) - log2l) overflows, so only the mask keeps inf * 0 = nan out of dQ.
    S = 37 leaves a partial key block; not causal, where causality does not hide those keys. The floor
    was 5e-4 while the backward recomputed the scores in another summation order than the forward
    (errors up to 1.6e-4); it forms them as the forward does now (issue 13 item 6): default floor."""
    causal = False
    B, S, Hq, Hkv, D = 1, 37, 2, 1, 16
    direction = torch.randn(D)
    q = 6.0 * (direction + 0.1 * torch.randn(B, S, Hq, D))
    k = -6.0 * (direction + 0.1 * torch.randn(B, S, Hkv, D))
    v = torch.randn(B, S, Hkv, D)
    cos, sin = torch.ones(S, D // 2), torch.zeros(S, D // 2)
    dout = torch.randn(B, S, Hq, D)
    high = reference_run(q, k, v, cos, sin, causal, dout, torch.float64)
    low = reference_run(q, k, v, cos, sin, causal, dout, torch.float32)
    assert high[1].max() < -100, "the scores must be very negative for this test to mean anything"
    out, stats = kernels.attention_forward(q, k, v, cos, sin, causal)
    grads = kernels.attention_backward(dout, q, k, v, out, stats, cos, sin, causal)
    for label, a, hi, lo in zip(("dq", "dk", "dv"), grads, high[2:], low[2:]):
        assert_within_2x(f"triton backward {label}", a, hi, lo, floor=default_floor(torch.float32))


def _gpu_backward_blocks() -> list:
    """(kv block, q block) pairs covering every distinct (block_m, block_n) of the GPU launch tables
    and fallbacks, which CI's interpreter config would otherwise never run."""
    def distinct(table, fallbacks):
        shapes = {c[:2] for per_dim in table.values() for c in per_dim.values()} | {c[:2] for c in fallbacks}
        return sorted(shapes)

    kv = sorted(set(distinct(kernels._BACKWARD_KV_CONFIGS, kernels._BACKWARD_KV_FALLBACKS))
                | set(distinct(kernels._BACKWARD_KV_CONTIGUOUS_CONFIGS, [])))
    q = sorted(set(distinct(kernels._BACKWARD_Q_CONFIGS, kernels._BACKWARD_Q_FALLBACKS))
               | set(distinct(kernels._BACKWARD_Q_CONTIGUOUS_CONFIGS, [])))
    return [(kv[i % len(kv)], q[i % len(q)]) for i in range(max(len(kv), len(q)))]


@pytest.mark.parametrize("kv_block, q_block", _gpu_backward_blocks(), ids=str)
def test_triton_backward_with_the_gpu_block_shapes(monkeypatch, kv_block, q_block):
    """The Triton backward with the tile shapes the GPU tables choose (run here in the interpreter):
    odd S and D (padded), GQA, a transposed layout; causal and not alternate with the shapes."""
    monkeypatch.setattr(kernels, "_INTERPRETER_BACKWARD_KV", (*kv_block, 4, 1))
    monkeypatch.setattr(kernels, "_INTERPRETER_BACKWARD_Q", (*q_block, 4, 1))
    causal = sum(kv_block + q_block) % 3 != 0
    q, k, v, cos, sin = make_inputs(1, 37, 4, 2, 36, torch.float32, layout="bhsd")
    dout = torch.randn(1, 37, 4, 36)
    high = reference_run(q, k, v, cos, sin, causal, dout, torch.float64)
    low = reference_run(q, k, v, cos, sin, causal, dout, torch.float32)
    out, stats = kernels.attention_forward(q, k, v, cos, sin, causal)
    grads = kernels.attention_backward(dout, q, k, v, out, stats, cos, sin, causal)
    for label, a, hi, lo in zip(("dq", "dk", "dv"), grads, high[2:], low[2:]):
        assert_within_2x(f"triton backward {label} kv {kv_block} q {q_block}", a, hi, lo,
                         floor=default_floor(torch.float32))


_AOT_COMPILE = r"""
import inspect, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from llama_fast.kernels import attention as ka

fp32_ptrs = {"stats_ptr", "cos_ptr", "sin_ptr", "delta_ptr"}
tables = [(ka._attention_forward_kernel, ka._FORWARD_CONFIGS), (ka._attention_backward_kv_kernel,
          ka._BACKWARD_KV_CONFIGS), (ka._attention_backward_q_kernel, ka._BACKWARD_Q_CONFIGS)]
for cap in (80, 90):
    for kernel, table in tables:
        block_m, block_n, warps, stages = table[cap // 10][128]
        constexprs = dict(GROUP=4, CAUSAL=True, BLOCK_M=block_m, BLOCK_N=block_n, D_PAD=128, HALF_PAD=64,
                          PRECISION="tf32")
        names = list(inspect.signature(kernel.fn).parameters)
        constexprs["SEGMENTED"] = False  # batched launches: no document bounds (their pointer is None)
        constexprs.update({n: None for n in ("seg_ptr", "seg_start_ptr", "seg_end_ptr") if n in names})
        if "DELTA_PASS" in names:  # the q kernel's dQ pass (its fp32 delta pass: tests/test_triton_compile.py)
            constexprs["DELTA_PASS"] = False
        signature = {n: "constexpr" if n in constexprs else ("*fp32" if n in fp32_ptrs else "*bf16")
                     if n.endswith("_ptr") else "fp32" if n.endswith("scale") else "i32" for n in names}
        src = ASTSource(fn=kernel, signature=signature,
                        constexprs={(names.index(n),): v for n, v in constexprs.items()})
        triton.compile(src, target=GPUTarget("cuda", cap, 32), options=dict(num_warps=warps, num_stages=stages))
        print("compiled", kernel.fn.__name__, "sm", cap, flush=True)
"""


def test_triton_kernels_compile_for_sm80_and_sm90():
    """The interpreter does not lower to GPU code: compile the tuned D=128 kernels ahead of time for
    sm_80 and sm_90 (bf16) in a process without TRITON_INTERPRET, as a GPU-free lowering check."""
    import os
    import subprocess
    import sys

    try:
        from triton.backends.nvidia.compiler import get_ptxas

        get_ptxas(90)
    except Exception as exc:  # no CUDA backend / ptxas in this triton build
        pytest.skip(f"triton cannot compile for CUDA here: {exc}")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", _AOT_COMPILE], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr[-5000:]
    assert done.stdout.count("compiled") == 6, done.stdout


def test_contiguous_launch_is_what_the_contiguous_tables_were_compiled_for():
    """The contiguous backward entries (wgmma on Hopper) were compiled with head-dim strides 1 and the
    other strides and sizes multiples of 16: a launch the JIT would specialize otherwise takes the
    general ones."""
    x = torch.randn(2, 32, 4, 64)
    cos = torch.randn(40, 32)
    assert kernels._contiguous_launch(64, 32, cos, x, x)
    for layout in ("qkv", "bhsd"):
        assert kernels._contiguous_launch(64, 32, cos, *make_inputs(1, 32, 2, 2, 64, torch.float32, layout=layout)[:3])
    assert not kernels._contiguous_launch(64, 32, cos, x, x.transpose(1, 3).contiguous().transpose(1, 3))  # stride_d
    assert not kernels._contiguous_launch(64, 30, cos, x)  # S
    assert not kernels._contiguous_launch(64, 32, torch.randn(40, 40)[:, :32], x)  # the rotary tables' row stride
    assert not kernels._contiguous_launch(80, 32, cos, torch.randn(2, 32, 4, 80))  # D / 2 = 40
    assert not kernels._contiguous_launch(64, 32, cos, torch.randn(2, 32, 4, 72)[..., :64])  # row stride 72
    z = torch.randn(x.numel() + 1)[1:].view(x.shape)
    assert not kernels._contiguous_launch(64, 32, cos, x, z)  # data not 16-byte aligned


def test_backward_takes_the_table_of_its_layout(monkeypatch):
    """attention_backward looks its configurations up in the contiguous tables for a contiguous
    launch and in the general ones for a strided one (here in the interpreter, which then runs its
    own configuration)."""
    tables = []
    real = kernels._configs
    monkeypatch.setattr(kernels, "_configs", lambda table, *rest: tables.append(table) or real(table, *rest))
    contiguous = {id(kernels._BACKWARD_KV_CONTIGUOUS_CONFIGS): "kv contiguous",
                  id(kernels._BACKWARD_Q_CONTIGUOUS_CONFIGS): "q contiguous",
                  id(kernels._BACKWARD_KV_CONFIGS): "kv general", id(kernels._BACKWARD_Q_CONFIGS): "q general"}
    for layout, dout_strided, want in (("bshd", False, ["kv contiguous", "q contiguous"]),
                                       ("bshd", True, ["kv general", "q general"])):
        q, k, v, cos, sin = make_inputs(1, 16, 2, 1, 32, torch.float32, layout=layout, table_extra=0)
        out, lse = kernels.attention_forward(q, k, v, cos, sin, True)
        tables.clear()
        dout = torch.randn(1, 16, 2, 32)
        if dout_strided:
            dout = torch.randn(1, 16, 2, 64)[..., ::2]  # head-dim stride 2
        kernels.attention_backward(dout, q, k, v, out, lse, cos, sin, True)
        assert [contiguous.get(id(t), "other") for t in tables] == want


def test_forward_takes_the_table_of_its_layout(monkeypatch):
    """attention_forward looks its configurations up by layout (contiguous q and v, or strided) and by
    whether the launch carries packed documents: four tables (issue 16 item 1)."""
    tables = []
    real = kernels._configs
    monkeypatch.setattr(kernels, "_configs", lambda table, *rest: tables.append(table) or real(table, *rest))
    names = {id(kernels._FORWARD_CONTIGUOUS_CONFIGS): "contiguous", id(kernels._FORWARD_CONFIGS): "general",
             id(kernels._FORWARD_PACKED_CONTIGUOUS_CONFIGS): "packed contiguous",
             id(kernels._FORWARD_PACKED_CONFIGS): "packed general"}
    assert len(names) == 4
    q, k, v, cos, sin = make_inputs(1, 32, 2, 1, 32, torch.float32, layout="bshd", table_extra=0)
    q_strided = torch.randn(1, 32, 2, 64)[..., ::2]  # head-dim stride 2
    doc_start = torch.tensor([0] * 20 + [20] * 12, dtype=torch.int32)
    got = []
    for q_in, docs in ((q, None), (q_strided, None), (q, doc_start), (q_strided, doc_start)):
        tables.clear()
        kernels.attention_forward(q_in, k, v, cos, sin, True, docs)
        got += [names.get(id(t), "other") for t in tables]
    assert got == ["contiguous", "general", "packed contiguous", "packed general"]


def test_launch_falls_back_when_a_config_does_not_fit():
    from triton.runtime.errors import OutOfResources

    tried = []

    def launch(*config):
        tried.append(config)
        if config[0] > 32:
            raise OutOfResources(300000, 232448, "shared memory")

    kernels._launch_first_fitting([(128, 64, 8, 3), (64, 32, 4, 1), (32, 16, 4, 1)], launch)
    assert tried == [(128, 64, 8, 3), (64, 32, 4, 1), (32, 16, 4, 1)]
    with pytest.raises(OutOfResources):
        kernels._launch_first_fitting([(128, 64, 8, 3)], launch)


def test_forward_is_bitwise_reproducible():
    q, k, v, cos, sin = make_inputs(2, 77, 4, 2, 64, torch.float16)
    first = attention(q, k, v, cos, sin, return_lse=True)
    second = attention(q, k, v, cos, sin, return_lse=True)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


def test_fp64_runs_the_reference_math():
    """fp64 (the tests' oracle dtype) skips Triton and the fp32 C++ kernel: exact against autograd."""
    q, k, v, cos, sin = make_inputs(1, 21, 2, 1, 16, torch.float64)
    dout = torch.randn(1, 21, 2, 16, dtype=torch.float64)
    high = reference_run(q, k, v, cos, sin, True, dout, torch.float64)
    for a, b in zip(run_ops(q, k, v, cos, sin, True, dout), high):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_math_fallback_matches_reference_in_fp64():
    """The PyTorch backward of last resort (no extension, no Triton) in fp64 against autograd."""
    q, k, v, cos, sin = make_inputs(2, 29, 4, 2, 16, torch.float64)
    dout = torch.randn(2, 29, 4, 16, dtype=torch.float64)
    for causal in (True, False):
        out, lse, *grads = reference_run(q, k, v, cos, sin, causal, dout, torch.float64)
        out, stats = _forward_math(q, k, v, cos, sin, causal)
        ours = _backward_math(dout, q, k, v, out, stats, cos, sin, causal)
        for a, b in zip(ours, grads):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_fallback_backward_warns_once(monkeypatch):
    # The math-path forward (as without the interpreter): after a Triton forward in the interpreter the
    # Triton backward runs, which is no fallback.
    monkeypatch.setattr(importlib.import_module("llama_fast.ops.attention"), "triton_runs_on", lambda device: False)
    monkeypatch.setattr(ext, "has_kernel", lambda device_type: False)
    monkeypatch.setattr(ext, "_warned", set())
    q, k, v, cos, sin = make_inputs(1, 9, 2, 1, 16, torch.float32)
    dout = torch.randn(1, 9, 2, 16)
    with pytest.warns(RuntimeWarning, match="no compiled backward for attention on cpu"):
        got = run_ops(q, k, v, cos, sin, True, dout)
    high = reference_run(q, k, v, cos, sin, True, dout, torch.float64)
    low = reference_run(q, k, v, cos, sin, True, dout, torch.float32)
    check_all("fallback", got, high, low, torch.float32, 9)


def test_torch_compile_fullgraph_and_opcheck():
    q, k, v, cos, sin = make_inputs(1, 19, 2, 1, 16, torch.float32)
    torch.library.opcheck(torch.ops.llama_fast.attention.default, (q, k, v, cos, sin, True, False))
    qg = q.clone().requires_grad_()
    compiled = torch.compile(lambda *a: attention(*a).sum(), fullgraph=True, backend="aot_eager")
    compiled(qg, k, v, cos, sin).backward()
    qe = q.clone().requires_grad_()
    attention(qe, k, v, cos, sin).sum().backward()
    torch.testing.assert_close(qg.grad, qe.grad)


def _good():
    return list(make_inputs(2, 8, 4, 2, 16, torch.float32, table_extra=0))


@pytest.mark.parametrize(
    "mutate, error, match",
    [
        (lambda a: [a.__setitem__(i, torch.randn(2, 8, 3, 16)) for i in (1, 2)], ValueError,
         r"query heads \(4\) must be a multiple of the kv heads \(k.shape\[2\] = 3\)"),
        (lambda a: a.__setitem__(0, torch.randn(2, 8, 4, 15)), ValueError, "k must be"),
        (lambda a: [a.__setitem__(i, torch.randn(2, 8, h, 258)) for i, h in ((0, 4), (1, 2), (2, 2))],
         ValueError, "head_dim must be even and at most 256, got 258"),
        (lambda a: [a.__setitem__(i, torch.randn(2, 8, h, 15)) for i, h in ((0, 4), (1, 2), (2, 2))],
         ValueError, "head_dim must be even and at most 256, got 15"),
        (lambda a: a.__setitem__(3, a[3][:7]), ValueError, r"cos must be \[seq >= 8"),
        (lambda a: a.__setitem__(4, a[4][:, :7]), ValueError, r"sin must be \[seq >= 8, head_dim / 2 = 8\]"),
        (lambda a: a.__setitem__(3, a[3].double()), TypeError, "cos must be float32, got torch.float64"),
        (lambda a: a.__setitem__(1, a[1].half()), TypeError, "k must have the dtype of q"),
        (lambda a: a.__setitem__(2, a[2].to("meta")), ValueError, "v must be on the device of q"),
        (lambda a: a.__setitem__(3, a[3].to("meta")), ValueError, "cos must be on the device of q"),
        (lambda a: a.__setitem__(1, torch.randn(3, 8, 2, 16)), ValueError, r"k must be \[batch=2, seq=8"),
        (lambda a: a.__setitem__(2, torch.randn(2, 9, 2, 16)), ValueError, "v must have the shape of k"),
        (lambda a: a.__setitem__(0, torch.randn(2, 8, 16)), ValueError, "q must be 4-D"),
        (lambda a: a.__setitem__(0, a[0].int()), TypeError, "q must be float32, float16 or bfloat16"),
    ],
)
def test_bad_input_is_named(mutate, error, match):
    args = _good()
    mutate(args)
    with pytest.raises(error, match=match):
        attention(*args)


def test_flags_must_be_bools():
    """A string would otherwise be truthy: causal="no" would silently run causal attention."""
    with pytest.raises(TypeError, match="causal must be a bool, got 'no'"):
        attention(*_good(), causal="no")
    with pytest.raises(TypeError, match="deterministic must be a bool or None, got 1"):
        attention(*_good(), deterministic=1)


@pytest.mark.gpu
def test_too_many_heads_for_the_grid_is_named():
    q = torch.randn(2, 1, 32769, 2, device="cuda")  # batch * heads = 65538 > 65535
    cos, sin = torch.ones(1, 1, device="cuda"), torch.zeros(1, 1, device="cuda")
    with pytest.raises(ValueError, match=r"batch \* query heads must be at most 65535.*got 2 \* 32769 = 65538"):
        attention(q, q, q, cos, sin)


# ------------------------------------------------------------------------------------------------
# GPU
# ------------------------------------------------------------------------------------------------
GPU_CASES = [
    (1, 1, 1, 1, 64),
    (2, 17, 4, 1, 64),
    (1, 113, 8, 1, 80),
    (3, 128, 4, 4, 128),
    (1, 1023, 8, 1, 128),
    (2, 2049, 4, 1, 64),
    (1, 300, 2, 1, 256),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", GPU_CASES, ids=lambda s: "B{}_S{}_Hq{}_Hkv{}_D{}".format(*s))
@pytest.mark.parametrize("causal", [True, False])
def test_gpu_matches_reference(shape, dtype, causal):
    B, S, Hq, Hkv, D = shape
    q, k, v, cos, sin = make_inputs(B, S, Hq, Hkv, D, dtype, device=GPU, layout="bhsd")
    dout = torch.randn(B, S, Hq, D, dtype=dtype, device=GPU)
    high = reference_run(q.cpu(), k.cpu(), v.cpu(), cos.cpu(), sin.cpu(), causal, dout.cpu(), torch.float64)
    low = reference_run(q, k, v, cos, sin, causal, dout, dtype, device=GPU)
    # NaN-filled freed blocks the size of every output: the caching allocator hands them back to the
    # kernels' torch.empty outputs, so an element a kernel never writes shows.
    poison = [torch.full(t.shape, float("nan"), dtype=t.dtype, device=GPU) for t in (q, k, v)]
    del poison
    got = run_ops(q, k, v, cos, sin, causal, dout)
    check_all("op", got, high, low, dtype, S)
    out, stats = kernels.attention_forward(q, k, v, cos, sin, causal)
    lse = lse_from_stats(stats)
    check_all("triton backward", (out, lse) + kernels.attention_backward(dout, q, k, v, out, stats, cos, sin, causal),
              high, low, dtype, S)
    if ext.WITH_CUDA:
        for deterministic in (True, False):
            grads = torch.ops.llama_fast.attention_backward(dout, q, k, v, out, stats, cos, sin, causal, deterministic)
            check_all(f"cuda backward deterministic={deterministic}", (out, lse) + grads, high, low, dtype, S)


@pytest.mark.gpu
def test_gpu_fp32_matches_reference():
    q, k, v, cos, sin = make_inputs(2, 100, 4, 2, 64, torch.float32, device=GPU)
    dout = torch.randn(2, 100, 4, 64, device=GPU)
    high = reference_run(q.cpu(), k.cpu(), v.cpu(), cos.cpu(), sin.cpu(), True, dout.cpu(), torch.float64)
    low = reference_run(q.cpu(), k.cpu(), v.cpu(), cos.cpu(), sin.cpu(), True, dout.cpu(), torch.float32)
    check_all("op fp32", run_ops(q, k, v, cos, sin, True, dout), high, low, torch.float32, 100)


@pytest.mark.gpu
def test_gpu_deterministic_backward_is_bitwise_reproducible():
    if not ext.WITH_CUDA:
        pytest.skip("llama_fast._C was built without CUDA kernels")
    q, k, v, cos, sin = make_inputs(2, 1000, 8, 2, 128, torch.bfloat16, device=GPU)
    out, stats = _attention_op(q, k, v, cos, sin, True, True)
    dout = torch.randn_like(out)
    runs = [torch.ops.llama_fast.attention_backward(dout, q, k, v, out, stats, cos, sin, True, True) for _ in range(3)]
    for run in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], run))
    again = _attention_op(q, k, v, cos, sin, True, True)
    assert torch.equal(again[0], out) and torch.equal(again[1], stats), "forward must be bitwise reproducible"


@pytest.mark.gpu
def test_gpu_no_quadratic_memory_at_16k():
    """Peak memory of forward + backward at S=16384 stays linear in S (an S^2 fp32 score matrix per
    head would be 1 GiB)."""
    B, S, Hq, Hkv, D = 1, 16384, 8, 2, 128
    q, k, v, cos, sin = make_inputs(B, S, Hq, Hkv, D, torch.bfloat16, device=GPU)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    dout = torch.randn(B, S, Hq, D, dtype=torch.bfloat16, device=GPU)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    attention(q, k, v, cos, sin).backward(dout)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    linear = q.numel() * q.element_size()  # one [B, S, Hq, D] activation: 32 MiB here
    assert extra < 12 * linear, f"peak extra memory {extra / 2**20:.0f} MiB is not linear in S"


@pytest.mark.parametrize("tables", ["rope", "identity"])
def test_row_strided_rotary_tables(tables):
    """cos / sin given as the first half of [S, D] tables (as transformers' are; the identity tables of
    attn_implementation="llama_fast"): the reference's result. (Ad-hoc interpreter runs with such views gave
    NaN before ops.attention made the tables contiguous; this test did not reproduce it.)"""
    B, S, Hq, Hkv, D = 2, 12, 4, 2, 16
    q, k, v, cos, sin = make_inputs(B, S, Hq, Hkv, D, torch.float32, layout="bhsd")
    if tables == "identity":
        cos, sin = torch.ones_like(cos), torch.zeros_like(sin)
    wide_cos, wide_sin = torch.cat([cos, cos], -1), torch.cat([sin, sin], -1)  # [S', D]
    dout = torch.randn(B, S, Hq, D)
    got = run_ops(q, k, v, wide_cos[:, : D // 2], wide_sin[:, : D // 2], True, dout)
    high = reference_run(q, k, v, cos, sin, True, dout, torch.float64)
    low = reference_run(q, k, v, cos, sin, True, dout, torch.float32)
    check_all("strided tables", got, high, low, torch.float32, S)
