"""Checkpoints: written atomically and shard by shard, loaded without unpickling anything.

A checkpoint is a directory ``<run_dir>/checkpoints/step_NNNNNNN``::

    model.rank<R>.safetensors      the rows of each model tensor that process R holds (fp32)
    optimizer.rank<R>.safetensors  the same for the AdamW moments, keyed "<param name>/<state key>"
    index.json                     per tensor: global shape, dtype, and which file holds which rows
    optimizer.json                 the optimizer's param groups (hyperparameters, param names), scalars
    state.json                     step, schedule, data position, the run's full config, the model config
    rng_rank<R>.json               RNG states (torch, cuda, python, numpy) of each process
    tokenizer.model                the tokenizer of the data (for ``llama-fast generate``)

Under FSDP2 every process writes only its own shards (each parameter and moment is split
along dim 0 as ``torch.chunk`` splits it: equal chunks of ceil(rows / processes), the last
shorter, trailing ones possibly empty), so no process ever holds the full state. With one
process or DDP the state is replicated and rank 0 writes it whole: one shard per tensor.
``index.json`` (rank 0 merges what each rank reports having written, and checks that the
slices tile every tensor) is the map. Every process must therefore see the same run directory
(on several nodes, a filesystem they share). Loading reshards: each process reads, memory-mapped,
only the rows of ITS current shard, so a checkpoint written by N processes resumes on M
(FSDP, DDP or one process); ``load_model`` assembles whole tensors for ``generate``/export.

Checkpoints of format ``llama_fast.checkpoint/1`` (one ``model.safetensors`` and one
``optimizer.safetensors`` of whole tensors, written before sharding) still load: they read
as a checkpoint of one shard.

It is written under a temporary name and renamed (``os.replace``) once complete, and an old
one is renamed out of the ``step_*`` names before it is deleted, so a directory named
``step_*`` is always whole; the last ``keep`` are kept. Tensors are in safetensors and
everything else in JSON, so loading never executes code.

``index.json`` also holds the size and a checksum of every other file (``files``), each
computed by the process that wrote the file; loading verifies the files it reads against them,
and every file an index names must lie inside the checkpoint directory. A checkpoint that is
damaged (a file missing, truncated or altered, broken JSON, missing keys, wrong types) raises
``CheckpointError`` naming the checkpoint, the file and what is wrong.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor

from ..config import LlamaConfig
from ..model import Llama
from .parallelize import Dist, any_rank

FORMAT = "llama_fast.checkpoint/2"
FORMAT_WHOLE = "llama_fast.checkpoint/1"  # one model.safetensors / optimizer.safetensors of whole tensors
KINDS = ("model", "optimizer")
INDEX = "index.json"
# get_/set_optimizer_state_dict keyed by the model's parameter names; DTensors stay sharded.
SHARDED = StateDictOptions(full_state_dict=False)
STEP_DIR = re.compile(r"^step_(\d+)$")
# Checksums: SHA-256 over the SHA-256 digests of the file's chunks of this size, hashed on parallel threads.
CHECKSUM = "sha256_chunks"
CHECKSUM_CHUNK_BYTES = 16 << 20


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as it is on disk (a file missing, truncated or altered, broken
    JSON, missing keys, wrong types, a path leaving the directory); names the checkpoint and the file."""

    def __init__(self, path: str | os.PathLike, file: str, problem: str):
        self.path, self.file, self.problem = Path(path), file, problem
        super().__init__(f"checkpoint {path}: {file}: {problem}")


@contextlib.contextmanager
def _reading(path: Path, file: str):
    """Errors raised while reading ``file`` of checkpoint ``path`` (what a damaged file makes the JSON,
    safetensors and torch calls raise) become a CheckpointError naming both."""
    try:
        yield
    except CheckpointError:
        raise
    except KeyError as e:
        raise CheckpointError(path, file, f"missing key {e}") from e
    except (IndexError, TypeError, ValueError, AttributeError, OverflowError, RuntimeError, OSError,
            SafetensorError) as e:
        raise CheckpointError(path, file, f"{type(e).__name__}: {e}") from e


def checked_field(obj, key: str, kind: type, path: Path, file: str, what: str = ""):
    """obj[key], checked to be a JSON object holding it with a value of type ``kind`` (``what``: where in the file)."""
    where = f"{what}: " if what else ""
    if not isinstance(obj, dict):
        raise CheckpointError(path, file, f"{where}expected a JSON object holding {key!r}, got {type(obj).__name__}")
    if key not in obj:
        raise CheckpointError(path, file, f"{where}missing key {key!r}")
    value = obj[key]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise CheckpointError(path, file, f"{where}{key!r} should be {kind.__name__}, got {type(value).__name__} "
                                          f"{str(value)[:80]!r}")
    return value


def file_checksum(path: str | os.PathLike) -> str:
    """SHA-256 over the SHA-256 digests of the file's 16 MiB chunks, which threads read and hash in parallel
    (hashlib and file reads release the GIL), so its speed grows with the cores (README: the measured cost)."""
    path = Path(path)
    chunks = range(0, max(1, path.stat().st_size), CHECKSUM_CHUNK_BYTES)

    def chunk_digest(offset: int) -> bytes:
        with open(path, "rb") as f:
            f.seek(offset)
            return hashlib.sha256(f.read(CHECKSUM_CHUNK_BYTES)).digest()

    with ThreadPoolExecutor(max_workers=min(len(chunks), os.cpu_count() or 1, 8)) as pool:
        return hashlib.sha256(b"".join(pool.map(chunk_digest, chunks))).hexdigest()


def _checksums(directory: Path, files) -> dict:
    return {f: {"size": (directory / f).stat().st_size, CHECKSUM: file_checksum(directory / f)} for f in files}


def _inside(path: Path, file, where: str) -> Path:
    """``path / file`` for a plain file name that stays inside the checkpoint directory (a name in index.json
    like '../step_N/...', an absolute path or a symlink out would read weights from elsewhere)."""
    if not isinstance(file, str) or file in ("", ".", "..") or "/" in file or "\\" in file or os.path.isabs(file):
        raise CheckpointError(path, where, f"file {file!r} is not a plain file name inside the checkpoint directory; "
                                           "refusing a path that leaves it")
    full = path / file
    if full.resolve().parent != path.resolve():
        raise CheckpointError(path, where, f"file {file!r} resolves to {full.resolve()}, outside the checkpoint "
                                           "directory; refusing it")
    return full


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
    """Temporaries of a save, and checkpoints being retired, that a kill left halfway."""
    ckpt_dir = Path(ckpt_dir)
    if ckpt_dir.is_dir():
        for p in (*ckpt_dir.glob(".step_*.tmp"), *ckpt_dir.glob(".step_*.retired")):
            shutil.rmtree(p, ignore_errors=True)


def _retire(path: Path) -> None:
    """Delete a checkpoint: renamed out of the ``step_*`` names first, so a kill during the deletion
    leaves a hidden ``.step_*.retired`` (removed at the next start), never a partial ``step_*``."""
    retired = path.with_name(f".{path.name}.retired")
    shutil.rmtree(retired, ignore_errors=True)
    os.replace(path, retired)
    shutil.rmtree(retired)


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


# ---- shards -------------------------------------------------------------------------------
def shard_rows(rows: int, shards: int, index: int) -> tuple[int, int]:
    """Rows [start, stop) of shard ``index`` of ``shards`` under torch.chunk's rule (FSDP2's).

    Chunks of ceil(rows / shards) rows; the last non-empty one may be shorter and the ones
    after it are empty (5 rows in 4 shards: 2, 2, 1, 0).
    """
    if shards < 1 or not 0 <= index < shards:
        raise ValueError(f"shard index: expected 0 <= index < shards (shards >= 1), got index {index} of {shards}")
    chunk = -(-rows // shards)
    start = min(index * chunk, rows)
    return start, min(start + chunk, rows)


def _local_part(tensor: torch.Tensor, rank: int) -> tuple[torch.Tensor, tuple[int, int] | None, bool]:
    """(this process's part of ``tensor``, its rows of the global tensor, whether this process writes it).

    A DTensor is FSDP2's: sharded along dim 0 over one mesh dimension (torch.chunk's rule),
    replicated over any others (only coordinate 0 of those writes). A plain tensor is
    replicated (one process, DDP, the optimizer's step counts): rank 0 writes it whole.
    Rows are None for a 0-dim tensor.
    """
    if not isinstance(tensor, DTensor):
        return tensor, ((0, tensor.shape[0]) if tensor.ndim else None), rank == 0
    placements, mesh = tensor.placements, tensor.device_mesh
    shard_dims = [i for i, p in enumerate(placements) if p.is_shard(dim=0)]
    if len(shard_dims) > 1 or any(not (p.is_shard(dim=0) or p.is_replicate()) for p in placements):
        raise ValueError(
            f"checkpoint: expected DTensors sharded along dim 0 over at most one mesh dimension (FSDP2's "
            f"Shard(0)) and replicated over the others, got placements {placements}"
        )
    coord = mesh.get_coordinate()
    writer = all(coord[i] == 0 for i, p in enumerate(placements) if p.is_replicate())
    rows = (0, tensor.shape[0])
    if shard_dims:
        rows = shard_rows(tensor.shape[0], mesh.size(shard_dims[0]), coord[shard_dims[0]])
    local = tensor.to_local()
    expected = (rows[1] - rows[0], *tensor.shape[1:])
    if tuple(local.shape) != expected:
        raise RuntimeError(
            f"checkpoint: a shard of rows {rows[0]}:{rows[1]} of a {tuple(tensor.shape)} tensor should have shape "
            f"{expected}, but this process holds {tuple(local.shape)} (placements {placements})"
        )
    return local, rows, writer


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _write_shards(tmp: Path, kind: str, tensors: dict[str, torch.Tensor], rank: int) -> dict:
    """Write this process's parts of ``tensors`` to ``<kind>.rank<R>.safetensors``; returns their index entries.

    An entry holds the global shape and dtype, and the file and rows when this process wrote some.
    """
    file = f"{kind}.rank{rank}.safetensors"
    parts, entries = {}, {}
    for name, tensor in tensors.items():
        local, rows, writer = _local_part(tensor, rank)
        if not writer:
            continue
        entry = entries[name] = {"shape": list(tensor.shape), "dtype": _dtype_name(tensor.dtype)}
        if rows is None or rows[1] > rows[0]:
            parts[name] = local.detach().to("cpu")
            entry["slice"] = {"file": file} if rows is None else {"file": file, "start": rows[0], "stop": rows[1]}
    if parts:
        save_file(_unshared(parts), tmp / file)
    return entries


def _check_slices(where: str, name: str, entry: dict) -> None:
    """The slices of a tensor tile its rows exactly (a 0-dim tensor: one whole copy)."""
    slices = entry["slices"]
    if not entry["shape"]:
        if len(slices) != 1 or "start" in slices[0]:
            raise ValueError(f"{where}: 0-dim tensor {name!r} should be stored whole exactly once, got slices {slices}")
        return
    row = 0
    for s in sorted(slices, key=lambda s: s["start"]):
        if s["start"] != row or s["stop"] <= s["start"]:
            raise ValueError(
                f"{where}: {name!r} has rows {s['start']}:{s['stop']} in {s['file']} where row {row} should start; "
                f"expected slices tiling rows 0:{entry['shape'][0]} without gaps or overlaps"
            )
        row = s["stop"]
    if row != entry["shape"][0]:
        raise ValueError(f"{where}: the slices of {name!r} end at row {row}, expected {entry['shape'][0]} rows")


def _merge_index(tmp: Path, world_size: int) -> dict:
    """index.json from the entries each rank wrote (index.rank<R>.json, removed here)."""
    index = {"format": FORMAT, "world_size": world_size, **{kind: {} for kind in KINDS}, "files": {}}
    for rank in range(world_size):
        part_file = tmp / f"index.rank{rank}.json"
        if not part_file.is_file():
            raise FileNotFoundError(
                f"checkpoint {tmp}: rank {rank} wrote no {part_file.name} here; every process must see the same "
                "run directory (on several nodes, a filesystem they share)"
            )
        part = json.loads(part_file.read_text())
        index["files"].update(part.pop("files", {}))
        for kind, entries in part.items():
            for name, entry in entries.items():
                merged = index[kind].setdefault(name, {"shape": entry["shape"], "dtype": entry["dtype"], "slices": []})
                if (merged["shape"], merged["dtype"]) != (entry["shape"], entry["dtype"]):
                    raise RuntimeError(
                        f"checkpoint: rank {rank} wrote {name!r} as {entry['dtype']} {entry['shape']}, another rank as "
                        f"{merged['dtype']} {merged['shape']}"
                    )
                if "slice" in entry:
                    merged["slices"].append(entry["slice"])
        part_file.unlink()
    for kind in KINDS:
        for name, entry in index[kind].items():
            entry["slices"].sort(key=lambda s: s.get("start", 0))
            _check_slices(f"checkpoint {tmp}", name, entry)
    return index


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
    """Write ``step_<step>`` atomically, each rank its own shards; call on all ranks.

    Each phase ends with every rank learning whether any rank failed in it (an all-reduce in
    place of a barrier), so a rank that cannot write its shards (disk full) makes every rank
    raise, rank 0 removes the temporary, and no rank is left waiting at a barrier.
    """
    model_sd = get_model_state_dict(model, options=SHARDED)  # DTensors under FSDP: nothing is gathered
    tensors, groups = _flatten_optimizer(get_optimizer_state_dict(model, optimizer, options=SHARDED))
    ckpt_dir = checkpoint_dir(run_dir)
    final = ckpt_dir / f"step_{step:07d}"
    tmp = ckpt_dir / f".{final.name}.tmp"

    def start() -> None:
        if d.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)

    def write_own_part() -> None:
        rng_file = f"rng_rank{d.rank}.json"
        (tmp / rng_file).write_text(json.dumps(_rng_state()))
        entries = {"model": _write_shards(tmp, "model", model_sd, d.rank),
                   "optimizer": _write_shards(tmp, "optimizer", tensors, d.rank)}
        written = {rng_file} | {s["file"] for kind in KINDS for e in entries[kind].values() if (s := e.get("slice"))}
        if d.is_main:
            (tmp / "optimizer.json").write_text(json.dumps(groups))
            (tmp / "state.json").write_text(json.dumps({"format": FORMAT, "world_size": d.world_size, **state}, indent=2))
            written |= {"optimizer.json", "state.json"}
            if tokenizer_path is not None:
                shutil.copyfile(tokenizer_path, tmp / "tokenizer.model")
                written.add("tokenizer.model")
        entries["files"] = _checksums(tmp, sorted(written))  # each rank hashes what it wrote
        (tmp / f"index.rank{d.rank}.json").write_text(json.dumps(entries))

    def finish() -> None:
        if d.is_main:
            (tmp / INDEX).write_text(json.dumps(_merge_index(tmp, d.world_size), indent=1))
            if final.exists():
                _retire(final)
            os.replace(tmp, final)
            # The last ``keep`` by step, and never the one just written (a run resumed from an earlier
            # checkpoint into the same directory writes steps below the ones already there).
            for old in list_checkpoints(ckpt_dir)[:-keep]:
                if old != final:
                    _retire(old)

    try:
        for phase in (start, write_own_part, finish):
            _on_every_rank(phase, d)
    except BaseException:
        if d.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _on_every_rank(phase, d: Dist) -> None:
    """Run ``phase`` here, then raise on every rank if it raised on any (a barrier that carries failure)."""
    error = None
    try:
        phase()
    except Exception as e:  # re-raised below, after the other ranks have heard of it
        error = e
    if any_rank(error is not None, d):
        if error is not None:
            raise error
        raise RuntimeError(f"checkpoint: another process failed while writing its part of the checkpoint "
                           f"({phase.__name__}); see its error")


def _flatten_optimizer(optim_sd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, scalars = {}, {}
    for name, param_state in optim_sd["state"].items():
        for key, value in param_state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{name}/{key}"] = value.detach()
            else:
                scalars[f"{name}/{key}"] = value
    return tensors, {"param_groups": optim_sd["param_groups"], "scalars": scalars}


# ---- reading ------------------------------------------------------------------------------
def _read_json(path: Path, file: str, checksums: dict | None = None):
    """The parsed JSON ``file`` of checkpoint ``path``, verified first when ``checksums`` (index.json's) are given."""
    if not _inside(path, file, file).is_file():
        raise CheckpointError(path, file, "missing")
    _verify(path, file, checksums)
    with _reading(path, file):
        return json.loads((path / file).read_text())


def _verify(path: Path, file: str, checksums: dict | None) -> None:
    """``file`` has the size and checksum index.json records (None: a checkpoint written before checksums)."""
    if checksums is None:
        return
    if file not in checksums:
        raise CheckpointError(path, file, f"{INDEX} records no checksum for it")
    size, expected = (path / file).stat().st_size, checksums[file]
    if size != expected["size"]:
        raise CheckpointError(path, file, f"{size} bytes where {INDEX} records {expected['size']} (truncated or "
                                          "extended since it was written)")
    if file_checksum(path / file) != expected[CHECKSUM]:
        raise CheckpointError(path, file, f"its contents do not match the checksum in {INDEX} (corrupted since it "
                                          "was written)")


def read_state(path: str | os.PathLike) -> dict:
    """state.json, checked to be a JSON object of a known format (not verified: see ShardReader)."""
    path = Path(path)
    if not (path / "state.json").is_file():
        raise CheckpointError(path, "state.json", "missing; expected a llama_fast checkpoint directory holding it")
    state = _read_json(path, "state.json")
    fmt = checked_field(state, "format", str, path, "state.json")
    if fmt not in (FORMAT, FORMAT_WHOLE):
        raise CheckpointError(path, "state.json", f"expected format {FORMAT!r} or {FORMAT_WHOLE!r}, got {fmt!r}")
    return state


def _check_index(path: Path, index) -> None:
    """index.json's structure: every entry typed, every file a name inside the checkpoint, slices tiling rows."""
    for kind in KINDS:
        for name, entry in checked_field(index, kind, dict, path, INDEX).items():
            what = f"{kind} tensor {name!r}"
            shape = checked_field(entry, "shape", list, path, INDEX, what)
            if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape):
                raise CheckpointError(path, INDEX, f"{what}: shape should be a list of sizes, got {shape!r:.80}")
            dtype = checked_field(entry, "dtype", str, path, INDEX, what)
            if not isinstance(getattr(torch, dtype, None), torch.dtype):
                raise CheckpointError(path, INDEX, f"{what}: dtype {dtype!r:.40} names no torch dtype")
            for s in checked_field(entry, "slices", list, path, INDEX, what):
                _inside(path, checked_field(s, "file", str, path, INDEX, what), INDEX)
                for key in ("start", "stop") if shape else ():
                    checked_field(s, key, int, path, INDEX, what)
            with _reading(path, INDEX):
                _check_slices(f"{what}", name, entry)
    files = index.get("files")
    if files is not None:
        for file in checked_field(index, "files", dict, path, INDEX):
            _inside(path, file, INDEX)
            checked_field(files[file], "size", int, path, INDEX, f"files[{file!r}]")
            checked_field(files[file], CHECKSUM, str, path, INDEX, f"files[{file!r}]")


class ShardReader:
    """Rows of the tensors of a checkpoint, read memory-mapped from whichever files hold them.

    Use as a context manager (it keeps the files it opened open until exit). The index is
    checked when opened; each file is verified against its checksum the first time it is read;
    every read checks the index (global shape, slices tiling the rows) against what the files hold.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.state = read_state(self.path)
        self.format = self.state["format"]
        self.index = {}  # format 1: built per kind from the file's header on first use (see entries)
        self.checksums = None  # index.json's "files"; None before checksums existed (and in format 1)
        self._verified: set[str] = set()
        if self.format == FORMAT:
            if not (self.path / INDEX).is_file():
                raise CheckpointError(self.path, INDEX, f"missing (a checkpoint of format {FORMAT!r} has one)")
            self.index = _read_json(self.path, INDEX)
            _check_index(self.path, self.index)
            self.checksums = self.index.get("files")
            self.verify("state.json")
        self._files: dict[str, object] = {}
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> "ShardReader":
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def verify(self, file: str) -> None:
        if file not in self._verified:
            _verify(self.path, file, self.checksums)
            self._verified.add(file)

    def json(self, file: str):
        """A JSON file of the checkpoint, verified."""
        return _read_json(self.path, file, self.checksums)

    def entries(self, kind: str) -> dict:
        """name -> {"shape", "dtype", "slices"} of the ``kind`` ("model" or "optimizer") tensors."""
        if kind not in self.index:  # format 1: every tensor whole in <kind>.safetensors
            if self.format != FORMAT_WHOLE:
                raise CheckpointError(self.path, INDEX, f"no {kind!r} section")
            file = f"{kind}.safetensors"
            if not (self.path / file).is_file():
                raise CheckpointError(self.path, file, f"missing (a checkpoint of format {FORMAT_WHOLE!r} has one)")
            entries = self.index[kind] = {}
            with _reading(self.path, file), safe_open(self.path / file, framework="pt", device="cpu") as f:
                for name in f.keys():
                    shape = f.get_slice(name).get_shape()
                    probe = f.get_slice(name)[0:0] if shape else f.get_tensor(name)  # no data read for the dtype
                    whole = {"file": file, "start": 0, "stop": shape[0]} if shape else {"file": file}
                    entries[name] = {"shape": shape, "dtype": _dtype_name(probe.dtype), "slices": [whole]}
        return self.index[kind]

    def _open(self, file: str, name: str):
        if file not in self._files:
            if not _inside(self.path, file, INDEX).is_file():
                raise CheckpointError(self.path, file,
                                      f"no such file, though {INDEX} lists it (holding part of {name!r})")
            self.verify(file)
            with _reading(self.path, file):
                self._files[file] = self._stack.enter_context(safe_open(self.path / file, framework="pt", device="cpu"))
        handle = self._files[file]
        if name not in handle.keys():
            raise CheckpointError(self.path, file, f"{name!r} is missing, though {INDEX} says this file holds it")
        return handle

    def check_names(self, kind: str, names) -> None:
        """The checkpoint holds exactly these tensors of ``kind`` (a clear error for missing or extra ones)."""
        saved, wanted = set(self.entries(kind)), set(names)
        if saved != wanted:
            raise CheckpointError(
                self.path, INDEX if self.format == FORMAT else f"{kind}.safetensors",
                f"{kind} tensors missing from the shards: {sorted(wanted - saved)}; "
                f"unexpected: {sorted(saved - wanted)}"
            )

    def shape(self, kind: str, name: str) -> list[int]:
        return self._entry(kind, name)["shape"]

    def _entry(self, kind: str, name: str) -> dict:
        entry = self.entries(kind).get(name)
        if entry is None:
            raise CheckpointError(self.path, INDEX,
                                  f"{kind} tensor {name!r} is missing from the shards ({INDEX} lacks it)")
        return entry

    def read(self, kind: str, name: str, shape, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """Rows [start, stop) (all by default) of tensor ``name``, whose global shape must be ``shape``."""
        entry = self._entry(kind, name)
        if list(shape) != entry["shape"]:
            raise CheckpointError(self.path, INDEX,
                                  f"{name!r} has shape {entry['shape']} in the checkpoint, expected {list(shape)}")
        dtype = getattr(torch, entry["dtype"])
        if not entry["shape"]:
            (s,) = entry["slices"]
            handle = self._open(s["file"], name)
            with _reading(self.path, s["file"]):
                parts = [(s["file"], handle.get_tensor(name))]
        else:
            start, stop = rows if rows is not None else (0, entry["shape"][0])
            parts = []
            for s in sorted(entry["slices"], key=lambda s: s["start"]):
                lo, hi = max(start, s["start"]), min(stop, s["stop"])
                if lo >= hi:
                    continue
                handle = self._open(s["file"], name)
                with _reading(self.path, s["file"]):
                    piece = handle.get_slice(name)
                    expected = [s["stop"] - s["start"], *entry["shape"][1:]]
                    if piece.get_shape() != expected:
                        raise CheckpointError(
                            self.path, s["file"], f"holds {name!r} with shape {piece.get_shape()}; {INDEX} says rows "
                            f"{s['start']}:{s['stop']} of {entry['shape']}, shape {expected}"
                        )
                    parts.append((s["file"], piece[lo - s["start"]:hi - s["start"]]))
            if not parts:
                return torch.empty((0, *entry["shape"][1:]), dtype=dtype)
        for file, part in parts:
            if part.dtype != dtype:
                raise CheckpointError(self.path, file, f"{name!r} is stored as {part.dtype}; {INDEX} says {dtype}")
        return parts[0][1] if len(parts) == 1 else torch.cat([part for _, part in parts])


def _load_model_state(reader: ShardReader, model: Llama) -> dict[str, torch.Tensor]:
    """Copy each of this process's parameter shards from the checkpoint; returns the (sharded) state dict."""
    model_sd = get_model_state_dict(model, options=SHARDED)  # the parameters themselves (DTensors under FSDP)
    reader.check_names("model", model_sd)
    with torch.no_grad():
        for name, target in model_sd.items():
            local, rows, _ = _local_part(target, rank=0)  # (whether rank 0 would write it does not matter here)
            local.copy_(reader.read("model", name, target.shape, rows))
    return model_sd


def _load_optimizer_state(reader: ShardReader, model_sd: dict, groups: dict) -> dict:
    """The sharded optimizer state dict (get_optimizer_state_dict's layout) of this process.

    A state tensor shaped like its parameter (AdamW's moments) is sharded like it; any
    other (the step count, 0-dim) is read whole.
    """
    state: dict[str, dict] = {}
    for flat in reader.entries("optimizer"):
        name, _, key = flat.rpartition("/")
        if name not in model_sd:
            raise CheckpointError(reader.path, INDEX, f"optimizer state {flat!r} names no parameter of the model")
        param = model_sd[name]
        if reader.shape("optimizer", flat) == list(param.shape) and param.ndim:
            local, rows, _ = _local_part(param, rank=0)
            value = reader.read("optimizer", flat, param.shape, rows).to(local.device)
            if isinstance(param, DTensor):
                value = DTensor.from_local(value, param.device_mesh, param.placements, run_check=False,
                                           shape=param.shape, stride=param.stride())
        else:
            value = reader.read("optimizer", flat, reader.shape("optimizer", flat))
        state.setdefault(name, {})[key] = value
    for flat, value in groups["scalars"].items():
        name, _, key = flat.rpartition("/")
        state.setdefault(name, {})[key] = value
    return {"state": state, "param_groups": groups["param_groups"]}


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
    """Restore model, optimizer (this process's shards of them) and RNG states in place; returns state.json.

    Reads only, no collective: a CheckpointError (the checkpoint is damaged) leaves the model and
    optimizer partly overwritten, which loading another checkpoint overwrites whole.
    """
    path = Path(path)
    with ShardReader(path) as reader:
        state = reader.state
        checked_field(state, "step", int, path, "state.json")
        check_model_config(path, _saved_model_config(path, state).to_dict(), model.config)
        groups = reader.json("optimizer.json")
        saved_groups = checked_field(groups, "param_groups", list, path, "optimizer.json")
        checked_field(groups, "scalars", dict, path, "optimizer.json")
        if len(saved_groups) != len(optimizer.param_groups) or not all(isinstance(g, dict) for g in saved_groups):
            raise CheckpointError(path, "optimizer.json", f"expected {len(optimizer.param_groups)} parameter groups "
                                                          f"(JSON objects), got {str(saved_groups)[:120]}")
        # Moments and step counts come from the checkpoint; hyperparameters and the implementation
        # (fused, foreach) from this run's optimizer, so a resumed run follows its own config.
        for saved, current in zip(saved_groups, optimizer.param_groups):
            saved.update({k: v for k, v in current.items() if k != "params"})
        model_sd = _load_model_state(reader, model)
        optim_sd = _load_optimizer_state(reader, model_sd, groups)
        with _reading(path, "optimizer.json"):
            set_optimizer_state_dict(model, optimizer, optim_sd, options=SHARDED)
        # The same rank's RNG when the world size is unchanged, else rank 0's.
        rng_file = f"rng_rank{d.rank}.json" if (path / f"rng_rank{d.rank}.json").is_file() else "rng_rank0.json"
        rng = reader.json(rng_file)
        with _reading(path, rng_file):
            _set_rng_state(rng)
    return state


def _saved_model_config(path: Path, state: dict) -> LlamaConfig:
    """The LlamaConfig in state.json (one that does not parse is damage, not another model)."""
    saved = checked_field(state, "model_config", dict, path, "state.json")
    with _reading(path, "state.json"):
        return LlamaConfig.from_dict(saved)


def load_model(
    path: str | os.PathLike, backend: str = "reference", device="cpu", dtype: torch.dtype | None = None
) -> Llama:
    """A whole model from a checkpoint directory or a run directory (its latest checkpoint), any shard count."""
    path = Path(path)
    if not (path / "state.json").is_file() and (latest := latest_checkpoint(checkpoint_dir(path))) is not None:
        path = latest
    with ShardReader(path) as reader:
        config = _saved_model_config(path, reader.state)
        with torch.device("meta"):
            model = Llama(config, backend=backend)
        model.to_empty(device=device)  # (ties the embeddings again and computes the rotary tables)
        _load_model_state(reader, model)
    if dtype is not None:
        model.to(dtype)
        model.reset_rope_tables()  # the rotary tables stay fp32
    return model.eval()
