"""RMSNorm forward and backward, 16384 x 4096 bf16: ours, eager reference, compiled reference, Liger.

Bytes: forward reads x and writes y (2 * rows * cols * 2 B); backward reads x and dy and writes dx
(3 * rows * cols * 2 B). The weight, its gradient and rstd are a rounding error at this size.
"""

import pytest
import torch
from common import bench_backward, bench_forward, compiled, liger, requires_cuda

from llama_fast import ops
from llama_fast import reference as ref

pytestmark = requires_cuda

ROWS, COLS, DTYPE, EPS = 16384, 4096, torch.bfloat16, 1e-6
PROVIDERS = ["ours", "torch_eager", "torch_compile", "liger"]


def provider_fn(name):
    if name == "ours":
        return lambda x, w: ops.rms_norm(x, w, EPS)
    if name == "torch_eager":
        return lambda x, w: ref.rms_norm(x, w, EPS)
    if name == "torch_compile":
        return lambda x, w: compiled(ref.rms_norm)(x, w, EPS)
    rms = liger("ops.rms_norm")
    return lambda x, w: rms.LigerRMSNormFunction.apply(x, w, EPS)


def make_inputs():
    x = torch.randn(ROWS, COLS, device="cuda", dtype=DTYPE).requires_grad_()
    w = (torch.rand(COLS, device="cuda") + 0.5).to(DTYPE).requires_grad_()
    return x, w, torch.randn(ROWS, COLS, device="cuda", dtype=DTYPE)


def reference(x, w):
    return ref.rms_norm(x, w, EPS)


@pytest.mark.benchmark(group="rms_norm forward 16384x4096 bf16")
@pytest.mark.parametrize("provider", PROVIDERS)
def test_forward(benchmark, provider):
    x, w, dy = make_inputs()
    bench_forward(
        benchmark, provider_fn(provider), reference, (x, w), (dy,), names=["y"], strict=provider != "liger",
        bytes=2 * x.numel() * x.element_size(), formula="read x + write y = 2 * rows * cols * 2 B",
    )


@pytest.mark.benchmark(group="rms_norm backward 16384x4096 bf16")
@pytest.mark.parametrize("provider", PROVIDERS)
def test_backward(benchmark, provider):
    x, w, dy = make_inputs()
    bench_backward(
        benchmark, provider_fn(provider), reference, (x, w), (dy,), names=["dx", "dw"], strict=provider != "liger",
        bytes=3 * x.numel() * x.element_size(), formula="read x, dy + write dx = 3 * rows * cols * 2 B",
    )
