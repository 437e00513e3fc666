"""RMSNorm forward and backward, 16384 x 4096 bf16: ours, eager reference, compiled reference, Liger.

Bytes: forward reads x and writes y (2 * rows * cols * 2 B); backward reads x and dy and writes dx
(3 * rows * cols * 2 B). The weight, its gradient and rstd are a rounding error at this size.
"""

import pytest
import torch
from common import compiled, liger, record, requires_cuda, validate

from llama_fast import ops, reference

pytestmark = requires_cuda

ROWS, COLS, DTYPE, EPS = 16384, 4096, torch.bfloat16, 1e-6
PROVIDERS = ["ours", "torch_eager", "torch_compile", "liger"]


def provider_fn(name):
    if name == "ours":
        return lambda x, w: ops.rms_norm(x, w, EPS)
    if name == "torch_eager":
        return lambda x, w: reference.rms_norm(x, w, EPS)
    if name == "torch_compile":
        return lambda x, w: compiled(reference.rms_norm)(x, w, EPS)
    rms = liger("ops.rms_norm")
    return lambda x, w: rms.LigerRMSNormFunction.apply(x, w, EPS)


def make_inputs():
    x = torch.randn(ROWS, COLS, device="cuda", dtype=DTYPE).requires_grad_()
    w = (torch.rand(COLS, device="cuda") + 0.5).to(DTYPE).requires_grad_()
    return x, w, torch.randn(ROWS, COLS, device="cuda", dtype=DTYPE)


def reference_grads(x, w, dy, dtype):
    x = x.detach().to(dtype).requires_grad_()
    w = w.detach().to(dtype).requires_grad_()
    y = reference.rms_norm(x, w, EPS)
    return (y.detach(), *torch.autograd.grad(y, (x, w), dy.to(dtype)))


@pytest.mark.benchmark(group="rms_norm forward 16384x4096 bf16")
@pytest.mark.parametrize("provider", PROVIDERS)
def test_forward(benchmark, provider):
    fn = provider_fn(provider)
    x, w, dy = make_inputs()
    hi, lo = reference_grads(x, w, dy, torch.float32)[0], reference_grads(x, w, dy, DTYPE)[0]
    with torch.no_grad():
        validate("y", fn(x, w), hi, lo, strict=provider != "liger")
        record(
            benchmark, lambda: fn(x, w), bytes=2 * x.numel() * x.element_size(),
            formula="read x + write y = 2 * rows * cols * 2 B",
        )


@pytest.mark.benchmark(group="rms_norm backward 16384x4096 bf16")
@pytest.mark.parametrize("provider", PROVIDERS)
def test_backward(benchmark, provider):
    fn = provider_fn(provider)
    x, w, dy = make_inputs()
    hi, lo = reference_grads(x, w, dy, torch.float32), reference_grads(x, w, dy, DTYPE)
    y = fn(x, w)
    dx, dw = torch.autograd.grad(y, (x, w), dy, retain_graph=True)
    strict = provider != "liger"
    validate("dx", dx, hi[1], lo[1], strict=strict)
    validate("dw", dw, hi[2], lo[2], strict=strict)
    record(
        benchmark, lambda: torch.autograd.grad(y, (x, w), dy, retain_graph=True),
        bytes=3 * x.numel() * x.element_size(), formula="read x, dy + write dx = 3 * rows * cols * 2 B",
    )
