"""The tokenizer: SentencePiece BPE as in the paper, with digits split and byte fallback.

``Tokenizer(path)`` loads any SentencePiece ``tokenizer.model`` (Meta's included: vocab
32000, unk=0, bos=1, eos=2, no pad); ``Tokenizer.train(...)`` trains a new one with the
paper's options. ``expand_paths`` and ``read_text`` turn files, directories and globs into
texts, for training here and for ``llama_fast.data``, which tokenizes with this module.
Command line: ``llama-fast tokenizer train|encode|decode``.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

import sentencepiece as spm

# Byte fallback reserves one piece per byte value, plus unk, bos and eos.
MIN_VOCAB_SIZE = 256 + 3


class Tokenizer:
    """A SentencePiece model: text <-> token ids."""

    def __init__(self, path: str | os.PathLike):
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer model: expected a SentencePiece .model file, got {str(path)!r} (no such file)")
        self.path = path
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(str(path))
        except (OSError, RuntimeError) as exc:
            raise ValueError(f"tokenizer model: {str(path)!r} is not a SentencePiece model ({exc})") from exc

    @property
    def vocab_size(self) -> int:
        return self.sp.GetPieceSize()

    @property
    def bos_id(self) -> int:
        return self.sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self.sp.eos_id()

    @property
    def pad_id(self) -> int:
        """-1 when the model has no pad piece (Meta's tokenizer and ours)."""
        return self.sp.pad_id()

    @property
    def unk_id(self) -> int:
        return self.sp.unk_id()

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"encode: text must be str, got {type(text).__name__}")
        ids = self.sp.EncodeAsIds(text)
        return [self.bos_id] * bos + ids + [self.eos_id] * eos

    def encode_batch(self, texts: list[str], bos: bool = True, eos: bool = False, num_threads: int = 0) -> list[list[int]]:
        """Several texts at once on ``num_threads`` threads (0: all cores)."""
        ids = self.sp.Encode(texts, out_type=int, num_threads=num_threads or os.cpu_count() or 1)
        head, tail = [self.bos_id] * bos, [self.eos_id] * eos
        return [head + x + tail for x in ids]

    def decode(self, ids: Iterable[int]) -> str:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"decode: ids must lie in [0, {self.vocab_size}), got {bad[:5]}")
        return self.sp.DecodeIds(ids)

    def save_hf(self, directory: str | os.PathLike, model_max_length: int | None = None) -> None:
        """Write this tokenizer for ``transformers.AutoTokenizer.from_pretrained(directory)``.

        ``tokenizer.json`` (the `tokenizers` library's format) holds the same BPE: the pieces
        with their ids, the merges (a piece splits into two pieces of the vocabulary; a merge
        ranks by the id of the piece it makes, which is SentencePiece's order), byte fallback,
        the dummy prefix '▁' and spaces as '▁', bos prepended. Text such as "<s>" stays text,
        as SentencePiece reads it (``split_special_tokens``). ``tokenizer.model`` is copied too.
        """
        from tokenizers import AddedToken, decoders, models, normalizers, processors
        from tokenizers import Tokenizer as FastTokenizer

        sp, directory = self.sp, Path(directory)
        pieces = [sp.IdToPiece(i) for i in range(self.vocab_size)]
        vocab = {piece: i for i, piece in enumerate(pieces)}
        merges = sorted(
            (i, vocab[piece[:k]], vocab[piece[k:]])
            for i, piece in enumerate(pieces)
            if not (sp.IsControl(i) or sp.IsUnknown(i) or sp.IsByte(i))
            for k in range(1, len(piece))
            if piece[:k] in vocab and piece[k:] in vocab
        )
        fast = FastTokenizer(models.BPE(vocab=vocab, merges=[(pieces[a], pieces[b]) for _, a, b in merges],
                                        unk_token=pieces[self.unk_id], fuse_unk=True, byte_fallback=True))
        fast.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        fast.decoder = decoders.Sequence(
            [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
        )
        bos, eos, unk = pieces[self.bos_id], pieces[self.eos_id], pieces[self.unk_id]
        fast.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, self.bos_id)]
        )
        fast.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (unk, bos, eos)])
        directory.mkdir(parents=True, exist_ok=True)
        fast.save(str(directory / "tokenizer.json"))
        shutil.copyfile(self.path, directory / "tokenizer.model")
        special = dict(bos_token=bos, eos_token=eos, unk_token=unk)
        config = dict(tokenizer_class="PreTrainedTokenizerFast", **special, pad_token=None, split_special_tokens=True,
                      clean_up_tokenization_spaces=False, add_bos_token=True, add_eos_token=False)
        if model_max_length is not None:
            config["model_max_length"] = model_max_length
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
        (directory / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")

    @classmethod
    def train(
        cls,
        inputs: Iterable[str | os.PathLike] | Iterator[str],
        vocab_size: int,
        output_path: str | os.PathLike,
        *,
        input_sentence_size: int = 2_000_000,
        character_coverage: float = 0.9995,
        max_sentence_length: int = 16384,
        num_threads: int = 0,
        seed_sentencepiece_size: int = 200_000,
    ) -> "Tokenizer":
        """Train a BPE model on text files or an iterator of text lines; write ``output_path``.

        The paper's options: BPE, numbers split into single digits, byte fallback for
        characters outside the vocabulary, unk=0, bos=1, eos=2 and no pad (as Meta's
        tokenizer). At most ``input_sentence_size`` lines are sampled from the input,
        which keeps training fast on large corpora.
        """
        if not isinstance(vocab_size, int) or vocab_size < MIN_VOCAB_SIZE:
            raise ValueError(
                f"vocab_size must be an int >= {MIN_VOCAB_SIZE} (256 byte-fallback pieces + unk, bos, eos), "
                f"got {vocab_size!r}"
            )
        output_path = Path(output_path)
        if output_path.suffix != ".model":
            raise ValueError(f"output_path must end in .model, got {str(output_path)!r}")
        output_path.parent.mkdir(parents=True, exist_ok=True)
        options = dict(
            model_prefix=str(output_path.with_suffix("")),
            vocab_size=vocab_size,
            model_type="bpe",
            split_digits=True,
            byte_fallback=True,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=-1,
            character_coverage=character_coverage,
            input_sentence_size=input_sentence_size,
            shuffle_input_sentence=True,
            max_sentence_length=max_sentence_length,
            seed_sentencepiece_size=seed_sentencepiece_size,
            # Keep whitespace runs (indentation in code) and do not rewrite the text.
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True,
            split_by_whitespace=True,
            num_threads=num_threads or os.cpu_count() or 1,
            minloglevel=2,
        )
        if isinstance(inputs, (str, os.PathLike)):
            inputs = [inputs]
        if isinstance(inputs, (list, tuple)):
            paths = [Path(p) for p in inputs]
            missing = [str(p) for p in paths if not p.is_file()]
            if missing:
                raise FileNotFoundError(f"Tokenizer.train inputs: expected text files, missing {missing}")
            if not paths:
                raise ValueError("Tokenizer.train inputs: expected at least one text file, got none")
            options["input"] = ",".join(str(p) for p in paths)
        else:
            options["sentence_iterator"] = _nonempty_lines(inputs, max_sentence_length)
        try:
            spm.SentencePieceTrainer.Train(**options)
        except RuntimeError as exc:
            raise ValueError(_training_error(str(exc), vocab_size)) from exc
        return cls(output_path)


def expand_paths(inputs: list[str]) -> list[Path]:
    """Files, directories (every file below, recursively) and globs -> a sorted list of files."""
    files: set[Path] = set()
    for spec in inputs:
        path = Path(spec).expanduser()
        if path.is_file():
            found = [path]
        elif path.is_dir():
            found = [p for p in path.rglob("*") if p.is_file() and not any(s.startswith(".") for s in p.relative_to(path).parts)]
        elif any(ch in spec for ch in "*?["):
            found = [Path(p) for p in glob.glob(os.path.expanduser(spec), recursive=True) if Path(p).is_file()]
        else:
            raise FileNotFoundError(f"data input {spec!r}: no such file or directory")
        if not found:
            raise FileNotFoundError(f"data input {spec!r}: matched no files")
        files.update(found)
    return sorted(files)


def read_text(path: Path) -> str | None:
    """The file's text, or None for a binary or empty file.

    The rule: UTF-8 where the file decodes as UTF-8; otherwise a file without a NUL byte is legacy
    8-bit text, read as Windows-1252 (or Latin-1, which maps every byte, where Windows-1252 leaves a
    byte undefined); a file that is not UTF-8 and holds a NUL byte is binary.
    """
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        if b"\0" in data:
            return None
        try:
            text = data.decode("cp1252")
        except UnicodeDecodeError:
            text = data.decode("latin-1")
    return text if text.strip() else None


def _training_error(message: str, vocab_size: int) -> str:
    """SentencePiece's complaint about vocab_size, in terms of our options (it names flags we do not have)."""
    if found := re.search(r"smaller than required_chars\. \d+ vs (\d+)", message):
        need = int(found.group(1))
        return (f"vocab_size {vocab_size} is too small for this text: its {need - MIN_VOCAB_SIZE} distinct characters "
                f"and the {MIN_VOCAB_SIZE} reserved pieces (256 bytes, unk, bos, eos) need a vocab_size >= {need}")
    if found := re.search(r"Vocabulary size too high \(\d+\)\. Please set it to a value <= (\d+)", message):
        return (f"vocab_size {vocab_size} is more than this text can fill: it yields at most {found.group(1)} "
                f"pieces; use a vocab_size <= {found.group(1)} or more text")
    return f"SentencePiece training failed for vocab_size={vocab_size}: {message}"


def _nonempty_lines(texts: Iterable[str], max_bytes: int) -> Iterator[str]:
    """SentencePiece trains on lines; split multi-line texts, drop empty lines, and cut lines longer than
    ``max_bytes`` (its max_sentence_length, in UTF-8 bytes) into pieces: it drops longer lines, and a text
    of one long line (minified code, a 25 MB JSON) left it nothing ('[!sentences_.empty()]')."""
    seen = False
    for text in texts:
        for line in text.splitlines():
            if line.strip():
                seen = True
                yield from _cut(line, max_bytes)
    if not seen:
        raise ValueError("Tokenizer.train inputs: the text iterator held no non-empty line")


def _cut(line: str, max_bytes: int) -> Iterator[str]:
    """``line`` in pieces of at most ``max_bytes`` UTF-8 bytes, cut between characters."""
    if 4 * len(line) <= max_bytes:  # short enough whatever its characters
        yield line
        return
    data = line.encode("utf-8", errors="replace")
    start = 0
    while start < len(data):
        stop = min(start + max_bytes, len(data))
        while stop < len(data) and data[stop] & 0xC0 == 0x80:  # not inside a multi-byte character
            stop -= 1
        yield data[start:stop].decode("utf-8")
        start = stop


def _cmd_train(args) -> int:
    files = expand_paths(args.input)
    texts = (t for t in map(read_text, files) if t is not None)  # binary files skipped
    tok = Tokenizer.train(texts, args.vocab_size, args.output, input_sentence_size=args.input_sentence_size)
    print(f"wrote {tok.path} (vocab {tok.vocab_size}, trained on {len(files)} files)")
    return 0


def _cmd_encode(args) -> int:
    tok = Tokenizer(args.model)
    text = args.text if args.text is not None else sys.stdin.read()
    print(" ".join(map(str, tok.encode(text, bos=args.bos, eos=args.eos))))
    return 0


def _cmd_decode(args) -> int:
    tok = Tokenizer(args.model)
    ids = args.ids if args.ids else sys.stdin.read().split()
    print(tok.decode(int(i) for i in ids))
    return 0


def add_cli(subparsers) -> None:
    parser = subparsers.add_parser("tokenizer", help="train a SentencePiece tokenizer, encode or decode text")
    sub = parser.add_subparsers(dest="tokenizer_command", required=True)

    train = sub.add_parser("train", help="train a BPE tokenizer (digits split, byte fallback)")
    train.add_argument("--input", nargs="+", required=True, help="text files, directories or globs")
    train.add_argument("--vocab-size", type=int, required=True)
    train.add_argument("--output", required=True, help="path of the .model file to write")
    train.add_argument("--input-sentence-size", type=int, default=2_000_000, help="lines sampled for training")
    train.set_defaults(func=_cmd_train)

    encode = sub.add_parser("encode", help="print the token ids of a text (or of stdin)")
    encode.add_argument("--model", required=True)
    encode.add_argument("--text")
    encode.add_argument("--bos", action=argparse.BooleanOptionalAction, default=True)
    encode.add_argument("--eos", action=argparse.BooleanOptionalAction, default=False)
    encode.set_defaults(func=_cmd_encode)

    decode = sub.add_parser("decode", help="print the text of token ids (arguments or stdin)")
    decode.add_argument("--model", required=True)
    decode.add_argument("ids", nargs="*")
    decode.set_defaults(func=_cmd_decode)
