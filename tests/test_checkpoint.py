"""Sharded checkpoints without processes: torch.chunk's row split, assembling rows from shard files,
the index checks and their errors, a one-process round trip and format-1 checkpoints.

The multi-process side (FSDP ranks writing their shards, resuming on another world size) is
tests/test_train.py::test_fsdp_resumes_a_checkpoint_and_matches_one_process.
"""
import json
import shutil
from pathlib import Path

import pytest
import torch
from torchrun_helpers import run_script
from safetensors.torch import load_file, save_file

from llama_fast import Llama, LlamaConfig
from llama_fast.train import checkpoint as ckpt
from llama_fast.train.parallelize import Dist


@pytest.mark.parametrize("shards", [1, 2, 3, 4, 5])
def test_shard_rows_follow_torch_chunk(shards):
    for rows in (0, 1, 2, 5, 6, 7, 64, 86, 256):
        chunks = [len(c) for c in torch.arange(rows).chunk(shards)]
        widths = chunks + [0] * (shards - len(chunks))  # FSDP2 pads torch.chunk's list with empty shards
        got = [ckpt.shard_rows(rows, shards, i) for i in range(shards)]
        assert [b - a for a, b in got] == widths, (rows, shards)
        assert [a for a, _ in got] == [min(sum(widths[:i]), rows) for i in range(shards)], (rows, shards)


def test_shard_rows_rejects_bad_indices():
    with pytest.raises(ValueError, match="expected 0 <= index < shards .* got index 2 of 2"):
        ckpt.shard_rows(5, 2, 2)
    with pytest.raises(ValueError, match="got index 0 of 0"):
        ckpt.shard_rows(5, 0, 0)


def write_rank(directory, rank, parts: dict) -> None:
    """What rank ``rank`` of a save leaves behind: its rows of each tensor and its index entries.

    ``parts``: name -> (the full tensor, (start, stop) rows, or None for a 0-dim tensor).
    """
    file = f"model.rank{rank}.safetensors"
    tensors, entries = {}, {}
    for name, (full, rows) in parts.items():
        entry = entries[name] = {"shape": list(full.shape), "dtype": str(full.dtype).removeprefix("torch.")}
        if rows is None:
            tensors[name] = full.clone()
            entry["slice"] = {"file": file}
        elif rows[1] > rows[0]:
            tensors[name] = full[rows[0]:rows[1]].clone()
            entry["slice"] = {"file": file, "start": rows[0], "stop": rows[1]}
    if tensors:
        save_file(tensors, directory / file)
    (directory / f"index.rank{rank}.json").write_text(json.dumps({"model": entries, "optimizer": {}}))


@pytest.fixture
def sharded(tmp_path):
    """A 4-rank checkpoint by hand: w (7, 3) in rows 2, 2, 2, 1; v (2,) in 1, 1, 0, 0; a scalar on rank 0."""
    w, v, s = torch.randn(7, 3), torch.randn(2, dtype=torch.float64), torch.tensor(3.0)
    w_rows = [ckpt.shard_rows(7, 4, r) for r in range(4)]
    v_rows = [ckpt.shard_rows(2, 4, r) for r in range(4)]
    for rank in range(4):
        write_rank(tmp_path, rank, {"w": (w, w_rows[rank]), "v": (v, v_rows[rank]), **({"s": (s, None)} if rank == 0 else {})})
    index = ckpt._merge_index(tmp_path, 4)
    del index["files"]  # no checksums (as before they existed), so the tests below can alter the files
    index["model"]["w"]["slices"].reverse()  # the reader must not rely on the order of the slices
    (tmp_path / ckpt.INDEX).write_text(json.dumps(index))
    (tmp_path / "state.json").write_text(json.dumps({"format": ckpt.FORMAT}))
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "index.json", "model.rank0.safetensors", "model.rank1.safetensors", "model.rank2.safetensors",
        "model.rank3.safetensors", "state.json"]  # merged fragments are gone; empty shards write nothing
    return tmp_path, {"w": w, "v": v, "s": s}


def test_reader_assembles_any_rows_from_the_shard_files(sharded):
    path, full = sharded
    index = json.loads((path / ckpt.INDEX).read_text())
    assert index["model"]["w"]["slices"][::-1] == [
        {"file": f"model.rank{r}.safetensors", "start": 2 * r, "stop": min(2 * r + 2, 7)} for r in range(4)]
    assert index["model"]["v"] == {"shape": [2], "dtype": "float64", "slices": [
        {"file": "model.rank0.safetensors", "start": 0, "stop": 1}, {"file": "model.rank1.safetensors", "start": 1, "stop": 2}]}
    with ckpt.ShardReader(path) as reader:
        for start in range(8):
            for stop in range(start, 8):  # within one file, across two or three, empty
                torch.testing.assert_close(reader.read("model", "w", (7, 3), (start, stop)), full["w"][start:stop],
                                           rtol=0, atol=0, msg=f"{start}:{stop}")
        torch.testing.assert_close(reader.read("model", "w", (7, 3)), full["w"], rtol=0, atol=0)
        torch.testing.assert_close(reader.read("model", "v", (2,)), full["v"], rtol=0, atol=0)
        torch.testing.assert_close(reader.read("model", "s", ()), full["s"], rtol=0, atol=0)
        # Resharding 4 -> 3: each new shard's rows.
        for rank in range(3):
            a, b = ckpt.shard_rows(7, 3, rank)
            torch.testing.assert_close(reader.read("model", "w", (7, 3), (a, b)), full["w"][a:b], rtol=0, atol=0)


def test_reader_errors_name_the_tensor_and_the_file(sharded):
    path, full = sharded
    with ckpt.ShardReader(path) as reader:
        with pytest.raises(ValueError, match="'w' has shape \\[7, 3\\] in the checkpoint, expected \\[8, 3\\]"):
            reader.read("model", "w", (8, 3))
        with pytest.raises(ValueError, match="model tensor 'x' is missing from the shards"):
            reader.read("model", "x", (7, 3))
        with pytest.raises(ValueError, match="model tensors missing from the shards: \\['x'\\]; unexpected: \\['v'\\]"):
            reader.check_names("model", ["w", "s", "x"])
    save_file({"w": full["w"][2:5].clone()}, path / "model.rank1.safetensors")  # 3 rows where the index says 2
    with ckpt.ShardReader(path) as reader:
        torch.testing.assert_close(reader.read("model", "w", (7, 3), (0, 2)), full["w"][:2], rtol=0, atol=0)
        with pytest.raises(ValueError, match="model.rank1.safetensors: holds 'w' with shape \\[3, 3\\]; index.json "
                                             "says "
                                             "rows 2:4 of \\[7, 3\\], shape \\[2, 3\\]"):
            reader.read("model", "w", (7, 3), (1, 3))
        with pytest.raises(ckpt.CheckpointError, match="model.rank1.safetensors: 'v' is missing, though index.json "
                                                       "says "
                                                       "this file holds it"):
            reader.read("model", "v", (2,))
    save_file({"w": full["w"][2:4].double(), "v": full["v"][1:2].clone()}, path / "model.rank1.safetensors")
    with ckpt.ShardReader(path) as reader, pytest.raises(ValueError, match="'w' is stored as torch.float64; index.json says torch.float32"):
        reader.read("model", "w", (7, 3))
    (path / "model.rank2.safetensors").unlink()
    with ckpt.ShardReader(path) as reader:
        torch.testing.assert_close(reader.read("model", "w", (7, 3), (0, 2)), full["w"][:2], rtol=0, atol=0)
        with pytest.raises(ckpt.CheckpointError, match="model.rank2.safetensors: no such file, though index.json lists "
                                                       "it \\(holding part of 'w'\\)"):
            reader.read("model", "w", (7, 3), (3, 6))


def test_the_index_must_tile_every_tensor(tmp_path):
    w = torch.randn(6, 2)
    cases = {  # rows each of 2 ranks claims -> the error
        "gap": ([(0, 3), (4, 6)], "'w' has rows 4:6 in model.rank1.safetensors where row 3 should start"),
        "overlap": ([(0, 4), (3, 6)], "'w' has rows 3:6 in model.rank1.safetensors where row 4 should start"),
        "short": ([(0, 3), (3, 5)], "the slices of 'w' end at row 5, expected 6 rows"),
    }
    for case, (rows, message) in cases.items():
        directory = tmp_path / case
        directory.mkdir()
        for rank in range(2):
            write_rank(directory, rank, {"w": (w, rows[rank])})
        with pytest.raises(ValueError, match=message):
            ckpt._merge_index(directory, 2)
    directory = tmp_path / "disagree"
    directory.mkdir()
    write_rank(directory, 0, {"w": (w, (0, 3))})
    write_rank(directory, 1, {"w": (w.double(), (3, 6))})
    with pytest.raises(RuntimeError, match="rank 1 wrote 'w' as float64 \\[6, 2\\], another rank as float32 \\[6, 2\\]"):
        ckpt._merge_index(directory, 2)


def trained_tiny(seed: int) -> tuple[Llama, torch.optim.AdamW]:
    torch.manual_seed(seed)
    model = Llama(LlamaConfig.from_name("tiny"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tokens = torch.randint(0, model.config.vocab_size, (2, 17))
    model(tokens[:, :-1], tokens[:, 1:])[1].backward()
    optimizer.step()
    return model, optimizer


def test_one_process_round_trip_and_format_1(tmp_path):
    """One process writes one shard per tensor; it loads back exactly, and so does the same checkpoint in the
    layout of format 1 (model.safetensors / optimizer.safetensors, no index)."""
    model, optimizer = trained_tiny(0)
    d = Dist(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    saved = ckpt.save_checkpoint(tmp_path, 5, model, optimizer, {"step": 5, "model_config": model.config.to_dict()}, d,
                                 keep=1)
    assert sorted(p.name for p in saved.iterdir()) == [
        "index.json", "model.rank0.safetensors", "optimizer.json", "optimizer.rank0.safetensors", "rng_rank0.json",
        "state.json"]
    whole = tmp_path / "whole"
    shutil.copytree(saved, whole)
    for kind in ("model", "optimizer"):
        (whole / f"{kind}.rank0.safetensors").rename(whole / f"{kind}.safetensors")
    (whole / "index.json").unlink()
    state = json.loads((whole / "state.json").read_text())
    (whole / "state.json").write_text(json.dumps({**state, "format": "llama_fast.checkpoint/1"}))

    for path in (saved, whole):
        loaded = ckpt.load_model(path)
        for (name, p), q in zip(loaded.named_parameters(), model.parameters()):
            torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)
        fresh, fresh_optimizer = trained_tiny(1)
        assert ckpt.load_checkpoint(path, fresh, fresh_optimizer, d)["step"] == 5
        for (name, p), q in zip(fresh.named_parameters(), model.parameters()):
            torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)
            for key, value in optimizer.state[q].items():
                torch.testing.assert_close(fresh_optimizer.state[p][key], value, rtol=0, atol=0, msg=f"{name}/{key}")

    (whole / "optimizer.safetensors").unlink()  # a model to generate from needs no optimizer state
    ckpt.load_model(whole)
    with pytest.raises(ckpt.CheckpointError, match="optimizer.safetensors: missing \\(a checkpoint of format "
                                                   "'llama_fast.checkpoint/1' has one\\)"):
        ckpt.load_checkpoint(whole, *trained_tiny(1), d)
    tensors = load_file(saved / "model.rank0.safetensors")
    del tensors["norm.weight"]
    save_file(tensors, saved / "model.rank0.safetensors")
    index = json.loads((saved / "index.json").read_text())
    del index["model"]["norm.weight"]
    (saved / "index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="model tensors missing from the shards: \\['norm.weight'\\]; unexpected: \\[\\]"):
        ckpt.load_model(saved)
    (saved / "index.json").unlink()
    with pytest.raises(ckpt.CheckpointError, match="index.json: missing \\(a checkpoint of format "
                                                   "'llama_fast.checkpoint/2' has one\\)"):
        ckpt.load_model(saved)


def test_keep_never_removes_the_checkpoint_just_written(tmp_path):
    """Resuming an earlier checkpoint into the same run directory writes steps below ones already there:
    the retention rule (the last ``keep`` by step) must not delete the checkpoint it has just written."""
    model, optimizer = trained_tiny(0)
    d = Dist(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    state = {"model_config": model.config.to_dict()}
    for step in (2, 6):
        ckpt.save_checkpoint(tmp_path, step, model, optimizer, {"step": step, **state}, d, keep=1)
    assert [p.name for p in ckpt.list_checkpoints(ckpt.checkpoint_dir(tmp_path))] == ["step_0000006"]
    saved = ckpt.save_checkpoint(tmp_path, 4, model, optimizer, {"step": 4, **state}, d, keep=1)
    assert saved.is_dir() and ckpt.read_state(saved)["step"] == 4
    ckpt.load_model(saved)


def test_load_model_keeps_tied_embeddings_tied(tmp_path):
    """A tie_embeddings model loads as one: lm_head.weight IS embed.weight (to_empty on the meta-built
    model unties them), so it holds one vocabulary matrix, as Llama(config) does."""
    torch.manual_seed(0)
    model = Llama(LlamaConfig.from_name("tiny", tie_embeddings=True))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    d = Dist(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    saved = ckpt.save_checkpoint(tmp_path, 1, model, optimizer, {"step": 1, "model_config": model.config.to_dict()}, d,
                                 keep=1)
    for dtype in (None, torch.float64):
        loaded = ckpt.load_model(saved, dtype=dtype)
        assert loaded.lm_head.weight is loaded.embed.weight
        assert len(list(loaded.parameters())) == len(list(model.parameters()))
        torch.testing.assert_close(loaded.embed.weight, model.embed.weight.to(loaded.embed.weight.dtype), rtol=0, atol=0)


FAILING_SAVE = """
import sys
from pathlib import Path

import torch
from llama_fast import LlamaConfig
from llama_fast.train import checkpoint as ckpt
from llama_fast.train.parallelize import barrier, build_model, init_distributed, shutdown

d = init_distributed("cpu")
config = LlamaConfig.from_name("tiny", vocab_size=300)
model, _ = build_model(config, "reference", d, "fsdp", seed=0)
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
real_save_file = ckpt.save_file


def failing_save_file(tensors, path, *args, **kwargs):
    if d.rank == 1:
        raise OSError(28, "No space left on device (simulated)")
    return real_save_file(tensors, path, *args, **kwargs)


ckpt.save_file = failing_save_file
try:
    ckpt.save_checkpoint(sys.argv[1], 3, model, optimizer, {"step": 3, "model_config": config.to_dict()}, d, keep=2)
except Exception as e:
    (Path(sys.argv[1]) / f"rank{d.rank}.raised").write_text(f"{type(e).__name__}: {e}")
barrier(d)
shutdown(d)
"""


def test_a_rank_failing_mid_save_fails_every_rank_and_leaves_no_directory(tmp_path):
    """Rank 1 cannot write its shard (disk full): every rank raises (rank 0 waited at a barrier for it until
    the process group's 30-minute timeout), and no step directory or temporary is left behind."""
    run_script(FAILING_SAVE, tmp_path, timeout=120)
    assert "No space left on device (simulated)" in (tmp_path / "rank1.raised").read_text()
    assert "another process failed" in (tmp_path / "rank0.raised").read_text()
    assert list(ckpt.checkpoint_dir(tmp_path).iterdir()) == []


def test_merge_names_a_rank_whose_part_rank_0_cannot_see(tmp_path):
    """Rank 0 merges the index from files every rank wrote: on nodes without a shared run directory it
    cannot see them, and the error says so (it was a bare 'No such file or directory')."""
    w = torch.randn(6, 2)
    write_rank(tmp_path, 0, {"w": (w, (0, 3))})
    with pytest.raises(FileNotFoundError, match="rank 1 wrote no index.rank1.json .* every process must see the same "
                                                "run directory"):
        ckpt._merge_index(tmp_path, 2)


def saved_tiny(tmp_path, step: int = 5, keep: int = 1) -> Path:
    model, optimizer = trained_tiny(0)
    d = Dist(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    state = {"step": step, "model_config": model.config.to_dict(), "data": {"seq_len": 16, "global_sequences": 2}}
    return ckpt.save_checkpoint(tmp_path, step, model, optimizer, state, d, keep=keep)


def test_retiring_a_checkpoint_never_leaves_a_partial_step_directory(tmp_path, monkeypatch):
    """A kill while retention deletes an old checkpoint (simulated: the deletion removes state.json, then the
    process 'dies') left step_N without state.json; now it is renamed out of the step_* names first, and the
    hidden leftover is removed at the next start."""
    for step in (1, 2):
        saved_tiny(tmp_path, step, keep=2)
    real_rmtree = shutil.rmtree

    def killed_halfway(path, ignore_errors=False, **kwargs):
        if ignore_errors:
            return real_rmtree(path, ignore_errors=True, **kwargs)
        (Path(path) / "state.json").unlink()
        raise KeyboardInterrupt  # stands for the kill -9

    monkeypatch.setattr(shutil, "rmtree", killed_halfway)
    with pytest.raises(KeyboardInterrupt):
        saved_tiny(tmp_path, 3, keep=2)
    monkeypatch.setattr(shutil, "rmtree", real_rmtree)
    ckpt_dir = ckpt.checkpoint_dir(tmp_path)
    for path in ckpt.list_checkpoints(ckpt_dir):
        assert (path / "state.json").is_file(), f"{path.name} is half-deleted"
    assert [p.name for p in ckpt.list_checkpoints(ckpt_dir)] == ["step_0000002", "step_0000003"]
    ckpt.remove_stale_temporaries(ckpt_dir)
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["step_0000002", "step_0000003"]


def test_corrupted_tensor_data_is_detected_on_load(tmp_path):
    """Random bytes in the tensor data of model.rank0.safetensors loaded silently (garbage text from
    generate, a 'non-finite training' blamed on the learning rate on resume); the checksums in index.json
    catch it, naming the file."""
    saved = saved_tiny(tmp_path)
    index = json.loads((saved / "index.json").read_text())
    assert set(index["files"]) == {"model.rank0.safetensors", "optimizer.rank0.safetensors", "optimizer.json",
                                   "state.json", "rng_rank0.json"}
    data = bytearray((saved / "model.rank0.safetensors").read_bytes())
    data[len(data) // 2:len(data) // 2 + 16] = bytes(range(16))  # inside the tensor data, same size
    (saved / "model.rank0.safetensors").write_bytes(bytes(data))
    message = "step_0000005: model.rank0.safetensors: its contents do not match the checksum in index.json"
    with pytest.raises(ckpt.CheckpointError, match=message):
        ckpt.load_model(saved)
    d = Dist(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    with pytest.raises(ckpt.CheckpointError, match=message):
        ckpt.load_checkpoint(saved, *trained_tiny(1), d)


def test_file_checksum_covers_every_chunk(tmp_path, monkeypatch):
    """The chunked checksum changes with a byte in any chunk and does not depend on the thread count."""
    monkeypatch.setattr(ckpt, "CHECKSUM_CHUNK_BYTES", 1000)
    data = bytearray(torch.randint(0, 256, (3500,), dtype=torch.uint8).numpy().tobytes())
    (tmp_path / "f").write_bytes(bytes(data))
    base = ckpt.file_checksum(tmp_path / "f")
    for where in (0, 999, 1000, 3499):
        data[where] ^= 1
        (tmp_path / "f").write_bytes(bytes(data))
        assert ckpt.file_checksum(tmp_path / "f") != base, where
        data[where] ^= 1
    (tmp_path / "f").write_bytes(bytes(data))
    monkeypatch.setattr(ckpt.os, "cpu_count", lambda: 1)
    assert ckpt.file_checksum(tmp_path / "f") == base
    (tmp_path / "empty").write_bytes(b"")
    assert ckpt.file_checksum(tmp_path / "empty") != base


def _edit_json(name, edit):
    def apply(saved):
        value = json.loads((saved / name).read_text())
        edit(value)
        (saved / name).write_text(json.dumps(value))
    return apply


def _write(name, data: bytes):
    return lambda saved: (saved / name).write_bytes(data)


def _truncate(name):
    return lambda saved: (saved / name).write_bytes((saved / name).read_bytes()[:100])


def _no_checksums(damage):
    """The same damage in a checkpoint without checksums (as before they existed): the readers' own checks."""
    def apply(saved):
        _edit_json("index.json", lambda index: index.pop("files"))(saved)
        damage(saved)
    return apply


DAMAGE = {  # name -> (how, the file the error must name, what it must say)
    "state.json not JSON": (_write("state.json", b"{\"format\": "), "state.json", "JSONDecodeError"),
    "state.json a list": (_write("state.json", b"[]"), "state.json", "expected a JSON object holding 'format'"),
    "state.json edited": (lambda saved: (saved / "state.json").write_text(
        (saved / "state.json").read_text().replace('"step": 5', '"step": 4')), "state.json",
                          "its contents do not match the checksum in index.json"),
    "index.json truncated": (_truncate("index.json"), "index.json", "JSONDecodeError"),
    "index.json without model": (_edit_json("index.json", lambda i: i.pop("model")), "index.json",
                                 "missing key 'model'"),
    "dtype not torch's": (_edit_json("index.json", lambda i: i["model"]["norm.weight"].update(dtype="evil")),
                          "index.json", "dtype 'evil' names no torch dtype"),
    "slices a dict": (_edit_json("index.json", lambda i: i["model"]["norm.weight"].update(slices={"data": 1})),
                      "index.json", "'slices' should be list, got dict"),
    "shape of strings": (_edit_json("index.json", lambda i: i["model"]["norm.weight"].update(shape=["64"])),
                         "index.json", "shape should be a list of sizes"),
    "checksums missing a file": (_edit_json("index.json", lambda i: i["files"].pop("rng_rank0.json")),
                                 "rng_rank0.json", "index.json records no checksum for it"),
    "safetensors truncated": (_truncate("model.rank0.safetensors"), "model.rank0.safetensors",
                              "bytes where index.json records"),
    "safetensors missing": (lambda saved: (saved / "optimizer.rank0.safetensors").unlink(),
                            "optimizer.rank0.safetensors", "no such file"),
    "optimizer.json cut": (_truncate("optimizer.json"), "optimizer.json", "bytes where index.json records"),
    "unverified: safetensors truncated": (_no_checksums(_truncate("model.rank0.safetensors")),
                                          "model.rank0.safetensors", "SafetensorError"),
    "unverified: safetensors header garbage": (_no_checksums(_write("model.rank0.safetensors", b"\x08" + b"\0" * 7
                                                                    + b"{not json")),
                                               "model.rank0.safetensors", "SafetensorError"),
    "unverified: rng not JSON": (_no_checksums(_write("rng_rank0.json", b"\x80\x04evil")), "rng_rank0.json",
                                 "UnicodeDecodeError"),
    "unverified: optimizer groups too few": (
        _no_checksums(_edit_json("optimizer.json", lambda g: g.update(param_groups=[]))),
        "optimizer.json", "expected 1 parameter groups"),
    "unverified: optimizer.json without groups": (_no_checksums(_edit_json("optimizer.json",
                                                                           lambda g: g.pop("param_groups"))),
                                                  "optimizer.json", "missing key 'param_groups'"),
    "unverified: rng state cut": (
        _no_checksums(_edit_json("rng_rank0.json", lambda r: r.update(torch=r["torch"][:10]))), "rng_rank0.json",
        "RuntimeError"),
    "unverified: state.json without model_config": (
        _no_checksums(_edit_json("state.json", lambda s: s.pop("model_config"))), "state.json",
        "missing key 'model_config'"),
    "unverified: state.json step a string": (_no_checksums(_edit_json("state.json", lambda s: s.update(step="5"))),
                                             "state.json", "'step' should be int, got str"),
    "unverified: model_config of another type": (
        _no_checksums(_edit_json("state.json", lambda s: s["model_config"].update(dim="64"))), "state.json",
        "dim must be a positive int"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_checkpoint_is_refused_naming_the_checkpoint_and_the_file(tmp_path, damage):
    """Damaged checkpoints were refused with bare library errors (SafetensorError: incomplete metadata,
    KeyError: 'data', TypeError: list indices ..., module 'torch' has no attribute 'evil') that named neither
    the checkpoint nor the file; every one now raises CheckpointError naming both and what is wrong."""
    saved = saved_tiny(tmp_path)
    how, file, what = DAMAGE[damage]
    how(saved)
    d = Dist(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    with pytest.raises(ckpt.CheckpointError) as error:
        ckpt.load_checkpoint(saved, *trained_tiny(1), d)
    assert error.value.path == saved and error.value.file == file, str(error.value)
    assert str(error.value).startswith(f"checkpoint {saved}: {file}: ") and what in str(error.value), str(error.value)


@pytest.mark.parametrize("outside", ["../step_0000002/model.rank0.safetensors", "ABSOLUTE", "link.safetensors"])
def test_index_paths_must_stay_inside_the_checkpoint(tmp_path, outside):
    """A file entry '../step_N/...' or an absolute path in index.json was followed silently (weights from
    another checkpoint, or from anywhere on disk); so was a symlink inside the checkpoint pointing out."""
    other = saved_tiny(tmp_path / "other", step=2)
    saved = saved_tiny(tmp_path)
    if outside == "ABSOLUTE":
        outside = str(other / "model.rank0.safetensors")
    elif outside == "link.safetensors":
        (saved / outside).symlink_to(other / "model.rank0.safetensors")
    else:
        shutil.copytree(other, saved.parent / "step_0000002")

    def point_outside(index):
        index["model"]["norm.weight"]["slices"][0]["file"] = outside
        index["files"][outside] = index["files"]["model.rank0.safetensors"]

    _edit_json("index.json", point_outside)(saved)
    with pytest.raises(ckpt.CheckpointError, match=f"index.json: file '{outside}' .*(leaves|outside the checkpoint)"):
        ckpt.load_model(saved)
