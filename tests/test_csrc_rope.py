"""torch.ops.llama_fast.rope_backward (csrc/) against autograd through the reference."""
import pytest
import torch

import llama_fast._extension as ext
from llama_fast import reference
from llama_fast.testing import assert_within_2x, default_floor

pytestmark = pytest.mark.skipif(not ext.AVAILABLE, reason=f"llama_fast._C not built: {ext.LOAD_ERROR}")


def reference_grads(q, k, dq_out, dk_out, cos, sin, dtype):
    """(dq, dk) from autograd through reference.rope in `dtype`."""
    q = q.detach().to(dtype).requires_grad_()
    k = k.detach().to(dtype).requires_grad_()
    out = reference.rope(q, k, cos, sin)
    return torch.autograd.grad(out, (q, k), (dq_out.to(dtype), dk_out.to(dtype)))


def check(dq, dk, dq_out, dk_out, cos, sin, dtype):
    """The op's (dq, dk) for upstream (dq_out, dk_out) against the reference's gradients."""
    q, k = torch.randn(dq_out.shape), torch.randn(dk_out.shape)  # the rotation's gradient ignores q, k
    hi = reference_grads(q, k, dq_out.cpu(), dk_out.cpu(), cos.cpu().double(), sin.cpu().double(), torch.float64)
    lo = reference_grads(q.to(dq_out.device), k.to(dq_out.device), dq_out, dk_out, cos, sin, dtype)
    for name, got, h, low in (("dq", dq, hi[0], lo[0]), ("dk", dk, hi[1], lo[1])):
        assert got.dtype == dtype and got.shape == h.shape and got.is_contiguous()
        assert_within_2x(name, got.cpu(), h, low.cpu(), floor=default_floor(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B, S, Hq, Hkv, D", [(1, 1, 4, 1, 128), (2, 17, 8, 8, 64), (3, 5, 6, 2, 10)])
def test_matches_reference(dtype, B, S, Hq, Hkv, D):
    cos, sin = reference.rope_tables(S + 3, D)  # a table longer than the sequence
    dq_out = torch.randn(B, S, Hq, D, dtype=dtype)
    dk_out = torch.randn(B, S, Hkv, D, dtype=dtype)
    dq, dk = torch.ops.llama_fast.rope_backward(dq_out, dk_out, cos, sin)
    check(dq, dk, dq_out, dk_out, cos, sin, dtype)


def test_strided_gradients_and_tables():
    cos, sin = reference.rope_tables(40, 32)
    dq_out = torch.randn(2, 4, 9, 32).transpose(1, 2)  # [B, H, S, D] seen as [B, S, H, D]
    dk_out = torch.randn(2, 9, 2, 64)[..., ::2]  # head dim not contiguous
    dq, dk = torch.ops.llama_fast.rope_backward(dq_out, dk_out, cos[5:], sin[5:])
    check(dq, dk, dq_out, dk_out, cos[5:], sin[5:], torch.float32)


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda a: a.update(dq=torch.ones(8, 4, 16)), "dq must be 4-D"),
        (lambda a: a.update(dk=torch.ones(2, 7, 2, 16)), "dk must be \\[B, S, Hkv, D\\]"),
        (lambda a: a.update(dk=torch.ones(2, 8, 2, 16, dtype=torch.float16)), "dk must have the dtype of dq"),
        (lambda a: a.update(dq=torch.ones(2, 8, 4, 16, dtype=torch.int32)), "dq must be float32, float16 or bfloat16"),
        (lambda a: a.update(cos=torch.ones(7, 8)), "cos must be \\[>= 8, 8\\]"),
        (lambda a: a.update(sin=torch.ones(8, 8, dtype=torch.float16)), "sin must be float32"),
        (lambda a: a.update(sin=torch.ones(9, 8)), "sin must have the shape of cos"),
    ],
)
def test_bad_input_is_named(mutate, match):
    cos, sin = reference.rope_tables(8, 16)
    args = dict(dq=torch.ones(2, 8, 4, 16), dk=torch.ones(2, 8, 2, 16), cos=cos, sin=sin)
    mutate(args)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.llama_fast.rope_backward(args["dq"], args["dk"], args["cos"], args["sin"])


def test_meta_shapes_and_opcheck():
    dq = torch.randn(2, 7, 4, 16, device="meta", dtype=torch.bfloat16)
    dk = torch.randn(2, 7, 1, 16, device="meta", dtype=torch.bfloat16)
    c = torch.ones(7, 8, device="meta")
    a, b = torch.ops.llama_fast.rope_backward(dq, dk, c, c)
    assert a.shape == dq.shape and b.shape == dk.shape and a.dtype == torch.bfloat16
    cos, sin = reference.rope_tables(7, 16)
    dq, dk = torch.randn(2, 7, 4, 16), torch.randn(2, 7, 1, 16)
    torch.library.opcheck(torch.ops.llama_fast.rope_backward, (dq, dk, cos, sin))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "B, S, Hq, Hkv, D", [(1, 1, 32, 8, 128), (2, 113, 32, 32, 128), (2, 1023, 8, 1, 64), (3, 17, 6, 2, 80)]
)
@pytest.mark.parametrize("layout", ["bshd", "bhsd", "qkv"])
def test_cuda_matches_reference(dtype, B, S, Hq, Hkv, D, layout):
    if not ext.WITH_CUDA:
        pytest.skip("llama_fast._C was built without CUDA kernels")
    cos, sin = reference.rope_tables(S, D, device="cuda")
    def randn(*shape):
        return torch.randn(shape, device="cuda").to(dtype)

    if layout == "bshd":
        dq_out, dk_out = randn(B, S, Hq, D), randn(B, S, Hkv, D)
    elif layout == "bhsd":
        dq_out, dk_out = randn(B, Hq, S, D).transpose(1, 2), randn(B, Hkv, S, D).transpose(1, 2)
    else:
        fused = randn(B, S, (Hq + 2 * Hkv) * D)  # the gradient of a fused qkv output: strided views
        dq_out = fused[..., : Hq * D].view(B, S, Hq, D)
        dk_out = fused[..., Hq * D : (Hq + Hkv) * D].view(B, S, Hkv, D)
    torch.full((64 * 2**20,), float("nan"), device="cuda")  # freed NaNs: unwritten outputs show
    dq, dk = torch.ops.llama_fast.rope_backward(dq_out, dk_out, cos, sin)
    check(dq, dk, dq_out, dk_out, cos, sin, dtype)
