"""What the fused model keeps for backward, and the CPU estimate of issue #5's memory target.

Everything runs on the meta device (shapes, no data) through benchmarks/estimate_memory.py, the
code behind the printed estimate: a regression guard against an activation saved by accident, and
the CPU evidence for "1B, batch 4 x 2048, bf16, fused AdamW: peak <= 24 GiB" before a GPU sees it.
"""
from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.distributed._tools.mem_tracker import MemTracker

from llama_fast import Llama, LlamaConfig
from llama_fast import _extension

REPO = Path(__file__).resolve().parents[1]
ESTIMATE_PY = REPO / "benchmarks" / "estimate_memory.py"
spec = importlib.util.spec_from_file_location("estimate_memory", ESTIMATE_PY)
em = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = em  # dataclasses look their module up there
spec.loader.exec_module(em)

pytestmark = pytest.mark.skipif(
    not _extension.AVAILABLE, reason=f"the estimate traces the compiled ops' fake kernels; _C: {_extension.LOAD_ERROR}"
)

# Odd sizes, GQA 3:1, head_dim 22; the sequence length 37 is prime and divides no other size, so a
# storage whose element count is a multiple of 37^2 can only hold seq x seq scores.
ODD = LlamaConfig(dim=132, n_layers=3, n_heads=6, n_kv_heads=2, vocab_size=173, ffn_hidden=200, max_seq_len=64)
BATCH, SEQ = 3, 37

ISSUE_5_TARGET_GIB = 24


@pytest.fixture(scope="module")
def saved():
    """backend (and "fused-cheap": recompute="cheap") -> SavedReport of one bf16 forward of ODD at BATCH x SEQ."""
    tokens = torch.zeros((BATCH, SEQ + 1), dtype=torch.long, device="meta")
    reports = {b: em.saved_for_backward(em.build_meta_model(ODD, b), tokens) for b in em.BACKENDS}
    reports["fused-cheap"] = em.saved_for_backward(em.build_meta_model(ODD, "fused", recompute="cheap"), tokens)
    return reports


def fused_layer_budget(c: LlamaConfig) -> dict[str, int]:
    """Bytes per token one block needs for its backward, from the op contracts (shared/design.md):
    bf16 activations (2 B), fp32 statistics (4 B)."""
    act, stat = 2, 4
    return {
        "residual-stream input x (rms_norm's x)": act * c.dim,
        "rstd of attn_norm (one fp32 per row)": stat,
        "normed x (input of wqkv)": act * c.dim,
        "q, k, v unrotated (one GEMM output)": act * (c.n_heads + 2 * c.n_kv_heads) * c.head_dim,
        "attention out O (delta's operand, input of wo)": act * c.n_heads * c.head_dim,
        # Two fp32 per head since issue 13 item 6: the row max m2 and log2 of the row sum, kept apart
        # (one LSE = m + log(l) in fp32 lost the low bits of S - m the backward needs for large scores).
        "row stats m2, log2l (two fp32 per head)": 2 * stat * c.n_heads,
        "add_rms_norm's sum h = x + attn": act * c.dim,
        "rstd of mlp_norm": stat,
        "normed h (input of w_gate_up)": act * c.dim,
        "gate_up (swiglu's input, silu recomputed)": act * 2 * c.ffn_hidden,
        "swiglu output (input of w_down)": act * c.ffn_hidden,
    }


def test_fused_layer_saves_no_more_than_the_op_contracts(saved):
    report = saved["fused"]
    per_layer = report.per_layer_bytes()
    assert len(set(per_layer)) == 1, f"blocks save different amounts: {per_layer}"
    budget = fused_layer_budget(ODD)
    got = report.per_layer_per_token()
    listing = "\n".join(f"  {t.module} {t.shape} {t.dtype} {t.storage_bytes / report.tokens:.1f} B/token"
                        for t in report.layer(0))
    assert got <= sum(budget.values()), (
        f"a fused block saves {got:.1f} B/token, over the budget {sum(budget.values())} = {budget}; "
        f"it saves:\n{listing}"
    )
    reference = saved["reference"].per_layer_per_token()
    assert got < reference, f"fused {got:.1f} B/token is not below the reference backend's {reference:.1f}"


# What recompute="cheap" recomputes in the backward instead of saving (llama_fast.ops.recompute); the
# norms' rstd come back with their outputs, so they are not saved either.
RECOMPUTED = ("normed x (input of wqkv)", "normed h (input of w_gate_up)", "swiglu output (input of w_down)",
              "rstd of attn_norm (one fp32 per row)", "rstd of mlp_norm")


def test_cheap_recompute_saves_neither_the_norm_nor_the_swiglu_outputs(saved):
    """A regression guard for the selective recompute: a block under recompute="cheap" saves at least
    the normed inputs of wqkv and w_gate_up and the SwiGLU output (2 dim + ffn activations per token)
    less than without, and no more than the budget without them."""
    cheap, none = saved["fused-cheap"], saved["fused"]
    per_layer = cheap.per_layer_bytes()
    assert len(set(per_layer)) == 1, f"blocks save different amounts: {per_layer}"
    budget = fused_layer_budget(ODD)
    recomputed = sum(budget[k] for k in RECOMPUTED)
    listing = "\n".join(f"  {t.module} {t.shape} {t.dtype} {t.storage_bytes / cheap.tokens:.1f} B/token"
                        for t in cheap.layer(0))
    got, without = cheap.per_layer_per_token(), none.per_layer_per_token()
    assert got <= sum(budget.values()) - recomputed, f"recompute='cheap' saves {got:.1f} B/token:\n{listing}"
    assert without - got >= recomputed, (
        f"recompute='cheap' saves {got:.1f} B/token, only {without - got:.1f} less than none ({without:.1f}); "
        f"expected at least {recomputed} less; it saves:\n{listing}"
    )
    # The rest of the model is untouched: embedding and head save what they save without recompute.
    for where in ("embed", "head"):
        assert cheap.bytes_in(where) == none.bytes_in(where)


def test_no_saved_tensor_holds_seq_by_seq_scores(saved):
    def scores(report):
        return [
            t for t in report.tensors
            if sum(d == SEQ for d in t.shape) >= 2
            or (t.storage_bytes > 0 and (t.storage_bytes // t.dtype.itemsize) % (SEQ * SEQ) == 0)
        ]

    assert scores(saved["fused"]) == [], "the fused attention saves seq x seq scores"
    assert scores(saved["fused-cheap"]) == [], "the fused attention saves seq x seq scores under recompute='cheap'"
    # The check can fail: the reference attention does save its probabilities.
    assert scores(saved["reference"]), "the seq x seq detector missed the reference backend's saved scores"


def test_adamw_state_layout_matches_a_real_fused_step():
    """fused_adamw_with_state builds the state a real fused AdamW step creates (CPU, bf16)."""
    torch.manual_seed(0)
    tiny = LlamaConfig.from_name("tiny")
    real = Llama(tiny).to(torch.bfloat16)
    ours = Llama(tiny).to(torch.bfloat16)
    opt = torch.optim.AdamW(real.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    tokens = torch.randint(0, tiny.vocab_size, (2, 9))
    real(tokens[:, :-1], tokens[:, 1:])[1].backward()
    opt.step()
    built = em.fused_adamw_with_state(ours)

    def layout(o):
        return [
            {k: (v.shape, v.dtype, v.device, v.numel() * v.element_size()) for k, v in o.state[p].items()}
            for group in o.param_groups for p in group["params"]
        ]

    assert layout(built) == layout(opt)


def test_cuda_scratch_is_counted_next_to_the_outputs():
    """Under MemTracker, CudaScratch adds the attention backward's workspace to that op's moment."""
    B, S, Hq, Hkv, D = 2, 37, 6, 2, 22
    meta = dict(device="meta", dtype=torch.bfloat16)
    q, dout, out = (torch.empty(B, S, Hq, D, **meta) for _ in range(3))
    k, v = (torch.empty(B, S, Hkv, D, **meta) for _ in range(2))
    lse = torch.empty(2, B, Hq, S, device="meta")  # the row stats m2, log2l
    cos = sin = torch.empty(S, D // 2, device="meta")

    def peak(mode):
        mt = MemTracker()
        mt.track_external(q, dout, out, k, v, lse, cos, sin)
        with mt:
            if mode is None:
                grads = torch.ops.llama_fast.attention_backward(dout, q, k, v, out, lse, cos, sin, True, False)
            else:
                with mode:
                    grads = torch.ops.llama_fast.attention_backward(dout, q, k, v, out, lse, cos, sin, True, False)
        assert [g.shape for g in grads] == [q.shape, k.shape, v.shape]
        return em._meta(mt.get_tracker_snapshot("peak"))["Total"]

    scratch = em.CudaScratch()
    extra = peak(scratch) - peak(None)
    floats = em.attention_backward_workspace_floats(B, S, Hq, Hkv, D, deterministic=False)
    assert scratch.largest.op == "attention_backward"
    assert extra == scratch.largest.bytes == 4 * sum(floats.values()) > 0


def _nvcc() -> str | None:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    candidate = Path(home, "bin", "nvcc") if home else None
    return str(candidate) if candidate and candidate.exists() else shutil.which("nvcc")


WORKSPACE_MAIN = r"""
#include <cstdio>
#include <cstdlib>
#include "llama_fast.h"
int main(int argc, char** argv) {  // B S Hq Hkv D deterministic -> fp32 elements of the workspace
  llama_fast::AttentionBackwardArgs a{};
  a.batch = atoll(argv[1]); a.seq_len = atoll(argv[2]); a.num_heads = atoll(argv[3]);
  a.num_kv_heads = atoll(argv[4]); a.head_dim = atoll(argv[5]); a.deterministic = atoi(argv[6]) != 0;
  a.causal = true;
  printf("%lld\n", (long long)llama_fast::attention_backward_cuda_workspace(a));
}
"""


@pytest.mark.skipif(_nvcc() is None, reason="comparing with the CUDA workspace formula needs nvcc (no GPU)")
def test_attention_workspace_formula_matches_the_cuda_source(tmp_path):
    """The estimate's copy of workspace_layout() against the real one, compiled from
    csrc/cuda/attention_backward.cu (PTX only, host code run; no GPU needed)."""
    (tmp_path / "main.cpp").write_text(WORKSPACE_MAIN)
    exe = tmp_path / "workspace"
    sources = [str(tmp_path / "main.cpp"), str(REPO / "csrc" / "cuda" / "attention_backward.cu")]
    built = subprocess.run(
        [_nvcc(), "-std=c++17", "-gencode", "arch=compute_80,code=compute_80", "--expt-relaxed-constexpr",
         f"-I{REPO / 'csrc'}", "-o", str(exe), *sources],
        capture_output=True, text=True,
    )
    assert built.returncode == 0, built.stdout + built.stderr
    cases = [(4, 2048, 32, 4, 64, False), (4, 2048, 32, 4, 64, True), (3, 37, 6, 2, 22, False),
             (1, 1, 1, 1, 2, False), (2, 113, 8, 1, 256, True), (5, 1023, 12, 4, 128, False)]
    for case in cases:
        out = subprocess.run([str(exe), *(str(int(x)) for x in case)], check=True, capture_output=True, text=True)
        assert int(out.stdout) == sum(em.attention_backward_workspace_floats(*case).values()), case


@pytest.fixture(scope="module")
def estimates_1b():
    """recompute mode -> the estimate of the fused 1B step at batch 4 x 2048."""
    return {r: em.estimate(LlamaConfig.from_name("1B"), "fused", 4, 2048, recompute=r) for r in ("none", "cheap")}


def test_1b_training_step_estimate_is_within_issue_5_target(estimates_1b):
    est = estimates_1b["none"]
    text = em.report(est)
    # Everything saved is alive when the forward ends, next to the parameters and the AdamW state.
    assert est.peak >= est.params + est.opt_state + est.saved.total, text
    assert est.largest_scratch is not None and est.largest_scratch.op == "attention_backward", text
    assert est.peak <= ISSUE_5_TARGET_GIB * em.GIB, text


def test_1b_estimate_with_cheap_recompute_is_lower_by_the_recomputed_activations(estimates_1b):
    config = LlamaConfig.from_name("1B")
    none, cheap = estimates_1b["none"], estimates_1b["cheap"]
    budget = fused_layer_budget(config)
    recomputed_per_token = sum(budget[k] for k in RECOMPUTED)  # 2 * (2 * 2048 + 5632) + 2 * 4 = 19,464
    saved_less = none.saved.total - cheap.saved.total
    assert saved_less == recomputed_per_token * 4 * 2048 * config.n_layers, em.report(cheap)
    # Both peaks fall at the end of the forward, where everything saved is alive.
    assert none.peak - cheap.peak == saved_less, em.report(cheap)


def test_cli_recompute_cheap_estimates_the_fused_backend_only(capsys):
    """--recompute cheap without --backend estimates the fused backend (the reference one cannot run
    it) instead of printing the fused report and then dying on the reference one; naming the
    reference backend is a usage error."""
    if not _extension.has_kernel("meta"):
        pytest.skip("the estimate needs the extension's meta kernels")
    assert em.main(["--flavor", "tiny", "--batch", "1", "--seq", "16", "--recompute", "cheap"]) == 0
    out = capsys.readouterr().out
    assert "== backend fused, recompute cheap" in out and "backend reference" not in out
    with pytest.raises(SystemExit):
        em.main(["--flavor", "tiny", "--batch", "1", "--seq", "16", "--recompute", "cheap", "--backend", "reference"])
    assert "--recompute cheap needs the fused backend" in capsys.readouterr().err


def test_cli_prints_what_was_asked_labelled(capsys):
    """No --backend: the fused estimate only (the reference one, 143 GiB for 1B, used to be printed last, as if it
    were the answer); several: one labelled line each, at the end. Flavors in any case."""
    if not _extension.has_kernel("meta"):
        pytest.skip("the estimate needs the extension's meta kernels")
    assert em.main(["--flavor", "TINY", "--batch", "1", "--seq", "16"]) == 0
    out = capsys.readouterr().out
    assert "backend reference" not in out
    assert re.search(r"ESTIMATED PEAK +[\d.]+ GiB +\(backend fused, recompute none, batch 1 x seq 16\)", out), out
    assert em.main(["--flavor", "tiny", "--batch", "1", "--seq", "16", "--backend", "fused", "--backend",
                    "reference"]) == 0
    tail = capsys.readouterr().out.strip().splitlines()[-2:]
    assert [line.split("(")[1] for line in tail] == ["tiny, backend fused, recompute none, batch 1 x seq 16)",
                                                    "tiny, backend reference, recompute none, batch 1 x seq 16)"]
    with pytest.raises(SystemExit):
        em.main(["--flavor", "2b"])
    assert "unknown --flavor '2b'" in capsys.readouterr().err
