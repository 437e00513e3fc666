"""llama_fast: LLaMA training for PyTorch on fused Triton forward and CUDA backward kernels."""
from .config import FLAVORS, LlamaConfig
from .model import KVCache, Llama

__version__ = "0.1.0"

__all__ = ["FLAVORS", "KVCache", "Llama", "LlamaConfig", "replace_modules", "__version__"]


def __getattr__(name):
    # Imported on first use: the fused ops pull in triton, which plain model users may not need.
    if name == "replace_modules":
        from .replace import replace_modules

        return replace_modules
    raise AttributeError(f"module 'llama_fast' has no attribute {name!r}")
