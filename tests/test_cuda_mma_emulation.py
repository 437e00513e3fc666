"""The host stand-in of csrc/cuda/mma.cuh (tests/cuda_emulation/mma.cuh) against the PTX ISA.

tests/test_cuda_emulation.py trusts this stand-in to check the attention kernels' use of ldmatrix,
mma.sync.m16n8k16 and cp.async, so here its lane-to-element maps are compared with the layouts
written out from the PTX ISA ("Warp-level matrix load instruction: ldmatrix", "Matrix Fragments for
mma.m16n8k16 with floating point type", cp.async / commit_group / wait_group), one warp of 32
emulated threads at a time (tests/cuda_emulation/mma_selftest.cpp). Nothing here runs on a GPU or
says anything about speed or the GPU memory model.
"""
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
EMU = ROOT / "tests" / "cuda_emulation"


@pytest.fixture(scope="module")
def selftest(tmp_path_factory):
    if shutil.which("g++") is None:
        pytest.skip("the CUDA emulation needs g++ (C++20, _Float16)")
    exe = tmp_path_factory.mktemp("mma_emulation") / "mma_selftest"
    cmd = ["g++", "-std=c++20", "-O1", "-pthread", f"-I{EMU}", f"-I{ROOT / 'csrc' / 'cuda'}", "-include", "emu.h",
           str(EMU / "mma_selftest.cpp"), "-o", str(exe)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode and ("_Float16" in done.stderr or "barrier" in done.stderr):
        pytest.skip(f"this g++ lacks C++20 <barrier> or _Float16: {done.stderr[-500:]}")
    assert done.returncode == 0, done.stderr[-5000:]
    return exe


def run(exe, *args, mode=None, ok=True):
    env = dict(os.environ)
    env.pop("LLAMA_FAST_EMU_CP_ASYNC", None)
    if mode is not None:
        env["LLAMA_FAST_EMU_CP_ASYNC"] = mode
    done = subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True, env=env, timeout=20)
    if ok:
        assert done.returncode == 0, done.stderr
    return done


def halves(reg):
    return reg & 0xFFFF, reg >> 16


# ldmatrix: matrix j, row r, col c holds 64 j + 8 r + c (mma_selftest.cpp). From the PTX ISA: lanes
# 8j .. 8j+7 address the rows of matrix j; register j of lane l holds row l // 4, columns 2 (l % 4)
# and 2 (l % 4) + 1 (low half first); with .trans, column l // 4 of rows 2 (l % 4) and 2 (l % 4) + 1.
# Written out for a few lanes: (lane, register) -> (low, high)
LDMATRIX_EXPECTED = {
    (0, 0): (0, 1), (0, 1): (64, 65), (0, 2): (128, 129), (0, 3): (192, 193),
    (1, 0): (2, 3), (3, 2): (134, 135), (4, 0): (8, 9),
    (13, 1): (64 + 3 * 8 + 2, 64 + 3 * 8 + 3), (22, 3): (192 + 5 * 8 + 4, 192 + 5 * 8 + 5),
    (31, 0): (62, 63), (31, 3): (254, 255),
}
LDMATRIX_TRANS_EXPECTED = {
    (0, 0): (0, 8), (0, 3): (192, 200), (1, 0): (16, 24), (3, 1): (64 + 48, 64 + 56),
    (4, 0): (1, 9), (13, 2): (128 + 16 + 3, 128 + 24 + 3), (22, 1): (64 + 32 + 5, 64 + 40 + 5),
    (31, 0): (55, 63), (31, 3): (192 + 55, 192 + 63),
}


def test_ldmatrix_lane_layout(selftest):
    rows = [[int(x) for x in line.split()] for line in run(selftest, "ldmatrix").stdout.splitlines()]
    assert len(rows) == 32 and all(len(r) == 8 for r in rows)
    for (lane, reg), want in LDMATRIX_EXPECTED.items():
        assert halves(rows[lane][reg]) == want, f"ldmatrix_x4 lane {lane} r[{reg}]"
    for (lane, reg), want in LDMATRIX_TRANS_EXPECTED.items():
        assert halves(rows[lane][4 + reg]) == want, f"ldmatrix_x4_trans lane {lane} r[{reg}]"
    for lane in range(32):  # every lane and register by the same rule
        g, t = lane // 4, lane % 4
        for j in range(4):
            assert halves(rows[lane][j]) == (64 * j + 8 * g + 2 * t, 64 * j + 8 * g + 2 * t + 1)
            assert halves(rows[lane][4 + j]) == (64 * j + 16 * t + g, 64 * j + 16 * t + 8 + g)


def random_16bit(shape, dtype, gen):
    return torch.randn(*shape, generator=gen).to(dtype)


def words(t):
    return t.contiguous().view(torch.int16).numpy().tobytes()


def check_close(name, got, want, scale):
    # products of 16-bit values are exact in fp32; only the fp32 sums (at most 33 terms) differ in
    # order, by at most 32 roundings of the sum of |terms|; a misplaced element costs O(1)
    err = (got.double() - want).abs()
    tol = 32 * 2.0**-24 * scale
    assert bool((err <= tol).all()), f"{name}: max error {err.max().item():.3g} > {tol.max().item():.3g}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("K", [16, 32])
@pytest.mark.parametrize("b_layout", ["nk", "kn"])
def test_mma_16816_product(selftest, tmp_path, dtype, K, b_layout):
    gen = torch.Generator().manual_seed(K + (b_layout == "nk"))
    a, b = random_16bit((16, K), dtype, gen), random_16bit((K, 16), dtype, gen)
    c = torch.randn(16, 16, generator=gen)
    inp, out = tmp_path / "in.bin", tmp_path / "out.bin"
    inp.write_bytes(words(a) + words(b) + c.numpy().tobytes())
    run(selftest, "mma", "f16" if dtype == torch.float16 else "bf16", K, b_layout, inp, out)
    got = torch.from_numpy(np.fromfile(out, dtype=np.float32)).view(16, 16)
    want = c.double() + a.double() @ b.double()
    check_close(f"D = C + A B ({b_layout})", got, want, c.abs().double() + a.double().abs() @ b.double().abs())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
def test_accumulator_feeds_a_operand(selftest, tmp_path, dtype):
    # mma.cuh: two adjacent 16 x 8 accumulator tiles, packed with pack2, are one A fragment (P V after Q K^T)
    gen = torch.Generator().manual_seed(7)
    a, bt, v = (random_16bit((16, 16), dtype, gen) for _ in range(3))
    inp, out = tmp_path / "in.bin", tmp_path / "out.bin"
    inp.write_bytes(words(a) + words(bt) + words(v))
    run(selftest, "reuse", "f16" if dtype == torch.float16 else "bf16", inp, out)
    res = torch.from_numpy(np.fromfile(out, dtype=np.float32))
    s, o = res[:256].view(16, 16), res[256:].view(16, 16)
    check_close("S = A B", s, a.double() @ bt.double().T, a.double().abs() @ bt.double().abs().T)
    p = s.to(dtype).double()  # the emulator's own S, rounded as pack2 rounds (to nearest even)
    check_close("O = P V", o, p @ v.double(), p.abs() @ v.double().abs())


def test_shfl_xor_sync(selftest):
    rows = [[float(x) for x in line.split()] for line in run(selftest, "shfl").stdout.splitlines()]
    assert len(rows) == 32
    assert rows[0] == [1001, 1002, 1004, 1008, 1016] and rows[21] == [1020, 1023, 1017, 1029, 1005]
    assert all(rows[lane][i] == 1000 + (lane ^ (1 << i)) for lane in range(32) for i in range(5))


SRC = bytes(range(1, 65))
OLD = b"\xaa" * 16


def cp_async_steps(selftest, mode):
    lines = run(selftest, "cpasync", mode=mode).stdout.splitlines()
    return {name: bytes.fromhex(data) for name, data in (line.split() for line in lines)}


def test_cp_async_late_completes_at_the_wait(selftest):
    # default mode = late: copies land only when cp_async_wait<N> retires their group
    for mode in (None, "late"):
        steps = cp_async_steps(selftest, mode)
        assert steps["issued"] == OLD * 4  # a read before the wait sees the old bytes
        assert steps["wait1"] == SRC[:16] + OLD * 3  # wait<1>: the older group only
        # wait<0> with a copy issued but not committed: that copy is in no group, so not waited for
        assert steps["wait0_uncommitted"] == SRC[:32] + bytes(16) + OLD  # src_bytes 0 zero-fills
        assert steps["wait0"] == SRC[:32] + bytes(16) + SRC[48:]


def test_cp_async_early_completes_at_issue(selftest):
    steps = cp_async_steps(selftest, "early")
    assert steps["issued"] == SRC[:32] + bytes(16) + OLD
    assert steps["wait1"] == steps["issued"]
    assert steps["wait0_uncommitted"] == SRC[:32] + bytes(16) + SRC[48:]
    assert steps["wait0"] == steps["wait0_uncommitted"]


def test_cp_async_mode_is_validated(selftest):
    done = run(selftest, "cpasync", mode="sometimes", ok=False)
    assert done.returncode != 0 and "LLAMA_FAST_EMU_CP_ASYNC" in done.stderr


@pytest.mark.parametrize("scenario, message", [
    ("bad_ldmatrix_align", "ldmatrix row address not 16-byte aligned"),
    ("bad_ldmatrix_range", "ldmatrix row outside shared memory"),
    ("bad_cp_align", "cp_async_16 address not 16-byte aligned"),
    ("pending", "cp.async copies never waited for"),
    ("uncommitted", "cp.async copies never waited for"),
    ("diverge", "lanes of a warp in different warp-collective ops"),
    ("exited", "lanes of a warp in different warp-collective ops (or one has returned)"),
])
def test_misuse_aborts(selftest, scenario, message):
    for mode in ("late", "early"):
        done = run(selftest, scenario, mode=mode, ok=False)
        assert done.returncode != 0 and message in done.stderr, (mode, done.returncode, done.stderr)
