"""lm_head + cross-entropy, forward and backward together, at the 1B flavor's shape: hidden [8192, 2048]
(batch 4 x 2048 tokens) against a [32000, 2048] lm_head, bf16, a tenth of the targets ignored.

Providers: ours (llama_fast.ops.cross_entropy.linear_cross_entropy: chunked, the Triton row kernel,
no full logits), eager PyTorch as Hugging Face computes it (full logits, upcast to fp32, then
F.cross_entropy), torch.compile of that, and Liger-Kernel's fused linear cross-entropy.

FLOPs: the three GEMMs, logits = h W^T, dh = dlogits W and dW = dlogits^T h: 3 * 2 * N * d * V.
Forward and backward are timed as one (ours and Liger do the backward's work in the forward).
extra_info also has the peak memory above the inputs (MiB), where the full logits show.
"""
import pytest
import torch
import torch.nn.functional as F
from common import compiled, liger, record, requires_cuda, validate

from llama_fast.ops.cross_entropy import linear_cross_entropy

pytestmark = requires_cuda

ROWS, DIM, VOCAB, DTYPE = 4 * 2048, 2048, 32000, torch.bfloat16
PROVIDERS = ["ours", "torch_eager", "torch_compile", "liger"]


def full_logits_loss(h, w, t):
    return F.cross_entropy((h @ w.t()).float(), t, ignore_index=-100)


def provider_fn(name):
    if name == "ours":
        return linear_cross_entropy
    if name == "torch_eager":
        return full_logits_loss
    if name == "torch_compile":
        return compiled(full_logits_loss)
    loss = liger("transformers.fused_linear_cross_entropy").LigerFusedLinearCrossEntropyLoss()
    return lambda h, w, t: loss(w, h, t)


def loss_and_grads(fn, h, w, t):
    h, w = h.detach().requires_grad_(), w.detach().requires_grad_()
    loss = fn(h, w, t)
    return (loss.detach(), *torch.autograd.grad(loss, (h, w)))


@pytest.mark.benchmark(group="lm_head + cross-entropy fwd+bwd 8192x2048 -> 32000 bf16")
@pytest.mark.parametrize("provider", PROVIDERS)
def test_forward_backward(benchmark, provider):
    fn = provider_fn(provider)
    h = torch.randn(ROWS, DIM, device="cuda").to(DTYPE)
    w = (torch.randn(VOCAB, DIM, device="cuda") / DIM**0.5).to(DTYPE)
    t = torch.randint(0, VOCAB, (ROWS,), device="cuda")
    t[::10] = -100
    high = loss_and_grads(full_logits_loss, h.float(), w.float(), t)
    low = loss_and_grads(full_logits_loss, h, w, t)
    for name, got, hi, lo in zip(("loss", "dhidden", "dweight"), loss_and_grads(fn, h, w, t), high, low):
        validate(name, got, hi, lo, strict=provider != "liger")
    del high, low
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    record(benchmark, lambda: loss_and_grads(fn, h, w, t), flops=6 * ROWS * DIM * VOCAB,
           formula="3 GEMMs: 3 * 2 * N * d * V")
    benchmark.extra_info["peak_extra_mib"] = (benchmark.extra_info["peak_mem_gib"] * 2**30 - base) / 2**20
