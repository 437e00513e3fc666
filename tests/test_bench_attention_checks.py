"""benchmarks/bench_attention.py's checks before timing, run on the CPU: a provider whose gradients
are off by a few percent must be refused, at the sequence lengths the benchmark times."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
bench = pytest.importorskip("bench_attention", reason="benchmarks/bench_attention.py imports its benchmark helpers")

from llama_fast import reference  # noqa: E402


def _inputs(S, H=2, D=64):
    q, k, v, dout = (torch.randn(1, S, H, D, dtype=torch.bfloat16) for _ in range(4))
    cos, sin = reference.rope_tables(S, D)
    return q, k, v, cos, sin, dout


def _reference_grads(q, k, v, cos, sin, dout):
    leaves = [t.detach().float().requires_grad_() for t in (q, k, v)]
    return torch.autograd.grad(reference.attention(*leaves, cos, sin), leaves, dout.float())


def test_backward_check_accepts_exact_gradients(monkeypatch):
    q, k, v, cos, sin, dout = _inputs(1024)
    monkeypatch.setattr(bench, "backward_fn", lambda *args: lambda: tuple(
        g.to(torch.bfloat16) for g in _reference_grads(*args[1:])))
    bench.check_backward("llama_fast-triton", q, k, v, cos, sin, dout)


def test_backward_check_refuses_gradients_off_by_ten_percent(monkeypatch):
    """At S = 1024 the check's floor must not swallow a 10% error in every gradient element."""
    q, k, v, cos, sin, dout = _inputs(1024)
    monkeypatch.setattr(bench, "backward_fn", lambda *args: lambda: tuple(
        (g * 1.1).to(torch.bfloat16) for g in _reference_grads(*args[1:])))
    with pytest.raises(AssertionError, match="dq"):
        bench.check_backward("llama_fast-triton", q, k, v, cos, sin, dout)
