"""Sweeps the launch configurations of the Triton attention kernels on the GPU in hand and prints,
per kernel and head dim, every configuration's time and the fastest one as the entry to put in
kernels/attention.py's tables (_FORWARD_CONFIGS, _BACKWARD_KV_CONTIGUOUS_CONFIGS,
_BACKWARD_Q_CONTIGUOUS_CONFIGS: the inputs are contiguous, so the backward's general tables for
strided launches are not swept here).

    python benchmarks/tune_attention.py                       # all kernels, head dims 64 and 128
    python benchmarks/tune_attention.py --kernels fwd --dims 128 --shape 8,32,2048

For each candidate the table entry is replaced in-process and the kernel's fallbacks are emptied, so
a configuration that does not fit the GPU is reported as such instead of silently timing a fallback.
Each candidate's result is first checked against llama_fast.reference (2x rule, a small shape), then
the whole op is timed (forward; or backward, where only the swept kernel's configuration changes)
with CUDA events at the given bf16 shape, causal. TFLOP/s: 2 * B * H * S^2 * D forward (causal half
of 4 * B * H * S^2 * D), 2.5x that backward.
"""
from __future__ import annotations

import argparse
import itertools
import math
import sys

import torch
from common import cuda_time_ms

from llama_fast import reference
from llama_fast.kernels import attention as kernels
from llama_fast.testing import assert_within_2x, default_floor

# kernel -> (table, fallbacks attribute, which block must be the multiple of the other)
KERNELS = {
    "fwd": ("_FORWARD_CONFIGS", "_FORWARD_FALLBACKS", "m"),
    # the backward's contiguous tables: the timed inputs are contiguous (kernels._contiguous_launch)
    "bwd_kv": ("_BACKWARD_KV_CONTIGUOUS_CONFIGS", "_BACKWARD_KV_FALLBACKS", "n"),
    "bwd_q": ("_BACKWARD_Q_CONTIGUOUS_CONFIGS", "_BACKWARD_Q_FALLBACKS", "m"),
}
BLOCKS, WARPS, STAGES = (16, 32, 64, 128), (4, 8), (2, 3)  # 40 candidates per kernel and head dim
CHECK_SHAPE = (1, 4, 1000)  # B, H, S of the correctness check (S not a multiple of any block)


def candidates(larger: str):
    for bm, bn, warps, stages in itertools.product(BLOCKS, BLOCKS, WARPS, STAGES):
        big, small = (bm, bn) if larger == "m" else (bn, bm)
        if big % small == 0:
            yield bm, bn, warps, stages


def inputs(B, H, S, D, dtype=torch.bfloat16, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    q, k, v = (torch.randn(B, S, H, D, device="cuda", dtype=dtype, generator=gen) for _ in range(3))
    cos, sin = reference.rope_tables(S, D, device="cuda")
    return q, k, v, cos, sin


def run(kernel: str, q, k, v, cos, sin, dout=None, saved=None):
    """The forward, or the backward given (out, stats) and dout; returns its outputs."""
    if kernel == "fwd":
        return kernels.attention_forward(q, k, v, cos, sin, True)
    out, stats = saved
    return kernels.attention_backward(dout, q, k, v, out, stats, cos, sin, True)


def check(kernel: str, D: int) -> None:
    """The swept configuration's result against the reference, 2x rule, fp32 reference as high."""
    q, k, v, cos, sin = inputs(*CHECK_SHAPE, D, seed=1)
    leaves = {dt: [t.to(dt).requires_grad_() for t in (q, k, v)] for dt in (torch.float32, torch.bfloat16)}
    refs = {dt: reference.attention(*leaves[dt], cos, sin, True) for dt in leaves}
    if kernel == "fwd":
        out, _ = run(kernel, q, k, v, cos, sin)
        assert_within_2x("out", out, refs[torch.float32], refs[torch.bfloat16], floor=default_floor(torch.bfloat16))
        return
    dout = torch.randn_like(q)
    grads = {dt: torch.autograd.grad(refs[dt], leaves[dt], dout.to(dt)) for dt in leaves}
    saved = kernels.attention_forward(q, k, v, cos, sin, True)
    got = run(kernel, q, k, v, cos, sin, dout, saved)
    for name, g, hi, lo in zip(("dq", "dk", "dv"), got, grads[torch.float32], grads[torch.bfloat16]):
        assert_within_2x(name, g, hi, lo, floor=default_floor(torch.bfloat16))


def sweep(kernel: str, D: int, shape: tuple[int, int, int]) -> list[tuple[float, tuple]]:
    table_name, fallbacks_name, larger = KERNELS[kernel]
    table = getattr(kernels, table_name)
    major = 9 if torch.cuda.get_device_capability()[0] >= 9 else 8
    d_pad = min(256, max(64, kernels._padded(D)[0]))
    tuned = table[major][d_pad]
    saved_fallbacks = getattr(kernels, fallbacks_name)
    setattr(kernels, fallbacks_name, [])
    B, H, S = shape
    q, k, v, cos, sin = inputs(B, H, S, D)
    dout = torch.randn_like(q)
    fwd_saved = kernels.attention_forward(q, k, v, cos, sin, True)
    flops = 2 * B * H * S * S * D * (1 if kernel == "fwd" else 2.5)
    results = []
    try:
        for config in candidates(larger):
            table[major][d_pad] = config
            try:
                check(kernel, D)
                ms = cuda_time_ms(lambda: run(kernel, q, k, v, cos, sin, dout, fwd_saved), warmup=3, reps=20)
            except Exception as err:  # noqa: BLE001 - report any failure (resources, compile, accuracy)
                print(f"  {kernel} D{D} {config}: {type(err).__name__}: {str(err).splitlines()[0][:100]}")
                continue
            results.append((ms, config))
            mark = " (current)" if config == tuned else ""
            print(f"  {kernel} D{D} {config}: {ms:.3f} ms, {flops / ms / 1e9:.0f} TFLOP/s{mark}", flush=True)
    finally:
        table[major][d_pad] = tuned
        setattr(kernels, fallbacks_name, saved_fallbacks)
    return sorted(results)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kernels", default="fwd,bwd_kv,bwd_q", help="comma-separated: fwd, bwd_kv, bwd_q")
    parser.add_argument("--dims", default="64,128", help="comma-separated head dims")
    parser.add_argument("--shape", default="8,32,2048", help="B,H,S of the timed case (bf16, causal)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("tune_attention: needs a CUDA device; none is visible", file=sys.stderr)
        return 2
    shape = tuple(int(x) for x in args.shape.split(","))
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {kernels.triton.__version__}, "
          f"shape B,H,S = {shape}, bf16, causal")
    best = {}
    for kernel in args.kernels.split(","):
        if kernel not in KERNELS:
            parser.error(f"--kernels: expected names from {sorted(KERNELS)}, got {kernel!r}")
        for D in (int(d) for d in args.dims.split(",")):
            results = sweep(kernel, D, shape)
            if results:
                best[(kernel, D)] = results[0]
    print("\n# fastest per kernel and head dim (block_m, block_n, num_warps, num_stages):")
    for (kernel, D), (ms, config) in best.items():
        flops = 2 * math.prod(shape[:2]) * shape[2] ** 2 * D * (1 if kernel == "fwd" else 2.5)
        print(f"{KERNELS[kernel][0]}[..][{D}] = {config}   # {ms:.3f} ms, {flops / ms / 1e9:.0f} TFLOP/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
