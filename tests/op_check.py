"""Shared checks for the fused-op tests: one op's outputs and gradients against llama_fast.reference.

`check_op` runs the same inputs three ways: through the op under test, through the reference in
fp64 on the CPU (the high-precision oracle) and through the reference in the test dtype (PyTorch's
own low-precision error), then applies the 2x rule of llama_fast.testing to every output and to
the gradient of every differentiable input. Inputs are built from leaf "bases" by a `make_args`
function, so non-contiguous views (slices, transposes, chunks of a fused output) are exercised
and gradients are taken with respect to the bases.
"""
from __future__ import annotations

from typing import Callable, Sequence

import pytest
import torch

from llama_fast.testing import assert_within_2x, default_floor


def _as_tuple(x):
    return x if isinstance(x, tuple) else (x,)


def forward_backward(fn, bases, make_args, grad_outputs, *, to_double=False):
    """(outputs, gradients w.r.t. the bases that require grad) of fn(*make_args(*bases))."""
    leaves = []
    for b in bases:
        leaf = b.detach()
        if to_double:
            leaf = leaf.cpu().double() if leaf.is_floating_point() else leaf.cpu()
        leaves.append(leaf.requires_grad_(b.requires_grad))
    outs = _as_tuple(fn(*make_args(*leaves)))
    wrt = [leaf for leaf in leaves if leaf.requires_grad]
    gouts = [g.to(device=o.device, dtype=o.dtype) for g, o in zip(grad_outputs, outs)]
    grads = torch.autograd.grad(outs, wrt, gouts) if wrt else ()
    return [o.detach() for o in outs], list(grads)


def check_op(
    op: Callable,
    ref: Callable,
    bases: Sequence[torch.Tensor],
    make_args: Callable,
    *,
    out_names: Sequence[str],
    grad_names: Sequence[str],
) -> None:
    """2x-rule check of op against ref for every output and every gradient.

    bases: leaf tensors (those with requires_grad=True get gradients, named by grad_names in order).
    """
    with torch.no_grad():
        shapes = [o.shape for o in _as_tuple(ref(*make_args(*bases)))]
    device = bases[0].device
    upstream = [torch.randn(shape, device=device) for shape in shapes]  # fresh, never zeros
    outs, grads = forward_backward(op, bases, make_args, upstream)
    hi_outs, hi_grads = forward_backward(ref, bases, make_args, upstream, to_double=True)
    lo_outs, lo_grads = forward_backward(ref, bases, make_args, upstream)
    assert len(outs) == len(out_names) and len(grads) == len(grad_names)
    dtype = bases[0].dtype
    floor = default_floor(dtype)
    for name, o, hi, lo in zip(out_names, outs, hi_outs, lo_outs):
        assert o.dtype == lo.dtype, f"{name}: dtype {o.dtype}, reference gives {lo.dtype}"
        assert_within_2x(name, o.cpu(), hi, lo.cpu(), floor=floor)
    for name, g, hi, lo in zip(grad_names, grads, hi_grads, lo_grads):
        assert g.dtype == lo.dtype, f"{name}: dtype {g.dtype}, reference gives {lo.dtype}"
        assert_within_2x(name, g.cpu(), hi, lo.cpu(), floor=floor)


@pytest.fixture
def poison_empty(monkeypatch):
    """Makes torch.empty / torch.empty_like return NaN-filled float tensors, so an element a kernel
    forgets to write shows up as a non-finite value in the checks."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poisoned(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poisoned(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poisoned(real_empty_like(*a, **k)))
    if torch.cuda.is_available():
        # The caching allocator hands freed blocks back out: leave NaNs in them for the C++ ops too,
        # in both of its pools (allocations up to 1 MiB are carved from 2 MiB segments of a small
        # pool, larger ones from a large pool), after returning whatever it cached unpoisoned.
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        small = [torch.full((2**18,), float("nan"), device="cuda") for _ in range(8)]  # 1 MiB each
        large = torch.full((64 * 2**20,), float("nan"), device="cuda")
        del small, large
    yield


@pytest.fixture
def fallback_backward(monkeypatch):
    """Pretends the extension has no kernels, so the Triton (or PyTorch) backward runs; resets the
    warn-once memory so each test sees its warning."""
    import llama_fast._extension as ext

    monkeypatch.setattr(ext, "has_kernel", lambda device_type: False)
    monkeypatch.setattr(ext, "_warned", set())
    yield
