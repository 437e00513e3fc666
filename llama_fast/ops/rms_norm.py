"""rms_norm and add_rms_norm: Triton forward, compiled backward, as torch.library custom ops.

Saved for backward: the normalised input (x, or the sum x + residual, which add_rms_norm returns
anyway), the weight and rstd, one fp32 per row; never the normalised tensor.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from ._common import as_rows, check_float, check_like, check_same_device, compiled_backward, triton_runs_on


def _check(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: Optional[torch.Tensor] = None) -> None:
    check_float("x", x)
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension (the normalised one), got a scalar")
    if residual is not None:
        check_like("x", x, "residual", residual)
    check_float("weight", weight)
    if weight.shape != (x.shape[-1],):
        raise ValueError(
            f"weight must be 1-D of size {x.shape[-1]} (the last dim of x), got shape {tuple(weight.shape)}"
        )
    if weight.dtype not in (torch.float32, x.dtype):
        raise TypeError(f"weight must be float32 or the dtype of x ({x.dtype}), got {weight.dtype}")
    check_same_device("x", x, "weight", weight)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps <= 0:
        raise ValueError(f"eps must be a finite number > 0, got {eps!r}")


def _forward(x: torch.Tensor, residual: Optional[torch.Tensor], weight: torch.Tensor, eps: float):
    """(y, sum or None, rstd): y and sum contiguous in x's shape, rstd fp32 of shape x.shape[:-1]."""
    x2 = as_rows(x)  # (rows, N)
    res2 = as_rows(residual) if residual is not None else None
    if triton_runs_on(x.device):
        from llama_fast.kernels import rms_norm as kernels

        y, total, rstd = kernels.rms_norm_forward(x2, res2, weight, eps)
    else:
        total = x2 + res2 if res2 is not None else None  # rounded to the x dtype, as the reference
        h = (total if total is not None else x2).float()
        rstd = torch.rsqrt(h.square().mean(dim=-1) + eps)  # (rows,)
        y = (h * rstd[:, None] * weight.float()).to(x.dtype)
    total = total.contiguous().view(x.shape) if total is not None else None
    return y.contiguous().view(x.shape), total, rstd.view(x.shape[:-1])


@torch.library.custom_op("llama_fast::rms_norm_forward", mutates_args=())
def rms_norm_forward(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, rstd) for y = x * rstd * weight."""
    y, _, rstd = _forward(x, None, weight, eps)
    return y, rstd


@rms_norm_forward.register_fake
def _(x, weight, eps):
    return x.new_empty(x.shape), x.new_empty(x.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("llama_fast::add_rms_norm_forward", mutates_args=())
def add_rms_norm_forward(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, h, rstd) for h = x + residual, y = h * rstd * weight."""
    y, total, rstd = _forward(x, residual, weight, eps)
    return y, total, rstd


@add_rms_norm_forward.register_fake
def _(x, residual, weight, eps):
    return x.new_empty(x.shape), x.new_empty(x.shape), x.new_empty(x.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("llama_fast::rms_norm_backward_fallback", mutates_args=())
def rms_norm_backward_fallback(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor, dresidual: Optional[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The backward where the extension has no kernel: Triton where it runs, else PyTorch math.

    Same contract as torch.ops.llama_fast.rms_norm_backward: (dx [+ dresidual], dw).
    """
    x2, dy2 = as_rows(x), as_rows(dy)  # (rows, N)
    rstd1 = rstd.reshape(-1)  # (rows,)
    dres = as_rows(dresidual).contiguous() if dresidual is not None else None
    if triton_runs_on(x.device):
        from llama_fast.kernels import rms_norm as kernels

        dx, dw = kernels.rms_norm_backward(dy2, x2, weight, rstd1, dres)
    else:
        x_hat = x2.float() * rstd1[:, None]
        g = dy2.float() * weight.float()
        dx = rstd1[:, None] * (g - x_hat * (g * x_hat).mean(dim=-1, keepdim=True))
        if dres is not None:
            dx = dx + dres.float()
        dx = dx.to(x.dtype)
        dw = (dy2.float() * x_hat).sum(dim=0).to(weight.dtype)
    return dx.contiguous().view(x.shape), dw


@rms_norm_backward_fallback.register_fake
def _(dy, x, weight, rstd, dresidual):
    return x.new_empty(x.shape), torch.empty_like(weight)


def _backward(dy, x, weight, rstd, dresidual, op_name):
    if x.shape[-1] == 0:  # rows of no elements (the forward allows them): empty dx, dw of size 0, as the reference
        return x.new_zeros(x.shape), torch.zeros_like(weight)
    if compiled_backward(op_name, x.device):
        return torch.ops.llama_fast.rms_norm_backward(dy, x, weight, rstd, dresidual)
    return rms_norm_backward_fallback(dy, x, weight, rstd, dresidual)


def _rms_norm_setup(ctx, inputs, output):
    x, weight, _ = inputs
    ctx.save_for_backward(x, weight, output[1])


def _rms_norm_backward(ctx, dy, _drstd):
    x, weight, rstd = ctx.saved_tensors
    dx, dw = _backward(dy, x, weight, rstd, None, "rms_norm")
    return dx, dw, None


rms_norm_forward.register_autograd(_rms_norm_backward, setup_context=_rms_norm_setup)


def _add_rms_norm_setup(ctx, inputs, output):
    ctx.save_for_backward(output[1], inputs[2], output[2])  # the sum h, weight, rstd


def _add_rms_norm_backward(ctx, dy, dsum, _drstd):
    total, weight, rstd = ctx.saved_tensors
    dtotal, dw = _backward(dy, total, weight, rstd, dsum, "add_rms_norm")
    return dtotal, dtotal, dw, None


add_rms_norm_forward.register_autograd(_add_rms_norm_backward, setup_context=_add_rms_norm_setup)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """y = x / sqrt(mean(x^2, -1) + eps) * weight; math in fp32, result in x.dtype.

    x: [..., N] float32/float16/bfloat16, any strides; weight: [N] float32 or x.dtype.
    """
    _check(x, weight, eps)
    return rms_norm_forward(x, weight.contiguous(), float(eps))[0]  # the kernels read weight densely


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual) from one pass; the sum is rounded to its dtype first.

    x and residual of different float dtypes (a bf16 sublayer output under autocast added to an fp32
    residual stream) are promoted as ``x + residual`` would be, and both results take that dtype.
    """
    x, residual = _checked_sum_inputs(x, residual, weight, eps)
    y, total, _ = add_rms_norm_forward(x, residual, weight.contiguous(), float(eps))
    return y, total


def _checked_sum_inputs(x, residual, weight, eps) -> tuple[torch.Tensor, torch.Tensor]:
    """add_rms_norm's inputs checked, x and residual promoted to one dtype as x + residual would be."""
    check_float("x", x)
    check_float("residual", residual)
    if x.dtype != residual.dtype:
        dtype = torch.promote_types(x.dtype, residual.dtype)
        x, residual = x.to(dtype), residual.to(dtype)
    _check(x, weight, eps, residual)
    return x, residual
