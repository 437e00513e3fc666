"""llama_fast.ops.rope against the reference: both outputs, both gradients, strided layouts, errors."""
import warnings

import pytest
import torch
from op_check import check_op, fallback_backward, poison_empty  # noqa: F401  (fixtures)

from llama_fast import ops, reference

pytestmark = pytest.mark.usefixtures("poison_empty")


def run_rope(B, S, Hq, Hkv, D, dtype, device="cpu", *, layout="bshd", table_len=None, theta=10000.0):
    """Checks rope on q [B, S, Hq, D], k [B, S, Hkv, D] built in `layout`:
    "bshd" contiguous; "bhsd" [B, H, S, D] tensors transposed; "qkv" split views of one fused
    [B, S, (Hq + 2 Hkv) * D] projection output; "d_strided" every other element of a 2D-wide last dim."""
    cos, sin = reference.rope_tables(table_len or S, D, theta, device=device)
    if layout == "qkv":
        base = torch.randn(B, S, (Hq + 2 * Hkv) * D, device=device).to(dtype).requires_grad_()

        def make(b, c, s):
            q, k, _ = b.split([Hq * D, Hkv * D, Hkv * D], dim=-1)
            return q.view(B, S, Hq, D), k.view(B, S, Hkv, D), c, s  # strided views, no copy

        check_op(ops.rope, reference.rope, [base, cos, sin], make, out_names=["q", "k"], grad_names=["dqkv"])
        return
    shape = {"bshd": lambda h: (B, S, h, D), "bhsd": lambda h: (B, h, S, D), "d_strided": lambda h: (B, S, h, 2 * D)}
    shape = shape[layout]
    to_bshd = {"bshd": lambda t: t, "bhsd": lambda t: t.transpose(1, 2), "d_strided": lambda t: t[..., ::2]}[layout]
    q = torch.randn(shape(Hq), device=device).to(dtype).requires_grad_()
    k = torch.randn(shape(Hkv), device=device).to(dtype).requires_grad_()
    check_op(
        ops.rope, reference.rope, [q, k, cos, sin], lambda q, k, c, s: (to_bshd(q), to_bshd(k), c, s),
        out_names=["q", "k"], grad_names=["dq", "dk"],
    )


# (B, S, Hq, Hkv, D): GQA ratios 1, 4 and 8; odd sequence lengths; head dims 128, 64, 16 and 6
# (not a power of two). The Triton interpreter runs one token at a time: few tokens on the CPU.
CPU_CASES = [(1, 1, 4, 1, 128), (2, 17, 4, 4, 64), (1, 13, 8, 1, 16), (3, 5, 2, 2, 6)]


@pytest.mark.parametrize("layout", ["bshd", "bhsd", "qkv"])
@pytest.mark.parametrize("case", CPU_CASES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_cpu_matches_reference(dtype, case, layout):
    run_rope(*case, dtype, layout=layout)


def test_head_dim_not_contiguous():
    run_rope(2, 5, 4, 2, 16, torch.float32, layout="d_strided")


def test_table_longer_than_the_sequence():
    """cos/sin with more rows than positions (the model passes slices of one long table)."""
    run_rope(2, 9, 4, 2, 32, torch.float32, table_len=40, theta=500000.0)


@pytest.mark.parametrize("triton_interpret", ["1", "0"], ids=["triton", "torch"])
def test_fallback_backward_warns_once(fallback_backward, monkeypatch, triton_interpret):
    monkeypatch.setenv("TRITON_INTERPRET", triton_interpret)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_rope(2, 7, 4, 2, 64, torch.float32, layout="bhsd")
        run_rope(1, 5, 8, 1, 16, torch.float16, layout="qkv")
    ours = [w for w in caught if "no compiled backward for rope on cpu" in str(w.message)]
    assert len(ours) == 1, [str(w.message) for w in caught]


def test_gradient_of_only_q():
    """k's output unused: its gradient arrives as None and must be treated as zero."""
    cos, sin = reference.rope_tables(5, 16)
    q, k = torch.randn(2, 5, 4, 16, requires_grad=True), torch.randn(2, 5, 2, 16, requires_grad=True)
    dq_out = torch.randn(2, 5, 4, 16)
    got = torch.autograd.grad(ops.rope(q, k, cos, sin)[0], q, dq_out)[0]
    want = torch.autograd.grad(reference.rope(q, k, cos, sin)[0], q, dq_out)[0]
    torch.testing.assert_close(got, want)


def _good():
    cos, sin = reference.rope_tables(8, 16)
    return dict(q=torch.ones(2, 8, 4, 16), k=torch.ones(2, 8, 2, 16), cos=cos, sin=sin)


@pytest.mark.parametrize(
    "change, error, match",
    [
        (dict(q=torch.ones(2, 8, 4, 16, dtype=torch.int64)), TypeError, "q must be float32, float16 or bfloat16"),
        (dict(k=torch.ones(2, 8, 2, 16, dtype=torch.float16)), TypeError, r"k must have the dtype of q"),
        (dict(q=torch.ones(8, 4, 16)), ValueError, r"q must be 4-D \[B, S, Hq, D\], got shape \(8, 4, 16\)"),
        (dict(k=torch.ones(2, 8, 2, 8)), ValueError, r"k must be \[B=2, S=8, Hkv, D=16\]"),
        (dict(k=torch.ones(2, 8, 2, 16, device="meta")), ValueError, "k must be on the device of q"),
        (dict(q=torch.ones(2, 8, 4, 15), k=torch.ones(2, 8, 2, 15)), ValueError,
         "head dim of q must be even for rotary embeddings, got 15"),
        (dict(cos=torch.ones(8, 16)), ValueError, r"cos must be \[>= 8 positions, 8\].*got \(8, 16\)"),
        (dict(sin=torch.ones(7, 8)), ValueError, r"sin must be \[>= 8 positions, 8\].*got \(7, 8\)"),
        (dict(cos=torch.ones(8, 8, dtype=torch.float64)), TypeError, "cos must be a float32 tensor, got torch.float64"),
        (dict(sin=torch.ones(9, 8)), ValueError, r"sin must have the shape of cos \(8, 8\), got \(9, 8\)"),
        (dict(cos=torch.ones(8, 8, device="meta")), ValueError, "cos must be on the device of q"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_bad_input_is_named(change, error, match):
    args = _good()
    args.update(change)
    with pytest.raises(error, match=match):
        ops.rope(args["q"], args["k"], args["cos"], args["sin"])


def test_opcheck():
    cos, sin = reference.rope_tables(20, 16)
    q = torch.randn(2, 4, 7, 16).transpose(1, 2).requires_grad_()
    k = torch.randn(2, 7, 2, 16, requires_grad=True)
    torch.library.opcheck(torch.ops.llama_fast.rope_forward, (q, k, cos, sin))
    torch.library.opcheck(torch.ops.llama_fast.rope_backward_fallback, (q.detach(), k.detach(), cos, sin))


# ------------------------------------------------------------------------------------------------
# GPU
# ------------------------------------------------------------------------------------------------
GPU_CASES = [(1, 1, 32, 8, 128), (2, 113, 32, 32, 128), (2, 1023, 8, 1, 64), (1, 2049, 4, 1, 128), (3, 17, 6, 2, 80)]


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["bshd", "bhsd", "qkv", "d_strided"])
@pytest.mark.parametrize("case", GPU_CASES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_gpu_matches_reference(dtype, case, layout):
    run_rope(*case, dtype, "cuda", layout=layout)


@pytest.mark.gpu
def test_gpu_triton_fallback_backward(fallback_backward):
    with pytest.warns(RuntimeWarning, match="no compiled backward for rope on cuda"):
        run_rope(2, 300, 32, 8, 128, torch.bfloat16, "cuda", layout="qkv")
        run_rope(1, 17, 6, 2, 80, torch.float32, "cuda", layout="bhsd")


@pytest.mark.gpu
@pytest.mark.slow
def test_gpu_past_2_pow_31_elements():
    """q passes 2^31 elements: int64 offsets. The last tokens are checked against the reference."""
    B, S, Hq, Hkv, D = 1, 2**31 // (32 * 128) + 3, 32, 8, 128
    cos, sin = reference.rope_tables(S, D, device="cuda")
    q = torch.randn(B, S, Hq, D, device="cuda", dtype=torch.bfloat16).requires_grad_()
    k = torch.randn(B, S, Hkv, D, device="cuda", dtype=torch.bfloat16).requires_grad_()
    qo, ko = ops.rope(q, k, cos, sin)
    dqo, dko = torch.randn_like(qo), torch.randn_like(ko)
    dq, dk = torch.autograd.grad((qo, ko), (q, k), (dqo, dko))
    tail = slice(S - 4, S)
    qt = q.detach()[:, tail].clone().requires_grad_()
    kt = k.detach()[:, tail].clone().requires_grad_()
    # positions S-4..S-1: the reference rotates by rows 0..3 of the tables it is given
    ref_q, ref_k = reference.rope(qt, kt, cos[tail], sin[tail])
    dqt, dkt = torch.autograd.grad((ref_q, ref_k), (qt, kt), (dqo[:, tail], dko[:, tail]))
    for got, want in ((qo[:, tail], ref_q), (ko[:, tail], ref_k), (dq[:, tail], dqt), (dk[:, tail], dkt)):
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
