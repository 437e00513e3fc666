"""llama_fast.ops.rms_norm and add_rms_norm against the reference: outputs, every gradient, errors."""
import warnings

import pytest
import torch
from op_check import check_op, fallback_backward, poison_empty  # noqa: F401  (fixtures)

from llama_fast import ops, reference

EPS = 1e-6

pytestmark = pytest.mark.usefixtures("poison_empty")


def run_rms_norm(x_shape, dtype, device="cpu", *, w_dtype=None, view=None, residual=False):
    """Checks rms_norm (or add_rms_norm) on x = view(base) with a weight in w_dtype (default: dtype)."""
    view = view or (lambda t: t)
    base = (torch.randn(x_shape, device=device) * 2 + 0.5).to(dtype).requires_grad_()
    cols = view(base).shape[-1]
    w = (torch.rand(cols, device=device) + 0.5).to(w_dtype or dtype).requires_grad_()
    if residual:
        res = torch.randn(x_shape, device=device).to(dtype).requires_grad_()
        check_op(
            lambda x, r, w: ops.add_rms_norm(x, r, w, EPS),
            lambda x, r, w: reference.add_rms_norm(x, r, w, EPS),
            [base, res, w],
            lambda b, r, w: (view(b), view(r), w),
            out_names=["normed", "sum"],
            grad_names=["dx", "dresidual", "dweight"],
        )
    else:
        check_op(
            lambda x, w: ops.rms_norm(x, w, EPS),
            lambda x, w: reference.rms_norm(x, w, EPS),
            [base, w],
            lambda b, w: (view(b), w),
            out_names=["y"],
            grad_names=["dx", "dweight"],
        )


# Hidden sizes 123 (odd), 4096, 8192 and 9000 (wider than one Triton block); rows 1, 5, 1000; 3-D and
# 4-D inputs. Rows 1000 only with a small hidden size: the Triton interpreter runs one row at a time.
CPU_SHAPES = [(1, 123), (5, 4096), (5, 8192), (2, 9000), (1000, 64), (3, 7, 123), (2, 3, 4, 123)]


@pytest.mark.parametrize("residual", [False, True], ids=["rms_norm", "add_rms_norm"])
@pytest.mark.parametrize("shape", CPU_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_cpu_matches_reference(dtype, shape, residual):
    run_rms_norm(shape, dtype, residual=residual)


@pytest.mark.parametrize("residual", [False, True], ids=["rms_norm", "add_rms_norm"])
def test_fp16_activations_with_fp32_weight(residual):
    run_rms_norm((4, 300), torch.float16, w_dtype=torch.float32, residual=residual)


@pytest.mark.parametrize("residual", [False, True], ids=["rms_norm", "add_rms_norm"])
@pytest.mark.parametrize(
    "shape, view",
    [
        ((6, 10, 130), lambda t: t[:, ::2, :97]),  # strided rows and a column slice
        ((4, 130, 5), lambda t: t.transpose(1, 2)),  # last dim not contiguous: copied to rows
        ((3, 5, 2, 64), lambda t: t[:, :, 1]),  # one half of a fused output
    ],
    ids=["slice", "transpose", "chunk"],
)
def test_non_contiguous_views(shape, view, residual):
    run_rms_norm(shape, torch.float32, view=view, residual=residual)


@pytest.mark.parametrize("triton_interpret", ["1", "0"], ids=["triton", "torch"])
@pytest.mark.parametrize("residual", [False, True], ids=["rms_norm", "add_rms_norm"])
def test_fallback_backward_warns_once(fallback_backward, monkeypatch, triton_interpret, residual):
    """Without the extension's kernel: the Triton backward (or, without the interpreter, PyTorch
    math for forward and backward) runs, correct, with one warning however often it runs."""
    monkeypatch.setenv("TRITON_INTERPRET", triton_interpret)
    op = "add_rms_norm" if residual else "rms_norm"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_rms_norm((3, 9000), torch.float32, residual=residual)  # wider than one Triton block
        run_rms_norm((5, 123), torch.float16, w_dtype=torch.float32, residual=residual)
    ours = [w for w in caught if f"no compiled backward for {op} on cpu" in str(w.message)]
    assert len(ours) == 1, [str(w.message) for w in caught]


def test_add_rms_norm_without_using_the_sum():
    """The last layer discards the sum: its gradient arrives as None and must be treated as zero."""
    x, r = torch.randn(4, 64, requires_grad=True), torch.randn(4, 64, requires_grad=True)
    w = torch.rand(64, requires_grad=True)
    y, _ = ops.add_rms_norm(x, r, w, EPS)
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, r, w), dy)
    ref = torch.autograd.grad(reference.add_rms_norm(x, r, w, EPS)[0], (x, r, w), dy)
    for got, want in zip(grads, ref):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_saves_rstd_not_the_normalised_tensor():
    x, w = torch.randn(8, 256, requires_grad=True), torch.rand(256, requires_grad=True)
    y = ops.rms_norm(x, w, EPS)
    saved = [t for t in y.grad_fn.saved_tensors]
    shapes = sorted(tuple(t.shape) for t in saved)
    assert shapes == [(8,), (8, 256), (256,)], shapes
    rstd = next(t for t in saved if t.shape == (8,))
    assert rstd.dtype == torch.float32


def test_dweight_is_deterministic():
    x, w, dy = torch.randn(257, 300), torch.rand(300, requires_grad=True), torch.randn(257, 300)
    a = torch.autograd.grad(ops.rms_norm(x, w, EPS), w, dy)[0]
    b = torch.autograd.grad(ops.rms_norm(x, w, EPS), w, dy)[0]
    assert torch.equal(a, b)


@pytest.mark.parametrize(
    "args, error, match",
    [
        (lambda: (torch.ones(4, 16, dtype=torch.int64), torch.ones(16)), TypeError, "x must be float32"),
        (lambda: (torch.ones(4, 16), torch.ones(7)), ValueError, r"weight must be 1-D of size 16.*\(7,\)"),
        (lambda: (torch.ones(4, 16), torch.ones(16, dtype=torch.float64)), TypeError,
         "weight must be float32, float16 or bfloat16, got torch.float64"),
        (lambda: (torch.ones(4, 16, dtype=torch.float16), torch.ones(16, dtype=torch.bfloat16)), TypeError,
         "weight must be float32 or the dtype of x"),
        (lambda: (torch.ones(4, 16), torch.ones(16, device="meta")), ValueError, "weight must be on the device of x"),
        (lambda: (torch.tensor(1.0), torch.ones(1)), ValueError, "x must have at least one dimension"),
    ],
)
def test_bad_input_is_named(args, error, match):
    with pytest.raises(error, match=match):
        ops.rms_norm(*args(), EPS)


@pytest.mark.parametrize("x_dtype, res_dtype", [(torch.float16, torch.float32), (torch.float32, torch.float16)])
def test_mixed_dtypes_promote(x_dtype, res_dtype):
    """Under autocast a sublayer's fp16/bf16 output meets an fp32 residual stream: promoted like x + r."""
    x = (torch.randn(6, 130) * 2).to(x_dtype).requires_grad_()
    r = torch.randn(6, 130).to(res_dtype).requires_grad_()
    w = (torch.rand(130) + 0.5).requires_grad_()
    check_op(
        lambda x, r, w: ops.add_rms_norm(x, r, w, EPS),
        lambda x, r, w: reference.add_rms_norm(x, r, w, EPS),
        [x, r, w], lambda x, r, w: (x, r, w),
        out_names=["normed", "sum"], grad_names=["dx", "dresidual", "dweight"],
    )
    normed, total = ops.add_rms_norm(x, r, w, EPS)
    assert normed.dtype == total.dtype == torch.float32
    assert x.detach().dtype == x_dtype  # inputs untouched


@pytest.mark.parametrize("residual", [False, True], ids=["rms_norm", "add_rms_norm"])
def test_non_contiguous_weight(residual):
    w_base = (torch.rand(2 * 97) + 0.5).requires_grad_()
    x = torch.randn(5, 97).requires_grad_()
    r = torch.randn(5, 97).requires_grad_()
    if residual:
        check_op(lambda x, r, w: ops.add_rms_norm(x, r, w, EPS), lambda x, r, w: reference.add_rms_norm(x, r, w, EPS),
                 [x, r, w_base], lambda x, r, w: (x, r, w[::2]), out_names=["normed", "sum"],
                 grad_names=["dx", "dresidual", "dweight"])
    else:
        check_op(lambda x, w: ops.rms_norm(x, w, EPS), lambda x, w: reference.rms_norm(x, w, EPS),
                 [x, w_base], lambda x, w: (x, w[::2]), out_names=["y"], grad_names=["dx", "dweight"])


@pytest.mark.parametrize("eps", [0.0, -1e-6, float("nan"), float("inf")])
def test_bad_eps(eps):
    with pytest.raises(ValueError, match="eps must be a finite number > 0"):
        ops.rms_norm(torch.ones(2, 8), torch.ones(8), eps)


@pytest.mark.parametrize(
    "residual, error, match",
    [
        (lambda: torch.ones(4, 15), ValueError, r"residual must have the shape of x \(4, 16\)"),
        (lambda: torch.ones(4, 16, dtype=torch.int32), TypeError, "residual must be float32"),
        (lambda: torch.ones(4, 16, device="meta"), ValueError, "residual must be on the device of x"),
    ],
)
def test_bad_residual_is_named(residual, error, match):
    """(A float residual of another dtype is promoted, not refused: see test_mixed_dtypes_promote.)"""
    with pytest.raises(error, match=match):
        ops.add_rms_norm(torch.ones(4, 16), residual(), torch.ones(16), EPS)


def test_opcheck():
    x = torch.randn(3, 5, 40, requires_grad=True)
    w = torch.rand(40, requires_grad=True)
    torch.library.opcheck(torch.ops.llama_fast.rms_norm_forward, (x, w, EPS))
    r = torch.randn(3, 5, 40, requires_grad=True)
    torch.library.opcheck(torch.ops.llama_fast.add_rms_norm_forward, (x, r, w, EPS))
    x2 = torch.randn(3, 5, 40)
    rstd = torch.rand(3, 5) + 0.5
    torch.library.opcheck(
        torch.ops.llama_fast.rms_norm_backward_fallback, (torch.randn_like(x2), x2, w.detach(), rstd, r.detach())
    )


# ------------------------------------------------------------------------------------------------
# GPU
# ------------------------------------------------------------------------------------------------
GPU_SHAPES = [(1, 123), (5, 4096), (1000, 8192), (37, 9000), (4, 100000), (2, 17, 4096), (2, 3, 5, 123)]


@pytest.mark.gpu
@pytest.mark.parametrize("residual", [False, True], ids=["rms_norm", "add_rms_norm"])
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_gpu_matches_reference(dtype, shape, residual):
    run_rms_norm(shape, dtype, "cuda", residual=residual)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("residual", [False, True], ids=["rms_norm", "add_rms_norm"])
def test_gpu_low_precision_with_fp32_weight_and_views(dtype, residual):
    run_rms_norm((8, 2, 2, 4096), dtype, "cuda", w_dtype=torch.float32, view=lambda t: t[:, :, 1], residual=residual)


@pytest.mark.gpu
@pytest.mark.parametrize("residual", [False, True], ids=["rms_norm", "add_rms_norm"])
def test_gpu_triton_fallback_backward(fallback_backward, residual):
    with pytest.warns(RuntimeWarning, match="no compiled backward"):
        run_rms_norm((300, 4096), torch.bfloat16, "cuda", w_dtype=torch.float32, residual=residual)
        run_rms_norm((7, 9000), torch.float32, "cuda", residual=residual)


@pytest.mark.gpu
@pytest.mark.slow
def test_gpu_past_2_pow_31_elements():
    """Rows past element 2^31: the int64 offsets. Checked on the last rows against the reference."""
    cols = 4096
    rows = 2**31 // cols + 3
    x = torch.randn(rows, cols, device="cuda", dtype=torch.bfloat16)
    w = torch.rand(cols, device="cuda", dtype=torch.bfloat16) + 0.5
    dy = torch.randn_like(x)
    xg, wg = x.requires_grad_(), w.requires_grad_()
    y = ops.rms_norm(xg, wg, EPS)
    dx, dw = torch.autograd.grad(y, (xg, wg), dy)
    tail = slice(rows - 5, rows)
    xt = x.detach()[tail].clone().requires_grad_()
    yt = reference.rms_norm(xt, w.detach(), EPS)
    (dxt,) = torch.autograd.grad(yt, xt, dy[tail])
    torch.testing.assert_close(y[tail].float(), yt.float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(dx[tail].float(), dxt.float(), rtol=2e-2, atol=5e-2)
    w32 = w.detach().float().requires_grad_()
    dw_ref = torch.zeros(cols, device="cuda", dtype=torch.float32)
    for start in range(0, rows, 32768):  # the reference's dw, summed chunk by chunk in fp32
        chunk = slice(start, min(start + 32768, rows))
        y_chunk = reference.rms_norm(x.detach()[chunk].float(), w32, EPS)
        dw_ref += torch.autograd.grad(y_chunk, w32, dy[chunk].float())[0]
    torch.testing.assert_close(dw.float(), dw_ref, rtol=2e-2, atol=2e-2 * dw_ref.abs().max().item())


@pytest.mark.parametrize("residual", [False, True], ids=["rms_norm", "add_rms_norm"])
@pytest.mark.parametrize("shape", [(4, 0), (2, 3, 0), (0, 7)], ids=str)
def test_empty_rows_and_zero_width_rows_match_the_reference(shape, residual):
    """A zero-width last dimension ran forward but the backward failed ('rstd must be float32 with 0
    elements ...'); the reference gives empty gradients (and dweight zeros when there are no rows)."""
    run_rms_norm(shape, torch.float32, residual=residual)
