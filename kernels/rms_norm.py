"""RMSNorm and fused residual-add + RMSNorm in Triton: the forward, and a fallback backward.

Forward, per row r of x (last dim N, math in fp32, outputs in x.dtype):

    h      = x + residual                (add_rms_norm only; rounded to x.dtype, as eager torch)
    rstd_r = 1 / sqrt(mean(h^2) + eps)   (saved, one fp32 per row)
    y      = h * rstd_r * w

Backward (the compiled CUDA/C++ op in csrc/ is the main path; the kernel here runs where the
extension has no kernel for the device), with x_hat = h * rstd and g = dy * w:

    dh = rstd * (g - x_hat * mean(g * x_hat)) [+ dsum, the gradient of the returned h]
    dw = sum over rows of dy * x_hat      two stages: one fp32 partial row per program,
                                          then a fixed-order sum over programs (deterministic)

Layout: every tensor is viewed as [rows, N] with a row stride and contiguous last dim; outputs
are contiguous. Row offsets are int64 so tensors past 2^31 elements index correctly.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# Widest row kept in registers in one block; wider rows are streamed in blocks of this size.
MAX_BLOCK = 8192


def launch_config(cols: int) -> tuple[int, bool, int]:
    """(BLOCK, ONE_BLOCK, num_warps) for rows of `cols` elements: the one place for these choices."""
    block = min(triton.next_power_of_2(max(cols, 1)), MAX_BLOCK)
    one_block = cols <= block
    num_warps = 4 if block <= 1024 else 8 if block <= 4096 else 16
    return block, one_block, num_warps


def backward_programs(device: torch.device, rows: int) -> int:
    """Programs of the persistent backward grid (= dw partial rows): two per SM (four on the CPU)."""
    per_device = 2 * torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    return max(1, min(rows, per_device))


@triton.jit
def rms_norm_forward_kernel(
    x_ptr, x_row_stride,  # input rows [rows, N]
    res_ptr, res_row_stride,  # residual rows [rows, N] (read only when HAS_RESIDUAL)
    w_ptr,  # weight [N], fp32 or the x dtype
    y_ptr,  # output [rows, N] contiguous, x dtype
    sum_ptr,  # x + residual [rows, N] contiguous, x dtype (written only when HAS_RESIDUAL)
    rstd_ptr,  # fp32 [rows]
    N, eps,
    HAS_RESIDUAL: tl.constexpr,  # add_rms_norm: normalise x + residual and write the sum
    BLOCK: tl.constexpr,  # columns handled per step (a power of two)
    ONE_BLOCK: tl.constexpr,  # N <= BLOCK: the row stays in registers between the two passes
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * x_row_stride
    res_row = res_ptr + row * res_row_stride
    y_row = y_ptr + row * N
    sum_row = sum_ptr + row * N
    if ONE_BLOCK:
        cols = tl.arange(0, BLOCK)
        mask = cols < N
        h = tl.load(x_row + cols, mask=mask, other=0.0)
        if HAS_RESIDUAL:
            h = h + tl.load(res_row + cols, mask=mask, other=0.0)  # rounded to the x dtype
            tl.store(sum_row + cols, h, mask=mask)
        h = h.to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(h * h, axis=0) / N + eps)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_row + cols, (h * rstd * w).to(y_ptr.dtype.element_ty), mask=mask)
    else:
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, N, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < N
            h = tl.load(x_row + cols, mask=mask, other=0.0)
            if HAS_RESIDUAL:
                h = h + tl.load(res_row + cols, mask=mask, other=0.0)
                tl.store(sum_row + cols, h, mask=mask)
            h = h.to(tl.float32)
            acc += h * h
        rstd = 1.0 / tl.sqrt(tl.sum(acc, axis=0) / N + eps)
        for start in range(0, N, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < N
            h = tl.load(x_row + cols, mask=mask, other=0.0)
            if HAS_RESIDUAL:  # recompute the sum rather than re-read what this program stored
                h = h + tl.load(res_row + cols, mask=mask, other=0.0)
            h = h.to(tl.float32)
            w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(y_row + cols, (h * rstd * w).to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + row, rstd)


@triton.jit
def _load_column_block(x_ptr, x_row_stride, dy_ptr, dy_row_stride, w_ptr, row, cols, mask, rstd):
    """x_hat = x * rstd, dy and w over one block of columns of one row, in fp32 (the streaming
    backward reads them in both of its passes rather than keep a row wider than a block)."""
    x_hat = tl.load(x_ptr + row * x_row_stride + cols, mask=mask, other=0.0).to(tl.float32) * rstd
    dy = tl.load(dy_ptr + row * dy_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    return x_hat, dy, w


@triton.jit
def rms_norm_backward_kernel(
    dy_ptr, dy_row_stride,  # upstream gradient [rows, N]
    x_ptr, x_row_stride,  # the normalised input h [rows, N]
    w_ptr,  # weight [N]
    rstd_ptr,  # fp32 [rows], from the forward
    dsum_ptr,  # gradient of the returned sum [rows, N] contiguous (read only when HAS_DSUM)
    dx_ptr,  # output [rows, N] contiguous, x dtype
    partial_ptr,  # fp32 [num_programs, N]: this program's share of dw (stage one)
    rows, N,
    HAS_DSUM: tl.constexpr,  # add dsum into dx (add_rms_norm)
    BLOCK: tl.constexpr,  # columns per step
    ONE_BLOCK: tl.constexpr,  # N <= BLOCK: the dw partial lives in registers
):
    pid = tl.program_id(0)
    step = tl.num_programs(0)
    first_row = pid.to(tl.int64)
    my_rows = tl.cdiv(rows - pid, step)  # this program takes rows pid, pid + step, ...
    partial_row = partial_ptr + first_row * N
    if ONE_BLOCK:
        cols = tl.arange(0, BLOCK)
        mask = cols < N
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        dw_acc = tl.zeros([BLOCK], dtype=tl.float32)
        for i in range(0, my_rows):
            row = first_row + i * step
            rstd = tl.load(rstd_ptr + row)
            x_hat = tl.load(x_ptr + row * x_row_stride + cols, mask=mask, other=0.0).to(tl.float32) * rstd
            dy = tl.load(dy_ptr + row * dy_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
            g = dy * w
            mean = tl.sum(g * x_hat, axis=0) / N
            dx = rstd * (g - x_hat * mean)
            if HAS_DSUM:
                dx += tl.load(dsum_ptr + row * N + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(dx_ptr + row * N + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)
            dw_acc += dy * x_hat
        tl.store(partial_row + cols, dw_acc, mask=mask)
    else:
        for start in range(0, N, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            tl.store(partial_row + cols, tl.zeros([BLOCK], dtype=tl.float32), mask=cols < N)
        for i in range(0, my_rows):
            row = first_row + i * step
            rstd = tl.load(rstd_ptr + row)
            dot = tl.zeros([BLOCK], dtype=tl.float32)
            for start in range(0, N, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                mask = cols < N
                x_hat, dy, w = _load_column_block(
                    x_ptr, x_row_stride, dy_ptr, dy_row_stride, w_ptr, row, cols, mask, rstd
                )
                dot += dy * w * x_hat
            mean = tl.sum(dot, axis=0) / N
            for start in range(0, N, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                mask = cols < N
                x_hat, dy, w = _load_column_block(
                    x_ptr, x_row_stride, dy_ptr, dy_row_stride, w_ptr, row, cols, mask, rstd
                )
                dx = rstd * (dy * w - x_hat * mean)
                if HAS_DSUM:
                    dx += tl.load(dsum_ptr + row * N + cols, mask=mask, other=0.0).to(tl.float32)
                tl.store(dx_ptr + row * N + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)
                # Only this program touches its partial row, so read-modify-write is race-free.
                acc = tl.load(partial_row + cols, mask=mask, other=0.0)
                tl.store(partial_row + cols, acc + dy * x_hat, mask=mask)


def rms_norm_forward(x, residual, weight, eps):
    """Launches the forward on [rows, N] views (last dim contiguous); residual may be None.

    Returns (y, sum or None, rstd): y and sum contiguous [rows, N] in x.dtype, rstd fp32 [rows].
    """
    rows, cols = x.shape
    y = torch.empty((rows, cols), dtype=x.dtype, device=x.device)
    total = torch.empty_like(y) if residual is not None else None
    rstd = torch.empty(rows, dtype=torch.float32, device=x.device)
    if rows == 0:
        return y, total, rstd
    block, one_block, num_warps = launch_config(cols)
    res = residual if residual is not None else x
    rms_norm_forward_kernel[(rows,)](
        x, x.stride(0), res, res.stride(0), weight, y, total if total is not None else y, rstd,
        cols, eps,
        HAS_RESIDUAL=residual is not None, BLOCK=block, ONE_BLOCK=one_block, num_warps=num_warps,
    )
    return y, total, rstd


def rms_norm_backward(dy, x, weight, rstd, dsum):
    """Launches the fallback backward on [rows, N] views; dsum (contiguous) may be None.

    Returns (dx contiguous [rows, N] in x.dtype, dw [N] in weight.dtype). dw is reduced in two
    stages: one fp32 partial row per program, then a sum over them in a fixed order.
    """
    rows, cols = x.shape
    dx = torch.empty((rows, cols), dtype=x.dtype, device=x.device)
    grid = backward_programs(x.device, rows)
    partials = torch.empty((grid, cols), dtype=torch.float32, device=x.device)
    if rows == 0:
        return dx, torch.zeros_like(weight)
    block, one_block, num_warps = launch_config(cols)
    rms_norm_backward_kernel[(grid,)](
        dy, dy.stride(0), x, x.stride(0), weight, rstd, dsum if dsum is not None else dx, dx, partials,
        rows, cols,
        HAS_DSUM=dsum is not None, BLOCK=block, ONE_BLOCK=one_block, num_warps=num_warps,
    )
    return dx, partials.sum(dim=0).to(weight.dtype)
