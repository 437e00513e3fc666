"""Accuracy checks shared by the tests and the benchmarks (flash-attention's rule).

A kernel's error against a high-precision reference (fp32, or fp64 on the CPU) must be at most
``factor`` (2) times PyTorch's own error when the same reference math runs in the low-precision
dtype, plus a small absolute floor for outputs that PyTorch happens to get exactly right.

Also ``stop_on_sigterm``, which the tests' and benchmarks' conftest.py install (see there).
"""
from __future__ import annotations

import signal

import torch


def max_abs_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_within_2x(
    name: str,
    actual: torch.Tensor,
    ref_high: torch.Tensor,
    ref_low: torch.Tensor,
    *,
    floor: float = 1e-5,
    factor: float = 2.0,
) -> None:
    """Asserts |actual - ref_high| <= factor * |ref_low - ref_high| + floor, elementwise max."""
    if actual.shape != ref_high.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != reference shape {tuple(ref_high.shape)}")
    if not torch.isfinite(actual).all():
        bad = (~torch.isfinite(actual)).sum().item()
        raise AssertionError(f"{name}: {bad} non-finite values")
    err = max_abs_error(actual, ref_high)
    base = max_abs_error(ref_low, ref_high)
    bound = factor * base + floor
    if err > bound:
        raise AssertionError(
            f"{name}: max abs error {err:.3e} exceeds {factor}x PyTorch's own error {base:.3e} + floor {floor:.1e}"
        )


def default_floor(dtype: torch.dtype) -> float:
    """Absolute slack per dtype: a few units of the dtype's resolution near 1."""
    return {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]


def stop_on_sigterm() -> None:
    """Makes SIGTERM (and SIGINT, even where the parent ignored it) stop a pytest run as Ctrl-C does:
    pytest then still prints its summary and writes --junitxml and pytest-benchmark's
    --benchmark-json for the cases that finished, where the default SIGTERM action would lose them.
    benchmarks/gpu_session.sh stops its steps with SIGTERM at its deadline."""

    def stop(signum, frame):
        raise KeyboardInterrupt(f"stopped by signal {signal.Signals(signum).name}")

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, signal.default_int_handler)
