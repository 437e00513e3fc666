"""The LLaMA model: tokens -> logits (and the loss when targets are given).

One set of parameters, two backends: ``backend="reference"`` runs the plain
PyTorch ops of ``llama_fast.reference``; ``backend="fused"`` runs our kernels
from ``llama_fast.ops``. Parameter names do not depend on the backend, so one
checkpoint serves both. The model knows nothing of torch.distributed:
parallelism is applied from outside (see the trainer).

Parameter layout (per block): ``attn.wqkv`` is the fused [q; k; v] projection
((Hq + 2 Hkv) * D, dim) and ``mlp.w_gate_up`` the fused [gate; up] projection
(2F, dim), so each runs as one GEMM; RoPE uses the half-split convention.
"""
from __future__ import annotations

from collections.abc import Iterator

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from . import reference
from .config import LlamaConfig

BACKENDS = ("reference", "fused")


class _UsesOps:
    """Mixin: ``self.ops`` is the op namespace of ``self.backend`` (a string, so modules deep-copy
    and pickle; llama_fast.replace_modules switches a module by changing it)."""

    backend: str

    @property
    def ops(self):
        return ops_for(self.backend)


def ops_for(backend: str):
    """The op namespace (rms_norm, add_rms_norm, swiglu, rope, attention) of a backend."""
    if backend == "reference":
        return reference
    if backend == "fused":
        from . import ops

        return ops
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


class RMSNorm(_UsesOps, nn.Module):
    def __init__(self, dim: int, eps: float, backend: str = "reference"):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.rms_norm(x, self.weight, self.eps)


@dataclass
class KVCache:
    """Rotated keys and values of the positions seen so far, for sampling."""

    k: list[torch.Tensor]  # per layer (B, max_len, Hkv, D)
    v: list[torch.Tensor]
    pos: int = 0

    @classmethod
    def empty(cls, config: LlamaConfig, batch: int, max_len: int, device, dtype) -> "KVCache":
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise ValueError(f"KVCache batch must be a positive int, got {batch!r}")
        if isinstance(max_len, bool) or not isinstance(max_len, int) or not 1 <= max_len <= config.max_seq_len:
            raise ValueError(f"KVCache max_len must be an int in [1, max_seq_len={config.max_seq_len}], got {max_len!r}")
        shape = (batch, max_len, config.n_kv_heads, config.head_dim)
        return cls(
            k=[torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layers)],
            v=[torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layers)],
        )


class Attention(_UsesOps, nn.Module):
    def __init__(self, config: LlamaConfig, backend: str):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        qkv_out = (config.n_heads + 2 * config.n_kv_heads) * config.head_dim
        self.wqkv = nn.Linear(config.dim, qkv_out, bias=False)
        self.wo = nn.Linear(config.n_heads * config.head_dim, config.dim, bias=False)
        self.backend = backend

    def forward(self, x, cos, sin, cache: KVCache | None = None, layer: int = 0, documents: torch.Tensor | None = None):
        return self.attend(self.wqkv(x), cos, sin, cache, layer, documents)

    def attend(self, qkv, cos, sin, cache: KVCache | None = None, layer: int = 0, documents: torch.Tensor | None = None):
        """Attention and the output projection from the wqkv GEMM's output qkv (B, S, (Hq + 2 Hkv) D).
        ``documents``: cu_seqlens over the B * S tokens (see Llama.forward)."""
        B, S, _ = qkv.shape
        qkv = qkv.view(B, S, self.n_heads + 2 * self.n_kv_heads, self.head_dim)
        # Strided views, no copies: (B, S, Hq, D), (B, S, Hkv, D), (B, S, Hkv, D).
        q, k, v = qkv.split([self.n_heads, self.n_kv_heads, self.n_kv_heads], dim=2)
        if documents is not None:
            out = self.ops.attention_varlen(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), cos, sin, documents)
        elif cache is None:
            out = self.ops.attention(q, k, v, cos, sin, causal=True)  # (B, S, Hq, D)
        else:
            out = self._attend_cached(q, k, v, cos, sin, cache, layer)
        return self.wo(out.reshape(B, S, self.n_heads * self.head_dim))

    def _attend_cached(self, q, k, v, cos, sin, cache: KVCache, layer: int):
        # Sampling path: queries at positions pos..pos+S-1 attend to every cached key up to themselves.
        B, S = q.shape[:2]
        pos = cache.pos
        q, k = self.ops.rope(q, k, cos[pos : pos + S], sin[pos : pos + S])
        cache.k[layer][:B, pos : pos + S] = k
        cache.v[layer][:B, pos : pos + S] = v
        total = pos + S
        group = self.n_heads // self.n_kv_heads
        qh = q.transpose(1, 2)  # (B, Hq, S, D)
        kh = cache.k[layer][:B, :total].transpose(1, 2).repeat_interleave(group, dim=1)  # (B, Hq, T, D)
        vh = cache.v[layer][:B, :total].transpose(1, 2).repeat_interleave(group, dim=1)
        mask = torch.ones(S, total, dtype=torch.bool, device=q.device).tril(diagonal=pos)
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask)  # (B, Hq, S, D)
        return out.transpose(1, 2)


class MLP(_UsesOps, nn.Module):
    def __init__(self, config: LlamaConfig, backend: str):
        super().__init__()
        self.w_gate_up = nn.Linear(config.dim, 2 * config.ffn_hidden, bias=False)
        self.w_down = nn.Linear(config.ffn_hidden, config.dim, bias=False)
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # One GEMM for [gate | up]; swiglu reads both halves in place and returns one gradient.
        return self.w_down(self.ops.swiglu(self.w_gate_up(x)))  # (B, S, 2F) -> (B, S, F) -> (B, S, dim)


class Block(_UsesOps, nn.Module):
    def __init__(self, config: LlamaConfig, backend: str):
        super().__init__()
        self.attn_norm = RMSNorm(config.dim, config.norm_eps, backend)
        self.attn = Attention(config, backend)
        self.mlp_norm = RMSNorm(config.dim, config.norm_eps, backend)
        self.mlp = MLP(config, backend)
        self.backend = backend

    def forward(self, x, cos, sin, cache: KVCache | None = None, layer: int = 0, *, recompute_cheap: bool = False,
                documents: torch.Tensor | None = None):
        if recompute_cheap:
            return self._forward_recompute_cheap(x, cos, sin, documents)
        a = self.attn(self.attn_norm(x), cos, sin, cache, layer, documents)
        # h = x + a and its normalisation in one pass.
        normed, h = self.ops.add_rms_norm(a, x, self.mlp_norm.weight, self.mlp_norm.eps)
        return h + self.mlp(normed)

    def _forward_recompute_cheap(self, x, cos, sin, documents=None):
        """The same block with each norm and the SwiGLU fused into the GEMM that consumes it, which
        recomputes their outputs in the backward instead of saving them (llama_fast.ops.recompute).
        Every weight is read here, inside the block's forward, where FSDP has gathered the block
        (the trainer's unit; attn or mlp sharded as units of their own would not be gathered here)."""
        ops, attn, mlp = self.ops, self.attn, self.mlp
        qkv = ops.rms_norm_linear(x, self.attn_norm.weight, attn.wqkv.weight, self.attn_norm.eps)
        a = attn.attend(qkv, cos, sin, documents=documents)
        gate_up, h = ops.add_rms_norm_linear(a, x, self.mlp_norm.weight, mlp.w_gate_up.weight, self.mlp_norm.eps)
        return h + ops.swiglu_linear(gate_up, mlp.w_down.weight)  # (B, S, 2F) -> (B, S, dim)


RECOMPUTE = ("none", "cheap", "blocks")


def check_recompute(recompute: str, backend: str) -> None:
    if recompute not in RECOMPUTE:
        raise ValueError(f"recompute must be one of {RECOMPUTE}, got {recompute!r}")
    if recompute == "cheap" and backend != "fused":
        raise ValueError(f"recompute='cheap' needs backend='fused' (its ops are fused ops), got {backend!r}")


class Llama(nn.Module):
    """LLaMA. ``recompute`` trades backward compute for activation memory while training:
    "none" saves what the ops save; "cheap" recomputes the RMSNorm and SwiGLU outputs in the
    backward from tensors saved anyway (fused backend; the paper's "save the expensive activations");
    "blocks" recomputes each whole block (torch.utils.checkpoint). One mode at a time: "blocks"
    already recomputes everything "cheap" would. ``fused_loss`` (default: on for the fused backend)
    computes the loss with a chunked linear + cross-entropy that never holds all the logits;
    forward(tokens, targets) then returns ``(None, loss)``."""

    def __init__(
        self,
        config: LlamaConfig,
        backend: str = "reference",
        *,
        recompute: str = "none",
        fused_loss: bool | None = None,
    ):
        super().__init__()
        ops_for(backend)  # validates the name (and that the fused ops import) before allocating
        check_recompute(recompute, backend)
        self.config = config
        self.backend = backend
        self.recompute = recompute
        self.fused_loss = backend == "fused" if fused_loss is None else fused_loss
        self.embed = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(Block(config, backend) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps, backend)
        self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.register_buffer("rope_cos", torch.empty(0), persistent=False)
        self.register_buffer("rope_sin", torch.empty(0), persistent=False)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self, seed: int | None = None):
        """(Re)initialise every parameter and the rotary tables; also materialises a model built on meta.

        Linear and embedding weights ~ N(0, 0.02), the residual-branch outputs (wo, w_down)
        scaled by 1/sqrt(2 * n_layers); norm weights 1.
        """
        gen = None
        if seed is not None:
            gen = torch.Generator(device=self.embed.weight.device).manual_seed(seed)
        std = 0.02
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
                continue
            scaled = name.endswith(("attn.wo.weight", "mlp.w_down.weight"))
            # Drawn whole, then copied in: a parameter sharded from outside (FSDP's DTensors, copied
            # into under implicit replication, see llama_fast.train.parallelize) keeps its rows of the
            # very values one process draws, rather than every shard drawing the same numbers.
            values = torch.empty(p.shape, dtype=p.dtype, device=p.device)  # (the full parameter's shape)
            p.copy_(values.normal_(0.0, std / math.sqrt(2 * self.config.n_layers) if scaled else std, generator=gen))
        self.reset_rope_tables()

    def to_empty(self, *, device, recurse: bool = True):
        """nn.Module.to_empty (materialising a model built on meta), then what it leaves undone: it gives
        every parameter a tensor of its own, so tied embeddings are tied again, and it leaves the
        rotary tables uninitialised, so they are recomputed."""
        super().to_empty(device=device, recurse=recurse)
        if self.config.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.reset_rope_tables()
        return self

    def _apply(self, fn, *args, **kwargs):
        # .to(bfloat16) and friends cast buffers too; the rotary tables must stay fp32 (design.md),
        # so they are recomputed on the new device rather than cast (in fp64 for an fp64 model,
        # the tests' high-precision oracle).
        super()._apply(fn, *args, **kwargs)
        if self.rope_cos.dtype != self._rope_dtype():
            self.reset_rope_tables()
        return self

    def _rope_dtype(self) -> torch.dtype:
        return torch.float64 if self.embed.weight.dtype == torch.float64 else torch.float32

    @torch.no_grad()
    def reset_rope_tables(self):
        device = self.embed.weight.device
        self.rope_cos, self.rope_sin = reference.rope_tables(
            self.config.max_seq_len, self.config.head_dim, self.config.rope_theta, device, self._rope_dtype()
        )

    def _check_ids(self, tokens: torch.Tensor, targets: torch.Tensor | None) -> None:
        """Token ids in [0, vocab), targets too (or -100, ignored): one device sync for both, none when
        compiling or tracing on meta. On CUDA an id past the embedding or the logits would be a
        device-side assert that ends the process."""
        if torch.compiler.is_compiling() or tokens.device.type == "meta":
            return
        vocab = self.config.vocab_size
        checks = {"tokens": (tokens, (tokens < 0) | (tokens >= vocab), "")}  # name: (ids, outside, also valid)
        if targets is not None:
            checks["targets"] = (targets, (targets != -100) & ((targets < 0) | (targets >= vocab)), " or -100 (ignored)")
        any_outside = torch.stack([outside.any() for _, outside, _ in checks.values()]).tolist()
        for (name, (ids, outside, also_valid)), bad in zip(checks.items(), any_outside):
            if bad:
                raise ValueError(
                    f"{name} must be ids in [0, vocab_size={vocab}){also_valid}, got {ids[outside][:5].tolist()} "
                    f"(first of {int(outside.sum())} outside)"
                )

    def forward(
        self,
        tokens: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        cache: KVCache | None = None,
        documents: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """tokens [B, S] int64 -> (logits [B, S, vocab], loss or None).

        The loss is the mean cross-entropy over targets != -100. With ``cache`` the
        tokens continue the sequence at ``cache.pos`` and the cache advances. ``documents``
        (int32 cu_seqlens over the B * S tokens, row by row, each row boundary among them; see
        ``document_starts``) makes each document attend to itself only, its positions restarting at 0.
        """
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be [batch, seq_len], got shape {tuple(tokens.shape)}")
        if tokens.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"tokens must be int64 or int32 token ids, got {tokens.dtype}")
        if targets is not None:
            if targets.shape != tokens.shape:
                raise ValueError(
                    f"targets must have the shape of tokens {tuple(tokens.shape)}, got {tuple(targets.shape)}"
                )
            if targets.dtype not in (torch.int64, torch.int32):
                raise TypeError(f"targets must be int64 or int32 token ids, got {targets.dtype}")
        self._check_ids(tokens, targets)
        B, S = tokens.shape
        start = cache.pos if cache is not None else 0
        if start + S > self.config.max_seq_len:
            raise ValueError(
                f"sequence of {start + S} positions exceeds max_seq_len={self.config.max_seq_len} of the config"
            )
        if cache is not None:
            cache_batch, cache_len = cache.k[0].shape[:2]
            if B > cache_batch or start + S > cache_len or len(cache.k) != self.config.n_layers:
                raise ValueError(
                    f"cache holds {len(cache.k)} layers x batch {cache_batch} x {cache_len} positions; this call needs "
                    f"{self.config.n_layers} layers x batch {B} x {start + S} positions (cache.pos={start} + {S} tokens)"
                )
        if documents is not None:
            if cache is not None:
                raise ValueError("documents and cache cannot be combined: sampling continues one sequence")
            if (not isinstance(documents, torch.Tensor) or documents.dim() != 1 or documents.numel() < B + 1
                    or documents.device != tokens.device or documents.dtype != torch.int32):
                raise ValueError(f"documents must be 1-D int32 cu_seqlens over the {B} x {S} tokens on {tokens.device}, "
                                 f"got {documents if not isinstance(documents, torch.Tensor) else (documents.dtype, tuple(documents.shape))}")
            if not torch.isin(torch.arange(0, B * S + 1, S, device=documents.device, dtype=torch.int32), documents).all():
                raise ValueError(f"documents must start a document at every row start (0, {S}, ..., {B * S}): a "
                                 f"document cannot span two rows; got {documents.tolist()[:20]}")
        x = self.embed(tokens)  # (B, S, dim)
        cos, sin = self.rope_cos, self.rope_sin
        if cache is None:
            cos, sin = cos[:S], sin[:S]
        check_recompute(self.recompute, self.backend)  # both are plain attributes: replace_modules sets backend
        recompute = self.recompute if self.training and cache is None else "none"
        for i, layer in enumerate(self.layers):
            if recompute == "blocks":
                x = checkpoint(layer, x, cos, sin, use_reentrant=False, documents=documents)
            else:
                x = layer(x, cos, sin, cache, i, recompute_cheap=recompute == "cheap", documents=documents)
        if cache is not None:
            cache.pos += S
        x = self.norm(x)
        if targets is None:
            return self.lm_head(x), None  # (B, S, vocab)
        if self.fused_loss:
            from .ops.cross_entropy import linear_cross_entropy

            # validate=False: _check_ids has checked the targets with the tokens, in the same sync.
            return None, linear_cross_entropy(x, self.lm_head.weight, targets, validate=False)
        logits = self.lm_head(x)  # (B, S, vocab)
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)
        return logits, loss


def document_starts(tokens: torch.Tensor, eos_id: int) -> torch.Tensor:
    """cu_seqlens (int32 [N + 1]) of the documents in tokens [B, S]: a document starts at each row's
    first token and after each ``eos_id``; the rows are laid end to end (row b at b * S)."""
    B, S = tokens.shape
    starts = torch.zeros(B, S, dtype=torch.bool, device=tokens.device)
    starts[:, 0] = True
    starts[:, 1:] = tokens[:, :-1] == eos_id
    first = starts.flatten().nonzero()[:, 0]
    return torch.cat([first, first.new_tensor([B * S])]).to(torch.int32)


# ----------------------------------------------------------------------------------------------
# Sampling with the KV cache (the trainer's end-of-run sample and `llama-fast generate`).


def next_token(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> torch.Tensor:
    """logits [B, vocab] -> token ids [B, 1]; temperature 0 is greedy."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    probs = torch.softmax(logits.float() / temperature, dim=-1)  # (B, vocab)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the top token always stays).
        outside = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator)


def sample(
    model: Llama,
    prompt: list[int],
    max_new_tokens: int = 128,
    *,
    temperature: float = 0.8,
    top_p: float = 0.95,
    seed: int = 0,
    eos_id: int | None = None,
    vocab_size: int | None = None,
) -> list[int]:
    """The new token ids after ``prompt`` (stops early at ``eos_id``).

    ``vocab_size``: draw only ids below it (the tokenizer's vocabulary, when the model's
    embedding is padded beyond it).
    """
    return list(stream(model, prompt, max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
                       eos_id=eos_id, vocab_size=vocab_size))


@torch.no_grad()
def stream(
    model: Llama,
    prompt: list[int],
    max_new_tokens: int = 128,
    *,
    temperature: float = 0.8,
    top_p: float = 0.95,
    seed: int = 0,
    eos_id: int | None = None,
    vocab_size: int | None = None,
) -> Iterator[int]:
    """``sample``, one new token id at a time: a caller that stops on text (the harness's stop
    sequences) closes the generator and no further forward runs."""
    if not prompt:
        raise ValueError("sample: prompt must hold at least one token id (e.g. bos), got none")
    if temperature < 0:
        raise ValueError(f"sample: temperature must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"sample: top_p must lie in (0, 1], got {top_p}")
    if max_new_tokens < 0:
        raise ValueError(f"sample: max_new_tokens must be >= 0, got {max_new_tokens}")
    config = model.config
    if len(prompt) >= config.max_seq_len:
        raise ValueError(
            f"sample: the prompt has {len(prompt)} tokens; the model's max_seq_len {config.max_seq_len} "
            "leaves no room for a new one"
        )
    max_new_tokens = min(max_new_tokens, config.max_seq_len - len(prompt))
    device = model.embed.weight.device
    dtype = torch.bfloat16 if device.type == "cuda" else model.embed.weight.dtype
    cache = KVCache.empty(config, 1, len(prompt) + max_new_tokens, device, dtype)
    generator = torch.Generator(device=device).manual_seed(seed)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    tokens = torch.tensor([prompt], device=device)  # (1, P)
    for _ in range(max_new_tokens):
        with autocast:
            logits, _ = model(tokens, cache=cache)  # (1, S, vocab)
        tokens = next_token(logits[:, -1, :vocab_size], temperature, top_p, generator)  # (1, 1)
        yield int(tokens)
        if eos_id is not None and int(tokens) == eos_id:
            return
