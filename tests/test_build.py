"""The build: every csrc/ file is in the shared source list, and CMake compiles all of it with nvcc."""
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def listed_sources() -> set[str]:
    lines = (ROOT / "csrc" / "sources.txt").read_text().splitlines()
    return {line.strip() for line in lines if line.strip() and not line.strip().startswith("#")}


def test_every_csrc_file_is_in_the_source_list():
    on_disk = {
        str(p.relative_to(ROOT / "csrc")) for p in (ROOT / "csrc").rglob("*") if p.suffix in (".cu", ".cpp")
    }
    assert on_disk == listed_sources(), "csrc/sources.txt must list exactly the .cu and .cpp files under csrc/"


def test_cmake_compiles_csrc_for_sm80_and_sm90(tmp_path):
    missing = [tool for tool in ("cmake", "nvcc") if shutil.which(tool) is None]
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"CI must compile csrc/ with CMake and nvcc, but {missing} is not on PATH")
        pytest.skip(f"{missing} not on PATH: the CUDA compile check needs CMake and nvcc")
    build = tmp_path / "build"
    configure = subprocess.run(
        ["cmake", "-S", str(ROOT), "-B", str(build), "-DCMAKE_CUDA_ARCHITECTURES=80;90"],
        capture_output=True,
        text=True,
    )
    assert configure.returncode == 0, configure.stdout + configure.stderr
    jobs = str(os.cpu_count() or 2)
    compiled = subprocess.run(["cmake", "--build", str(build), "-j", jobs], capture_output=True, text=True)
    assert compiled.returncode == 0, compiled.stdout[-5000:] + compiled.stderr[-5000:]
    cuda_objects = list(build.rglob("*.cu.o"))
    expected = [s for s in listed_sources() if s.endswith(".cu")]
    assert len(cuda_objects) == len(expected), f"compiled {cuda_objects}, expected {expected}"


# Headers a CPU build of torch refers to from its CUDA headers without shipping them. Declaring the
# few types those headers use lets the host compiler check bindings.cpp's CUDA half (the binding of
# every CUDA kernel), which otherwise first compiles on a GPU machine.
CUDA_LIBRARY_STUBS = {
    "cusparse.h": "typedef int cusparseStatus_t;\ntypedef struct cusparseContext* cusparseHandle_t;\n",
    "cublas_v2.h": "typedef int cublasStatus_t;\ntypedef struct cublasContext* cublasHandle_t;\n",
    "cublasLt.h": "typedef struct cublasLtContext* cublasLtHandle_t;\n",
    "cusolver_common.h": "typedef int cusolverStatus_t;\n",
    "cusolverDn.h": '#include "cusolver_common.h"\ntypedef struct cusolverDnContext* cusolverDnHandle_t;\n',
    "c10/cuda/impl/cuda_cmake_macros.h": "",
}


def test_cuda_bindings_compile(tmp_path):
    """bindings.cpp with LLAMA_FAST_WITH_CUDA: every CUDA op binding type-checks against torch's headers."""
    import sysconfig

    import torch.utils.cpp_extension as cpp_extension

    nvcc = shutil.which("nvcc")
    cxx = shutil.which("g++") or shutil.which("c++")
    if nvcc is None or cxx is None:
        if os.environ.get("CI"):
            pytest.fail(f"CI must type-check the CUDA bindings, but nvcc={nvcc} and c++={cxx}")
        pytest.skip("needs nvcc (for the CUDA runtime headers) and a C++ compiler")
    cuda_include = Path(nvcc).resolve().parent.parent / "include"
    if not (cuda_include / "cuda_runtime_api.h").exists():
        cuda_include = Path("/usr/local/cuda/include")
    for name, text in CUDA_LIBRARY_STUBS.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("#pragma once\n" + text)
    includes = [f"-I{p}" for p in cpp_extension.include_paths()]
    cmd = [
        cxx, "-std=c++17", "-fsyntax-only", "-DLLAMA_FAST_WITH_CUDA", "-DTORCH_EXTENSION_NAME=_C",
        *includes, f"-I{sysconfig.get_paths()['include']}", f"-I{cuda_include}", f"-I{tmp_path}",
        f"-I{ROOT / 'csrc'}", str(ROOT / "csrc" / "bindings.cpp"),
    ]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-5000:]
