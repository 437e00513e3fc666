"""Fused ops: Triton forwards, compiled (CUDA / C++) backwards, joined by autograd.

Same names and signatures as ``llama_fast.reference``. This package is the only
place that chooses an implementation for a given device and build.
"""

# --- attention (issue 4) ---
from .attention import attention  # noqa: E402,F401
# --- end attention ---
