"""Cross-entropy over rows of logits in Triton, overwriting the logits with their gradient.

For each row x (one chunk of lm_head's output, [vocab] logits) with target t:

    lse  = log(sum_j exp(x_j))                       (fp32, online over blocks of the row)
    loss = lse - x_t                                 (0 where t == ignore_index; NaN where t is
                                                      neither ignore_index nor in [0, vocab))
    grad = exp(x - lse) - onehot(t)                  (0 on ignored rows), written over x

The gradient is d loss_row / d x, unscaled (|grad| <= 1, so fp16 keeps the small probabilities);
the caller applies 1 / n_valid and the upstream gradient. The backward of this op is its own
second pass: the chunked linear cross-entropy (llama_fast/ops/cross_entropy.py) computes it in the
forward and feeds it straight into the two gradient GEMMs, so there is no backward kernel.

Bytes: the row is read twice and written once in the activation dtype, where eager PyTorch's
float() / logsumexp / exp_ / scatter / mask / cast sequence reads and writes fp32 copies of it
about ten times and holds an fp32 [rows, vocab] buffer.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# Columns per loop step of a program (one program per row).
MAX_BLOCK = 4096


def launch_config(vocab: int) -> tuple[int, int]:
    """(BLOCK, num_warps) for rows of `vocab` logits: the one place for these choices."""
    block = min(triton.next_power_of_2(max(vocab, 1)), MAX_BLOCK)
    num_warps = 4 if block <= 1024 else 8
    return block, num_warps


@triton.jit
def cross_entropy_kernel(
    logits_ptr, row_stride,  # [rows, V], last dim contiguous, activation dtype; the gradient is written here
    targets_ptr,  # [rows] int64 class indices (or ignore_index)
    loss_ptr,  # output [rows] fp32: lse - x[target], 0 on ignored rows
    V,  # vocabulary size (columns)
    ignore_index,
    BLOCK: tl.constexpr,  # columns per loop step
    WRITE_GRAD: tl.constexpr,  # False under no_grad: the loss alone, the logits left as they are
):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * row_stride
    cols = tl.arange(0, BLOCK)
    t = tl.load(targets_ptr + row)
    counted = t != ignore_index
    # Pass 1: running max and sum of exp(x - max) over the row, one block at a time, and the target's
    # logit picked on the way (a compare, not a load at an index that could lie past the row).
    m = tl.full([], -float("inf"), dtype=tl.float32)
    s = tl.zeros([], dtype=tl.float32)
    picked = tl.zeros([], dtype=tl.float32)
    for start in range(0, V, BLOCK):
        idx = start + cols
        x = tl.load(base + idx, mask=idx < V, other=-float("inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
        picked += tl.sum(tl.where(idx == t, x, 0.0), axis=0)
    lse = m + tl.log(s)

    in_range = (t >= 0) & (t < V)
    loss = tl.where(in_range, lse - picked, float("nan"))
    tl.store(loss_ptr + row, tl.where(counted, loss, 0.0))

    if WRITE_GRAD:
        # Pass 2: softmax - onehot over the same row (in L2 still), zero on an ignored row.
        for start in range(0, V, BLOCK):
            idx = start + cols
            x = tl.load(base + idx, mask=idx < V, other=0.0).to(tl.float32)
            g = tl.exp(x - lse) - tl.where(idx == t, 1.0, 0.0)
            g = tl.where(counted, g, 0.0)
            tl.store(base + idx, g.to(logits_ptr.dtype.element_ty), mask=idx < V)


def cross_entropy_(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int, write_grad: bool) -> torch.Tensor:
    """Per-row losses (fp32 [rows]) of logits [rows, V] (last dim contiguous) against int64 targets;
    with ``write_grad`` the logits are overwritten by the unscaled gradient."""
    rows, vocab = logits.shape
    loss = torch.empty(rows, dtype=torch.float32, device=logits.device)
    if rows == 0:
        return loss
    block, num_warps = launch_config(vocab)
    cross_entropy_kernel[(rows,)](
        logits, logits.stride(0), targets, loss, vocab, ignore_index,
        BLOCK=block, WRITE_GRAD=write_grad, num_warps=num_warps,
    )
    return loss
