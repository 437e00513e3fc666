"""Triton kernels, installed as the subpackage ``llama_fast.kernels``.

Each module documents the math of its kernels, their arguments and their
compile-time (``tl.constexpr``) parameters; launch heuristics live beside them.
"""
