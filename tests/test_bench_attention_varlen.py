"""benchmarks/bench_attention_varlen.py's pure parts and its check before timing, on the CPU."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
bench = pytest.importorskip("bench_attention_varlen", reason="benchmarks/bench_attention_varlen.py imports its helpers")


@pytest.mark.parametrize("mix", bench.MIXES)
def test_mixtures_fill_the_token_budget(mix):
    lengths = bench.lengths_of(mix)
    assert sum(lengths) == bench.TOKENS and min(lengths) >= 1
    if mix == "longtail":
        assert max(lengths) > 8 * sorted(lengths)[len(lengths) // 2]  # a tail well past the median


def test_flops_count_each_documents_causal_half():
    assert bench.flops_forward([1], heads=1, head_dim=1) == 4
    assert bench.flops_forward([3, 2], heads=2, head_dim=8) == 4 * 2 * 8 * (6 + 3)


def test_check_accepts_the_block_diagonal_peer_and_refuses_a_leaking_one(monkeypatch):
    from llama_fast import reference

    q, k, v, cu, _, _ = bench.make_inputs([5, 9, 2], heads=4, head_dim=32, device="cpu")
    cos, sin = reference.rope_tables(16, 32)
    dout = torch.randn_like(q)
    bench.check("sdpa-blockdiag", q, k, v, cu, cos, sin, dout)
    whole = torch.tensor([0, 16], dtype=torch.int32)  # one causal run: attends across the documents
    real = bench.forward_fn
    monkeypatch.setattr(bench, "forward_fn", lambda p, q, k, v, cu, cos, sin: real(p, q, k, v, whole, cos, sin))
    with pytest.raises(AssertionError, match="sdpa-blockdiag out"):
        bench.check("sdpa-blockdiag", q, k, v, cu, cos, sin, dout)
