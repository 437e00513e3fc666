"""Builds llama_fast and its extension llama_fast._C from csrc/.

    pip install -e . --no-build-isolation      # torch must already be installed

The extension is built with CUDA when torch has CUDA and nvcc is found, CPU-only otherwise.
Environment: TORCH_CUDA_ARCH_LIST (e.g. "8.0;9.0"), MAX_JOBS (parallel compile jobs),
LLAMA_FAST_SKIP_CUDA_BUILD=1 (CPU-only extension even where CUDA exists),
LLAMA_FAST_SKIP_BUILD=1 (no extension at all: the ops fall back to Triton/PyTorch backwards).
"""
import os
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent.resolve()


def csrc_sources() -> list[str]:
    """The source list shared with CMakeLists.txt (csrc/sources.txt), relative to this file."""
    lines = (ROOT / "csrc" / "sources.txt").read_text().splitlines()
    return [f"csrc/{line.strip()}" for line in lines if line.strip() and not line.lstrip().startswith("#")]


def extensions():
    if os.environ.get("LLAMA_FAST_SKIP_BUILD") == "1":
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    sources = csrc_sources()
    cxx_flags = ["-O3", "-std=c++17"]
    with_cuda = (
        torch.version.cuda is not None
        and CUDA_HOME is not None
        and os.environ.get("LLAMA_FAST_SKIP_CUDA_BUILD") != "1"
    )
    if with_cuda:
        ext = CUDAExtension(
            "llama_fast._C",
            sources,
            define_macros=[("LLAMA_FAST_WITH_CUDA", None)],
            extra_compile_args={
                "cxx": cxx_flags,
                "nvcc": ["-O3", "-std=c++17", "-lineinfo", "--expt-relaxed-constexpr"],
            },
        )
    else:
        ext = CppExtension("llama_fast._C", [s for s in sources if not s.endswith(".cu")], extra_compile_args=cxx_flags)
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = extensions()

setup(
    packages=find_packages(include=["llama_fast", "llama_fast.*"]) + ["llama_fast.kernels"],
    package_dir={"llama_fast.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
