"""Checkpoints: written atomically, loaded without unpickling anything.

A checkpoint is a directory ``<run_dir>/checkpoints/step_NNNNNNN``::

    model.safetensors      full (unsharded) model state, fp32
    optimizer.safetensors  AdamW moments and step counts, keyed "<param name>/<state key>"
    optimizer.json         the optimizer's param groups (hyperparameters, param names)
    state.json             step, schedule, data position, the run's full config, the model config
    rng_rank<R>.json       RNG states (torch, cuda, python, numpy) of each process
    tokenizer.model        the tokenizer of the data (for ``llama-fast generate``)

It is written under a temporary name and renamed (``os.replace``) once complete, so a
directory named ``step_*`` is always whole; the last ``keep`` are kept. Tensors are in
safetensors and everything else in JSON, so loading never executes code.

Under FSDP the full state dicts are gathered onto rank 0 (CPU) for writing and each rank
takes its shard when loading (torch.distributed.checkpoint.state_dict with
``full_state_dict=True``), so a checkpoint does not depend on the number of processes
and serves ``generate`` directly. The cost is rank 0's CPU memory holding the full model
and optimizer state; beyond a few billion parameters torch.distributed.checkpoint's
sharded format would be the next step.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from ..config import LlamaConfig
from ..model import Llama
from .parallelize import Dist, barrier

FORMAT = "llama_fast.checkpoint/1"
STEP_DIR = re.compile(r"^step_(\d+)$")


def checkpoint_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(ckpt_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints, oldest first (temporary directories are never listed)."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ckpt_dir.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(ckpt_dir: str | os.PathLike) -> Path | None:
    found = list_checkpoints(ckpt_dir)
    return found[-1] if found else None


def remove_stale_temporaries(ckpt_dir: str | os.PathLike) -> None:
    """Temporaries of a save that was killed halfway."""
    ckpt_dir = Path(ckpt_dir)
    if ckpt_dir.is_dir():
        for p in ckpt_dir.glob(".step_*.tmp"):
            shutil.rmtree(p, ignore_errors=True)


def _rng_state() -> dict:
    np_state = np.random.get_state()
    py_state = random.getstate()
    return dict(
        torch=torch.get_rng_state().tolist(),
        cuda=[s.tolist() for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
        python=[py_state[0], list(py_state[1]), py_state[2]],
        numpy=[np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    )


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def _unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors sharing storage (tied embeddings): copy the repeats."""
    seen, out = set(), {}
    for k, t in tensors.items():
        t = t.detach().contiguous()
        ptr = t.untyped_storage().data_ptr()
        out[k] = t.clone() if ptr in seen else t
        seen.add(ptr)
    return out


def save_checkpoint(
    run_dir: str | os.PathLike,
    step: int,
    model: Llama,
    optimizer: torch.optim.Optimizer,
    state: dict,
    d: Dist,
    keep: int,
    tokenizer_path: str | os.PathLike | None = None,
) -> Path:
    """Write ``step_<step>`` atomically on every rank's behalf; call on all ranks."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_sd = get_model_state_dict(model, options=options)  # collective under FSDP
    optim_sd = get_optimizer_state_dict(model, optimizer, options=options)
    ckpt_dir = checkpoint_dir(run_dir)
    final = ckpt_dir / f"step_{step:07d}"
    tmp = ckpt_dir / f".{final.name}.tmp"
    try:
        if d.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        barrier(d)
        (tmp / f"rng_rank{d.rank}.json").write_text(json.dumps(_rng_state()))
        if d.is_main:
            save_file(_unshared(model_sd), tmp / "model.safetensors")
            tensors, groups = _flatten_optimizer(optim_sd)
            save_file(tensors, tmp / "optimizer.safetensors")
            (tmp / "optimizer.json").write_text(json.dumps(groups))
            (tmp / "state.json").write_text(json.dumps({"format": FORMAT, "world_size": d.world_size, **state}, indent=2))
            if tokenizer_path is not None:
                shutil.copyfile(tokenizer_path, tmp / "tokenizer.model")
        barrier(d)
        if d.is_main:
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            for old in list_checkpoints(ckpt_dir)[:-keep]:
                shutil.rmtree(old)
    except BaseException:
        if d.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    barrier(d)
    return final


def _flatten_optimizer(optim_sd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, scalars = {}, {}
    for name, param_state in optim_sd["state"].items():
        for key, value in param_state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{name}/{key}"] = value.detach().contiguous()
            else:
                scalars[f"{name}/{key}"] = value
    return tensors, {"param_groups": optim_sd["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], groups: dict) -> dict:
    state: dict[str, dict] = {}
    for flat, value in [*tensors.items(), *groups["scalars"].items()]:
        name, _, key = flat.rpartition("/")
        state.setdefault(name, {})[key] = value
    return {"state": state, "param_groups": groups["param_groups"]}


def read_state(path: str | os.PathLike) -> dict:
    path = Path(path)
    state_file = path / "state.json"
    if not state_file.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r}: expected a llama_fast checkpoint directory with state.json")
    state = json.loads(state_file.read_text())
    if state.get("format") != FORMAT:
        raise ValueError(f"checkpoint {path}: expected format {FORMAT!r}, got {state.get('format')!r}")
    return state


def check_model_config(path: Path, saved: dict, current: LlamaConfig) -> None:
    """A clear error when a checkpoint was written for another model shape."""
    now = current.to_dict()
    diff = {k: (saved.get(k), now[k]) for k in now if saved.get(k) != now[k]}
    if diff:
        lines = ", ".join(f"{k}: checkpoint {a!r} vs run {b!r}" for k, (a, b) in diff.items())
        raise ValueError(
            f"checkpoint {path} was written for another model config ({lines}); resume with the same "
            "model settings, or start a new run (another run_dir or checkpoint.resume=never)"
        )


def load_checkpoint(path: str | os.PathLike, model: Llama, optimizer: torch.optim.Optimizer, d: Dist) -> dict:
    """Restore model, optimizer and this rank's RNG states in place; returns state.json."""
    path = Path(path)
    state = read_state(path)
    check_model_config(path, state["model_config"], model.config)
    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, load_file(path / "model.safetensors"), options=options)
    groups = json.loads((path / "optimizer.json").read_text())
    # Moments and step counts come from the checkpoint; hyperparameters and the implementation
    # (fused, foreach) from this run's optimizer, so a resumed run follows its own config.
    for saved, current in zip(groups["param_groups"], optimizer.param_groups):
        saved.update({k: v for k, v in current.items() if k != "params"})
    set_optimizer_state_dict(
        model, optimizer, _unflatten_optimizer(load_file(path / "optimizer.safetensors"), groups), options=options
    )
    # The same rank's RNG when the world size is unchanged, else rank 0's.
    rng_file = path / f"rng_rank{d.rank}.json"
    _set_rng_state(json.loads((rng_file if rng_file.is_file() else path / "rng_rank0.json").read_text()))
    return state


def load_model(
    path: str | os.PathLike, backend: str = "reference", device="cpu", dtype: torch.dtype | None = None
) -> Llama:
    """A model from a checkpoint directory or a run directory (its latest checkpoint)."""
    path = Path(path)
    if not (path / "state.json").is_file() and (latest := latest_checkpoint(checkpoint_dir(path))) is not None:
        path = latest
    state = read_state(path)
    config = LlamaConfig.from_dict(state["model_config"])
    with torch.device("meta"):
        model = Llama(config, backend=backend)
    model.to_empty(device=device)
    model.reset_rope_tables()
    model.load_state_dict(load_file(path / "model.safetensors", device=str(device)))
    if dtype is not None:
        model.to(dtype)
        model.reset_rope_tables()  # the rotary tables stay fp32
    return model.eval()
