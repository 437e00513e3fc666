"""Causal attention with RoPE, bf16: forward and backward TFLOP/s, ours against the reference and
torch's scaled_dot_product_attention backends (flash, cuDNN, efficient).

FLOPs (causal): forward 4 * B * H * S^2 * D / 2; backward 2.5x the forward. RoPE is part of every
provider's time: ours rotates inside the kernel; the others rotate q and k first
(llama_fast.ops.rope, or torch.compile of reference.rope) and then call their attention.

Providers, forward: llama_fast (Triton), reference, sdpa-flash, sdpa-cudnn, sdpa-efficient.
Backward: llama_fast-cuda (csrc, the sm_80 kernel, dQ with atomics), llama_fast-cuda-deterministic,
llama_fast-cuda-sm90 and llama_fast-cuda-sm90-deterministic (the opt-in Hopper kernel,
LLAMA_FAST_ATTENTION_BACKWARD=sm90; skipped where it cannot run), llama_fast-triton, reference, and the
SDPA backends (autograd through RoPE + SDPA; the forward is not timed).

Before timing, each provider's result on the first batch element and four heads is checked against
the reference with the 2x rule (fp32 reference as high, the bf16 reference as low). The reference
provider is timed only up to S = 4096 (its S^2 score matrices would not fit beyond).
"""
from __future__ import annotations

import os

import pytest
import torch
from common import record

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="timing attention needs a CUDA device")

DTYPE = torch.bfloat16
# (B, H, S, D): B * S = 16384 tokens per shape.
SHAPES = [(8, 32, 2048, 128), (4, 32, 4096, 128), (2, 32, 8192, 128), (8, 32, 2048, 64), (4, 32, 4096, 64),
          (2, 32, 8192, 64)]
SDPA_BACKENDS = {"sdpa-flash": "FLASH_ATTENTION", "sdpa-cudnn": "CUDNN_ATTENTION", "sdpa-efficient": "EFFICIENT_ATTENTION"}
FORWARD_PROVIDERS = ["llama_fast", "reference", *SDPA_BACKENDS]
BACKWARD_PROVIDERS = ["llama_fast-cuda", "llama_fast-cuda-deterministic", "llama_fast-cuda-sm90",
                      "llama_fast-cuda-sm90-deterministic", "llama_fast-triton", "reference", *SDPA_BACKENDS]
REFERENCE_MAX_SEQ = 4096
CHECK_HEADS = 4


# ------------------------------------------------------------------------------------------------
# Providers
# ------------------------------------------------------------------------------------------------
def make_inputs(B, H, S, D):
    from llama_fast import reference

    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(B, S, H, D, device="cuda", dtype=DTYPE, generator=gen) for _ in range(3))
    cos, sin = reference.rope_tables(S, D, device="cuda")
    return q, k, v, cos, sin


_rope_fn = None


def rope_then(q, k, cos, sin):
    """Rotates q and k before an SDPA call: llama_fast.ops.rope (one Triton launch) where this build
    has it, else torch.compile of reference.rope."""
    global _rope_fn
    if _rope_fn is None:
        from llama_fast import ops, reference

        _rope_fn = getattr(ops, "rope", None) or torch.compile(reference.rope)
    return _rope_fn(q, k, cos, sin)


def forward_fn(provider, q, k, v, cos, sin):
    """A zero-argument callable computing O [B, S, H, D] for the provider."""
    from llama_fast import reference
    from llama_fast.ops import attention

    if provider == "llama_fast":
        return lambda: attention(q, k, v, cos, sin)
    if provider == "reference":
        return lambda: reference.attention(q, k, v, cos, sin)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = getattr(SDPBackend, SDPA_BACKENDS[provider])

    def run():
        qr, kr = rope_then(q, k, cos, sin)
        with sdpa_kernel(backend):
            out = torch.nn.functional.scaled_dot_product_attention(
                qr.transpose(1, 2), kr.transpose(1, 2), v.transpose(1, 2), is_causal=True
            )
        return out.transpose(1, 2)  # (B, S, H, D)

    return run


def check_forward(provider, q, k, v, cos, sin):
    from llama_fast import reference
    from llama_fast.testing import assert_within_2x

    q, k, v = (t[:1, :, :CHECK_HEADS] for t in (q, k, v))
    got = forward_fn(provider, q, k, v, cos, sin)()
    high = reference.attention(q.float(), k.float(), v.float(), cos, sin)
    low = reference.attention(q, k, v, cos, sin)
    assert_within_2x(f"{provider} forward", got.float(), high, low.float(), floor=1.6e-2)


def backward_fn(provider, q, k, v, cos, sin, dout):
    """A zero-argument callable computing (dq, dk, dv) for the provider, forward excluded."""
    from llama_fast import reference
    from llama_fast.kernels.attention import attention_backward as triton_backward
    from llama_fast.ops.attention import _attention_op

    if provider.startswith("llama_fast"):
        out, stats = _attention_op(q, k, v, cos, sin, True, False)  # O and the row statistics it saves
        if provider == "llama_fast-triton":
            return lambda: triton_backward(dout, q, k, v, out, stats, cos, sin, True)
        deterministic = provider.endswith("deterministic")
        kernel = "sm90" if provider.startswith("llama_fast-cuda-sm90") else "sm80"

        def run():
            # csrc/bindings.cpp reads the variable at every call: sm90 picks the Hopper kernel
            previous = os.environ.get("LLAMA_FAST_ATTENTION_BACKWARD")
            os.environ["LLAMA_FAST_ATTENTION_BACKWARD"] = kernel
            try:
                return torch.ops.llama_fast.attention_backward(dout, q, k, v, out, stats, cos, sin, True, deterministic)
            finally:
                if previous is None:
                    del os.environ["LLAMA_FAST_ATTENTION_BACKWARD"]
                else:
                    os.environ["LLAMA_FAST_ATTENTION_BACKWARD"] = previous

        return run
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    if provider == "reference":
        out = reference.attention(*leaves, cos, sin)
    else:
        out = forward_fn(provider, *leaves, cos, sin)()
    return lambda: torch.autograd.grad(out, leaves, dout, retain_graph=True)


def check_backward(provider, q, k, v, cos, sin, dout):
    from llama_fast import reference
    from llama_fast.testing import assert_within_2x, default_floor

    q, k, v, dout = (t[:1, :, :CHECK_HEADS].contiguous() for t in (q, k, v, dout))
    got = backward_fn(provider, q, k, v, cos, sin, dout)()
    refs = {}
    for dtype in (torch.float32, DTYPE):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        refs[dtype] = torch.autograd.grad(reference.attention(*leaves, cos, sin), leaves, dout.to(dtype))
    # The default bf16 floor, as tests/test_attention.py uses: the kernels' bf16 operands (P and dS
    # rounded before their matmuls) stay within it at S = 8192 (an fp32 emulation of those roundings
    # errs by 0.010 against a bound of 0.037), while a floor growing with S (1.45 at S = 8192, where
    # the median |dq| is 0.02) would pass gradients that are off by far more than rounding.
    for name, a, hi, lo in zip(("dq", "dk", "dv"), got, refs[torch.float32], refs[DTYPE]):
        assert_within_2x(f"{provider} {name}", a.float(), hi, lo.float(), floor=default_floor(DTYPE))


def _skip_unavailable(provider, S):
    import llama_fast._extension as ext

    if provider == "reference" and S > REFERENCE_MAX_SEQ:
        pytest.skip(f"the reference's S^2 score matrices do not fit beyond S={REFERENCE_MAX_SEQ}")
    if provider.startswith("llama_fast-cuda") and not ext.WITH_CUDA:
        pytest.skip("llama_fast._C was built without CUDA kernels")
    if provider.startswith("llama_fast-cuda-sm90") and not ext._C.attention_backward_sm90_available():
        pytest.skip("the sm_90a attention backward needs an sm_90 GPU and a build with sm_90a code")


def flops_forward(B, H, S, D) -> float:
    return 4 * B * H * S * S * D / 2


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}_H{}_S{}_D{}".format(*s))
@pytest.mark.parametrize("provider", FORWARD_PROVIDERS)
def test_attention_forward(benchmark, provider, shape):
    B, H, S, D = shape
    _skip_unavailable(provider, S)
    benchmark.group = f"attention-forward-{'B{}_H{}_S{}_D{}'.format(*shape)}"
    q, k, v, cos, sin = make_inputs(B, H, S, D)
    try:
        check_forward(provider, q, k, v, cos, sin)
    except RuntimeError as exc:  # an SDPA backend that does not support this shape / GPU
        if provider.startswith("sdpa"):
            pytest.skip(f"{provider} unavailable: {exc}")
        raise
    fn = forward_fn(provider, q, k, v, cos, sin)
    record(benchmark, fn, flops=flops_forward(B, H, S, D), formula="4*B*H*S^2*D/2 (causal), RoPE included",
           warmup=3, reps=10)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}_H{}_S{}_D{}".format(*s))
@pytest.mark.parametrize("provider", BACKWARD_PROVIDERS)
def test_attention_backward(benchmark, provider, shape):
    B, H, S, D = shape
    _skip_unavailable(provider, S)
    benchmark.group = f"attention-backward-{'B{}_H{}_S{}_D{}'.format(*shape)}"
    q, k, v, cos, sin = make_inputs(B, H, S, D)
    dout = torch.randn_like(q)
    try:
        check_backward(provider, q, k, v, cos, sin, dout)
    except RuntimeError as exc:
        if provider.startswith("sdpa"):
            pytest.skip(f"{provider} unavailable: {exc}")
        raise
    fn = backward_fn(provider, q, k, v, cos, sin, dout)
    record(benchmark, fn, flops=2.5 * flops_forward(B, H, S, D),
           formula="2.5*4*B*H*S^2*D/2 (causal), RoPE backward included", warmup=3, reps=10)


def test_attention_peak_memory_16k(benchmark):
    """Forward + backward at S=16384: peak memory over the inputs stays linear in S (no S^2 buffer)."""
    from llama_fast.ops import attention

    B, H, S, D = 1, 32, 16384, 128
    q, k, v, cos, sin = make_inputs(B, H, S, D)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    dout = torch.randn_like(q)

    def step():
        attention(q, k, v, cos, sin).backward(dout)

    step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    activation = q.numel() * q.element_size()
    benchmark.extra_info.update(peak_extra_mib=extra / 2**20, activation_mib=activation / 2**20)
    assert extra < 12 * activation, f"peak extra memory {extra / 2**20:.0f} MiB is not linear in S"
    record(benchmark, step, flops=3.5 * flops_forward(B, H, S, D),
           formula="3.5*4*B*H*S^2*D/2 (forward + backward, causal)", warmup=3, reps=10)
