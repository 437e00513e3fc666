"""Selective recompute: a cheap op and the GEMM that consumes its output, as one autograd function.

    out = rms_norm_linear(x, norm_weight, weight, eps)                 # linear(rms_norm(x))
    out, h = add_rms_norm_linear(x, residual, norm_weight, weight, eps) # linear(rms_norm(x + residual)), x + residual
    out = swiglu_linear(gate_up, weight)                               # linear(swiglu([gate | up]))

The paper's rule, "save the expensive activations, recompute the cheap ones": the output of a
normalisation or of SwiGLU is needed in the backward only as the GEMM's input, for the weight
gradient dW = dout^T y. Composed from separate ops, autograd keeps y alive from the forward to the
backward: per token and layer 2 d (the normed block input) + 2 d (the normed h) + F (the SwiGLU
output) activations. Here y is freed as soon as the GEMM has consumed it and recomputed in the
backward from what is saved anyway (x, the sum h, gate_up), by the same forward op that made it
(llama_fast.ops' Triton kernel, or its PyTorch fallback), so the recomputed y is bitwise the
forward's. The backward then runs:

    y      = op(inputs)                       (recomputed; rms_norm also gives rstd again)
    dW     = dout^T y                         (GEMM in the activation dtype, as nn.Linear)
    dy     = dout W
    dinput = op's own backward(dy, ...)       (torch.ops.llama_fast.* or its fallback)

and drops y. Saved: the op's inputs and the two weights (no rstd: recomputing y yields it).
The backward is once-differentiable: a second derivative raises instead of coming out wrong.

Dtypes: as F.linear. Without autocast the GEMM runs in the activation dtype and the weight must
have it (bf16 parameters, or FSDP's bf16 param_dtype). Under autocast the GEMM runs in the
autocast dtype, the weight and y are cast to it, the output has it, and the gradients come back in
the dtypes of the inputs (as autocast's casts would return them).

Why torch.autograd.Function and not torch.library custom ops: each function is a composition of
ops that are already custom ops with fake implementations (the norm and SwiGLU forwards and
backwards) and of aten matmuls. Dynamo traces an autograd.Function's forward and backward into the
graph (torch.compile(fullgraph=True) works), so the GEMMs stay visible to the compiler and every
piece keeps its existing fake; an opaque custom op would hide the GEMMs and need new fakes and
opchecks for no gain.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from ._common import check_float, check_same_device
from .rms_norm import _backward as _norm_backward
from .rms_norm import _checked_sum_inputs
from .rms_norm import _check as _check_norm
from .rms_norm import add_rms_norm_forward, rms_norm_forward
from .swiglu import _packed_input_grad, swiglu_packed_forward


def _check_weight(name: str, weight: torch.Tensor, in_features: int, y_name: str, y: torch.Tensor) -> None:
    check_float(name, weight)
    if weight.dim() != 2 or weight.shape[1] != in_features:
        raise ValueError(
            f"{name} must be [out_features, {in_features}] (the last dim of {y_name}), got shape {tuple(weight.shape)}"
        )
    check_same_device(y_name, y, name, weight)


def _gemm_dtype(y: torch.Tensor, weight: torch.Tensor, weight_name: str) -> torch.dtype:
    """The dtype F.linear would multiply in: autocast's where it is on, else the activation dtype
    (which the weight must share, as F.linear demands)."""
    device_type = y.device.type
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    if weight.dtype != y.dtype:
        raise TypeError(
            f"{weight_name} must have the activation dtype {y.dtype} (or run under autocast), got {weight.dtype}"
        )
    return y.dtype


def _linear_backward(dout, y, weight, gemm_dtype):
    """(dy, dweight) of out = y @ weight^T: dW = dout^T y, dy = dout W, GEMMs in gemm_dtype."""
    y_c, w_c = y.to(gemm_dtype), weight.to(gemm_dtype)
    dout2 = dout.reshape(-1, dout.shape[-1])  # (rows, out)
    dweight = (dout2.t() @ y_c.reshape(-1, y.shape[-1])).to(weight.dtype)  # (out, in)
    dy = (dout @ w_c).to(y.dtype)  # (..., in)
    return dy, dweight


class _RMSNormLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, norm_weight, weight, eps, gemm_dtype):
        y, _ = rms_norm_forward(x, norm_weight, eps)
        ctx.save_for_backward(x, norm_weight, weight)
        ctx.eps, ctx.gemm_dtype = eps, gemm_dtype
        return F.linear(y.to(gemm_dtype), weight.to(gemm_dtype))  # y dies here

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        x, norm_weight, weight = ctx.saved_tensors
        y, rstd = rms_norm_forward(x, norm_weight, ctx.eps)  # bitwise the forward's y
        dy, dweight = _linear_backward(dout, y, weight, ctx.gemm_dtype)
        del y
        dx, dnorm_weight = _norm_backward(dy, x, norm_weight, rstd, None, "rms_norm")
        return dx, dnorm_weight, dweight, None, None


class _AddRMSNormLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, residual, norm_weight, weight, eps, gemm_dtype):
        y, h, _ = add_rms_norm_forward(x, residual, norm_weight, eps)
        ctx.save_for_backward(h, norm_weight, weight)  # h is returned: saving it costs nothing more
        ctx.eps, ctx.gemm_dtype = eps, gemm_dtype
        return F.linear(y.to(gemm_dtype), weight.to(gemm_dtype)), h

    @staticmethod
    @once_differentiable
    def backward(ctx, dout, dh):
        h, norm_weight, weight = ctx.saved_tensors
        # rms_norm of the stored sum is add_rms_norm's y bit for bit: its kernel normalises the sum
        # after rounding it to the dtype, the very values it stored as h.
        y, rstd = rms_norm_forward(h, norm_weight, ctx.eps)
        dy, dweight = _linear_backward(dout, y, weight, ctx.gemm_dtype)
        del y
        dh_total, dnorm_weight = _norm_backward(dy, h, norm_weight, rstd, dh, "add_rms_norm")
        return dh_total, dh_total, dnorm_weight, dweight, None, None


class _SwiGLULinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate_up, weight, gemm_dtype):
        y = swiglu_packed_forward(gate_up)
        ctx.save_for_backward(gate_up, weight)
        ctx.gemm_dtype = gemm_dtype
        return F.linear(y.to(gemm_dtype), weight.to(gemm_dtype))

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        gate_up, weight = ctx.saved_tensors
        y = swiglu_packed_forward(gate_up)
        dy, dweight = _linear_backward(dout, y, weight, ctx.gemm_dtype)
        del y
        return _packed_input_grad(dy, gate_up), dweight, None


def rms_norm_linear(
    x: torch.Tensor, norm_weight: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6
) -> torch.Tensor:
    """F.linear(rms_norm(x, norm_weight, eps), weight), keeping only x for the backward.

    x: [..., N]; norm_weight: [N] (fp32 or x.dtype); weight: [out, N]. Returns [..., out].
    """
    _check_norm(x, norm_weight, eps)
    _check_weight("weight", weight, x.shape[-1], "x", x)
    return _RMSNormLinear.apply(x, norm_weight.contiguous(), weight, float(eps), _gemm_dtype(x, weight, "weight"))


def add_rms_norm_linear(
    x: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """(F.linear(normed, weight), h) for (normed, h) = add_rms_norm(x, residual, norm_weight, eps),
    keeping only h for the backward. Mixed float dtypes of x and residual are promoted as in
    add_rms_norm."""
    x, residual = _checked_sum_inputs(x, residual, norm_weight, eps)
    _check_weight("weight", weight, x.shape[-1], "x", x)
    return _AddRMSNormLinear.apply(
        x, residual, norm_weight.contiguous(), weight, float(eps), _gemm_dtype(x, weight, "weight")
    )


def swiglu_linear(gate_up: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """F.linear(swiglu(gate_up), weight) for the fused [gate | up] tensor gate_up [..., 2F] and
    weight [out, F], keeping only gate_up for the backward."""
    check_float("gate_up", gate_up)
    if gate_up.dim() == 0 or gate_up.shape[-1] % 2:
        raise ValueError(
            f"gate_up must be the fused [gate | up] tensor with an even last dim (2F), got shape {tuple(gate_up.shape)}"
        )
    _check_weight("weight", weight, gate_up.shape[-1] // 2, "swiglu(gate_up)", gate_up)
    return _SwiGLULinear.apply(gate_up, weight, _gemm_dtype(gate_up, weight, "weight"))
