"""torch.ops.llama_fast.attention_backward (csrc/) against autograd through the reference."""
import pytest
import torch

import llama_fast._extension as ext
from llama_fast import reference
from llama_fast.ops.attention import _forward_math
from llama_fast.testing import assert_within_2x, default_floor

pytestmark = pytest.mark.skipif(not ext.AVAILABLE, reason=f"llama_fast._C not built: {ext.LOAD_ERROR}")


def make_inputs(B, S, Hq, Hkv, D, dtype, device="cpu", bhsd=False):
    if bhsd:  # [B, H, S, D] storage seen as [B, S, H, D]
        q = torch.randn(B, Hq, S, D, dtype=dtype, device=device).transpose(1, 2)
        k = torch.randn(B, Hkv, S, D, dtype=dtype, device=device).transpose(1, 2)
        v = torch.randn(B, Hkv, S, D, dtype=dtype, device=device).transpose(1, 2)
    else:
        q = torch.randn(B, S, Hq, D, dtype=dtype, device=device)
        k = torch.randn(B, S, Hkv, D, dtype=dtype, device=device)
        v = torch.randn(B, S, Hkv, D, dtype=dtype, device=device)
    cos, sin = reference.rope_tables(S + 2, D, device=device)
    return q, k, v, cos, sin


def reference_grads(q, k, v, cos, sin, causal, dout, dtype):
    q, k, v = (t.detach().cpu().to(dtype).requires_grad_() for t in (q, k, v))
    out = reference.attention(q, k, v, cos.cpu(), sin.cpu(), causal)
    return torch.autograd.grad(out, (q, k, v), dout.cpu().to(dtype))


def saved_forward(q, k, v, cos, sin, causal):
    """(O, stats) as the CPU forward saves them (llama_fast.ops.attention's math path)."""
    return _forward_math(q, k, v, cos, sin, causal)


def check_grads(grads, q, k, v, cos, sin, causal, dout):
    dtype = q.dtype
    high = reference_grads(q, k, v, cos, sin, causal, dout, torch.float64)
    low = reference_grads(q, k, v, cos, sin, causal, dout, dtype)
    for name, a, hi, lo, like in zip(("dq", "dk", "dv"), grads, high, low, (q, k, v)):
        assert a.shape == like.shape and a.dtype == dtype
        assert_within_2x(name, a.cpu(), hi, lo, floor=default_floor(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "shape",
    [(1, 1, 1, 1, 64), (2, 17, 4, 1, 64), (1, 113, 8, 1, 80), (3, 128, 4, 4, 128), (1, 1023, 1, 1, 64),
     (1, 40, 2, 1, 256)],
    ids=lambda s: "B{}_S{}_Hq{}_Hkv{}_D{}".format(*s),
)
@pytest.mark.parametrize("causal", [True, False])
def test_cpu_matches_reference(shape, dtype, causal):
    q, k, v, cos, sin = make_inputs(*shape, dtype, bhsd=shape[1] == 17)
    out, lse = saved_forward(q, k, v, cos, sin, causal)
    dout = torch.randn_like(out)
    grads = torch.ops.llama_fast.attention_backward(dout, q, k, v, out, lse, cos, sin, causal, False)
    check_grads(grads, q, k, v, cos, sin, causal, dout)


def test_cpu_deterministic():
    q, k, v, cos, sin = make_inputs(2, 50, 4, 2, 32, torch.float32)
    out, lse = saved_forward(q, k, v, cos, sin, True)
    dout = torch.randn_like(out)
    a = torch.ops.llama_fast.attention_backward(dout, q, k, v, out, lse, cos, sin, True, False)
    b = torch.ops.llama_fast.attention_backward(dout, q, k, v, out, lse, cos, sin, True, True)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def _args():
    q, k, v, cos, sin = make_inputs(2, 8, 4, 2, 16, torch.float32)
    out, lse = saved_forward(q, k, v, cos, sin, True)
    return dict(dout=torch.randn_like(out), q=q, k=k, v=v, out=out, lse=lse, cos=cos, sin=sin)


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda a: a.update(q=a["q"].int()), "q must be float32, float16 or bfloat16"),
        (lambda a: a.update(k=a["k"].half()), "k must have the dtype of q"),
        (lambda a: a.update(k=torch.randn(2, 8, 3, 16), v=torch.randn(2, 8, 3, 16)),
         r"query heads of q \(4\) must be a multiple of the kv heads of k \(3\)"),
        (lambda a: a.update(k=torch.randn(2, 9, 2, 16)), r"k must be \[2, 8, kv_heads, 16\]"),
        (lambda a: a.update(v=torch.randn(2, 8, 1, 16)), "v must have the shape of k"),
        (lambda a: a.update(dout=torch.randn(2, 8, 4, 15)), "dout must have the shape of q"),
        (lambda a: a.update(out=a["out"].double()), "out must have the dtype of q"),
        (lambda a: a.update(lse=torch.randn(2, 8, 4)), r"stats must be float32 \[2, 2, 4, 8\]"),
        (lambda a: a.update(lse=torch.randn(2, 4, 8)), r"stats must be float32 \[2, 2, 4, 8\]"),
        (lambda a: a.update(lse=torch.randn(2, 2, 4, 8, dtype=torch.float64)), r"stats must be float32 \[2, 2, 4, 8\]"),
        (lambda a: a.update(cos=a["cos"][:7]), r"cos must be \[>= 8, 8\]"),
        (lambda a: a.update(sin=a["sin"][:, :6]), r"sin must be \[>= 8, 8\]"),
        (lambda a: a.update(cos=a["cos"].half()), "cos must be float32"),
        (lambda a: [a.update({n: torch.randn(*a[n].shape[:3], 15)}) for n in ("q", "k", "v", "dout", "out")],
         "head_dim must be even and at most 256, got 15"),
        (lambda a: a.update(q=torch.randn(2, 8, 16)), "q must be 4-D"),
    ],
)
def test_bad_input_is_named(mutate, match):
    args = _args()
    mutate(args)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.llama_fast.attention_backward(*args.values(), True, False)


def test_meta_shapes_and_opcheck():
    q = torch.empty(2, 5, 4, 32, device="meta", dtype=torch.bfloat16)
    k = torch.empty(2, 5, 2, 32, device="meta", dtype=torch.bfloat16)
    lse = torch.empty(2, 2, 4, 5, device="meta")
    cs = torch.empty(5, 16, device="meta")
    dq, dk, dv = torch.ops.llama_fast.attention_backward(q, q, k, k, q, lse, cs, cs, True, False)
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == k.shape and dq.dtype == torch.bfloat16
    args = _args()
    torch.library.opcheck(torch.ops.llama_fast.attention_backward, (*args.values(), True, False))


def poison_freed_blocks(*like):
    """Fills and frees blocks the size of the outputs, so the caching allocator hands NaN-filled
    memory to the op's torch.empty outputs and an element the kernel never writes shows."""
    poison = [torch.full(t.shape, float("nan"), dtype=t.dtype, device=t.device) for t in like]
    del poison


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "shape", [(1, 1, 1, 1, 64), (2, 17, 4, 1, 64), (1, 113, 8, 1, 80), (3, 128, 4, 4, 128), (1, 2049, 8, 8, 128),
              (2, 300, 4, 1, 256)],
    ids=lambda s: "B{}_S{}_Hq{}_Hkv{}_D{}".format(*s),
)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("deterministic", [True, False])
def test_cuda_matches_reference(shape, dtype, causal, deterministic):
    if not ext.WITH_CUDA:
        pytest.skip("llama_fast._C was built without CUDA kernels")
    q, k, v, cos, sin = make_inputs(*shape, dtype, device="cuda", bhsd=True)
    out, lse = saved_forward(q, k, v, cos, sin, causal)
    dout = torch.randn_like(out)
    poison_freed_blocks(q, k, v)
    grads = torch.ops.llama_fast.attention_backward(dout, q, k, v, out, lse, cos, sin, causal, deterministic)
    check_grads(grads, q, k, v, cos, sin, causal, dout)
    if deterministic:
        again = torch.ops.llama_fast.attention_backward(dout, q, k, v, out, lse, cos, sin, causal, deterministic)
        assert all(torch.equal(a, b) for a, b in zip(grads, again)), "deterministic mode must be bitwise reproducible"


@pytest.mark.gpu
def test_cuda_rejects_fp32():
    if not ext.WITH_CUDA:
        pytest.skip("llama_fast._C was built without CUDA kernels")
    q, k, v, cos, sin = make_inputs(1, 8, 2, 1, 16, torch.float32, device="cuda")
    out, lse = saved_forward(q, k, v, cos, sin, True)
    with pytest.raises(RuntimeError, match="needs q, k, v in float16 or bfloat16"):
        torch.ops.llama_fast.attention_backward(out, q, k, v, out, lse, cos, sin, True, False)
