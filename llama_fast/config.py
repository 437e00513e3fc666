"""LlamaConfig: the shape of a LLaMA model, with the paper's named flavors."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field


@dataclass
class LlamaConfig:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None  # None: multi-head attention (n_kv_heads == n_heads)
    vocab_size: int = 32000
    ffn_hidden: int | None = None  # None: 2/3 * 4 * dim rounded up to multiple_of, as in the paper
    multiple_of: int = 256
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_seq_len: int = 2048
    tie_embeddings: bool = False
    head_dim: int = field(init=False)

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.ffn_hidden is None:
            hidden = int(2 * 4 * self.dim / 3)
            self.ffn_hidden = self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "ffn_hidden", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"LlamaConfig.{name} must be a positive int, got {value!r}")
        for name in ("norm_eps", "rope_theta"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
                    math.isfinite(value) and value > 0):
                raise ValueError(f"LlamaConfig.{name} must be a finite number > 0, got {value!r}")
        if self.dim % self.n_heads:
            raise ValueError(f"LlamaConfig.dim ({self.dim}) must be divisible by n_heads ({self.n_heads})")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"LlamaConfig.n_heads ({self.n_heads}) must be divisible by n_kv_heads ({self.n_kv_heads})"
            )
        self.head_dim = self.dim // self.n_heads
        if self.head_dim % 2:
            raise ValueError(f"LlamaConfig head_dim (dim / n_heads) must be even for RoPE, got {self.head_dim}")

    @classmethod
    def from_name(cls, name: str, **overrides) -> "LlamaConfig":
        """A named flavor ("7B", "13B", "33B", "65B", "1B", "small", "tiny"), optionally overridden."""
        return cls(**{**FLAVORS[flavor_name(name)], **overrides})

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}

    @classmethod
    def from_dict(cls, d: dict) -> "LlamaConfig":
        known = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = set(d) - known - {"head_dim"}
        if unknown:
            raise ValueError(f"unknown LlamaConfig fields {sorted(unknown)}; expected a subset of {sorted(known)}")
        return cls(**{k: v for k, v in d.items() if k in known})

    def num_params(self, include_embeddings: bool = True) -> int:
        d, f, hd = self.dim, self.ffn_hidden, self.head_dim
        attn = d * (self.n_heads + 2 * self.n_kv_heads) * hd + self.n_heads * hd * d
        mlp = 3 * d * f
        per_layer = attn + mlp + 2 * d
        emb = self.vocab_size * d * (1 if self.tie_embeddings else 2)
        return self.n_layers * per_layer + d + (emb if include_embeddings else 0)

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6N (non-embedding, plus lm_head) + 6 L d S attention, as in design.md."""
        n = self.num_params(include_embeddings=False) + self.vocab_size * self.dim
        return 6.0 * n + 6.0 * self.n_layers * self.dim * seq_len


# The paper's Table 2 (ffn 2/3 * 4d rounded up to 256 gives 11008, 13824, 17920, 22016),
# a ~1.1B GQA shape used for benchmarks, and small flavors for tests and the CPU demo.
FLAVORS: dict[str, dict] = {
    "7B": dict(dim=4096, n_layers=32, n_heads=32),
    "13B": dict(dim=5120, n_layers=40, n_heads=40),
    "33B": dict(dim=6656, n_layers=60, n_heads=52),
    "65B": dict(dim=8192, n_layers=80, n_heads=64),
    "1B": dict(dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, ffn_hidden=5632),
    "small": dict(dim=256, n_layers=4, n_heads=8, n_kv_heads=4, vocab_size=4096, ffn_hidden=704, max_seq_len=256),
    "tiny": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, ffn_hidden=176, max_seq_len=128),
}

def flavor_name(name: str, what: str = "LLaMA flavor") -> str:
    """The flavor's name as FLAVORS spells it, whatever the case ("1b" -> "1B")."""
    found = {k.lower(): k for k in FLAVORS}.get(str(name).lower())
    if found is None:
        raise ValueError(f"unknown {what} {name!r}; expected one of {sorted(FLAVORS)} (any case)")
    return found


# Peak learning rates from Table 2, used by the trainer's defaults.
PAPER_LR = {"7B": 3e-4, "13B": 3e-4, "33B": 1.5e-4, "65B": 1.5e-4}
