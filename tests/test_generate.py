"""Sampling with the KV cache, from our checkpoints and (through llama_fast.convert) imported weights."""
import pytest
import torch
from synthetic_text import write_corpus

from llama_fast import Llama, LlamaConfig, cli
from llama_fast.data import parse_source, prepare
from llama_fast.model import next_token, sample
from llama_fast.train import build_parser
from llama_fast.train.config import from_args
from llama_fast.train.trainer import train


@pytest.fixture(scope="module")
def model():
    return Llama(LlamaConfig.from_name("tiny", max_seq_len=64)).eval()


def test_cached_greedy_matches_full_recompute(model):
    prompt = [1, 17, 42, 99, 5]
    new = sample(model, prompt, 20, temperature=0)
    tokens = list(prompt)
    with torch.no_grad():
        for _ in range(20):
            logits, _ = model(torch.tensor([tokens]))  # no cache: the whole sequence every time
            tokens.append(int(logits[0, -1].argmax()))
    assert new == tokens[len(prompt):]


def test_seeded_sampling_is_reproducible(model):
    a = sample(model, [1, 3], 30, temperature=1.5, top_p=1.0, seed=7)
    assert a == sample(model, [1, 3], 30, temperature=1.5, top_p=1.0, seed=7)
    assert a != sample(model, [1, 3], 30, temperature=1.5, top_p=1.0, seed=8)
    assert len(sample(model, [1] * 60, 30, temperature=1.0)) == 4  # stops at max_seq_len (64)
    assert max(sample(model, [1], 40, temperature=5.0, vocab_size=10)) < 10  # a tokenizer smaller than the model


def test_top_p_keeps_only_the_nucleus():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    gen = torch.Generator().manual_seed(0)
    drawn = torch.cat([next_token(probs.log(), 1.0, 0.7, gen) for _ in range(400)])
    assert set(drawn.flatten().tolist()) == {0, 1}  # 0.5 + 0.3 reaches 0.7: 2 and 3 are cut
    drawn = torch.cat([next_token(probs.log(), 1.0, 1.0, gen) for _ in range(400)])
    assert set(drawn.flatten().tolist()) == {0, 1, 2, 3}
    assert next_token(probs.log(), 0.0, 1.0, gen).item() == 0


def test_sample_stops_at_eos(model):
    first = sample(model, [1, 9], 1, temperature=0)[0]
    assert sample(model, [1, 9], 10, temperature=0, eos_id=first) == [first]


def test_errors(model):
    with pytest.raises(ValueError, match="leaves no room"):
        sample(model, [1] * 64, 4)
    with pytest.raises(ValueError, match="at least one token"):
        sample(model, [], 4)
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        sample(model, [1], 4, temperature=-1)
    with pytest.raises(ValueError, match=r"top_p must lie in \(0, 1\]"):
        sample(model, [1], 4, top_p=0)


def test_cli_from_a_trained_checkpoint(tmp_path, capsys):
    data = prepare([parse_source(str(write_corpus(tmp_path / "text", 10)))], tmp_path / "prep", vocab_size=300,
                   progress=False)
    args = ["--run-dir", str(tmp_path / "run"), "--data", str(data), "--flavor", "tiny", "--model.vocab_size", "300",
            "--seq-len", "32", "--train.batch_tokens", "128", "--train.micro_batch", "4", "--steps", "2",
            "--log.progress", "false", "--log.sample_tokens", "0"]
    train(from_args(build_parser().parse_args(args)))
    capsys.readouterr()
    argv = ["generate", "--checkpoint", str(tmp_path / "run"), "--prompt", "kalo", "--max-new-tokens", "8", "--seed", "3"]
    assert cli.main(argv) == 0
    first = capsys.readouterr().out
    assert first.startswith("kalo") and len(first) > len("kalo\n")
    cli.main(argv)
    assert capsys.readouterr().out == first  # seeded


def test_imported_weights_go_through_convert(tmp_path, capsys):
    """A Hugging Face directory is read by llama_fast.convert.load_pretrained and sampled from."""
    from llama_fast.convert import save_hf
    from llama_fast.tokenizer import Tokenizer

    data = prepare([parse_source(str(write_corpus(tmp_path / "text", 5)))], tmp_path / "prep", vocab_size=256 + 3 + 60,
                   progress=False)
    imported = Llama(LlamaConfig.from_name("tiny", vocab_size=512)).eval()
    hf_dir = tmp_path / "hf"
    save_hf(imported, None, hf_dir)
    (hf_dir / "tokenizer.model").write_bytes((data / "tokenizer.model").read_bytes())
    assert cli.main(["generate", "--checkpoint", str(hf_dir), "--prompt", "ka", "--max-new-tokens", "5",
                     "--temperature", "0", "--device", "cpu"]) == 0
    tok = Tokenizer(hf_dir / "tokenizer.model")
    prompt = tok.encode("ka")
    expected = tok.decode(prompt[1:] + sample(imported, prompt, 5, temperature=0, eos_id=tok.eos_id, vocab_size=tok.vocab_size))
    assert capsys.readouterr().out.strip() == expected.strip()
    capsys.readouterr()
    assert cli.main(["generate", "--checkpoint", str(tmp_path / "nope"), "--prompt", "x"]) == 2
    assert "llama-fast generate: error: --checkpoint: no such file or directory" in capsys.readouterr().err
    small_dir = tmp_path / "hf-small"
    save_hf(model_with_vocab(256), None, small_dir)  # less than the tokenizer's 319
    (small_dir / "tokenizer.model").write_bytes((data / "tokenizer.model").read_bytes())
    assert cli.main(["generate", "--checkpoint", str(small_dir), "--prompt", "x", "--device", "cpu"]) == 2
    assert "tokenizer vocabulary (319) does not fit the model's vocab_size (256)" in capsys.readouterr().err


def model_with_vocab(vocab_size):
    return Llama(LlamaConfig.from_name("tiny", vocab_size=vocab_size)).eval()
