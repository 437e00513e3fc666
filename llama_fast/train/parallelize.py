"""Parallelism, applied to a model from outside it (the model never imports torch.distributed).

``init_distributed`` joins the process group torchrun describes (NCCL on GPUs, gloo on
CPU); ``cpu_threads`` sizes each process's share of the CPU. ``build_model`` builds the
model on the meta device and materializes it on the target device: whole for one process
or DDP, shard by shard for FSDP2 (``fully_shard`` on each block, then the root;
``to_empty`` then ``init_weights``, so no process ever holds the full model).
"""
from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn as nn

from ..config import LlamaConfig
from ..model import Llama

try:  # torch >= 2.5
    from torch.distributed.tensor.experimental import implicit_replication
except ImportError:  # torch 2.4
    from torch.distributed._tensor.experimental import implicit_replication
try:  # torch >= 2.6
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
except ImportError:  # torch 2.4 / 2.5
    from torch.distributed._composable.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

# "auto" picks FSDP when parameters, gradients and AdamW's two moments (16 bytes per
# parameter in fp32) would take more than this share of one device's memory.
DDP_MEMORY_SHARE = 0.5


@dataclass
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str = "auto", timeout_s: float = 1800.0) -> Dist:
    """Join torchrun's process group when WORLD_SIZE > 1; pick this process's device.

    ``timeout_s``: how long a collective waits for the other processes before it fails the run.
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device='cuda' but torch.cuda.is_available() is False")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda":
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        kwargs = {"device_id": dev} if dev.type == "cuda" else {}
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo", timeout=timedelta(seconds=timeout_s),
                                **kwargs)
    return Dist(rank, world_size, local_rank, dev)


def available_cores() -> int:
    """The cores this process may run on: its CPU affinity, within the container's CPU quota (cgroup v2)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        quota, period = open("/sys/fs/cgroup/cpu.max").read().split()
        if quota != "max":
            cores = min(cores, max(1, int(quota) // int(period)))
    except (OSError, ValueError):
        pass
    return cores


def cpu_threads(requested: int = 0) -> tuple[int, str]:
    """torch's intra-op thread count for this process, and why.

    ``requested`` > 0 wins, then OMP_NUM_THREADS (torchrun sets 1 for several processes unless
    it is given). Otherwise: the available cores less those other work keeps busy (the
    one-minute load average, read before this run computes anything), shared by the
    processes of this node (LOCAL_WORLD_SIZE). Every op waits for its slowest thread, so a
    thread on a core another program holds costs far more than it brings: on a 2-core
    machine under load, 2 threads trained at a fifth of the tokens/s of 1 (README).
    """
    if requested > 0:
        return requested, "train.cpu_threads"
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env), "OMP_NUM_THREADS"
    cores, load = available_cores(), os.getloadavg()[0]
    busy = min(cores - 1, round(load))
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    threads = max(1, (cores - busy) // processes)
    return threads, f"{cores} cores, load {load:.1f}, {processes} process(es) on this node"


def choose_parallel(requested: str, config: LlamaConfig, d: Dist) -> str:
    if requested != "auto":
        if requested != "none" and d.world_size == 1:
            return "none"  # one process: nothing to wrap
        if requested == "none" and d.world_size > 1:
            raise ValueError(f"train.parallel='none' with {d.world_size} processes; expected ddp or fsdp")
        return requested
    if d.world_size == 1:
        return "none"
    if d.device.type == "cuda":
        state_bytes = 16 * config.num_params()
        if state_bytes > DDP_MEMORY_SHARE * torch.cuda.get_device_properties(d.device).total_memory:
            return "fsdp"
    return "ddp"


def build_model(
    config: LlamaConfig,
    backend: str,
    d: Dist,
    parallel: str,
    seed: int,
    param_dtype: torch.dtype | None = None,
    recompute: str = "none",
) -> tuple[Llama, nn.Module]:
    """(the model, the module to call for training): the same object except under DDP.

    ``param_dtype`` (FSDP only) is the dtype parameters are gathered in for compute;
    gradients are reduced in fp32. ``recompute`` is Llama's.
    """
    with torch.device("meta"):
        model = Llama(config, backend=backend, recompute=recompute)
    if parallel == "fsdp":
        # cast_forward_inputs=False: the rotary tables each block receives stay fp32 (the fused attention
        # requires it); the activations are in param_dtype anyway, from the embedding gathered in it.
        mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)
        for block in model.layers:
            fully_shard(block, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
    model.to_empty(device=d.device)
    # Under FSDP each parameter is a DTensor holding this rank's rows: init_weights draws every
    # parameter whole, as one process does, and copies it in (implicit replication lets the plain
    # full tensor stand for a replicated one), so each rank keeps its own rows of the same draw and
    # the model equals the one-process model of the same seed. (Drawing into the shards directly
    # gave every rank the same numbers: the rows of each weight repeated once per rank.)
    with implicit_replication():
        model.init_weights(seed=seed)
    if parallel == "ddp":
        ids = [d.device.index] if d.device.type == "cuda" else None
        return model, nn.parallel.DistributedDataParallel(model, device_ids=ids)
    return model, model


class Watchdog:
    """Says, from a process waiting on the others, where it waits and for how long.

    A stalled process (stopped, swapping, stuck in I/O) leaves the others blocked in a collective
    until the process group's timeout ends the run, which looked like a silent hang. The loop names
    each region that waits on the other processes with ``waiting(what)``; while one lasts, a daemon
    thread prints a line every ``min(60 s, timeout / 10)``, so the first comes well before the
    timeout fires. With one process it does nothing.
    """

    def __init__(self, d: Dist, timeout_s: float):
        self.rank, self.timeout_s = d.rank, timeout_s
        self.every_s = min(60.0, timeout_s / 10)
        self._region: tuple[str, float] | None = None  # (what, since), replaced whole so the thread reads it safely
        self._stop = threading.Event()
        self._thread = None
        if d.world_size > 1:
            self._thread = threading.Thread(target=self._watch, name="llama_fast-watchdog", daemon=True)
            self._thread.start()

    @contextlib.contextmanager
    def waiting(self, what: str):
        self._region = (what, time.monotonic())
        try:
            yield
        finally:
            self._region = None

    def close(self) -> None:
        self._stop.set()

    def _watch(self) -> None:
        reported = None  # the region last reported, and how many lines it had
        while not self._stop.wait(min(1.0, self.every_s / 4)):
            region = self._region
            if region is None:
                continue
            what, since = region
            waited = time.monotonic() - since
            lines = reported[1] if reported and reported[0] is region else 0
            if waited >= (lines + 1) * self.every_s:
                print(f"llama_fast rank {self.rank}: waiting {waited:.0f} s for the other processes in {what}; one "
                      f"of them may be stalled (train.collective_timeout_s = {self.timeout_s:g} ends the run)",
                      file=sys.stderr, flush=True)
                reported = (region, lines + 1)


def is_fsdp(model: nn.Module) -> bool:
    return isinstance(model, FSDPModule)


def all_reduce_mean(value: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.world_size > 1:
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value = value / d.world_size
    return value


def any_rank(flag: bool, d: Dist) -> bool:
    """True on every rank when it is True on one (e.g. a stop signal seen by some)."""
    if d.world_size == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=d.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def barrier(d: Dist) -> None:
    if d.world_size > 1:
        dist.barrier()


def shutdown(d: Dist) -> None:
    if d.world_size > 1 and dist.is_initialized():
        dist.destroy_process_group()
