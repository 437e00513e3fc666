"""Linear + cross-entropy without materialising all the logits.

    loss = mean_{i: t_i != ignore} ( logsumexp(h_i W^T) - (h_i W^T)[t_i] )

The rows of h are processed in chunks: for each chunk the logits are formed (GEMM in the
activation dtype, fp32 accumulate), reduced in fp32 to the loss, and turned straight into the
gradients  dlogits = softmax - onehot(t)  ->  dh = dlogits W,  dW += dlogits^T h.
The forward thus does the backward's work and keeps only dh (the size of h) and dW (fp32, the size
of W); the peak extra memory is one chunk of logits instead of [N, vocab] logits plus their
gradient. backward() scales the stored gradients by the incoming scalar gradient.
"""
from __future__ import annotations

import torch

# Rows per chunk: chunk_rows * vocab fp32 logits stay around 256 MiB at vocab 32000 (plus the
# chunk's gradient in the activation dtype while it feeds the two GEMMs).
_CHUNK_ELEMENTS = 64 * 1024 * 1024


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index, with_grad):
        n_rows, vocab = hidden.shape[0], weight.shape[0]
        valid = targets != ignore_index
        n_valid = valid.sum().clamp(min=1).to(torch.float32)
        chunk = max(1, min(n_rows, _CHUNK_ELEMENTS // vocab))
        needs_grad = with_grad  # False under no_grad (evaluation): the loss alone, no gradient buffers
        d_hidden = torch.empty_like(hidden) if needs_grad else None
        d_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if needs_grad else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, n_rows, chunk):
            h = hidden[start : start + chunk]  # (c, d)
            t = targets[start : start + chunk]
            ok = valid[start : start + chunk]
            logits = (h @ weight.t()).float()  # (c, vocab)
            lse = torch.logsumexp(logits, dim=-1)
            safe_t = torch.where(ok, t, torch.zeros_like(t))
            picked = logits.gather(1, safe_t[:, None]).squeeze(1)
            total += ((lse - picked) * ok).sum()
            if needs_grad:
                # softmax - onehot, in place over the logits (no second [c, vocab] buffer). Left
                # unscaled (|g| <= 1) so fp16 keeps the small probabilities: 1/n_valid and the
                # upstream gradient (a loss scale, say) are applied in fp32 in backward().
                grad = logits.sub_(lse[:, None]).exp_()
                del logits  # grad alone holds the fp32 buffer now: the cast below frees it before the GEMMs
                grad.scatter_add_(1, safe_t[:, None], -torch.ones_like(picked)[:, None])
                grad *= ok[:, None]
                grad = grad.to(hidden.dtype)
                d_hidden[start : start + chunk] = grad @ weight
                d_weight += (grad.t() @ h).float()  # (vocab, d): GEMM in the activation dtype
        ctx.save_for_backward(d_hidden, d_weight, n_valid)
        ctx.weight_dtype = weight.dtype
        return total / n_valid

    @staticmethod
    def backward(ctx, grad_loss):
        d_hidden, d_weight, n_valid = ctx.saved_tensors
        scale = grad_loss.float() / n_valid  # fp32: a loss scale of 65536 must not overflow fp16
        dh = (d_hidden.float() * scale).to(d_hidden.dtype) if ctx.needs_input_grad[0] else None
        dw = (d_weight * scale).to(ctx.weight_dtype) if ctx.needs_input_grad[1] else None
        return dh, dw, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100
) -> torch.Tensor:
    """Mean cross-entropy of (hidden @ weight^T) against targets, never holding all the logits.

    hidden: [N, d] (or [..., d]); weight: [vocab, d]; targets: int64 of hidden's leading shape.
    """
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
    with_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    return _LinearCrossEntropy.apply(
        hidden.reshape(-1, hidden.shape[-1]), weight, targets.reshape(-1).long(), ignore_index, with_grad
    )
