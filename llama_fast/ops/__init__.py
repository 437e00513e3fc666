"""Fused ops: Triton forwards, compiled (CUDA / C++) backwards, joined by autograd.

Same names and signatures as ``llama_fast.reference``. This package is the only
place that chooses an implementation for a given device and build.
"""
# --- elementwise and normalisation ops (issue 3) ---
from .rms_norm import add_rms_norm, rms_norm
from .rope import rope
from .swiglu import swiglu
# --- end elementwise and normalisation ops ---

# --- attention (issue 4) ---
from .attention import attention
from .attention_varlen import attention_varlen
# --- end attention ---

# --- selective recompute: a cheap op and the GEMM that consumes it (recompute="cheap") ---
from .recompute import add_rms_norm_linear, rms_norm_linear, swiglu_linear
# --- end selective recompute ---
