"""Builds llama_fast and its extension llama_fast._C from csrc/.

    pip install -e . --no-build-isolation      # torch must already be installed

The extension is built with CUDA when torch has CUDA and nvcc is found, CPU-only otherwise.
Environment: TORCH_CUDA_ARCH_LIST (e.g. "8.0;9.0"; with 9.0 the build adds sm_90a code, which the Hopper
attention backward needs), MAX_JOBS (parallel compile jobs),
LLAMA_FAST_SKIP_CUDA_BUILD=1 (CPU-only extension even where CUDA exists),
LLAMA_FAST_SKIP_BUILD=1 (no extension at all: the ops fall back to Triton/PyTorch backwards).
"""
import os
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).parent.resolve()


def csrc_sources() -> list[str]:
    """The source list shared with CMakeLists.txt (csrc/sources.txt), relative to this file."""
    lines = (ROOT / "csrc" / "sources.txt").read_text().splitlines()
    return [f"csrc/{line.strip()}" for line in lines if line.strip() and not line.lstrip().startswith("#")]


def builds_for_sm90(torch) -> bool:
    """Whether the CUDA build targets compute capability 9.0: TORCH_CUDA_ARCH_LIST, else the visible GPUs
    (what torch.utils.cpp_extension itself chooses from)."""
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if archs:
        return any(a.split("+")[0].strip().startswith("9.0") for a in archs.replace(" ", ";").split(";") if a.strip())
    return torch.cuda.is_available() and any(
        torch.cuda.get_device_capability(i) == (9, 0) for i in range(torch.cuda.device_count())
    )


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
        nvcc_flags = ["-O3", "-std=c++17", "-lineinfo", "--expt-relaxed-constexpr"]
        if builds_for_sm90(torch):
            # csrc/cuda/*_sm90.cu (the Hopper attention backward) needs sm_90a code (wgmma, setmaxnreg); the
            # other files hold the same code for it. Elsewhere that file's main kernel is a stub it never launches.
            nvcc_flags.append("-gencode=arch=compute_90a,code=sm_90a")
        ext = CUDAExtension(
            "llama_fast._C",
            sources,
            define_macros=[("LLAMA_FAST_WITH_CUDA", None)],
            extra_compile_args={
                "cxx": cxx_flags,
                "nvcc": nvcc_flags,
            },
        )
    else:
        ext = CppExtension("llama_fast._C", [s for s in sources if not s.endswith(".cu")], extra_compile_args=cxx_flags)
    return [ext], {"build_ext": BuildExtension}


class BuildPyWithHook(build_py):
    """Also writes llama_fast_lm_eval_hook.pth beside the packages: its line installs the import hook that
    lets `lm_eval --model llama_fast` find our model (see llama_fast_lm_eval_hook.py)."""

    PTH = "llama_fast_lm_eval_hook.pth"

    def run(self):
        super().run()
        # An editable install keeps the packages in this tree and makes its wheel of the install directory.
        target = self.get_finalized_command("install").install_lib if self.editable_mode else self.build_lib
        Path(target).mkdir(parents=True, exist_ok=True)
        (Path(target) / self.PTH).write_text("import llama_fast_lm_eval_hook; llama_fast_lm_eval_hook.install()\n")


ext_modules, cmdclass = extensions()

setup(
    packages=find_packages(include=["llama_fast", "llama_fast.*"]) + ["llama_fast.kernels"],
    package_dir={"llama_fast.kernels": "kernels"},
    py_modules=["llama_fast_lm_eval_hook"],
    ext_modules=ext_modules,
    cmdclass={**cmdclass, "build_py": BuildPyWithHook},
)
