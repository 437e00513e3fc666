"""llama_fast: LLaMA training for PyTorch on fused Triton forward and CUDA backward kernels."""
from .config import FLAVORS, LlamaConfig
from .model import KVCache, Llama

__version__ = "0.1.0"

__all__ = ["FLAVORS", "KVCache", "Llama", "LlamaConfig", "__version__"]
