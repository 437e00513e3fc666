"""csrc/cuda/attention_backward_sm90.cu (the Hopper backward: wgmma, TMA, mbarriers, warp
specialization, bulk reduce-add) run on the CPU under the host emulation (tests/cuda_emulation/,
hopper.cuh's primitives self-tested in tests/test_cuda_hopper_emulation.py), against autograd through
the reference with the 2x rule.

The kernel takes the forward's row statistics (stats fp32 [2, B, Hq, S]: the row max m2 of the
base-2 scores and log2 of the row sum), computed here from the reference's rotated operands. Each
CUDA thread is a std::thread (384 per CTA: a producer and two MMA warpgroups). This checks indexing,
descriptors, swizzles, masks, the mbarrier pipeline, GQA sums, both dQ modes and the inverse
rotation; it says nothing about speed or GPU resource limits (tests/test_build.py checks ptxas).
"""
import math
import os

import numpy as np
import pytest
import torch

from llama_fast import reference
from llama_fast.testing import assert_within_2x, default_floor

from test_cuda_emulation import EMU, ROOT, build_emulated

KERNEL = ROOT / "csrc" / "cuda" / "attention_backward_sm90.cu"
CUT = "// ---- host launcher: the emulation tests cut"


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    smem = "extern __shared__ __align__(1024) unsigned char smem_raw[];"
    assert KERNEL.read_text().count(smem) == 1, "attention_backward_sm90.cu changed shape: update this test"
    return build_emulated(tmp_path_factory.mktemp("cuda_emulation_sm90"), KERNEL, EMU / "sm90_driver.cpp", CUT,
                          {smem: "unsigned char* smem_raw = emu_smem_ptr;"})


def row_stats(q, k, cos, sin, causal):
    """stats fp32 [2, B, Hq, S] of the contract: m2 = max_j S2, log2l = log2(sum_j exp2(S2 - m2)), with
    S2 = (rot(q) . rot(k)) * scale * log2(e) in fp32 from operands rounded to the input dtype."""
    B, S, Hq, D = q.shape
    qr, kr = reference.rope(q, k, cos, sin)
    kh = kr.transpose(1, 2).repeat_interleave(Hq // k.shape[2], dim=1).float()
    s2 = (qr.transpose(1, 2).float() @ kh.transpose(-1, -2)) * np.float32(1 / math.sqrt(D) * math.log2(math.e))
    if causal:
        s2 = s2.masked_fill(torch.ones(S, S, dtype=torch.bool).triu(1), float("-inf"))
    m2 = s2.amax(-1)
    log2l = torch.log2(torch.exp2((s2 - m2[..., None]).double()).sum(-1)).float()
    return torch.stack((m2, log2l)).contiguous()


def run_emulated(exe, tmp_path, q, k, v, dout, out, stats, cos, sin, causal, deterministic, bhsd=False):
    import subprocess

    B, S, Hq, D = q.shape
    inp, outp = tmp_path / "in.bin", tmp_path / "out.bin"
    with open(inp, "wb") as f:
        for t in (q, k, v, dout, out):
            f.write(t.contiguous().view(torch.int16).numpy().tobytes())
        for t in (stats, cos[:S], sin[:S]):
            f.write(t.float().contiguous().numpy().tobytes())
    dtype_code = "1" if q.dtype == torch.float16 else "2"
    args = [str(x) for x in (B, S, Hq, k.shape[2], D, int(causal), int(deterministic))]
    done = subprocess.run([str(exe), str(inp), str(outp), *args, dtype_code, str(int(bhsd))], capture_output=True,
                          text=True,
                          env={**os.environ, "LLAMA_FAST_EMU_WAIT_TIMEOUT": "120"}, timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    raw = torch.from_numpy(np.fromfile(outp, dtype=np.int16))
    nq, nk = q.numel(), k.numel()
    return (raw[:nq].view(q.dtype).view(q.shape), raw[nq:nq + nk].view(k.dtype).view(k.shape),
            raw[nq + nk:].view(v.dtype).view(v.shape))


def check(driver, tmp_path, shape, causal, deterministic, dtype, seed=0, bhsd=False):
    B, S, Hq, Hkv, D = shape
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, S, h, D, generator=gen).to(dtype) for h in (Hq, Hkv, Hkv))
    cos, sin = reference.rope_tables(S + 3, D)
    out = reference.attention(q, k, v, cos, sin, causal)
    dout = torch.randn(out.shape, generator=gen).to(dtype)
    stats = row_stats(q, k, cos, sin, causal)
    got = run_emulated(driver, tmp_path, q, k, v, dout, out, stats, cos, sin, causal, deterministic, bhsd)
    grads = {}
    for dt in (torch.float64, dtype):
        leaves = [t.to(dt).requires_grad_() for t in (q, k, v)]
        grads[dt] = torch.autograd.grad(reference.attention(*leaves, cos, sin, causal), leaves, dout.to(dt))
    for name, a, hi, lo in zip(("dq", "dk", "dv"), got, grads[torch.float64], grads[dtype]):
        assert_within_2x(name, a, hi, lo, floor=default_floor(dtype))
    return got


def _id(value):
    if isinstance(value, tuple):
        return "B{}_S{}_Hq{}_Hkv{}_D{}".format(*value)
    return str(value).replace("torch.", "")


# GQA 1 / 4 / 8 x S 1, 17, 113 x D 64 / 128, causal or not, deterministic or not (bf16).
SMALL = [(1, S, Hq, Hkv, D) for S in (1, 17, 113) for (Hq, Hkv) in ((2, 2), (4, 1), (8, 1)) for D in (64, 128)]


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("shape", SMALL, ids=_id)
def test_sm90_backward_emulated_matches_reference(driver, tmp_path, shape, causal, deterministic):
    check(driver, tmp_path, shape, causal, deterministic, torch.bfloat16)


@pytest.mark.parametrize("shape, causal, deterministic", [((2, 70, 4, 2, 128), True, True),
                                                         ((1, 130, 2, 1, 64), False, False)], ids=_id)
def test_sm90_backward_emulated_fp16_and_batches(driver, tmp_path, shape, causal, deterministic):
    check(driver, tmp_path, shape, causal, deterministic, torch.float16)


def test_sm90_backward_emulated_strided_v_and_dout(driver, tmp_path):
    """v and dout as [B, H, S, D] storage seen through transpose(1, 2): the tensor maps take their strides."""
    check(driver, tmp_path, (2, 77, 4, 2, 64), True, False, torch.bfloat16, bhsd=True)
    check(driver, tmp_path, (1, 150, 2, 1, 128), False, True, torch.bfloat16, bhsd=True)


def test_sm90_deterministic_mode_is_bitwise_reproducible(driver, tmp_path):
    a = check(driver, tmp_path, (1, 200, 4, 1, 128), True, True, torch.bfloat16, seed=3)
    b = check(driver, tmp_path, (1, 200, 4, 1, 128), True, True, torch.bfloat16, seed=3)
    for x, y in zip(a, b):
        assert torch.equal(x.view(torch.int16), y.view(torch.int16))


# S = 1023: 8 key blocks and 16 query blocks per head, the longest emulation runs (25-55 s each on
# two cores). The whole GQA x D x causal x deterministic product is marked slow except four cases
# that cover every axis. S = 2049 (17 key blocks, a partial last one): two slow cases here, the whole
# matrix on a GPU (tests/test_attention_sm90.py).
LONG_DEFAULT = {((1, 1023, 4, 1, 128), True, False), ((1, 1023, 4, 1, 128), False, True),
                ((1, 1023, 8, 1, 64), True, True), ((1, 1023, 2, 2, 64), False, False)}
LONG = [pytest.param(shape, causal, det, marks=() if (shape, causal, det) in LONG_DEFAULT else pytest.mark.slow,
                     id=f"{_id(shape)}-{'causal' if causal else 'full'}-{'deterministic' if det else 'atomic'}")
        for shape in [(1, 1023, Hq, Hkv, D) for (Hq, Hkv) in ((2, 2), (4, 1), (8, 1)) for D in (64, 128)]
        for causal in (True, False) for det in (False, True)]
LONG += [pytest.param((1, 2049, 4, 1, 128), True, True, marks=pytest.mark.slow,
                      id="B1_S2049_Hq4_Hkv1_D128-causal-deterministic"),
         pytest.param((1, 2049, 8, 2, 64), True, False, marks=pytest.mark.slow,
                      id="B1_S2049_Hq8_Hkv2_D64-causal-atomic")]


@pytest.mark.parametrize("shape, causal, deterministic", LONG)
def test_sm90_backward_emulated_long(driver, tmp_path, shape, causal, deterministic):
    check(driver, tmp_path, shape, causal, deterministic, torch.bfloat16)
