"""llama_fast.ops.swiglu against the reference: outputs, gradients, fused-GEMM views, errors."""
import warnings

import pytest
import torch
from op_check import check_op, fallback_backward, poison_empty  # noqa: F401  (fixtures)

from llama_fast import ops, reference

pytestmark = pytest.mark.usefixtures("poison_empty")


def run_swiglu(shape, dtype, device="cpu", *, layout="chunks", view=None):
    """Checks swiglu on one [..., 2F] tensor: whole (layout "packed", the model's call) or as its two
    .chunk(2, -1) halves ("chunks"); or on two separate tensors of `shape` ("separate"); inputs
    optionally viewed through `view`."""
    view = view or (lambda t: t)
    if layout in ("packed", "chunks"):
        base = torch.randn(*shape[:-1], 2 * shape[-1], device=device).mul(3).to(dtype).requires_grad_()
        split = (lambda b: (view(b),)) if layout == "packed" else (lambda b: view(b).chunk(2, dim=-1))
        check_op(ops.swiglu, reference.swiglu, [base], split, out_names=["y"], grad_names=["d[gate, up]"])
    else:
        gate = torch.randn(shape, device=device).mul(3).to(dtype).requires_grad_()
        up = torch.randn(shape, device=device).to(dtype).requires_grad_()
        check_op(
            ops.swiglu, reference.swiglu, [gate, up], lambda g, u: (view(g), view(u)),
            out_names=["y"], grad_names=["dgate", "dup"],
        )


# Hidden 123 (odd), 4096, 8192, 9000 (wider than one Triton block); rows 1, 5, 1000; 3-D and 4-D.
CPU_SHAPES = [(1, 123), (5, 4096), (5, 8192), (2, 9000), (1000, 64), (3, 7, 123), (2, 3, 4, 123)]


@pytest.mark.parametrize("layout", ["packed", "chunks", "separate"])
@pytest.mark.parametrize("shape", CPU_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_cpu_matches_reference(dtype, shape, layout):
    run_swiglu(shape, dtype, layout=layout)


@pytest.mark.parametrize(
    "shape, view",
    [((4, 9, 100), lambda t: t[:, ::3, :77]), ((4, 64, 5), lambda t: t.transpose(1, 2))],
    ids=["slice", "transpose"],
)
def test_non_contiguous_views(shape, view):
    run_swiglu(shape, torch.float32, layout="separate", view=view)


def test_reads_the_fused_halves_in_place(monkeypatch):
    """The chunk views reach the kernel with row stride 2F: no copy is made on the way."""
    from llama_fast.kernels import swiglu as kernels

    seen = []
    real = kernels.swiglu_forward

    def spy(gate, up):
        seen.append((gate.stride(0), up.stride(0), gate.data_ptr(), up.data_ptr()))
        return real(gate, up)

    monkeypatch.setattr(kernels, "swiglu_forward", spy)
    fused = torch.randn(3, 5, 2 * 48)
    gate, up = fused.chunk(2, dim=-1)
    ops.swiglu(gate, up)
    assert seen == [(96, 96, fused.data_ptr(), fused.data_ptr() + 48 * 4)]


def test_packed_gradient_is_one_tensor(monkeypatch):
    """swiglu(gate_up) gets its gradient from the packed backward, already [..., 2F]: no concatenation."""
    calls = []
    real = torch.ops.llama_fast.swiglu_packed_backward
    monkeypatch.setattr(torch.ops.llama_fast, "swiglu_packed_backward", lambda *a: calls.append(1) or real(*a))
    gate_up = torch.randn(3, 5, 2 * 48, requires_grad=True)
    ops.swiglu(gate_up).sum().backward()
    assert calls == [1] and gate_up.grad.shape == gate_up.shape


@pytest.mark.parametrize("triton_interpret", ["1", "0"], ids=["triton", "torch"])
def test_fallback_backward_warns_once(fallback_backward, monkeypatch, triton_interpret):
    monkeypatch.setenv("TRITON_INTERPRET", triton_interpret)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_swiglu((3, 5, 123), torch.float32)
        run_swiglu((3, 7), torch.float32, layout="packed")
        run_swiglu((2, 9000), torch.float16, layout="separate")
    ours = [w for w in caught if "no compiled backward for swiglu on cpu" in str(w.message)]
    assert len(ours) == 1, [str(w.message) for w in caught]


@pytest.mark.parametrize(
    "args, error, match",
    [
        (lambda: (torch.ones(4, 16, dtype=torch.int32), torch.ones(4, 16)), TypeError, "gate must be float32"),
        (lambda: (torch.ones(4, 16), torch.ones(4, 16, dtype=torch.int32)), TypeError, "up must be float32"),
        (lambda: (torch.ones(4, 16), torch.ones(4, 15)), ValueError, r"up must have the shape of gate \(4, 16\)"),
        (lambda: (torch.ones(4, 16), torch.ones(4, 16, dtype=torch.float16)), TypeError,
         r"up must have the dtype of gate \(torch.float32\), got torch.float16"),
        (lambda: (torch.ones(4, 16), torch.ones(4, 16, device="meta")), ValueError, "up must be on the device of gate"),
        (lambda: (torch.tensor(1.0), torch.tensor(1.0)), ValueError, "gate must have at least one dimension"),
    ],
)
def test_bad_input_is_named(args, error, match):
    with pytest.raises(error, match=match):
        ops.swiglu(*args())


def test_packed_bad_input_is_named():
    with pytest.raises(ValueError, match=r"even last dim \(2F\) when up is None, got shape \(4, 15\)"):
        ops.swiglu(torch.ones(4, 15))
    with pytest.raises(TypeError, match="gate must be float32"):
        ops.swiglu(torch.ones(4, 16, dtype=torch.int64))


def test_opcheck():
    fused = torch.randn(3, 5, 2 * 40, requires_grad=True)
    gate, up = fused.chunk(2, dim=-1)
    torch.library.opcheck(torch.ops.llama_fast.swiglu_forward, (gate, up))
    dy = torch.randn(3, 5, 40)
    torch.library.opcheck(torch.ops.llama_fast.swiglu_backward_fallback, (dy, gate.detach(), up.detach()))
    torch.library.opcheck(torch.ops.llama_fast.swiglu_packed_forward, (fused,))
    torch.library.opcheck(torch.ops.llama_fast.swiglu_packed_backward_fallback, (dy, fused.detach()))
    torch.library.opcheck(torch.ops.llama_fast.swiglu_packed_backward, (dy, fused.detach()))


# ------------------------------------------------------------------------------------------------
# GPU
# ------------------------------------------------------------------------------------------------
GPU_SHAPES = [(1, 123), (5, 4096), (1000, 8192), (37, 11008), (2, 17, 4096), (2, 3, 5, 123), (3, 4099)]


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["packed", "chunks", "separate"])
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_gpu_matches_reference(dtype, shape, layout):
    run_swiglu(shape, dtype, "cuda", layout=layout)


@pytest.mark.gpu
def test_gpu_transposed_views():
    run_swiglu((4, 64, 5), torch.bfloat16, "cuda", layout="separate", view=lambda t: t.transpose(1, 2))


@pytest.mark.gpu
def test_gpu_triton_fallback_backward(fallback_backward):
    with pytest.warns(RuntimeWarning, match="no compiled backward for swiglu on cuda"):
        run_swiglu((300, 11008), torch.bfloat16, "cuda")
        run_swiglu((7, 123), torch.float32, "cuda", layout="separate")


@pytest.mark.gpu
@pytest.mark.slow
def test_gpu_past_2_pow_31_elements():
    """The fused [gate, up] buffer and the gradients pass 2^31 elements: int64 offsets. The last rows
    are checked against the reference."""
    cols = 8192
    rows = 2**31 // cols + 3  # gate, up, y, dgate, dup each past 2^31 elements
    fused = torch.randn(rows, 2 * cols, device="cuda", dtype=torch.bfloat16).requires_grad_()
    gate, up = fused.chunk(2, dim=-1)
    y = ops.swiglu(gate, up)
    dy = torch.randn_like(y)
    (dfused,) = torch.autograd.grad(y, fused, dy)
    tail = slice(rows - 5, rows)
    ft = fused.detach()[tail].clone().requires_grad_()
    yt = reference.swiglu(*ft.chunk(2, dim=-1))
    (dft,) = torch.autograd.grad(yt, ft, dy[tail])
    torch.testing.assert_close(y[tail], yt, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(dfused[tail], dft, rtol=2e-2, atol=5e-2)


@pytest.mark.parametrize("layout", ["packed", "chunks", "separate"])
@pytest.mark.parametrize("shape", [(3, 0), (2, 3, 0), (0, 5)], ids=str)
def test_empty_rows_and_zero_width_rows_match_the_reference(shape, layout):
    """F = 0 ran forward but the backward failed ('cannot reshape tensor of 0 elements'); the reference
    gives empty gradients."""
    run_swiglu(shape, torch.float32, layout=layout)
