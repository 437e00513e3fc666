"""SwiGLU forward and backward, 16384 x 11008 bf16: ours, eager reference, compiled reference, Liger.

Bytes: forward reads gate and up and writes y (3 * rows * F * 2 B); backward reads dy, gate, up
and writes dgate, dup (5 * rows * F * 2 B).
"""
import pytest
import torch
from common import bench_backward, bench_forward, compiled, liger, requires_cuda

from llama_fast import ops, reference

pytestmark = requires_cuda

ROWS, F, DTYPE = 16384, 11008, torch.bfloat16
PROVIDERS = ["ours", "torch_eager", "torch_compile", "liger"]


def provider_fn(name):
    if name == "ours":
        return ops.swiglu
    if name == "torch_eager":
        return reference.swiglu
    if name == "torch_compile":
        return compiled(reference.swiglu)
    sw = liger("ops.swiglu")
    return lambda g, u: sw.LigerSiLUMulFunction.apply(g, u)


def make_inputs():
    gate = (torch.randn(ROWS, F, device="cuda") * 3).to(DTYPE).requires_grad_()
    up = torch.randn(ROWS, F, device="cuda", dtype=DTYPE).requires_grad_()
    return gate, up, torch.randn(ROWS, F, device="cuda", dtype=DTYPE)


@pytest.mark.benchmark(group="swiglu forward 16384x11008 bf16")
@pytest.mark.parametrize("provider", PROVIDERS)
def test_forward(benchmark, provider):
    gate, up, dy = make_inputs()
    bench_forward(
        benchmark, provider_fn(provider), reference.swiglu, (gate, up), (dy,), names=["y"],
        strict=provider != "liger", bytes=3 * gate.numel() * gate.element_size(),
        formula="read gate, up + write y = 3 * rows * F * 2 B",
    )


@pytest.mark.benchmark(group="swiglu backward 16384x11008 bf16")
@pytest.mark.parametrize("provider", PROVIDERS)
def test_backward(benchmark, provider):
    gate, up, dy = make_inputs()
    bench_backward(
        benchmark, provider_fn(provider), reference.swiglu, (gate, up), (dy,), names=["dgate", "dup"],
        strict=provider != "liger", bytes=5 * gate.numel() * gate.element_size(),
        formula="read dy, gate, up + write dgate, dup = 5 * rows * F * 2 B",
    )
