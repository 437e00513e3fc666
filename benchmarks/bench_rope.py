"""RoPE of q and k, B=4 H=32 S=4096 D=128 bf16, forward and backward: ours, eager reference,
compiled reference, Liger.

The providers see q and k as Hugging Face's attention does: [B, H, S, D] views (transpose(1, 2))
of the [B, S, H, D] projection outputs. Ours and the reference take them transposed back, as
[B, S, H, D] (contiguous again); Liger takes the [B, H, S, D] views, which it turns back to their
contiguous storage without a copy (and rotates in place). A [B, H, S, D]-contiguous storage would
instead charge Liger a copy of q and k that it never makes in a model. Bytes: read and write q and k
(2 * (q.numel + k.numel) * 2 B), forward and backward alike.
"""
import pytest
import torch
from common import bench_backward, bench_forward, compiled, liger, requires_cuda

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


def make_inputs(device="cuda"):
    """q, k: [B, H, S, D] views of [B, S, H, D] storage (leaves, requiring grad); upstream gradients
    of the [B, S, H, D] outputs."""
    q = torch.randn(B, S, H, D, device=device, dtype=DTYPE).transpose(1, 2).requires_grad_()
    k = torch.randn(B, S, H, D, device=device, dtype=DTYPE).transpose(1, 2).requires_grad_()
    grads = (torch.randn(B, S, H, D, device=device, dtype=DTYPE), torch.randn(B, S, H, D, device=device, dtype=DTYPE))
    return q, k, grads


def reference_fn(cos, sin):
    """The reference on [B, H, S, D] q, k, as the providers take them."""
    return lambda q, k: reference.rope(q.transpose(1, 2), k.transpose(1, 2), cos, sin)


BYTES = 2 * (2 * B * H * S * D) * 2  # read + write q and k, bf16


@pytest.mark.benchmark(group="rope forward q+k 4x32x4096x128 bf16")
@pytest.mark.parametrize("provider", PROVIDERS)
def test_forward(benchmark, provider):
    cos, sin = reference.rope_tables(S, D, device="cuda")
    q, k, grads = make_inputs()
    bench_forward(
        benchmark, provider_fn(provider, cos, sin), reference_fn(cos, sin), (q, k), grads, names=["q", "k"],
        strict=provider != "liger", bytes=BYTES, formula="read + write q and k = 2 * (q.numel + k.numel) * 2 B",
    )


@pytest.mark.benchmark(group="rope backward q+k 4x32x4096x128 bf16")
@pytest.mark.parametrize("provider", PROVIDERS)
def test_backward(benchmark, provider):
    cos, sin = reference.rope_tables(S, D, device="cuda")
    q, k, grads = make_inputs()
    bench_backward(
        benchmark, provider_fn(provider, cos, sin), reference_fn(cos, sin), (q, k), grads, names=["dq", "dk"],
        strict=provider != "liger", bytes=BYTES, formula="read + write dq and dk = 2 * (q.numel + k.numel) * 2 B",
    )
