"""Causal attention with RoPE fused in: the autograd glue and the one place that picks a kernel.

    out = attention(q, k, v, cos, sin, causal=True)
    out, lse = attention(q, k, v, cos, sin, return_lse=True)
    out = attention(q, k, v, cos, sin, cu_seqlens=cu, max_seqlen=n)   # packed documents: ops/attention_varlen.py

q [B, S, Hq, D], k and v [B, S, Hkv, D] with Hq % Hkv == 0, any strides; cos, sin fp32 [S' >= S, D/2].
Same math as ``llama_fast.reference.attention``; the LSE (natural log, fp32 [B, Hq, S]) is returned
without a gradient.

Forward: Triton on CUDA (kernels/attention.py); on the CPU, Triton in the interpreter when
TRITON_INTERPRET=1 for fp32 / fp16 (the interpreter's bf16 tl.dot returns garbage, so bf16 takes the
math path there), else the math path (``_forward_math``; it also serves fp64 inputs everywhere).
Every forward saves the row statistics (the contract in csrc/llama_fast.h) instead of the LSE: fp32
[2, B, Hq, S], the row max m2 of the base-2 scores S2 = S * log2(e) and log2 of the row sum, and every
backward recomputes P = exp2((S2 - m2) - log2l) with S2 formed by the arithmetic of the forward it
follows. One saved LSE = m + log(l) lost the low bits of S - m for large scores (issue 13 item 6).
Backward, from the saved unrotated q, k, v, O and stats: after a Triton forward on the CPU (the
interpreter), the Triton backward (the same summation); otherwise the compiled op
torch.ops.llama_fast.attention_backward (CUDA for fp16/bf16, C++ on the CPU) when the extension has
it; else the Triton backward (CUDA); else PyTorch math. Falling back warns once.
``deterministic`` (default: torch.are_deterministic_algorithms_enabled()) asks the CUDA backward for
bitwise-reproducible gradients; the Triton and CPU backwards always are.
"""
from __future__ import annotations

import math

import torch

from .. import _extension, reference
from ._common import triton_runs_on

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_MAX_HEAD_DIM = 256
_MAX_GRID_Y = 65535  # CUDA limit of a launch grid's second axis, which runs batch * query heads


def _check_inputs(q, k, v, cos, sin) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"attention: {name} must be a tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"attention: {name} must be 4-D [batch, seq, heads, head_dim], got shape {tuple(t.shape)}")
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"attention: {name} must be float32, float16 or bfloat16, got {t.dtype}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"attention: {name} must have the dtype of q ({q.dtype}), got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"attention: {name} must be on the device of q ({q.device}), got {t.device}")
    B, S, Hq, D = q.shape
    if k.shape[0] != B or k.shape[1] != S or k.shape[3] != D:
        raise ValueError(
            f"attention: k must be [batch={B}, seq={S}, kv_heads, head_dim={D}] to match q {tuple(q.shape)}, "
            f"got {tuple(k.shape)}"
        )
    if v.shape != k.shape:
        raise ValueError(f"attention: v must have the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
    Hkv = k.shape[2]
    if Hkv == 0 or Hq % Hkv:
        raise ValueError(f"attention: the query heads ({Hq}) must be a multiple of the kv heads (k.shape[2] = {Hkv})")
    if D % 2 or D == 0 or D > _MAX_HEAD_DIM:
        raise ValueError(f"attention: head_dim must be even and at most {_MAX_HEAD_DIM}, got {D}")
    if q.device.type == "cuda" and B * Hq > _MAX_GRID_Y:
        raise ValueError(
            f"attention: batch * query heads must be at most {_MAX_GRID_Y} (the kernels' second grid axis), got "
            f"{B} * {Hq} = {B * Hq}; split the batch"
        )
    for name, t in (("cos", cos), ("sin", sin)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"attention: {name} must be a tensor, got {type(t).__name__}")
        if t.dtype != torch.float32:
            raise TypeError(f"attention: {name} must be float32, got {t.dtype}")
        if t.dim() != 2 or t.shape[1] != D // 2 or t.shape[0] < S:
            raise ValueError(
                f"attention: {name} must be [seq >= {S}, head_dim / 2 = {D // 2}] (a rotary table covering every "
                f"position), got shape {tuple(t.shape)}"
            )
        if t.device != q.device:
            raise ValueError(f"attention: {name} must be on the device of q ({q.device}), got {t.device}")


# ------------------------------------------------------------------------------------------------
# PyTorch math: the CPU forward without the interpreter and the backward of last resort.
# ------------------------------------------------------------------------------------------------
LN2 = 0.6931471805599453


def _scores2(q, k, cos, sin):
    """S2 = (rot(q) . rot(k)) * (scale * log2(e)) (B, Hq, S, S), unmasked, as the math-path forward
    forms it and as the C++ backward (csrc/cpu/attention_backward.cpp) recomputes it: rotation in fp32
    (products, then the difference: no fused multiply-add), rounded to the input dtype; the dot of
    those fp32 values summed in fp64 (each product is exact) and rounded to fp32; then times the fp32
    scale. fp64 inputs keep fp64 throughout."""
    B, S, Hq, D = q.shape
    group = Hq // k.shape[2]
    if q.dtype == torch.float64:
        qr, kr = reference.rope(q, k, cos, sin)
        qh, kh = qr.transpose(1, 2), kr.transpose(1, 2).repeat_interleave(group, dim=1)
        return (qh @ kh.transpose(-1, -2)) * (1.4426950408889634 / math.sqrt(D))
    qr, kr = reference.rope(q.float(), k.float(), cos, sin)
    qr, kr = qr.to(q.dtype).double(), kr.to(k.dtype).double()
    qh, kh = qr.transpose(1, 2), kr.transpose(1, 2).repeat_interleave(group, dim=1)
    scale = torch.tensor(1.4426950408889634 / math.sqrt(D), dtype=torch.float32, device=q.device)
    return (qh @ kh.transpose(-1, -2)).float() * scale


def _mask(s2, causal):
    if not causal:
        return s2
    S = s2.shape[-1]
    return s2.masked_fill(torch.ones(S, S, dtype=torch.bool, device=s2.device).triu(1), float("-inf"))


def _forward_math(q, k, v, cos, sin, causal):
    """(O, stats): O from the reference; stats fp32 [2, B, Hq, S] from _scores2 (the row-statistics
    contract, csrc/llama_fast.h); fp64
    [2, B, Hq, S] for fp64 inputs (which only this path and _backward_math serve)."""
    out = reference.attention(q, k, v, cos, sin, causal)
    s2 = _mask(_scores2(q, k, cos, sin), causal)
    m2 = s2.amax(-1)  # (B, Hq, S); every row keeps at least one key
    log2l = torch.exp2((s2 - m2[..., None]).double()).sum(-1).log2()
    return out.contiguous(), torch.stack((m2, log2l.to(m2.dtype)))


def lse_from_stats(stats: torch.Tensor) -> torch.Tensor:
    """The natural log-sum-exp [B, Hq, S] from the saved row statistics: (m2 + log2l) * ln 2."""
    return (stats[0] + stats[1]) * LN2


def _stats_dtype(q):
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _check_stats(stats, q):
    B, S, Hq, _ = q.shape
    if not isinstance(stats, torch.Tensor) or stats.dtype != _stats_dtype(q) or tuple(stats.shape) != (2, B, Hq, S):
        got = f"{stats.dtype} {tuple(stats.shape)}" if isinstance(stats, torch.Tensor) else type(stats).__name__
        raise ValueError(
            f"attention backward: stats must be {str(_stats_dtype(q))[6:]} [2, {B}, {Hq}, {S}] (row max m2 and log2 "
            f"of the row sum, as the forward saves them), got {got}"
        )


def _backward_math(dout, q, k, v, out, stats, cos, sin, causal):
    """(dq, dk, dv) by the flash recipe in PyTorch (fp32, fp64 for fp64 inputs), after _forward_math."""
    _check_stats(stats, q)
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    B, S, Hq, D = q.shape
    group = Hq // k.shape[2]
    scale = 1.0 / math.sqrt(D)
    qr, kr = reference.rope(q.to(acc), k.to(acc), cos, sin)
    qh = qr.transpose(1, 2)  # (B, Hq, S, D)
    kh = kr.transpose(1, 2).repeat_interleave(group, dim=1)  # (B, Hq, S, D)
    vh = v.to(acc).transpose(1, 2).repeat_interleave(group, dim=1)
    doh = dout.to(acc).transpose(1, 2)  # (B, Hq, S, D)
    # m2 first (exact near the row max), then log2l; never their sum.
    p = torch.exp2(((_mask(_scores2(q, k, cos, sin), causal) - stats[0][..., None]) - stats[1][..., None]).to(acc))
    delta = (doh * out.to(acc).transpose(1, 2)).sum(-1, keepdim=True)  # (B, Hq, S, 1)
    ds = p * (doh @ vh.transpose(-1, -2) - delta)
    dqr = (ds @ kh * scale).transpose(1, 2)  # (B, S, Hq, D)
    dkr = (ds.transpose(-1, -2) @ qh * scale).unflatten(1, (-1, group)).sum(2).transpose(1, 2)  # (B, S, Hkv, D)
    dv = (p.transpose(-1, -2) @ doh).unflatten(1, (-1, group)).sum(2).transpose(1, 2)  # (B, S, Hkv, D)
    dq, dk = reference.rope(dqr, dkr, cos, -sin)  # rotation by -theta
    return dq.to(q.dtype).contiguous(), dk.to(k.dtype).contiguous(), dv.to(v.dtype).contiguous()


# ------------------------------------------------------------------------------------------------
# Custom ops (torch.compile traces through them)
# ------------------------------------------------------------------------------------------------
@torch.library.custom_op("llama_fast::attention", mutates_args=())
def _attention_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
    causal: bool, deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    if _triton_forward(q):
        from llama_fast.kernels.attention import attention_forward

        return attention_forward(q, k, v, cos, sin, causal)
    return _forward_math(q, k, v, cos, sin, causal)


@_attention_op.register_fake
def _attention_fake(q, k, v, cos, sin, causal, deterministic):
    B, S, Hq, D = q.shape
    return q.new_empty((B, S, Hq, D)), q.new_empty((2, B, Hq, S), dtype=_stats_dtype(q))


def _triton_forward(q) -> bool:
    """Whether the forward runs the Triton kernel: not for fp64, and not for bf16 in the CPU interpreter,
    whose bf16 tl.dot returns garbage without an error (issue 13 item 7)."""
    if not triton_runs_on(q.device) or q.dtype == torch.float64:
        return False
    return not (q.device.type == "cpu" and q.dtype == torch.bfloat16)


@torch.library.custom_op("llama_fast::attention_backward_fallback", mutates_args=())
def _attention_backward_fallback(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
    stats: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, causal: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The backward without the compiled op: Triton where its forward ran, PyTorch math elsewhere."""
    if _triton_forward(q):
        from llama_fast.kernels.attention import attention_backward

        return attention_backward(dout, q, k, v, out, stats, cos, sin, causal)
    return _backward_math(dout, q, k, v, out, stats, cos, sin, causal)


@_attention_backward_fallback.register_fake
def _attention_backward_fallback_fake(dout, q, k, v, out, stats, cos, sin, causal):
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape))


# Dtypes the compiled backward takes: the CUDA kernel multiplies on the tensor cores in fp16 / bf16;
# the C++ CPU kernel computes in fp32 (fp64 inputs keep fp64 through the PyTorch math instead).
# "meta" (shapes only, through the op's fake implementation) stands in for CUDA.
_COMPILED_DTYPES = {
    "cuda": (torch.float16, torch.bfloat16),
    "cpu": (torch.float32, torch.float16, torch.bfloat16),
    "meta": (torch.float16, torch.bfloat16),
}


def _setup_context(ctx, inputs, output):
    q, k, v, cos, sin, causal, deterministic = inputs
    out, stats = output
    ctx.save_for_backward(q, k, v, cos, sin, out, stats)
    ctx.causal = causal
    ctx.deterministic = deterministic
    ctx.mark_non_differentiable(stats)


def _backward(ctx, dout, dstats):
    q, k, v, cos, sin, out, stats = ctx.saved_tensors
    has_kernel = _extension.has_kernel(q.device.type)
    # After a Triton forward in the CPU interpreter, the Triton backward: its scores are bitwise the
    # forward's, which the C++ backward (matched to the math-path forward) cannot promise.
    interpreted = q.device.type == "cpu" and _triton_forward(q)
    if has_kernel and not interpreted and q.dtype in _COMPILED_DTYPES.get(q.device.type, ()):
        dq, dk, dv = torch.ops.llama_fast.attention_backward(
            dout, q, k, v, out, stats, cos, sin, ctx.causal, ctx.deterministic
        )
    else:
        if not has_kernel and not interpreted:
            _extension.warn_fallback("attention", q.device.type)
        dq, dk, dv = _attention_backward_fallback(dout, q, k, v, out, stats, cos, sin, ctx.causal)
    return dq, dk, dv, None, None, None, None


_attention_op.register_autograd(_backward, setup_context=_setup_context)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    causal: bool = True,
    *,
    return_lse: bool = False,
    deterministic: bool | None = None,
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int | None = None,
    position_ids: torch.Tensor | None = None,
):
    """softmax(rope(q) rope(k)^T / sqrt(D) + causal mask) v; see the module docstring. With
    ``cu_seqlens``: packed documents, q [T, Hq, D] (llama_fast.ops.attention_varlen)."""
    if not isinstance(causal, bool):
        raise TypeError(f"attention: causal must be a bool, got {causal!r}")
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    elif not isinstance(deterministic, bool):
        raise TypeError(f"attention: deterministic must be a bool or None, got {deterministic!r}")
    if cu_seqlens is not None:
        if not causal:
            raise ValueError("attention: packed documents (cu_seqlens) are causal; got causal=False")
        from .attention_varlen import _attention_varlen

        out, lse = _attention_varlen(q, k, v, cos, sin, cu_seqlens, max_seqlen, position_ids, deterministic=deterministic)
        return (out, lse) if return_lse else out
    for name, value in (("max_seqlen", max_seqlen), ("position_ids", position_ids)):
        if value is not None:
            raise ValueError(f"attention: {name} is for packed documents and needs cu_seqlens (got cu_seqlens=None)")
    if isinstance(q, torch.Tensor) and q.dim() == 3:
        raise ValueError(f"attention: q must be 4-D [batch, seq, heads, head_dim], got shape {tuple(q.shape)}; "
                         "a packed q [tokens, heads, head_dim] needs cu_seqlens and max_seqlen")
    _check_inputs(q, k, v, cos, sin)
    # The kernels take contiguous rotary tables ([S, D/2] fp32: a copy is small). Row-strided views, such
    # as the first half of a [S, D] table, gave NaN under the CPU interpreter (triton 3.9) when passed
    # as they are, though the kernels index rows by their stride; not yet understood, so not risked.
    cos, sin = cos.contiguous(), sin.contiguous()
    out, stats = _attention_op(q, k, v, cos, sin, causal, deterministic)
    return (out, lse_from_stats(stats)) if return_lse else out
