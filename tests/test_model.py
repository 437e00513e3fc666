"""The reference model's basics: config validation, shapes, KV-cache decoding, meta-device build."""
import pytest
import torch

from llama_fast import KVCache, Llama, LlamaConfig


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(dim=64, n_heads=5), r"LlamaConfig\.dim \(64\) must be divisible by n_heads \(5\)"),
        (dict(n_heads=4, n_kv_heads=3), r"LlamaConfig\.n_heads \(4\) must be divisible by n_kv_heads \(3\)"),
        (dict(n_layers=0), r"LlamaConfig\.n_layers must be a positive int, got 0"),
        (dict(vocab_size=256.0), r"LlamaConfig\.vocab_size must be a positive int, got 256\.0"),
        (dict(dim=36, n_heads=4), r"head_dim \(dim / n_heads\) must be even for RoPE, got 9"),
    ],
    ids=["dim-heads", "gqa-ratio", "layers", "float-vocab", "odd-head-dim"],
)
def test_config_errors_name_the_field(overrides, message):
    with pytest.raises(ValueError, match=message):
        LlamaConfig.from_name("tiny", **overrides)


def test_config_dict_round_trip_rejects_unknown_fields():
    config = LlamaConfig.from_name("tiny", rope_theta=500000.0)
    assert LlamaConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match=r"unknown LlamaConfig fields \['hidden_size'\]"):
        LlamaConfig.from_dict({**config.to_dict(), "hidden_size": 64})


def test_forward_shapes_and_loss():
    model = Llama(LlamaConfig.from_name("tiny"))
    tokens = torch.randint(0, 256, (3, 17))
    logits, loss = model(tokens, targets=tokens)
    assert logits.shape == (3, 17, 256) and loss.shape == ()
    # Random init: the loss is near log(vocab).
    assert abs(loss.item() - torch.log(torch.tensor(256.0)).item()) < 0.5
    with pytest.raises(ValueError, match=r"exceeds max_seq_len=128"):
        model(torch.randint(0, 256, (1, 129)))
    with pytest.raises(ValueError, match=r"tokens must be \[batch, seq_len\]"):
        model(torch.randint(0, 256, (17,)))
    with pytest.raises(TypeError, match=r"tokens must be int64 or int32 token ids, got torch.float32"):
        model(torch.zeros(1, 4))
    with pytest.raises(ValueError, match=r"tokens must be ids in \[0, vocab_size=256\), got \[256, -1\] \(first of 2"):
        model(torch.tensor([[0, 256, 5, -1]]))
    ok = torch.tensor([[0, 3, 5, 255]])
    for fused_loss in (False, True):  # the reference loss too: on CUDA it would assert on the device
        m = Llama(LlamaConfig.from_name("tiny"), fused_loss=fused_loss)
        with pytest.raises(ValueError, match=r"targets must be ids in \[0, vocab_size=256\) or -100 \(ignored\), "
                                             r"got \[300\] \(first of 1"):
            m(ok, torch.tensor([[1, -100, 300, 2]]))
        with pytest.raises(TypeError, match="targets must be int64 or int32 token ids, got torch.float32"):
            m(ok, ok.float())
        m(ok, torch.tensor([[1, -100, 255, 2]]))  # ignored positions and the last id are fine


def test_kv_cache_errors_name_the_cache():
    config = LlamaConfig.from_name("tiny")
    model = Llama(config)
    with pytest.raises(ValueError, match=r"KVCache batch must be a positive int, got 0"):
        KVCache.empty(config, 0, 8, "cpu", torch.float32)
    with pytest.raises(ValueError, match=r"KVCache max_len must be an int in \[1, max_seq_len=128\], got 129"):
        KVCache.empty(config, 1, 129, "cpu", torch.float32)
    cache = KVCache.empty(config, 1, 8, "cpu", torch.float32)
    with pytest.raises(ValueError, match=r"cache holds 2 layers x batch 1 x 8 positions; this call needs 2 layers x "
                                         r"batch 2 x 5 positions"):
        model(torch.zeros(2, 5, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match=r"this call needs 2 layers x batch 1 x 9 positions \(cache.pos=0 \+ 9"):
        model(torch.zeros(1, 9, dtype=torch.long), cache=cache)


def test_kv_cache_decoding_equals_full_forward():
    model = Llama(LlamaConfig.from_name("tiny"))
    tokens = torch.randint(0, 256, (2, 13))
    with torch.no_grad():
        full, _ = model(tokens)
        cache = KVCache.empty(model.config, batch=2, max_len=13, device="cpu", dtype=torch.float32)
        prefill, _ = model(tokens[:, :8], cache=cache)
        steps = [model(tokens[:, i : i + 1], cache=cache)[0] for i in range(8, 13)]
    torch.testing.assert_close(torch.cat([prefill, *steps], dim=1), full, rtol=1e-5, atol=1e-5)
    assert cache.pos == 13


def test_meta_device_build_then_init_weights():
    config = LlamaConfig.from_name("tiny")
    with torch.device("meta"):
        model = Llama(config)
    assert all(p.is_meta for p in model.parameters())
    model.to_empty(device="cpu")
    model.init_weights(seed=1)
    eager = Llama(config)
    eager.init_weights(seed=1)
    for (name, p), q in zip(model.named_parameters(), eager.parameters()):
        assert torch.equal(p, q), name
    assert torch.equal(model.rope_cos, eager.rope_cos) and torch.equal(model.rope_sin, eager.rope_sin)
    tokens = torch.randint(0, 256, (1, 9))
    with torch.no_grad():
        assert torch.equal(model(tokens)[0], eager(tokens)[0])
    with torch.device("meta"):
        tied = Llama(LlamaConfig.from_name("tiny", tie_embeddings=True))
    tied.to_empty(device="cpu")  # gives every parameter its own tensor: the model ties them again
    assert tied.lm_head.weight is tied.embed.weight and len(list(tied.parameters())) == len(list(model.parameters())) - 1


def test_document_starts():
    from llama_fast.model import document_starts

    tokens = torch.tensor([[5, 2, 7, 2, 2], [1, 1, 1, 1, 2]])  # eos = 2
    assert document_starts(tokens, 2).tolist() == [0, 2, 4, 5, 10]
    assert document_starts(tokens, 2).dtype == torch.int32


@pytest.mark.parametrize("backend, recompute", [("reference", "none"), ("fused", "none"), ("fused", "cheap"),
                                                ("fused", "blocks")])
def test_documents_attend_to_themselves_with_restarting_positions(backend, recompute):
    """forward(documents=...) gives each document the logits and gradients of running it alone."""
    from llama_fast.model import document_starts
    from llama_fast.testing import default_floor

    torch.manual_seed(0)
    model = Llama(LlamaConfig.from_name("tiny", vocab_size=64, n_layers=2), backend, recompute=recompute).train()
    tokens = torch.randint(3, 64, (2, 13))
    tokens[0, 4] = tokens[0, 5] = tokens[1, 9] = 2  # eos: documents [0:5] [5:6] [6:13] | [0:10] [10:13]
    docs = document_starts(tokens, 2)
    targets = torch.randint(0, 64, (2, 13))

    def grads(loss):
        model.zero_grad()
        loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    def loss_of(logits, t):
        return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), t.flatten(), reduction="sum")

    model.fused_loss = False
    logits, _ = model(tokens, documents=docs)
    packed = grads(loss_of(logits, targets))
    pieces = [(b, s - b * 13, e - b * 13) for s, e in zip(docs[:-1].tolist(), docs[1:].tolist()) for b in [s // 13]]
    assert len(pieces) == 5
    alone_logits = torch.zeros_like(logits)
    total = 0
    for b, s, e in pieces:
        out, _ = model(tokens[b:b + 1, s:e])
        alone_logits[b, s:e] = out[0].detach()
        total = total + loss_of(out, targets[b:b + 1, s:e])
    alone = grads(total)
    floor = default_floor(torch.float32) * 10
    torch.testing.assert_close(logits.detach(), alone_logits, rtol=0, atol=floor)
    for name in packed:
        torch.testing.assert_close(packed[name], alone[name], rtol=1e-4, atol=floor, msg=name)
    plain, _ = model(tokens)  # without documents the later documents see the earlier ones
    assert not torch.allclose(plain[0, 5:], logits[0, 5:].detach(), atol=1e-3)


def test_documents_must_split_at_every_row():
    model = Llama(LlamaConfig.from_name("tiny", vocab_size=64, n_layers=1))
    tokens = torch.randint(0, 64, (2, 4))
    with pytest.raises(ValueError, match="a document cannot span two rows"):
        model(tokens, documents=torch.tensor([0, 3, 7, 8], dtype=torch.int32))
    with pytest.raises(ValueError, match="documents must be 1-D int32"):
        model(tokens, documents=torch.tensor([0, 4, 8]))
