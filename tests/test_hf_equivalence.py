"""Our reference model against Hugging Face transformers' LlamaForCausalLM, on the same random weights.

The transformers model is built from a LlamaConfig made here (no download); its weights are moved
into ours with llama_fast.convert.state_from_hf. Logits, loss and gradients must agree in fp32.
"""
import pytest
import torch

from llama_fast import Llama
from llama_fast.convert import build_model, config_from_hf, state_from_hf

transformers = pytest.importorskip("transformers")

CONFIGS = {
    "mha": dict(num_attention_heads=4, num_key_value_heads=4),
    "gqa-theta500k": dict(num_attention_heads=4, num_key_value_heads=2, rope_theta=500000.0),
    "gqa-tied": dict(num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=True),
}


def make_hf_model(**overrides):
    """A tiny transformers LlamaForCausalLM with every weight random (norm weights too, not ones)."""
    kwargs = dict(
        hidden_size=64,
        num_hidden_layers=2,
        intermediate_size=176,
        vocab_size=256,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        attn_implementation="eager",
    )
    hf_config = transformers.LlamaConfig(**{**kwargs, **overrides})
    model = transformers.LlamaForCausalLM(hf_config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.1 * torch.randn_like(p) if name.endswith("norm.weight") else 0.05 * torch.randn_like(p))
    return model


def ours_from_hf(hf_model) -> Llama:
    config = config_from_hf(hf_model.config.to_dict())
    return build_model(config, state_from_hf(config, hf_model.state_dict()))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_logits_and_loss_match_transformers(name):
    hf_model = make_hf_model(**CONFIGS[name])
    ours = ours_from_hf(hf_model)
    assert ours.config.n_kv_heads == hf_model.config.num_key_value_heads
    assert ours.config.rope_theta == CONFIGS[name].get("rope_theta", 10000.0)
    tokens = torch.randint(0, 256, (2, 23))
    # transformers shifts labels inside; ours takes next-token targets, -100 where none.
    targets = torch.cat([tokens[:, 1:], torch.full((2, 1), -100)], dim=1)
    with torch.no_grad():
        hf_out = hf_model(input_ids=tokens, labels=tokens)
        logits, loss = ours(tokens, targets)
    assert (logits - hf_out.logits).abs().max().item() <= 1e-4
    torch.testing.assert_close(loss, hf_out.loss, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["gqa-theta500k", "gqa-tied"])
def test_gradients_match_transformers(name):
    hf_model = make_hf_model(**CONFIGS[name])
    ours = ours_from_hf(hf_model)
    tokens = torch.randint(0, 256, (2, 17))
    targets = torch.cat([tokens[:, 1:], torch.full((2, 1), -100)], dim=1)
    hf_model(input_ids=tokens, labels=tokens).loss.backward()
    ours(tokens, targets)[1].backward()

    hf = dict(hf_model.named_parameters())
    q_rows = ours.config.n_heads * ours.config.head_dim
    k_rows = ours.config.n_kv_heads * ours.config.head_dim
    f = ours.config.ffn_hidden
    layer = ours.layers[1]
    pairs = {
        "q_proj": (layer.attn.wqkv.weight.grad[:q_rows], hf["model.layers.1.self_attn.q_proj.weight"].grad),
        "k_proj": (layer.attn.wqkv.weight.grad[q_rows : q_rows + k_rows], hf["model.layers.1.self_attn.k_proj.weight"].grad),
        "v_proj": (layer.attn.wqkv.weight.grad[q_rows + k_rows :], hf["model.layers.1.self_attn.v_proj.weight"].grad),
        "up_proj": (layer.mlp.w_gate_up.weight.grad[f:], hf["model.layers.1.mlp.up_proj.weight"].grad),
        "input_layernorm": (layer.attn_norm.weight.grad, hf["model.layers.1.input_layernorm.weight"].grad),
        "embed_tokens": (ours.embed.weight.grad, hf["model.embed_tokens.weight"].grad),
    }
    for name, (mine, theirs) in pairs.items():
        assert mine.abs().max() > 0, f"{name}: zero gradient, the comparison would prove nothing"
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
