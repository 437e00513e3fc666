"""replace_modules: a Hugging Face LlamaForCausalLM (and our reference Llama) on the fused ops
gives the logits and parameter gradients of the unpatched model (2x rule), and trains the same."""
import copy
import warnings

import pytest
import torch
import torch.nn as nn

import llama_fast
from llama_fast import Llama, LlamaConfig
from llama_fast.replace import FusedRotaryAttention, replace_modules
from llama_fast.testing import assert_within_2x, default_floor

transformers = pytest.importorskip("transformers", reason="the drop-in tests patch transformers' LlamaForCausalLM")


def hf_model(**overrides):
    cfg = dict(
        hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=256, max_position_embeddings=128, rms_norm_eps=1e-6, rope_theta=500000.0,
        attention_dropout=0.0, tie_word_embeddings=False,
    )
    cfg.update(overrides)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg))
    with torch.no_grad():  # non-trivial norm weights, so a dropped weight would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model.eval()


def loss_and_grads(model, tokens):
    model.zero_grad(set_to_none=True)
    logits = model(tokens, use_cache=False).logits
    # A loss that weighs every logit, so every parameter gradient is exercised.
    weights = torch.linspace(-1, 1, logits.shape[-1], dtype=logits.dtype, device=logits.device)
    (logits * weights).sum().backward()
    return logits.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("seq_len", [1, 19])
def test_hf_llama_logits_and_gradients_match(seq_len):
    original = hf_model()
    fused = copy.deepcopy(original)
    report = replace_modules(fused)
    assert report.counts == {"RMSNorm": 5, "MLP": 2, "attention": 2}, report.counts
    assert list(fused.state_dict()) == list(original.state_dict())
    assert isinstance(fused.model.layers[0].self_attn, FusedRotaryAttention)
    with pytest.raises(ValueError, match="has already been replaced"):
        replace_modules(fused)

    tokens = torch.randint(0, 256, (2, seq_len))
    logits, grads = loss_and_grads(fused, tokens)
    logits_hi, grads_hi = loss_and_grads(copy.deepcopy(original).double(), tokens)
    logits_lo, grads_lo = loss_and_grads(original, tokens)
    assert fused.model.layers[1].self_attn.fused_calls == 1 and fused.model.layers[1].self_attn.fallback_calls == 0
    floor = default_floor(torch.float32)
    assert_within_2x("logits", logits, logits_hi.float(), logits_lo, floor=floor)
    for name in grads:
        assert_within_2x(f"grad {name}", grads[name], grads_hi[name].float(), grads_lo[name], floor=floor)


def test_hf_padding_mask_falls_back_exactly():
    original = hf_model(num_key_value_heads=4)
    fused = copy.deepcopy(original)
    replace_modules(fused)
    tokens = torch.randint(0, 256, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :3] = 0  # left padding: not plain causal, so the original attention must run
    with torch.no_grad():
        a = fused(tokens, attention_mask=mask, use_cache=False).logits
        b = original(tokens, attention_mask=mask, use_cache=False).logits
    attn = fused.model.layers[0].self_attn
    assert attn.fallback_calls == 1 and attn.fused_calls == 0
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_packed_sequences_and_requested_weights_fall_back_exactly():
    original = hf_model(attn_implementation="eager")
    fused = copy.deepcopy(original)
    replace_modules(fused)
    attn = fused.model.layers[0].self_attn
    tokens = torch.randint(0, 256, (1, 10))
    packed = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 4, 5]])  # two documents in one row
    with torch.no_grad():
        a = fused(tokens, position_ids=packed, use_cache=False).logits
        b = original(tokens, position_ids=packed, use_cache=False).logits
        assert attn.fallback_calls == 1 and attn.fused_calls == 0
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        out = fused(tokens, output_attentions=True, use_cache=False)
    assert attn.fallback_calls == 2
    assert out.attentions is not None and all(w is not None for w in out.attentions)


def test_later_wrapping_reaches_both_paths():
    """A projection replaced after replace_modules (as LoRA does) is used by the fused path and the
    fallback alike: the class swap keeps one set of submodules."""

    class Shifted(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner
            self.delta = nn.Parameter(torch.full((inner.out_features,), 0.1))

        def forward(self, x):
            return self.inner(x) + self.delta

    original = hf_model()
    fused = copy.deepcopy(original)
    replace_modules(fused)
    for model in (original, fused):
        model.model.layers[0].self_attn.q_proj = Shifted(model.model.layers[0].self_attn.q_proj)
    tokens = torch.randint(0, 256, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :2] = 0
    for kwargs in ({}, {"attention_mask": mask}):  # the fused path, then the fallback
        fused.zero_grad()
        fused(tokens, use_cache=False, **kwargs).logits.sum().backward()
        delta_grad = fused.model.layers[0].self_attn.q_proj.delta.grad
        assert delta_grad is not None and delta_grad.abs().sum() > 0
        with torch.no_grad():
            torch.testing.assert_close(
                fused(tokens, use_cache=False, **kwargs).logits, original(tokens, use_cache=False, **kwargs).logits,
                rtol=1e-4, atol=1e-4,
            )


def test_hf_generate_with_cache_matches():
    original = hf_model()
    fused = copy.deepcopy(original)
    replace_modules(fused)
    prompt = torch.randint(0, 256, (1, 6))
    kwargs = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(fused.generate(prompt, **kwargs), original.generate(prompt, **kwargs))
    attn = fused.model.layers[0].self_attn
    assert attn.fused_calls == 1  # the prompt pass, cache filled by us
    assert dict(attn.fallback_reasons) == {"decoding with cached tokens": 4}


def test_unknown_keyword_goes_to_the_original_forward_and_is_counted():
    """Safe by construction: a keyword the fused path does not know (as transformers 5.24's renamed
    ``cache`` once was) runs the original forward, counted by reason and warned about once."""
    original = hf_model()
    fused = copy.deepcopy(original)
    replace_modules(fused)
    attn, attn_original = fused.model.layers[0].self_attn, original.model.layers[0].self_attn
    hidden = torch.randn(2, 7, 64)
    cos, sin = original.model.rotary_emb(hidden, torch.arange(7)[None])
    call = dict(position_embeddings=(cos, sin), attention_mask=None, invented_mask_kind="sliding")
    with pytest.warns(UserWarning, match="keyword argument 'invented_mask_kind'"):
        out = attn(hidden, **call)[0]
    with torch.no_grad():  # the original ignores the keyword (it only forwards **kwargs); so must we
        ref = attn_original(hidden, **call)[0]
    assert attn.fused_calls == 0 and attn.fallback_calls == 1
    assert dict(attn.fallback_reasons) == {"keyword argument 'invented_mask_kind' that the fused path does not know": 1}
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second call of the same kind is counted, not warned about again
        attn(hidden, **call)
    assert attn.fallback_calls == 2
    attn(hidden, position_embeddings=(cos, sin), invented_mask_kind=None)  # unset: the fused path
    assert attn.fused_calls == 1


def test_our_reference_llama_switches_to_fused():
    config = LlamaConfig.from_name("tiny", vocab_size=300)
    reference = Llama(config, backend="reference")
    fused = copy.deepcopy(reference)
    report = replace_modules(fused)
    assert fused.backend == "fused" and report.counts == {"RMSNorm": 5, "MLP": 2, "attention": 2}
    tokens = torch.randint(0, 300, (2, 21))
    out = fused(tokens)[0]
    hi = copy.deepcopy(reference).double()(tokens)[0]
    assert_within_2x("logits", out, hi.float(), reference(tokens)[0], floor=1e-5)
    with pytest.raises(ValueError, match="already uses backend='fused'"):
        replace_modules(fused)


def test_refuses_what_it_cannot_serve():
    model = hf_model(hidden_act="gelu")
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="activation must be SiLU"):
        replace_modules(model)
    assert type(model.model.layers[0].mlp).__name__ == "LlamaMLP"  # nothing changed
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="attention projections must be nn.Linear without bias"):
        replace_modules(hf_model(attention_bias=True))
    qk_norm = hf_model()  # a Qwen3 / OLMo2-style attention: q/k norms the fused kernel would skip
    qk_norm.model.layers[1].self_attn.q_norm = nn.LayerNorm(16)
    with pytest.raises(ValueError, match=r"layers.1.self_attn .*submodules beyond q/k/v/o_proj .*has q_norm"):
        replace_modules(qk_norm)
    with pytest.raises(ValueError, match="found no RMSNorm"):
        replace_modules(nn.Sequential(nn.Linear(4, 4)))
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        replace_modules("model")


def test_fused_training_tracks_reference_for_50_steps():
    config = LlamaConfig.from_name("tiny", vocab_size=128, n_layers=1)
    torch.manual_seed(0)
    reference = Llama(config, backend="reference")
    fused = Llama(config, backend="fused")
    fused.load_state_dict(reference.state_dict())
    data = torch.randint(0, 128, (5, 2, 17)).repeat(10, 1, 1)  # 5 batches seen 10 times: learnable
    curves = []
    for model in (reference, fused):
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
        losses = []
        for batch in data:
            _, loss = model(batch[:, :-1], batch[:, 1:])
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        curves.append(torch.tensor(losses))
    assert curves[0][-10:].mean() < curves[0][:10].mean() - 0.1, "the reference run must learn something"
    torch.testing.assert_close(curves[1], curves[0], rtol=2e-3, atol=2e-3)


def test_top_level_export():
    assert llama_fast.replace_modules is replace_modules


@pytest.mark.gpu
def test_hf_llama_bf16_on_gpu_matches():
    """bf16 on the GPU: the replaced model's logits and gradients against the unpatched model in fp32
    (high) and in bf16 (PyTorch's own error)."""
    original = hf_model(hidden_size=256, intermediate_size=688, num_attention_heads=4, num_key_value_heads=1,
                        max_position_embeddings=512).cuda()
    fused = copy.deepcopy(original).to(torch.bfloat16)
    replace_modules(fused)
    tokens = torch.randint(0, 256, (2, 300), device="cuda")
    logits, grads = loss_and_grads(fused, tokens)
    logits_hi, grads_hi = loss_and_grads(original, tokens)
    logits_lo, grads_lo = loss_and_grads(copy.deepcopy(original).to(torch.bfloat16), tokens)
    floor = default_floor(torch.bfloat16)
    assert_within_2x("logits", logits.float(), logits_hi, logits_lo.float(), floor=floor)
    for name in grads:
        assert_within_2x(f"grad {name}", grads[name].float(), grads_hi[name], grads_lo[name].float(), floor=floor)
