"""Packed documents (varlen) attention with RoPE, bf16: forward and backward TFLOP/s over the unmasked work.

16,384 tokens per case, H = 32, D = 128, in three mixtures: 8 documents of 2048, 64 of 256, and lengths
drawn from a long-tailed (log-normal) distribution; and, as the yardstick of issue 15's target (8 x 2048
at >= 95% of it), the uniform batch B8 S2048 through the batched op.

FLOPs: each document of length L counts its causal half, 4 * H * D * L * (L + 1) / 2 forward; the
backward 2.5x that. RoPE is in every provider's time: ours rotates inside (per-document positions);
the others rotate q and k first with llama_fast.ops.rope at the per-token positions, then call
  sdpa-blockdiag   SDPA (default backend choice) with a boolean block-diagonal causal mask [T, T]
  flex             FlexAttention with a document mask (torch.compile'd flex_attention)
  flash-varlen     flash_attn_varlen_func, where the flash-attn package is installed

Before timing, each provider's output (and gradients) on the first four heads are checked against
llama_fast.reference.attention_varlen with the 2x rule (fp32 reference high, bf16 low).
"""
from __future__ import annotations

import math

import pytest
import torch
from common import record

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="timing attention needs a CUDA device")

DTYPE = torch.bfloat16
TOKENS, HEADS, HEAD_DIM = 16384, 32, 128
MIXES = ["8x2048", "64x256", "longtail"]
PROVIDERS = ["llama_fast", "sdpa-blockdiag", "flex", "flash-varlen"]
CHECK_HEADS = 4


def lengths_of(mix: str, total: int = TOKENS, seed: int = 0) -> list[int]:
    """Document lengths summing to ``total``."""
    if "x" in mix:
        n, length = (int(x) for x in mix.split("x"))
        assert n * length == total, (mix, total)
        return [length] * n
    gen = torch.Generator().manual_seed(seed)
    lengths = []
    while sum(lengths) < total:  # log-normal: median ~150 tokens, a tail past 4k
        lengths.append(max(1, min(8192, int(math.exp(5.0 + 1.5 * torch.randn(1, generator=gen).item())))))
    lengths[-1] -= sum(lengths) - total
    return [n for n in lengths if n > 0]


def flops_forward(lengths: list[int], heads: int = HEADS, head_dim: int = HEAD_DIM) -> float:
    return sum(4 * heads * head_dim * n * (n + 1) / 2 for n in lengths)


def make_inputs(lengths, heads=HEADS, head_dim=HEAD_DIM, device="cuda", dtype=DTYPE):
    from llama_fast import reference

    T = sum(lengths)
    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(T, heads, head_dim, device=device, dtype=dtype, generator=gen) for _ in range(3))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
    cos, sin = reference.rope_tables(max(lengths), head_dim, device=device)
    return q, k, v, cu, cos, sin


def positions_of(cu: torch.Tensor) -> torch.Tensor:
    T = int(cu[-1])
    return torch.arange(T, device=cu.device) - torch.repeat_interleave(cu[:-1], cu.diff()).long()


def forward_fn(provider, q, k, v, cu, cos, sin):
    """A zero-argument callable computing O [T, H, D] for the provider."""
    from llama_fast import ops

    max_len = int(cu.diff().max())
    if provider == "llama_fast":
        return lambda: ops.attention(q, k, v, cos, sin, cu_seqlens=cu, max_seqlen=max_len)
    pos = positions_of(cu)
    cos_t, sin_t = cos[pos].contiguous(), sin[pos].contiguous()  # row t rotates token t

    def rotated():
        qr, kr = ops.rope(q[None], k[None], cos_t, sin_t)
        return qr[0], kr[0]

    if provider == "sdpa-blockdiag":
        doc = torch.repeat_interleave(torch.arange(cu.numel() - 1, device=q.device), cu.diff())
        T = q.shape[0]
        mask = (doc[:, None] == doc[None, :]) & torch.ones(T, T, dtype=torch.bool, device=q.device).tril()

        def run():
            qr, kr = rotated()
            out = torch.nn.functional.scaled_dot_product_attention(
                qr.transpose(0, 1)[None], kr.transpose(0, 1)[None], v.transpose(0, 1)[None], attn_mask=mask)
            return out[0].transpose(0, 1)

        return run
    if provider == "flex":
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        doc = torch.repeat_interleave(torch.arange(cu.numel() - 1, device=q.device), cu.diff())

        def document_causal(b, h, q_idx, kv_idx):
            return (doc[q_idx] == doc[kv_idx]) & (q_idx >= kv_idx)

        T = q.shape[0]
        block_mask = create_block_mask(document_causal, None, None, T, T, device=q.device)
        flex = torch.compile(flex_attention)

        def run():
            qr, kr = rotated()
            out = flex(qr.transpose(0, 1)[None], kr.transpose(0, 1)[None], v.transpose(0, 1)[None],
                       block_mask=block_mask)
            return out[0].transpose(0, 1)

        return run
    if provider == "flash-varlen":
        flash_attn = pytest.importorskip("flash_attn", reason="flash-attn is not installed")

        def run():
            qr, kr = rotated()
            return flash_attn.flash_attn_varlen_func(qr, kr, v, cu, cu, max_len, max_len, causal=True)

        return run
    raise ValueError(provider)


def check(provider, q, k, v, cu, cos, sin, dout=None):
    """The provider's output (and with dout, its gradients) on the first heads, under the 2x rule."""
    from llama_fast import reference
    from llama_fast.testing import assert_within_2x, default_floor

    q, k, v = (t[:, :CHECK_HEADS].contiguous() for t in (q, k, v))
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    got = [forward_fn(provider, *leaves, cu, cos, sin)()]
    refs = {}
    for dtype in (torch.float32, DTYPE):
        ref_leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        out = reference.attention_varlen(*ref_leaves, cos, sin, cu)
        refs[dtype] = [out]
        if dout is not None:
            refs[dtype] += torch.autograd.grad(out, ref_leaves, dout[:, :CHECK_HEADS].to(dtype))
    if dout is not None:
        got += torch.autograd.grad(got[0], leaves, dout[:, :CHECK_HEADS])
    for name, a, hi, lo in zip(("out", "dq", "dk", "dv"), got, refs[torch.float32], refs[DTYPE]):
        assert_within_2x(f"{provider} {name}", a.float(), hi, lo.float(), floor=default_floor(DTYPE))


def _prepare(provider, mix, backward):
    lengths = lengths_of(mix)
    q, k, v, cu, cos, sin = make_inputs(lengths)
    dout = torch.randn_like(q) if backward else None
    try:
        check(provider, q, k, v, cu, cos, sin, dout)
    except (RuntimeError, NotImplementedError) as exc:  # a peer that does not serve this case or GPU
        if provider != "llama_fast":
            pytest.skip(f"{provider} unavailable: {exc}")
        raise
    return lengths, q, k, v, cu, cos, sin, dout


@pytest.mark.parametrize("mix", MIXES)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_varlen_forward(benchmark, provider, mix):
    benchmark.group = f"attention-varlen-forward-{mix}"
    lengths, q, k, v, cu, cos, sin, _ = _prepare(provider, mix, backward=False)
    fn = forward_fn(provider, q, k, v, cu, cos, sin)
    record(benchmark, fn, flops=flops_forward(lengths), formula="sum over documents of 4*H*D*L(L+1)/2, RoPE included",
           warmup=3, reps=10)


@pytest.mark.parametrize("mix", MIXES)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_varlen_backward(benchmark, provider, mix):
    benchmark.group = f"attention-varlen-backward-{mix}"
    lengths, q, k, v, cu, cos, sin, dout = _prepare(provider, mix, backward=True)
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out = forward_fn(provider, *leaves, cu, cos, sin)()
    fn = lambda: torch.autograd.grad(out, leaves, dout, retain_graph=True)  # noqa: E731
    record(benchmark, fn, flops=2.5 * flops_forward(lengths),
           formula="2.5 * the forward's (unmasked work), RoPE backward included", warmup=3, reps=10)


def test_uniform_yardstick_forward(benchmark):
    """B8 S2048 through the batched op: the TFLOP/s that 8 x 2048 packed should reach 95% of."""
    from llama_fast import ops, reference

    benchmark.group = "attention-varlen-forward-8x2048"
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(8, 2048, HEADS, HEAD_DIM, device="cuda", dtype=DTYPE, generator=gen) for _ in range(3))
    cos, sin = reference.rope_tables(2048, HEAD_DIM, device="cuda")
    record(benchmark, lambda: ops.attention(q, k, v, cos, sin), flops=flops_forward([2048] * 8),
           formula="4*B*H*S(S+1)/2*D, the batched op", warmup=3, reps=10)
