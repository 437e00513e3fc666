"""The host stand-in of csrc/cuda/hopper.cuh (tests/cuda_emulation/hopper.cuh) against plain loops.

tests/test_cuda_emulation_sm90.py trusts this stand-in to run the sm_90a attention backward, so each
primitive it emulates is checked here on its own: wgmma with both operands from shared memory
(K-major and MN-major, 128-byte swizzle, several k-steps and panels) and with A from registers, the
accumulator layout, wgmma's asynchrony (results land at the wait), TMA tile copies with
out-of-bounds zero fill into the swizzled layout, mbarrier phases and transaction counts, the
bulk reduce-add, named barriers, and the misuse each must catch. The expected layouts are written
from the PTX ISA in tests/cuda_emulation/hopper_selftest.cpp (plain loops), which prints "ok" when
every element matches. Nothing here runs on a GPU or says anything about speed.
"""
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EMU = ROOT / "tests" / "cuda_emulation"


@pytest.fixture(scope="module")
def selftest(tmp_path_factory):
    if shutil.which("g++") is None:
        pytest.skip("the CUDA emulation needs g++ (C++20, _Float16)")
    exe = tmp_path_factory.mktemp("hopper_emulation") / "hopper_selftest"
    cmd = ["g++", "-std=c++20", "-O1", "-pthread", f"-I{EMU}", f"-I{ROOT / 'csrc' / 'cuda'}", "-include", "emu.h",
           str(EMU / "hopper_selftest.cpp"), "-o", str(exe)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode and ("_Float16" in done.stderr or "barrier" in done.stderr):
        pytest.skip(f"this g++ lacks C++20 <barrier> or _Float16: {done.stderr[-500:]}")
    assert done.returncode == 0, done.stderr[-5000:]
    return exe


def run(exe, *args, ok=True):
    env = {**os.environ, "LLAMA_FAST_EMU_WAIT_TIMEOUT": "2"}
    done = subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True, env=env, timeout=60)
    if ok:
        assert done.returncode == 0 and done.stdout.strip() == "ok", done.stdout + done.stderr
    return done


@pytest.mark.parametrize("dtype", ["bf16", "f16"])
@pytest.mark.parametrize("scenario", [("wgmma_ss_kk",), ("wgmma_ss_mm",), ("wgmma_rs", 64), ("wgmma_rs", 128)],
                         ids=lambda s: "_".join(map(str, s)))
def test_wgmma_matches_plain_loops(selftest, scenario, dtype):
    run(selftest, *scenario, dtype)


@pytest.mark.parametrize("scenario", ["tma", "mbarrier", "bulk_reduce", "named"])
def test_async_primitives_match_plain_loops(selftest, scenario):
    run(selftest, scenario)


@pytest.mark.parametrize("scenario, message", [
    ("wgmma_pending", "wgmma results never waited for"),
    ("bulk_pending", "bulk reductions never waited for"),
    ("named_count", "one barrier id used with different thread counts"),
    ("extra_arrive", "more arrivals than its count"),
    ("desc_nonuniform", "descriptors differ across the warpgroup"),
    ("deadlock", "mbarrier wait timed out"),
])
def test_misuse_aborts(selftest, scenario, message):
    done = run(selftest, scenario, ok=False)
    assert done.returncode != 0 and message in done.stderr, (done.returncode, done.stderr)
