"""Estimated peak GPU memory of one training step, computed on the CPU with meta tensors.

    python benchmarks/estimate_memory.py                      # "1B" flavor, batch 4 x 2048, our fused kernels
    python benchmarks/estimate_memory.py --backend fused --backend reference   # both, one labelled line each
    python benchmarks/estimate_memory.py --backend fused --flavor small --batch 2 --seq 256
    python benchmarks/estimate_memory.py --backend fused --recompute cheap  # Llama(recompute=...)

The step is the one benchmarks/bench_train_step.py times: bf16 parameters, torch's fused AdamW
(betas 0.9/0.95, no amsgrad), in steady state (the optimizer state exists; the gradients of the
previous step were dropped by ``zero_grad(set_to_none=True)``):

    zero_grad  ->  loss = model(x, y)[1]  ->  loss.backward()  ->  opt.step()

How it is counted:
  * The model is built on the meta device (shapes and dtypes, no data) and runs forward and
    backward for real: every allocation PyTorch makes is seen by
    torch.distributed._tools.mem_tracker.MemTracker, which keeps the running total of live
    storages and its peak. Our Triton forwards are torch.library ops whose fake implementations
    return the same outputs; our CUDA backwards are torch.ops.llama_fast.* whose register_fake
    implementations serve as their Meta kernels (llama_fast/_extension.py), so the trace takes the
    same compiled-backward path as on CUDA. The Triton forwards allocate nothing but their outputs.
  * Optimizer state: created before the step exactly as torch.optim.AdamW._init_group does for
    fused=True (exp_avg, exp_avg_sq like each parameter, and a 0-d fp32 ``step`` on its device);
    tests/test_memory_estimate.py checks the layout against a real fused step on the CPU. The
    fused update itself (torch._fused_adamw_) works in place and allocates nothing, so the step
    phase holds parameters + gradients + state (+ what the backward left), read after backward.
  * Per-op workspace: a fake implementation returns the op's outputs only, but the CUDA bindings
    (csrc/bindings.cpp) allocate scratch inside the op and free it on return: the attention
    backward's fp32 workspace (delta, m2 and log2l per row, rot(q), and rot(k) in the deterministic
    mode or the fp32 dQ accumulator otherwise; layout in csrc/cuda/attention_backward.cu, workspace_layout) and the RMSNorm
    backward's fp32 dw partials (2 blocks per SM). ``CudaScratch`` allocates those sizes, from the
    same formulas, on meta while the op runs, so the tracker places them in time next to the op's
    outputs. The estimate is printed with and without them; the largest single workspace is
    printed too. An unknown llama_fast backward op raises instead of being counted as free.
    tests/test_memory_estimate.py compiles the real workspace_layout() with nvcc (host code, no GPU)
    and compares.
  * Saved for backward: torch.autograd.graph.saved_tensors_hooks sees every tensor autograd
    saves; storages are counted once (a view counts its whole storage), parameters and buffers
    (the rotary tables) are not activations and are left out.

Not in the estimate (it is an estimate, not a measurement): the CUDA caching allocator's rounding
(512-byte blocks) and fragmentation, cuBLAS / cuBLASLt workspaces, the CUDA context itself, scratch
that torch's own CUDA kernels allocate inside an op (e.g. the embedding backward's fp32 partial
sums, late in the backward where far less is alive), and anything the GPU run adds outside the
step (a second copy of the batch, logging). torch.cuda.max_memory_allocated() on a GPU will read
somewhat above these numbers; nvidia-smi well above (context, cache). The Hugging Face model and
torch.compile are not estimated here: their kernels on meta are not the ones CUDA would run.
"""
from __future__ import annotations

import argparse
import contextlib
import math
from dataclasses import dataclass

import torch
from torch.distributed._tools.mem_tracker import MemTracker
from torch.utils._python_dispatch import TorchDispatchMode

from llama_fast import Llama, LlamaConfig
from llama_fast.config import flavor_name
from llama_fast import _extension
from llama_fast.model import RECOMPUTE

GIB = 2**30
BACKENDS = ("fused", "reference")
H100_SMS = 132  # the RMSNorm backward's dw partials scale with the SM count (2 blocks per SM)


# ------------------------------------------------------------------------------------------------
# The model and optimizer on meta
# ------------------------------------------------------------------------------------------------
def build_meta_model(
    config: LlamaConfig, backend: str, dtype: torch.dtype = torch.bfloat16, recompute: str = "none"
) -> Llama:
    """Llama with `dtype` parameters on the meta device (rotary tables fp32, as model._apply keeps them)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = Llama(config, backend=backend, recompute=recompute)
    finally:
        torch.set_default_dtype(previous)
    return model


def fused_adamw_with_state(model: torch.nn.Module) -> torch.optim.AdamW:
    """torch.optim.AdamW(fused=True) whose state exists already, laid out as _init_group creates it
    for fused=True at the first step: exp_avg and exp_avg_sq like the parameter, step a 0-d fp32
    tensor on the parameter's device."""
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    for group in opt.param_groups:
        for p in group["params"]:
            opt.state[p] = {
                "step": torch.zeros((), dtype=torch.float32, device=p.device),
                "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format),
            }
    return opt


# ------------------------------------------------------------------------------------------------
# Scratch the CUDA bindings allocate inside an op (invisible to a fake implementation)
# ------------------------------------------------------------------------------------------------
def attention_backward_workspace_floats(
    batch: int, seq: int, heads: int, kv_heads: int, head_dim: int, deterministic: bool
) -> dict[str, int]:
    """fp32 elements of attention_backward's CUDA workspace, part by part; the same layout as
    workspace_layout() in csrc/cuda/attention_backward.cu (rows padded to 64, parts 16-byte aligned,
    rot(q) and, deterministic only, rot(k) in the 16-bit input dtype, two per float)."""

    def align4(n: int) -> int:
        return (n + 3) // 4 * 4

    rows = batch * heads * math.ceil(seq / 64) * 64
    nq = batch * seq * heads * head_dim
    nk = batch * seq * kv_heads * head_dim
    return {
        "delta": align4(rows),
        "m2": align4(rows),
        "log2l": align4(rows),
        "dq fp32 accumulator": 0 if deterministic else align4(nq),
        "rot(q)": align4((nq + 1) // 2),
        "rot(k)": align4((nk + 1) // 2) if deterministic else 0,  # else the kv kernel rotates K itself
    }


def rms_norm_backward_partials_floats(rows: int, cols: int, num_sms: int = H100_SMS) -> int:
    """fp32 elements of the RMSNorm backward's dw partials (csrc/bindings.cpp: min(rows, 2 * SMs) x cols)."""
    return max(1, min(rows, 2 * num_sms)) * cols


def _rows_copy(t: torch.Tensor) -> bool:
    """Whether csrc/bindings.cpp's as_rows() copies t (its [rows, cols] view has a strided last dim)."""
    return t.dim() > 0 and t.reshape(-1, t.shape[-1]).stride(-1) != 1 and t.shape[-1] > 1


@dataclass
class OpScratch:
    op: str
    parts: dict[str, int]  # name -> bytes

    @property
    def bytes(self) -> int:
        return sum(self.parts.values())


class CudaScratch(TorchDispatchMode):
    """While a llama_fast backward op runs, allocates on meta the scratch its CUDA binding would
    (copies of inputs it makes contiguous, fp32 workspaces), then frees it, as the op does on return.
    Entered inside a MemTracker, which then counts the scratch next to the op's outputs."""

    def __init__(self, deterministic: bool = False, num_sms: int = H100_SMS):
        super().__init__()
        self.deterministic = deterministic
        self.num_sms = num_sms
        self.largest: OpScratch | None = None

    def _parts(self, name: str, args) -> dict[str, int]:
        def copy_if(cond: bool, t: torch.Tensor) -> int:
            return t.numel() * t.element_size() if cond else 0

        if name == "attention_backward":
            dout, q, k, v, out, stats, cos, sin = args[:8]
            B, S, Hq, D = q.shape
            floats = attention_backward_workspace_floats(B, S, Hq, k.shape[2], D, self.deterministic)
            parts = {f"workspace {key}": 4 * n for key, n in floats.items()}
            for label, t in (("dout", dout), ("q", q), ("k", k), ("v", v), ("out", out)):
                parts[f"copy of {label}"] = copy_if(t.stride(3) != 1, t)
            parts["copy of stats"] = copy_if(not stats.is_contiguous(), stats)
            return parts
        if name == "rms_norm_backward":
            dy, x, weight, rstd = args[:4]
            dresidual = args[4] if len(args) > 4 else None
            rows = x.numel() // max(1, x.shape[-1])
            parts = {"dw partials": 4 * rms_norm_backward_partials_floats(rows, x.shape[-1], self.num_sms)}
            parts["copy of x"] = copy_if(_rows_copy(x), x)
            parts["copy of dy"] = copy_if(_rows_copy(dy), dy)
            parts["copy of rstd"] = copy_if(not rstd.is_contiguous(), rstd)
            if dresidual is not None:
                parts["copy of dresidual"] = copy_if(not dresidual.is_contiguous(), dresidual)
            return parts
        if name in ("swiglu_backward", "swiglu_packed_backward"):
            tensors = [t for t in args if isinstance(t, torch.Tensor)]
            return {f"copy of input {i}": copy_if(_rows_copy(t), t) for i, t in enumerate(tensors)}
        if name == "rope_backward":
            return {}  # dq, dk read by strides; only a rotary table with strided columns is copied (ours are not)
        raise NotImplementedError(
            f"llama_fast::{name}: its CUDA scratch is unknown to benchmarks/estimate_memory.py; add it to CudaScratch"
        )

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        namespace, _, name = func.name().partition("::")
        if namespace != "llama_fast" or not name.split(".")[0].endswith("_backward"):
            return func(*args, **kwargs)
        scratch = OpScratch(name.split(".")[0], self._parts(name.split(".")[0], args))
        res = func(*args, **kwargs)
        # Allocated while the outputs are alive (MemTracker, the outer mode, counts it), freed on return.
        held = [torch.empty(n, dtype=torch.uint8, device="meta") for n in scratch.parts.values() if n]
        del held
        if self.largest is None or scratch.bytes > self.largest.bytes:
            self.largest = scratch
        return res


# ------------------------------------------------------------------------------------------------
# What autograd saves
# ------------------------------------------------------------------------------------------------
@dataclass
class SavedTensor:
    module: str  # the innermost module running when it was saved: "layers.3.attn", "norm", "" (top level)
    shape: tuple[int, ...]  # the saved tensor (maybe a view of a larger storage)
    dtype: torch.dtype
    storage_bytes: int  # its storage's bytes, counted at the first tensor that saves the storage

    @property
    def where(self) -> str:
        """"layers.<i>" for a block's tensors, "embed" for the embedding, "head" for the rest
        (final norm and loss)."""
        parts = self.module.split(".")
        if parts[0] == "layers":
            return ".".join(parts[:2])
        return "embed" if parts[0] == "embed" else "head"


@dataclass
class SavedReport:
    tensors: list[SavedTensor]
    tokens: int
    n_layers: int

    def bytes_in(self, where: str) -> int:
        return sum(t.storage_bytes for t in self.tensors if t.where == where)

    def per_layer_bytes(self) -> list[int]:
        return [self.bytes_in(f"layers.{i}") for i in range(self.n_layers)]

    def per_layer_per_token(self) -> float:
        """Bytes one block saves per token (the largest block's; all blocks save the same)."""
        return max(self.per_layer_bytes()) / self.tokens

    def layer(self, i: int) -> list[SavedTensor]:
        return [t for t in self.tensors if t.where == f"layers.{i}"]

    @property
    def total(self) -> int:
        return sum(t.storage_bytes for t in self.tensors)


def saved_for_backward(model: Llama, tokens: torch.Tensor) -> SavedReport:
    """Every tensor autograd saves during model(tokens[:, :-1], tokens[:, 1:]), with the module whose
    forward saved it; storages counted once (at the first save), parameters and buffers left out.
    The forward's graph is dropped afterwards."""
    # storage id -> storage, both held so that no id is reused while we look
    exclude = {id(st): st for st in (t.untyped_storage() for t in (*model.parameters(), *model.buffers()))}
    seen: dict[int, torch.UntypedStorage] = {}
    tensors: list[SavedTensor] = []
    stack = [""]  # names of the modules whose forward is running

    def pack(t: torch.Tensor):
        st = t.untyped_storage()
        if id(st) not in exclude and id(st) not in seen:
            seen[id(st)] = st
            tensors.append(SavedTensor(stack[-1], tuple(t.shape), t.dtype, st.nbytes()))
        return t

    hooks = []
    for name, module in model.named_modules():
        if name:
            hooks.append(module.register_forward_pre_hook(lambda mod, args, name=name: stack.append(name)))
            hooks.append(module.register_forward_hook(lambda mod, args, out: stack.pop() and None))
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(tokens[:, :-1], tokens[:, 1:])[1]
    finally:
        for h in hooks:
            h.remove()
    del loss
    B, S1 = tokens.shape
    return SavedReport(tensors, B * (S1 - 1), len(model.layers))


# ------------------------------------------------------------------------------------------------
# The estimate
# ------------------------------------------------------------------------------------------------
@dataclass
class Estimate:
    backend: str
    recompute: str
    config: LlamaConfig
    batch: int
    seq: int
    params: int  # bytes
    grads: int
    opt_state: int
    peak: int  # with the CUDA scratch
    peak_breakdown: dict[str, int]  # MemTracker's categories at the peak
    peak_pass: str  # "forward" or "backward"
    peak_without_scratch: int
    step_phase: int  # live bytes when opt.step() runs
    largest_scratch: OpScratch | None
    saved: SavedReport


def _meta(snapshot) -> dict[str, int]:
    """MemTracker's snapshot of the meta device as {category name: bytes} ("Parameter", ..., "Total")."""
    for dev, snap in snapshot.items():
        if torch.device(dev).type == "meta":
            return {getattr(k, "value", k): v for k, v in snap.items()}
    return {}


def _tracked_step(model, opt, tokens, scratch: CudaScratch | None):
    """One steady-state step under MemTracker: (peak categories, live categories at opt.step(), the
    pass the peak falls in)."""
    opt.zero_grad(set_to_none=True)  # the step begins as bench_train_step's does: no gradients alive
    mt = MemTracker()
    mt.track_external(model, opt, tokens)
    with mt, (scratch if scratch is not None else contextlib.nullcontext()):
        loss = model(tokens[:, :-1], tokens[:, 1:])[1]
        forward_peak = _meta(mt.get_tracker_snapshot("peak"))["Total"]
        loss.backward()
        # torch._fused_adamw_ updates parameters and state in place and allocates nothing (it has no
        # meta kernel either), so the step phase holds what is live now.
        step_phase = _meta(mt.get_tracker_snapshot("current"))
    peak = _meta(mt.get_tracker_snapshot("peak"))
    del loss
    return peak, step_phase, "forward" if peak["Total"] == forward_peak else "backward"


def estimate(
    config: LlamaConfig, backend: str, batch: int, seq: int, *, deterministic: bool = False, num_sms: int = H100_SMS,
    recompute: str = "none",
) -> Estimate:
    if not _extension.has_kernel("meta"):
        raise RuntimeError(
            "estimate_memory needs llama_fast._C (its fake kernels stand in for the CUDA backwards); "
            f"it failed to load: {_extension.LOAD_ERROR}"
        )
    if seq > config.max_seq_len:
        raise ValueError(f"seq must be at most the config's max_seq_len ({config.max_seq_len}), got {seq}")
    model = build_meta_model(config, backend, recompute=recompute)
    tokens = torch.zeros((batch, seq + 1), dtype=torch.long, device="meta")
    saved = saved_for_backward(model, tokens)
    opt = fused_adamw_with_state(model)
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    opt_state = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values())

    peak_plain, _, _ = _tracked_step(model, opt, tokens, None)
    scratch = CudaScratch(deterministic, num_sms)
    peak, step_phase, peak_pass = _tracked_step(model, opt, tokens, scratch)
    grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
    return Estimate(
        backend=backend, recompute=recompute, config=config, batch=batch, seq=seq, params=params, grads=grads,
        opt_state=opt_state,
        peak=peak["Total"], peak_breakdown=peak, peak_pass=peak_pass,
        peak_without_scratch=peak_plain["Total"], step_phase=step_phase["Total"],
        largest_scratch=scratch.largest, saved=saved,
    )


# ------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------
def _gib(n: float) -> str:
    return f"{n / GIB:7.3f} GiB"


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def report(e: Estimate) -> str:
    """The estimate as text, with the arithmetic of each term."""
    c = e.config
    tokens = e.batch * e.seq
    per_layer = e.saved.per_layer_bytes()
    lines = [
        f"== backend {e.backend}, recompute {e.recompute}: dim {c.dim}, {c.n_layers} layers, "
        f"heads {c.n_heads}/{c.n_kv_heads} (q/kv), "
        f"head_dim {c.head_dim}, ffn {c.ffn_hidden}, vocab {c.vocab_size}; batch {e.batch} x seq {e.seq} "
        f"= {tokens} tokens; bf16 parameters, fused AdamW, steady state ==",
        f"parameters            {_gib(e.params)}   {c.num_params():,} x 2 B (bf16)",
        f"gradients             {_gib(e.grads)}   one bf16 gradient per parameter, live from the backward to the "
        "next zero_grad",
        f"optimizer state       {_gib(e.opt_state)}   exp_avg + exp_avg_sq like the parameters (2 x 2 B each) "
        "+ a 4-B step per tensor",
        "saved for backward (each storage once; parameters and rotary tables excluded):",
        f"  one layer           {_gib(max(per_layer))}   = {e.saved.per_layer_per_token():,.0f} B/token x {tokens} "
        "tokens",
        f"  {c.n_layers} layers           {_gib(sum(per_layer))}",
        f"  embedding + head    {_gib(e.saved.bytes_in('embed') + e.saved.bytes_in('head'))}   token ids, final norm "
        "input, the loss's gradients computed in the forward",
        "  layer 0 saves (module, shape, dtype, bytes per token):",
    ]
    for t in e.saved.layer(0):
        dtype = str(t.dtype).removeprefix("torch.")
        lines.append(
            f"    {t.module:24s} {str(t.shape):22s} {dtype:9s} {t.storage_bytes / tokens:>10,.1f}"
        )
    parts = " + ".join(f"{k} {v / GIB:.3f}" for k, v in e.peak_breakdown.items() if k != "Total" and v)
    lines.append(f"peak, in the {e.peak_pass} (MemTracker) {_gib(e.peak)} = {parts} GiB")
    if e.peak_pass == "forward":
        transient = e.peak_breakdown.get("Activation", 0) - e.saved.total
        lines.append(
            f"  activations there = {e.saved.total / GIB:.3f} saved for backward + {transient / GIB:.3f} transient GiB"
        )
    lines.append(f"  the same without the per-op CUDA scratch {_gib(e.peak_without_scratch)}")
    if e.largest_scratch is not None:
        scratch = ", ".join(f"{k} {_mib(v)}" for k, v in e.largest_scratch.parts.items() if v)
        op = e.largest_scratch
        lines.append(f"  largest per-op CUDA scratch: {op.op} {_mib(op.bytes)} ({scratch})")
    lines += [
        f"at opt.step() (params + grads + state + leftovers) {_gib(e.step_phase)}",
        f"ESTIMATED PEAK {_gib(e.peak)}   ({label(e)})",
        f"  with gradient accumulation (gradients alive through every micro-batch): at most {_gib(e.peak + e.grads)}"
        " (peak + gradients)",
        "not included: caching-allocator rounding and fragmentation, cuBLAS workspaces, the CUDA context;"
        " torch.cuda.max_memory_allocated() will read somewhat higher",
    ]
    return "\n".join(lines)


def label(e: Estimate) -> str:
    """What was estimated, in the words of the command line."""
    return f"backend {e.backend}, recompute {e.recompute}, batch {e.batch} x seq {e.seq}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--flavor", default="1B", help="LlamaConfig.from_name flavor, any case (default 1B)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--backend", choices=BACKENDS, action="append",
                        help="repeatable; default: fused (our kernels; reference is plain PyTorch)")
    parser.add_argument("--recompute", choices=RECOMPUTE, default="none",
                        help="Llama(recompute=...): none, cheap (fused backend only) or blocks (default none)")
    parser.add_argument("--deterministic", action="store_true", help="the attention backward without atomics")
    parser.add_argument("--sms", type=int, default=H100_SMS, help="SM count for the RMSNorm dw partials")
    args = parser.parse_args(argv)
    try:
        flavor = flavor_name(args.flavor, "--flavor")
    except ValueError as exc:
        parser.error(str(exc))
    config = LlamaConfig.from_name(flavor)
    backends = args.backend or ["fused"]
    if args.recompute == "cheap" and "reference" in backends:
        parser.error("--recompute cheap needs the fused backend (its ops are fused ops), got --backend reference")
    estimates = [estimate(config, backend, args.batch, args.seq, deterministic=args.deterministic, num_sms=args.sms,
                          recompute=args.recompute) for backend in backends]
    for e in estimates:
        print(report(e))
        print()
    if len(estimates) > 1:  # the answers last, each with what it answers
        for e in estimates:
            print(f"ESTIMATED PEAK {_gib(e.peak)}   ({flavor}, {label(e)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
