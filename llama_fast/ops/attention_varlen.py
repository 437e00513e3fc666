"""Packed (variable-length) causal attention with RoPE: documents end to end, attending within themselves.

    out = attention(q, k, v, cos, sin, cu_seqlens=cu, max_seqlen=n)                    # llama_fast.ops
    out, lse = attention(q, k, v, cos, sin, cu_seqlens=cu, max_seqlen=n, position_ids=pos, return_lse=True)

The layout of flash-attention's varlen API: q [T, Hq, D], k and v [T, Hkv, D] (any strides), the
documents' starts ``cu_seqlens`` int32 [N + 1] (0 first, T last, non-decreasing; empty documents
allowed) on q's device, and ``max_seqlen``, at least the longest document. Token t is rotated by its
offset in its document, or by ``position_ids[t]`` (integer [T]) when given; it attends causally to the
tokens of its own document only. Returns O [T, Hq, D] and, with ``return_lse``, the LSE fp32 [Hq, T].
Same math as ``llama_fast.reference.attention_varlen``; gradients flow to q, k and v.

How it runs: the rotary rows are gathered per token (row t of the gathered tables rotates token t, so
positions of any kind cost nothing in the kernels). Where the Triton kernels run (CUDA; the CPU
interpreter), all documents go in one launch of each kernel (llama_fast::attention_packed): the tokens
form one sequence, and each token's document bounds decide which key (query) blocks a query (key) block
loads: blocks wholly outside the document are skipped, blocks inside it run unmasked, only blocks that
straddle a boundary or the diagonal are masked, so many short documents cost their tokens, not a block
each. Its backward takes the same bounds, in one launch too: on CUDA in fp16 / bf16 the compiled op
torch.ops.llama_fast.attention_backward(..., doc_start=, doc_end=) (csrc/cuda/attention_backward.cu, the
sm_80 kernel, also where LLAMA_FAST_ATTENTION_BACKWARD=sm90 asks for the Hopper one, which takes no
documents) when the extension has it; otherwise (fp32 on CUDA, the CPU interpreter, whose Triton scores
are bitwise the forward's) the Triton backward. On the CPU without the interpreter (and for bf16 in it,
whose bf16 dot is broken) with the extension, in fp32 / fp16 / bf16 (llama_fast::attention_packed_cpu): the
math forward document by document (documents of one length with implied positions batched together),
then one call of the C++ backward with the bounds (row i sums over keys doc_start[i] .. i), bitwise the
gradients of one C++ backward per document. Elsewhere (fp64; no extension) each document is one call of
the batched op with its own backward, documents of one length with implied positions batched together.
The boundaries are read on the host (validation, and the per-document
calls): the call synchronises with the device and, under torch.compile, breaks the graph. They are read
once per cu_seqlens tensor: the layers of a model that pass the same one reuse its bounds (_bounds).
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from .. import _extension
from ._common import LastCallMemo, triton_runs_on
from .attention import _COMPILED_DTYPES, _attention_op, _check_inputs, _forward_math, lse_from_stats


# ------------------------------------------------------------------------------------------------
# One launch for all documents: the Triton kernels with each token's document bounds (CUDA, or the
# CPU interpreter in fp32 / fp16). Tokens are a batch of one: q [1, T, Hq, D]; row t of the tables
# rotates token t.
# ------------------------------------------------------------------------------------------------
@torch.library.custom_op("llama_fast::attention_packed", mutates_args=())
def _packed_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
    doc_start: torch.Tensor, doc_end: torch.Tensor, deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    from llama_fast.kernels.attention import attention_forward

    return attention_forward(q, k, v, cos, sin, True, doc_start)


@_packed_op.register_fake
def _packed_fake(q, k, v, cos, sin, doc_start, doc_end, deterministic):
    B, S, Hq, D = q.shape
    return q.new_empty((B, S, Hq, D)), q.new_empty((2, B, Hq, S), dtype=torch.float32)


def _packed_setup_context(ctx, inputs, output):
    q, k, v, cos, sin, doc_start, doc_end, deterministic = inputs
    out, stats = output
    ctx.save_for_backward(q, k, v, cos, sin, doc_start, doc_end, out, stats)
    ctx.deterministic = deterministic
    ctx.mark_non_differentiable(stats)


def _packed_compiled_backward(q) -> bool:
    """Whether the packed backward runs the compiled op: CUDA in fp16 / bf16 (as ops.attention's _backward),
    where the extension has the CUDA kernels. Not after a forward in the CPU interpreter: there the Triton
    backward's scores are bitwise the forward's, which the C++ backward (matched to the math forward) cannot
    promise."""
    device = q.device.type
    return device in ("cuda", "meta") and q.dtype in _COMPILED_DTYPES[device] and _extension.has_kernel(device)


def _packed_backward(ctx, dout, dstats):
    q, k, v, cos, sin, doc_start, doc_end, out, stats = ctx.saved_tensors
    if _packed_compiled_backward(q):
        dq, dk, dv = torch.ops.llama_fast.attention_backward(
            dout, q, k, v, out, stats, cos, sin, True, ctx.deterministic, doc_start, doc_end
        )
    else:
        from llama_fast.kernels.attention import attention_backward

        dq, dk, dv = attention_backward(dout, q, k, v, out, stats, cos, sin, True, doc_start, doc_end)
    return dq, dk, dv, None, None, None, None, None


_packed_op.register_autograd(_packed_backward, setup_context=_packed_setup_context)


def _one_launch(q) -> bool:
    """Whether the Triton kernels take all documents in one launch here (not bf16 in the interpreter,
    whose bf16 dot is broken, nor fp64)."""
    interpreted_bf16 = q.device.type == "cpu" and q.dtype == torch.bfloat16
    return triton_runs_on(q.device) and q.dtype != torch.float64 and not interpreted_bf16


def _check_cu_seqlens(cu_seqlens, total: int, device: torch.device) -> list[int]:
    """Validates cu_seqlens; returns the document starts as Python ints."""
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"attention: cu_seqlens must be a tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype != torch.int32:
        raise TypeError(f"attention: cu_seqlens must be int32 (as flash-attention's), got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(
            f"attention: cu_seqlens must be 1-D [documents + 1] (0 first, T last), got shape {tuple(cu_seqlens.shape)}"
        )
    if cu_seqlens.device != device:
        raise ValueError(f"attention: cu_seqlens must be on the device of q ({device}), got {cu_seqlens.device}")
    starts = cu_seqlens.tolist()
    if starts[0] != 0:
        raise ValueError(f"attention: cu_seqlens must start at 0, got {starts[0]}")
    if starts[-1] != total:
        raise ValueError(f"attention: cu_seqlens must end at T = q.shape[0] = {total}, got {starts[-1]}")
    lengths = [e - s for s, e in zip(starts[:-1], starts[1:])]
    if min(lengths) < 0:
        i = min(range(len(lengths)), key=lengths.__getitem__)
        raise ValueError(f"attention: cu_seqlens must not decrease, got {starts[i]} then {starts[i + 1]} at index {i}")
    return starts


class _Bounds(NamedTuple):
    """What the documents' boundaries give every layer: the starts (Python ints), each token's document
    bounds (int32 [T], first token and end) and its offset in its document (int64 [T])."""
    starts: list
    longest: int
    doc_start: torch.Tensor
    doc_end: torch.Tensor
    offsets: torch.Tensor


# The last cu_seqlens seen and its bounds: a model calls attention once per layer with the same
# cu_seqlens, and reading it (a host sync) plus three small kernels per layer is avoidable.
_BOUNDS = LastCallMemo()


def _bounds(cu_seqlens: torch.Tensor, total: int, device: torch.device) -> _Bounds:
    """The validated bounds of cu_seqlens (see _check_cu_seqlens), computed once per cu_seqlens tensor."""

    def compute() -> _Bounds:
        starts = _check_cu_seqlens(cu_seqlens, total, device)
        lengths = cu_seqlens.diff()
        doc_start = torch.repeat_interleave(cu_seqlens[:-1], lengths)
        return _Bounds(starts, max(e - s for s, e in zip(starts[:-1], starts[1:])), doc_start.to(torch.int32),
                       torch.repeat_interleave(cu_seqlens[1:], lengths).to(torch.int32),
                       torch.arange(total, device=device) - doc_start)

    return _BOUNDS.get((cu_seqlens,), (total, device), compute)


def attention_varlen(q, k, v, cos, sin, cu_seqlens, position_ids=None, *, return_lse: bool = False,
                     max_seqlen: int | None = None, deterministic: bool | None = None):
    """Packed documents with the signature of llama_fast.reference.attention_varlen (max_seqlen, when not
    given, is read from cu_seqlens); the same as attention(..., cu_seqlens=...)."""
    from .attention import attention

    if max_seqlen is None and isinstance(cu_seqlens, torch.Tensor) and cu_seqlens.numel() > 1:
        packed = isinstance(q, torch.Tensor) and q.dim() == 3  # else attention() names what is wrong
        max_seqlen = _bounds(cu_seqlens, q.shape[0], q.device).longest if packed else int(cu_seqlens.diff().max())
    return attention(q, k, v, cos, sin, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, position_ids=position_ids,
                     return_lse=return_lse, deterministic=deterministic)


def _attention_varlen(q, k, v, cos, sin, cu_seqlens, max_seqlen, position_ids=None, *, deterministic: bool):
    """(O [T, Hq, D], LSE fp32 [Hq, T]); see the module docstring. Called by llama_fast.ops.attention."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"attention: with cu_seqlens, {name} must be packed 3-D [tokens, heads, head_dim], got {shape}")
    total = q.shape[0]
    for name, t in (("k", k), ("v", v)):
        if t.shape[0] != total:
            raise ValueError(f"attention: {name} must have q's {total} tokens, got shape {tuple(t.shape)}")
    bounds = _bounds(cu_seqlens, total, q.device)
    starts = bounds.starts
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int):
        raise TypeError(f"attention: max_seqlen must be an int, got {max_seqlen!r}")
    if max_seqlen < bounds.longest:
        raise ValueError(f"attention: max_seqlen ({max_seqlen}) is smaller than the longest document ({bounds.longest})")
    for name, t in (("cos", cos), ("sin", sin)):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.float32 or t.dim() != 2:
            raise TypeError(f"attention: {name} must be a float32 [positions, head_dim / 2] tensor, got "
                            f"{t.dtype if isinstance(t, torch.Tensor) else type(t).__name__}")
    table = min(cos.shape[0], sin.shape[0])
    if position_ids is None:
        if max_seqlen > table:
            raise ValueError(f"attention: documents up to max_seqlen = {max_seqlen} tokens need rotary tables of at "
                             f"least that many positions, got {table}")
        positions = bounds.offsets  # [T] offsets in the documents: t minus its document's start
    else:
        if not isinstance(position_ids, torch.Tensor) or position_ids.shape != (total,) \
                or position_ids.dtype.is_floating_point or position_ids.dtype == torch.bool:
            raise ValueError(f"attention: position_ids must be an integer tensor [T = {total}], got "
                             f"{(position_ids.dtype, tuple(position_ids.shape)) if isinstance(position_ids, torch.Tensor) else position_ids!r}")
        if position_ids.device != q.device:
            raise ValueError(f"attention: position_ids must be on the device of q ({q.device}), got {position_ids.device}")
        if total and (int(position_ids.min()) < 0 or int(position_ids.max()) >= table):
            raise ValueError(f"attention: position_ids must lie in [0, {table}) (the rotary tables' rows), got "
                             f"{int(position_ids.min())}..{int(position_ids.max())}")
        positions = position_ids.long()
    cos_tok = cos[positions].contiguous()
    sin_tok = sin[positions].contiguous()
    _check_inputs(q[None], k[None], v[None], cos_tok, sin_tok)

    doc_start, doc_end = bounds.doc_start, bounds.doc_end
    if _one_launch(q):
        out, stats = _packed_op(q[None], k[None], v[None], cos_tok, sin_tok, doc_start, doc_end, deterministic)
        return out[0], lse_from_stats(stats)[0]
    if _packed_cpu(q) and total:
        out, stats = _packed_cpu_op(q[None], k[None], v[None], cos_tok, sin_tok, cu_seqlens, doc_start, doc_end,
                                    position_ids is None)
        return out[0], lse_from_stats(stats)[0]
    # Elsewhere (fp64; the CPU without the extension): one call of the batched op per document, each with
    # its own backward.
    out, stats = _per_document(q, k, v, cos_tok, sin_tok, starts, position_ids is None,
                               lambda *a: _attention_op(*a, True, deterministic))
    return out, lse_from_stats(stats).float()


def _per_document(q, k, v, cos_tok, sin_tok, starts: list[int], implied: bool, forward):
    """(O [T, Hq, D], stats [2, Hq, T]) from forward(q, k, v, cos, sin) -> (O, stats [2, B, Hq, n]) called on
    the documents: documents of one length with implied positions (their tables' rows are the same) in one
    batched call each; explicit positions take one call per document. Differentiable where `forward` is."""
    calls: dict = {}
    for s, e in zip(starts[:-1], starts[1:]):
        if e > s:
            calls.setdefault(e - s if implied else (s,), []).append((s, e))
    total = q.shape[0]
    pieces, stat_pieces, order = [], [], []
    for docs in calls.values():
        n = docs[0][1] - docs[0][0]
        s = docs[0][0]
        tables = cos_tok[s:s + n], sin_tok[s:s + n]
        if len(docs) == 1:
            idx = torch.arange(s, s + n, device=q.device)
            qs, ks, vs = q[None, s:s + n], k[None, s:s + n], v[None, s:s + n]
        else:
            idx = (torch.tensor([d[0] for d in docs], device=q.device)[:, None]
                   + torch.arange(n, device=q.device)).flatten()
            qs, ks, vs = (t[idx].unflatten(0, (len(docs), n)) for t in (q, k, v))
        o, stats = forward(qs, ks, vs, *tables)  # [docs, n, Hq, D], [2, docs, Hq, n]
        pieces.append(o.flatten(0, 1))
        stat_pieces.append(stats.transpose(1, 2).flatten(2, 3))  # [2, Hq, docs * n]
        order.append(idx)
    out = q.new_empty(q.shape)
    stats = q.new_empty((2, q.shape[1], total), dtype=stat_pieces[0].dtype if stat_pieces else torch.float32)
    if pieces:  # every token is in one non-empty document: the copies cover out and stats
        idx = torch.cat(order)
        out = out.index_copy(0, idx, torch.cat(pieces))
        stats = stats.index_copy(2, idx, torch.cat(stat_pieces, dim=2))
    return out, stats


# ------------------------------------------------------------------------------------------------
# The CPU without the Triton interpreter (and bf16 in it), fp32 / fp16 / bf16 with the extension: the math
# forward document by document (as the batched op's), then one call of the C++ backward with each token's
# document bounds for all documents. Same gradients, bitwise, as one C++ backward per document.
# ------------------------------------------------------------------------------------------------
def _packed_cpu(q) -> bool:
    return (not _one_launch(q) and q.device.type == "cpu" and q.dtype in _COMPILED_DTYPES["cpu"]
            and _extension.has_kernel("cpu"))


@torch.library.custom_op("llama_fast::attention_packed_cpu", mutates_args=())
def _packed_cpu_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos_tok: torch.Tensor, sin_tok: torch.Tensor,
    cu_seqlens: torch.Tensor, doc_start: torch.Tensor, doc_end: torch.Tensor, implied: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    out, stats = _per_document(q[0], k[0], v[0], cos_tok, sin_tok, cu_seqlens.tolist(), implied,
                               lambda *a: _forward_math(*a, True))
    return out[None].clone(), stats[:, None].clone()  # [1, T, Hq, D], [2, 1, Hq, T]


@_packed_cpu_op.register_fake
def _packed_cpu_fake(q, k, v, cos_tok, sin_tok, cu_seqlens, doc_start, doc_end, implied):
    B, S, Hq, D = q.shape
    return q.new_empty((B, S, Hq, D)), q.new_empty((2, B, Hq, S), dtype=torch.float32)


def _packed_cpu_setup_context(ctx, inputs, output):
    q, k, v, cos_tok, sin_tok, cu_seqlens, doc_start, doc_end, implied = inputs
    out, stats = output
    ctx.save_for_backward(q, k, v, cos_tok, sin_tok, doc_start, doc_end, out, stats)
    ctx.mark_non_differentiable(stats)


def _packed_cpu_backward(ctx, dout, dstats):
    q, k, v, cos_tok, sin_tok, doc_start, doc_end, out, stats = ctx.saved_tensors
    dq, dk, dv = torch.ops.llama_fast.attention_backward(
        dout, q, k, v, out, stats, cos_tok, sin_tok, True, False, doc_start, doc_end
    )
    return dq, dk, dv, None, None, None, None, None, None


_packed_cpu_op.register_autograd(_packed_cpu_backward, setup_context=_packed_cpu_setup_context)
