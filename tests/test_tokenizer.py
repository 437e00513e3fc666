"""The SentencePiece tokenizer: the paper's options (BPE, split digits, byte fallback), ids, errors."""
import random
import re

import pytest
from synthetic_text import document

from llama_fast import cli
from llama_fast.tokenizer import Tokenizer

VOCAB = 400


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("tok") / "train.txt"
    # Frequent numbers: without split_digits BPE would merge "2024" or "100" into pieces.
    path.write_text("".join(document(rng, 30) + "year 2024 count 1000 id 100\n" * 20 for _ in range(30)))
    return path


@pytest.fixture(scope="module")
def tok(corpus):
    return Tokenizer.train([corpus], VOCAB, corpus.with_name("tok.model"))


def test_special_ids_and_vocab(tok):
    assert tok.vocab_size == VOCAB
    assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2, -1)
    ids = tok.encode("kalo mine", bos=True, eos=True)
    assert ids[0] == 1 and ids[-1] == 2 and 1 not in ids[1:-1] and 2 not in ids[1:-1]
    assert tok.encode("kalo mine", bos=False) == ids[1:-1]
    assert tok.decode(ids) == "kalo mine"


def test_numbers_split_into_digits(tok):
    # The training text is full of numbers, yet no piece may hold more than one digit.
    pieces = [tok.sp.IdToPiece(i) for i in range(tok.vocab_size) if not tok.sp.IsByte(i)]
    assert not [p for p in pieces if sum(ch.isdigit() for ch in p) > 1]
    ids = tok.encode("x = 90210", bos=False)
    digit_pieces = [tok.sp.IdToPiece(i).lstrip("\u2581") for i in ids][-5:]
    assert digit_pieces == list("90210")


def test_unknown_utf8_round_trips_through_bytes(tok):
    text = "kalo 😀 中文 ünï\n    def f(x):\n\treturn x"  # emoji, CJK, accents: none in the training text
    ids = tok.encode(text, bos=False)
    assert tok.unk_id not in ids
    assert any(tok.sp.IsByte(i) for i in ids)
    assert tok.decode(ids) == text


def test_load_saved_model_and_batch_encode(tok, corpus):
    again = Tokenizer(tok.path)
    texts = ["ruta lo 12", "qu zo\nfi"]
    assert [again.encode(t) for t in texts] == [tok.encode(t) for t in texts]
    assert tok.encode_batch(texts, bos=True, eos=True) == [tok.encode(t, eos=True) for t in texts]


def test_train_from_iterator(corpus, tmp_path):
    lines = iter(corpus.read_text().splitlines())
    tok = Tokenizer.train(lines, 330, tmp_path / "it.model")
    assert tok.vocab_size == 330 and tok.decode(tok.encode("kalo 7")) == "kalo 7"


def test_errors(corpus, tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        Tokenizer(tmp_path / "missing.model")
    (tmp_path / "bad.model").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not a SentencePiece model"):
        Tokenizer(tmp_path / "bad.model")
    with pytest.raises(ValueError, match="vocab_size must be an int >= 259"):
        Tokenizer.train([corpus], 100, tmp_path / "small.model")
    with pytest.raises(ValueError, match="must end in .model"):
        Tokenizer.train([corpus], 330, tmp_path / "out.txt")
    with pytest.raises(FileNotFoundError, match="missing"):
        Tokenizer.train([tmp_path / "none.txt"], 330, tmp_path / "x.model")
    with pytest.raises(ValueError, match=r"vocab_size 5000 is more than this text can fill: it yields at most \d+ "
                                         r"pieces; use a vocab_size <= \d+ or more text"):
        Tokenizer.train(iter(["ab ab ab"]), 5000, tmp_path / "big.model")  # far more pieces than the text holds


def test_a_vocabulary_smaller_than_the_characters_is_explained_in_our_terms(tmp_path, capsys):
    """SentencePiece's own message names --character_coverage, a flag `prepare` does not have."""
    text = "".join(chr(0x4E00 + (i * 7919) % 300) for i in range(3000))  # about 300 distinct characters
    (tmp_path / "han.txt").write_text(text)
    code = cli.main(["prepare", "--data", str(tmp_path / "han.txt"), "--out", str(tmp_path / "out"),
                     "--vocab-size", "300"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "character_coverage" not in err
    assert re.search(r"vocab_size 300 is too small for this text: its \d+ distinct characters and the 259 reserved "
                     r"pieces \(256 bytes, unk, bos, eos\) need a vocab_size >= \d+", err), err


def test_decode_rejects_out_of_range_ids(tok):
    with pytest.raises(ValueError, match=r"ids must lie in \[0, 400\)"):
        tok.decode([5, VOCAB])


def test_cli_train_encode_decode(corpus, tmp_path, capsys):
    out = tmp_path / "cli.model"
    assert cli.main(["tokenizer", "train", "--input", str(corpus), "--vocab-size", "330", "--output", str(out)]) == 0
    capsys.readouterr()
    cli.main(["tokenizer", "encode", "--model", str(out), "--text", "kalo 42", "--eos"])
    ids = capsys.readouterr().out.split()
    assert ids[0] == "1" and ids[-1] == "2"
    cli.main(["tokenizer", "decode", "--model", str(out), *ids])
    assert capsys.readouterr().out == "kalo 42\n"


def test_a_line_longer_than_sentencepiece_takes_is_cut(tmp_path):
    """A text of one very long line (issue 13: 25 MB) failed training with SentencePiece's internal
    '[!sentences_.empty()]': it drops lines over max_sentence_length bytes. Such lines are cut, between
    characters, into pieces it takes."""
    rng = random.Random(0)
    words = ["".join(rng.choices("abcdefghijklmnopqrstuvwxyzé日本", k=rng.randint(2, 8))) for _ in range(300)]
    line = " ".join(rng.choice(words) for _ in range(20_000))  # about 130 KB, one line
    tok = Tokenizer.train(iter([line]), 300, tmp_path / "long.model", max_sentence_length=4096)
    assert tok.vocab_size == 300 and tok.decode(tok.encode(line[:200], bos=False)) == line[:200]
    from llama_fast.tokenizer import _cut

    pieces = list(_cut(line, 4096))
    assert "".join(pieces) == line and all(len(p.encode()) <= 4096 for p in pieces) and len(pieces) > 30
