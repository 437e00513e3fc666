"""torch.ops.llama_fast.rms_norm_backward (csrc/) against autograd through the reference."""
import pytest
import torch

import llama_fast._extension as ext
from llama_fast import reference
from llama_fast.testing import assert_within_2x, default_floor

pytestmark = pytest.mark.skipif(not ext.AVAILABLE, reason=f"llama_fast._C not built: {ext.LOAD_ERROR}")

EPS = 1e-6


def reference_grads(x, w, dy, dres, dtype):
    """(dx, dw) from autograd through reference.add_rms_norm-style math in `dtype`."""
    x = x.detach().to(dtype).requires_grad_()
    w = w.detach().to(dtype if w.dtype != torch.float32 or dtype == torch.float64 else w.dtype).requires_grad_()
    y = reference.rms_norm(x, w, EPS)
    grads = torch.autograd.grad(y, (x, w), dy.to(dtype))
    dx = grads[0] + (dres.to(dtype) if dres is not None else 0)
    return dx, grads[1]


def rstd_of(x):
    return torch.rsqrt(x.double().pow(2).mean(-1) + EPS).float()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 123), (5, 4096), (3, 7, 333), (1000, 64), (2, 9000)])
@pytest.mark.parametrize("fp32_weight", [False, True])
@pytest.mark.parametrize("with_residual", [False, True])
def test_matches_reference(dtype, shape, fp32_weight, with_residual):
    x = torch.randn(shape, dtype=dtype) * 2 + 0.5
    w = (torch.rand(shape[-1]) + 0.5).to(torch.float32 if fp32_weight else dtype)
    dy = torch.randn(shape, dtype=dtype)
    dres = torch.randn(shape, dtype=dtype) if with_residual else None
    dx, dw = torch.ops.llama_fast.rms_norm_backward(dy, x, w, rstd_of(x), dres)
    assert dx.dtype == dtype and dw.dtype == w.dtype and dx.shape == x.shape and dw.shape == w.shape

    dx_hi, dw_hi = reference_grads(x, w, dy, dres, torch.float64)
    dx_lo, dw_lo = reference_grads(x, w, dy, dres, dtype)
    floor = default_floor(dtype)
    assert_within_2x("dx", dx, dx_hi, dx_lo, floor=floor)
    assert_within_2x("dw", dw, dw_hi, dw_lo, floor=floor)


def test_non_contiguous_views():
    base = torch.randn(6, 10, 130)
    x = base[:, ::2, :97]  # strided rows, a column slice
    dy = torch.randn(6, 130, 5).transpose(1, 2)[..., :97]  # last dim not contiguous
    w = torch.rand(97) + 0.5
    dx, dw = torch.ops.llama_fast.rms_norm_backward(dy, x, w, rstd_of(x), None)
    dx_hi, dw_hi = reference_grads(x, w, dy, None, torch.float64)
    torch.testing.assert_close(dx.double(), dx_hi, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dw.double(), dw_hi, rtol=1e-5, atol=1e-5)


def test_deterministic():
    x, dy, w = torch.randn(257, 300), torch.randn(257, 300), torch.rand(300)
    a = torch.ops.llama_fast.rms_norm_backward(dy, x, w, rstd_of(x), None)
    b = torch.ops.llama_fast.rms_norm_backward(dy, x, w, rstd_of(x), None)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda a: a.update(w=torch.ones(7)), "weight must be 1-D of size 16"),
        (lambda a: a.update(w=torch.ones(16, dtype=torch.float64)), "weight must be float32 or the dtype of x"),
        (lambda a: a.update(dy=torch.ones(4, 15)), "dy must have the shape of x"),
        (lambda a: a.update(dy=torch.ones(4, 16, dtype=torch.float16)), "dy must have the dtype of x"),
        (lambda a: a.update(rstd=torch.ones(3)), "rstd must be float32 with 4 elements"),
        (lambda a: a.update(x=torch.ones(4, 16, dtype=torch.int32)), "x must be float32, float16 or bfloat16"),
        (lambda a: a.update(dres=torch.ones(4, 17)), "dresidual must have the shape of x"),
    ],
)
def test_bad_input_is_named(mutate, match):
    args = dict(dy=torch.ones(4, 16), x=torch.ones(4, 16), w=torch.ones(16), rstd=torch.ones(4), dres=None)
    mutate(args)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.llama_fast.rms_norm_backward(args["dy"], args["x"], args["w"], args["rstd"], args["dres"])


def test_meta_shapes_and_opcheck():
    x = torch.randn(3, 5, 40, device="meta", dtype=torch.bfloat16)
    dx, dw = torch.ops.llama_fast.rms_norm_backward(x, x, torch.ones(40, device="meta"), torch.ones(15, device="meta"))
    assert dx.shape == x.shape and dx.dtype == torch.bfloat16 and dw.shape == (40,) and dw.dtype == torch.float32
    x = torch.randn(3, 5, 40)
    torch.library.opcheck(
        torch.ops.llama_fast.rms_norm_backward, (torch.randn_like(x), x, torch.rand(40), rstd_of(x), None)
    )


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 123), (5, 4096), (1000, 8192), (37, 8200), (4, 100000)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_cuda_matches_reference(dtype, shape, with_residual):
    if not ext.WITH_CUDA:
        pytest.skip("llama_fast._C was built without CUDA kernels")
    x = (torch.randn(shape, dtype=dtype) * 2 + 0.5).cuda()
    w = (torch.rand(shape[-1]) + 0.5).cuda().to(dtype)
    dy = torch.randn(shape, dtype=dtype).cuda()
    dres = torch.randn(shape, dtype=dtype).cuda() if with_residual else None
    dx, dw = torch.ops.llama_fast.rms_norm_backward(dy, x, w, rstd_of(x), dres)
    dx_hi, dw_hi = reference_grads(x.cpu(), w.cpu(), dy.cpu(), None if dres is None else dres.cpu(), torch.float64)
    dx_lo, dw_lo = reference_grads(x, w, dy, dres, dtype)
    assert_within_2x("dx", dx.cpu(), dx_hi, dx_lo.cpu(), floor=default_floor(dtype))
    assert_within_2x("dw", dw.cpu(), dw_hi, dw_lo.cpu(), floor=default_floor(dtype))
    again = torch.ops.llama_fast.rms_norm_backward(dy, x, w, rstd_of(x), dres)
    assert torch.equal(dw, again[1]), "dw must be bitwise deterministic"
