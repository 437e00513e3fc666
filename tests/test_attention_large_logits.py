"""Attention gradients with large logits (issue 13 item 6): every backward against an fp64 reference
with the 2x rule (error <= 2x eager PyTorch's in the same dtype), q and k scaled far past ordinary.

Why it used to fail: the backward recomputed P = exp(S - LSE) from one saved fp32 LSE; with large
scores LSE = m + log(l) loses the low bits of S - m (ulp(1e8) = 8), and the backward formed S in a
different summation order than the forward. The forward now saves the row max m2 and log2 of the row
sum separately (the row-statistics contract, csrc/llama_fast.h) and every backward recomputes S2
with the forward's arithmetic.

Paths: the Triton kernels (CPU interpreter, fp32 / fp16), the C++ CPU backward (after the CPU
forward), the CUDA kernels under the host emulation (fp16 / bf16), and the op through autograd.
"""
import importlib
import os

import pytest
import torch

import llama_fast._extension as ext
from llama_fast import reference
from llama_fast.kernels import attention as kernels
from llama_fast.testing import assert_within_2x, default_floor, max_abs_error

from test_cuda_emulation import EMU, KERNEL, build_emulated, run_emulated

# The module: the name llama_fast.ops.attention is the function.
attention_ops = importlib.import_module("llama_fast.ops.attention")

# (label, dtype, B, S, Hq, Hkv, D, q/k standard deviation): the table, then the sweep.
TABLE = [
    ("x1e4_fp32_S16_D16", torch.float32, 1, 16, 2, 1, 16, 1e4),
    ("x100_fp32", torch.float32, 1, 33, 2, 1, 32, 100.0),
    ("x30_fp16_D64", torch.float16, 1, 33, 2, 1, 64, 30.0),
]
SWEEP = [(f"std{s:g}_{str(dt)[6:]}", dt, 1, 40, 2, 1, 32, s)
         for dt, stds in ((torch.float32, (3.0, 10.0, 30.0, 100.0)), (torch.float16, (3.0, 10.0, 30.0)))
         for s in stds]
CASES = TABLE + SWEEP
EMU_CASES = (
    [("x30_fp16_D64", torch.float16, 1, 33, 2, 1, 64, 30.0), ("x30_bf16_D64", torch.bfloat16, 1, 33, 2, 1, 64, 30.0)]
    + [(f"std{s:g}_{str(dt)[6:]}", dt, 1, 40, 2, 1, 32, s)
       for dt in (torch.float16, torch.bfloat16) for s in (3.0, 10.0, 30.0)]
)


def make(dtype, B, S, Hq, Hkv, D, std, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(B, S, Hq, D, generator=g, dtype=torch.float64) * std).to(dtype)
    k = (torch.randn(B, S, Hkv, D, generator=g, dtype=torch.float64) * std).to(dtype)
    v = torch.randn(B, S, Hkv, D, generator=g, dtype=torch.float64).to(dtype)
    dout = torch.randn(B, S, Hq, D, generator=g, dtype=torch.float64).to(dtype)
    cos, sin = reference.rope_tables(S + 2, D)
    return q, k, v, dout, cos, sin


def reference_grads(q, k, v, dout, cos, sin, causal, dtype):
    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    return torch.autograd.grad(reference.attention(*leaves, cos, sin, causal), leaves, dout.to(dtype))


def check(name, got, q, k, v, dout, cos, sin, causal, ds_known=False):
    """The 2x rule for dv; for dq and dk too, but where `ds_known` their failure is reported as xfail.

    Known (not the row statistics; see the report of issue 13 item 6): in fp16 / bf16 at q, k std >= 10
    the error of dq and dk (and at std 30 of dv) is dominated by rounding rot(q), rot(k) to the dtype
    before the score matmul. Eager rounds the same operands, so the rule compares two draws of the
    same noise: S moves by ~1 there and near-tied rows make the max error a matter of luck. A study
    over 16 seeds (delta from O rounded, from O in fp32, or exact) left the failures at 17-19 of 256
    for every delta, and at 0 only when the scores were formed without that rounding. Over 16 seeds
    the C++ dv error at std 30 was 0.2x to 7x eager's (median 0.5x).
    fp32 is held to the rule everywhere: with near one-hot rows eager's dq, dk are exact (its
    dP - sum(P dP) cancels bitwise), and the backwards match that by taking delta = rowsum(P * dP) from
    their own dP: the Triton one for fp32 inputs (before, dq at std 100 was 1e-4 off), the C++ one
    always (before, the CPU forward's O, whose scores were rounded, did not match its stats: three
    16-bit cases here failed at seed 0 for that alone). The CUDA backwards (fp16 / bf16 only) keep
    rowsum(dO * O)."""
    high = reference_grads(q, k, v, dout, cos, sin, causal, torch.float64)
    low = reference_grads(q, k, v, dout, cos, sin, causal, q.dtype)
    ds_known = ds_known or ()
    failures = []
    for label, a, hi, lo in zip(("dv", "dq", "dk"), got[::-1][:1] + got[:2], high[::-1][:1] + high[:2],
                                low[::-1][:1] + low[:2]):
        try:
            assert_within_2x(f"{name} {label}", a.float(), hi, lo, floor=default_floor(q.dtype))
        except AssertionError as e:
            if label not in ds_known:
                raise
            failures.append(str(e))
    if failures:  # held on average over seeds instead: test_16bit_large_logits_hold_the_rule_over_seeds
        pytest.xfail(f"known, one seed's luck (see check's docstring): {'; '.join(failures)}")


def ds_known(dtype, std):
    """The gradients whose 2x check may fail for the known reasons in check's docstring."""
    known = ()
    if dtype != torch.float32 and std >= 10:
        known = ("dq", "dk")
    if dtype != torch.float32 and std >= 30:
        known = ("dq", "dk", "dv")
    return known


def cpu_forward(monkeypatch, q, k, v, cos, sin, causal):
    """The CPU forward that runs where Triton does not (and for bf16 in the interpreter)."""
    monkeypatch.setattr(attention_ops, "triton_runs_on", lambda device: False)
    return attention_ops._attention_op(q, k, v, cos, sin, causal, False)


ids = [c[0] for c in CASES]


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("case", CASES, ids=ids)
def test_triton_backward_large_logits(case, causal):
    _, dtype, B, S, Hq, Hkv, D, std = case
    q, k, v, dout, cos, sin = make(dtype, B, S, Hq, Hkv, D, std)
    out, saved = kernels.attention_forward(q, k, v, cos, sin, causal)
    got = kernels.attention_backward(dout, q, k, v, out, saved, cos, sin, causal)
    check(f"triton {case[0]}", got, q, k, v, dout, cos, sin, causal, ds_known(dtype, std))


@pytest.mark.skipif(not ext.has_kernel("cpu"), reason="the C++ extension is not built")
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("case", CASES + [c for c in EMU_CASES if c[1] == torch.bfloat16], ids=lambda c: c[0])
def test_cpp_backward_large_logits(monkeypatch, case, causal):
    _, dtype, B, S, Hq, Hkv, D, std = case
    q, k, v, dout, cos, sin = make(dtype, B, S, Hq, Hkv, D, std)
    out, saved = cpu_forward(monkeypatch, q, k, v, cos, sin, causal)
    got = torch.ops.llama_fast.attention_backward(dout, q, k, v, out, saved, cos, sin, causal, False)
    check(f"c++ {case[0]}", got, q, k, v, dout, cos, sin, causal, ds_known(dtype, std))


@pytest.mark.parametrize("case", CASES + [c for c in EMU_CASES if c[1] == torch.bfloat16], ids=lambda c: c[0])
def test_op_autograd_large_logits(case):
    """Through the op: whichever forward runs here is paired with a backward that matches it."""
    _, dtype, B, S, Hq, Hkv, D, std = case
    q, k, v, dout, cos, sin = make(dtype, B, S, Hq, Hkv, D, std)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = attention_ops.attention(*leaves, cos, sin, True)
    got = torch.autograd.grad(out, leaves, dout)
    check(f"op {case[0]}", got, q, k, v, dout, cos, sin, True, ds_known(dtype, std))


# 16-bit cases whose single-seed check is a lottery (check's docstring), held to the rule on average.
SEED_CASES = [("std10", 40, 32, 10.0), ("std30", 40, 32, 30.0), ("x30_D64", 33, 64, 30.0)]
SEEDS = 8


def _backward_by(path, dtype, S, D, std, causal, seed, monkeypatch, emu=None):
    """(dq, dk, dv) of one backward path on make(seed)'s inputs, and the inputs. emu: (driver, tmp_path)."""
    q, k, v, dout, cos, sin = make(dtype, 1, S, 2, 1, D, std, seed)
    if path == "cuda-emulated":
        with monkeypatch.context() as m:
            out, saved = cpu_forward(m, q, k, v, cos, sin, causal)
        got = run_emulated(*emu, q, k, v, dout, out, saved, cos, sin, causal, True, False, "late", False)
    elif path == "triton":
        out, saved = kernels.attention_forward(q, k, v, cos, sin, causal)
        got = kernels.attention_backward(dout, q, k, v, out, saved, cos, sin, causal)
    else:
        with monkeypatch.context() as m:
            out, saved = cpu_forward(m, q, k, v, cos, sin, causal)
        got = torch.ops.llama_fast.attention_backward(dout, q, k, v, out, saved, cos, sin, causal, False)
    return got, (q, k, v, dout, cos, sin)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("case", SEED_CASES, ids=[c[0] for c in SEED_CASES])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("path", ["triton", "c++", "cuda-emulated"])
def test_16bit_large_logits_hold_the_rule_over_seeds(request, tmp_path, monkeypatch, path, dtype, case, causal):
    """The 2x rule on the mean over 8 seeds of each gradient's max error, where one seed's check is
    luck (fp16 / bf16, q and k std 10 and 30; check's docstring). Measured when written (mean error /
    eager's): Triton 0.26-0.74, C++ 0.26-1.35 (1.85 while it took delta from the saved O); the worst
    single seeds were 3x to 1e5x (eager exact by chance)."""
    if path == "triton" and (dtype == torch.bfloat16 or os.environ.get("TRITON_INTERPRET") != "1"):
        pytest.skip("the Triton kernels run here only in the CPU interpreter, and not in bf16 (its tl.dot is broken)")
    if path == "c++" and not ext.has_kernel("cpu"):
        pytest.skip("the C++ extension is not built")
    emu = (request.getfixturevalue("emu_driver"), tmp_path) if path == "cuda-emulated" else None
    _, S, D, std = case
    ours, eager = torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    for seed in range(SEEDS):
        got, inputs = _backward_by(path, dtype, S, D, std, causal, seed, monkeypatch, emu)
        high = reference_grads(*inputs, causal, torch.float64)
        low = reference_grads(*inputs, causal, dtype)
        ours += torch.tensor([max_abs_error(g.float(), h) for g, h in zip(got, high)]) / SEEDS
        eager += torch.tensor([max_abs_error(lo, h) for lo, h in zip(low, high)]) / SEEDS
    bound = 2 * eager + default_floor(dtype)
    assert (ours <= bound).all(), f"{path} mean errors (dq, dk, dv) {ours.tolist()} > 2x eager's {eager.tolist()} + floor"


@pytest.fixture(scope="module")
def emu_driver(tmp_path_factory):
    smem = "extern __shared__ __align__(128) unsigned char smem[];"
    return build_emulated(tmp_path_factory.mktemp("cuda_emulation_large"), KERNEL, EMU / "driver.cpp",
                          "template <typename Kernel>\nint set_smem(", {smem: "unsigned char* smem = emu_smem_ptr;"})


@pytest.mark.parametrize("case", EMU_CASES, ids=lambda c: c[0])
def test_cuda_backward_emulated_large_logits(monkeypatch, emu_driver, tmp_path, case):
    _, dtype, B, S, Hq, Hkv, D, std = case
    q, k, v, dout, cos, sin = make(dtype, B, S, Hq, Hkv, D, std)
    out, saved = cpu_forward(monkeypatch, q, k, v, cos, sin, True)
    got = run_emulated(emu_driver, tmp_path, q, k, v, dout, out, saved, cos, sin, True, True, False, "late", False)
    check(f"cuda-emulated {case[0]}", got, q, k, v, dout, cos, sin, True, ds_known(dtype, std))


def test_bf16_in_the_interpreter_takes_a_correct_path():
    """Issue 13 item 7: the interpreter's bf16 tl.dot returned ~8e8 where ~2 is right, silently. The op
    now runs the math forward and the C++ (or math) backward for bf16 there; the kernels refuse it."""
    import os

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("about the CPU interpreter")
    q, k, v, dout, cos, sin = make(torch.bfloat16, 1, 33, 4, 2, 64, 1.0)
    with pytest.raises(NotImplementedError, match="bf16 does not run in the Triton CPU interpreter"):
        kernels.attention_forward(q, k, v, cos, sin, True)
    with pytest.raises(NotImplementedError, match="bf16 does not run in the Triton CPU interpreter"):
        kernels.attention_backward(dout, q, k, v, q, torch.zeros(2, 1, 4, 33), cos, sin, True)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, lse = attention_ops.attention(*leaves, cos, sin, True, return_lse=True)
    ref_out, ref_lse = reference.attention(*(t.double() for t in (q, k, v)), cos, sin, True, return_lse=True)
    low_out, low_lse = reference.attention(q, k, v, cos, sin, True, return_lse=True)
    assert_within_2x("bf16 out", out.float(), ref_out, low_out.float(), floor=default_floor(torch.bfloat16))
    assert_within_2x("bf16 lse", lse, ref_lse, low_lse, floor=1e-4)
    check("bf16 op", torch.autograd.grad(out, leaves, dout), q, k, v, dout, cos, sin, True)


def test_stats_of_the_wrong_shape_or_dtype_are_named():
    q, k, v, dout, cos, sin = make(torch.float32, 1, 8, 2, 1, 16, 1.0)
    out = torch.zeros_like(q)
    for bad in (torch.zeros(1, 2, 8), torch.zeros(2, 1, 2, 8, dtype=torch.float64), torch.zeros(2, 1, 2, 7)):
        with pytest.raises(ValueError, match=r"stats must be float32 \[2, 1, 2, 8\]"):
            kernels.attention_backward(dout, q, k, v, out, bad, cos, sin, True)
        with pytest.raises(ValueError, match=r"stats must be float32 \[2, 1, 2, 8\]"):
            attention_ops._backward_math(dout, q, k, v, out, bad, cos, sin, True)
        if ext.has_kernel("cpu"):
            with pytest.raises(RuntimeError, match=r"stats must be float32 \[2, 1, 2, 8\]"):
                torch.ops.llama_fast.attention_backward(dout, q, k, v, out, bad, cos, sin, True, False)


def test_return_lse_is_the_natural_log_sum_exp():
    q, k, v, dout, cos, sin = make(torch.float32, 2, 19, 4, 2, 32, 3.0)
    _, lse = attention_ops.attention(q, k, v, cos, sin, True, return_lse=True)
    _, ref = reference.attention(*(t.double() for t in (q, k, v)), cos, sin, True, return_lse=True)
    assert lse.shape == (2, 4, 19) and lse.dtype == torch.float32
    torch.testing.assert_close(lse.double(), ref, rtol=1e-5, atol=1e-5)


GPU_CASES = [(f"std{s:g}_{str(dt)[6:]}", dt, 2, 300, 4, 2, 128, s)
             for dt, stds in ((torch.float32, (3.0, 30.0, 100.0)), (torch.float16, (3.0, 10.0, 30.0)),
                              (torch.bfloat16, (3.0, 10.0, 30.0)))
             for s in stds]


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: c[0])
def test_gpu_backwards_large_logits(case, causal):
    """On a GPU: the Triton forward, then the Triton backward and (16-bit) the CUDA backward in both
    modes. Not bitwise the forward's S2 there (the tensor cores sum in their own order), so large
    |S2| costs more than in the interpreter; this measures how much."""
    _, dtype, B, S, Hq, Hkv, D, std = case
    q, k, v, dout, cos, sin = (t.cuda() for t in make(dtype, B, S, Hq, Hkv, D, std))
    out, stats = kernels.attention_forward(q, k, v, cos, sin, causal)
    runs = {"triton": lambda: kernels.attention_backward(dout, q, k, v, out, stats, cos, sin, causal)}
    if dtype != torch.float32 and ext.has_kernel("cuda"):
        for det in (True, False):
            runs[f"cuda det={det}"] = lambda det=det: torch.ops.llama_fast.attention_backward(
                dout, q, k, v, out, stats, cos, sin, causal, det)
    cpu = [t.cpu() for t in (q, k, v, dout, cos, sin)]
    for name, run in runs.items():
        check(f"gpu {name} {case[0]}", [g.cpu() for g in run()], *cpu, causal, ds_known(dtype, std))
