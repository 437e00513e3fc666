"""llama_fast: LLaMA training for PyTorch on fused Triton forward and CUDA backward kernels."""
from .config import FLAVORS, LlamaConfig
from .model import KVCache, Llama

__version__ = "0.1.0"

__all__ = ["FLAVORS", "KVCache", "Llama", "LlamaConfig", "register_hf_attention", "replace_modules", "__version__"]


def __getattr__(name):
    # Imported on first use: the fused ops pull in triton, which plain model users may not need.
    if name in ("replace_modules", "register_hf_attention"):
        from . import replace

        return getattr(replace, name)
    raise AttributeError(f"module 'llama_fast' has no attribute {name!r}")
