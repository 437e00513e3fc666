"""linear_cross_entropy (chunked lm_head + loss) against F.cross_entropy on full logits."""
import pytest
import torch
import torch.nn.functional as F

import llama_fast.ops.cross_entropy as ce
from llama_fast.testing import assert_within_2x, default_floor


def full_logits_loss(h, w, t):
    return F.cross_entropy((h @ w.t()).float(), t, ignore_index=-100)


def grads(fn, h, w, t, dtype):
    h = h.detach().to(dtype).requires_grad_()
    w = w.detach().to(dtype).requires_grad_()
    loss = fn(h, w, t)
    loss.backward()
    return loss.detach(), h.grad, w.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("rows, dim, vocab", [(1, 16, 7), (37, 24, 301), (130, 64, 1000)])
def test_matches_full_logits(monkeypatch, dtype, rows, dim, vocab):
    monkeypatch.setattr(ce, "_CHUNK_ELEMENTS", vocab * 16)  # several chunks, the last one partial
    h, w = torch.randn(rows, dim), torch.randn(vocab, dim) / dim**0.5
    t = torch.randint(0, vocab, (rows,))
    t[::5] = -100
    if rows == 1:
        t[0] = 3
    hi = grads(full_logits_loss, h, w, t, torch.float64)
    lo = grads(full_logits_loss, h, w, t, dtype)
    ours = grads(ce.linear_cross_entropy, h, w, t, dtype)
    for name, a, b, c in zip(("loss", "dhidden", "dweight"), ours, hi, lo):
        assert a.dtype == dtype if name != "loss" else a.dtype == torch.float32
        assert_within_2x(name, a, b, c, floor=default_floor(dtype))


def test_scales_with_upstream_gradient():
    h = torch.randn(9, 8, requires_grad=True)
    w = torch.randn(11, 8, requires_grad=True)
    t = torch.randint(0, 11, (9,))
    (3.0 * ce.linear_cross_entropy(h, w, t)).backward()
    h2, w2 = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    (3.0 * full_logits_loss(h2, w2, t)).backward()
    torch.testing.assert_close(h.grad, h2.grad)
    torch.testing.assert_close(w.grad, w2.grad)


def test_fp16_with_a_loss_scale():
    """GradScaler multiplies the loss by 65536: the fp16 gradients must stay finite and accurate."""
    h, w = torch.randn(64, 32), torch.randn(500, 32) / 32**0.5
    t = torch.randint(0, 500, (64,))
    scaled = lambda fn: (lambda h, w, t: fn(h, w, t) * 65536.0)  # noqa: E731
    hi = grads(scaled(full_logits_loss), h, w, t, torch.float64)
    lo = grads(scaled(full_logits_loss), h, w, t, torch.float16)
    ours = grads(scaled(ce.linear_cross_entropy), h, w, t, torch.float16)
    for name, a, b, c in zip(("loss", "dhidden", "dweight"), ours, hi, lo):
        # No absolute slack to speak of: at this scale the gradients are O(1..100).
        assert_within_2x(name, a.float(), b.float(), c.float(), floor=1e-3)


def test_no_grad_computes_the_loss_alone(monkeypatch):
    """Evaluation under no_grad must not pay for the softmax gradient or the dW buffer."""
    softmaxes = []  # the gradient's softmax is an in-place exp_ over the logits
    real = torch.Tensor.exp_
    monkeypatch.setattr(torch.Tensor, "exp_", lambda *a, **k: softmaxes.append(1) or real(*a, **k))
    h, w, t = torch.randn(20, 8, requires_grad=True), torch.randn(11, 8, requires_grad=True), torch.randint(0, 11, (20,))
    with torch.no_grad():
        loss = ce.linear_cross_entropy(h, w, t)
    assert softmaxes == [] and not loss.requires_grad
    torch.testing.assert_close(loss, full_logits_loss(h, w, t).detach())
    ce.linear_cross_entropy(h, w, t)
    assert softmaxes, "with gradients enabled the forward computes them"


def test_bad_input():
    with pytest.raises(ValueError, match="weight must be"):
        ce.linear_cross_entropy(torch.randn(4, 8), torch.randn(10, 7), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="targets must have shape"):
        ce.linear_cross_entropy(torch.randn(4, 8), torch.randn(10, 8), torch.zeros(5, dtype=torch.long))
    with pytest.raises(TypeError, match="targets must be int64"):
        ce.linear_cross_entropy(torch.randn(4, 8), torch.randn(10, 8), torch.zeros(4))
