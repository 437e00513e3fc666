"""Sharded checkpoints without processes: torch.chunk's row split, assembling rows from shard files,
the index checks and their errors, a one-process round trip and format-1 checkpoints.

The multi-process side (FSDP ranks writing their shards, resuming on another world size) is
tests/test_train.py::test_fsdp_resumes_a_checkpoint_and_matches_one_process.
"""
import json
import shutil

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
        with pytest.raises(ValueError, match="model.rank1.safetensors holds 'w' with shape \\[3, 3\\]; index.json says "
                                             "rows 2:4 of \\[7, 3\\], shape \\[2, 3\\]"):
            reader.read("model", "w", (7, 3), (1, 3))
        with pytest.raises(ValueError, match="'v' is missing from model.rank1.safetensors, which index.json says holds it"):
            reader.read("model", "v", (2,))
    save_file({"w": full["w"][2:4].double(), "v": full["v"][1:2].clone()}, path / "model.rank1.safetensors")
    with ckpt.ShardReader(path) as reader, pytest.raises(ValueError, match="'w' is stored as torch.float64; index.json says torch.float32"):
        reader.read("model", "w", (7, 3))
    (path / "model.rank2.safetensors").unlink()
    with ckpt.ShardReader(path) as reader:
        torch.testing.assert_close(reader.read("model", "w", (7, 3), (0, 2)), full["w"][:2], rtol=0, atol=0)
        with pytest.raises(FileNotFoundError, match="index.json lists model.rank2.safetensors \\(holding part of 'w'\\) "
                                                    "but there is no such file"):
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
    with pytest.raises(FileNotFoundError, match="format 'llama_fast.checkpoint/1'\\): optimizer.safetensors is missing"):
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
    with pytest.raises(FileNotFoundError, match="format 'llama_fast.checkpoint/2'\\): index.json is missing"):
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
