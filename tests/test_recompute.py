"""llama_fast.ops' selective-recompute functions against the reference composition (outputs, every
gradient, 2x rule), what they save for the backward, autocast, torch.compile, errors; the trainer's
model.recompute; recompute="cheap" against "none" under FSDP2 and DDP (gloo, two processes)."""

import pytest
import torch
import torch.nn.functional as F
from torchrun_helpers import run_script
from op_check import check_op, fallback_backward, poison_empty  # noqa: F401  (fixtures)
from synthetic_text import write_corpus

from llama_fast import ops, reference
from llama_fast.data import parse_source, prepare
from llama_fast.train import build_parser
from llama_fast.train.config import TrainConfig, from_args
from llama_fast.train.parallelize import init_distributed
from llama_fast.train.trainer import Trainer

EPS = 1e-6

# The op checks run with torch.empty poisoned (NaN); the compile test must not: dynamo would record
# the patched torch.empty_like for the rest of the process.
poisoned = pytest.mark.usefixtures("poison_empty")


def ref_rms_norm_linear(x, w, W):
    return F.linear(reference.rms_norm(x, w, EPS), W)


def ref_add_rms_norm_linear(x, r, w, W):
    normed, h = reference.add_rms_norm(x, r, w, EPS)
    return F.linear(normed, W), h


def ref_swiglu_linear(gate_up, W):
    return F.linear(reference.swiglu(*gate_up.chunk(2, dim=-1)), W)


def run_norm_linear(x_shape, out_features, dtype, device="cpu", *, residual=False, transposed=False):
    """Checks (add_)rms_norm_linear on x [..., N] (optionally a transposed view) against the reference."""
    base_shape = (*x_shape[:-2], x_shape[-1], x_shape[-2]) if transposed else x_shape
    view = (lambda t: t.transpose(-1, -2)) if transposed else (lambda t: t)

    def leaf(*shape, scale=1.0, shift=0.0):
        return (torch.randn(shape, device=device) * scale + shift).to(dtype).requires_grad_()

    n = x_shape[-1]
    x, w = leaf(*base_shape, scale=2, shift=0.5), (torch.rand(n, device=device) + 0.5).to(dtype).requires_grad_()
    W = leaf(out_features, n, scale=n**-0.5)
    if residual:
        r = leaf(*base_shape)
        check_op(
            lambda x, r, w, W: ops.add_rms_norm_linear(x, r, w, W, EPS), ref_add_rms_norm_linear,
            [x, r, w, W], lambda x, r, w, W: (view(x), view(r), w, W),
            out_names=["out", "h"], grad_names=["dx", "dresidual", "dnorm_weight", "dweight"],
        )
    else:
        check_op(
            lambda x, w, W: ops.rms_norm_linear(x, w, W, EPS), ref_rms_norm_linear,
            [x, w, W], lambda x, w, W: (view(x), w, W),
            out_names=["out"], grad_names=["dx", "dnorm_weight", "dweight"],
        )


def run_swiglu_linear(rows_shape, ffn, out_features, dtype, device="cpu", *, sliced=False):
    """Checks swiglu_linear on gate_up [..., 2F] (optionally a column slice of a wider tensor)."""
    width = 2 * ffn + (6 if sliced else 0)
    gate_up = (torch.randn(*rows_shape, width, device=device) * 2).to(dtype).requires_grad_()
    W = (torch.randn(out_features, ffn, device=device) * ffn**-0.5).to(dtype).requires_grad_()
    view = (lambda t: t[..., 3 : 3 + 2 * ffn]) if sliced else (lambda t: t)
    check_op(
        lambda g, W: ops.swiglu_linear(g, W), ref_swiglu_linear, [gate_up, W], lambda g, W: (view(g), W),
        out_names=["out"], grad_names=["dgate_up", "dweight"],
    )


# (x shape, out features): one row, an odd hidden size, 3-D and 4-D, a transposed (strided) view.
NORM_CASES = [((1, 123), 37), ((3, 7, 64), 96), ((2, 3, 5, 130), 17)]


@poisoned
@pytest.mark.parametrize("residual", [False, True], ids=["rms_norm_linear", "add_rms_norm_linear"])
@pytest.mark.parametrize("case", NORM_CASES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_norm_linear_matches_reference(dtype, case, residual):
    run_norm_linear(*case, dtype, residual=residual)


@poisoned
@pytest.mark.parametrize("residual", [False, True], ids=["rms_norm_linear", "add_rms_norm_linear"])
def test_norm_linear_on_a_transposed_view(residual):
    run_norm_linear((2, 9, 40), 24, torch.float32, residual=residual, transposed=True)


@poisoned
@pytest.mark.parametrize("sliced", [False, True], ids=["contiguous", "column-slice"])
@pytest.mark.parametrize("case", [((1,), 5, 3), ((3, 7), 88, 33), ((2, 1, 5), 131, 64)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_swiglu_linear_matches_reference(dtype, case, sliced):
    run_swiglu_linear(*case, dtype, sliced=sliced)


@poisoned
def test_fallback_backwards_match_reference(fallback_backward):
    """Without the compiled backwards (Triton in the interpreter, or PyTorch math) and a warning."""
    with pytest.warns(RuntimeWarning, match="no compiled backward"):
        run_norm_linear((3, 5, 72), 40, torch.float32)
    run_norm_linear((3, 5, 72), 40, torch.float32, residual=True)
    run_swiglu_linear((3, 5), 40, 24, torch.float32)


def saved_storages(fn, *args):
    """Storages autograd saves while fn(*args) runs (parameters included)."""
    saved = []

    def pack(t):
        saved.append(t.untyped_storage().data_ptr())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*args)
    return out, set(saved)


def ptrs(*tensors):
    return {t.untyped_storage().data_ptr() for t in tensors}


def test_only_the_inputs_and_weights_are_saved():
    """The op outputs the functions recompute (normed x, normed h, swiglu(gate_up)) are not kept."""
    x, r = torch.randn(4, 6, 32, requires_grad=True), torch.randn(4, 6, 32, requires_grad=True)
    w, W = torch.rand(32, requires_grad=True), torch.randn(48, 32, requires_grad=True)
    out, saved = saved_storages(ops.rms_norm_linear, x, w, W, EPS)
    assert saved == ptrs(x, w, W)
    (out, h), saved = saved_storages(ops.add_rms_norm_linear, x, r, w, W, EPS)
    assert saved == ptrs(h, w, W)
    gate_up, W_down = torch.randn(4, 6, 2 * 40, requires_grad=True), torch.randn(32, 40, requires_grad=True)
    out, saved = saved_storages(ops.swiglu_linear, gate_up, W_down)
    assert saved == ptrs(gate_up, W_down)
    # The check can fail: the composition of the separate ops keeps the normed tensor for the GEMM.
    _, saved = saved_storages(lambda: F.linear(ops.rms_norm(x, w, EPS), W))
    assert len(saved - ptrs(x, w, W)) == 2  # rstd and the normed x


def test_double_backward_is_refused():
    x, w, W = torch.randn(3, 8, requires_grad=True), torch.rand(8), torch.randn(4, 8)
    (dx,) = torch.autograd.grad(ops.rms_norm_linear(x, w, W).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        dx.sum().backward()


def test_under_autocast_matches_the_composition():
    """fp32 activations and weights under autocast: the GEMM runs in fp16 as F.linear's would,
    the output is fp16 and the gradients come back in fp32, equal to the composition's."""
    x, r = torch.randn(3, 5, 64, requires_grad=True), torch.randn(3, 5, 64, requires_grad=True)
    w, W = (torch.rand(64) + 0.5).requires_grad_(), (torch.randn(96, 64) / 8).requires_grad_()
    W2 = (torch.randn(80, 64) / 8).requires_grad_()  # each weight used once, as in the model
    gate_up, W_down = torch.randn(3, 5, 2 * 48, requires_grad=True), (torch.randn(64, 48) / 7).requires_grad_()
    leaves = (x, r, w, W, W2, gate_up, W_down)

    def run(fused):
        with torch.autocast("cpu", dtype=torch.float16):
            if fused:
                outs = (ops.rms_norm_linear(x, w, W, EPS), *ops.add_rms_norm_linear(x, r, w, W2, EPS),
                        ops.swiglu_linear(gate_up, W_down))
            else:
                normed, h = ops.add_rms_norm(x, r, w, EPS)
                outs = (F.linear(ops.rms_norm(x, w, EPS), W), F.linear(normed, W2), h,
                        F.linear(ops.swiglu(gate_up), W_down))
        grads = torch.autograd.grad(outs, leaves, [torch.ones_like(o) for o in outs])
        return outs, grads

    (outs, grads), (want, want_grads) = run(True), run(False)
    assert [o.dtype for o in outs] == [torch.float16, torch.float16, torch.float32, torch.float16]
    assert all(g.dtype == torch.float32 for g in grads)
    for got, expected in zip(outs + grads, want + want_grads):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_bad_inputs_get_clear_errors():
    x, w, W = torch.randn(2, 8), torch.rand(8), torch.randn(5, 8)
    with pytest.raises(ValueError, match=r"weight must be \[out_features, 8\] \(the last dim of x\), got shape \(5, 7"):
        ops.rms_norm_linear(x, w, torch.randn(5, 7))
    with pytest.raises(TypeError, match="weight must have the activation dtype torch.float32 .* got torch.float16"):
        ops.add_rms_norm_linear(x, x, w, W.half())
    with pytest.raises(ValueError, match="residual must have the shape of x"):
        ops.add_rms_norm_linear(x, torch.randn(2, 9), w, W)
    with pytest.raises(ValueError, match=r"gate_up must be the fused \[gate \| up\] tensor .* got shape \(2, 7\)"):
        ops.swiglu_linear(torch.randn(2, 7), W)
    with pytest.raises(ValueError, match=r"weight must be \[out_features, 4\] \(the last dim of swiglu\(gate_up\)\)"):
        ops.swiglu_linear(x, W)


def test_fullgraph_compile_matches_eager():
    """torch.compile(fullgraph=True) with inductor traces the three autograd functions (forward and
    backward) in one graph and computes what eager does."""
    torch._dynamo.reset()

    def block(x, r, w, W, W2, W_down):
        qkv = ops.rms_norm_linear(x, w, W, EPS)
        gate_up, h = ops.add_rms_norm_linear(qkv[..., :32], r, w, W2, EPS)
        return qkv, h + ops.swiglu_linear(gate_up, W_down)

    leaves = [torch.randn(2, 5, 32), torch.randn(2, 5, 32), torch.rand(32) + 0.5, torch.randn(40, 32) / 6,
              torch.randn(2 * 24, 32) / 6, torch.randn(32, 24) / 5]
    leaves = [t.requires_grad_() for t in leaves]
    got = torch.compile(block, fullgraph=True)(*leaves)
    want = block(*leaves)
    upstream = [torch.randn_like(o) for o in want]
    got_grads = torch.autograd.grad(got, leaves, upstream)
    want_grads = torch.autograd.grad(want, leaves, upstream)
    for g, w in zip(list(got) + list(got_grads), list(want) + list(want_grads)):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


@poisoned
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_gpu_matches_reference(dtype):
    for case in NORM_CASES + [((4, 1023, 2048), 2560)]:
        run_norm_linear(*case, dtype, device="cuda")
        run_norm_linear(*case, dtype, device="cuda", residual=True)
    run_norm_linear((2, 9, 40), 24, dtype, device="cuda", transposed=True)
    for case in [((3, 7), 88, 33), ((2, 1023), 5632, 2048)]:
        run_swiglu_linear(*case, dtype, device="cuda")
        run_swiglu_linear(*case, dtype, device="cuda", sliced=True)


# ------------------------------------------------------------------------------------------------
# The trainer, FSDP2 and DDP: recompute="cheap" reads every weight inside the block's forward, where
# FSDP has gathered it, and its gradients reach DDP's and FSDP's reductions.
# ------------------------------------------------------------------------------------------------
VOCAB = 512


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("recompute_data")
    return prepare([parse_source(str(write_corpus(root / "a", 30, seed=3)))], root / "prepared", vocab_size=VOCAB,
                   val_fraction=0.1, progress=False)


def test_trainer_builds_the_model_with_its_recompute(tmp_path, data):
    def config(*flags):
        return from_args(build_parser().parse_args(
            ["--run-dir", str(tmp_path), "--data", str(data), "--flavor", "tiny", "--model.vocab_size", str(VOCAB),
             "--seq-len", "32", "--train.micro_batch", "4", "--train.batch_tokens", "128", *flags]))

    assert config().model.recompute == "none"
    trainer = Trainer(config("--backend", "fused", "--model.recompute", "cheap"), init_distributed("cpu"))
    assert trainer.model.recompute == "cheap" and trainer.config.to_dict()["model"]["recompute"] == "cheap"
    with pytest.raises(ValueError, match=r"model.recompute: expected one of \['none', 'cheap', 'blocks'\], got 'some'"):
        config("--model.recompute", "some")
    with pytest.raises(ValueError, match="model.recompute='cheap' needs model.backend 'fused'"):
        config("--model.recompute", "cheap", "--backend", "reference")
    with pytest.raises(ValueError, match="'model.activation_checkpointing' was replaced by model.recompute"):
        TrainConfig.from_dict({"model": {"activation_checkpointing": True}})  # a config file's [model] table


TWO_PROCESSES = """
import sys
from pathlib import Path

import torch
from llama_fast import LlamaConfig
from llama_fast.train.parallelize import barrier, build_model, init_distributed, shutdown

d = init_distributed("cpu")
config = LlamaConfig.from_name("tiny", vocab_size=300)
tokens = torch.randint(0, 300, (2, 3, 18), generator=torch.Generator().manual_seed(0))[d.rank]  # a batch per rank
for parallel in ("fsdp", "ddp"):
    model, wrapped = build_model(config, "fused", d, parallel, seed=0, recompute="cheap")
    results = {}
    for recompute in ("cheap", "none"):
        model.recompute = recompute
        model.zero_grad(set_to_none=True)
        loss = wrapped(tokens[:, :-1], tokens[:, 1:])[1]
        loss.backward()
        grads = {n: getattr(p.grad, "full_tensor", lambda: p.grad)().clone() for n, p in model.named_parameters()}
        results[recompute] = loss.detach(), grads
    (loss, grads), (want_loss, want_grads) = results["cheap"], results["none"]
    torch.testing.assert_close(loss, want_loss, rtol=1e-6, atol=0)
    assert grads.keys() == want_grads.keys() and len(grads) == 2 + 6 * config.n_layers + 1
    for name in grads:
        torch.testing.assert_close(grads[name], want_grads[name], rtol=1e-5, atol=1e-7, msg=f"{parallel} {name}")
    with open(Path(sys.argv[1]) / f"rank{d.rank}.txt", "a") as f:
        f.write(f"{parallel} ok\\n")
# Leave together and take the process group down: exiting with gloo's threads alive aborts a rank
# now and then ("terminate called without an active exception").
barrier(d)
shutdown(d)
"""


def test_cheap_recompute_under_fsdp_and_ddp_matches_no_recompute(tmp_path):
    """Two gloo processes, the fused backend (PyTorch forwards on the CPU, C++ backwards): under FSDP2
    (built as the trainer builds it, blocks sharded) and under DDP, recompute="cheap" gives the loss
    and every reduced gradient of recompute="none"."""
    proc = run_script(TWO_PROCESSES, tmp_path)
    for rank in (0, 1):
        assert (tmp_path / f"rank{rank}.txt").read_text() == "fsdp ok\nddp ok\n", proc.stdout
