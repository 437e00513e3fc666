"""replace_modules: a Hugging Face LlamaForCausalLM (and our reference Llama) on the fused ops
gives the logits and parameter gradients of the unpatched model (2x rule), and trains the same."""
import copy
import inspect
import warnings

import pytest
import torch
import torch.nn as nn

import llama_fast
from llama_fast import Llama, LlamaConfig
from llama_fast.replace import FusedRotaryAttention, replace_modules
from llama_fast.testing import assert_within_2x, default_floor

transformers = pytest.importorskip("transformers", reason="the drop-in tests patch transformers' LlamaForCausalLM")
# What LlamaForCausalLM.forward takes differs across the tested releases (.ci/test-transformers.sh).
FORWARD_PARAMETERS = inspect.signature(transformers.LlamaForCausalLM.forward).parameters
TAKES_LOSS_KWARGS = any(p.kind == p.VAR_KEYWORD for p in FORWARD_PARAMETERS.values())  # 4.46+
LOGITS_TO_KEEP = "logits_to_keep" if "logits_to_keep" in FORWARD_PARAMETERS else "num_logits_to_keep"  # 4.50


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


def loss_and_grads(model, tokens, **kwargs):
    model.zero_grad(set_to_none=True)
    # The default use_cache: with use_cache=False, transformers 4.5x builds the causal mask (to look for
    # packed sequences in the position ids), and a mask tensor falls back.
    logits = model(tokens, **kwargs).logits
    # A loss that weighs every logit, so every parameter gradient is exercised.
    weights = torch.linspace(-1, 1, logits.shape[-1], dtype=logits.dtype, device=logits.device)
    (logits * weights).sum().backward()
    return logits.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("seq_len", [1, 19])
def test_hf_llama_logits_and_gradients_match(seq_len):
    original = hf_model()
    fused = copy.deepcopy(original)
    report = replace_modules(fused)
    assert report.counts == {"RMSNorm": 5, "MLP": 2, "attention": 2, "cross_entropy": 1}, report.counts
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


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batches_take_the_fused_path_and_match(side):
    """A padded batch is unpadded by its mask into documents for the packed op (padding that attends,
    as right padding's does under SDPA, by plain math; padding that sees nothing gives 0, as SDPA's):
    every logit and gradient within the 2x rule of the original, pad positions included."""
    original = hf_model()
    fused = copy.deepcopy(original)
    replace_modules(fused, cross_entropy=False)
    tokens = torch.randint(0, 256, (3, 9))
    mask = torch.ones(3, 9, dtype=torch.long)
    if side == "left":
        mask[1, :3] = 0
        mask[2, :8] = 0
    else:
        mask[1, 6:] = 0
        mask[2, 1:] = 0
    kwargs = dict(attention_mask=mask, use_cache=False)
    logits, grads = loss_and_grads(fused, tokens, **kwargs)
    logits_hi, grads_hi = loss_and_grads(copy.deepcopy(original).double(), tokens, **kwargs)
    logits_lo, grads_lo = loss_and_grads(original, tokens, **kwargs)
    attn = fused.model.layers[0].self_attn
    if side == "left" and attn.fallback_calls and transformers.__version__.startswith("4."):
        # Some 4.x releases (4.45) give left padding's rows on the CPU an additive mask that is all minimum:
        # their softmax is uniform by rounding, and its gradient is the backend's own. Such a mask falls back.
        assert list(attn.fallback_reasons) == ["an additive attention mask with fully masked rows"]
    else:
        assert attn.fused_calls == 1 and attn.fallback_calls == 0, attn.fallback_reasons
    floor = default_floor(torch.float32)
    assert_within_2x("logits", logits, logits_hi.float(), logits_lo, floor=floor)
    for name in grads:
        assert_within_2x(f"grad {name}", grads[name], grads_hi[name].float(), grads_lo[name], floor=floor)


def test_the_mask_is_planned_once_per_forward_not_per_layer(monkeypatch):
    """Every layer gets the same mask: it is read to the host and unpadded once per forward (the plan is
    keyed by the mask object and its version, so a new or changed mask is planned again)."""
    import llama_fast.replace as replace_module

    plans = []
    real = replace_module._plan_for
    monkeypatch.setattr(replace_module, "_plan_for", lambda *a: plans.append(1) or real(*a))
    fused = hf_model()
    replace_modules(fused, cross_entropy=False)
    tokens = torch.randint(0, 256, (3, 9))
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, 6:] = 0
    with torch.no_grad():
        first = fused(tokens, attention_mask=mask, use_cache=False).logits
        assert len(plans) == 1 and fused.model.layers[1].self_attn.fused_calls == 1, (plans, fused.model.layers[1].self_attn.fallback_reasons)
        mask[2, 4:] = 0  # in place: a new plan, and the logits follow the new mask
        second = fused(tokens, attention_mask=mask, use_cache=False).logits
    assert len(plans) == 2
    assert torch.equal(first[:2, :4], second[:2, :4]) and not torch.allclose(first[2], second[2])


def test_packed_documents_by_cu_seq_lens_are_separated():
    """cu_seq_lens_q/k (flash_attention_2's packed keywords, from DataCollatorWithFlattening) separate the
    documents: each equals the original module run on that document alone."""
    original = hf_model()
    fused = copy.deepcopy(original)
    replace_modules(fused, cross_entropy=False)
    attn, attn_original = fused.model.layers[0].self_attn, original.model.layers[0].self_attn
    lengths = [4, 1, 7]
    hidden = torch.randn(1, 12, 64, dtype=torch.float64)
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    tables = original.model.rotary_emb(hidden, positions)
    cu = torch.tensor([0, 4, 5, 12], dtype=torch.int32)
    attn.double()
    attn_original.double()
    with torch.no_grad():
        got = attn(hidden, position_embeddings=tables, attention_mask=None, cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                   max_length_q=7, max_length_k=7)[0]
        for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
            alone = attn_original(hidden[:, s:e], position_embeddings=tuple(t[:, s:e] for t in tables),
                                  attention_mask=None)[0]
            torch.testing.assert_close(got[:, s:e], alone, rtol=1e-10, atol=1e-10)
    assert attn.fused_calls == 1 and attn.fallback_calls == 0


def test_packed_rows_through_the_model_match():
    """A packed row with restarting position_ids: the original's own mask (block-diagonal where the release
    detects packing, else causal) is followed; logits and gradients match within the 2x rule."""
    original = hf_model()
    fused = copy.deepcopy(original)
    replace_modules(fused, cross_entropy=False)
    tokens = torch.randint(0, 256, (1, 10))
    kwargs = dict(position_ids=torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 4, 5]]), use_cache=False)
    logits, grads = loss_and_grads(fused, tokens, **kwargs)
    logits_hi, grads_hi = loss_and_grads(copy.deepcopy(original).double(), tokens, **kwargs)
    logits_lo, grads_lo = loss_and_grads(original, tokens, **kwargs)
    attn = fused.model.layers[0].self_attn
    assert attn.fused_calls == 1 and attn.fallback_calls == 0, attn.fallback_reasons
    floor = default_floor(torch.float32)
    assert_within_2x("logits", logits, logits_hi.float(), logits_lo, floor=floor)
    for name in grads:
        assert_within_2x(f"grad {name}", grads[name], grads_hi[name].float(), grads_lo[name], floor=floor)


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
    for kwargs in ({}, {"attention_mask": mask}):  # the fused path, then the padded one (4.x: the fallback)
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
    assert fused.backend == "fused" and report.counts == {"RMSNorm": 5, "MLP": 2, "attention": 2, "cross_entropy": 1}
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


def test_rotary_tables_are_checked_once_at_replace_time():
    """The calls' tables are never read, so the model's rotary module is checked when replacing: one
    that makes interleaved tables (another RoPE layout, as Cohere's) or tables narrower than head_dim
    (partial rotary) has its attention refused."""

    class Interleaved(nn.Module):
        def __init__(self, inner, width):
            super().__init__()
            self.inner, self.width = inner, width

        def forward(self, x, position_ids):
            cos, sin = self.inner(x, position_ids)
            half = cos.shape[-1] // 2  # each angle twice in a row: c0 c0 c1 c1 ... instead of c0 c1 ... c0 c1 ...
            return tuple(t[..., :half].repeat_interleave(2, -1)[..., : self.width] for t in (cos, sin))

    Interleaved.__name__ = "InterleavedRotaryEmbedding"
    for width, reason in ((16, "makes interleaved rotary tables"), (8, "makes tables of width 8, not head_dim 16")):
        model = hf_model()
        model.model.rotary_emb = Interleaved(model.model.rotary_emb, width)
        with pytest.raises(ValueError, match=rf"layers.0.self_attn .*{reason}.*\(or pass attention=False\)"):
            replace_modules(model)
        assert replace_modules(model, attention=False).counts["attention"] == 0


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


# ---------------------------------------------------------------------------------------------
# The dispatch reads no tensor values: positions ride in the tables, masks fall back, compile is whole
# ---------------------------------------------------------------------------------------------
def test_offset_positions_are_rotated_by_the_calls_tables():
    """Positions other than 0..S-1 (shared by the rows) take the fused path and give the original's
    logits: the kernel rotates token s by row s of the tables the call brings."""
    original = hf_model()
    fused = copy.deepcopy(original)
    replace_modules(fused, cross_entropy=False)
    tokens = torch.randint(0, 256, (2, 11))
    positions = torch.arange(5, 16)[None]  # (1, S): a shared offset, as after a prompt
    logits, grads = loss_and_grads(fused, tokens, position_ids=positions)
    logits_hi, grads_hi = loss_and_grads(copy.deepcopy(original).double(), tokens, position_ids=positions)
    logits_lo, grads_lo = loss_and_grads(original, tokens, position_ids=positions)
    attn = fused.model.layers[0].self_attn
    assert attn.fused_calls == 1 and attn.fallback_calls == 0
    floor = default_floor(torch.float32)
    assert_within_2x("logits", logits, logits_hi.float(), logits_lo, floor=floor)
    for name in grads:
        assert_within_2x(f"grad {name}", grads[name], grads_hi[name].float(), grads_lo[name], floor=floor)


def test_masks_and_per_row_tables():
    """Plain causal masks and per-row tables take the fused path (2x rule); masks that are neither causal
    documents nor padding (bidirectional, a float bias) fall back and give the original's output exactly."""
    original = hf_model()
    fused = copy.deepcopy(original)
    replace_modules(fused, cross_entropy=False)
    attn, attn_original = fused.model.layers[0].self_attn, original.model.layers[0].self_attn
    hidden = torch.randn(2, 7, 64)
    per_row = torch.stack([torch.arange(7), torch.arange(3, 10)])  # (B, S): each row its own positions
    causal = torch.ones(7, 7, dtype=torch.bool).tril()[None, None].expand(2, 1, 7, 7)
    shared = original.model.rotary_emb(hidden, torch.arange(7)[None])
    fused_calls = [
        dict(position_embeddings=shared, attention_mask=causal),
        dict(position_embeddings=original.model.rotary_emb(hidden, per_row), attention_mask=None),
        dict(position_embeddings=shared, attention_mask=torch.zeros(2, 1, 7, 7).masked_fill(~causal, -torch.inf)),
    ]
    hi = copy.deepcopy(attn_original).double()
    with torch.no_grad():
        for call in fused_calls:
            call_hi = {k: (tuple(t.double() for t in v) if isinstance(v, tuple) else
                           v.double() if v is not None and v.is_floating_point() else v) for k, v in call.items()}
            assert_within_2x("attention", attn(hidden, **call)[0], hi(hidden.double(), **call_hi)[0].float(),
                             attn_original(hidden, **call)[0], floor=default_floor(torch.float32))
    assert attn.fused_calls == 3 and attn.fallback_calls == 0
    falls_back = [
        (dict(position_embeddings=shared, attention_mask=torch.ones(2, 1, 7, 7, dtype=torch.bool)),
         "an attention mask that is neither causal documents nor padding"),
        (dict(position_embeddings=shared, attention_mask=torch.randn(2, 1, 7, 7)), "an additive attention mask"),
    ]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for call, reason in falls_back:
            torch.testing.assert_close(attn(hidden, **call)[0], attn_original(hidden, **call)[0], rtol=0, atol=0)
            assert any(r.startswith(reason) for r in attn.fallback_reasons), (reason, attn.fallback_reasons)
    assert attn.fused_calls == 3 and attn.fallback_calls == 2


def test_compiled_training_step_is_one_graph_and_matches():
    """torch.compile(fullgraph=True) of a replaced LlamaForCausalLM: one graph, no break, our kernels
    and the fused loss inside (no lm_head GEMM), and a training step equal to the unpatched model's."""
    original = hf_model().train()
    fused = copy.deepcopy(original)
    replace_modules(fused)
    tokens = torch.randint(0, 256, (2, 13))
    torch._dynamo.reset()
    masks = []  # whether transformers passes a mask tensor to the attention while compiling (4.57 does)
    fused.model.layers[0].self_attn.register_forward_pre_hook(
        lambda module, args, kwargs: masks.append(kwargs.get("attention_mask") is not None), with_kwargs=True
    )
    explained = torch._dynamo.explain(fused)(tokens, labels=tokens)
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons
    targets = {str(n.target) for g in explained.graphs for n in g.graph.nodes if n.op == "call_function"}
    expected = {"llama_fast.rms_norm_forward.default", "llama_fast.swiglu_forward.default"}
    if masks == [False]:  # no mask: the fused attention is in the graph (else its fallback, the original)
        expected.add("llama_fast.attention.default")
    assert expected <= targets, (expected, targets)
    linears = sum(str(n.target) == "<built-in function linear>" for g in explained.graphs for n in g.graph.nodes)
    assert linears == 2 * 7  # q, k, v, o, gate, up, down per layer; no lm_head: the loss applies it chunk-wise

    compiled = torch.compile(fused, fullgraph=True)
    loss = compiled(tokens, labels=tokens).loss
    loss.backward()
    loss_original = original(tokens, labels=tokens).loss
    loss_original.backward()
    torch.testing.assert_close(loss, loss_original, rtol=1e-5, atol=1e-5)
    for (name, p), q in zip(fused.named_parameters(), original.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=lambda m: f"grad {name}: {m}")
    torch._dynamo.reset()


# ---------------------------------------------------------------------------------------------
# The fused linear cross-entropy of a causal LM
# ---------------------------------------------------------------------------------------------
def labelled(batch=2, seq=17, vocab=256):
    tokens = torch.randint(0, vocab, (batch, seq))
    labels = tokens.clone()
    labels[0, :5] = -100  # a prompt not trained on
    labels[1, -3:] = -100  # padding
    return tokens, labels


def causal_lm_loss_and_grads(model, tokens, labels, **kwargs):
    model.zero_grad(set_to_none=True)
    out = model(tokens, labels=labels, **kwargs)
    out.loss.backward()
    return out, {n: p.grad.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("num_items_in_batch", [None, 37, "tensor"])
def test_fused_loss_matches_and_never_makes_logits(num_items_in_batch):
    """Training with labels: the loss (shifted labels, ignore_index, num_items_in_batch) and every
    gradient match the unpatched model (2x rule), and lm_head never runs: no [B, S, vocab] logits."""
    if num_items_in_batch is not None and not TAKES_LOSS_KWARGS:
        pytest.skip(f"transformers {transformers.__version__} has no num_items_in_batch (4.46 added it)")
    if num_items_in_batch == "tensor":
        num_items_in_batch = torch.tensor(29)
    kwargs = {} if num_items_in_batch is None else {"num_items_in_batch": num_items_in_batch}
    original = hf_model(tie_word_embeddings=True).train()
    fused = copy.deepcopy(original)
    report = replace_modules(fused)
    assert report.names["cross_entropy"] == ["<root>"]
    head_calls = []
    fused.lm_head.register_forward_hook(lambda *args: head_calls.append(1))
    tokens, labels = labelled()
    out, grads = causal_lm_loss_and_grads(fused, tokens, labels, **kwargs)
    hi, grads_hi = causal_lm_loss_and_grads(copy.deepcopy(original).double(), tokens, labels, **kwargs)
    lo, grads_lo = causal_lm_loss_and_grads(original, tokens, labels, **kwargs)
    assert out.logits is None and not head_calls and fused.fused_calls == 1
    floor = default_floor(torch.float32)
    assert_within_2x("loss", out.loss.detach(), hi.loss.detach().float(), lo.loss.detach(), floor=floor)
    assert set(grads) == set(grads_lo)
    for name in grads:
        assert_within_2x(f"grad {name}", grads[name], grads_hi[name].float(), grads_lo[name], floor=floor)


def test_calls_without_the_fused_loss_are_unchanged():
    """No labels (generation, logits), logits_to_keep, and evaluation with labels run the original
    forward: the same outputs as the model replaced with cross_entropy=False, bit for bit."""
    plain = hf_model().train()
    replace_modules(plain, cross_entropy=False)
    fused = copy.deepcopy(plain)
    fused.__class__ = type(hf_model())  # the copy's LM class unswapped, then given the fused loss
    report = replace_modules(fused, rms_norm=False, swiglu=False, attention=False)
    assert report.counts == {"cross_entropy": 1}
    tokens, labels = labelled()
    with torch.no_grad():
        for kwargs in ({}, {LOGITS_TO_KEEP: 1}):
            torch.testing.assert_close(fused(tokens, **kwargs).logits, plain(tokens, **kwargs).logits, rtol=0, atol=0)
        fused.eval(), plain.eval()
        a, b = fused(tokens, labels=labels), plain(tokens, labels=labels)
    torch.testing.assert_close(a.logits, b.logits, rtol=0, atol=0)
    torch.testing.assert_close(a.loss, b.loss, rtol=0, atol=0)
    assert fused.fused_calls == 0 and dict(fused.fallback_reasons) == {
        "evaluation mode (the logits are returned for metrics)": 1
    }


def test_fused_loss_peak_memory_for_a_32k_vocab_b4_s2048_step():
    """The loss step of a 32k-vocabulary model at batch 4 x 2048 in bf16, counted on the meta device
    (MemTracker, as benchmarks/estimate_memory.py counts): the unpatched model's peak holds the
    [B, S, vocab] logits several times over (bf16, their fp32 copy, the gradients), the fused loss one
    chunk of them. A one-layer, 64-wide, one-head model, so the head and the loss dominate (the
    unfused attention on meta, SDPA's math path, holds [B, 1, S, S] scores in both)."""
    from torch.distributed._tools.mem_tracker import MemTracker

    batch, seq, vocab = 4, 2048, 32000
    with torch.device("meta"):
        rotary = hf_model(num_hidden_layers=1).model.rotary_emb
    try:
        rotary(torch.zeros(1, 2, 64, device="meta"), torch.arange(2, device="meta")[None])
    except RuntimeError as error:
        pytest.skip(f"transformers {transformers.__version__}'s rotary embedding cannot run on meta: {error}")

    def peak_bytes(replace: bool) -> int:
        with torch.device("meta"):
            model = hf_model(vocab_size=vocab, num_hidden_layers=1, num_attention_heads=1, num_key_value_heads=1,
                             max_position_embeddings=seq).to(torch.bfloat16)
        if replace:  # on meta the rotary tables cannot be checked: the attention stays (it is not the point)
            replace_modules(model, attention=False)
        model.train()
        tokens = torch.randint(0, vocab, (batch, seq), device="meta")
        tracker = MemTracker()
        tracker.track_external(model, tokens)
        with tracker:  # use_cache=True: a cache present, transformers reads no position ids (no values on meta)
            model(tokens, labels=tokens, use_cache=True).loss.backward()
        snapshot = tracker.get_tracker_snapshot("peak")
        return next(v["Total"] for dev, v in snapshot.items() if torch.device(dev).type == "meta")

    logits_bf16 = batch * seq * vocab * 2
    unpatched, fused = peak_bytes(False), peak_bytes(True)
    print(f"loss step peak, vocab {vocab} B{batch} S{seq} bf16: unpatched {unpatched / 2**30:.2f} GiB, "
          f"fused {fused / 2**30:.2f} GiB")
    assert unpatched > 3 * logits_bf16  # bf16 logits, their fp32 copy, its gradient, ...
    assert fused < logits_bf16  # a chunk of logits (64 Mi elements), the attention's scores and the model
    assert unpatched - fused > 2 * logits_bf16


# ---------------------------------------------------------------------------------------------
# Per-kernel switches
# ---------------------------------------------------------------------------------------------
def test_switches_leave_their_kind_untouched_and_the_report_says_why():
    original = hf_model()
    model = copy.deepcopy(original)
    report = replace_modules(model, rms_norm=False, attention=False)
    assert report.counts == {"MLP": 2, "cross_entropy": 1}
    assert type(model.model.norm) is type(original.model.norm)
    assert type(model.model.layers[0].self_attn) is type(original.model.layers[0].self_attn)
    assert ("model.layers.1.self_attn", "attention", "attention=False") in report.left
    assert ("model.norm", "RMSNorm", "rms_norm=False") in report.left and len(report.left) == 5 + 2
    assert str(report) == (
        "llama_fast replaced 2 MLP, 1 cross_entropy; left 5 RMSNorm (rms_norm=False), 2 attention (attention=False)"
    )
    # A kind the kernels cannot serve is refused with the switch that leaves it alone, and served without it.
    gelu = hf_model(hidden_act="gelu")
    with pytest.raises(ValueError, match=r"activation must be SiLU, got .* \(or pass swiglu=False\)"):
        replace_modules(gelu)
    assert replace_modules(gelu, swiglu=False).counts == {"RMSNorm": 5, "attention": 2, "cross_entropy": 1}
    with pytest.raises(TypeError, match="attention must be True or False, got 'no'"):
        replace_modules(hf_model(), attention="no")
    # A causal LM whose forward is not LlamaForCausalLM's keeps its loss; the report says why.
    class ScaledLogits(type(original)):
        def forward(self, *args, **kwargs):
            return super().forward(*args, **kwargs)

    scaled = hf_model()
    scaled.__class__ = ScaledLogits
    report = replace_modules(scaled)
    assert "cross_entropy" not in report.counts
    assert report.left == [("<root>", "cross_entropy", "ScaledLogits.forward is not LlamaForCausalLM's (the fused "
                                                       "loss serves that forward)")]


def test_switches_on_our_llama():
    config = LlamaConfig.from_name("tiny", vocab_size=300)
    model = Llama(config, backend="reference")
    report = replace_modules(model, attention=False, cross_entropy=False)
    assert report.counts == {"RMSNorm": 5, "MLP": 2}
    assert model.layers[0].attn.backend == "reference" and model.layers[0].mlp.backend == "fused"
    assert model.backend == "reference" and not model.fused_loss
    assert ("<root>", "cross_entropy", "cross_entropy=False") in report.left


# ---------------------------------------------------------------------------------------------
# After (and before) peft
# ---------------------------------------------------------------------------------------------
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def lora(model):
    peft = pytest.importorskip("peft", reason="the PEFT tests wrap the model with peft's LoRA")
    torch.manual_seed(1)  # the same adapters for every copy; init_lora_weights=False: B != 0, so LoRA counts
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=LORA_TARGETS,
                             modules_to_save=["lm_head"], init_lora_weights=False)
    return peft.get_peft_model(model, config)


@pytest.mark.parametrize("order", ["wrap_then_replace", "replace_then_wrap"])
def test_lora_gradients_and_merge_match_the_unpatched_model(order):
    """LoRA on every projection plus modules_to_save=["lm_head"], in both orders: the fused kernels
    run through the wrapped projections, the trainable parameters' gradients match the unpatched
    peft model (2x rule), and merge_and_unload() afterwards gives its logits."""
    original = hf_model().train()
    if order == "wrap_then_replace":
        reference = lora(original)
        fused = copy.deepcopy(reference)
        report = replace_modules(fused)
    else:
        fused = copy.deepcopy(original)
        report = replace_modules(fused)
        reference, fused = lora(original), lora(fused)
    assert report.counts == {"RMSNorm": 5, "MLP": 2, "attention": 2, "cross_entropy": 1}, report.counts
    tokens, labels = labelled()

    def trainable_grads(model):
        model.zero_grad(set_to_none=True)
        out = model(input_ids=tokens, labels=labels)
        out.loss.backward()
        return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    loss, grads = trainable_grads(fused)
    loss_hi, grads_hi = trainable_grads(copy.deepcopy(reference).double())
    loss_lo, grads_lo = trainable_grads(reference)
    inner = fused.base_model.model
    assert inner.fused_calls == 1 and inner.model.layers[0].self_attn.fused_calls == 1
    assert any("lora_A" in n for n in grads) and any("modules_to_save" in n for n in grads)
    assert set(grads) == set(grads_lo)
    floor = default_floor(torch.float32)
    assert_within_2x("loss", loss, loss_hi.float(), loss_lo, floor=floor)
    for name in grads:
        assert_within_2x(f"grad {name}", grads[name], grads_hi[name].float(), grads_lo[name], floor=floor)

    merged, merged_reference = fused.merge_and_unload(), reference.merge_and_unload()
    assert isinstance(merged.model.layers[0].self_attn.q_proj, nn.Linear)
    with torch.no_grad():
        logits, logits_reference = merged(tokens).logits, merged_reference(tokens).logits
    assert merged.model.layers[0].self_attn.fused_calls == 2
    torch.testing.assert_close(logits, logits_reference, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# With transformers' Trainer
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("with_lora", [False, True])
def test_trainer_losses_agree_with_and_without_the_replacement(tmp_path, with_lora):
    """Three optimizer steps of transformers.Trainer on the CPU (gradient accumulation 2, so the
    Trainer passes num_items_in_batch) on a tiny random LlamaForCausalLM, with and without
    replace_modules (the one line a Trainer user adds), with and without LoRA: the losses agree."""
    pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate")
    torch.manual_seed(0)
    tokens, labels = labelled(batch=12, seq=15)
    rows = [{"input_ids": t, "labels": y} for t, y in zip(tokens, labels)]

    def train(replace: bool):
        model = hf_model().train()
        if with_lora:
            model = lora(model)
        if replace:
            replace_modules(model)
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path / f"run_{replace}"), max_steps=3, per_device_train_batch_size=2,
            gradient_accumulation_steps=2, learning_rate=3e-3, logging_steps=1, report_to=[], use_cpu=True,
            save_strategy="no", disable_tqdm=True, seed=0,
        )
        trainer = transformers.Trainer(model=model, args=args, train_dataset=rows)
        trainer.train()
        return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry], model

    torch.manual_seed(0)
    plain, _ = train(replace=False)
    torch.manual_seed(0)
    fused, model = train(replace=True)
    inner = model.base_model.model if with_lora else model
    assert inner.fused_calls == 3 * 2 and inner.model.layers[0].self_attn.fused_calls == 3 * 2
    assert len(plain) == 3
    torch.testing.assert_close(torch.tensor(fused), torch.tensor(plain), rtol=1e-4, atol=1e-4)
    assert plain[-1] != plain[0]  # the steps changed the model


try:
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS  # noqa: F401
    HAS_ATTENTION_INTERFACE = hasattr(transformers, "AttentionInterface")
except ImportError:
    HAS_ATTENTION_INTERFACE = False
needs_interface = pytest.mark.skipif(not HAS_ATTENTION_INTERFACE,
                                     reason="attn_implementation='llama_fast' needs transformers >= 4.56's interfaces")


def documents_alone(model, tokens, cu):
    """Logits of each document of a one-row packed batch run alone through the model."""
    return torch.cat([model(tokens[:, s:e], use_cache=False).logits
                      for s, e in zip(cu[:-1].tolist(), cu[1:].tolist())], dim=1)


@needs_interface
@pytest.mark.parametrize("replace", [False, True], ids=["interface_only", "with_replace_modules"])
def test_llama_fast_attention_implementation_separates_packed_documents(replace):
    """attn_implementation="llama_fast": packed rows behave as under flash_attention_2 (documents separated by
    restarting position ids or by cu_seq_lens_q/k), padding as under SDPA, without flash-attn."""
    llama_fast.register_hf_attention()
    base = hf_model()
    ours = hf_model(attn_implementation="llama_fast")
    ours.load_state_dict(base.state_dict())
    if replace:
        replace_modules(ours, cross_entropy=False)
    lengths = [4, 1, 6]
    tokens = torch.randint(0, 256, (1, 11))
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    cu = torch.tensor([0, 4, 5, 11], dtype=torch.int32)
    with torch.no_grad():
        want = documents_alone(base, tokens, cu)
        for kwargs in (dict(position_ids=positions), dict(position_ids=positions, use_cache=False)):
            torch.testing.assert_close(ours(tokens, **kwargs).logits, want, rtol=1e-4, atol=1e-4)
        attn = ours.model.layers[0].self_attn
        if replace:
            assert attn.fused_calls == 2 and attn.fallback_calls == 0, attn.fallback_reasons
        mask = torch.ones(2, 9, dtype=torch.long)
        mask[1, :3] = 0
        padded = torch.randint(0, 256, (2, 9))
        torch.testing.assert_close(ours(padded, attention_mask=mask, use_cache=False).logits,
                                   base(padded, attention_mask=mask, use_cache=False).logits, rtol=1e-4, atol=1e-4)


@needs_interface
def test_llama_fast_attention_function_uses_the_kernels_and_hands_over_the_rest(monkeypatch):
    from llama_fast import ops
    from llama_fast import replace as replace_module

    llama_fast.register_hf_attention()
    calls = []
    real = ops.attention
    monkeypatch.setattr(ops, "attention", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    base = hf_model()
    ours = hf_model(attn_implementation="llama_fast")
    ours.load_state_dict(base.state_dict())
    tokens = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens).logits, base(tokens).logits, rtol=1e-4, atol=1e-4)
        assert len(calls) == 2  # one per layer: our kernel ran
        # Decoding with cached keys goes to SDPA's function: generate equals the unpatched model's.
        prompt = torch.randint(0, 256, (1, 5))
        kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
        assert torch.equal(ours.generate(prompt, **kw), base.generate(prompt, **kw))
    assert replace_module._documents_from_positions(torch.arange(6)[None]) is None
    assert replace_module._documents_from_positions(torch.tensor([[0, 1, 0, 1, 2]])).tolist() == [0, 2, 5]


@needs_interface
def test_llama_fast_attention_function_hands_over_what_it_does_not_know():
    """is_causal=False and unknown keywords go to SDPA's function (its result exactly)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from llama_fast.replace import hf_attention_forward

    module = hf_model().model.layers[0].self_attn
    q, k, v = torch.randn(1, 4, 6, 16), torch.randn(1, 2, 6, 16), torch.randn(1, 2, 6, 16)
    for extra in (dict(is_causal=False), dict(s_aux=torch.zeros(4))):
        want = sdpa_attention_forward(module, q, k, v, None, scaling=0.25, **extra)[0]
        got = hf_attention_forward(module, q, k, v, None, scaling=0.25, **extra)[0]
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    causal = hf_attention_forward(module, q, k, v, None, scaling=0.25, is_causal=True)[0]
    assert not torch.allclose(causal, sdpa_attention_forward(module, q, k, v, None, scaling=0.25, is_causal=False)[0])


@needs_interface
def test_one_row_batches_compile_without_graph_breaks_under_llama_fast():
    """The packed-row check (restarting position ids) reads values: it is skipped while compiling."""
    llama_fast.register_hf_attention()
    model = hf_model(attn_implementation="llama_fast")
    replace_modules(model, cross_entropy=False)
    explanation = torch._dynamo.explain(model)(torch.randint(0, 256, (1, 12)))
    assert explanation.graph_break_count == 0, explanation.break_reasons
