"""torch.ops.llama_fast.swiglu_backward (csrc/) against autograd through the reference."""
import pytest
import torch

import llama_fast._extension as ext
from llama_fast import reference
from llama_fast.testing import assert_within_2x, default_floor

pytestmark = pytest.mark.skipif(not ext.AVAILABLE, reason=f"llama_fast._C not built: {ext.LOAD_ERROR}")


def reference_grads(gate, up, dy, dtype):
    """(dgate, dup) from autograd through reference.swiglu in `dtype`."""
    gate = gate.detach().to(dtype).requires_grad_()
    up = up.detach().to(dtype).requires_grad_()
    return torch.autograd.grad(reference.swiglu(gate, up), (gate, up), dy.to(dtype))


def check(dgate, dup, gate, up, dy, dtype):
    dg_hi, du_hi = reference_grads(gate.cpu(), up.cpu(), dy.cpu(), torch.float64)
    dg_lo, du_lo = reference_grads(gate, up, dy, dtype)
    assert dgate.dtype == dtype and dup.dtype == dtype and dgate.shape == gate.shape and dup.shape == up.shape
    assert_within_2x("dgate", dgate.cpu(), dg_hi, dg_lo.cpu(), floor=default_floor(dtype))
    assert_within_2x("dup", dup.cpu(), du_hi, du_lo.cpu(), floor=default_floor(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 123), (5, 4096), (3, 7, 333), (1000, 64)])
def test_matches_reference(dtype, shape):
    gate = (torch.randn(shape) * 3).to(dtype)
    up, dy = torch.randn(shape, dtype=dtype), torch.randn(shape, dtype=dtype)
    dgate, dup = torch.ops.llama_fast.swiglu_backward(dy, gate, up)
    check(dgate, dup, gate, up, dy, dtype)


def test_fused_halves_and_strided_dy():
    fused = torch.randn(4, 6, 2 * 50) * 3
    gate, up = fused.chunk(2, dim=-1)  # row stride 100
    dy = torch.randn(4, 50, 6).transpose(1, 2)  # last dim not contiguous
    dgate, dup = torch.ops.llama_fast.swiglu_backward(dy, gate, up)
    check(dgate, dup, gate, up, dy, torch.float32)


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda a: a.update(up=torch.ones(4, 15)), "up must have the shape of gate"),
        (lambda a: a.update(dy=torch.ones(4, 16, dtype=torch.float16)), "dy must have the dtype of gate"),
        (lambda a: a.update(gate=torch.ones(4, 16, dtype=torch.int32)), "gate must be float32, float16 or bfloat16"),
        (lambda a: a.update(dy=torch.ones(4, 17)), "dy must have the shape of gate"),
    ],
)
def test_bad_input_is_named(mutate, match):
    args = dict(dy=torch.ones(4, 16), gate=torch.ones(4, 16), up=torch.ones(4, 16))
    mutate(args)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.llama_fast.swiglu_backward(args["dy"], args["gate"], args["up"])


def test_meta_shapes_and_opcheck():
    g = torch.randn(3, 5, 40, device="meta", dtype=torch.bfloat16)
    dgate, dup = torch.ops.llama_fast.swiglu_backward(g, g, g)
    assert dgate.shape == g.shape and dup.shape == g.shape and dgate.dtype == torch.bfloat16
    fused = torch.randn(3, 5, 80)
    torch.library.opcheck(torch.ops.llama_fast.swiglu_backward, (torch.randn(3, 5, 40), *fused.chunk(2, dim=-1)))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 123), (5, 4096), (1000, 11008), (37, 4099), (4, 100000)])
@pytest.mark.parametrize("fused", [False, True])
def test_cuda_matches_reference(dtype, shape, fused):
    if not ext.WITH_CUDA:
        pytest.skip("llama_fast._C was built without CUDA kernels")
    if fused:
        gate, up = (torch.randn(*shape[:-1], 2 * shape[-1]) * 3).to(dtype).cuda().chunk(2, dim=-1)
    else:
        gate, up = (torch.randn(shape) * 3).to(dtype).cuda(), torch.randn(shape).to(dtype).cuda()
    dy = torch.randn(shape).to(dtype).cuda()
    torch.full((64 * 2**20,), float("nan"), device="cuda")  # freed NaNs: unwritten outputs show
    dgate, dup = torch.ops.llama_fast.swiglu_backward(dy, gate, up)
    check(dgate, dup, gate, up, dy, dtype)
