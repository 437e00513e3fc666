"""Drop-in replacement: swap a model's RMSNorm, gated MLP and attention modules for fused ones.

    from transformers import LlamaForCausalLM
    import llama_fast
    model = LlamaForCausalLM.from_pretrained(path)
    report = llama_fast.replace_modules(model)      # in place; weights and module names kept

One generic mechanism: a short list of rules, each recognising a kind of module by its structure
(not by model family) and building its fused counterpart around the same parameters. Recognised:

* RMSNorm: a module named ``*RMSNorm`` with a 1-D ``weight`` and an ``eps`` or
  ``variance_epsilon`` attribute (Hugging Face's ``LlamaRMSNorm``, Mistral's, Qwen2's, ...);
* gated SiLU MLP: ``gate_proj``, ``up_proj``, ``down_proj`` linears without bias and a SiLU
  activation (``LlamaMLP`` and its copies);
* rotary self-attention: ``q_proj``, ``k_proj``, ``v_proj``, ``o_proj`` linears without bias and no
  other submodule, a ``head_dim`` and a ``layer_idx`` (``LlamaAttention`` and its copies), called
  with ``position_embeddings=(cos, sin)`` as transformers does; its class is swapped in place;
* llama_fast's own ``Llama`` built with ``backend="reference"``: its modules switch to the fused ops.

A module that looks like one of these but differs in a way the fused op cannot reproduce (a bias,
another activation, q/k norms, attention logit soft-capping, sliding windows, a non-default scaling)
makes the call fail before anything is changed, naming the module and the reason.
"""
from __future__ import annotations

import math
import warnings
import weakref
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from . import model as llama_model
from . import ops


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

    def __init__(self, gate_proj: nn.Linear, up_proj: nn.Linear, down_proj: nn.Linear):
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
    attention_mask, past_key_values or, before transformers 4.56, past_key_value, ...) and returns
    what the original returns: (output, None), or (output, None, cache) before transformers 4.48.
    The fused kernel serves causal attention over one shared run of positions 0..S-1 with the
    half-split rotary layout. Every other call goes to the original forward, so results never
    change, only the speed: padding or block-diagonal masks, packed sequences (cu_seqlens or
    restarting position ids), per-row positions, decoding with cached tokens, requested attention
    weights, attention dropout in training, another rotary layout.
    """

    fused_calls: int
    fallback_calls: int
    fallback_reasons: Counter  # reason -> calls that went to the original forward for it
    _returns_cache: bool

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, **kwargs):
        B, S, _ = hidden_states.shape
        reason, cache = _unfusable_call(self, kwargs)
        tables = None
        if reason is None:
            tables = _fusable_tables(position_embeddings, attention_mask, kwargs.get("position_ids"), S, self.head_dim)
            if tables is None:
                reason = "rotary tables, positions or mask other than one causal run of positions 0..S-1"
        if reason is not None:
            self.fallback_calls += 1
            self.fallback_reasons[reason] += 1
            _warn_fallback_once(type(self).__name__, reason)
            return super().forward(
                hidden_states, position_embeddings=position_embeddings, attention_mask=attention_mask, **kwargs
            )
        self.fused_calls += 1
        cos, sin = tables
        q = self.q_proj(hidden_states).view(B, S, -1, self.head_dim)  # (B, S, Hq, D)
        k = self.k_proj(hidden_states).view(B, S, -1, self.head_dim)  # (B, S, Hkv, D)
        v = self.v_proj(hidden_states).view(B, S, -1, self.head_dim)
        if cache is not None:  # a first, empty-cache call: fill the cache as the original would
            _, k_rot = ops.rope(q, k, cos, sin)
            cache.update(k_rot.transpose(1, 2), v.transpose(1, 2), self.layer_idx)
        out = ops.attention(q, k, v, cos, sin, causal=True)  # (B, S, Hq, D)
        out = self.o_proj(out.reshape(B, S, -1))
        return (out, None, cache) if self._returns_cache else (out, None)


# The keyword arguments the fused path knows it honours, each with the test of its value. Anything else
# (a renamed argument, a new mask or cache kind, a keyword a later transformers adds) goes to the original
# forward: the fused path runs only on calls it understands completely.
_CACHE_KWARGS = ("cache", "past_key_values", "past_key_value")  # transformers >= 5.24, 4.56-5.23, < 4.56
_IGNORED_KWARGS = {
    "use_cache": "whether the model keeps a cache: the cache argument itself decides",
    "cache_position": "where new tokens go in a cache: only an empty DynamicCache is filled, from position 0",
    "position_ids": "checked with the rotary tables: positions 0..S-1 in every row",
}


def _unfusable_call(module, kwargs):
    """(reason, cache): why this call must go to the original forward (None if it need not), and the
    cache to fill (an empty DynamicCache) or None. Reads no tensor values."""
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
            return f"packed sequences ({name})", None
        return f"keyword argument {name!r} that the fused path does not know", None
    if module.training and float(getattr(module, "attention_dropout", 0.0) or 0.0) > 0:
        return "attention dropout in training", None
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


_WARNED_FALLBACKS: set = set()


def _warn_fallback_once(cls_name: str, reason: str) -> None:
    if (cls_name, reason) in _WARNED_FALLBACKS:
        return
    _WARNED_FALLBACKS.add((cls_name, reason))
    warnings.warn(
        f"llama_fast: {cls_name} runs its original forward (not the fused kernel) for calls with {reason}; "
        "results are unchanged, only the speed. The module's fallback_reasons counts them.",
        stacklevel=3,
    )


# Keyword arguments through which transformers passes packed (varlen) sequences to attention.
_PACKED_SEQUENCE_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "cu_seqlens", "max_length_q", "max_length_k")

_FUSED_CLASSES: dict[type, type] = {}


def _fuse_attention(module: nn.Module) -> nn.Module:
    cls = type(module)
    if cls not in _FUSED_CLASSES:
        name = f"Fused{cls.__name__}"
        fused = type(name, (FusedRotaryAttention, cls), {"__module__": __name__, "__qualname__": name})
        globals()[name] = fused  # importable by name, so a pickled model can be loaded again
        _FUSED_CLASSES[cls] = fused
    module.__class__ = _FUSED_CLASSES[cls]
    module.fused_calls = module.fallback_calls = 0
    module.fallback_reasons = Counter()
    module._returns_cache = _returns_cache(cls)
    return module


def _returns_cache(cls: type) -> bool:
    """Whether a transformers attention class returns (output, weights, cache): before 4.48."""
    if not cls.__module__.startswith("transformers."):
        return False
    import transformers

    major, minor = (int(part) for part in transformers.__version__.split(".")[:2])
    return (major, minor) < (4, 48)


class _LastVerdict:
    """The verdict on one forward's shared tensors, so only the first layer pays for the checks.

    Holds weak references: while the tensors it names are alive no other tensor can take their
    place, and a changed ``_version`` (an in-place write) invalidates it.
    """

    key: tuple = ()
    tables = None

    @staticmethod
    def make_key(tensors) -> tuple:
        return tuple((weakref.ref(t), t._version) if isinstance(t, torch.Tensor) else t for t in tensors)

    @classmethod
    def lookup(cls, tensors):
        if len(cls.key) != len(tensors):
            return False, None
        for entry, t in zip(cls.key, tensors):
            if isinstance(t, torch.Tensor):
                if not isinstance(entry, tuple) or entry[0]() is not t or entry[1] != t._version:
                    return False, None
            elif entry is not t:
                return False, None
        return True, cls.tables


def _fusable_tables(position_embeddings, mask, position_ids, seq_len: int, head_dim: int):
    """Our fp32 [S, D/2] (cos, sin) when the fused kernel computes exactly what the original would,
    else None: transformers' tables [B, S, D] shared by every row, with the half-split layout
    (duplicated halves), positions 0..S-1 (or none given), and no mask beyond causal."""
    if position_embeddings is None:
        return None
    cos, sin = position_embeddings
    tensors = (cos, sin, mask, position_ids)
    hit, tables = _LastVerdict.lookup(tensors)
    if not hit:
        tables = _check_tables(cos, sin, mask, position_ids, seq_len, head_dim)
        _LastVerdict.key, _LastVerdict.tables = _LastVerdict.make_key(tensors), tables
    return tables


def _check_tables(cos, sin, mask, position_ids, seq_len: int, head_dim: int):
    if cos.dim() != 3 or cos.shape[-2:] != (seq_len, head_dim) or sin.shape != cos.shape:
        return None
    half = head_dim // 2
    if not (
        torch.equal(cos, cos[:1].expand_as(cos))
        and torch.equal(sin, sin[:1].expand_as(sin))
        and torch.equal(cos[..., :half], cos[..., half:])  # half-split layout, not interleaved
        and torch.equal(sin[..., :half], sin[..., half:])
        and _is_plain_causal(mask, seq_len)
        and _starts_at_zero(position_ids, seq_len)
    ):
        return None
    return cos[0, :, :half].float(), sin[0, :, :half].float()


def _is_plain_causal(mask, seq_len: int) -> bool:
    """True for no mask or a mask that is exactly causal over seq_len x seq_len (no padding)."""
    if mask is None:
        return True
    if not isinstance(mask, torch.Tensor) or mask.dim() != 4 or mask.shape[-2:] != (seq_len, seq_len):
        return False
    allowed = torch.ones(seq_len, seq_len, dtype=torch.bool, device=mask.device).tril()
    if mask.dtype == torch.bool:
        return bool((mask == allowed).all())
    return bool(((mask == 0) == allowed).all())


def _starts_at_zero(position_ids, seq_len: int) -> bool:
    """No position ids, or every row exactly 0..S-1 (not packed, not offset)."""
    if position_ids is None:
        return True
    expected = torch.arange(seq_len, device=position_ids.device)
    return position_ids.shape[-1] == seq_len and bool((position_ids == expected).all())


@dataclass
class ReplacementReport:
    """What replace_modules changed: module kind -> count, and the qualified names."""

    counts: Counter = field(default_factory=Counter)
    names: dict[str, list[str]] = field(default_factory=dict)

    def add(self, kind: str, name: str) -> None:
        self.counts[kind] += 1
        self.names.setdefault(kind, []).append(name)

    def __str__(self) -> str:
        parts = ", ".join(f"{n} {kind}" for kind, n in sorted(self.counts.items()))
        return f"llama_fast replaced {parts or 'nothing'}"


# ---------------------------------------------------------------------------------------------
# The rules. Each returns None (not this kind), a reason string (this kind, but unsupported),
# or a callable building the fused module.
# ---------------------------------------------------------------------------------------------
def _linear_without_bias(m) -> bool:
    return isinstance(m, nn.Linear) and m.bias is None


def _rms_norm_rule(module):
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


def _gated_mlp_rule(module):
    if not all(hasattr(module, n) for n in ("gate_proj", "up_proj", "down_proj")):
        return None
    if isinstance(module, FusedGatedMLP):
        return None
    if not all(_linear_without_bias(getattr(module, n)) for n in ("gate_proj", "up_proj", "down_proj")):
        return "gated MLP projections must be nn.Linear without bias"
    act = getattr(module, "act_fn", None)
    if not isinstance(act, nn.SiLU) and type(act).__name__ not in ("SiLUActivation", "SiLU"):
        return f"gated MLP activation must be SiLU, got {type(act).__name__}"
    return lambda: FusedGatedMLP(module.gate_proj, module.up_proj, module.down_proj)


def _attention_rule(module):
    if not all(hasattr(module, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")):
        return None
    if isinstance(module, FusedRotaryAttention):
        return None
    if not all(_linear_without_bias(getattr(module, n)) for n in ("q_proj", "k_proj", "v_proj", "o_proj")):
        return "attention projections must be nn.Linear without bias"
    extra = sorted(set(dict(module.named_children())) - {"q_proj", "k_proj", "v_proj", "o_proj", "rotary_emb"})
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
    if module.q_proj.out_features % head_dim or module.k_proj.out_features % head_dim:
        return "q_proj/k_proj widths must be multiples of head_dim"
    if (module.q_proj.out_features // head_dim) % (module.k_proj.out_features // head_dim):
        return "the number of query heads must be a multiple of the number of key/value heads"
    return lambda: _fuse_attention(module)


RULES = (("RMSNorm", _rms_norm_rule), ("MLP", _gated_mlp_rule), ("attention", _attention_rule))


def replace_modules(model: nn.Module, *, verbose: bool = False) -> ReplacementReport:
    """Swaps, in place, the RMSNorm, gated-MLP and attention modules of ``model`` for fused ones.

    Weights are shared (not copied) and module names are kept, so ``state_dict()`` keys, optimizer
    state and checkpoints are unchanged. Returns a report of what was replaced; raises ValueError,
    before changing anything, if a recognised module cannot be served exactly or nothing is found.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    report = ReplacementReport()
    if isinstance(model, llama_model.Llama):
        return _switch_llama_backend(model, report)

    plan, problems = [], []
    for name, module in model.named_modules():
        for kind, rule in RULES:
            verdict = rule(module)
            if verdict is None:
                continue
            if isinstance(verdict, str):
                problems.append(f"{name or '<root>'} ({type(module).__name__}): {verdict}")
            else:
                plan.append((name, kind, verdict))
            break
    if problems:
        raise ValueError("llama_fast.replace_modules cannot handle this model:\n  " + "\n  ".join(problems))
    if not plan and any(isinstance(m, (FusedRMSNorm, FusedGatedMLP, FusedRotaryAttention)) for m in model.modules()):
        raise ValueError(f"llama_fast.replace_modules: this {type(model).__name__} has already been replaced")
    if not plan:
        raise ValueError(
            f"llama_fast.replace_modules found no RMSNorm, gated MLP or rotary attention module in "
            f"{type(model).__name__}; expected a LLaMA-style model"
        )
    # Children before parents does not matter: a rule never matches inside a replaced module's
    # submodules (those are plain Linear layers), so replace in order.
    for name, kind, build in plan:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, build())
        report.add(kind, name)
    if verbose:
        print(report)
    return report


def _switch_llama_backend(model: llama_model.Llama, report: ReplacementReport) -> ReplacementReport:
    if model.backend == "fused":
        raise ValueError("this llama_fast.Llama already uses backend='fused'; nothing to replace")
    for name, module in model.named_modules():
        if isinstance(module, llama_model._UsesOps):
            module.backend = "fused"
            kind = {"RMSNorm": "RMSNorm", "MLP": "MLP", "Attention": "attention"}.get(type(module).__name__)
            if kind:
                report.add(kind, name)
    model.backend = "fused"
    return report
