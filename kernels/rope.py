"""Rotary position embedding (half-split convention) of q and k in one Triton launch.

For a head vector x of size D at position p, with x1 = x[:D/2], x2 = x[D/2:], c = cos[p], s = sin[p]:

    forward:   out1 = x1 * c - x2 * s          out2 = x2 * c + x1 * s        (rotation by +theta)
    backward:  dx1  = d1 * c + d2 * s          dx2  = d2 * c - d1 * s        (rotation by -theta)

The backward is the same kernel with the sign of sin flipped (BACKWARD=True); the compiled
CUDA/C++ op in csrc/ is the main backward path, this one runs where the extension cannot.

Layout: q [B, S, Hq, D] and k [B, S, Hkv, D] with any strides (split views of a fused qkv output,
[B, H, S, D].transpose(1, 2) views); outputs contiguous [B, S, H, D] in the input dtype; cos, sin
fp32 [>= S, D/2] with a row stride, row p used for position p. Math in fp32. One program per
token (b, s) rotates all q heads, then all k heads, so cos/sin rows are loaded once per token.
Offsets are int64 (tensors past 2^31 elements).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# Elements of one head-block tile (BLOCK_H heads x HALF columns of each half).
TILE_ELEMENTS = 2048


def launch_config(half: int, heads: int) -> tuple[int, int, int]:
    """(HALF_BLOCK, BLOCK_H, num_warps) for head dim 2 * half: the one place for these choices."""
    half_block = triton.next_power_of_2(max(half, 1))
    block_h = max(1, min(triton.next_power_of_2(max(heads, 1)), TILE_ELEMENTS // half_block))
    num_warps = 4 if block_h * half_block <= 1024 else 8
    return half_block, block_h, num_warps


@triton.jit
def _rotate_heads(
    in_ptr, sb, ss, sh, sd,  # input [B, S, H, D] and its four strides
    out_ptr,  # output [B, S, H, D] contiguous
    b, s, token, H, HALF,  # batch index, position, flat token index b * S + s, heads, D / 2
    c, sn,  # [1, HALF_BLOCK] fp32 cos and (signed) sin of this position
    HALF_BLOCK: tl.constexpr,
    BLOCK_H: tl.constexpr,
    D_CONTIGUOUS: tl.constexpr,  # sd == 1: plain offsets, so loads vectorize
):
    d = tl.arange(0, HALF_BLOCK)[None, :]
    base = in_ptr + b * sb + s * ss
    out_base = out_ptr + token * H * (2 * HALF)
    for h0 in range(0, H, BLOCK_H):
        h = h0 + tl.arange(0, BLOCK_H)[:, None]
        mask = (h < H) & (d < HALF)
        if D_CONTIGUOUS:
            src = base + h.to(tl.int64) * sh + d
            second = src + HALF
        else:
            src = base + h.to(tl.int64) * sh + d.to(tl.int64) * sd
            second = src + HALF * sd
        x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(second, mask=mask, other=0.0).to(tl.float32)
        dst = out_base + h * (2 * HALF) + d
        tl.store(dst, (x1 * c - x2 * sn).to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(dst + HALF, (x2 * c + x1 * sn).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def rope_kernel(
    q_ptr, q_sb, q_ss, q_sh, q_sd,  # q [B, S, Hq, D] and its strides
    k_ptr, k_sb, k_ss, k_sh, k_sd,  # k [B, S, Hkv, D] and its strides
    q_out_ptr, k_out_ptr,  # outputs, contiguous
    cos_ptr, sin_ptr, cs_row_stride,  # fp32 [>= S, HALF] tables sharing one row stride
    S, Hq, Hkv, HALF,
    BACKWARD: tl.constexpr,  # rotate by -theta (the gradient of the forward rotation)
    HALF_BLOCK: tl.constexpr,  # HALF rounded up to a power of two
    BLOCK_H: tl.constexpr,  # heads per tile
    Q_D_CONTIGUOUS: tl.constexpr,  # q's head dim has stride 1
    K_D_CONTIGUOUS: tl.constexpr,  # k's head dim has stride 1
):
    token = tl.program_id(0).to(tl.int64)
    b = token // S
    s = token % S
    d = tl.arange(0, HALF_BLOCK)[None, :]
    c = tl.load(cos_ptr + s * cs_row_stride + d, mask=d < HALF, other=0.0)
    sn = tl.load(sin_ptr + s * cs_row_stride + d, mask=d < HALF, other=0.0)
    if BACKWARD:
        sn = -sn
    _rotate_heads(q_ptr, q_sb, q_ss, q_sh, q_sd, q_out_ptr, b, s, token, Hq, HALF, c, sn,
                  HALF_BLOCK, BLOCK_H, Q_D_CONTIGUOUS)
    _rotate_heads(k_ptr, k_sb, k_ss, k_sh, k_sd, k_out_ptr, b, s, token, Hkv, HALF, c, sn,
                  HALF_BLOCK, BLOCK_H, K_D_CONTIGUOUS)


def rope_rotate(q, k, cos, sin, backward: bool):
    """Rotates q and k (any strides) by +theta (forward) or -theta (backward) in one launch.

    cos and sin must share one row stride with contiguous columns. Returns contiguous (q_out, k_out).
    """
    B, S, Hq, D = q.shape
    Hkv = k.shape[2]
    q_out = torch.empty((B, S, Hq, D), dtype=q.dtype, device=q.device)
    k_out = torch.empty((B, S, Hkv, D), dtype=k.dtype, device=k.device)
    if B * S == 0 or D == 0:
        return q_out, k_out
    half_block, block_h, num_warps = launch_config(D // 2, max(Hq, Hkv))
    rope_kernel[(B * S,)](
        q, *q.stride(), k, *k.stride(), q_out, k_out, cos, sin, cos.stride(0),
        S, Hq, Hkv, D // 2,
        BACKWARD=backward, HALF_BLOCK=half_block, BLOCK_H=block_h,
        Q_D_CONTIGUOUS=q.stride(3) == 1, K_D_CONTIGUOUS=k.stride(3) == 1, num_warps=num_warps,
    )
    return q_out, k_out
