"""Weights import and export (llama_fast.convert): Hugging Face, Meta and our own file, and bad input.

Meta checkpoints are written here with random weights. Their logits are checked against a forward
pass written in this file the way Meta's code runs it: interleaved RoPE as complex multiplication
(torch.view_as_complex) on the unpermuted weights, so the q/k permutation is verified, not only
round-tripped.
"""
import json

import pytest
import torch
import torch.nn.functional as F

from llama_fast import Llama, LlamaConfig, reference
from llama_fast.cli import main as cli_main
from llama_fast.convert import (
    build_model,
    config_from_hf,
    load_hf_state,
    load_meta_state,
    load_pretrained,
    load_weights,
    parse_dtype,
    save_hf,
    save_weights,
)

# Meta's FFN size for dim 64, multiple_of 32, ffn_dim_multiplier 1.3:
# int(2 * 256 / 3) = 170 -> int(1.3 * 170) = 221 -> rounded up to a multiple of 32 = 224.
META_PARAMS = dict(
    dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, multiple_of=32, ffn_dim_multiplier=1.3,
    norm_eps=1e-5, rope_theta=500000.0,
)
META_FFN = 224


def random_model(**overrides) -> Llama:
    """Our reference model, tiny, with random norm weights too (init_weights sets them to one)."""
    config = LlamaConfig(**{**dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256,
                                    ffn_hidden=176, max_seq_len=64), **overrides})
    model = Llama(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
    return model


def assert_same_state(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert torch.equal(a[name], b[name]), name


# ----------------------------------------------------------------------------------------------
# Meta: a fake checkpoint and Meta's own forward pass.


def meta_weights(params: dict) -> dict[str, torch.Tensor]:
    d, hd = params["dim"], params["dim"] // params["n_heads"]
    v, f = params["vocab_size"], META_FFN
    w = {"tok_embeddings.weight": torch.randn(v, d), "norm.weight": 1 + 0.1 * torch.randn(d),
         "output.weight": 0.05 * torch.randn(v, d), "rope.freqs": torch.randn(hd // 2)}
    for i in range(params["n_layers"]):
        p = f"layers.{i}."
        w |= {
            p + "attention_norm.weight": 1 + 0.1 * torch.randn(d),
            p + "attention.wq.weight": 0.1 * torch.randn(params["n_heads"] * hd, d),
            p + "attention.wk.weight": 0.1 * torch.randn(params["n_kv_heads"] * hd, d),
            p + "attention.wv.weight": 0.1 * torch.randn(params["n_kv_heads"] * hd, d),
            p + "attention.wo.weight": 0.1 * torch.randn(d, params["n_heads"] * hd),
            p + "ffn_norm.weight": 1 + 0.1 * torch.randn(d),
            p + "feed_forward.w1.weight": 0.1 * torch.randn(f, d),
            p + "feed_forward.w3.weight": 0.1 * torch.randn(f, d),
            p + "feed_forward.w2.weight": 0.1 * torch.randn(d, f),
        }
    return w


def write_meta(path, params: dict, weights: dict, n_shards: int = 1, embedding_split_dim: int = 1):
    """Meta's layout: column-parallel split on dim 0, row-parallel on dim 1, norms replicated."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "params.json").write_text(json.dumps(params))
    column = ("wq.weight", "wk.weight", "wv.weight", "w1.weight", "w3.weight", "output.weight")
    row = ("wo.weight", "w2.weight")
    for rank in range(n_shards):
        shard = {}
        for name, t in weights.items():
            if n_shards == 1 or t.dim() == 1:
                shard[name] = t.clone()
                continue
            dim = 0 if name.endswith(column) else 1 if name.endswith(row) else embedding_split_dim
            shard[name] = t.chunk(n_shards, dim=dim)[rank].clone()
        torch.save(shard, path / f"consolidated.{rank:02d}.pth")
    return path


def meta_forward(w: dict, params: dict, tokens: torch.Tensor) -> torch.Tensor:
    """LLaMA as Meta's model.py computes it: RoPE rotates interleaved pairs as complex numbers."""
    B, S = tokens.shape
    H, Hkv, eps = params["n_heads"], params["n_kv_heads"], params["norm_eps"]
    hd = params["dim"] // H
    inv_freq = 1.0 / params["rope_theta"] ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    angles = torch.outer(torch.arange(S, dtype=torch.float64), inv_freq)
    freqs_cis = torch.polar(torch.ones_like(angles), angles)[None, :, None, :]  # (1, S, 1, D/2) complex

    def rotate(x):  # x (B, S, H, D): pairs (2i, 2i+1) are the complex number x[2i] + j x[2i+1]
        xc = torch.view_as_complex(x.double().reshape(*x.shape[:-1], hd // 2, 2))
        return torch.view_as_real(xc * freqs_cis).flatten(3).float()

    x = w["tok_embeddings.weight"][tokens]
    for i in range(params["n_layers"]):
        p = f"layers.{i}."
        h = reference.rms_norm(x, w[p + "attention_norm.weight"], eps)
        q = rotate((h @ w[p + "attention.wq.weight"].T).view(B, S, H, hd))
        k = rotate((h @ w[p + "attention.wk.weight"].T).view(B, S, Hkv, hd))
        v = (h @ w[p + "attention.wv.weight"].T).view(B, S, Hkv, hd)
        k, v = k.repeat_interleave(H // Hkv, dim=2), v.repeat_interleave(H // Hkv, dim=2)
        att = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        x = x + att.transpose(1, 2).reshape(B, S, H * hd) @ w[p + "attention.wo.weight"].T
        h = reference.rms_norm(x, w[p + "ffn_norm.weight"], eps)
        gate, up = h @ w[p + "feed_forward.w1.weight"].T, h @ w[p + "feed_forward.w3.weight"].T
        x = x + reference.swiglu(gate, up) @ w[p + "feed_forward.w2.weight"].T
    return reference.rms_norm(x, w["norm.weight"], eps) @ w["output.weight"].T


@pytest.mark.parametrize(
    "n_shards, embedding_split_dim, vocab_in_params",
    [(1, 1, 256), (2, 1, -1), (2, 0, 256)],
    ids=["1-shard", "2-shards-llama1-embedding", "2-shards-llama3-embedding"],
)
def test_meta_import_matches_meta_forward(tmp_path, n_shards, embedding_split_dim, vocab_in_params):
    weights = meta_weights(META_PARAMS)
    params = {**META_PARAMS, "vocab_size": vocab_in_params}  # LLaMA 1 writes -1 and leaves it to the tokenizer
    write_meta(tmp_path / "meta", params, weights, n_shards, embedding_split_dim)

    model = load_pretrained(tmp_path / "meta")
    config = model.config
    assert (config.ffn_hidden, config.vocab_size, config.rope_theta) == (META_FFN, 256, 500000.0)
    assert (config.n_kv_heads, config.norm_eps, config.multiple_of) == (2, 1e-5, 32)
    tokens = torch.randint(0, 256, (2, 19))
    expected = meta_forward(weights, META_PARAMS, tokens)
    with torch.no_grad():
        logits, _ = model(tokens)
    assert (logits - expected).abs().max().item() <= 1e-4


def test_meta_to_hf_to_transformers(tmp_path):
    """Meta -> ours -> Hugging Face directory -> transformers: logits of Meta's own forward."""
    transformers = pytest.importorskip("transformers")
    weights = meta_weights(META_PARAMS)
    write_meta(tmp_path / "meta", META_PARAMS, weights, n_shards=2)
    config, state = load_meta_state(tmp_path / "meta")
    save_hf(state, config, tmp_path / "hf")
    hf_model = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    tokens = torch.randint(0, 256, (1, 21))
    with torch.no_grad():
        logits = hf_model(input_ids=tokens).logits
    assert (logits - meta_forward(weights, META_PARAMS, tokens)).abs().max().item() <= 1e-4


# ----------------------------------------------------------------------------------------------
# Hugging Face directories.


def save_transformers_pickles(hf_model, path, max_shard_size=None) -> None:
    """What transformers' save_pretrained(safe_serialization=False) writes (newer transformers
    only write safetensors): pytorch_model.bin, or shards plus pytorch_model.bin.index.json."""
    path.mkdir(exist_ok=True)
    hf_model.config.save_pretrained(path)
    state = hf_model.state_dict()
    if max_shard_size is None:
        torch.save(state, path / "pytorch_model.bin")
        return
    names = sorted(state)
    halves = [names[: len(names) // 2], names[len(names) // 2 :]]
    weight_map = {}
    for i, part in enumerate(halves):
        file = f"pytorch_model-{i + 1:05d}-of-00002.bin"
        torch.save({n: state[n] for n in part}, path / file)
        weight_map.update({n: file for n in part})
    (path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))


def tiny_transformers_llama():
    transformers = pytest.importorskip("transformers")
    hf_config = transformers.LlamaConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=176,
        vocab_size=256, max_position_embeddings=64, rope_theta=500000.0, attn_implementation="eager",
    )
    return transformers.LlamaForCausalLM(hf_config).eval()


@pytest.mark.parametrize("pickled", [False, True], ids=["safetensors", "pytorch_model.bin"])
@pytest.mark.parametrize("max_shard_size", [None, "100KB"], ids=["single-file", "sharded"])
def test_import_transformers_save_pretrained(tmp_path, max_shard_size, pickled):
    hf_model = tiny_transformers_llama()
    if pickled:
        save_transformers_pickles(hf_model, tmp_path, max_shard_size)
    else:
        kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
        hf_model.save_pretrained(tmp_path, **kwargs)
    index = "pytorch_model.bin.index.json" if pickled else "model.safetensors.index.json"
    assert (tmp_path / index).exists() == (max_shard_size is not None)
    assert any(tmp_path.glob("*.bin")) == pickled

    model = load_pretrained(tmp_path)
    assert model.config.rope_theta == 500000.0 and model.config.n_kv_heads == 2
    tokens = torch.randint(0, 256, (2, 13))
    with torch.no_grad():
        expected = hf_model(input_ids=tokens).logits
        logits, _ = model(tokens)
    assert (logits - expected).abs().max().item() <= 1e-4


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_export_loads_in_transformers(tmp_path, tied):
    transformers = pytest.importorskip("transformers")
    model = random_model(tie_embeddings=tied, rope_theta=500000.0)
    save_hf(model, None, tmp_path, max_shard_size="40KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert ("lm_head.weight" in index["weight_map"]) == (not tied)

    hf_model = transformers.LlamaForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert hf_model.config.tie_word_embeddings == tied
    tokens = torch.randint(0, 256, (2, 15))
    with torch.no_grad():
        expected, _ = model(tokens)
        logits = hf_model(input_ids=tokens).logits
    assert (logits - expected).abs().max().item() <= 1e-4


@pytest.mark.parametrize("max_shard_size", ["5GB", 30_000], ids=["single-file", "sharded"])
def test_round_trip_through_hf_is_exact(tmp_path, max_shard_size):
    model = random_model()
    save_hf(model, None, tmp_path, max_shard_size=max_shard_size)
    config, state = load_hf_state(tmp_path)
    assert config == model.config
    assert_same_state(state, model.state_dict())


def test_paths_with_a_tilde_are_expanded(tmp_path, monkeypatch):
    """The README's load_pretrained("~/llama-2-7b-hf"): Python, unlike a shell, does not expand ~."""
    monkeypatch.setenv("HOME", str(tmp_path))
    model = random_model()
    save_hf(model, None, "~/hf")
    save_weights(model, "~/ours.safetensors")
    assert (tmp_path / "hf" / "config.json").is_file() and (tmp_path / "ours.safetensors").is_file()
    for path in ("~/hf", "~/ours.safetensors"):
        for p, q in zip(load_pretrained(path).parameters(), model.parameters()):
            assert torch.equal(p, q)


def test_save_hf_replaces_earlier_shards(tmp_path):
    save_hf(random_model(), None, tmp_path, max_shard_size="30KB")
    model = random_model()
    save_hf(model, None, tmp_path)  # now one file: the old shards and index must go
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    assert_same_state(load_hf_state(tmp_path)[1], model.state_dict())


def test_save_hf_casts_dtype(tmp_path):
    model = random_model()
    save_hf(model, None, tmp_path, dtype="bf16")
    hf_config = json.loads((tmp_path / "config.json").read_text())
    assert hf_config["torch_dtype"] == hf_config["dtype"] == "bfloat16"
    _, state = load_hf_state(tmp_path)
    for name, t in model.state_dict().items():
        assert torch.equal(state[name], t.to(torch.bfloat16)), name


def test_config_from_hf_reads_old_and_new_rope_fields():
    base = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=176, vocab_size=256)
    old = config_from_hf({**base, "rope_theta": 500000.0, "rope_scaling": None})
    new = config_from_hf({**base, "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}})
    legacy_type = config_from_hf({**base, "rope_theta": 500000.0, "rope_scaling": {"type": "default"}})
    assert old.rope_theta == new.rope_theta == legacy_type.rope_theta == 500000.0
    assert old.n_kv_heads == 4  # num_key_value_heads absent: multi-head attention


# ----------------------------------------------------------------------------------------------
# Our own file and load_pretrained.


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_save_load_weights(tmp_path, tied):
    model = random_model(tie_embeddings=tied).to(torch.bfloat16)
    model.reset_rope_tables()  # .to(bfloat16) rounded the fp32 rotary tables too; loaded models keep fp32
    save_weights(model, tmp_path / "w.safetensors")
    loaded = load_weights(tmp_path / "w.safetensors")
    assert loaded.config == model.config
    assert_same_state(loaded.state_dict(), model.state_dict())
    assert (loaded.lm_head.weight is loaded.embed.weight) == tied
    assert loaded.rope_cos.dtype == torch.float32
    tokens = torch.randint(0, 256, (1, 9))
    with torch.no_grad():
        assert torch.equal(loaded(tokens)[0], model(tokens)[0])


@pytest.mark.gpu
def test_load_pretrained_onto_cuda(tmp_path):
    model = random_model(tie_embeddings=True)
    save_hf(model, None, tmp_path)
    loaded = load_pretrained(tmp_path, dtype="bf16", device="cuda")
    assert all(p.is_cuda and p.dtype == torch.bfloat16 for p in loaded.parameters())
    assert loaded.lm_head.weight is loaded.embed.weight
    assert loaded.rope_cos.is_cuda and loaded.rope_cos.dtype == torch.float32
    tokens = torch.randint(0, 256, (2, 15))
    with torch.no_grad():
        expected, _ = model(tokens)
        logits, _ = loaded(tokens.cuda())
    assert (logits.float().cpu() - expected).abs().max().item() < 0.05  # bf16 weights and activations


def test_load_pretrained_dtype(tmp_path):
    model = random_model()
    save_hf(model, None, tmp_path)
    loaded = load_pretrained(tmp_path, dtype="bf16")
    assert all(p.dtype == torch.bfloat16 for p in loaded.parameters())
    assert loaded.rope_cos.dtype == torch.float32
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight.to(torch.bfloat16))


# ----------------------------------------------------------------------------------------------
# llama-fast convert


def test_cli_convert_chain(tmp_path, capsys):
    weights = meta_weights(META_PARAMS)
    write_meta(tmp_path / "meta", META_PARAMS, weights, n_shards=2)
    assert cli_main(["convert", "--from", "meta", str(tmp_path / "meta"), "--to", "hf", str(tmp_path / "hf"),
                     "--max-shard-size", "50KB"]) == 0
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    assert cli_main(["convert", "--from", "hf", str(tmp_path / "hf"), "--to", "llama-fast",
                     str(tmp_path / "w.safetensors"), "--dtype", "bf16"]) == 0
    assert cli_main(["convert", "--from", "llama-fast", str(tmp_path / "w.safetensors"), "--to", "hf",
                     str(tmp_path / "hf16")]) == 0
    assert "wrote" in capsys.readouterr().out

    _, meta_state = load_meta_state(tmp_path / "meta")
    model = load_weights(tmp_path / "w.safetensors")
    assert_same_state(model.state_dict(), {k: v.to(torch.bfloat16) for k, v in meta_state.items()})
    assert_same_state(load_hf_state(tmp_path / "hf16")[1], model.state_dict())


def test_max_seq_len_override(tmp_path, capsys):
    """Meta's params.json records no context length: the import assumes 2048, and --max-seq-len /
    load_pretrained(max_seq_len=) set the real one, which the HF export then carries."""
    write_meta(tmp_path / "meta", META_PARAMS, meta_weights(META_PARAMS), n_shards=1)
    assert load_pretrained(tmp_path / "meta").config.max_seq_len == 2048
    assert load_pretrained(tmp_path / "meta", max_seq_len=4096).config.max_seq_len == 4096
    assert cli_main(["convert", "--from", "meta", str(tmp_path / "meta"), "--to", "hf", str(tmp_path / "hf"),
                     "--max-seq-len", "4096"]) == 0
    hf_config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert hf_config["max_position_embeddings"] == 4096
    assert load_hf_state(tmp_path / "hf")[0].max_seq_len == 4096

    capsys.readouterr()
    assert cli_main(["convert", "--from", "meta", str(tmp_path / "meta"), "--to", "hf", str(tmp_path / "bad"),
                     "--max-seq-len", "0"]) == 2
    assert "max_seq_len must be a positive int, got 0" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("tie", [False, True])
def test_export_of_a_trained_run_loads_in_transformers(tmp_path, capsys, tie):
    """A run directory (and a checkpoint directory) -> a Hugging Face directory that AutoModelForCausalLM and
    AutoTokenizer both load: the same logits, the same token ids, the special tokens right."""
    transformers = pytest.importorskip("transformers")
    from synthetic_text import write_corpus

    from llama_fast.data import parse_source, prepare
    from llama_fast.tokenizer import Tokenizer
    from llama_fast.train import build_parser
    from llama_fast.train.checkpoint import latest_checkpoint, load_model
    from llama_fast.train.config import from_args
    from llama_fast.train.trainer import train

    data = prepare([parse_source(str(write_corpus(tmp_path / "text", 8)))], tmp_path / "prep", vocab_size=300,
                   progress=False)
    run = tmp_path / "run"
    train(from_args(build_parser().parse_args([
        "--run-dir", str(run), "--data", str(data), "--flavor", "tiny", "--model.tie_embeddings", str(tie),
        "--seq-len", "32", "--train.batch_tokens", "128", "--train.micro_batch", "4", "--steps", "2",
        "--log.progress", "false", "--log.sample_tokens", "0"])))
    checkpoint = latest_checkpoint(run / "checkpoints")
    assert cli_main(["convert", "--from", "llama-fast", str(run), "--to", "hf", str(tmp_path / "hf")]) == 0
    assert cli_main(["convert", "--from", "llama-fast", str(checkpoint), "--to", "hf", str(tmp_path / "hf2")]) == 0
    assert f"tokenizer: {checkpoint / 'tokenizer.model'}" in capsys.readouterr().out

    ours_tok = Tokenizer(checkpoint / "tokenizer.model")
    text = "def kalo(x, y):  # mine = 4711\n\tlo  ru\n" + "é ✓ 日本 <s> </s>"  # unseen characters: byte fallback
    ours = load_model(run)
    for out in (tmp_path / "hf", tmp_path / "hf2"):
        tok = transformers.AutoTokenizer.from_pretrained(out)
        ids = tok(text).input_ids
        assert ids == ours_tok.encode(text, bos=True)
        assert (tok.bos_token, tok.eos_token, tok.unk_token, tok.pad_token) == ("<s>", "</s>", "<unk>", None)
        assert (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (1, 2, 0)
        assert tok.decode(ids, skip_special_tokens=True) == text
        hf_model = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
        assert (hf_model.config.bos_token_id, hf_model.config.eos_token_id) == (1, 2)
        assert hf_model.generation_config.eos_token_id == 2
        tokens = torch.tensor([ids])
        with torch.no_grad():
            torch.testing.assert_close(hf_model(tokens).logits, ours(tokens)[0], rtol=1e-5, atol=1e-5)
    # `llama-fast generate` finds the exported tokenizer by itself.
    assert cli_main(["generate", "--checkpoint", str(tmp_path / "hf"), "--prompt", "ka", "--max-new-tokens", "3",
                     "--device", "cpu"]) == 0


def test_cli_convert_reports_bad_input_without_traceback(tmp_path, capsys):
    code = cli_main(["convert", "--from", "meta", str(tmp_path), "--to", "hf", str(tmp_path / "out")])
    assert code == 2
    err = capsys.readouterr().err
    assert f"llama-fast convert: error: {tmp_path / 'params.json'}: expected Meta's params.json" in err
    assert "Traceback" not in err and not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------
# Bad input: every error names the file or tensor, what was expected and what was found.


def test_unknown_flavor():
    with pytest.raises(ValueError, match=r"unknown LLaMA flavor '7x'.*'7B'"):
        LlamaConfig.from_name("7x")
    assert LlamaConfig.from_name("7b") == LlamaConfig.from_name("7B")  # any case


def test_parse_dtype_rejects_unknown():
    with pytest.raises(ValueError, match=r"dtype must be one of .*got 'int8'"):
        parse_dtype("int8")


def test_hf_shapes_that_do_not_fit_the_config(tmp_path):
    save_hf(random_model(), None, tmp_path)
    hf_config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**hf_config, "intermediate_size": 192}))
    with pytest.raises(ValueError, match=r"'model\.layers\.0\.mlp\.gate_proj\.weight' has shape \(176, 64\), "
                                         r"but the config expects \(192, 64\)"):
        load_pretrained(tmp_path)


def test_meta_shapes_that_do_not_fit_the_config(tmp_path):
    write_meta(tmp_path, {**META_PARAMS, "n_kv_heads": 4}, meta_weights(META_PARAMS))
    with pytest.raises(ValueError, match=r"'layers\.0\.attention\.wk\.weight' has shape \(32, 64\), "
                                         r"but the config expects \(64, 64\)"):
        load_meta_state(tmp_path)


def test_state_that_does_not_fit_the_config():
    model = random_model()
    state = {**model.state_dict(), "layers.1.attn.wo.weight": torch.randn(64, 32)}
    with pytest.raises(ValueError, match=r"'layers\.1\.attn\.wo\.weight' has shape \(64, 32\), but the config "
                                         r"expects \(64, 64\)"):
        build_model(model.config, state)


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file or directory"):
        load_pretrained(tmp_path / "nowhere")

    only_config = tmp_path / "hf"
    save_hf(random_model(), None, only_config)
    (only_config / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"expected weights in model\.safetensors, shards listed in "
                                                r"model\.safetensors\.index\.json, pytorch_model\.bin.*found none"):
        load_pretrained(only_config)

    sharded = tmp_path / "sharded"
    save_hf(random_model(), None, sharded, max_shard_size="30KB")
    second_shard = sorted(sharded.glob("model-*-of-*.safetensors"))[1]
    second_shard.unlink()
    with pytest.raises(FileNotFoundError, match=rf"{second_shard}: shard listed in"):
        load_pretrained(sharded)

    meta = tmp_path / "meta"
    meta.mkdir()
    (meta / "params.json").write_text(json.dumps(META_PARAMS))
    with pytest.raises(FileNotFoundError, match=r"expected Meta weights consolidated\.\*\.pth"):
        load_pretrained(meta)
    (meta / "params.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"params\.json: expected Meta's params\.json here"):
        load_meta_state(meta)


def test_missing_and_unexpected_tensor_names(tmp_path):
    from safetensors.torch import load_file, save_file

    save_hf(random_model(), None, tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["model.layers.1.mlp.extra.weight"] = tensors.pop("model.layers.1.mlp.up_proj.weight")
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing \['model\.layers\.1\.mlp\.up_proj\.weight'\], "
                                         r"unexpected \['model\.layers\.1\.mlp\.extra\.weight'\]"):
        load_hf_state(tmp_path)

    weights = meta_weights(META_PARAMS)
    del weights["output.weight"]
    write_meta(tmp_path / "meta", META_PARAMS, weights)
    with pytest.raises(ValueError, match=r"missing \['output\.weight'\], unexpected \[\]"):
        load_meta_state(tmp_path / "meta")


def test_long_name_lists_are_cut_short(tmp_path):
    model = random_model()
    state = {"transformer." + name: t for name, t in model.state_dict().items()}  # a wrong prefix on every name
    # 15 tensors (3 + 6 per layer): 10 spelled out, 5 counted.
    with pytest.raises(ValueError, match=r"missing \['embed\.weight', [^]]*\] and 5 more, "
                                         r"unexpected \['transformer\.embed\.weight', [^]]*\] and 5 more"):
        build_model(model.config, state)


def test_corrupt_safetensors(tmp_path):
    model = random_model()
    save_hf(model, None, tmp_path / "hf")
    save_weights(model, tmp_path / "w.safetensors")
    for path in (tmp_path / "hf" / "model.safetensors", tmp_path / "w.safetensors"):
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
        with pytest.raises(ValueError, match=rf"{path}: not a readable safetensors file"):
            load_pretrained(path.parent if path.parent.name == "hf" else path)


def test_corrupt_pth(tmp_path):
    write_meta(tmp_path, META_PARAMS, meta_weights(META_PARAMS))
    shard = tmp_path / "consolidated.00.pth"
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(ValueError, match=rf"{shard}: not a readable PyTorch checkpoint"):
        load_pretrained(tmp_path)
    shard.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match=rf"{shard}: not a readable PyTorch checkpoint"):
        load_pretrained(tmp_path)


CALLED = []


def _record_call():
    CALLED.append(True)
    return {}


class _RunsCodeWhenUnpickled:
    def __reduce__(self):
        return (_record_call, ())


def _meta_pickle(path):
    write_meta(path, META_PARAMS, {})
    return path / "consolidated.00.pth", _RunsCodeWhenUnpickled()


def _transformers_pickle(path):
    save_transformers_pickles(tiny_transformers_llama(), path, max_shard_size="sharded")
    return path / "pytorch_model-00002-of-00002.bin", {"lm_head.weight": _RunsCodeWhenUnpickled()}


@pytest.mark.parametrize("make", [_meta_pickle, _transformers_pickle], ids=["meta .pth", "transformers .bin"])
def test_pickle_that_would_run_code_is_refused(tmp_path, make):
    shard, payload = make(tmp_path)
    torch.save(payload, shard)
    with pytest.raises(ValueError, match=rf"{shard}: not a readable PyTorch checkpoint.*weights_only"):
        load_pretrained(tmp_path)
    assert not CALLED, "loading a checkpoint executed code from its pickle"


def test_hf_pickle_shard_without_its_tensors(tmp_path):
    save_transformers_pickles(tiny_transformers_llama(), tmp_path, max_shard_size="sharded")
    shard = tmp_path / "pytorch_model-00001-of-00002.bin"
    torch.save({}, shard)
    with pytest.raises(ValueError, match=rf"{shard}: the shard index places tensors \[.*\] in this file"):
        load_pretrained(tmp_path)


def test_directory_of_neither_format(tmp_path):
    (tmp_path / "README.txt").write_text("hello")
    with pytest.raises(ValueError, match=r"not a checkpoint we can read; expected a Hugging Face directory"):
        load_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"not a checkpoint we can read"):
        load_pretrained(tmp_path / "README.txt")


def test_safetensors_without_our_config(tmp_path):
    save_hf(random_model(), None, tmp_path)
    with pytest.raises(ValueError, match=r"no 'llama_fast\.config' in the safetensors metadata"):
        load_pretrained(tmp_path / "model.safetensors")


HF_BASE = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=176, vocab_size=256)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, r"RoPE scaling 'llama3' is not implemented"),
        ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}}, r"RoPE scaling 'yarn' is not implemented"),
        ({"rope_scaling": {"type": "linear", "factor": 2.0}}, r"RoPE scaling 'linear' is not implemented"),
        ({"head_dim": 32}, r"head_dim=32 is not hidden_size / num_attention_heads = 64 / 4"),
        ({"attention_bias": True}, r"attention_bias=true is not supported"),
        ({"mlp_bias": True}, r"mlp_bias=true is not supported"),
        ({"model_type": "mistral"}, r"model_type must be 'llama', got 'mistral'"),
        ({"hidden_act": "gelu"}, r"hidden_act must be 'silu'"),
    ],
    ids=["llama3-rope", "yarn-rope", "linear-rope", "head-dim", "attention-bias", "mlp-bias", "mistral", "gelu"],
)
def test_hf_config_variants_we_do_not_run(overrides, message):
    with pytest.raises(ValueError, match=message):
        config_from_hf({**HF_BASE, **overrides})


def test_hf_config_missing_field(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({k: v for k, v in HF_BASE.items() if k != "vocab_size"}))
    with pytest.raises(ValueError, match=r"config\.json: missing required field 'vocab_size'"):
        load_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"config\.json: a transformers config\.json is not valid JSON"):
        load_pretrained(tmp_path)


def test_invalid_shapes_in_config_files_name_the_file(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({**HF_BASE, "num_key_value_heads": 3}))
    with pytest.raises(ValueError, match=r"config\.json: LlamaConfig\.n_heads \(4\) must be divisible by "
                                         r"n_kv_heads \(3\)"):
        load_pretrained(tmp_path)
    write_meta(tmp_path / "meta", {**META_PARAMS, "n_heads": 5}, meta_weights(META_PARAMS))
    with pytest.raises(ValueError, match=r"params\.json: LlamaConfig\.dim \(64\) must be divisible by n_heads"):
        load_pretrained(tmp_path / "meta")


def test_meta_scaled_rope_is_refused(tmp_path):
    write_meta(tmp_path, {**META_PARAMS, "use_scaled_rope": True}, meta_weights(META_PARAMS))
    with pytest.raises(ValueError, match=r"use_scaled_rope=true .* is not implemented"):
        load_meta_state(tmp_path)
