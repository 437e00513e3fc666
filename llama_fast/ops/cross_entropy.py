"""Linear + cross-entropy without materialising all the logits.

    loss = mean_{i: t_i != ignore} ( logsumexp(h_i W^T) - (h_i W^T)[t_i] )   (or the sum: reduction="sum")

The rows of h are processed in chunks: for each chunk the logits are formed (GEMM in the
activation dtype, fp32 accumulate), reduced in fp32 to the loss, and turned in place into the
gradients  dlogits = softmax - onehot(t)  ->  dh = dlogits W,  dW += dlogits^T h.
The reduction and the in-place gradient are one op, ``llama_fast::cross_entropy_rows_``: a Triton
kernel (kernels/cross_entropy.py: two reads and one write of the chunk in the activation dtype)
where Triton runs, PyTorch math elsewhere.
The forward thus does the backward's work and keeps only dh (the size of h) and dW (fp32, the size
of W); the peak extra memory is one chunk of logits instead of [N, vocab] logits plus their
gradient. backward() scales the stored gradients by the incoming scalar gradient.
"""
from __future__ import annotations

import torch

from ._common import check_float, check_same_device, triton_runs_on

# Rows per chunk: chunk_rows * vocab logits, 128 MiB in bf16 at vocab 32000 (which become the
# chunk's gradient in place and feed the two GEMMs).
_CHUNK_ELEMENTS = 64 * 1024 * 1024


@torch.library.custom_op("llama_fast::cross_entropy_rows_", mutates_args=("logits",))
def cross_entropy_rows_(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int, write_grad: bool) -> torch.Tensor:
    """Per-row cross-entropy (fp32 [rows]; 0 where targets == ignore_index, NaN for a target outside
    [0, vocab)) of logits [rows, vocab] (last dim contiguous). With ``write_grad`` the logits are
    overwritten by the unscaled gradient softmax - onehot(target), zero on ignored rows."""
    targets = _check_rows_inputs(logits, targets)
    if triton_runs_on(logits.device):
        from llama_fast.kernels import cross_entropy as kernels

        return kernels.cross_entropy_(logits, targets, ignore_index, write_grad)
    x = logits.float()  # (rows, vocab)
    lse = torch.logsumexp(x, dim=-1)
    counted = targets != ignore_index
    in_range = (targets >= 0) & (targets < logits.shape[1])
    safe = torch.where(counted & in_range, targets, torch.zeros_like(targets))
    picked = x.gather(1, safe[:, None]).squeeze(1)
    loss = torch.where(in_range, lse - picked, torch.full_like(lse, float("nan")))
    loss = torch.where(counted, loss, torch.zeros_like(lse))
    if write_grad:
        grad = (x - lse[:, None]).exp_()
        grad.scatter_add_(1, safe[:, None], -(counted & in_range).to(grad.dtype)[:, None])
        logits.copy_(grad * counted[:, None])
    return loss


@cross_entropy_rows_.register_fake
def _(logits, targets, ignore_index, write_grad):
    _check_rows_inputs(logits, targets)
    return logits.new_empty(logits.shape[0], dtype=torch.float32)


def _check_rows_inputs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """cross_entropy_rows_'s layout (the kernel indexes rows by logits.stride(0) and reads targets
    densely); returns the targets, contiguous."""
    if logits.dim() != 2 or logits.stride(1) != 1:
        raise ValueError(
            f"logits must be [rows, vocab] with a contiguous last dim, got shape {tuple(logits.shape)} and strides "
            f"{tuple(logits.stride())}"
        )
    if targets.shape != logits.shape[:1] or targets.is_floating_point() or targets.is_complex():
        raise ValueError(
            f"targets must be [rows={logits.shape[0]}] integer class indices, got shape {tuple(targets.shape)} "
            f"and dtype {targets.dtype}"
        )
    return targets.contiguous()


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index, with_grad, reduction):
        n_rows, vocab = hidden.shape[0], weight.shape[0]
        if reduction == "mean":
            n_valid = (targets != ignore_index).sum().clamp(min=1).to(torch.float32)
        else:  # "sum": the caller divides (Hugging Face's num_items_in_batch, counted over micro-batches)
            n_valid = torch.ones((), dtype=torch.float32, device=hidden.device)
        chunk = max(1, min(n_rows, _CHUNK_ELEMENTS // vocab))
        needs_grad = with_grad  # False under no_grad (evaluation): the loss alone, no gradient buffers
        d_hidden = torch.empty_like(hidden) if needs_grad else None
        d_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if needs_grad else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, n_rows, chunk):
            h = hidden[start : start + chunk]  # (c, d)
            logits = h @ weight.t()  # (c, vocab), activation dtype
            total += cross_entropy_rows_(logits, targets[start : start + chunk], ignore_index, needs_grad).sum()
            if needs_grad:
                # logits now holds softmax - onehot, left unscaled (|g| <= 1) so fp16 keeps the small
                # probabilities: 1/n_valid and the upstream gradient (a loss scale, say) are applied
                # in fp32 in backward().
                d_hidden[start : start + chunk] = logits @ weight
                d_weight += logits.t() @ h  # (vocab, d): GEMM in the activation dtype, added in fp32 (no fp32 copy)
        ctx.save_for_backward(d_hidden, d_weight, n_valid)
        ctx.weight_dtype = weight.dtype
        return total / n_valid

    @staticmethod
    def backward(ctx, grad_loss):
        d_hidden, d_weight, n_valid = ctx.saved_tensors
        scale = grad_loss.float() / n_valid  # fp32: a loss scale of 65536 must not overflow fp16
        dh = (d_hidden.float() * scale).to(d_hidden.dtype) if ctx.needs_input_grad[0] else None
        dw = (d_weight * scale).to(ctx.weight_dtype) if ctx.needs_input_grad[1] else None
        return dh, dw, None, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = -100,
    *,
    validate: bool = True,
    reduction: str = "mean",
) -> torch.Tensor:
    """Mean (or with ``reduction="sum"`` the sum) cross-entropy of (hidden @ weight^T) against targets,
    never holding all the logits.

    hidden: [N, d] (or [..., d]); weight: [vocab, d]; targets: int64 of hidden's leading shape.
    ``validate`` checks that every target is in [0, vocab) or ignore_index, at the cost of one
    device sync; a caller that has checked them already (Llama.forward does, with the tokens) may
    skip it. An unchecked target outside the vocabulary gives a NaN loss, never a wrong read.
    """
    check_float("hidden", hidden)
    check_float("weight", weight)
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"targets must be a torch.Tensor, got {type(targets).__name__}")
    check_same_device("hidden", hidden, "weight", weight)
    check_same_device("hidden", hidden, "targets", targets)
    if hidden.shape[-1] != weight.shape[-1] or weight.dim() != 2:
        raise ValueError(
            f"weight must be [vocab, {hidden.shape[-1]}] to match hidden's last dim, got {tuple(weight.shape)}"
        )
    if targets.shape != hidden.shape[:-1]:
        raise ValueError(f"targets must have shape {tuple(hidden.shape[:-1])}, got {tuple(targets.shape)}")
    if targets.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"targets must be int64 or int32 class indices, got {targets.dtype}")
    if hidden.dtype != weight.dtype:
        raise TypeError(f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must share a dtype")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    vocab = weight.shape[0]
    # One device sync (none when compiling or tracing on meta): the kernel would only give a NaN loss.
    if validate and not torch.compiler.is_compiling() and targets.device.type != "meta":
        outside = (targets != ignore_index) & ((targets < 0) | (targets >= vocab))
        if outside.any():
            raise ValueError(
                f"targets must be class indices in [0, {vocab}) or ignore_index={ignore_index}, "
                f"got {targets[outside][:5].tolist()} (first of {int(outside.sum())} outside)"
            )
    with_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    return _LinearCrossEntropy.apply(
        hidden.reshape(-1, hidden.shape[-1]), weight, targets.reshape(-1).long(), ignore_index, with_grad, reduction
    )
