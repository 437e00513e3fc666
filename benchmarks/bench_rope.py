"""RoPE of q and k, B=4 H=32 S=4096 D=128 bf16, forward and backward: ours, eager reference,
compiled reference, Liger.

The tensors live as [B, H, S, D] (Hugging Face's layout); ours and the reference take them as
[B, S, H, D] transposed views, without a copy. Bytes: read and write q and k
(2 * (q.numel + k.numel) * 2 B), forward and backward alike.
"""
import pytest
import torch
from common import compiled, liger, record, requires_cuda, validate

from llama_fast import ops, reference

pytestmark = requires_cuda

B, H, S, D, DTYPE = 4, 32, 4096, 128, torch.bfloat16
PROVIDERS = ["ours", "torch_eager", "torch_compile", "liger"]


def provider_fn(name, cos, sin):
    """A function of [B, H, S, D] q, k returning rotated [B, S, H, D] tensors (views are fine)."""
    if name in ("ours", "torch_eager", "torch_compile"):
        op = {"ours": ops.rope, "torch_eager": reference.rope, "torch_compile": compiled(reference.rope)}[name]
        return lambda q, k: op(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
    rope = liger("ops.rope")
    cos_full, sin_full = torch.cat((cos, cos), -1)[None], torch.cat((sin, sin), -1)[None]  # (1, S, D)

    def run(q, k):
        qo, ko = rope.LigerRopeFunction.apply(q, k, cos_full, sin_full)
        return qo.transpose(1, 2), ko.transpose(1, 2)

    return run


def make_inputs():
    q = torch.randn(B, H, S, D, device="cuda", dtype=DTYPE).requires_grad_()
    k = torch.randn(B, H, S, D, device="cuda", dtype=DTYPE).requires_grad_()
    grads = (torch.randn(B, S, H, D, device="cuda", dtype=DTYPE), torch.randn(B, S, H, D, device="cuda", dtype=DTYPE))
    return q, k, grads


def reference_grads(q, k, grads, cos, sin, dtype):
    """(q_out, k_out, dq, dk) through the reference in dtype; q_out, k_out [B, S, H, D], dq, dk [B, H, S, D]."""
    q = q.detach().to(dtype).requires_grad_()
    k = k.detach().to(dtype).requires_grad_()
    qo, ko = reference.rope(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
    dq, dk = torch.autograd.grad((qo, ko), (q, k), tuple(g.to(dtype) for g in grads))
    return qo.detach(), ko.detach(), dq, dk


@pytest.mark.benchmark(group="rope forward q+k 4x32x4096x128 bf16")
@pytest.mark.parametrize("provider", PROVIDERS)
def test_forward(benchmark, provider):
    cos, sin = reference.rope_tables(S, D, device="cuda")
    fn = provider_fn(provider, cos, sin)
    q, k, grads = make_inputs()
    hi, lo = reference_grads(q, k, grads, cos, sin, torch.float32), reference_grads(q, k, grads, cos, sin, DTYPE)
    with torch.no_grad():
        qo, ko = fn(q, k)
        validate("q", qo, hi[0], lo[0], strict=provider != "liger")
        validate("k", ko, hi[1], lo[1], strict=provider != "liger")
        record(
            benchmark, lambda: fn(q, k), bytes=2 * (q.numel() + k.numel()) * q.element_size(),
            formula="read + write q and k = 2 * (q.numel + k.numel) * 2 B",
        )


@pytest.mark.benchmark(group="rope backward q+k 4x32x4096x128 bf16")
@pytest.mark.parametrize("provider", PROVIDERS)
def test_backward(benchmark, provider):
    cos, sin = reference.rope_tables(S, D, device="cuda")
    fn = provider_fn(provider, cos, sin)
    q, k, grads = make_inputs()
    hi, lo = reference_grads(q, k, grads, cos, sin, torch.float32), reference_grads(q, k, grads, cos, sin, DTYPE)
    outs = fn(q, k)
    dq, dk = torch.autograd.grad(outs, (q, k), grads, retain_graph=True)
    validate("dq", dq, hi[2], lo[2], strict=provider != "liger")
    validate("dk", dk, hi[3], lo[3], strict=provider != "liger")
    record(
        benchmark, lambda: torch.autograd.grad(outs, (q, k), grads, retain_graph=True),
        bytes=2 * (q.numel() + k.numel()) * q.element_size(),
        formula="read + write dq and dk = 2 * (q.numel + k.numel) * 2 B",
    )
