"""torch.compile(fullgraph=True) traces through the fused ops (custom ops with fakes and autograd).

Inductor on the CPU: it compiles the surrounding graph to C++ and calls our ops as opaque kernels,
whose Triton forwards run in the interpreter here. One graph holds all four ops to keep the
compile cost (tens of seconds on a small CPU) paid once.
"""
import torch

from llama_fast import ops, reference


def block(x, residual, w, fused, q, k, cos, sin):
    normed, h = ops.add_rms_norm(x, residual, w, 1e-6)
    gate, up = fused.chunk(2, dim=-1)
    qr, kr = ops.rope(q, k, cos, sin)
    return ops.rms_norm(normed * 2, w, 1e-5), h, ops.swiglu(gate, up), qr, kr


def test_fullgraph_compile_matches_eager():
    torch._dynamo.reset()
    cos, sin = reference.rope_tables(6, 16)
    leaves = [
        torch.randn(2, 6, 32),  # x
        torch.randn(2, 6, 32),  # residual
        torch.rand(32) + 0.5,  # w
        torch.randn(2, 6, 2 * 24),  # fused [gate, up]
        torch.randn(2, 4, 6, 16).transpose(1, 2),  # q as a [B, H, S, D] view
        torch.randn(2, 6, 2, 16),  # k
    ]
    leaves = [t.requires_grad_() for t in leaves]
    compiled = torch.compile(block, fullgraph=True)  # inductor
    got = compiled(*leaves, cos, sin)
    want = block(*leaves, cos, sin)
    upstream = [torch.randn_like(o) for o in want]
    got_grads = torch.autograd.grad(got, leaves, upstream)
    want_grads = torch.autograd.grad(want, leaves, upstream)
    for g, w in zip(list(got) + list(got_grads), list(want) + list(want_grads)):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
