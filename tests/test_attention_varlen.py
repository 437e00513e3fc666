"""Packed documents through llama_fast.ops.attention(cu_seqlens=...) against reference.attention_varlen.

Interpreter forward and the compiled (C++) backward on the CPU in fp32 and fp16; every document's output,
LSE and gradients against the fp64 reference under the 2x rule, no leakage between documents, and the
input errors.
"""

import pytest
import torch

from llama_fast import reference
from llama_fast.ops import attention
from llama_fast.testing import assert_within_2x, default_floor


def packed(lengths, Hq, Hkv, D, dtype, table=None):
    T = sum(lengths)
    q = torch.randn(T, Hq, D, dtype=dtype)
    k = torch.randn(T, Hkv, D, dtype=dtype)
    v = torch.randn(T, Hkv, D, dtype=dtype)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    cos, sin = reference.rope_tables(table or max(lengths + [1]) + 2, D)
    return q, k, v, cu, cos, sin


def run(fn, q, k, v, dout, dtype, **kw):
    q, k, v = (t.detach().to(dtype).requires_grad_() for t in (q, k, v))
    out, lse = fn(q, k, v, return_lse=True, **kw)
    grads = torch.autograd.grad(out, (q, k, v), dout.to(dtype))
    return (out, lse) + grads


def check(got, high, low, dtype):
    for label, a, hi, lo in zip(("out", "lse", "dq", "dk", "dv"), got, high, low):
        floor = default_floor(torch.float32) * 10 if label == "lse" else default_floor(dtype)
        assert_within_2x(f"varlen {label}", a.float(), hi, lo.float(), floor=floor)


def both(q, k, v, cu, cos, sin, dout, dtype, position_ids=None):
    lengths = cu.diff()
    kw = dict(cu_seqlens=cu, position_ids=position_ids)

    def ours(q, k, v, **o):
        return attention(q, k, v, cos, sin, max_seqlen=int(lengths.max()), **kw, **o)

    def ref(q, k, v, **o):
        return reference.attention_varlen(q, k, v, cos, sin, **kw, **o)

    return run(ours, q, k, v, dout, dtype), run(ref, q, k, v, dout, torch.float64), run(ref, q, k, v, dout, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    "lengths, Hq, Hkv, D",
    [([1, 2, 17, 113], 4, 1, 64), ([17, 17, 5, 17], 8, 1, 80), ([30, 1, 0, 9], 4, 4, 128), ([64, 64], 2, 1, 64)],
    ids=["mixed_gqa4_d64", "equal_lengths_gqa8_d80", "empty_doc_gqa1_d128", "two_equal"],
)
def test_matches_reference_per_document(lengths, Hq, Hkv, D, dtype):
    q, k, v, cu, cos, sin = packed(lengths, Hq, Hkv, D, dtype)
    dout = torch.randn(q.shape, dtype=dtype)
    got, high, low = both(q, k, v, cu, cos, sin, dout, dtype)
    assert got[0].shape == q.shape and got[1].shape == (Hq, sum(lengths)) and got[1].dtype == torch.float32
    check(got, high, low, dtype)
    # The reference is document by document: each document alone is the batched reference on it.
    s, e = int(cu[1]), int(cu[2])
    alone = reference.attention(q[None, s:e].double(), k[None, s:e].double(), v[None, s:e].double(), cos, sin)
    torch.testing.assert_close(high[0][s:e], alone[0], rtol=0, atol=0)


def test_many_short_documents():
    """Lengths 1 to 16, many per query and key block (one launch: blocks straddle several boundaries)."""
    gen = torch.Generator().manual_seed(3)
    lengths = torch.randint(1, 17, (24,), generator=gen).tolist()
    q, k, v, cu, cos, sin = packed(lengths, 4, 1, 64, torch.float32)
    dout = torch.randn(q.shape)
    got, high, low = both(q, k, v, cu, cos, sin, dout, torch.float32)
    check(got, high, low, torch.float32)


@pytest.mark.slow
def test_long_document_among_short_ones():
    q, k, v, cu, cos, sin = packed([1023, 3, 1, 40], 4, 1, 64, torch.float32)
    dout = torch.randn(q.shape)
    got, high, low = both(q, k, v, cu, cos, sin, dout, torch.float32)
    check(got, high, low, torch.float32)


def test_no_leakage_between_documents():
    """Changing one document's tokens leaves every other document's outputs and gradients bitwise unchanged."""
    lengths = [9, 23, 4]
    q, k, v, cu, cos, sin = packed(lengths, 4, 2, 64, torch.float32)
    dout = torch.randn(q.shape)
    kw = dict(cu_seqlens=cu, max_seqlen=23)
    first = run(lambda *a, **o: attention(*a, cos, sin, **kw, **o), q, k, v, dout, torch.float32)
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    for t in (q2, k2, v2):
        t[9:32] = torch.randn_like(t[9:32]) * 3  # the middle document only
    second = run(lambda *a, **o: attention(*a, cos, sin, **kw, **o), q2, k2, v2, dout, torch.float32)
    for a, b in zip(first, second):
        other = [slice(0, 9), slice(32, 36)]
        for sl in other:
            pick = (lambda t: t[:, sl]) if a.dim() == 2 else (lambda t: t[sl])
            assert torch.equal(pick(a), pick(b))
        middle = (lambda t: t[:, 9:32]) if a.dim() == 2 else (lambda t: t[9:32])
        assert not torch.equal(middle(a), middle(b))  # the check can fail: the middle did change


def test_one_document_equals_the_batched_call_bitwise():
    q, k, v, cu, cos, sin = packed([37], 4, 1, 64, torch.float32)
    dout = torch.randn(q.shape)
    got = run(lambda *a, **o: attention(*a, cos, sin, cu_seqlens=cu, max_seqlen=37, **o), q, k, v, dout, torch.float32)
    batched = run(lambda *a, **o: attention(*(t[None] for t in a), cos, sin, **o), q, k, v, dout[None], torch.float32)
    assert torch.equal(got[0], batched[0][0]) and torch.equal(got[1], batched[1][0])
    for a, b in zip(got[2:], batched[2:]):
        assert torch.equal(a, b)


def test_bounds_are_read_once_per_cu_seqlens_and_never_stale(monkeypatch):
    """A model calls attention once per layer with one cu_seqlens: its bounds are read (a host sync) once.
    An in-place change to cu_seqlens, or another tensor, is read again: never stale bounds."""
    import importlib

    varlen = importlib.import_module("llama_fast.ops.attention_varlen")
    reads = []
    real = varlen._check_cu_seqlens
    monkeypatch.setattr(varlen, "_check_cu_seqlens", lambda *a: reads.append(1) or real(*a))
    q, k, v, cu, cos, sin = packed([9, 23, 4], 2, 1, 64, torch.float32, table=40)
    for _ in range(3):  # three "layers"
        first = varlen.attention_varlen(q, k, v, cos, sin, cu)
    assert len(reads) == 1
    cu[1:3] = torch.tensor([20, 30], dtype=torch.int32)  # documents [20, 10, 6], in place
    moved = varlen.attention_varlen(q, k, v, cos, sin, cu)
    assert len(reads) == 2
    want = reference.attention_varlen(q.double(), k.double(), v.double(), cos, sin, cu)
    torch.testing.assert_close(moved.double(), want, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(moved, first)
    varlen.attention_varlen(q, k, v, cos, sin, cu.clone())  # equal values, another tensor: read again
    assert len(reads) == 3


def test_explicit_positions():
    """position_ids equal to the implied offsets give the same result bitwise; other positions rotate as
    the reference does with them."""
    lengths = [5, 12, 7]
    q, k, v, cu, cos, sin = packed(lengths, 2, 1, 64, torch.float32, table=40)
    dout = torch.randn(q.shape)
    implied = torch.cat([torch.arange(n) for n in lengths])
    plain = run(lambda *a, **o: attention(*a, cos, sin, cu_seqlens=cu, max_seqlen=12, **o), q, k, v, dout, torch.float32)
    explicit = run(lambda *a, **o: attention(*a, cos, sin, cu_seqlens=cu, max_seqlen=12, position_ids=implied, **o),
                   q, k, v, dout, torch.float32)
    for a, b in zip(plain, explicit):
        assert torch.equal(a, b)
    shifted = implied + torch.tensor([3] * 5 + [20] * 12 + [0] * 7)
    got, high, low = both(q, k, v, cu, cos, sin, dout, torch.float32, position_ids=shifted)
    check(got, high, low, torch.float32)
    assert not torch.allclose(got[0], plain[0])


def test_bad_input_names_the_argument():
    q, k, v, cu, cos, sin = packed([3, 4], 2, 1, 16, torch.float32)

    def call(**over):
        kw = dict(cu_seqlens=cu, max_seqlen=4)
        kw.update(over)
        args = [over.pop("q", q), over.pop("k", k), v, cos, sin]
        kw.pop("q", None)
        kw.pop("k", None)
        return attention(*args, **kw)

    cases = [
        (dict(cu_seqlens=cu.long()), TypeError, "cu_seqlens must be int32"),
        (dict(cu_seqlens=cu[None]), ValueError, "cu_seqlens must be 1-D"),
        (dict(cu_seqlens=torch.tensor([1, 3, 7], dtype=torch.int32)), ValueError, "must start at 0"),
        (dict(cu_seqlens=torch.tensor([0, 5, 3, 7], dtype=torch.int32)), ValueError, "must not decrease"),
        (dict(cu_seqlens=torch.tensor([0, 3, 6], dtype=torch.int32)), ValueError, r"must end at T = q.shape\[0\] = 7"),
        (dict(cu_seqlens=cu.to("meta")), ValueError, "cu_seqlens must be on the device of q"),
        (dict(max_seqlen=3), ValueError, r"max_seqlen \(3\) is smaller than the longest document \(4\)"),
        (dict(max_seqlen=None), TypeError, "max_seqlen must be an int"),
        (dict(position_ids=torch.tensor([0, 1, 2, 0, 1, 2, 6])), ValueError, r"position_ids must lie in \[0, 6\)"),
        (dict(position_ids=torch.zeros(6, dtype=torch.long)), ValueError, "position_ids must be an integer tensor"),
        (dict(k=k[None]), ValueError, "k must be packed 3-D"),
    ]
    for over, exc, message in cases:
        with pytest.raises(exc, match=message):
            call(**over)
    with pytest.raises(ValueError, match="documents up to max_seqlen = 9 tokens need rotary tables"):
        attention(torch.randn(9, 2, 16), torch.randn(9, 1, 16), torch.randn(9, 1, 16), cos, sin,
                  cu_seqlens=torch.tensor([0, 9], dtype=torch.int32), max_seqlen=9)
    with pytest.raises(ValueError, match="a packed q .* needs cu_seqlens and max_seqlen"):
        attention(q, k, v, cos, sin)
    with pytest.raises(ValueError, match="position_ids is for packed documents"):
        attention(q[None], k[None], v[None], cos, sin, position_ids=torch.arange(7))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("deterministic", [True, False])
@pytest.mark.parametrize(
    "lengths, Hq, Hkv, D",
    [([1, 2, 17, 113, 700], 8, 2, 128), ([3, 14, 1, 9, 16, 5, 2, 11, 7, 1, 13, 6, 8, 4, 15, 10] * 6, 4, 1, 64),
     ([64, 64, 1, 63, 130], 4, 4, 80)],
    ids=["issue_lengths_d128", "tiny_documents_d64", "block_edges_d80"],
)
def test_cuda_packed_backward_matches_reference(lengths, Hq, Hkv, D, dtype, deterministic, monkeypatch):
    """On CUDA in fp16 / bf16 the packed backward is the compiled op with the document bounds (one call),
    checked against the reference with the 2x rule."""
    from llama_fast import _extension

    if not _extension.WITH_CUDA:
        pytest.skip("llama_fast._C was built without CUDA kernels")
    calls = _spy_compiled_backward(monkeypatch)
    q, k, v, cu, cos, sin = packed(lengths, Hq, Hkv, D, dtype)
    q, k, v, cu, cos, sin = (t.cuda() for t in (q, k, v, cu, cos, sin))
    dout = torch.randn(q.shape, dtype=dtype, device="cuda")
    lengths_t = cu.diff()
    kw = dict(cu_seqlens=cu)
    got = run(lambda *a, **o: attention(*a, cos, sin, max_seqlen=int(lengths_t.max()), deterministic=deterministic,
                                        **kw, **o), q, k, v, dout, dtype)
    assert len(calls) == 1 and all(t is not None and t.dtype == torch.int32 for t in calls[0])
    high = run(lambda *a, **o: reference.attention_varlen(*a, cos, sin, **kw, **o), q, k, v, dout, torch.float64)
    low = run(lambda *a, **o: reference.attention_varlen(*a, cos, sin, **kw, **o), q, k, v, dout, dtype)
    check([t.cpu() for t in got], [t.cpu() for t in high], [t.cpu() for t in low], dtype)
    if deterministic:
        again = run(lambda *a, **o: attention(*a, cos, sin, max_seqlen=int(lengths_t.max()), deterministic=True,
                                              **kw, **o), q, k, v, dout, dtype)
        assert all(torch.equal(a, b) for a, b in zip(got[2:], again[2:]))


def _spy_compiled_backward(monkeypatch):
    """Records the document bounds of each call of torch.ops.llama_fast.attention_backward."""
    calls = []
    compiled = torch.ops.llama_fast.attention_backward

    def spy(*args):
        calls.append(args[10:])
        return compiled(*args)

    monkeypatch.setattr(torch.ops.llama_fast, "attention_backward", spy)
    return calls


@pytest.mark.parametrize(
    "dtype, interpreter",
    [(torch.float32, False), (torch.float16, False), (torch.bfloat16, False), (torch.bfloat16, True)],
    ids=["fp32", "fp16", "bf16", "bf16_interpreter"],
)
@pytest.mark.parametrize("explicit_positions", [False, True], ids=["implied", "position_ids"])
def test_cpu_packed_backward_is_one_compiled_call(dtype, interpreter, explicit_positions, monkeypatch):
    """Without the Triton interpreter (and bf16 in it): the math forward per document, then one C++ backward
    call with the document bounds for all documents: against the reference with the 2x rule, and bitwise the
    gradients of the per-document path (one C++ backward per document)."""
    import importlib

    from llama_fast import _extension

    varlen = importlib.import_module("llama_fast.ops.attention_varlen")
    if not _extension.has_kernel("cpu"):
        pytest.skip("llama_fast._C is not built")
    if not interpreter:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    calls = _spy_compiled_backward(monkeypatch)
    lengths = [1, 2, 17, 113, 17, 0, 40]
    q, k, v, cu, cos, sin = packed(lengths, 4, 2, 64, dtype, table=140)
    dout = torch.randn(q.shape, dtype=dtype)
    positions = torch.randint(0, 140, (q.shape[0],)) if explicit_positions else None
    got, high, low = both(q, k, v, cu, cos, sin, dout, dtype, position_ids=positions)
    assert len(calls) == 1 and all(t is not None and t.dtype == torch.int32 for t in calls[0])
    check(got, high, low, dtype)
    monkeypatch.setattr(varlen, "_packed_cpu", lambda q: False)
    per_document = run(lambda *a, **o: attention(*a, cos, sin, cu_seqlens=cu, max_seqlen=113, position_ids=positions,
                                                 **o), q, k, v, dout, dtype)
    assert len(calls) == 1 + (6 if explicit_positions else 5)  # one a document (a length with implied positions)
    for a, b in zip(got, per_document):
        assert torch.equal(a, b)


def test_packed_custom_ops_pass_opcheck():
    """llama_fast::attention_packed (one launch, Triton; here in the interpreter) and
    llama_fast::attention_packed_cpu (per-document forward, one C++ backward): schemas, fakes and
    autograd registrations as torch.library.opcheck checks them."""
    import importlib
    import os

    from llama_fast import _extension

    varlen = importlib.import_module("llama_fast.ops.attention_varlen")
    q, k, v, cu, cos, sin = packed([3, 5], 2, 1, 16, torch.float32)
    b = varlen._bounds(cu, q.shape[0], q.device)
    cos_tok, sin_tok = cos[b.offsets].contiguous(), sin[b.offsets].contiguous()
    q, k, v = (t[None] for t in (q, k, v))  # as the batched op's opcheck (test_attention.py)
    ran = 0
    if os.environ.get("TRITON_INTERPRET") == "1":
        torch.library.opcheck(torch.ops.llama_fast.attention_packed,
                              (q, k, v, cos_tok, sin_tok, b.doc_start, b.doc_end, False))
        ran += 1
    if _extension.has_kernel("cpu"):
        torch.library.opcheck(torch.ops.llama_fast.attention_packed_cpu,
                              (q, k, v, cos_tok, sin_tok, cu, b.doc_start, b.doc_end, True))
        ran += 1
    if not ran:
        pytest.skip("neither the interpreter nor the C++ extension is here")
