"""Training data: text -> memory-mapped token files, and a deterministic mixture sampler.

``prepare`` tokenizes one or more sources (text files, directories or globs), each with a
sampling weight, into a directory::

    meta.json             format, dtype, vocab size, the sources with their weights and token counts
    tokenizer.model       the tokenizer that made the tokens (trained here if none was given)
    {source}.train.bin    raw token ids (uint16 when vocab < 65536, else uint32), memory-mapped
    {source}.val.bin      the validation split: whole documents held out (or the tail of a single one)

Every document is encoded as ``<bos> text <eos>`` and the documents are concatenated.
``TokenBatches`` samples training sequences as in the paper's Table 1 mixture: for each
sequence of a step a source is drawn with its weight, then a uniform offset inside it. The
draw is a pure function of (seed, step), so the data position is just the step: a resumed
run and a run on a different number of processes see the same global batches.

With no source given, the corpus is the Python standard library's own source files, so the
trainer runs on a fresh machine with no download. Command line: ``llama-fast prepare``.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import shutil
import socket
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .tokenizer import Tokenizer, expand_paths, read_text

FORMAT = "llama_fast.tokens/1"
DEFAULT_SOURCE_NAME = "stdlib"
# Texts tokenized per call (and per progress-bar update) while preparing.
ENCODE_CHUNK_BYTES = 32 << 20


@dataclass
class Source:
    """One named source of text and its sampling weight."""

    name: str
    inputs: list[str]  # files, directories or globs
    weight: float = 1.0


def parse_source(spec: str) -> Source:
    """``[name=]PATH[,PATH...][:weight]`` -> Source; the name defaults to the first path's stem."""
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"data source: expected '[name=]PATH[:weight]', got {spec!r}")
    name, sep, rest = spec.partition("=")
    if not sep or not re.fullmatch(r"[\w-]+", name):
        name, rest = "", spec  # no name, or an '=' inside the path
    weight = 1.0
    head, sep, tail = rest.rpartition(":")
    if sep:
        try:
            weight = float(tail)
            rest = head
        except ValueError:
            pass  # a ':' inside the path itself
    if not weight > 0:
        raise ValueError(f"data source {spec!r}: the weight must be > 0, got {weight}")
    inputs = [p for p in rest.split(",") if p]
    if not inputs:
        raise ValueError(f"data source {spec!r}: expected at least one path")
    name = name or re.sub(r"[^\w-]", "_", Path(inputs[0].rstrip("/")).stem) or "data"
    return Source(name, inputs, weight)


def default_corpus_files() -> list[Path]:
    """The standard library's *.py files (site-packages excluded), sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(
        p for p in root.rglob("*.py") if p.is_file() and not {"site-packages", "dist-packages"} & set(p.parts)
    )


def default_source() -> Source:
    return Source(DEFAULT_SOURCE_NAME, [str(p) for p in default_corpus_files()])


def _chunks(files: list[Path], max_bytes: int):
    chunk, size = [], 0
    for f in files:
        chunk.append(f)
        size += f.stat().st_size
        if size >= max_bytes:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size < 2**16 else np.uint32)


def prepare(
    sources: list[Source] | None,
    out_dir: str | os.PathLike,
    *,
    tokenizer: str | os.PathLike | None = None,
    vocab_size: int = 4096,
    val_fraction: float = 0.01,
    seed: int = 0,
    progress: bool = True,
) -> Path:
    """Tokenize ``sources`` (None: the standard library) into ``out_dir``; returns ``out_dir``.

    Trains a ``vocab_size`` tokenizer on the sources when ``tokenizer`` is None. The
    directory is built under a temporary name and renamed at the end, so a directory with
    a meta.json is always complete.
    """
    from tqdm import tqdm

    sources = sources or [default_source()]
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must lie in [0, 1), got {val_fraction}")
    names = [s.name for s in sources]
    if len(set(names)) != len(names):
        raise ValueError(f"data sources need distinct names, got {names}")
    files = {s.name: expand_paths(s.inputs) for s in sources}
    out_dir = Path(out_dir)
    _remove_stale_temporaries(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{socket.gethostname()}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        if tokenizer is None:
            all_files = [f for s in sources for f in files[s.name]]
            texts = (t for t in map(read_text, all_files) if t is not None)
            tok = Tokenizer.train(texts, vocab_size, tmp / "tokenizer.model", input_sentence_size=300_000)
        else:
            tok = Tokenizer(tokenizer)
            shutil.copyfile(tok.path, tmp / "tokenizer.model")
        dtype = token_dtype(tok.vocab_size)
        meta_sources = []
        for source in sources:
            stats = _tokenize_source(source, files[source.name], tok, dtype, tmp, val_fraction, seed, progress, tqdm)
            meta_sources.append(dict(name=source.name, weight=source.weight, inputs=source.inputs[:20], **stats))
        meta = dict(
            format=FORMAT,
            dtype=dtype.name,
            vocab_size=tok.vocab_size,
            bos_id=tok.bos_id,
            eos_id=tok.eos_id,
            tokenizer="tokenizer.model",
            val_fraction=val_fraction,
            seed=seed,
            sources=meta_sources,
        )
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _remove_stale_temporaries(out_dir: Path) -> None:
    """Temporaries of earlier prepares of ``out_dir`` that were killed (kill -9 skips the cleanup): those of
    this host whose process is gone. Another host's (a shared filesystem) or a live process's are left."""
    prefix = f".{out_dir.name}.tmp-"
    host = socket.gethostname()
    for tmp in out_dir.parent.glob(glob.escape(prefix) + "*"):
        owner, _, pid = tmp.name[len(prefix):].rpartition("-")
        if owner in ("", host) and pid.isdigit() and not _process_alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _tokenize_source(source, files, tok, dtype, out, val_fraction, seed, progress, tqdm) -> dict:
    # Hold out whole documents, chosen by a seeded permutation (independent of file order on disk).
    rng = np.random.default_rng([seed, int.from_bytes(source.name.encode()[:8], "little")])
    n_val = int(round(val_fraction * len(files))) if len(files) > 1 else 0
    if val_fraction > 0 and len(files) > 1:
        n_val = max(1, min(n_val, len(files) - 1))
    val_set = set(rng.permutation(len(files))[:n_val].tolist())
    counts = {"train": 0, "val": 0}
    documents, skipped = 0, []
    bar = tqdm(total=sum(f.stat().st_size for f in files), unit="B", unit_scale=True, disable=not progress,
               desc=f"tokenizing {source.name}")
    index = {f: i for i, f in enumerate(files)}
    with open(out / f"{source.name}.train.bin", "wb") as train_f, open(out / f"{source.name}.val.bin", "wb") as val_f:
        for chunk in _chunks(files, ENCODE_CHUNK_BYTES):
            texts = [(f, read_text(f)) for f in chunk]
            kept = [(f, t) for f, t in texts if t is not None]
            skipped += [f for f, t in texts if t is None]
            encoded = tok.encode_batch([t for _, t in kept], bos=True, eos=True)
            for (f, _), ids in zip(kept, encoded):
                split = "val" if index[f] in val_set else "train"
                np.asarray(ids, dtype=dtype).tofile(val_f if split == "val" else train_f)
                counts[split] += len(ids)
                documents += 1
            bar.update(sum(f.stat().st_size for f in chunk))
    bar.close()
    if skipped:
        names = ", ".join(str(f) for f in skipped[:5]) + (f" and {len(skipped) - 5} more" if len(skipped) > 5 else "")
        print(f"data source {source.name!r}: skipped {len(skipped)} binary or empty file(s): {names}", flush=True)
    tail_split = n_val == 0
    if counts["train"] == 0 and counts["val"] > 0:
        # The held-out documents were the only text (the other files binary or empty): they train, and
        # their tail becomes the validation split, as for a single document.
        os.replace(out / f"{source.name}.val.bin", out / f"{source.name}.train.bin")
        counts, tail_split = {"train": counts["val"], "val": 0}, True
    if counts["train"] == 0:
        raise ValueError(f"data source {source.name!r}: no text found in {len(files)} file(s) ({len(skipped)} binary "
                         "or empty)")
    if tail_split and val_fraction > 0:
        # A single document: its tail becomes the validation split.
        train = np.fromfile(out / f"{source.name}.train.bin", dtype=dtype)
        cut = len(train) - int(len(train) * val_fraction)
        train[:cut].tofile(out / f"{source.name}.train.bin")
        train[cut:].tofile(out / f"{source.name}.val.bin")
        counts = {"train": cut, "val": len(train) - cut}
    return dict(documents=documents, skipped_files=len(skipped), train_tokens=counts["train"], val_tokens=counts["val"])


def default_cache_dir() -> Path:
    """Where the trainer keeps prepared data, shared by every run: $LLAMA_FAST_CACHE, else
    $XDG_CACHE_HOME/llama_fast/data (~/.cache/llama_fast/data)."""
    if os.environ.get("LLAMA_FAST_CACHE"):
        return Path(os.environ["LLAMA_FAST_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "llama_fast" / "data"


def cache_key(sources: list[Source] | None, tokenizer: str | None, vocab_size: int, val_fraction: float, seed: int) -> str:
    """A name for the prepared form of these inputs, for reuse across runs: it changes when a file is added,
    removed or rewritten (path, size, modification time), or the tokenizer, the split or the rule reading text
    files does."""
    sources = sources or [default_source()]

    def stamp(path: Path) -> tuple:
        st = path.stat()
        return str(path.resolve()), st.st_size, st.st_mtime_ns

    desc = dict(
        format=FORMAT,
        reading="utf-8; else cp1252 (latin-1) without NUL",  # tokenizer.read_text's rule: a new rule, new data
        sources=[(s.name, [stamp(f) for f in expand_paths(s.inputs)], s.weight) for s in sources],
        tokenizer=None if tokenizer is None else stamp(Path(tokenizer)),
        vocab_size=vocab_size,
        val_fraction=val_fraction,
        seed=seed,
    )
    return hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()[:16]


def read_meta(data_dir: str | os.PathLike) -> dict:
    path = Path(data_dir) / "meta.json"
    if not path.is_file():
        raise FileNotFoundError(f"prepared data: expected {path} (run `llama-fast prepare`), found none")
    meta = json.loads(path.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"prepared data {data_dir}: expected format {FORMAT!r}, got {meta.get('format')!r}")
    return meta


class TokenBatches:
    """Sequences of ``seq_len + 1`` tokens drawn from a prepared directory's sources by weight.

    ``rows(step, split)`` returns the (source, offset) pairs of one global batch: a pure
    function of (seed, split, step). ``read(source, offsets)`` gathers them as int64.
    """

    def __init__(self, data_dir: str | os.PathLike, seq_len: int, seed: int = 0, weights: dict | None = None):
        self.data_dir = Path(data_dir)
        self.meta = read_meta(self.data_dir)
        self.seq_len = seq_len
        self.seed = seed
        self.vocab_size = self.meta["vocab_size"]
        dtype = np.dtype(self.meta["dtype"])
        self.names = [s["name"] for s in self.meta["sources"]]
        weights = {**{s["name"]: s["weight"] for s in self.meta["sources"]}, **(weights or {})}
        unknown = set(weights) - set(self.names)
        if unknown:
            raise ValueError(f"data weights name unknown sources {sorted(unknown)}; the data has {self.names}")
        w = np.array([weights[n] for n in self.names], dtype=np.float64)
        self.probs = w / w.sum()
        self.tokens = {}
        for split in ("train", "val"):
            self.tokens[split] = []
            for name in self.names:
                path = self.data_dir / f"{name}.{split}.bin"
                n = path.stat().st_size // dtype.itemsize
                self.tokens[split].append(np.memmap(path, dtype=dtype, mode="r") if n else np.zeros(0, dtype))
        for name, tokens in zip(self.names, self.tokens["train"]):
            if len(tokens) < seq_len + 1:
                raise ValueError(
                    f"data source {name!r} holds {len(tokens)} training tokens, fewer than one sequence "
                    f"(seq_len + 1 = {seq_len + 1}); give more text or a shorter seq_len"
                )

    def has_validation(self) -> bool:
        return any(len(t) >= self.seq_len + 1 for t in self.tokens["val"])

    def rows(self, step: int, n: int, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
        """The (source index, offset) of the ``n`` sequences of global batch ``step``."""
        tokens = self.tokens[split]
        sizes = np.array([len(t) - self.seq_len for t in tokens])  # valid start offsets per source
        probs = np.where(sizes > 0, self.probs, 0.0)
        if probs.sum() == 0:
            raise ValueError(f"no {split} source holds a full sequence of {self.seq_len + 1} tokens")
        rng = np.random.default_rng([self.seed, 0 if split == "train" else 1, step])
        source = rng.choice(len(tokens), size=n, p=probs / probs.sum())
        offset = (rng.random(n) * sizes[source]).astype(np.int64)
        return source, offset

    def read(self, source: np.ndarray, offset: np.ndarray, split: str = "train") -> np.ndarray:
        """Sequences [len(source), seq_len + 1] as int64."""
        tokens = self.tokens[split]
        return np.stack([tokens[s][o : o + self.seq_len + 1].astype(np.int64) for s, o in zip(source, offset)])


def _cmd_prepare(args) -> int:
    sources = [parse_source(s) for s in args.data] if args.data else None
    out = prepare(
        sources,
        args.out,
        tokenizer=args.tokenizer,
        vocab_size=args.vocab_size,
        val_fraction=args.val_fraction,
        seed=args.seed,
    )
    meta = read_meta(out)
    for s in meta["sources"]:
        print(f"{s['name']}: weight {s['weight']}, {s['documents']} documents, "
              f"{s['train_tokens']:,} train / {s['val_tokens']:,} val tokens")
    print(f"wrote {out} (vocab {meta['vocab_size']}, {meta['dtype']})")
    return 0


def add_cli(subparsers) -> None:
    parser = subparsers.add_parser(
        "prepare", help="tokenize text into memory-mapped token files (default: the Python standard library)"
    )
    parser.add_argument("--data", action="append", metavar="[NAME=]PATH[:WEIGHT]",
                        help="a source (files, directory or glob; ',' joins several) and its sampling weight; "
                             "repeat to mix sources; default: the standard library's *.py files")
    parser.add_argument("--out", required=True, help="directory to write")
    parser.add_argument("--tokenizer", help="a SentencePiece .model; default: train one on the data")
    parser.add_argument("--vocab-size", type=int, default=4096, help="vocabulary of the trained tokenizer")
    parser.add_argument("--val-fraction", type=float, default=0.01, help="share of documents held out")
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(func=_cmd_prepare)
