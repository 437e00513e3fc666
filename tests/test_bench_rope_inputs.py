"""benchmarks/bench_rope.py on the CPU: its inputs have Hugging Face's memory layout, and its
validate-then-time path accepts our op (timing stubbed; Triton in the interpreter, fp32)."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
bench = pytest.importorskip("bench_rope", reason="benchmarks/bench_rope.py imports its benchmark helpers")
import common  # noqa: E402  (benchmarks/common.py, importable once bench_rope is)


@pytest.fixture
def small(monkeypatch):
    monkeypatch.setattr(bench, "B", 2)
    monkeypatch.setattr(bench, "H", 3)
    monkeypatch.setattr(bench, "S", 5)
    monkeypatch.setattr(bench, "D", 16)
    monkeypatch.setattr(bench, "DTYPE", torch.float32)  # the interpreter's bf16 is not trustworthy


def test_inputs_are_views_of_projection_outputs(small):
    """[B, H, S, D] views of [B, S, H, D] storage, as transformers passes q and k to RoPE: a
    [B, H, S, D]-contiguous storage would make Liger copy both (it rotates the [B, S, H, D] storage)."""
    q, k, grads = bench.make_inputs("cpu")
    for t in (q, k):
        assert t.shape == (2, 3, 5, 16) and t.is_leaf and t.requires_grad
        assert t.transpose(1, 2).is_contiguous()
    assert all(g.shape == (2, 5, 3, 16) for g in grads)


@pytest.mark.parametrize("check", [common.bench_forward, common.bench_backward], ids=["forward", "backward"])
def test_ours_passes_the_check_before_timing(small, monkeypatch, check):
    timed = []
    monkeypatch.setattr(common, "record", lambda benchmark, fn, **kw: timed.append(fn()))
    cos, sin = bench.reference.rope_tables(bench.S, bench.D)
    q, k, grads = bench.make_inputs("cpu")
    check(None, bench.provider_fn("ours", cos, sin), bench.reference_fn(cos, sin), (q, k), grads, names=["q", "k"],
          bytes=bench.BYTES, formula="")
    assert len(timed) == 1
