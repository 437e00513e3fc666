"""The opt-in Hopper attention backward (csrc/cuda/attention_backward_sm90.cu, issue 18) on a GPU.

LLAMA_FAST_ATTENTION_BACKWARD=sm90 routes torch.ops.llama_fast.attention_backward to it on sm_90
devices for head dims 64 and 128 (tests/test_cuda_emulation_sm90.py runs the same kernels on the CPU
under the host emulation). Every case checks dq, dk, dv against the fp64 reference with the 2x rule;
skipped without an sm_90 GPU and a build holding sm_90a code.
"""
import pytest
import torch

import llama_fast._extension as ext
from llama_fast.ops import attention
from llama_fast.ops.attention import _attention_op
from test_attention import GPU, check_all, make_inputs, reference_run

SHAPES = [(B, S, Hq, Hkv, D) for (B, S) in ((1, 1), (2, 17), (1, 113), (1, 1023), (2, 2049))
          for (Hq, Hkv) in ((4, 4), (8, 2), (8, 1)) for D in (64, 128)]


@pytest.fixture
def sm90(monkeypatch):
    if not (ext.WITH_CUDA and torch.cuda.is_available() and ext._C.attention_backward_sm90_available()):
        pytest.skip("needs an sm_90 GPU and an extension built with sm_90a code")
    monkeypatch.setenv("LLAMA_FAST_ATTENTION_BACKWARD", "sm90")


@pytest.mark.gpu
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}_S{}_Hq{}_Hkv{}_D{}".format(*s))
def test_sm90_backward_matches_reference(sm90, shape, causal, deterministic):
    B, S, Hq, Hkv, D = shape
    q, k, v, cos, sin = make_inputs(B, S, Hq, Hkv, D, torch.bfloat16, device=GPU, layout="bhsd")
    dout = torch.randn(B, S, Hq, D, dtype=torch.bfloat16, device=GPU)
    high = reference_run(q.cpu(), k.cpu(), v.cpu(), cos.cpu(), sin.cpu(), causal, dout.cpu(), torch.float64)
    low = reference_run(q, k, v, cos, sin, causal, dout, torch.bfloat16, device=GPU)
    out, lse = attention(q, k, v, cos, sin, causal, return_lse=True)
    grads = torch.ops.llama_fast.attention_backward(dout, q, k, v, out, lse, cos, sin, causal, deterministic)
    check_all(f"sm90 backward deterministic={deterministic}", (out, lse) + grads, high, low, torch.bfloat16, S)


@pytest.mark.gpu
def test_sm90_deterministic_backward_is_bitwise_reproducible(sm90):
    q, k, v, cos, sin = make_inputs(2, 1000, 8, 2, 128, torch.bfloat16, device=GPU)
    out, lse = attention(q, k, v, cos, sin, return_lse=True)
    dout = torch.randn_like(out)
    runs = [torch.ops.llama_fast.attention_backward(dout, q, k, v, out, lse, cos, sin, True, True) for _ in range(3)]
    for run in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], run))


def test_the_opt_in_changes_nothing_where_the_kernel_cannot_run(monkeypatch):
    """On the CPU (or without sm_90a code) LLAMA_FAST_ATTENTION_BACKWARD=sm90 leaves the backward as it was."""
    if not ext.AVAILABLE:
        pytest.skip("llama_fast._C is not built")
    if torch.cuda.is_available():
        pytest.skip("checks the CPU path")
    assert ext._C.attention_backward_sm90_available() is False
    q, k, v, cos, sin = make_inputs(1, 33, 4, 2, 64, torch.float32)
    out, stats = _attention_op(q, k, v, cos, sin, True, False)  # O and the row statistics it saves
    dout = torch.randn_like(out)
    before = torch.ops.llama_fast.attention_backward(dout, q, k, v, out, stats, cos, sin, True, True)
    monkeypatch.setenv("LLAMA_FAST_ATTENTION_BACKWARD", "sm90")
    after = torch.ops.llama_fast.attention_backward(dout, q, k, v, out, stats, cos, sin, True, True)
    assert all(torch.equal(a, b) for a, b in zip(before, after))
