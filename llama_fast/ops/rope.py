"""rope: q and k rotated in one Triton launch, compiled backward, as torch.library custom ops.

q [B, S, Hq, D] and k [B, S, Hkv, D] may have any strides (split views of a fused qkv output,
transposed [B, H, S, D] tensors); cos and sin are fp32 [>= S, D/2], row p for position p.
Nothing but the tables is saved for backward: the gradient is the inverse rotation.
"""
from __future__ import annotations

import torch

from ._common import check_float, check_same_device, compiled_backward, triton_runs_on


def _check(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    check_float("q", q)
    check_float("k", k)
    if q.dim() != 4:
        raise ValueError(f"q must be 4-D [B, S, Hq, D], got shape {tuple(q.shape)}")
    if k.dim() != 4:
        raise ValueError(f"k must be 4-D [B, S, Hkv, D], got shape {tuple(k.shape)}")
    B, S, _, D = q.shape
    if D % 2:
        raise ValueError(f"the head dim of q must be even for rotary embeddings, got {D}")
    if (k.shape[0], k.shape[1], k.shape[3]) != (B, S, D):
        raise ValueError(f"k must be [B={B}, S={S}, Hkv, D={D}] like q, got shape {tuple(k.shape)}")
    if k.dtype != q.dtype:
        raise TypeError(f"k must have the dtype of q ({q.dtype}), got {k.dtype}")
    check_same_device("q", q, "k", k)
    for name, table in (("cos", cos), ("sin", sin)):
        if not isinstance(table, torch.Tensor) or table.dtype != torch.float32:
            got = table.dtype if isinstance(table, torch.Tensor) else type(table).__name__
            raise TypeError(f"{name} must be a float32 tensor, got {got}")
        if table.dim() != 2 or table.shape[1] != D // 2 or table.shape[0] < S:
            raise ValueError(
                f"{name} must be [>= {S} positions, {D // 2}] (seq len of q, head dim / 2), got {tuple(table.shape)}"
            )
        check_same_device("q", q, name, table)
    if sin.shape != cos.shape:
        raise ValueError(f"sin must have the shape of cos {tuple(cos.shape)}, got {tuple(sin.shape)}")


def _tables(cos: torch.Tensor, sin: torch.Tensor, S: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first S rows of cos and sin with contiguous columns and one shared row stride."""
    cos, sin = cos[:S], sin[:S]  # (S, D/2)
    if cos.stride() != sin.stride() or cos.stride(-1) != 1:
        cos, sin = cos.contiguous(), sin.contiguous()
    return cos, sin


def _rotate(q, k, cos, sin, backward: bool):
    """Rotation by +theta (forward) or -theta (backward); contiguous outputs."""
    S = q.shape[1]
    cos, sin = _tables(cos, sin, S)
    if triton_runs_on(q.device):
        from llama_fast.kernels import rope as kernels

        return kernels.rope_rotate(q, k, cos, sin, backward)
    c, s = cos[:, None, :], (-sin if backward else sin)[:, None, :]  # (S, 1, D/2)
    outs = []
    for x in (q, k):
        x1, x2 = x.float().chunk(2, dim=-1)  # (B, S, H, D/2) each
        outs.append(torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(x.dtype).contiguous())
    return outs[0], outs[1]


@torch.library.custom_op("llama_fast::rope_forward", mutates_args=())
def rope_forward(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rotated q, rotated k), contiguous."""
    return _rotate(q, k, cos, sin, backward=False)


@rope_forward.register_fake
def _(q, k, cos, sin):
    return q.new_empty(q.shape), k.new_empty(k.shape)


@torch.library.custom_op("llama_fast::rope_backward_fallback", mutates_args=())
def rope_backward_fallback(
    dq: torch.Tensor, dk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dq, dk) rotated back where the extension has no kernel: Triton where it runs, else PyTorch math."""
    return _rotate(dq, dk, cos, sin, backward=True)


@rope_backward_fallback.register_fake
def _(dq, dk, cos, sin):
    return dq.new_empty(dq.shape), dk.new_empty(dk.shape)


def _setup(ctx, inputs, output):
    q, k, cos, sin = inputs
    ctx.save_for_backward(cos, sin)
    ctx.q_meta = (q.shape, q.dtype)
    ctx.k_meta = (k.shape, k.dtype)


def _backward(ctx, dq, dk):
    cos, sin = ctx.saved_tensors
    if dq is None:
        dq = cos.new_zeros(ctx.q_meta[0], dtype=ctx.q_meta[1])
    if dk is None:
        dk = cos.new_zeros(ctx.k_meta[0], dtype=ctx.k_meta[1])
    if compiled_backward("rope", dq.device):
        dq, dk = torch.ops.llama_fast.rope_backward(dq, dk, cos, sin)
    else:
        dq, dk = rope_backward_fallback(dq, dk, cos, sin)
    return dq, dk, None, None


rope_forward.register_autograd(_backward, setup_context=_setup)


def rope(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotates q [B, S, Hq, D] and k [B, S, Hkv, D] by the angles of positions 0..S-1 (one launch).

    cos, sin: fp32 [>= S, D/2] (``reference.rope_tables``); results are contiguous, in q.dtype.
    """
    _check(q, k, cos, sin)
    return rope_forward(q, k, cos, sin)
