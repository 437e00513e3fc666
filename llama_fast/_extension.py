"""Loads the compiled extension llama_fast._C, which registers torch.ops.llama_fast.*.

Without it (a build with LLAMA_FAST_SKIP_BUILD=1, or a failed compile) the package still
works: the ops fall back to Triton or PyTorch backwards, and `require`-style callers warn once.
"""
from __future__ import annotations

import warnings

try:
    from . import _C  # noqa: F401  (importing registers the ops)

    AVAILABLE = True
    WITH_CUDA = bool(_C.with_cuda)
    LOAD_ERROR: str | None = None
except ImportError as exc:  # pragma: no cover - depends on how the package was built
    AVAILABLE = False
    WITH_CUDA = False
    LOAD_ERROR = str(exc)

_warned: set[str] = set()

if AVAILABLE:
    import torch

    # Fake implementations: output shapes and dtypes only, so torch.compile and FakeTensor tracing
    # pass through the compiled ops. The input checks with their messages run in csrc/bindings.cpp.

    @torch.library.register_fake("llama_fast::rms_norm_backward")
    def _rms_norm_backward_fake(dy, x, weight, rstd, dresidual=None):
        return torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(weight)

    # --- elementwise ops (issue 3) ---
    @torch.library.register_fake("llama_fast::swiglu_backward")
    def _swiglu_backward_fake(dy, gate, up):
        return gate.new_empty(gate.shape), gate.new_empty(gate.shape)

    @torch.library.register_fake("llama_fast::swiglu_packed_backward")
    def _swiglu_packed_backward_fake(dy, gate_up):
        return gate_up.new_empty(gate_up.shape)

    @torch.library.register_fake("llama_fast::rope_backward")
    def _rope_backward_fake(dq, dk, cos, sin):
        return dq.new_empty(dq.shape), dk.new_empty(dk.shape)

    # --- end elementwise ops ---
    # --- attention (issue 4) ---
    @torch.library.register_fake("llama_fast::attention_backward")
    def _attention_backward_fake(dout, q, k, v, out, stats, cos, sin, causal=True, deterministic=False,
                                 doc_start=None, doc_end=None):
        B, S, Hq, _ = q.shape
        if stats.dtype != torch.float32 or tuple(stats.shape) != (2, B, Hq, S):
            raise ValueError(
                f"llama_fast: stats must be float32 [2, {B}, {Hq}, {S}] (row max m2 and log2 of the row sum per "
                f"batch, head, query, as the forward saves them), got {stats.dtype} {tuple(stats.shape)}"
            )
        if (doc_start is None) != (doc_end is None):
            raise ValueError("llama_fast: doc_start and doc_end (packed documents) must be given together, got only "
                             + ("doc_start" if doc_end is None else "doc_end"))
        if doc_start is not None and not causal:
            raise ValueError("llama_fast: packed documents (doc_start, doc_end) need causal=True")
        if doc_start is not None and B != 1:
            raise ValueError(f"llama_fast: packed documents (doc_start, doc_end) need batch 1 (q [1, T, Hq, D]), got "
                             f"q {tuple(q.shape)}")
        for name, t in (("doc_start", doc_start), ("doc_end", doc_end)):
            if t is None:
                continue
            if t.dtype != torch.int32 or tuple(t.shape) != (S,):
                raise ValueError(f"llama_fast: {name} must be int32 [{S}] (one entry per token of q), got "
                                 f"{t.dtype} {tuple(t.shape)}")
            if t.device != q.device:
                raise ValueError(f"llama_fast: {name} must be on the device of q ({q.device}), got {t.device}")
        return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)

    # --- end attention ---


def has_kernel(device_type: str) -> bool:
    """Whether the extension holds kernels for tensors on this device type ("cpu", "cuda" or "meta")."""
    if device_type == "cuda":
        return WITH_CUDA
    # "meta": the register_fake implementations above also serve as the ops' Meta kernels, so a
    # model run on meta tensors (shapes only, e.g. benchmarks/estimate_memory.py) takes the same
    # compiled-backward path as on CUDA instead of warning and tracing the fallback backward.
    return AVAILABLE and device_type in ("cpu", "meta")


def warn_fallback(op: str, device_type: str) -> None:
    """Warns once per (op, device type) that an op runs without its compiled backward."""
    key = f"{op}:{device_type}"
    if key in _warned:
        return
    _warned.add(key)
    why = LOAD_ERROR or f"the extension was built without {device_type} kernels"
    warnings.warn(
        f"llama_fast: no compiled backward for {op} on {device_type} ({why}); using the fallback backward",
        RuntimeWarning,
        stacklevel=3,
    )
