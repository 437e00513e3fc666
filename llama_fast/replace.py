"""Drop-in replacement: swap a model's RMSNorm, gated MLP, attention and loss for fused ones.

    from transformers import LlamaForCausalLM
    import llama_fast
    model = LlamaForCausalLM.from_pretrained(path)
    report = llama_fast.replace_modules(model)      # in place; weights and module names kept
    llama_fast.replace_modules(model, attention=False)   # per-kernel switches: leave the attention alone

One generic mechanism: a short list of rules, each recognising a kind of module by its structure
(not by model family) and building its fused counterpart around the same parameters. Recognised:

* RMSNorm (switch ``rms_norm``): a module named ``*RMSNorm`` with a 1-D ``weight`` and an ``eps`` or
  ``variance_epsilon`` attribute (Hugging Face's ``LlamaRMSNorm``, Mistral's, Qwen2's, ...);
* gated SiLU MLP (switch ``swiglu``): ``gate_proj``, ``up_proj``, ``down_proj`` projections without
  bias and a SiLU activation (``LlamaMLP`` and its copies);
* rotary self-attention (switch ``attention``): ``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``
  projections without bias and no other submodule, a ``head_dim`` and a ``layer_idx``
  (``LlamaAttention`` and its copies), called with ``position_embeddings=(cos, sin)`` as
  transformers does; its class is swapped in place;
* the causal-LM loss (switch ``cross_entropy``): a model whose forward is transformers'
  ``LlamaForCausalLM.forward`` (the same bytecode: Mistral, Qwen2, Qwen3, Gemma, OLMo, Phi-3 share it;
  Gemma 2's soft-capping or Cohere's logit scale do not) gets the chunked linear + cross-entropy
  (llama_fast.ops.cross_entropy) in training with ``labels``: the [B, S, vocab] logits never exist;
* llama_fast's own ``Llama`` built with ``backend="reference"``: its modules switch to the fused ops.

A projection is an ``nn.Linear`` without bias, or a peft adapter layer (LoRA, ...) around one: the fused
modules call the projection modules themselves, so whatever wraps them (before or after
replace_modules) is served on both paths. A module that looks like one of these but differs in a way
the fused op cannot reproduce (a bias, another activation, q/k norms, attention logit soft-capping,
sliding windows, a non-default scaling, interleaved rotary tables) makes the call fail before anything
is changed, naming the module, the reason and the switch that leaves that kind alone.

How the fused attention decides, per call
-----------------------------------------
The fused kernel computes softmax(rot(q) rot(k)^T / sqrt(D) + causal) v, rotating token s of every
row by row s of the call's tables. A call may take that path only when the original forward would
compute exactly this. The plain call (no mask, tables shared by the rows) is decided from Python
values and tensor metadata only (``_unfusable_call``): no device sync, and under torch.compile no
graph break (the compiled graph bakes the decision in, guarded on the same metadata).

* Positions are not checked at all: the fused op rotates by the tables the call brings, row s for token
  s, so offset or restarting positions rotate exactly as the original rotates them. What the tables
  must be is fixed by the model, not by the call: their last dim is head_dim with the half-split layout
  (cos = [c, c]), which replace_modules verifies once, on the model's own rotary module(s).
* Only under ``_attn_implementation == "sdpa"``, where a missing mask means plain causal (eager
  attention reads None as no mask at all; flash-attention looks for packed sequences in the positions).
* Masks, packed documents and per-row tables (eagerly; under torch.compile they fall back, as their
  values would have to be read): ``_varlen_plan`` reads the mask once and maps the call onto packed
  documents for ``ops.attention(cu_seqlens=...)``, as transformers' flash-attention path unpads: every
  query row must see a causal run of its own document (padding, and packing such as the block-diagonal
  mask transformers 5 builds from restarting position ids), or be a padding token that no document
  token sees. Padding rows that see nothing give 0 (as SDPA does); those that see keys (right padding,
  or transformers 4.x's fully visible left-padding rows) are computed row by row in plain math, so every
  output, pad positions included, is the original's. Any other mask (bidirectional, a float bias) falls
  back. ``cu_seq_lens_q/k`` without a mask (flash_attention_2's keywords, from
  DataCollatorWithFlattening) separate those documents; SDPA ignores them, but their meaning is not in
  doubt. Tables that differ per row ([B, S, D]) make each row one document with its own positions.
* The cache: none, or an empty DynamicCache, which the fused path fills as the original would; any
  cached tokens (decoding) fall back. Every keyword must be known (``_IGNORED_KWARGS``, the cache names,
  the packed keywords, ``output_attentions`` False); anything else, a renamed argument or a new mask
  kind, falls back.

Fallbacks are counted per reason (``fallback_reasons`` on the module) and each reason is warned about
once; both only outside torch.compile (a counter written in a compiled forward would be guarded on and
recompile every call): run one call eagerly to see how a compiled model dispatches.
"""
from __future__ import annotations

import functools
import inspect
import math
import warnings
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import model as llama_model
from . import ops
from .ops._common import LastCallMemo
from .ops.cross_entropy import linear_cross_entropy


class FusedRMSNorm(nn.Module):
    """RMSNorm on the fused kernel; keeps ``weight`` (the same Parameter) and ``variance_epsilon``."""

    def __init__(self, weight: nn.Parameter, eps: float):
        super().__init__()
        self.weight = weight
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.rms_norm(x, self.weight, self.variance_epsilon)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


class FusedGatedMLP(nn.Module):
    """down_proj(silu(gate_proj(x)) * up_proj(x)) with the SwiGLU product on the fused kernel."""

    def __init__(self, gate_proj: nn.Module, up_proj: nn.Module, down_proj: nn.Module):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = gate_proj, up_proj, down_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(ops.swiglu(self.gate_proj(x), self.up_proj(x)))


class FusedRotaryAttention:
    """Makes a transformers rotary self-attention module run llama_fast's RoPE-fused flash attention.

    replace_modules does not build a new module: it swaps the instance's class for a subclass with
    this mixin in front, so the projections, attributes and anything that later wraps them (LoRA,
    quantisation) stay the module's own, and the original forward is ``super().forward``.

    Takes the call of transformers' attention modules (hidden_states, position_embeddings,
    attention_mask, the cache as ``cache``, ``past_key_values`` or ``past_key_value``, ...) and returns
    what the original returns: (output, None), or (output, None, cache) before transformers 4.48.
    Which calls take the fused kernel, decided from metadata alone: the module docstring.
    """

    fused_calls: int
    fallback_calls: int
    fallback_reasons: Counter  # reason -> calls that went to the original forward for it
    _returns_cache: bool

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, **kwargs):
        reason, cache = _unfusable_call(self, hidden_states, position_embeddings, attention_mask, kwargs)
        plan = None
        if reason is None:
            plan = _cached_plan(self, attention_mask, position_embeddings[0].shape[0], hidden_states.shape[:2], kwargs)
            reason = plan if isinstance(plan, str) else None
        if reason is not None:
            _count_fallback(self, reason)
            return super().forward(
                hidden_states, position_embeddings=position_embeddings, attention_mask=attention_mask, **kwargs
            )
        if not torch.compiler.is_compiling():
            self.fused_calls += 1
        B, S, _ = hidden_states.shape
        q = self.q_proj(hidden_states).view(B, S, -1, self.head_dim)  # (B, S, Hq, D)
        k = self.k_proj(hidden_states).view(B, S, -1, self.head_dim)  # (B, S, Hkv, D)
        v = self.v_proj(hidden_states).view(B, S, -1, self.head_dim)
        if plan is None:
            # Row s of the call's own tables rotates token s; the halves are equal (verified at replace time).
            cos, sin = (t[0, :, : self.head_dim // 2].float() for t in position_embeddings)  # (S, D/2) each
            if cache is not None:  # a first, empty-cache call: fill the cache as the original would
                _, k_rot = ops.rope(q, k, cos, sin)
                cache.update(k_rot.transpose(1, 2), v.transpose(1, 2), self.layer_idx)
            out = ops.attention(q, k, v, cos, sin, causal=True)  # (B, S, Hq, D)
        else:
            if cache is not None:  # per-token tables: rotate k for the cache as the original does
                cos, sin = position_embeddings
                k_rot = k.transpose(1, 2) * cos[:, None] + _rotate_half(k.transpose(1, 2)) * sin[:, None]
                cache.update(k_rot.to(k.dtype), v.transpose(1, 2), self.layer_idx)
            out = _attention_by_plan(plan, q, k, v, position_embeddings)
        out = self.o_proj(out.reshape(B, S, -1))
        return (out, None, cache) if self._returns_cache else (out, None)


# The last call's plan: every layer of a model gets the same mask (and cu_seq_lens, position ids) objects, and
# planning reads them to the host (a sync) and builds index tensors. Keyed by those objects and their
# versions (ops._common.LastCallMemo), the rotary table rows, the batch shape and the attention implementation.
_PLANS = LastCallMemo()
_PLAN_TENSORS = ("cu_seq_lens_q", "cu_seq_lens_k", "position_ids")


def _cached_plan(module, attention_mask, table_rows: int, shape, kwargs):
    """_plan_for, computed once for the layers of one forward that pass the same mask and keywords."""
    tensors = (attention_mask, *(kwargs.get(n) for n in _PLAN_TENSORS))
    other = (table_rows, tuple(shape), getattr(module.config, "_attn_implementation", None))
    return _PLANS.get(tensors, other, lambda: _plan_for(module, attention_mask, table_rows, shape, kwargs))


def _plan_for(module, attention_mask, table_rows: int, shape, kwargs):
    """None (the plain batched call), a _VarlenPlan, or the reason for falling back."""
    cu_q = kwargs.get("cu_seq_lens_q")
    if (cu_q is None and attention_mask is None and HF_ATTENTION == getattr(module.config, "_attn_implementation", None)
            and shape[0] == 1 and not torch.compiler.is_compiling()):
        # As flash_attention_2: position ids restarting in a one-row batch separate documents (one sync to
        # look; under torch.compile they are not looked at: pass cu_seq_lens_q/k, or run eagerly).
        cu_q = _documents_from_positions(kwargs.get("position_ids"))
        if cu_q is not None:
            return _varlen_plan(None, cu_q, cu_q, *shape)
    if attention_mask is None and table_rows == 1 and cu_q is None:
        return None
    return _varlen_plan(attention_mask, cu_q, kwargs.get("cu_seq_lens_k"), *shape)


def _documents_from_positions(position_ids) -> torch.Tensor | None:
    """cu_seqlens where position ids [1, S] restart at 0 (flash_attention_2's packed rows), else None."""
    if position_ids is None or position_ids.dim() != 2 or position_ids.shape[0] != 1 or position_ids.shape[1] < 2:
        return None
    starts = (position_ids[0] == 0).nonzero()[:, 0]
    if starts.numel() <= 1 and int(position_ids[0, 0]) == 0:  # one document from 0: the plain causal call
        return None
    if starts.numel() == 0 or int(starts[0]) != 0:
        starts = torch.cat([starts.new_zeros(1), starts])
    return torch.cat([starts, starts.new_tensor([position_ids.shape[1]])]).to(torch.int32)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


@dataclass
class _VarlenPlan:
    """How a masked or packed call maps onto packed documents: ``tokens`` indexes the flattened
    [B * S] tokens that form the documents (in order), ``cu_seqlens`` their starts; ``queries_only``
    are the padding tokens computed row by row (no document token attends to them), with their additive
    mask rows ``rows``."""

    tokens: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    queries_only: torch.Tensor
    rows: torch.Tensor | None


def _varlen_plan(mask, cu_q, cu_k, B: int, S: int):
    """A _VarlenPlan for the call, or the reason it has none. Reads the mask's values (one host sync):
    every query row must see a causal run of its own document (packing; each document's tokens
    contiguous) or be a padding token that no document token sees (left padding, which sees nothing or,
    under transformers 4.x on CUDA, everything; right padding, which sees a document): padding rows that
    see something are computed row by row as the original computes them."""
    if mask is None:
        if cu_q is None:  # per-row rotary tables: every row one causal run
            tokens = torch.arange(B * S)
            cu = torch.arange(0, B * S + 1, S, dtype=torch.int32)
            return _VarlenPlan(tokens, cu, S, tokens[:0], None)
        if B != 1 or (cu_k is not None and not torch.equal(cu_q, cu_k)):
            return "cu_seq_lens_q/k that differ, or with more than one row"
        cu = cu_q.to(torch.int32)
        if cu.dim() != 1 or cu.numel() < 2 or int(cu[0]) != 0 or int(cu[-1]) != S or bool((cu.diff() < 0).any()):
            return f"cu_seq_lens_q that does not split the {S} tokens into documents"
        tokens = torch.arange(S, device=cu.device)
        return _VarlenPlan(tokens, cu, int(cu.diff().max()), tokens[:0], None)
    if mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[0] not in (1, B) or mask.shape[2:] != (S, S):
        return f"an attention mask of shape {tuple(mask.shape)}, not [batch, 1, {S}, {S}]"
    if mask.dtype == torch.bool:
        seen = mask[:, 0]
        bias = torch.zeros(S, S, device=mask.device).masked_fill(~seen, float("-inf"))
    elif mask.is_floating_point():
        low = torch.finfo(mask.dtype).min / 2
        if not bool(((mask == 0) | (mask <= low)).all()):
            return "an additive attention mask with values other than 0 and the dtype's minimum (a bias)"
        seen = mask[:, 0] == 0
        if not bool(seen.any(-1).all()):  # softmax(scores + minimum): uniform by rounding alone; its
            # gradient is the backend's own (transformers 4.x's left padding on the CPU)
            return "an additive attention mask with fully masked rows"
        bias = mask[:, 0].float()
    else:
        return f"an attention mask of dtype {mask.dtype}"
    seen = seen.expand(B, S, S)  # seen[b, i, j]: query i attends to key j
    pos = torch.arange(S, device=mask.device)
    first = seen.int().argmax(-1)  # [B, S] first key of each query row
    run = (pos >= first[..., None]) & (pos <= pos[:, None])  # the causal run from it
    causal_run = seen.any(-1) & seen.diagonal(dim1=1, dim2=2) & (seen == run).all(-1)
    # Padding: tokens outside every document's run. Their rows may see anything (transformers 4.x lets
    # left padding attend to every key, so that no row is empty).
    in_a_run = (seen & causal_run[..., None]).any(1)  # [B, S]: key j in some document token's run
    query_only = ~causal_run & ~in_a_run
    # A run continues the previous token's document, or starts one at the token itself.
    continues = torch.zeros_like(causal_run)
    continues[:, 1:] = causal_run[:, :-1] & (first[:, :-1] == first[:, 1:])
    ok = (query_only | causal_run) & (~causal_run | (first == pos) | continues)
    if not bool(ok.all()):
        return "an attention mask that is neither causal documents nor padding"
    tokens = causal_run.flatten().nonzero()[:, 0]
    starts = (first == pos).flatten()[tokens].nonzero()[:, 0]
    cu = torch.cat([starts, starts.new_tensor([tokens.numel()])]).to(torch.int32)
    # Padding rows that see something are computed as the original computes them; under a boolean mask a
    # row that sees nothing gives 0, as SDPA's does, and is left at 0.
    query_only = query_only & seen.any(-1)
    queries_only = query_only.flatten().nonzero()[:, 0]
    max_seqlen = int(cu.diff().max()) if tokens.numel() else 0
    return _VarlenPlan(tokens, cu, max_seqlen, queries_only, bias.expand(B, S, S).flatten(0, 1)[queries_only])


def _attention_by_plan(plan: _VarlenPlan, q, k, v, position_embeddings):
    """The attention output [B, S, Hq, D] of a call planned by _varlen_plan: its documents through the
    packed op, its attending padding rows by plain math; the rest (padding that sees nothing) 0."""
    B, S, Hq, D = q.shape
    half = D // 2
    # Per-token rotary rows: row b * S + s rotates token s of row b.
    cos, sin = (t[..., :half].float().expand(B, S, half).reshape(B * S, half) for t in position_embeddings)
    qf, kf, vf = q.reshape(B * S, Hq, D), k.reshape(B * S, -1, D), v.reshape(B * S, -1, D)
    out = q.new_zeros(B * S, Hq, D)
    tokens = plan.tokens.to(q.device)
    if tokens.numel():
        packed = ops.attention(qf[tokens], kf[tokens], vf[tokens], cos, sin, cu_seqlens=plan.cu_seqlens.to(q.device),
                               max_seqlen=plan.max_seqlen, position_ids=tokens)
        out = out.index_copy(0, tokens, packed)
    if plan.queries_only.numel():
        out = out.index_copy(0, plan.queries_only, _masked_rows(plan, qf, kf, vf, cos, sin, S))
    return out.view(B, S, Hq, D)


def _masked_rows(plan: _VarlenPlan, qf, kf, vf, cos, sin, S: int) -> torch.Tensor:
    """softmax(rot(q) rot(k)^T / sqrt(D) + mask row) v for the planned padding queries, in fp32 (the
    mask row additive: 0 or -inf from a boolean mask, the mask's own values from a float one)."""
    idx = plan.queries_only
    rows = idx // S  # their batch rows
    D = qf.shape[-1]
    group = qf.shape[1] // kf.shape[1]

    def rotate(x, c, s):  # x [N, H, D], c and s [N, D / 2]: token n by row n
        x1, x2 = x.float().chunk(2, dim=-1)
        c, s = c[:, None], s[:, None]
        return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)

    qr = rotate(qf[idx], cos[idx], sin[idx])  # [R, Hq, D]
    bias = plan.rows.to(qr.device)  # [R, S]
    out = []
    # One batch row at a time: [R_b, Hq, S] scores against that row's keys, never [R, S, Hq, D] copies.
    for b in rows.unique(sorted=True).tolist():
        pick = (rows == b).nonzero()[:, 0]
        keys = rotate(kf[b * S:(b + 1) * S], cos[b * S:(b + 1) * S], sin[b * S:(b + 1) * S])  # [S, Hkv, D]
        keys = keys.repeat_interleave(group, dim=1)  # [S, Hq, D]
        values = vf[b * S:(b + 1) * S].float().repeat_interleave(group, dim=1)
        scores = torch.einsum("rhd,shd->rhs", qr[pick], keys) / math.sqrt(D) + bias[pick][:, None, :]
        out.append((pick, torch.einsum("rhs,shd->rhd", scores.softmax(-1), values)))
    result = qr.new_empty(qr.shape)
    for pick, rows_out in out:
        result = result.index_copy(0, pick, rows_out)
    return result.to(qf.dtype)


# The keyword arguments the fused path knows it honours. Anything else (a renamed argument, a new mask
# or cache kind, a keyword a later transformers adds) goes to the original forward: the fused path runs
# only on calls it understands completely.
_CACHE_KWARGS = ("cache", "past_key_values", "past_key_value")  # transformers >= 5.24, 4.56-5.23, < 4.56
_IGNORED_KWARGS = {
    "use_cache": "whether the model keeps a cache: the cache argument itself decides",
    "cache_position": "where new tokens go in a cache: only an empty DynamicCache is filled, from position 0",
    "position_ids": "the rotary tables carry the positions: token s is rotated by row s of the call's tables",
    "num_items_in_batch": "the loss's normaliser, which the Trainer passes down through every layer",
}
# Keyword arguments through which transformers passes packed (varlen) sequences to attention.
_PACKED_SEQUENCE_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "cu_seqlens", "max_length_q", "max_length_k")
# Those the packed path serves (flash_attention_2's: documents separated; the lengths follow from them).
_PLANNED_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


def _unfusable_call(module, hidden_states, position_embeddings, attention_mask, kwargs):
    """(reason, cache): why this call must go to the original forward (None if it need not), and the
    cache to fill (an empty DynamicCache) or None. Reads metadata only, never a tensor's values."""
    caches = [kwargs[name] for name in _CACHE_KWARGS if kwargs.get(name) is not None]
    for name, value in kwargs.items():
        if name in _CACHE_KWARGS or name in _IGNORED_KWARGS:
            continue
        if name == "output_attentions":
            if value:
                return "attention weights requested (output_attentions)", None
            continue
        if value is None:  # an option left unset changes nothing
            continue
        if name in _PACKED_SEQUENCE_KWARGS:
            if name not in _PLANNED_KWARGS:
                return f"packed sequences ({name})", None
            if torch.compiler.is_compiling():
                return f"packed sequences ({name}) under torch.compile (their values would be read)", None
            continue
        return f"keyword argument {name!r} that the fused path does not know", None
    if module.training and float(getattr(module, "attention_dropout", 0.0) or 0.0) > 0:
        return "attention dropout in training", None
    implementation = getattr(getattr(module, "config", None), "_attn_implementation", None)
    if implementation not in ("sdpa", HF_ATTENTION):
        return f"attn_implementation {implementation!r} (a missing mask means causal only under 'sdpa')", None
    if not getattr(module, "is_causal", True):
        return "a module that is not causal (is_causal False)", None
    if attention_mask is not None and torch.compiler.is_compiling():
        return "an attention mask tensor under torch.compile (its values would be read)", None
    if position_embeddings is None:
        return "no rotary tables (position_embeddings)", None
    S = hidden_states.shape[1]
    cos, sin = position_embeddings
    B = hidden_states.shape[0]
    if cos.dim() != 3 or cos.shape[0] not in (1, B) or cos.shape[1:] != (S, module.head_dim) or sin.shape != cos.shape:
        return f"rotary tables of shape {tuple(cos.shape)}, not [1 or {B}, {S}, {module.head_dim}]", None
    if cos.shape[0] > 1 and torch.compiler.is_compiling():
        return "per-row rotary tables under torch.compile (served by the packed path, which reads values)", None
    if not caches:
        return None, None
    if len(caches) > 1:
        return "more than one cache argument", None
    cache = caches[0]
    if type(cache).__name__ != "DynamicCache":
        return f"a {type(cache).__name__} (only an empty DynamicCache is filled by the fused path)", None
    if cache.get_seq_length(module.layer_idx) > 0:
        return "decoding with cached tokens", None
    return None, cache


# ------------------------------------------------------------------------------------------------
# attn_implementation="llama_fast": our attention as a transformers attention function
# ------------------------------------------------------------------------------------------------
HF_ATTENTION = "llama_fast"


def register_hf_attention() -> None:
    """Registers ``attn_implementation="llama_fast"`` with transformers (>= 4.56, whose attention and mask
    interfaces it uses): its masks are SDPA's, and packed rows behave as under flash_attention_2
    (documents separated by cu_seq_lens_q/k, or by position ids restarting at 0 in a one-row batch),
    without flash-attn installed. Idempotent. With replace_modules as well, the fused modules serve these
    calls themselves (RoPE fused too).

        llama_fast.register_hf_attention()
        model = LlamaForCausalLM.from_pretrained(path, attn_implementation="llama_fast")
    """
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
    except ImportError as e:
        raise RuntimeError(f"attn_implementation='{HF_ATTENTION}' needs transformers >= 4.56 (its AttentionInterface "
                           f"and mask interface): {e}") from None
    AttentionInterface.register(HF_ATTENTION, hf_attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(HF_ATTENTION, sdpa_mask)


# Keywords transformers passes to attention functions that hf_attention_forward understands; any other one
# (attention sinks, a new option) sends the call to SDPA's function.
_HF_ATTENTION_KWARGS = {"position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k",
                        "use_cache", "cache_position", "output_attentions", "is_causal", "softcap",
                        "sliding_window", "num_items_in_batch", "cache", "past_key_values", "past_key_value"}


def hf_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers' attention-function contract: query [B, Hq, S, D], key and value [B, Hkv, S', D], rotated
    already; returns (output [B, S, Hq, D], None). Calls our kernels where they compute exactly this
    (unrotated: identity rotary tables), and SDPA's function elsewhere (dropout in training, another
    scaling, soft-capping, a sliding window, cached keys, a mask that is neither causal documents nor padding)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    B, Hq, S, D = query.shape
    plan = None
    is_causal = kwargs.get("is_causal")
    unknown = [n for n, value in kwargs.items() if value is not None and n not in _HF_ATTENTION_KWARGS]
    if (unknown or key.shape[2] != S or (dropout and module.training) or kwargs.get("softcap") is not None
            or kwargs.get("sliding_window") is not None or kwargs.get("output_attentions")
            or (scaling is not None and not math.isclose(scaling, D**-0.5, rel_tol=1e-6)) or D % 2 or D > 256
            or not (getattr(module, "is_causal", True) if is_causal is None else is_causal)):
        plan = "unsupported"
    elif not torch.compiler.is_compiling():
        plan = _cached_plan(module, attention_mask, 1, (B, S), kwargs)
    elif attention_mask is not None or kwargs.get("cu_seq_lens_q") is not None:
        plan = "values under torch.compile"
    if isinstance(plan, str):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # [B, S, H, D] views
    ones = q.new_ones(1, S, D, dtype=torch.float32)
    if plan is None:
        out = ops.attention(q, k, v, ones[0, :, : D // 2], ones[0, :, : D // 2] * 0, causal=True)
    else:
        out = _attention_by_plan(plan, q, k, v, (ones, ones * 0))
    return out, None


_WARNED_FALLBACKS: set = set()


def _count_fallback(module, reason: str) -> None:
    """Counts a fallback on the module and warns once per (class, reason); not while compiling."""
    if torch.compiler.is_compiling():
        return
    module.fallback_calls += 1
    module.fallback_reasons[reason] += 1
    key = (type(module).__name__, reason)
    if key in _WARNED_FALLBACKS:
        return
    _WARNED_FALLBACKS.add(key)
    warnings.warn(
        f"llama_fast: {key[0]} runs its original forward (not the fused kernel) for calls with {reason}; "
        "results are unchanged, only the speed. The module's fallback_reasons counts them.",
        stacklevel=3,
    )


_FUSED_CLASSES: dict[tuple[type, type], type] = {}


def _swap_class(module: nn.Module, mixin: type) -> nn.Module:
    """Puts ``mixin`` in front of the instance's class (one subclass per class, importable by name, so a
    pickled model loads again); attributes, submodules and hooks stay the module's own, and forward keeps
    the original's signature."""
    cls = type(module)
    if (mixin, cls) not in _FUSED_CLASSES:
        name = f"Fused{cls.__name__}"

        def forward(self, *args, **kwargs):
            return mixin.forward(self, *args, **kwargs)

        # The original's signature: the Trainer reads it to keep the dataset columns the model takes.
        forward.__signature__ = inspect.signature(cls.forward)
        fused = type(name, (mixin, cls), {"__module__": __name__, "__qualname__": name, "forward": forward})
        globals()[name] = fused
        _FUSED_CLASSES[(mixin, cls)] = fused
    module.__class__ = _FUSED_CLASSES[(mixin, cls)]
    module.fallback_calls = 0
    module.fallback_reasons = Counter()
    return module


def _fuse_attention(module: nn.Module) -> nn.Module:
    _swap_class(module, FusedRotaryAttention)
    module.fused_calls = 0
    module._returns_cache = _returns_cache(type(module))
    return module


def _returns_cache(cls: type) -> bool:
    """Whether a transformers attention class returns (output, weights, cache): before 4.48."""
    if not any(c.__module__.startswith("transformers.") for c in cls.__mro__):
        return False
    return _transformers_version() < (4, 48)


def _transformers_version() -> tuple[int, int]:
    import transformers

    major, minor = (int(part) for part in transformers.__version__.split(".")[:2])
    return major, minor


# ---------------------------------------------------------------------------------------------
# The fused loss of a causal LM: the LlamaForCausalLM forward, with the head deferred to the loss
# ---------------------------------------------------------------------------------------------
class FusedLinearCrossEntropy:
    """Makes a transformers causal LM (with LlamaForCausalLM's forward) compute its training loss with
    the chunked linear + cross-entropy: the [B, S, vocab] logits are never made.

    The original forward runs without labels and with ``self.lm_head`` a pass-through for the call,
    so the "logits" it returns are the final hidden states; the loss is then transformers'
    ForCausalLMLoss computed from them and the head's weight chunk by chunk: the shift of labels (or
    ``shift_labels``), ``ignore_index``, and ``num_items_in_batch`` (the summed loss over that count:
    gradient accumulation) honoured. The output's ``logits`` is None. Taken only in training mode with
    labels and transformers' own loss; evaluation (the Trainer's metrics want logits), generation,
    ``logits_to_keep`` and a head other than a bias-free nn.Linear (peft's modules_to_save copy of one
    included) run the original forward.
    """

    fused_calls: int
    fallback_calls: int
    fallback_reasons: Counter
    _transformers_loss: object  # transformers' ForCausalLMLoss, which this loss reproduces (None before 4.46)

    def forward(self, *args, **kwargs):
        labels = kwargs.get("labels")
        if labels is None:  # generation, logits: the original, not counted
            return super().forward(*args, **kwargs)
        weight, reason = self._head_weight_or_reason(args, kwargs)
        if reason is not None:
            _count_fallback(self, reason)
            return super().forward(*args, **kwargs)
        if not torch.compiler.is_compiling():
            self.fused_calls += 1
        head = self._modules["lm_head"]
        self._modules["lm_head"] = _PASS_THROUGH  # the forward's "logits" are then its final hidden states
        try:
            out = super().forward(*args, **{**kwargs, "labels": None})
        finally:
            self._modules["lm_head"] = head
        loss = _causal_lm_loss(out.logits, weight, **kwargs)  # kwargs hold the labels
        fields = {k: v for k, v in out.items() if k != "logits"}  # the hidden states are no logits
        return type(out)(**{**fields, "loss": loss})

    def _head_weight_or_reason(self, args, kwargs):
        """(the head's weight, None) when this call may take the fused loss, else (None, reason)."""
        if not self.training:
            return None, "evaluation mode (the logits are returned for metrics)"
        if len(args) > 1:
            return None, "positional arguments after input_ids"
        keep = kwargs.get("logits_to_keep", kwargs.get("num_logits_to_keep"))
        if keep is not None and not (isinstance(keep, int) and keep == 0):
            return None, "logits_to_keep"
        if kwargs.get("return_dict", getattr(self.config, "return_dict", True)) is False:
            return None, "return_dict=False"
        default = self._transformers_loss
        if getattr(self, "loss_function", default) is not default:
            return None, "a loss_function other than transformers' ForCausalLMLoss"
        weight = _bias_free_linear_weight(self.lm_head)
        if weight is None:
            return None, f"an lm_head of type {type(self.lm_head).__name__}, not a bias-free nn.Linear"
        return weight, None


class _PassThrough(nn.Module):
    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states


_PASS_THROUGH = _PassThrough()


def _causal_lm_loss(hidden, weight, labels, num_items_in_batch=None, ignore_index=-100, shift_labels=None, **kwargs):
    """transformers' ForCausalLMLoss of lm_head(hidden) (the head being x @ weight^T), computed chunk by
    chunk: mean over the labelled positions, or their sum over num_items_in_batch."""
    if shift_labels is None:  # the target of position s is label s + 1; the last position has none
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    loss = linear_cross_entropy(
        hidden.to(weight.dtype), weight, shift_labels.to(hidden.device), ignore_index,
        reduction="mean" if num_items_in_batch is None else "sum",
    )
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(loss.device)
    return loss if num_items_in_batch is None else loss / num_items_in_batch


def _bias_free_linear_weight(head: nn.Module):
    """The weight a head applies when it is x @ W^T: a bias-free nn.Linear, or peft's modules_to_save
    wrapper around one (whose attribute lookup answers with the copy its forward runs). Else None."""
    if isinstance(head, nn.Linear):
        return head.weight if head.bias is None else None
    original = getattr(head, "original_module", None)
    if type(head).__name__ == "ModulesToSaveWrapper" and isinstance(original, nn.Linear) and original.bias is None:
        return head.weight
    return None


def _default_causal_lm_loss():
    """transformers' ForCausalLMLoss; None before 4.46, whose forward computes the same loss inline."""
    try:
        from transformers.loss.loss_utils import ForCausalLMLoss
    except ImportError:
        return None
    return ForCausalLMLoss


@functools.lru_cache(maxsize=None)
def _llama_causal_lm_code():
    from transformers import LlamaForCausalLM

    return _forward_code(LlamaForCausalLM)


def _forward_code(cls: type):
    """The bytecode, names and constants (less the docstring) of a class's undecorated forward."""
    code = inspect.unwrap(cls.forward).__code__
    consts = code.co_consts[1:] if code.co_consts and isinstance(code.co_consts[0], str) else code.co_consts
    return code.co_code, code.co_names, code.co_varnames, consts


def _fuse_loss(module: nn.Module) -> nn.Module:
    _swap_class(module, FusedLinearCrossEntropy)
    module.fused_calls = 0
    module._transformers_loss = _default_causal_lm_loss()  # looked up here: an import breaks a compiled graph
    return module


# ---------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------
@dataclass
class ReplacementReport:
    """What replace_modules changed: module kind -> count, and the qualified names; and what it left
    unchanged: (name, kind, why)."""

    counts: Counter = field(default_factory=Counter)
    names: dict[str, list[str]] = field(default_factory=dict)
    left: list[tuple[str, str, str]] = field(default_factory=list)

    def add(self, kind: str, name: str) -> None:
        self.counts[kind] += 1
        self.names.setdefault(kind, []).append(name)

    def leave(self, kind: str, name: str, why: str) -> None:
        self.left.append((name or "<root>", kind, why))

    def __str__(self) -> str:
        parts = ", ".join(f"{n} {kind}" for kind, n in sorted(self.counts.items()))
        text = f"llama_fast replaced {parts or 'nothing'}"
        left = Counter((kind, why) for _, kind, why in self.left)
        if left:
            text += "; left " + ", ".join(f"{n} {kind} ({why})" for (kind, why), n in sorted(left.items()))
        return text


# ---------------------------------------------------------------------------------------------
# The rules. Each returns None (not this kind), a reason string (this kind, but unsupported),
# or a callable building the fused module.
# ---------------------------------------------------------------------------------------------
def _projection(m) -> nn.Linear | None:
    """The bias-free nn.Linear a projection applies: the module itself, or the base layer of a peft
    adapter around it (LoRA, ...). None for anything else."""
    base = m.get_base_layer() if hasattr(m, "base_layer") and hasattr(m, "get_base_layer") else m
    return base if isinstance(base, nn.Linear) and base.bias is None else None


def _rms_norm_rule(module, model):
    if not type(module).__name__.endswith("RMSNorm") or isinstance(module, (FusedRMSNorm, llama_model.RMSNorm)):
        return None
    weight = getattr(module, "weight", None)
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
    if not isinstance(weight, nn.Parameter) or weight.dim() != 1 or eps is None:
        return "an RMSNorm needs a 1-D weight and an eps (or variance_epsilon) attribute"
    if getattr(module, "bias", None) is not None:
        return "RMSNorm with a bias is not supported"
    # Gemma-style norms scale by (1 + weight); they carry no marker, so refuse them by name.
    if "Gemma" in type(module).__name__:
        return "Gemma's RMSNorm scales by (1 + weight), which the fused kernel does not do"
    return lambda: FusedRMSNorm(weight, float(eps))


def _gated_mlp_rule(module, model):
    if not all(hasattr(module, n) for n in ("gate_proj", "up_proj", "down_proj")):
        return None
    if isinstance(module, FusedGatedMLP):
        return None
    if not all(_projection(getattr(module, n)) for n in ("gate_proj", "up_proj", "down_proj")):
        return "gated MLP projections must be nn.Linear without bias (or a peft adapter around one)"
    act = getattr(module, "act_fn", None)
    if not isinstance(act, nn.SiLU) and type(act).__name__ not in ("SiLUActivation", "SiLU"):
        return f"gated MLP activation must be SiLU, got {type(act).__name__}"
    return lambda: FusedGatedMLP(module.gate_proj, module.up_proj, module.down_proj)


def _attention_rule(module, model):
    names = ("q_proj", "k_proj", "v_proj", "o_proj")
    if not all(hasattr(module, n) for n in names):
        return None
    if isinstance(module, FusedRotaryAttention):
        return None
    projections = [_projection(getattr(module, n)) for n in names]
    if not all(projections):
        return "attention projections must be nn.Linear without bias (or a peft adapter around one)"
    extra = sorted(set(dict(module.named_children())) - {*names, "rotary_emb"})
    if extra:  # e.g. Qwen3's and OLMo2's q_norm / k_norm, which the fused kernel would skip
        return f"attention with submodules beyond q/k/v/o_proj is not supported (has {', '.join(extra)})"
    head_dim, layer_idx = getattr(module, "head_dim", None), getattr(module, "layer_idx", None)
    if not isinstance(head_dim, int) or layer_idx is None:
        return "attention needs integer head_dim and layer_idx attributes"
    if head_dim % 2 or head_dim > 256:
        return f"head_dim must be even and at most 256, got {head_dim}"
    scaling = getattr(module, "scaling", head_dim**-0.5)
    if not math.isclose(scaling, head_dim**-0.5, rel_tol=1e-6):
        return f"attention scaling must be head_dim**-0.5 ({head_dim**-0.5:.6g}), got {scaling}"
    config = getattr(module, "config", None)
    for attr in ("sliding_window", "attn_logit_softcapping"):
        if getattr(module, attr, None) or (config is not None and getattr(config, attr, None)):
            return f"attention with {attr} is not supported"
    q_width, k_width = projections[0].out_features, projections[1].out_features
    if q_width % head_dim or k_width % head_dim:
        return "q_proj/k_proj widths must be multiples of head_dim"
    if (q_width // head_dim) % (k_width // head_dim):
        return "the number of query heads must be a multiple of the number of key/value heads"
    problem = _rotary_tables_problem(model, head_dim)
    if problem:
        return problem
    return lambda: _fuse_attention(module)


def _rotary_tables_problem(model: nn.Module, head_dim: int) -> str | None:
    """Why the model's rotary tables cannot feed the fused kernel (None if they can): every
    ``*RotaryEmbedding`` module of the model must give [.., head_dim] tables with equal halves (the
    half-split layout). Checked once, on three positions, here: the calls' tables are not read."""
    rotaries = [m for m in model.modules() if type(m).__name__.endswith("RotaryEmbedding")]
    if not rotaries:
        return "no *RotaryEmbedding module in the model to check the rotary tables' layout against"
    for rotary in rotaries:
        buffer = next(iter(rotary.buffers()), None)
        device = buffer.device if buffer is not None else torch.device("cpu")
        if device.type == "meta":
            return f"{type(rotary).__name__} is on the meta device: replace after the weights are materialised"
        with torch.no_grad():
            cos, sin = rotary(torch.zeros(1, 3, head_dim, device=device), torch.arange(3, device=device)[None])
        if cos.shape[-1] != head_dim:
            return f"{type(rotary).__name__} makes tables of width {cos.shape[-1]}, not head_dim {head_dim}"
        half = head_dim // 2
        if not all(torch.equal(t[..., :half], t[..., half:]) for t in (cos, sin)):
            return f"{type(rotary).__name__} makes interleaved rotary tables, not the half-split layout"
    return None


def _causal_lm_rule(module, model):
    if not (isinstance(module.__dict__.get("_modules", {}).get("lm_head"), nn.Module) and hasattr(module, "config")):
        return None
    if isinstance(module, FusedLinearCrossEntropy):
        return None
    if _forward_code(type(module)) != _llama_causal_lm_code():
        return f"{type(module).__name__}.forward is not LlamaForCausalLM's (the fused loss serves that forward)"
    return lambda: _fuse_loss(module)


# (switch, kind, rule): the keyword of replace_modules that turns a kind on or off, the name the
# report uses, and the rule recognising it.
RULES = (
    ("rms_norm", "RMSNorm", _rms_norm_rule),
    ("swiglu", "MLP", _gated_mlp_rule),
    ("attention", "attention", _attention_rule),
    ("cross_entropy", "cross_entropy", _causal_lm_rule),
)
# The loss is no structure of the model but a speed-up of its training step: a model whose forward is
# not LlamaForCausalLM's keeps its own loss and the report says why, instead of refusing the model.
_OPTIONAL_KINDS = ("cross_entropy",)
_FUSED_TYPES = (FusedRMSNorm, FusedGatedMLP, FusedRotaryAttention, FusedLinearCrossEntropy)


def replace_modules(
    model: nn.Module,
    *,
    rms_norm: bool = True,
    swiglu: bool = True,
    attention: bool = True,
    cross_entropy: bool = True,
    verbose: bool = False,
) -> ReplacementReport:
    """Swaps, in place, the RMSNorm, gated-MLP and attention modules of ``model`` for fused ones and
    gives a causal LM the fused linear + cross-entropy loss; a switch set to False leaves that kind alone.

    Weights are shared (not copied) and module names are kept, so ``state_dict()`` keys, optimizer
    state, peft adapters and checkpoints are unchanged. Returns a report of what was replaced and
    what was left and why; raises ValueError, before changing anything, if a recognised module cannot
    be served exactly or nothing is found.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    switches = dict(rms_norm=rms_norm, swiglu=swiglu, attention=attention, cross_entropy=cross_entropy)
    for name, value in switches.items():
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be True or False, got {value!r}")
    report = ReplacementReport()
    if isinstance(model, llama_model.Llama):
        return _switch_llama_backend(model, report, switches)

    plan, problems = [], []
    for name, module in model.named_modules():
        for switch, kind, rule in RULES:
            verdict = rule(module, model)
            if verdict is None:
                continue
            if not switches[switch]:
                report.leave(kind, name, f"{switch}=False")
            elif isinstance(verdict, str) and kind in _OPTIONAL_KINDS:
                report.leave(kind, name, verdict)
            elif isinstance(verdict, str):
                problems.append(f"{name or '<root>'} ({type(module).__name__}): {verdict} (or pass {switch}=False)")
            else:
                plan.append((name, kind, verdict))
            break
    if problems:
        raise ValueError("llama_fast.replace_modules cannot handle this model:\n  " + "\n  ".join(problems))
    if not plan and any(isinstance(m, _FUSED_TYPES) for m in model.modules()):
        raise ValueError(f"llama_fast.replace_modules: this {type(model).__name__} has already been replaced")
    if not plan and not report.left:
        raise ValueError(
            f"llama_fast.replace_modules found no RMSNorm, gated MLP or rotary attention module in "
            f"{type(model).__name__}; expected a LLaMA-style model"
        )
    # Children before parents does not matter: a rule never matches inside a replaced module's
    # submodules (those are projections), and the class swaps keep the module objects in place.
    for name, kind, build in plan:
        parent_name, _, child = name.rpartition(".")
        fused = build()
        if name:
            setattr(model.get_submodule(parent_name), child, fused)
        report.add(kind, name or "<root>")
    if verbose:
        print(report)
    return report


def _switch_llama_backend(model: llama_model.Llama, report: ReplacementReport, switches: dict) -> ReplacementReport:
    if model.backend == "fused":
        raise ValueError("this llama_fast.Llama already uses backend='fused'; nothing to replace")
    # Block.backend runs the add_rms_norm between attention and MLP: an RMSNorm kernel.
    kinds = {"RMSNorm": ("rms_norm", "RMSNorm"), "Block": ("rms_norm", None), "MLP": ("swiglu", "MLP"),
             "Attention": ("attention", "attention")}
    for name, module in model.named_modules():
        if isinstance(module, llama_model._UsesOps) and type(module).__name__ in kinds:
            switch, kind = kinds[type(module).__name__]
            if switches[switch]:
                module.backend = "fused"
                if kind:
                    report.add(kind, name)
            elif kind:
                report.leave(kind, name, f"{switch}=False")
    if switches["cross_entropy"]:
        model.fused_loss = True
        report.add("cross_entropy", "<root>")
    else:
        report.leave("cross_entropy", "<root>", "cross_entropy=False")
    if all(switches[s] for s in ("rms_norm", "swiglu", "attention")):
        model.backend = "fused"
    return report
