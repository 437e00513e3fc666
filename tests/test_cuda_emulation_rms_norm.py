"""csrc/cuda/rms_norm.cu run on the CPU under the host emulation of CUDA (tests/cuda_emulation/), against
autograd through the reference with the 2x rule: the register kernel with its prefetched next row, the
any-width kernel, and the dw reduction folded behind a grid-wide barrier (a cooperative launch, every
block started at once) or run as its own kernel. Both give bitwise the same dw, in a fixed order.

It checks indexing, the prefetch's row bookkeeping (a grid smaller than the rows, so every block walks
several), masking of partial packs and the grid barrier's placement; not speed, nor GPU resource
limits: the gpu tests (tests/test_csrc_rms_norm.py on CUDA) and the benchmarks do that.
"""
import subprocess

import numpy as np
import pytest
import torch

from llama_fast import reference
from llama_fast.testing import assert_within_2x, default_floor
from test_cuda_emulation import EMU, ROOT, build_emulated

KERNEL = ROOT / "csrc" / "cuda" / "rms_norm.cu"
EPS = 1e-6
DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    scratch = "__shared__ float scratch[kThreads / 32];"  # static shared memory: the block's emulated buffer
    assert KERNEL.read_text().count(scratch) == 2, "rms_norm.cu changed shape: update this test"
    return build_emulated(tmp_path_factory.mktemp("rms_norm_emulation"), KERNEL, EMU / "rms_norm_driver.cpp",
                          "// ---- launchers", {scratch: "float* scratch = reinterpret_cast<float*>(emu_smem_ptr);"})


def run_emulated(exe, tmp_path, dy, x, w, rstd, dres, grid, folded, general):
    rows, cols = x.shape
    inp, outp = tmp_path / "in.bin", tmp_path / "out.bin"
    with open(inp, "wb") as f:
        for t in (dy, x, w, rstd) + ((dres,) if dres is not None else ()):
            f.write(t.contiguous().view(torch.uint8).numpy().tobytes())
    args = [rows, cols, DTYPE_CODE[x.dtype], int(w.dtype == torch.float32 and x.dtype != torch.float32),
            int(dres is not None), grid, int(folded), int(general)]
    done = subprocess.run([str(exe), str(inp), str(outp), *map(str, args)], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    raw = torch.from_numpy(np.fromfile(outp, dtype=np.uint8))
    n_dx = x.numel() * x.element_size()
    return raw[:n_dx].view(x.dtype).view(x.shape), raw[n_dx:].view(w.dtype)


def reference_grads(x, w, dy, dres, dtype):
    x = x.detach().to(dtype).requires_grad_()
    w = w.detach().to(dtype if w.dtype != torch.float32 or dtype == torch.float64 else w.dtype).requires_grad_()
    dx, dw = torch.autograd.grad(reference.rms_norm(x, w, EPS), (x, w), dy.to(dtype))
    return dx + (dres.to(dtype) if dres is not None else 0), dw


CASES = [  # rows, cols, dtype, fp32 weight, residual, grid, general
    (7, 64, torch.bfloat16, False, True, 3, False),  # one pack a thread, partly live; 3 rows a block
    (5, 2056, torch.float16, True, False, 2, False),  # two packs a thread, the second partly live
    (4, 4104, torch.bfloat16, False, True, 3, False),  # four packs a thread; a block with 1 row, one with 2
    (6, 1030, torch.float32, False, True, 4, False),  # fp32 packs of 4
    (3, 300, torch.float16, False, True, 2, True),  # the any-width kernel
    (2, 9, torch.bfloat16, True, False, 2, False),  # not a multiple of the pack: the any-width kernel
]


@pytest.mark.parametrize("rows, cols, dtype, fp32_weight, residual, grid, general", CASES)
def test_rms_norm_backward_emulated_matches_reference(driver, tmp_path, rows, cols, dtype, fp32_weight, residual,
                                                      grid, general):
    x = torch.randn(rows, cols, dtype=dtype) * 2 + 0.5
    w = (torch.rand(cols) + 0.5).to(torch.float32 if fp32_weight else dtype)
    dy = torch.randn(rows, cols, dtype=dtype)
    dres = torch.randn(rows, cols, dtype=dtype) if residual else None
    rstd = torch.rsqrt(x.double().pow(2).mean(-1) + EPS).float()
    folded = run_emulated(driver, tmp_path, dy, x, w, rstd, dres, grid, folded=True, general=general)
    unfolded = run_emulated(driver, tmp_path, dy, x, w, rstd, dres, grid, folded=False, general=general)
    hi, lo = reference_grads(x, w, dy, dres, torch.float64), reference_grads(x, w, dy, dres, dtype)
    for name, got, want_hi, want_lo in zip(("dx", "dw"), folded, hi, lo):
        assert_within_2x(name, got, want_hi, want_lo, floor=default_floor(dtype))
    for name, a, b in zip(("dx", "dw"), folded, unfolded):  # one order of summation, folded or not
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)), f"{name}: folded and unfolded runs differ"
