"""Small deterministic text for tokenizer, data and trainer tests (no corpus download, no stdlib scan)."""
from __future__ import annotations

import random
from pathlib import Path

_SYLLABLES = ["ka", "lo", "mi", "ne", "ru", "ta", "po", "se", "di", "vu", "ga", "he", "zo", "fi", "by", "qu"]


def words(rng: random.Random, n: int) -> list[str]:
    return ["".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 3))) for _ in range(n)]


def document(rng: random.Random, lines: int = 20) -> str:
    """Prose-like lines with numbers and a little code-like punctuation."""
    vocab = words(rng, 60)
    out = []
    for i in range(lines):
        line = " ".join(rng.choice(vocab) for _ in range(rng.randint(4, 12)))
        if i % 3 == 0:
            line += f" = {rng.randint(0, 99999)}"
        if i % 5 == 0:
            line = f"def {rng.choice(vocab)}(x, y):  # {line}"
        out.append(line)
    return "\n".join(out) + "\n"


def write_corpus(directory: Path, n_files: int, seed: int = 0, lines: int = 20) -> Path:
    """``n_files`` text files under ``directory``; returns the directory."""
    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(n_files):
        (directory / f"doc{i:03d}.txt").write_text(document(rng, lines))
    return directory
