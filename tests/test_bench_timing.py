"""benchmarks/common.py's record(), on the CPU with stand-in CUDA events: it reports the host's issue
time per call beside the GPU time, and flags the numbers that time the Python launch path."""
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
common = pytest.importorskip("common", reason="benchmarks/common.py imports pytest and torch only")


class FakeBenchmark:
    def __init__(self):
        self.extra_info = {}

    def pedantic(self, fn, rounds, warmup_rounds, iterations):
        fn()


def fake_cuda(monkeypatch, gpu_ms):
    """CUDA events whose elapsed time is gpu_ms(host ms between the two records)."""

    class Event:
        def __init__(self, enable_timing):
            self.t = None

        def record(self):
            self.t = time.perf_counter()

        def elapsed_time(self, end):
            return gpu_ms((end.t - self.t) * 1e3)

    monkeypatch.setattr(torch.cuda, "Event", Event)
    for name in ("synchronize", "reset_peak_memory_stats"):
        monkeypatch.setattr(torch.cuda, name, lambda *a, **k: None)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a, **k: 0)
    sleeps = []  # the cycles of every GPU spin queued
    monkeypatch.setattr(torch.cuda, "_sleep", sleeps.append)
    monkeypatch.setattr(common, "_SLEEP_CYCLES_PER_MS", 1000.0)  # a 1 MHz stand-in clock
    return sleeps


def test_a_launch_bound_op_is_flagged(monkeypatch):
    """The GPU waits on the host: the events measure the 2 ms the host takes to issue each call."""
    fake_cuda(monkeypatch, gpu_ms=lambda host_ms: host_ms)
    bench = FakeBenchmark()
    common.record(bench, lambda: time.sleep(2e-3), bytes=10**9, warmup=1, reps=5)
    info = bench.extra_info
    assert info["cpu_issue_ms"] >= 2.0 and info["launch_bound"] is True


def test_a_gpu_bound_op_is_not_flagged(monkeypatch):
    """Issue is instant, each run takes 5 ms of GPU time: the number is the kernels'."""
    fake_cuda(monkeypatch, gpu_ms=lambda host_ms: 5.0)
    bench = FakeBenchmark()
    ms = common.record(bench, lambda: None, bytes=10**9, warmup=1, reps=5)
    info = bench.extra_info
    assert ms == 5.0 and info["GB/s"] == pytest.approx(200.0)
    assert info["cpu_issue_ms"] < 1.0 and info["launch_bound"] is False


def test_each_timed_run_is_queued_behind_a_spin_longer_than_its_issue(monkeypatch):
    """So the start event fires with the kernels already queued: the GPU never waits on the host
    inside a timed window."""
    sleeps = fake_cuda(monkeypatch, gpu_ms=lambda host_ms: 1.0)
    common.record(FakeBenchmark(), lambda: time.sleep(3e-3), bytes=10**9, warmup=3, reps=4)
    assert len(sleeps) == 4
    assert all(cycles >= 1000.0 * 2 * 3.0 for cycles in sleeps), sleeps  # >= 2 x 3 ms of host issue


def test_an_op_that_synchronizes_is_marked_not_launch_bound(monkeypatch):
    """A call that waits on the GPU (linear_cross_entropy's target check, a .item()) waits out the spin
    queued before it: its issue time is the spin's, not the launch path's, so it is reported as a
    host sync and not flagged launch-bound (it was, with cpu_issue_ms about twice its GPU time)."""
    sleeps = fake_cuda(monkeypatch, gpu_ms=lambda host_ms: 5.0)

    def synchronizing():  # waits for what is queued: the last spin (1000 cycles per ms), then 1 ms of its own
        time.sleep((sleeps[-1] / 1000.0 if sleeps else 5.0) * 1e-3)

    bench = FakeBenchmark()
    common.record(bench, synchronizing, bytes=10**9, warmup=2, reps=3)
    info = bench.extra_info
    assert info["host_syncs"] is True and info["launch_bound"] is None
    bench = FakeBenchmark()
    common.record(bench, lambda: time.sleep(1e-3), bytes=10**9, warmup=2, reps=3)
    assert bench.extra_info["host_syncs"] is False and bench.extra_info["launch_bound"] is False
