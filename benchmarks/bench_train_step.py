"""One training step (forward, backward, AdamW step) of the "1B" flavor at batch 4 x 2048, bf16.

Providers: our fused model, also with recompute="cheap" (the norm and SwiGLU outputs recomputed in
the backward: what that memory saving costs in throughput), our reference backend, torch.compile of
the reference backend, and Hugging Face's LlamaForCausalLM plain, compiled with torch.compile
(design.md's torch.compile peer), with llama_fast.replace_modules, and with Liger-Kernel (where
installed). Every provider trains bf16 parameters with torch's fused AdamW (the same optimizer work
for all), and reports in extra_info:

    tokens_per_s = B * S / step time
    MFU          = tokens_per_s * (6 N + 6 L d S) / 989e12     (H100 dense bf16 peak)
    peak_mem_gib = torch.cuda.max_memory_allocated() over the timed steps

Before timing, each provider's first loss must be finite and near ln(vocab) (a randomly initialised
model predicts nearly uniformly); the losses themselves are compared by tests/test_fused_model.py
and tests/test_replace.py. Liger-Kernel patches transformers' Llama classes for the rest of the
process, so "hf+liger" runs last (keep it last when selecting cases with -k).

A provider that runs out of GPU memory is skipped with the reason, after its memory is freed, so
the providers after it still run. Our reference backend is expected to: its attention keeps the
[B, H, S, S] scores (benchmarks/estimate_memory.py puts its step far above 80 GB at this shape).
"""
from __future__ import annotations

import gc
import math

import pytest
import torch
from common import session_counts

from llama_fast import Llama, LlamaConfig

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="timing a training step needs a CUDA device")

BATCH, SEQ = 4, 2048
H100_BF16_PEAK = 989e12
CONFIG = LlamaConfig.from_name("1B")


def build(provider: str):
    """(model, step_loss_fn) for a provider; the model is bf16 on the GPU."""
    torch.manual_seed(0)
    if provider.startswith("llama_fast"):
        backend = "reference" if "reference" in provider else "fused"
        recompute = "cheap" if provider.endswith("recompute-cheap") else "none"
        with torch.device("cuda"):  # initialised on the GPU: a 1.1B-parameter init on the host takes a minute
            model = Llama(CONFIG, backend=backend, recompute=recompute).to(torch.bfloat16)
        fwd = torch.compile(model) if provider.endswith("compile") else model
        return model, lambda x, y: fwd(x, y)[1]
    transformers = pytest.importorskip("transformers", reason="the Hugging Face providers need transformers")
    hf_config = transformers.LlamaConfig(
        hidden_size=CONFIG.dim, intermediate_size=CONFIG.ffn_hidden, num_hidden_layers=CONFIG.n_layers,
        num_attention_heads=CONFIG.n_heads, num_key_value_heads=CONFIG.n_kv_heads, vocab_size=CONFIG.vocab_size,
        max_position_embeddings=CONFIG.max_seq_len, rms_norm_eps=CONFIG.norm_eps, rope_theta=CONFIG.rope_theta,
        use_cache=False, attn_implementation="sdpa",
    )
    if provider == "hf+liger":
        # The module itself, not the package: the package imports, and Liger 0.8.5 raises its
        # "requires transformers >= 5.0.0" only when the patch function is first reached.
        liger = pytest.importorskip("liger_kernel.transformers.monkey_patch",
                                    reason="Liger-Kernel's Llama patch is not importable here")
        liger.apply_liger_kernel_to_llama()
    with torch.device("cuda"):
        model = transformers.LlamaForCausalLM(hf_config).to(torch.bfloat16)
    if provider == "hf+llama_fast":
        from llama_fast import replace_modules

        replace_modules(model)
    fwd = torch.compile(model) if provider == "hf-compile" else model
    return model, lambda x, y: fwd(input_ids=x, labels=y, use_cache=False).loss


PROVIDERS = [
    "llama_fast", "llama_fast-recompute-cheap", "llama_fast-reference", "llama_fast-reference-compile",
    "hf", "hf-compile", "hf+llama_fast", "hf+liger",
]


@pytest.mark.benchmark(group="train-step-1B-B4-S2048")
@pytest.mark.parametrize("provider", PROVIDERS)
def test_train_step(benchmark, provider):
    model, loss_fn = build(provider)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    tokens = torch.randint(0, CONFIG.vocab_size, (BATCH, SEQ + 1), device="cuda")
    x, y = tokens[:, :-1], tokens[:, 1:]
    if provider.startswith("hf"):
        y = tokens[:, :-1]  # transformers shifts the labels itself

    def step():
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(x, y)
        loss.backward()
        opt.step()
        return loss

    def timed():
        step()
        torch.cuda.synchronize()

    out_of_memory = None
    try:
        first = step().item()  # also creates the AdamW state: the steps after it hold more memory
        assert math.isfinite(first) and abs(first - math.log(CONFIG.vocab_size)) < 0.5, f"{provider}: first loss {first}"
        warmup, rounds = session_counts(2, 8)  # 2 and 5 in a gpu_session.sh session
        for _ in range(warmup):  # warm-up (and compilation)
            step()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        benchmark.pedantic(timed, rounds=rounds, iterations=1, warmup_rounds=1)
        step_s = benchmark.stats.stats.median
        tokens_per_s = BATCH * SEQ / step_s
        benchmark.extra_info.update(
            tokens_per_s=round(tokens_per_s),
            mfu=round(tokens_per_s * CONFIG.flops_per_token(SEQ) / H100_BF16_PEAK, 4),
            peak_mem_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2),
            first_loss=round(first, 4),
            formula="tokens/s = B*S/step; MFU = tokens/s * (6N + 6*L*d*S) / 989e12",
        )
    except torch.OutOfMemoryError as exc:
        out_of_memory = str(exc).splitlines()[0]
    finally:
        # Free the GPU memory before the next provider, whatever happened: the closures hold these
        # cells, and a failed test's traceback keeps this frame (not its cleared locals) alive.
        model = opt = loss_fn = step = timed = None
        gc.collect()
        torch.cuda.empty_cache()
    if out_of_memory is not None:  # skip outside the handler: a chained traceback would keep the model alive
        pytest.skip(f"{provider}: out of memory at B{BATCH} S{SEQ} ({out_of_memory})")
