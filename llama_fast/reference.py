"""Plain-PyTorch reference implementations of every llama_fast op.

These functions are the oracle: every kernel is tested against them, and they
are the fallback wherever no kernel can run. They favour clarity over speed.

Conventions shared with the fused ops in ``llama_fast.ops``:

* activations are laid out ``[B, S, H, D]`` (batch, sequence, heads, head dim);
  any strides are accepted;
* RoPE uses the half-split convention (Hugging Face's layout): the first half
  of the head dim holds the "real" parts, the second half the "imaginary" ones;
* ``cos`` and ``sin`` are fp32 tables of shape ``[S, D // 2]``;
* normalisation, rotation and softmax are computed in fp32 and the result is
  returned in the activation dtype; matmuls run in the activation dtype (fp32
  accumulate), as eager PyTorch does.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _acc(t: torch.Tensor) -> torch.dtype:
    """The dtype math runs in: fp32, or fp64 for fp64 inputs (the tests' high-precision oracle)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """y = x / sqrt(mean(x^2, -1) + eps) * weight, math in fp32, result in x.dtype."""
    xf = x.to(_acc(x))
    rstd = torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)
    return (xf * rstd * weight.to(xf.dtype)).to(x.dtype)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (rms_norm(x + residual), x + residual); the sum is rounded to x.dtype first."""
    total = x + residual
    return rms_norm(total, weight, eps), total


def swiglu(gate: torch.Tensor, up: torch.Tensor | None = None) -> torch.Tensor:
    """silu(gate) * up, math in fp32, result in gate.dtype; with up=None, gate is [gate | up] ([..., 2F])."""
    if up is None:
        gate, up = gate.chunk(2, dim=-1)
    acc = _acc(gate)
    return (F.silu(gate.to(acc)) * up.to(acc)).to(gate.dtype)


def rope_tables(
    seq_len: int,
    head_dim: int,
    theta: float = 10000.0,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin), each [seq_len, head_dim // 2], for angles pos * theta^(-2i / head_dim).

    Computed in fp64; fp32 is the kernels' contract, fp64 serves high-precision references.
    """
    if head_dim % 2:
        raise ValueError(f"head_dim must be even for rotary embeddings, got {head_dim}")
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim))
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float64, device=device), inv_freq)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (B, S, H, D); cos, sin: (S, D/2) broadcast over batch and heads.
    half = x.shape[-1] // 2
    xf = x.to(_acc(x))
    x1, x2 = xf[..., :half], xf[..., half:]
    c = cos[: x.shape[1], None, :].to(xf.dtype)  # (S, 1, D/2)
    s = sin[: x.shape[1], None, :].to(xf.dtype)
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(x.dtype)


def rope(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotates q [B, S, Hq, D] and k [B, S, Hkv, D] by the angles of positions 0..S-1."""
    return _rotate(q, cos, sin), _rotate(k, cos, sin)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    causal: bool = True,
    *,
    return_lse: bool = False,
):
    """softmax(rope(q) rope(k)^T / sqrt(D) + mask) v, grouped-query when Hkv < Hq.

    q: [B, S, Hq, D]; k, v: [B, S, Hkv, D]; returns O [B, S, Hq, D] and, with
    ``return_lse``, the natural-log log-sum-exp of the scaled scores, fp32 [B, Hq, S].
    """
    B, S, Hq, D = q.shape
    Hkv = k.shape[2]
    q, k = rope(q, k, cos, sin)
    group = Hq // Hkv
    qh = q.transpose(1, 2)  # (B, Hq, S, D)
    kh = k.transpose(1, 2).repeat_interleave(group, dim=1)  # (B, Hq, S, D)
    vh = v.transpose(1, 2).repeat_interleave(group, dim=1)
    scores = (qh @ kh.transpose(-1, -2)).to(_acc(q)) * (1.0 / math.sqrt(D))  # (B, Hq, S, S)
    if causal:
        mask = torch.ones(S, S, dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # (B, Hq, S)
    probs = torch.exp(scores - lse[..., None]).to(q.dtype)
    out = (probs @ vh).transpose(1, 2)  # (B, S, Hq, D)
    return (out, lse) if return_lse else out


def attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    cu_seqlens: torch.Tensor,
    position_ids: torch.Tensor | None = None,
    *,
    return_lse: bool = False,
):
    """Packed documents, each attending causally to itself only, computed document by document.

    q: [T, Hq, D]; k, v: [T, Hkv, D]; cu_seqlens: [N + 1] document starts (0 first, T last). Token t
    of a document is rotated by its offset in the document, or by ``position_ids[t]`` when given.
    Returns O [T, Hq, D] and, with ``return_lse``, the natural-log LSE, fp32 [Hq, T].
    """
    starts = cu_seqlens.tolist()
    if position_ids is None:
        position_ids = torch.cat([torch.arange(e - s, device=q.device) for s, e in zip(starts[:-1], starts[1:])]
                                 or [torch.zeros(0, dtype=torch.long, device=q.device)])
    cos_tok, sin_tok = cos[position_ids.long()], sin[position_ids.long()]  # row t rotates token t
    outs, lses = [], []
    for s, e in zip(starts[:-1], starts[1:]):
        o, lse = attention(q[None, s:e], k[None, s:e], v[None, s:e], cos_tok[s:e], sin_tok[s:e], True, return_lse=True)
        outs.append(o[0])
        lses.append(lse[0])
    out = torch.cat(outs) if outs else q.new_empty(q.shape)
    lse = torch.cat(lses, dim=-1) if lses else q.new_empty((q.shape[1], 0), dtype=torch.float32)
    return (out, lse) if return_lse else out
