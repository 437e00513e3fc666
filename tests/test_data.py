"""Data preparation (text -> memory-mapped tokens + validation split) and the mixture sampler."""
import json
import os
import sysconfig
from pathlib import Path

import numpy as np
import pytest
from synthetic_text import write_corpus

from llama_fast import cli
from llama_fast.data import (
    TokenBatches,
    default_corpus_files,
    expand_paths,
    parse_source,
    prepare,
    read_meta,
    read_text,
    token_dtype,
)
from llama_fast.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    code = write_corpus(root / "code", 30, seed=1)
    prose = write_corpus(root / "prose", 10, seed=2)
    sources = [parse_source(f"code={code}:0.7"), parse_source(f"prose={prose}:0.3")]
    return prepare(sources, root / "prepared", vocab_size=400, val_fraction=0.1, progress=False), code, prose


def test_parse_source():
    s = parse_source("code=/data/a,/data/b/*.py:0.7")
    assert (s.name, s.inputs, s.weight) == ("code", ["/data/a", "/data/b/*.py"], 0.7)
    s = parse_source("/data/my.corpus")
    assert (s.name, s.inputs, s.weight) == ("my", ["/data/my.corpus"], 1.0)
    assert parse_source("/x/k=v/file.txt:2").inputs == ["/x/k=v/file.txt"]  # '=' inside a path
    with pytest.raises(ValueError, match="weight must be > 0"):
        parse_source("a=/x:0")
    with pytest.raises(ValueError, match="at least one path"):
        parse_source("a=:1")


def test_prepare_writes_tokens_meta_and_split(prepared):
    out, code, prose = prepared
    meta = read_meta(out)
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == 400
    assert [(s["name"], s["weight"], s["documents"]) for s in meta["sources"]] == [("code", 0.7, 30), ("prose", 0.3, 10)]
    tok = Tokenizer(out / "tokenizer.model")
    for s in meta["sources"]:
        train = np.fromfile(out / f"{s['name']}.train.bin", dtype=np.uint16)
        val = np.fromfile(out / f"{s['name']}.val.bin", dtype=np.uint16)
        assert (len(train), len(val)) == (s["train_tokens"], s["val_tokens"]) and len(val) > 0
        # Whole documents: <bos> text <eos>, each one either in train or in val.
        n_val_docs = int((val == tok.bos_id).sum())
        assert n_val_docs == round(0.1 * s["documents"]) and (train == tok.bos_id).sum() == s["documents"] - n_val_docs
        assert val[0] == tok.bos_id and val[-1] == tok.eos_id
    # The first training document decodes back to one of the source files.
    train = np.fromfile(out / "code.train.bin", dtype=np.uint16).tolist()
    first = train[1 : train.index(tok.eos_id)]
    assert tok.decode(first) in {p.read_text() for p in code.iterdir()}


def test_token_dtype():
    assert token_dtype(32000) == np.uint16 and token_dtype(65535) == np.uint16
    assert token_dtype(65536) == np.uint32 and token_dtype(128256) == np.uint32


def test_sampler_is_deterministic_and_follows_weights(prepared):
    out = prepared[0]
    a, b = TokenBatches(out, seq_len=16, seed=3), TokenBatches(out, seq_len=16, seed=3)
    src, off = a.rows(7, 4000)
    src2, off2 = b.rows(7, 4000)
    assert np.array_equal(src, src2) and np.array_equal(off, off2)
    assert not np.array_equal(a.rows(8, 4000)[1], off)
    assert abs((src == 0).mean() - 0.7) < 0.03  # code=0.7, prose=0.3
    rows = a.read(src[:5], off[:5])
    assert rows.shape == (5, 17) and rows.dtype == np.int64
    code = np.fromfile(out / "code.train.bin", dtype=np.uint16)
    i = int(np.flatnonzero(src[:5] == 0)[0])
    assert np.array_equal(rows[i], code[off[i] : off[i] + 17])
    # Weights can be overridden at training time.
    only_prose = TokenBatches(out, seq_len=16, seed=3, weights={"code": 1e-9})
    assert (only_prose.rows(0, 1000)[0] == 1).mean() > 0.99
    val_src, val_off = a.rows(0, 50, split="val")
    assert val_off.max() <= max(len(t) for t in a.tokens["val"]) - 17


def test_errors(tmp_path, prepared):
    with pytest.raises(FileNotFoundError, match="no such file"):
        expand_paths([str(tmp_path / "missing")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="matched no files"):
        expand_paths([str(tmp_path / "empty")])
    binary = tmp_path / "bin"
    binary.mkdir()
    (binary / "a.dat").write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ValueError, match="no text found"):
        prepare([parse_source(f"b={binary}")], tmp_path / "out", tokenizer=prepared[0] / "tokenizer.model", progress=False)
    assert not (tmp_path / "out").exists()  # nothing half-written
    with pytest.raises(ValueError, match="fewer than one sequence"):
        TokenBatches(prepared[0], seq_len=100_000)
    with pytest.raises(ValueError, match="unknown sources"):
        TokenBatches(prepared[0], seq_len=16, weights={"books": 1.0})
    with pytest.raises(FileNotFoundError, match="run `llama-fast prepare`"):
        read_meta(tmp_path)


def test_single_document_split_and_cli(tmp_path, capsys):
    text = write_corpus(tmp_path / "one", 1, lines=200)
    out = tmp_path / "prep"
    assert cli.main(["prepare", "--data", f"{text}/doc000.txt", "--out", str(out), "--vocab-size", "300",
                     "--val-fraction", "0.1"]) == 0
    meta = json.loads((out / "meta.json").read_text())
    (s,) = meta["sources"]
    assert s["name"] == "doc000" and s["val_tokens"] == int((s["train_tokens"] + s["val_tokens"]) * 0.1)
    assert "train /" in capsys.readouterr().out


def test_default_corpus_is_the_standard_library():
    files = default_corpus_files()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    names = {p.relative_to(stdlib).as_posix() for p in files}
    assert {"os.py", "json/__init__.py"} <= names
    assert all(p.suffix == ".py" for p in files)
    assert not [p for p in files if "site-packages" in p.parts]


def test_non_utf8_text_is_read_by_the_stated_rule_and_binary_files_are_named(tmp_path, prepared, capsys):
    """A Latin-1 file counted as 'binary' and was dropped silently. Text that is not UTF-8 is now read as
    Windows-1252 (Latin-1 where that leaves a byte undefined); a file with a NUL byte that is not UTF-8 is
    binary, and the skipped files are named on the console."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "utf8.txt").write_text("naïve café, déjà vu\n" * 20, encoding="utf-8")
    (src / "latin1.txt").write_bytes("garçon à la crème brûlée\n".encode("latin-1") * 20)
    (src / "cp1252.txt").write_bytes("\u201cquoted\u201d \u2013 dash\n".encode("cp1252") * 20)
    (src / "undefined.txt").write_bytes(b"byte \x81 undefined in cp1252\n" * 20)
    (src / "image.bin").write_bytes(bytes(range(256)) * 4)
    assert read_text(src / "latin1.txt") == "garçon à la crème brûlée\n" * 20
    assert read_text(src / "cp1252.txt") == "\u201cquoted\u201d \u2013 dash\n" * 20
    assert read_text(src / "undefined.txt") == "byte \x81 undefined in cp1252\n" * 20
    assert read_text(src / "image.bin") is None
    capsys.readouterr()
    out = prepare([parse_source(f"mixed={src}")], tmp_path / "out", tokenizer=prepared[0] / "tokenizer.model",
                  val_fraction=0, progress=False)
    (meta,) = read_meta(out)["sources"]
    assert (meta["documents"], meta["skipped_files"]) == (4, 1)
    assert f"data source 'mixed': skipped 1 binary or empty file(s): {src / 'image.bin'}" in capsys.readouterr().out


@pytest.mark.parametrize("seed", range(4))
def test_the_validation_split_never_empties_the_training_text(tmp_path, prepared, seed):
    """A source 'ok.txt,binary.bin' failed with 'no text found in 2 file(s)' whenever the validation split
    held out ok.txt, the only text. The held-out text then trains, and its tail is the validation split."""
    write_corpus(tmp_path / "c", 1, lines=100)
    (tmp_path / "c" / "binary.bin").write_bytes(bytes(range(256)) * 4)
    source = parse_source(f"s={tmp_path / 'c' / 'doc000.txt'},{tmp_path / 'c' / 'binary.bin'}")
    out = prepare([source], tmp_path / "out", tokenizer=prepared[0] / "tokenizer.model", val_fraction=0.1, seed=seed,
                  progress=False)
    (meta,) = read_meta(out)["sources"]
    total = meta["train_tokens"] + meta["val_tokens"]
    assert meta["train_tokens"] > 0 and meta["val_tokens"] == int(total * 0.1)
    assert (out / "s.train.bin").stat().st_size == 2 * meta["train_tokens"]


def test_prepare_removes_the_temporaries_of_killed_prepares(tmp_path, prepared):
    """kill -9 during prepare left a .<out>.tmp-<pid> directory that nothing removed. A later prepare of the
    same directory removes those of this host whose process is gone, and leaves a live process's or another
    host's alone."""
    import socket
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    host = socket.gethostname()
    stale = [f".out.tmp-{host}-{dead}", f".out.tmp-{dead}"]  # (the second: named before the host was)
    kept = [f".out.tmp-{host}-{os.getppid()}", f".out.tmp-elsewhere-{dead}", ".other.tmp-1"]
    for name in stale + kept:
        (tmp_path / name).mkdir()
        (tmp_path / name / "tokenizer.model").write_bytes(b"partial")
    write_corpus(tmp_path / "c", 3)
    prepare([parse_source(str(tmp_path / "c"))], tmp_path / "out", tokenizer=prepared[0] / "tokenizer.model",
            progress=False)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == sorted(kept)
