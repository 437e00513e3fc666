"""SwiGLU in Triton: the forward, and a fallback backward.

Forward (math in fp32, output in the gate dtype), with s = sigmoid(gate):

    y = silu(gate) * up = gate * s * up

Backward (the compiled CUDA/C++ op in csrc/ is the main path), recomputing s instead of storing it:

    dup   = dy * gate * s
    dgate = dy * up * s * (1 + gate * (1 - s))

Layout: every tensor is viewed as [rows, F] with a row stride and a contiguous last dim, so the
two halves of a fused [gate, up] GEMM output ([rows, 2F] split by .chunk(2, -1)) are read in
place, without a copy. Outputs are contiguous. Row offsets are int64 (tensors past 2^31 elements).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# Columns per program; a program handles one block of one row.
MAX_BLOCK = 2048


def launch_config(cols: int) -> tuple[int, int]:
    """(BLOCK, num_warps) for rows of `cols` elements: the one place for these choices."""
    block = min(triton.next_power_of_2(max(cols, 1)), MAX_BLOCK)
    num_warps = 4 if block <= 1024 else 8
    return block, num_warps


@triton.jit
def swiglu_forward_kernel(
    gate_ptr, gate_row_stride,  # [rows, F]
    up_ptr, up_row_stride,  # [rows, F]
    y_ptr,  # output [rows, F] contiguous, gate dtype
    F,
    BLOCK: tl.constexpr,  # columns per program
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < F
    g = tl.load(gate_ptr + row * gate_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + row * up_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    y = g * tl.sigmoid(g) * u
    tl.store(y_ptr + row * F + cols, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def swiglu_backward_kernel(
    dy_ptr, dy_row_stride,  # upstream gradient [rows, F]
    gate_ptr, gate_row_stride,  # [rows, F]
    up_ptr, up_row_stride,  # [rows, F]
    dgate_ptr, dup_ptr,  # outputs [rows, F], gate dtype: separate, or the halves of one [rows, 2F]
    d_row_stride,  # row stride of both outputs: F (separate) or 2F (packed)
    F,
    BLOCK: tl.constexpr,  # columns per program
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < F
    dy = tl.load(dy_ptr + row * dy_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(gate_ptr + row * gate_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + row * up_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(g)
    tl.store(dup_ptr + row * d_row_stride + cols, (dy * g * s).to(dup_ptr.dtype.element_ty), mask=mask)
    dgate = dy * u * s * (1.0 + g * (1.0 - s))
    tl.store(dgate_ptr + row * d_row_stride + cols, dgate.to(dgate_ptr.dtype.element_ty), mask=mask)


def swiglu_forward(gate, up):
    """Launches the forward on [rows, F] views (last dim contiguous); returns y [rows, F] contiguous."""
    rows, cols = gate.shape
    y = torch.empty((rows, cols), dtype=gate.dtype, device=gate.device)
    if y.numel() == 0:
        return y
    block, num_warps = launch_config(cols)
    grid = (rows, triton.cdiv(cols, block))
    swiglu_forward_kernel[grid](gate, gate.stride(0), up, up.stride(0), y, cols, BLOCK=block, num_warps=num_warps)
    return y


def swiglu_backward(dy, gate, up, packed: bool = False):
    """Launches the fallback backward on [rows, F] views. Returns (dgate, dup), contiguous [rows, F],
    or with ``packed`` one [rows, 2F] tensor [dgate | dup] (the gradient of a fused [gate | up])."""
    rows, cols = gate.shape
    if packed:
        out = torch.empty((rows, 2 * cols), dtype=gate.dtype, device=gate.device)  # (rows, 2F)
        dgate, dup = out[:, :cols], out[:, cols:]
    else:
        dgate = torch.empty((rows, cols), dtype=gate.dtype, device=gate.device)
        dup = torch.empty_like(dgate)
    if dgate.numel() > 0:
        block, num_warps = launch_config(cols)
        grid = (rows, triton.cdiv(cols, block))
        swiglu_backward_kernel[grid](
            dy, dy.stride(0), gate, gate.stride(0), up, up.stride(0), dgate, dup, dgate.stride(0), cols,
            BLOCK=block, num_warps=num_warps,
        )
    return out if packed else (dgate, dup)
