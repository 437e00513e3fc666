"""swiglu: Triton forward, compiled backward, as torch.library custom ops.

gate and up may be the two halves of one fused [gate, up] GEMM output (``.chunk(2, -1)`` views with
row stride 2F): the kernels read them in place. Better still, ``swiglu(gate_up)`` takes that output
whole: its gradient is then written as one [..., 2F] tensor, where two views would make autograd
concatenate dgate and dup (an extra read and write of both). Saved for backward: the inputs
themselves (which the GEMM output already holds); silu is recomputed rather than stored.
"""
from __future__ import annotations

import torch

from ._common import as_rows, check_float, check_like, compiled_backward, triton_runs_on


def _check(gate: torch.Tensor, up: torch.Tensor) -> None:
    check_float("gate", gate)
    if gate.dim() == 0:
        raise ValueError("gate must have at least one dimension, got a scalar")
    check_like("gate", gate, "up", up)


@torch.library.custom_op("llama_fast::swiglu_forward", mutates_args=())
def swiglu_forward(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, contiguous, in gate.dtype."""
    gate2, up2 = as_rows(gate), as_rows(up)  # (rows, F), row strides kept
    if triton_runs_on(gate.device):
        from llama_fast.kernels import swiglu as kernels

        y = kernels.swiglu_forward(gate2, up2)
    else:
        y = (torch.nn.functional.silu(gate2.float()) * up2.float()).to(gate.dtype)
    return y.contiguous().view(gate.shape)


@swiglu_forward.register_fake
def _(gate, up):
    return gate.new_empty(gate.shape)


@torch.library.custom_op("llama_fast::swiglu_backward_fallback", mutates_args=())
def swiglu_backward_fallback(
    dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dgate, dup) where the extension has no kernel: Triton where it runs, else PyTorch math."""
    dy2, gate2, up2 = as_rows(dy), as_rows(gate), as_rows(up)  # (rows, F)
    if triton_runs_on(gate.device):
        from llama_fast.kernels import swiglu as kernels

        dgate, dup = kernels.swiglu_backward(dy2, gate2, up2)
    else:
        g, u, d = gate2.float(), up2.float(), dy2.float()
        s = torch.sigmoid(g)
        dgate = (d * u * s * (1 + g * (1 - s))).to(gate.dtype)
        dup = (d * g * s).to(gate.dtype)
    return dgate.contiguous().view(gate.shape), dup.contiguous().view(gate.shape)


@swiglu_backward_fallback.register_fake
def _(dy, gate, up):
    return gate.new_empty(gate.shape), gate.new_empty(gate.shape)


def _setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, dy):
    gate, up = ctx.saved_tensors
    if gate.shape[-1] == 0:  # F = 0 (the forward allows it): empty gradients, as the reference
        return gate.new_zeros(gate.shape), up.new_zeros(up.shape)
    if compiled_backward("swiglu", gate.device):
        return torch.ops.llama_fast.swiglu_backward(dy, gate, up)
    return swiglu_backward_fallback(dy, gate, up)


swiglu_forward.register_autograd(_backward, setup_context=_setup)


@torch.library.custom_op("llama_fast::swiglu_packed_forward", mutates_args=())
def swiglu_packed_forward(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate_up = [gate | up] of last dim 2F; contiguous [..., F]."""
    gate, up = gate_up.chunk(2, dim=-1)  # views, row stride 2F
    return swiglu_forward(gate, up)


@swiglu_packed_forward.register_fake
def _(gate_up):
    return gate_up.new_empty((*gate_up.shape[:-1], gate_up.shape[-1] // 2))


@torch.library.custom_op("llama_fast::swiglu_packed_backward_fallback", mutates_args=())
def swiglu_packed_backward_fallback(dy: torch.Tensor, gate_up: torch.Tensor) -> torch.Tensor:
    """d(gate_up) as one [..., 2F] tensor where the extension has no kernel."""
    gate, up = (as_rows(t) for t in gate_up.chunk(2, dim=-1))  # (rows, F) views
    if triton_runs_on(gate_up.device):
        from llama_fast.kernels import swiglu as kernels

        return kernels.swiglu_backward(as_rows(dy), gate, up, packed=True).view(gate_up.shape)
    dgate, dup = swiglu_backward_fallback(dy, *gate_up.chunk(2, dim=-1))
    return torch.cat((dgate, dup), dim=-1)


@swiglu_packed_backward_fallback.register_fake
def _(dy, gate_up):
    return gate_up.new_empty(gate_up.shape)


def _packed_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _packed_input_grad(dy: torch.Tensor, gate_up: torch.Tensor) -> torch.Tensor:
    """d(gate_up) [..., 2F]: the compiled op where the extension has a kernel, else the fallback."""
    if gate_up.shape[-1] == 0:  # F = 0: an empty gradient, as the reference
        return gate_up.new_zeros(gate_up.shape)
    if compiled_backward("swiglu", gate_up.device):
        return torch.ops.llama_fast.swiglu_packed_backward(dy, gate_up)
    return swiglu_packed_backward_fallback(dy, gate_up)


def _packed_backward(ctx, dy):
    (gate_up,) = ctx.saved_tensors
    return _packed_input_grad(dy, gate_up)


swiglu_packed_forward.register_autograd(_packed_backward, setup_context=_packed_setup)


def swiglu(gate: torch.Tensor, up: torch.Tensor | None = None) -> torch.Tensor:
    """silu(gate) * up; math in fp32, result in gate.dtype. gate, up: [..., F], same dtype, any strides.

    With ``up=None``, ``gate`` is the fused [gate | up] output of one GEMM, [..., 2F].
    """
    if up is None:
        check_float("gate", gate)
        if gate.dim() == 0 or gate.shape[-1] % 2:
            raise ValueError(
                f"gate must be the fused [gate | up] tensor with an even last dim (2F) when up is None, "
                f"got shape {tuple(gate.shape)}"
            )
        return swiglu_packed_forward(gate)
    _check(gate, up)
    return swiglu_forward(gate, up)
