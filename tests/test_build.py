"""The build: every csrc/ file is in the shared source list, and CMake compiles all of it with nvcc."""
import os
import re
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


def test_cmake_defaults_to_sm80_and_sm90_unless_the_user_chooses(tmp_path):
    """The README's plain `cmake -S . -B build` must not take nvcc's default architecture (sm_75 for nvcc 13,
    which rejects cp.async and bf16 mma); -DCMAKE_CUDA_ARCHITECTURES and $CUDAARCHS still choose."""
    missing = [tool for tool in ("cmake", "nvcc") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"{missing} not on PATH: configuring the CUDA build needs CMake and nvcc")

    def configured(name, *flags, env=None):
        env = {k: v for k, v in os.environ.items() if k != "CUDAARCHS"} | (env or {})
        done = subprocess.run(["cmake", "-S", str(ROOT), "-B", str(tmp_path / name), *flags], capture_output=True,
                              text=True, env=env)
        assert done.returncode == 0, done.stdout + done.stderr
        cache = (tmp_path / name / "CMakeCache.txt").read_text()
        return re.search(r"^CMAKE_CUDA_ARCHITECTURES:\w+=(.*)$", cache, re.M).group(1)

    assert configured("default") == "80;90"
    assert configured("flag", "-DCMAKE_CUDA_ARCHITECTURES=86") == "86"
    assert configured("env", env={"CUDAARCHS": "89"}) == "89"


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


# Spill budget of the CUDA kernels on an H100, per kernel family and head dim: ptxas's spill loads
# in bytes. A kernel past its budget still runs correctly, only slower, so nothing but ptxas shows
# it before a GPU does. The attention backward's kernels are held to 0 at every head dim
# (test_attention_backward_kernels_never_spill).
SPILL_BUDGET_SM90 = 256


def ptxas_report_sm90(sources, arch: str = "sm_90") -> dict[str, tuple[int, int]]:
    """'source: kernel' -> (spill load bytes, registers), from ptxas -v compiling each .cu for `arch` (sm_90)."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        if os.environ.get("CI"):
            pytest.fail("CI must check the CUDA kernels' register spills, but nvcc is not on PATH")
        pytest.skip("needs nvcc for ptxas's resource report")
    report = {}
    for source in sources:
        result = subprocess.run(
            [nvcc, "-std=c++17", "-O3", "--expt-relaxed-constexpr", f"-arch={arch}", "-Xptxas", "-v",
             f"-I{ROOT / 'csrc' / 'cuda'}", "-c", str(ROOT / "csrc" / source), "-o", os.devnull],
            capture_output=True, text=True,
        )
        assert result.returncode == 0, result.stderr[-5000:]
        # ptxas prints, per kernel: "Compiling entry function 'NAME'", then its spill and register lines.
        for name, body in re.findall(r"Compiling entry function '(\w+)'(.*?)(?=Compiling entry function|\Z)",
                                     result.stderr, re.S):
            spill = re.search(r"(\d+) bytes spill loads", body)
            regs = re.search(r"Used (\d+) registers", body)
            assert spill and regs, f"no resource report for {name} in ptxas's output"
            report[f"{source}: {demangle(name)}"] = (int(spill.group(1)), int(regs.group(1)))
    return report


def test_cuda_kernels_spill_within_budget_on_sm90():
    report = ptxas_report_sm90(sorted(s for s in listed_sources() if s.endswith(".cu")))
    assert any("attention_backward_kv" in k for k in report), sorted(report)
    over = {k: v for k, v in report.items() if v[0] > SPILL_BUDGET_SM90}
    assert over == {}, f"kernels spilling past {SPILL_BUDGET_SM90} B (spill loads, registers): {over}"


def ptxas_report_sm90a(source: str) -> tuple[dict[str, tuple[int, int]], str]:
    """ptxas -v for one .cu compiled for sm_90a alone: ('kernel' -> (spill load bytes, registers), stderr)."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        if os.environ.get("CI"):
            pytest.fail("CI must check the sm_90a kernels' register spills, but nvcc is not on PATH")
        pytest.skip("needs nvcc for ptxas's resource report")
    result = subprocess.run(
        [nvcc, "-std=c++17", "-O3", "--expt-relaxed-constexpr", "-gencode", "arch=compute_90a,code=sm_90a",
         "-Xptxas", "-v", f"-I{ROOT / 'csrc' / 'cuda'}", "-c", str(ROOT / "csrc" / source), "-o", os.devnull],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr[-5000:]
    report = {}
    for name, body in re.findall(r"Compiling entry function '(\w+)'(.*?)(?=Compiling entry function|\Z)",
                                 result.stderr, re.S):
        spill = re.search(r"(\d+) bytes spill loads", body)
        regs = re.search(r"Used (\d+) registers", body)
        assert spill and regs, f"no resource report for {name} in ptxas's output"
        report[demangle(name)] = (int(spill.group(1)), int(regs.group(1)))
    return report, result.stderr


def test_sm90_attention_backward_compiles_for_sm90a_without_spills():
    """The Hopper attention backward (issue 18): every kernel compiles for sm_90a and none spills. The main
    kernels' 384 threads allow 168 registers at launch; setmaxnreg then gives the two MMA warpgroups 240 and
    the producer 24, and ptxas allocates each region within those (a spill here is a slow kernel, and no
    test without a GPU would see it otherwise)."""
    report, _ = ptxas_report_sm90a("cuda/attention_backward_sm90.cu")
    main = {k: v for k, v in report.items() if "attention_backward_sm90_main" in k}
    assert len(main) == 4, sorted(report)  # fp16 / bf16 x head dims 64 / 128
    assert {k: v for k, v in report.items() if v[0]} == {}, f"sm_90a kernels spill (spill loads, registers): {report}"
    assert all(regs <= 168 for _, regs in main.values()), main


def test_sm90_sources_are_built_for_sm90a_only():
    """CMake gives cuda/*_sm90.cu its own target for arch 90a (the other .cu files keep 80;90), and setup.py
    adds sm_90a code when it builds for compute capability 9.0."""
    cmake = (ROOT / "CMakeLists.txt").read_text()
    assert "set_target_properties(llama_fast_cuda_sm90a PROPERTIES CUDA_ARCHITECTURES 90a)" in cmake
    assert "arch=compute_90a,code=sm_90a" in (ROOT / "setup.py").read_text()
    assert "cuda/attention_backward_sm90.cu" in listed_sources()


def test_rms_norm_backward_kernels_fit_on_sm90():
    """The cooperative (folded) RMSNorm backward kernels never spill, and the 16-bit ones for rows of up to
    4096 columns (one or two packs a thread) take at most 128 registers: two 256-thread blocks an SM, the
    grid rms_norm.cu's launcher counts on (264 blocks on an H100)."""
    report = ptxas_report_sm90(["cuda/rms_norm.cu"])
    folded = {k: v for k, v in report.items() if re.search(r"rms_norm_backward_\w+<.*, true>", k)}
    assert len(folded) == 5 * 4, sorted(report)  # 5 (x, w) dtype pairs x (3 register kernels + the general one)
    assert {k: v for k, v in folded.items() if v[0]} == {}, "folded RMSNorm backward kernels spill"
    two_per_sm = {k: v for k, v in folded.items() if re.search(r"registers<__(half|nv_bfloat16), \w+, 8, [12], ", k)}
    assert len(two_per_sm) == 8 and all(regs <= 128 for _, regs in two_per_sm.values()), two_per_sm


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_attention_backward_kernels_never_spill(arch):
    """Every kernel of the sm_80 attention backward (issue 16 item 3), at every head dim (64, 128 with 64- or
    32-row query blocks, 256) and both dtypes, compiles without a byte of spill loads: a spill in
    the main loop is local-memory traffic on every iteration, and no CPU test would see it otherwise. The kv
    kernel holds dK and dV in registers: 32-query blocks for DP >= 128 and two warps per 16 key rows at DP = 256
    keep it within 255 (main had 48 B of spill loads at D = 128 and 1,844 B at D = 256 on sm_80)."""
    report = ptxas_report_sm90(["cuda/attention_backward.cu"], arch)
    kv = {k: v for k, v in report.items() if "attention_backward_kv" in k}
    assert len(kv) == 2 * 8, sorted(report)  # fp16 / bf16 x (64, 128, 128 small, 256) x dQ mode
    assert len(report) == 2 * 15, sorted(report)  # + q kernels (4), prep and dq_finish (2) per dtype
    assert {k: v for k, v in report.items() if v[0]} == {}, f"{arch} kernels spill (spill loads, registers): {report}"


def demangle(name: str) -> str:
    cxxfilt = shutil.which("c++filt")
    if cxxfilt is None:
        return name
    return subprocess.run([cxxfilt, name], capture_output=True, text=True).stdout.strip()
