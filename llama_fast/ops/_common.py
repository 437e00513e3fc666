"""What the fused ops share: input checks with clear messages, and the choice of implementation.

The rule, in one place:
  * forward: Triton for CUDA tensors, and for CPU tensors when TRITON_INTERPRET=1 (how CI runs the
    Triton kernels); otherwise plain PyTorch math equal to the reference, with the same saved stats;
  * backward: the compiled op torch.ops.llama_fast.*_backward when the extension has a kernel for the
    device; otherwise (after one warning) the Triton backward where Triton can run, else PyTorch math.

The ops import their Triton modules (llama_fast.kernels.*) on first use, not at import: the package
imports where Triton is missing, and TRITON_INTERPRET set after `import llama_fast` still applies.
"""
from __future__ import annotations

import math
import os
import weakref

import torch

from .. import _extension

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def triton_runs_on(device: torch.device) -> bool:
    """Whether the Triton kernels can run on tensors of this device."""
    return device.type == "cuda" or (device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")


def compiled_backward(op: str, device: torch.device) -> bool:
    """True when torch.ops.llama_fast.<op> has a kernel for the device; otherwise warns once."""
    if _extension.has_kernel(device.type):
        return True
    _extension.warn_fallback(op, device.type)
    return False


def as_rows(t: torch.Tensor) -> torch.Tensor:
    """A [rows, N] view of t with a contiguous last dim; copies only when no such view exists."""
    # The row count spelled out: reshape(-1, 0) is ambiguous for a zero-width last dim.
    rows = t.reshape(math.prod(t.shape[:-1]), t.shape[-1]) if t.dim() != 2 else t  # (rows, N)
    return rows if rows.stride(-1) == 1 or rows.shape[-1] <= 1 else rows.contiguous()


def check_float(name: str, t: object) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")


def check_same_device(ref_name: str, ref: torch.Tensor, name: str, t: torch.Tensor) -> None:
    if t.device != ref.device:
        raise ValueError(f"{name} must be on the device of {ref_name} ({ref.device}), got {t.device}")


def check_like(ref_name: str, ref: torch.Tensor, name: str, t: torch.Tensor) -> None:
    """t must be a float tensor with the shape, dtype and device of ref."""
    check_float(name, t)
    if t.shape != ref.shape:
        raise ValueError(f"{name} must have the shape of {ref_name} {tuple(ref.shape)}, got {tuple(t.shape)}")
    if t.dtype != ref.dtype:
        raise TypeError(f"{name} must have the dtype of {ref_name} ({ref.dtype}), got {t.dtype}")
    check_same_device(ref_name, ref, name, t)


class LastCallMemo:
    """The value computed for the last call, reused while the same tensor objects come back unchanged.

    A model passes one mask, one cu_seqlens, ... to every layer; what is derived from them (read to the
    host: a sync) need not be derived per layer. The key: the tensors themselves (weak references: a new
    tensor at a freed one's address is not it), their version counters (an in-place change is a miss)
    and any other hashable facts of the call. None stands for an absent tensor; any other non-tensor
    value, or tracing under torch.compile, computes without memoizing."""

    def __init__(self):
        self._key = None
        self._value = None

    def get(self, tensors: tuple, other, compute):
        if torch.compiler.is_compiling() or any(t is not None and not isinstance(t, torch.Tensor) for t in tensors):
            return compute()
        versions = tuple(None if t is None else t._version for t in tensors)
        if self._key is not None:
            refs, seen_versions, seen_other = self._key
            if seen_versions == versions and seen_other == other and all(
                    (ref is None and t is None) or (ref is not None and ref() is t) for ref, t in zip(refs, tensors)):
                return self._value
        value = compute()
        self._key = (tuple(None if t is None else weakref.ref(t) for t in tensors), versions, other)
        self._value = value
        return value
