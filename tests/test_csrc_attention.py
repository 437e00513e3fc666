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


# ------------------------------------------------------------------------------------------------
# Packed documents (issue 15): B = 1, doc_start / doc_end int32 [T], one call for all documents.
# ------------------------------------------------------------------------------------------------
def packed_inputs(lengths, Hq, Hkv, D, dtype, device="cpu"):
    """q, k, v [T, H, D], cu_seqlens, tables, per-token rows cos_tok / sin_tok [T, D / 2], doc_start, doc_end."""
    T = sum(lengths)
    q, k, v = (torch.randn(T, h, D, dtype=dtype, device=device) for h in (Hq, Hkv, Hkv))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
    cos, sin = reference.rope_tables(max(lengths) + 1, D, device=device)
    positions = torch.cat([torch.arange(n, device=device) for n in lengths])
    doc_start = torch.repeat_interleave(cu[:-1], cu.diff()).to(torch.int32)
    doc_end = torch.repeat_interleave(cu[1:], cu.diff()).to(torch.int32)
    return q, k, v, cu, cos, sin, cos[positions].contiguous(), sin[positions].contiguous(), doc_start, doc_end


def packed_forward(q, k, v, cu, cos_tok, sin_tok):
    """(O [1, T, Hq, D], stats [2, 1, Hq, T]): the CPU forward (math path) on each document."""
    outs, stats = [], []
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        o, st = saved_forward(q[None, s:e], k[None, s:e], v[None, s:e], cos_tok[s:e], sin_tok[s:e], True)
        outs.append(o)
        stats.append(st)
    return torch.cat(outs, dim=1), torch.cat(stats, dim=3)


def packed_backward(q, k, v, dout, cu, cos_tok, sin_tok, doc_start, doc_end, deterministic=False):
    out, stats = packed_forward(q, k, v, cu, cos_tok, sin_tok)
    grads = torch.ops.llama_fast.attention_backward(dout[None], q[None], k[None], v[None], out, stats, cos_tok,
                                                    sin_tok, True, deterministic, doc_start, doc_end)
    return [g[0] for g in grads]


def check_packed(grads, q, k, v, cu, cos, sin, dout):
    dtype = q.dtype
    ref = {}
    for dt in (torch.float64, dtype):
        leaves = [t.detach().cpu().to(dt).requires_grad_() for t in (q, k, v)]
        out = reference.attention_varlen(*leaves, cos.cpu(), sin.cpu(), cu.cpu())
        ref[dt] = torch.autograd.grad(out, leaves, dout.cpu().to(dt))
    for name, a, hi, lo, like in zip(("dq", "dk", "dv"), grads, ref[torch.float64], ref[dtype], (q, k, v)):
        assert a.shape == like.shape and a.dtype == dtype
        assert_within_2x(f"packed {name}", a.cpu(), hi, lo, floor=default_floor(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "lengths, Hq, Hkv, D",
    [([1, 2, 17, 113, 301], 4, 1, 64), ([113, 1, 17, 2], 4, 4, 80), ([5, 1, 16, 3, 9, 2, 14, 1], 2, 1, 32)],
    ids=["issue_lengths_gqa4_d64", "gqa1_d80", "tiny_documents"],
)
def test_cpu_packed_documents_match_reference(lengths, Hq, Hkv, D, dtype):
    q, k, v, cu, cos, sin, cos_tok, sin_tok, doc_start, doc_end = packed_inputs(lengths, Hq, Hkv, D, dtype)
    dout = torch.randn_like(q)
    grads = packed_backward(q, k, v, dout, cu, cos_tok, sin_tok, doc_start, doc_end)
    check_packed(grads, q, k, v, cu, cos, sin, dout)


def test_cpu_packed_documents_do_not_leak():
    """Changing one document's inputs leaves the other documents' gradients bitwise unchanged, and one
    packed call equals the batched op on each document alone, bitwise."""
    lengths = [9, 23, 1, 40]
    q, k, v, cu, cos, sin, cos_tok, sin_tok, doc_start, doc_end = packed_inputs(lengths, 4, 2, 64, torch.float32)
    dout = torch.randn_like(q)
    first = packed_backward(q, k, v, dout, cu, cos_tok, sin_tok, doc_start, doc_end)
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        args = [t[None, s:e] for t in (q, k, v)]
        out, stats = saved_forward(*args, cos_tok[s:e], sin_tok[s:e], True)
        alone = torch.ops.llama_fast.attention_backward(dout[None, s:e], *args, out, stats, cos_tok[s:e],
                                                        sin_tok[s:e], True, False)
        assert all(torch.equal(a[s:e], b[0]) for a, b in zip(first, alone)), f"document {s}..{e}"
    q2, k2, v2, dout2 = q.clone(), k.clone(), v.clone(), dout.clone()
    for t in (q2, k2, v2, dout2):
        t[9:32] = torch.randn_like(t[9:32]) * 3  # the second document only
    second = packed_backward(q2, k2, v2, dout2, cu, cos_tok, sin_tok, doc_start, doc_end)
    for a, b in zip(first, second):
        assert torch.equal(a[:9], b[:9]) and torch.equal(a[32:], b[32:])
        assert not torch.equal(a[9:32], b[9:32])  # the check can fail: the second document did change


def test_packed_documents_bad_input_is_named():
    q, k, v, cu, cos, sin, cos_tok, sin_tok, doc_start, doc_end = packed_inputs([3, 5], 2, 1, 16, torch.float32)
    out, stats = packed_forward(q, k, v, cu, cos_tok, sin_tok)
    base = (out, q[None], k[None], v[None], out, stats, cos_tok, sin_tok)

    def call(causal=True, start=doc_start, end=doc_end, args=base):
        return torch.ops.llama_fast.attention_backward(*args, causal, False, start, end)

    batched = tuple(t.expand(2, *t.shape[1:]) for t in base[:5]) + (stats.expand(2, 2, 2, 8), cos_tok, sin_tok)
    cases = [
        (dict(start=None), "doc_start and doc_end .* must be given together, got only doc_end"),
        (dict(end=None), "must be given together, got only doc_start"),
        (dict(causal=False), r"packed documents \(doc_start, doc_end\) need causal=True"),
        (dict(start=doc_start.long()), "doc_start must be int32"),
        (dict(end=doc_end[:7]), r"doc_end must be \[8\] \(one entry per token of q\)"),
        (dict(end=doc_end.to("meta")), "doc_end must be on the device of q"),
        (dict(args=batched), "need batch 1"),
        (dict(start=torch.zeros(8, dtype=torch.int32).index_fill_(0, torch.tensor([2]), 3)),
         r"must hold each token: .* doc_start\[2\] = 3"),
        (dict(end=doc_end.flip(0)), "must hold each token"),
        (dict(start=torch.tensor([0, 0, 0, 3, 3, 3, 2, 2], dtype=torch.int32)),
         r"doc_start must not decrease, got doc_start\[5\] = 3 then doc_start\[6\] = 2"),
        # Bounds of two partitions: each passes the checks above, together they are two different documentings.
        (dict(end=torch.full((8,), 8, dtype=torch.int32)), r"must describe the same documents: token 0 is in 0 .. 7"),
        # The fake (meta) checks batch and causal as the CPU op does.
        (dict(causal=False, start=doc_start.to("meta"), end=doc_end.to("meta")), r"need causal=True"),
    ]
    for over, match in cases:
        # A meta bound sends the call to the op's fake (llama_fast/_extension.py), which raises ValueError.
        with pytest.raises((RuntimeError, ValueError), match=match):
            call(**over)


def test_packed_documents_meta_and_opcheck():
    q = torch.empty(1, 5, 4, 32, device="meta", dtype=torch.bfloat16)
    k = torch.empty(1, 5, 2, 32, device="meta", dtype=torch.bfloat16)
    stats = torch.empty(2, 1, 4, 5, device="meta")
    cs = torch.empty(5, 16, device="meta")
    docs = torch.empty(5, dtype=torch.int32, device="meta")
    dq, dk, dv = torch.ops.llama_fast.attention_backward(q, q, k, k, q, stats, cs, cs, True, False, docs, docs)
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == k.shape
    q, k, v, cu, cos, sin, cos_tok, sin_tok, doc_start, doc_end = packed_inputs([3, 5], 2, 1, 16, torch.float32)
    out, stats = packed_forward(q, k, v, cu, cos_tok, sin_tok)
    torch.library.opcheck(torch.ops.llama_fast.attention_backward,
                          (out, q[None], k[None], v[None], out, stats, cos_tok, sin_tok, True, False, doc_start, doc_end))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("deterministic", [True, False])
@pytest.mark.parametrize("sm90_env", [False, True], ids=["default", "sm90_env"])
@pytest.mark.parametrize(
    "lengths, Hq, Hkv, D",
    [([1, 2, 17, 113, 1000], 8, 2, 128), ([3, 14, 1, 9, 16, 5, 2, 11, 7, 1, 13, 6, 8, 4, 15, 10] * 8, 4, 1, 64),
     ([70, 1, 200], 4, 4, 256), ([33, 97], 2, 1, 80)],
    ids=["issue_lengths_d128", "tiny_documents_d64", "d256", "d80"],
)
def test_cuda_packed_documents_match_reference(lengths, Hq, Hkv, D, dtype, deterministic, sm90_env, monkeypatch):
    """The sm_80 kernel with document bounds (also where LLAMA_FAST_ATTENTION_BACKWARD=sm90 asks for the
    Hopper kernel, which takes no documents)."""
    if not ext.WITH_CUDA:
        pytest.skip("llama_fast._C was built without CUDA kernels")
    if sm90_env:
        monkeypatch.setenv("LLAMA_FAST_ATTENTION_BACKWARD", "sm90")
    q, k, v, cu, cos, sin, cos_tok, sin_tok, doc_start, doc_end = packed_inputs(lengths, Hq, Hkv, D, dtype, "cuda")
    dout = torch.randn_like(q)
    poison_freed_blocks(q, k, v)
    grads = packed_backward(q, k, v, dout, cu, cos_tok, sin_tok, doc_start, doc_end, deterministic)
    check_packed(grads, q, k, v, cu, cos, sin, dout)
    if deterministic:
        again = packed_backward(q, k, v, dout, cu, cos_tok, sin_tok, doc_start, doc_end, deterministic)
        assert all(torch.equal(a, b) for a, b in zip(grads, again)), "deterministic mode must be bitwise reproducible"
