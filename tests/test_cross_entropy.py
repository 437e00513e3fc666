"""linear_cross_entropy (chunked lm_head + loss) against F.cross_entropy on full logits, and its
per-row op llama_fast::cross_entropy_rows_ (Triton kernel in the interpreter, PyTorch math elsewhere)."""
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


@pytest.fixture(params=["triton", "torch"])
def impl(request, monkeypatch):
    """Both implementations of cross_entropy_rows_: the Triton kernel (interpreter on CPU) and the
    PyTorch math used where Triton cannot run."""
    if request.param == "torch":
        monkeypatch.setattr(ce, "triton_runs_on", lambda device: False)
    elif not ce.triton_runs_on(torch.device("cpu")):
        pytest.skip("the Triton kernel runs on CPU only under TRITON_INTERPRET=1 (set by conftest.py)")
    return request.param


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("rows, dim, vocab", [(1, 16, 7), (37, 24, 301), (130, 64, 1000)])
def test_matches_full_logits(monkeypatch, impl, dtype, rows, dim, vocab):
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


def test_sum_reduction_is_the_sum_over_counted_rows():
    """reduction="sum" (Hugging Face's num_items_in_batch divides it by a count over micro-batches)."""
    h = torch.randn(13, 8, requires_grad=True)
    w = torch.randn(11, 8, requires_grad=True)
    t = torch.randint(0, 11, (13,))
    t[::4] = -100
    ce.linear_cross_entropy(h, w, t, reduction="sum").backward()
    h2, w2 = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    F.cross_entropy(h2 @ w2.t(), t, ignore_index=-100, reduction="sum").backward()
    torch.testing.assert_close(h.grad, h2.grad)
    torch.testing.assert_close(w.grad, w2.grad)
    with pytest.raises(ValueError, match="reduction must be 'mean' or 'sum', got 'none'"):
        ce.linear_cross_entropy(h, w, t, reduction="none")


def test_no_grad_computes_the_loss_alone(monkeypatch):
    """Evaluation under no_grad must not pay for the softmax gradient or the dW buffer."""
    calls = []
    real = ce.cross_entropy_rows_
    monkeypatch.setattr(ce, "cross_entropy_rows_", lambda *a: calls.append(a[3]) or real(*a))
    h, w, t = torch.randn(20, 8, requires_grad=True), torch.randn(11, 8, requires_grad=True), torch.randint(0, 11, (20,))
    with torch.no_grad():
        loss = ce.linear_cross_entropy(h, w, t)
    assert calls == [False] and not loss.requires_grad
    torch.testing.assert_close(loss, full_logits_loss(h, w, t).detach())
    ce.linear_cross_entropy(h, w, t)
    assert calls == [False, True], "with gradients enabled the forward computes them"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("rows, vocab", [(1, 1), (5, 7), (9, 4096), (6, 5000)])  # one, several blocks
def test_rows_op_against_autograd(impl, dtype, rows, vocab):
    """Loss per row and, written over the logits, d loss_row / d logits: against fp64 autograd."""
    x = torch.randn(rows, vocab) * 4
    t = torch.randint(0, vocab, (rows,))
    t[1::3] = -100  # ignored rows: loss 0, gradient 0

    def reference(x):
        x = x.detach().requires_grad_()
        loss = F.cross_entropy(x, t, ignore_index=-100, reduction="none")
        loss.sum().backward()
        return loss.detach(), x.grad

    hi, lo = reference(x.double()), reference(x.to(dtype).float() if dtype == torch.float16 else x)
    logits = x.to(dtype)
    logits_before = logits.clone()
    loss = ce.cross_entropy_rows_(logits, t, -100, False)
    assert torch.equal(logits, logits_before), "write_grad=False must leave the logits alone"
    loss_again = ce.cross_entropy_rows_(logits, t, -100, True)
    assert loss.dtype == torch.float32 and torch.equal(loss, loss_again)
    floor = default_floor(dtype)
    assert_within_2x("loss", loss, hi[0], lo[0], floor=floor)
    # The fp16 gradient is rounded once more than PyTorch's (whose gradient here stays fp32).
    assert_within_2x("grad", logits.float(), hi[1], lo[1].to(dtype).float(), floor=floor)
    assert torch.all(logits[1::3] == 0) and torch.all(loss[1::3] == 0)


def test_rows_op_reads_a_row_stride(impl):
    """A [rows, vocab] view with a row stride larger than vocab (a slice of wider logits); the
    columns past the view are left alone."""
    wide = torch.randn(4, 40)
    original = wide.clone()
    logits = wide[:, :33]
    t = torch.randint(0, 33, (4,))
    expected_loss = F.cross_entropy(original[:, :33], t, reduction="none")
    expected_grad = torch.softmax(original[:, :33], dim=1) - F.one_hot(t, 33)
    loss = ce.cross_entropy_rows_(logits, t, -100, True)
    torch.testing.assert_close(loss, expected_loss)
    torch.testing.assert_close(wide[:, :33], expected_grad)
    assert torch.equal(wide[:, 33:], original[:, 33:])


def test_rows_op_target_outside_the_vocabulary_gives_nan_not_a_read_out_of_bounds(impl):
    logits = torch.randn(3, 10)
    loss = ce.cross_entropy_rows_(logits, torch.tensor([2, 10, -7]), -100, True)
    assert torch.isfinite(loss[0]) and torch.isnan(loss[1]) and torch.isnan(loss[2])


def test_validate_false_skips_the_sync_and_gives_nan_for_a_target_outside():
    h, w = torch.randn(4, 8), torch.randn(10, 8)
    t = torch.tensor([1, 10, -100, 3])
    with pytest.raises(ValueError, match="targets must be class indices"):
        ce.linear_cross_entropy(h, w, t)
    assert torch.isnan(ce.linear_cross_entropy(h, w, t, validate=False))


def test_opcheck():
    logits = torch.randn(6, 37)
    t = torch.randint(0, 37, (6,))
    t[2] = -100
    for write_grad in (False, True):
        torch.library.opcheck(torch.ops.llama_fast.cross_entropy_rows_, (logits.clone(), t, -100, write_grad))


def test_bad_input():
    with pytest.raises(ValueError, match="weight must be"):
        ce.linear_cross_entropy(torch.randn(4, 8), torch.randn(10, 7), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="targets must have shape"):
        ce.linear_cross_entropy(torch.randn(4, 8), torch.randn(10, 8), torch.zeros(5, dtype=torch.long))
    with pytest.raises(TypeError, match="targets must be int64"):
        ce.linear_cross_entropy(torch.randn(4, 8), torch.randn(10, 8), torch.zeros(4))
    with pytest.raises(TypeError, match="hidden must be float32, float16 or bfloat16, got torch.int64"):
        ce.linear_cross_entropy(torch.ones(4, 8, dtype=torch.long), torch.randn(10, 8), torch.zeros(4, dtype=torch.long))
    with pytest.raises(TypeError, match="weight must be a torch.Tensor, got list"):
        ce.linear_cross_entropy(torch.randn(4, 8), [[0.0] * 8], torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"weight must be on the device of hidden \(cpu\), got meta"):
        ce.linear_cross_entropy(torch.randn(4, 8), torch.randn(10, 8, device="meta"), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"targets must be on the device of hidden \(cpu\), got meta"):
        ce.linear_cross_entropy(torch.randn(4, 8), torch.randn(10, 8), torch.zeros(4, dtype=torch.long, device="meta"))
    with pytest.raises(ValueError, match=r"targets must be class indices in \[0, 10\) or ignore_index=-100, got \[10, -3\]"):
        ce.linear_cross_entropy(torch.randn(4, 8), torch.randn(10, 8), torch.tensor([1, 10, -100, -3]))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_matches_full_logits_on_the_gpu(monkeypatch, dtype):
    """The Triton kernel compiled (bf16 never runs in the interpreter), lm_head's vocabulary size."""
    monkeypatch.setattr(ce, "_CHUNK_ELEMENTS", 32000 * 100)  # several chunks, the last one partial
    rows, dim, vocab = 333, 256, 32000
    h, w = torch.randn(rows, dim, device="cuda"), torch.randn(vocab, dim, device="cuda") / dim**0.5
    t = torch.randint(0, vocab, (rows,), device="cuda")
    t[::7] = -100
    hi = grads(full_logits_loss, h.double(), w.double(), t, torch.float64)
    lo = grads(full_logits_loss, h, w, t, dtype)
    ours = grads(ce.linear_cross_entropy, h, w, t, dtype)
    for name, a, b, c in zip(("loss", "dhidden", "dweight"), ours, hi, lo):
        assert_within_2x(name, a.float(), b.float(), c.float(), floor=default_floor(dtype))


def test_rows_op_checks_its_layout(impl):
    """The op is public (torch.ops.llama_fast.cross_entropy_rows_): strided targets are read as such, and
    logits whose last dim is strided (which the kernel cannot overwrite in place) are refused, where
    the kernel silently read the wrong elements of both."""
    x, t = torch.randn(4, 10), torch.randint(0, 10, (8,))
    torch.testing.assert_close(ce.cross_entropy_rows_(x.clone(), t[::2], -100, False),
                               F.cross_entropy(x, t[::2], reduction="none"))
    with pytest.raises(ValueError, match=r"logits must be \[rows, vocab\] with a contiguous last dim, got shape "
                                         r"\(4, 10\) and strides \(1, 4\)"):
        ce.cross_entropy_rows_(torch.randn(10, 4).t(), t[:4], -100, False)
    with pytest.raises(ValueError, match=r"targets must be \[rows=4\] integer class indices, got shape \(5,\)"):
        ce.cross_entropy_rows_(x.clone(), t[:5], -100, False)
