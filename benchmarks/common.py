"""Shared helpers for the pytest-benchmark suites in benchmarks/.

Every case follows the same steps (llm.c's habit: validate, then time):

    fn = ...                                   # a zero-argument callable that launches the work
    validate("y", got, ref_high, ref_low)      # result checked against llama_fast.reference first
    record(benchmark, fn, bytes=..., formula="...")   # CUDA-event timing, GB/s or TFLOP/s in extra_info

API:
  requires_cuda               pytest mark: skip (with the reason) where no CUDA device is visible
  cuda_time_ms(fn, warmup, reps) -> float
                              median milliseconds of fn() over `reps` runs, each timed by its own pair
                              of CUDA events on the current stream, after `warmup` untimed runs; each
                              run queued behind a GPU spin longer than the host needs to issue it, so
                              the events time the kernels and not the Python launch path
  cuda_timings(fn, warmup, reps) -> (float, float, float)
                              that median, the host's milliseconds per call to issue the timed
                              runs (nothing synchronized inside the loop), and the spin queued
                              before each (ms): an issue time as long as the spin means fn
                              synchronizes (waits for the spin), so it is no launch-path cost
  session_counts(warmup, reps) -> (int, int)
                              warm-up and timed runs capped by LLAMA_FAST_BENCH_WARMUP and
                              LLAMA_FAST_BENCH_REPS where set (benchmarks/gpu_session.sh sets 2 and 5
                              for a session that must fit one device call); validation is unchanged
  record(benchmark, fn, *, bytes=None, flops=None, formula="", warmup=10, reps=50) -> float
                              times fn with cuda_timings, stores ms, GB/s (bytes / s / 1e9) and/or
                              TFLOP/s with the formula, the peak memory allocated while timing, and
                              cpu_issue_ms with launch_bound (True where issuing a call took at least
                              0.8x its GPU time: a loop of such calls would keep the GPU waiting on
                              the host, though GB/s is the kernels' own; None with host_syncs True
                              where fn synchronizes, whose issue time is then the wait for the spin),
                              in benchmark.extra_info, and lets
                              pytest-benchmark time synchronized calls for its own table; returns the
                              median ms (warmup and reps go through session_counts)
  validate(name, got, ref_high, ref_low, *, strict=True)
                              strict: llama_fast.testing's 2x rule; strict=False (peers that round
                              differently, e.g. Liger's casting modes): within 2e-2 of the
                              fp32 reference, relative to its largest magnitude
  bench_forward(benchmark, fn, ref, inputs, grad_outputs, *, names, strict, bytes, formula)
  bench_backward(benchmark, fn, ref, inputs, grad_outputs, *, names, strict, bytes, formula)
                              the whole validate-then-record case of an op: fn(*inputs) (outputs named
                              by `names`), or its gradients with respect to every input given
                              grad_outputs, checked against ref(*inputs) run in fp32 and in the inputs'
                              dtype, then timed
  liger(module)               imports liger_kernel.<module> or skips with the reason
  compiled(fn)                torch.compile(fn), cached per function (compile once per session)
"""
from __future__ import annotations

import importlib
import os
import statistics
import time
from typing import Callable

import pytest
import torch

from llama_fast.testing import assert_within_2x, default_floor, max_abs_error

requires_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="benchmarks time CUDA kernels; no CUDA device is visible"
)


_SLEEP_CYCLES_PER_MS: float | None = None


def _sleep_cycles_per_ms() -> float:
    """GPU clock cycles that torch.cuda._sleep spins per millisecond (measured once per process)."""
    global _SLEEP_CYCLES_PER_MS
    if _SLEEP_CYCLES_PER_MS is None:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        torch.cuda._sleep(10**6)
        end.record()
        torch.cuda.synchronize()
        _SLEEP_CYCLES_PER_MS = 10**6 / max(start.elapsed_time(end), 1e-3)
    return _SLEEP_CYCLES_PER_MS


def session_counts(warmup: int, reps: int) -> tuple[int, int]:
    """(warmup, reps) capped by LLAMA_FAST_BENCH_WARMUP / LLAMA_FAST_BENCH_REPS where set (at least
    one warm-up run, for the JIT compiles, and one timed run)."""
    warmup_cap = os.environ.get("LLAMA_FAST_BENCH_WARMUP")
    reps_cap = os.environ.get("LLAMA_FAST_BENCH_REPS")
    if warmup_cap:
        warmup = max(1, min(warmup, int(warmup_cap)))
    if reps_cap:
        reps = max(1, min(reps, int(reps_cap)))
    return warmup, reps


def cuda_timings(fn: Callable[[], object], warmup: int = 10, reps: int = 50) -> tuple[float, float, float]:
    """(median GPU milliseconds of fn() on the current CUDA stream, per-run CUDA events after warm-up;
    host milliseconds per call spent issuing those runs; milliseconds of the spin queued before each).

    Each timed run is queued behind a GPU-side spin (torch.cuda._sleep) twice as long as the host
    takes to issue fn, so its start event fires with fn's kernels already queued: the events time the
    kernels, not the Python launch path, whose cost is the second number.

    A fn that synchronizes (a .item(), a data-dependent check) waits out the spin inside its issue
    time, which then reaches the spin's length, and its events include the launches after the sync."""
    host_ms = []
    for _ in range(warmup):
        t = time.perf_counter()
        fn()
        host_ms.append((time.perf_counter() - t) * 1e3)
    torch.cuda.synchronize()
    lead_ms = 2 * statistics.median(host_ms or [0.0]) + 0.05
    lead_cycles = int(_sleep_cycles_per_ms() * lead_ms)
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    issue_s = 0.0
    for start, end in zip(starts, ends):
        torch.cuda._sleep(lead_cycles)
        t = time.perf_counter()
        start.record()
        fn()
        end.record()
        issue_s += time.perf_counter() - t
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends)), issue_s * 1e3 / reps, lead_ms


def cuda_time_ms(fn: Callable[[], object], warmup: int = 10, reps: int = 50) -> float:
    """Median milliseconds of fn() on the current CUDA stream (per-run CUDA events after warm-up)."""
    return cuda_timings(fn, warmup, reps)[0]


def record(
    benchmark,
    fn: Callable[[], object],
    *,
    bytes: int | None = None,
    flops: float | None = None,
    formula: str = "",
    warmup: int = 10,
    reps: int = 50,
) -> float:
    """Times fn, writes ms / GB/s / TFLOP/s, the formula, the peak memory of the timed runs and the
    host's issue time per call (cpu_issue_ms, launch_bound) into benchmark.extra_info; returns ms."""
    warmup, reps = session_counts(warmup, reps)
    torch.cuda.reset_peak_memory_stats()
    ms, issue_ms, lead_ms = cuda_timings(fn, warmup, reps)
    host_syncs = issue_ms >= lead_ms  # the host waited for the spin: fn synchronizes
    info = {"median_ms_cuda_events": ms, "timed_runs": reps, "formula": formula,
            "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30,
            "cpu_issue_ms": issue_ms, "host_syncs": host_syncs, "launch_bound": None if host_syncs else issue_ms >= 0.8 * ms}
    if bytes is not None:
        info["bytes"] = bytes
        info["GB/s"] = bytes / (ms * 1e-3) / 1e9
    if flops is not None:
        info["flops"] = flops
        info["TFLOP/s"] = flops / (ms * 1e-3) / 1e12
    benchmark.extra_info.update(info)

    def synchronized():
        fn()
        torch.cuda.synchronize()

    benchmark.pedantic(synchronized, rounds=reps, warmup_rounds=warmup, iterations=1)
    return ms


def validate(
    name: str,
    got: torch.Tensor,
    ref_high: torch.Tensor,
    ref_low: torch.Tensor,
    *,
    strict: bool = True,
) -> None:
    """Checks a provider's result before it is timed (see the module docstring)."""
    if strict:
        floor = default_floor(got.dtype)
        assert_within_2x(name, got.float(), ref_high.float(), ref_low.float(), floor=floor)
        return
    scale = ref_high.float().abs().max().item() or 1.0
    err = max_abs_error(got.float(), ref_high.float())
    assert err <= 2e-2 * scale, f"{name}: max abs error {err:.3e} exceeds 2e-2 of the reference's max {scale:.3e}"


def _as_tuple(x):
    return x if isinstance(x, tuple) else (x,)


def reference_run(ref: Callable, inputs, grad_outputs, dtype: torch.dtype):
    """(outputs, input gradients) of ref(*inputs) with the inputs cast to dtype."""
    leaves = [t.detach().to(dtype).requires_grad_() for t in inputs]
    outs = _as_tuple(ref(*leaves))
    grads = torch.autograd.grad(outs, leaves, [g.to(dtype) for g in grad_outputs])
    return [o.detach() for o in outs], list(grads)


def bench_forward(benchmark, fn, ref, inputs, grad_outputs, *, names, strict=True, bytes, formula) -> None:
    """Checks fn(*inputs) against the reference (fp32 as high, the inputs' dtype as low), then times it."""
    high, _ = reference_run(ref, inputs, grad_outputs, torch.float32)
    low, _ = reference_run(ref, inputs, grad_outputs, inputs[0].dtype)
    with torch.no_grad():
        for name, got, hi, lo in zip(names, _as_tuple(fn(*inputs)), high, low, strict=True):
            validate(name, got, hi, lo, strict=strict)
        record(benchmark, lambda: fn(*inputs), bytes=bytes, formula=formula)


def bench_backward(benchmark, fn, ref, inputs, grad_outputs, *, names, strict=True, bytes, formula) -> None:
    """Checks the gradients of fn(*inputs) with respect to every input, then times the backward alone
    (the forward's graph is kept and reused)."""
    _, high = reference_run(ref, inputs, grad_outputs, torch.float32)
    _, low = reference_run(ref, inputs, grad_outputs, inputs[0].dtype)
    outs = _as_tuple(fn(*inputs))
    grads = torch.autograd.grad(outs, inputs, grad_outputs, retain_graph=True)
    for name, got, hi, lo in zip(names, grads, high, low, strict=True):
        validate(name, got, hi, lo, strict=strict)
    record(
        benchmark, lambda: torch.autograd.grad(outs, inputs, grad_outputs, retain_graph=True),
        bytes=bytes, formula=formula,
    )


def liger(module: str):
    """liger_kernel.<module>, or a skip saying why it cannot be compared."""
    try:
        return importlib.import_module(f"liger_kernel.{module}")
    except ImportError as exc:
        pytest.skip(f"Liger-Kernel not importable ({exc}); install liger-kernel to compare against it")


_compiled: dict[Callable, Callable] = {}


def compiled(fn: Callable) -> Callable:
    """torch.compile(fn), built once per function."""
    if fn not in _compiled:
        _compiled[fn] = torch.compile(fn)
    return _compiled[fn]
