"""The trainer: schedule, config, resume, multi-process equivalence, robustness, the main job."""
import contextlib
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torchrun_helpers import run_script, torchrun
from synthetic_text import write_corpus

from llama_fast.data import parse_source, prepare
from llama_fast.train import build_parser
from llama_fast.train import checkpoint as ckpt
from llama_fast.train.config import TrainConfig, from_args
from llama_fast.train.metrics import read_jsonl
from llama_fast.train.trainer import NonFiniteError, Trainer, lr_at, param_groups, train

VOCAB = 512


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_data")
    sources = [parse_source(f"a={write_corpus(root / 'a', 30, seed=1)}:0.6"),
               parse_source(f"b={write_corpus(root / 'b', 20, seed=2)}:0.4")]
    return prepare(sources, root / "prepared", vocab_size=VOCAB, val_fraction=0.1, progress=False)


def tiny_args(run_dir, data, *extra) -> list[str]:
    """A tiny model, 8 sequences of 32 tokens per step in 2 micro-batches of 4, every step logged."""
    return ["--run-dir", str(run_dir), "--data", str(data), "--flavor", "tiny", "--model.vocab_size", str(VOCAB),
            "--seq-len", "32", "--train.batch_tokens", "256", "--train.micro_batch", "4", "--steps", "6",
            "--log.interval", "1", "--log.eval_interval", "0", "--log.progress", "false", "--log.sample_tokens", "0",
            "--checkpoint.interval", "0", *extra]


def run(run_dir, data, *extra) -> dict:
    return train(from_args(build_parser().parse_args(tiny_args(run_dir, data, *extra))))


def losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_jsonl(Path(run_dir) / "metrics.jsonl") if "loss" in r}


def test_lr_schedule():
    peak, warmup, steps = 1e-3, 10, 110
    assert lr_at(1, peak, warmup, steps, 0.1) == pytest.approx(1e-4)
    assert lr_at(10, peak, warmup, steps, 0.1) == pytest.approx(peak)
    assert lr_at(60, peak, warmup, steps, 0.1) == pytest.approx(0.55 * peak)  # cosine half way
    assert lr_at(110, peak, warmup, steps, 0.1) == pytest.approx(0.1 * peak)
    lrs = [lr_at(s, peak, warmup, steps, 0.1) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_cpu_threads_follow_the_free_cores_and_the_processes_of_the_node(monkeypatch):
    """A thread on a core that other work holds stalls every op (2 threads on a loaded 2-core machine trained 4x
    slower than 1); torchrun's processes share the node's cores; an explicit count wins."""
    from llama_fast.train import parallelize

    for name in ("OMP_NUM_THREADS", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(parallelize, "available_cores", lambda: 8)
    load = [0.2]
    monkeypatch.setattr(parallelize.os, "getloadavg", lambda: (load[0], 0.0, 0.0))
    assert parallelize.cpu_threads() == (8, "8 cores, load 0.2, 1 process(es) on this node")
    load[0] = 3.4
    assert parallelize.cpu_threads()[0] == 5
    load[0] = 40.0
    assert parallelize.cpu_threads()[0] == 1
    load[0] = 0.0
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")
    assert parallelize.cpu_threads()[0] == 2
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert parallelize.cpu_threads() == (3, "OMP_NUM_THREADS")
    assert parallelize.cpu_threads(5) == (5, "train.cpu_threads")


def test_weight_decay_skips_norms_and_embedding():
    from llama_fast import Llama, LlamaConfig

    model = Llama(LlamaConfig.from_name("tiny"))
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert {names[id(p)] for p in no_decay["params"]} == {"embed.weight", "norm.weight"} | {
        f"layers.{i}.{n}_norm.weight" for i in range(2) for n in ("attn", "mlp")}
    assert "lm_head.weight" in {names[id(p)] for p in decay["params"]}


def test_config_file_then_flags(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('run_dir = "r"\n[model]\nflavor = "tiny"\ndim = 128\n[optim]\nlr = 3e-4\n'
                    '[data]\nsources = ["code=/x:0.7", "prose=/y:0.3"]\n')
    config = from_args(build_parser().parse_args(["--config", str(toml), "--optim.lr", "1e-4", "--model.n_layers", "3"]))
    assert (config.run_dir, config.model.flavor, config.optim.lr) == ("r", "tiny", 1e-4)
    assert config.model.overrides == {"dim": 128, "n_layers": 3}
    assert config.llama_config().dim == 128 and config.data.sources == ["code=/x:0.7", "prose=/y:0.3"]
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("train:\n  max_steps: 7\nlog:\n  progress: false\n")
    config = from_args(build_parser().parse_args(["--config", str(yaml_file), "--steps", "9"]))
    assert config.train.max_steps == 9 and config.log.progress is False
    assert TrainConfig.from_dict(config.to_dict()) == config
    bad = tmp_path / "bad.toml"
    bad.write_text("[optim]\nlearning_rate = 1\n")
    with pytest.raises(ValueError, match="unknown field 'optim.learning_rate'"):
        from_args(build_parser().parse_args(["--config", str(bad)]))
    with pytest.raises(ValueError, match="train.max_steps: expected int, got 'many'"):
        from_args(build_parser().parse_args(["--steps", "many"]))
    with pytest.raises(ValueError, match="train.parallel: expected one of"):
        from_args(build_parser().parse_args(["--train.parallel", "tp"]))


def test_resume_after_sigterm_matches_uninterrupted_run(tmp_path, data, monkeypatch):
    full = run(tmp_path / "full", data)
    assert full["step"] == 6 and not full["stopped"]

    original = Trainer.train_step

    def stop_after_step_3(self, step):
        out = original(self, step)
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # the handler saves and exits at the end of the step
        return out

    monkeypatch.setattr(Trainer, "train_step", stop_after_step_3)
    stopped = run(tmp_path / "resumed", data, "--checkpoint.interval", "1", "--checkpoint.keep", "2")
    assert stopped["step"] == 3 and stopped["stopped"]
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "resumed" / "checkpoints")] == ["step_0000002", "step_0000003"]
    monkeypatch.setattr(Trainer, "train_step", original)

    resumed = run(tmp_path / "resumed", data, "--checkpoint.interval", "1", "--checkpoint.keep", "2")
    assert resumed["step"] == 6
    assert losses(tmp_path / "resumed") == losses(tmp_path / "full")  # bit-identical, steps 1..6
    state = ckpt.read_state(tmp_path / "resumed" / "checkpoints" / "step_0000006")
    assert state["config"]["model"]["overrides"] == {"vocab_size": VOCAB} and state["data"]["next_step"] == 7
    assert (tmp_path / "resumed" / "checkpoints" / "loss_curve.png").stat().st_size > 0
    again = run(tmp_path / "resumed", data, "--checkpoint.interval", "1", "--checkpoint.keep", "2")
    assert again["step"] == 6 and again["checkpoint"].endswith("step_0000006")  # nothing left to train
    assert losses(tmp_path / "resumed") == losses(tmp_path / "full")


def test_document_mask_trains_resumes_bit_identically_and_is_logged(tmp_path, data, monkeypatch):
    """--data.document_mask true: documents split at EOS attend to themselves (other losses than the
    paper's packing), the metrics log says which mode ran, and a resumed run repeats the losses."""
    full = run(tmp_path / "full", data, "--data.document_mask", "true")
    packed = run(tmp_path / "packed", data)
    assert losses(tmp_path / "full") != losses(tmp_path / "packed")
    modes = {name: [r["attention"] for r in read_jsonl(tmp_path / name / "metrics.jsonl") if "attention" in r]
             for name in ("full", "packed")}
    assert modes == {"full": ["documents"], "packed": ["causal"]}
    assert full["step"] == packed["step"] == 6

    original = Trainer.train_step

    def stop_after_step_3(self, step):
        out = original(self, step)
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    monkeypatch.setattr(Trainer, "train_step", stop_after_step_3)
    args = ("--data.document_mask", "true", "--checkpoint.interval", "1")
    assert run(tmp_path / "resumed", data, *args)["step"] == 3
    monkeypatch.setattr(Trainer, "train_step", original)
    assert run(tmp_path / "resumed", data, *args)["step"] == 6
    assert losses(tmp_path / "resumed") == losses(tmp_path / "full")


def test_resume_says_what_it_does(tmp_path, data, capsys):
    """Raising max_steps recomputes the schedule, and a checkpoint at or past max_steps leaves nothing to train:
    both are said, with how to start afresh, instead of happening silently."""
    run(tmp_path, data, "--steps", "20")
    capsys.readouterr()
    run(tmp_path, data, "--steps", "30")
    out = capsys.readouterr().out
    assert f"resuming {tmp_path / 'checkpoints' / 'step_0000020'} at step 20" in out
    assert "--checkpoint.resume never (or another --run-dir) starts afresh" in out
    assert ("the learning-rate schedule is recomputed: max_steps 20 -> 30, warmup_steps 2 -> 3; step 21 runs at "
            "lr 3.250e-04 where the checkpoint's schedule had 1.000e-04") in out
    summary = run(tmp_path, data, "--steps", "10")
    out = capsys.readouterr().out
    assert summary["step"] == 30
    assert "nothing to train: the checkpoint is at step 30 and train.max_steps is 10; a larger --train.max_steps " \
           "continues it, --checkpoint.resume never (or another --run-dir) starts afresh" in out
    fresh = run(tmp_path, data, "--steps", "2", "--checkpoint.resume", "never")
    assert fresh["step"] == 2 and "resuming" not in capsys.readouterr().out


def test_the_vocabulary_comes_from_the_tokenizer_unless_set(tmp_path, data):
    """The tiny flavor (vocab 256) on data prepared with a 512-piece tokenizer: no --model.vocab_size needed."""
    args = [a for a in tiny_args(tmp_path, data, "--steps", "1") if a not in ("--model.vocab_size", str(VOCAB))]
    summary = train(from_args(build_parser().parse_args(args)))
    state = ckpt.read_state(summary["checkpoint"])
    assert state["model_config"]["vocab_size"] == VOCAB
    assert state["config"]["model"]["overrides"] == {"vocab_size": VOCAB}
    with pytest.raises(ValueError, match="vocabulary of 512 ids, which does not fit the model's vocab_size 300"):
        run(tmp_path / "set", data, "--model.vocab_size", "300")  # set: kept, and checked


def test_prepared_data_is_shared_by_runs_of_the_same_sources(tmp_path, monkeypatch, capsys):
    """Raw text is tokenized once into the cache ($LLAMA_FAST_CACHE), whatever the run directory; a changed file
    prepares it again."""
    monkeypatch.setenv("LLAMA_FAST_CACHE", str(tmp_path / "cache"))
    text = write_corpus(tmp_path / "text", 6, seed=3)
    args = ["--flavor", "tiny", "--model.vocab_size", "300", "--seq-len", "32",
            "--train.batch_tokens", "128", "--train.micro_batch", "4", "--steps", "1", "--log.progress", "false",
            "--log.sample_tokens", "0", "--data", str(text)]
    dirs = []
    for run_dir in ("one", "two", "three"):
        if run_dir == "three":
            (text / "doc000.txt").write_text("kalo ruta mi\n" * 50)
        train(from_args(build_parser().parse_args(["--run-dir", str(tmp_path / run_dir), *args])))
        dirs.append(ckpt.read_state(ckpt.latest_checkpoint(tmp_path / run_dir / "checkpoints"))["data"]["dir"])
        dirs[-1] = (dirs[-1], "preparing data" in capsys.readouterr().out)
    assert dirs[0] == (dirs[1][0], True) and dirs[1][1] is False  # the second run reuses the first one's tokens
    assert Path(dirs[0][0]).parent == tmp_path / "cache"
    assert dirs[2][0] != dirs[0][0] and dirs[2][1] is True


def test_wandb_logs_offline_when_asked(tmp_path, data, monkeypatch):
    """--log.wandb: every step's loss and the validation loss go to a Weights & Biases run, here in offline mode
    (written under the run directory, nothing sent)."""
    pytest.importorskip("wandb", reason="wandb is optional (pip install wandb); CI installs it to run this test")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    import wandb

    logged, inits, real_init = [], [], wandb.init

    def init(**kwargs):  # the real run, its log calls recorded
        inits.append({k: kwargs[k] for k in ("project", "name", "dir")})
        assert kwargs["config"]["log"]["wandb"] is True  # the run's whole config goes along
        wandb_run = real_init(**kwargs)
        real_log = wandb_run.log
        monkeypatch.setattr(wandb_run, "log", lambda values, step: (logged.append((step, values)),
                                                                    real_log(values, step=step)))
        return wandb_run

    monkeypatch.setattr(wandb, "init", init)
    run(tmp_path, data, "--steps", "3", "--log.wandb", "true", "--log.wandb_project", "llama_fast_test",
        "--log.eval_interval", "3")
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and next(runs[0].glob("*.wandb")).stat().st_size > 0, list((tmp_path / "wandb").iterdir())
    steps = [step for step, _ in logged]
    assert steps == [1, 2, 3, 3] and all("loss" in values for _, values in logged[:3]), logged
    assert set(logged[-1][1]) == {"val_loss", "val_ppl"}
    assert inits == [dict(project="llama_fast_test", name=tmp_path.name, dir=str(tmp_path))]


def test_wandb_missing_is_a_clear_error(tmp_path, data, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    with pytest.raises(ValueError, match=r"log.wandb needs the wandb package \(pip install wandb\)"):
        run(tmp_path, data, "--steps", "1", "--log.wandb", "true")


def train_torchrun(*args, nproc=2) -> subprocess.CompletedProcess:
    return torchrun("-m", "llama_fast.train", *args, nproc=nproc)


def test_two_processes_match_one(tmp_path, data):
    """2 gloo processes x 2 accumulated micro-batches == 1 process x 4 (same global batch; DDP's no_sync)."""
    run(tmp_path / "one", data, "--steps", "4", "--train.micro_batch", "2")
    train_torchrun(*tiny_args(tmp_path / "two", data, "--steps", "4", "--train.micro_batch", "2"))
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(one) == sorted(two) == [1, 2, 3, 4]
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-5, abs=0)
    state = ckpt.read_state(tmp_path / "two" / "checkpoints" / "step_0000004")
    assert state["world_size"] == 2 and state["config"]["train"]["parallel"] == "ddp"


# 12 sequences of 32 tokens per step: 1, 2 or 3 processes of 2-sequence micro-batches.
GEOMETRY = ("--train.batch_tokens", "384", "--train.micro_batch", "2")


def test_fsdp_resumes_a_checkpoint_and_matches_one_process(tmp_path, data):
    """FSDP2 (gloo, CPU) resumes a one-process checkpoint and writes sharded ones; those resume on 3 FSDP
    processes (uneven shards) and on one process, and every loss is the uninterrupted run's."""
    run(tmp_path / "one", data, *GEOMETRY, "--checkpoint.interval", "2")
    one = losses(tmp_path / "one")
    start = tmp_path / "one" / "checkpoints" / "step_0000002"
    train_torchrun(*tiny_args(tmp_path / "fsdp2", data, *GEOMETRY, "--resume", str(start), "--train.parallel", "fsdp",
                        "--checkpoint.interval", "2"))
    sharded = tmp_path / "fsdp2" / "checkpoints" / "step_0000004"
    train_torchrun(*tiny_args(tmp_path / "fsdp3", data, *GEOMETRY, "--resume", str(sharded), "--train.parallel", "fsdp"),
             nproc=3)
    run(tmp_path / "back", data, *GEOMETRY, "--resume", str(sharded))
    for name, steps in (("fsdp2", [3, 4, 5, 6]), ("fsdp3", [5, 6]), ("back", [5, 6])):
        resumed = losses(tmp_path / name)
        assert sorted(resumed) == steps, name
        for step in steps:
            assert resumed[step] == pytest.approx(one[step], rel=1e-5, abs=0), (name, step)

    # Each of the 2 processes wrote only its rows (torch.chunk's split of dim 0), nothing whole.
    index = json.loads((sharded / "index.json").read_text())
    assert ckpt.read_state(sharded)["format"] == index["format"] == ckpt.FORMAT and index["world_size"] == 2
    assert not (sharded / "model.safetensors").exists()
    for kind in ("model", "optimizer"):
        stored = [0, 0]
        for rank in (0, 1):
            with safe_open(sharded / f"{kind}.rank{rank}.safetensors", framework="pt", device="cpu") as f:
                for name in f.keys():
                    shape = index[kind][name]["shape"]
                    if not shape:  # an AdamW step count: replicated, written once by rank 0
                        assert rank == 0 and name.endswith("/step")
                        continue
                    rows = len(torch.arange(shape[0]).chunk(2)[rank])
                    assert f.get_slice(name).get_shape() == [rows, *shape[1:]] and rows < shape[0], name
                    stored[rank] += math.prod(f.get_slice(name).get_shape())
        full = sum(math.prod(e["shape"]) for e in index[kind].values() if e["shape"])
        assert stored[0] + stored[1] == full and abs(stored[0] - stored[1]) < 0.01 * full, (kind, stored)
    assert index["model"]["embed.weight"]["slices"] == [
        {"file": "model.rank0.safetensors", "start": 0, "stop": 256},
        {"file": "model.rank1.safetensors", "start": 256, "stop": 512}]
    three = json.loads((tmp_path / "fsdp3" / "checkpoints" / "step_0000006" / "index.json").read_text())
    assert [(s["start"], s["stop"]) for s in three["model"]["layers.0.attn_norm.weight"]["slices"]] == [
        (0, 22), (22, 44), (44, 64)]

    # The sharded checkpoints assemble into the one-process models.
    for sharded_run, step in ((tmp_path / "fsdp2", 4), (tmp_path / "fsdp3", 6)):
        model = ckpt.load_model(sharded_run / "checkpoints" / f"step_{step:07d}")
        reference = ckpt.load_model(tmp_path / "one" / "checkpoints" / f"step_{step:07d}")
        for (name, p), q in zip(model.named_parameters(), reference.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6, msg=name)


FSDP_INIT = """
import sys
from pathlib import Path

import torch
from llama_fast import Llama, LlamaConfig
from llama_fast.train.parallelize import barrier, build_model, init_distributed, shutdown

d = init_distributed("cpu")
config = LlamaConfig.from_name("tiny", vocab_size=301)  # 301 embedding rows: uneven shards over 3 ranks
model, _ = build_model(config, "reference", d, "fsdp", seed=5)
one_process = Llama(config)
one_process.init_weights(seed=5)
for (name, p), q in zip(model.named_parameters(), one_process.parameters(), strict=True):
    assert p.to_local().shape[0] < p.shape[0], f"{name} is not sharded"
    torch.testing.assert_close(p.full_tensor(), q, rtol=0, atol=0, msg=name)
(Path(sys.argv[1]) / f"rank{d.rank}.ok").touch()
barrier(d)
shutdown(d)
"""


def test_fsdp_init_equals_the_one_process_init(tmp_path):
    """Built shard by shard on 3 ranks, the model is the one-process model of the same seed: each
    rank holds its rows of the same draw (drawing into the shards gave every rank the same rows)."""
    run_script(FSDP_INIT, tmp_path, nproc=3)
    assert sorted(p.name for p in tmp_path.glob("rank*.ok")) == ["rank0.ok", "rank1.ok", "rank2.ok"]


FSDP_BF16 = """
import sys
from pathlib import Path

import torch
from llama_fast import Llama, LlamaConfig
from llama_fast.train.parallelize import barrier, build_model, init_distributed, shutdown

d = init_distributed("cpu")
config = LlamaConfig.from_name("tiny", vocab_size=300)
tokens = torch.randint(0, 300, (2, 3, 18), generator=torch.Generator().manual_seed(0))[d.rank]  # a batch per rank
one_process = Llama(config, backend="fused")
one_process.init_weights(seed=0)
want = one_process(tokens[:, :-1], tokens[:, 1:])[1]
for recompute in ("none", "cheap"):
    model, wrapped = build_model(config, "fused", d, "fsdp", seed=0, param_dtype=torch.bfloat16, recompute=recompute)
    loss = wrapped(tokens[:, :-1], tokens[:, 1:])[1]
    loss.backward()
    assert loss.dtype == torch.float32 and abs(loss.item() - want.item()) < 0.02 * want.item(), (loss, want)
    assert all(p.grad is not None and torch.isfinite(p.grad.full_tensor()).all() for p in model.parameters())
(Path(sys.argv[1]) / f"rank{d.rank}.ok").touch()
barrier(d)
shutdown(d)
"""


def test_fsdp_bf16_runs_the_fused_model(tmp_path):
    """FSDP2 with bf16 param_dtype (the trainer's bf16 on GPUs) and the fused backend: the rotary tables
    the model passes to each block stay fp32 (FSDP's default cast of forward inputs made them bf16, which
    the fused attention refuses: 'cos must be float32'), and the loss is the one-process fp32 loss."""
    run_script(FSDP_BF16, tmp_path)
    assert sorted(p.name for p in tmp_path.glob("rank*.ok")) == ["rank0.ok", "rank1.ok"]


def test_nan_loss_stops_with_the_step_and_keeps_the_last_checkpoint(tmp_path, data, monkeypatch):
    calls = {"n": 0}
    cross_entropy = torch.nn.functional.cross_entropy

    def nan_from_step_3(*args, **kwargs):
        calls["n"] += 1
        loss = cross_entropy(*args, **kwargs)
        return loss * math.nan if calls["n"] > 4 else loss  # 2 micro-batches per step

    monkeypatch.setattr(torch.nn.functional, "cross_entropy", nan_from_step_3)
    with pytest.raises(NonFiniteError, match="non-finite training at step 3: loss nan"):
        run(tmp_path, data, "--checkpoint.interval", "2")
    (last,) = ckpt.list_checkpoints(tmp_path / "checkpoints")
    assert last.name == "step_0000002"
    model = ckpt.load_model(tmp_path)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_checkpoint_is_atomic(tmp_path, data, monkeypatch):
    run(tmp_path, data, "--steps", "2")
    (tmp_path / "checkpoints" / ".step_0000009.tmp").mkdir()  # left by a save that was killed
    real_save = ckpt.save_file

    def disk_full(tensors, path):
        if Path(path).name == "optimizer.rank0.safetensors":
            raise OSError("No space left on device")
        real_save(tensors, path)

    monkeypatch.setattr(ckpt, "save_file", disk_full)
    with pytest.raises(OSError, match="No space left"):
        run(tmp_path, data, "--steps", "4")
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.is_dir())
    assert names == ["step_0000002"]  # no temporary, no partial step_0000004
    assert ckpt.latest_checkpoint(tmp_path / "checkpoints").name == "step_0000002"
    ckpt.load_model(tmp_path)


def test_bad_inputs_get_clear_errors(tmp_path, data):
    with pytest.raises(ValueError, match="vocabulary of 512 ids, which does not fit the model's vocab_size 256"):
        run(tmp_path / "a", data, "--model.vocab_size", "256")
    with pytest.raises(FileNotFoundError, match="no such file or directory"):
        run(tmp_path / "b", tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "blank.txt").write_text("\n\n")
    with pytest.raises(ValueError, match="no text found"):
        run(tmp_path / "c", tmp_path / "empty", "--data.tokenizer", str(data / "tokenizer.model"))
    with pytest.raises(ValueError, match="must be a multiple of seq_len \\* micro_batch"):
        run(tmp_path / "d", data, "--train.batch_tokens", "100")
    run(tmp_path / "e", data, "--steps", "1")
    with pytest.raises(ValueError, match="another model config \\(dim: checkpoint 64 vs run 32"):
        run(tmp_path / "e", data, "--model.dim", "32")
    with pytest.raises(ValueError, match="data.seq_len \\(300\\) exceeds the model's max_seq_len \\(128\\)"):
        run(tmp_path / "f", data, "--seq-len", "300")


def _cli(*args) -> list[str]:
    return [sys.executable, "-m", "llama_fast.cli", "train", *args]


def test_main_job_shortened(tmp_path, data):
    """The README's main job (small flavor, CLI, sample at the end) on small data and few steps."""
    args = ["--run-dir", str(tmp_path), "--data", str(data), "--model.vocab_size", str(VOCAB), "--steps", "16",
            "--seq-len", "32", "--train.batch_tokens", "256", "--train.micro_batch", "8", "--log.interval", "4",
            "--log.eval_interval", "8", "--log.sample_tokens", "16", "--log.sample_prompt", "def kalo"]
    proc = subprocess.run(_cli(*args), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "small (" in proc.stdout and "sample (prompt 'def kalo'):\ndef kalo" in proc.stdout
    records = read_jsonl(tmp_path / "metrics.jsonl")
    train_losses = [r["loss"] for r in records if "loss" in r]  # every step, from step 1 (the plot's data)
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 17))
    assert train_losses[-1] < train_losses[0] - 0.5
    assert [r["step"] for r in records if "tokens_per_s" in r] == [4, 8, 12, 16]  # the console's lines
    assert [line.split("|")[0].split() for line in proc.stdout.splitlines() if line.startswith("step")] == [
        ["step", "4"], ["step", "8"], ["step", "8"], ["step", "12"], ["step", "16"], ["step", "16"]]  # + validation
    assert [r["step"] for r in records if "val_loss" in r] == [8, 16]
    last = [r for r in records if "loss" in r][-1]
    assert last["tokens_per_s"] > 0 and last["mfu"] is None and last["peak_mem_gib"] > 0
    assert (tmp_path / "checkpoints" / "loss_curve.png").is_file()
    # What each "auto" became, and where the logs go, are on the first lines.
    assert "\nauto: backend reference, mixed_precision fp32, lr 0.001, warmup_steps 1 (max_steps // 10" in proc.stdout
    assert re.search(r"cpu threads \d+ \(", proc.stdout)
    assert re.search(r"\nlogging: .*metrics.jsonl; tensorboard: (not installed \(pip install tensorboard\)|.*tensorboard)",
                     proc.stdout)


def test_sigterm_from_outside_saves_and_exits_cleanly(tmp_path, data):
    proc = subprocess.Popen(_cli(*tiny_args(tmp_path, data, "--steps", "100000")), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while len(losses(tmp_path)) < 2 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    assert "stop requested: saving a checkpoint" in out
    last = ckpt.latest_checkpoint(tmp_path / "checkpoints")
    assert ckpt.read_state(last)["step"] == max(losses(tmp_path)) >= 2


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["fused", "reference"])
def test_single_gpu_bf16_run(tmp_path, data, backend):
    """On a GPU: bf16 autocast with either backend, peak memory and MFU reported."""
    summary = run(tmp_path, data, "--train.device", "cuda", "--backend", backend, "--steps", "3")
    state = ckpt.read_state(summary["checkpoint"])
    assert state["config"]["train"]["mixed_precision"] == "bf16"
    records = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if "loss" in r]
    assert len(records) == 3 and all(math.isfinite(r["loss"]) for r in records)
    assert records[-1]["peak_mem_gib"] > 0
    if "H100" in torch.cuda.get_device_name():
        assert 0 < records[-1]["mfu"] < 1


def test_automatic_resume_skips_a_damaged_checkpoint(tmp_path, data, capsys):
    """The latest checkpoint is damaged (a truncated shard): automatic resume says which one it skipped
    and why, resumes from the newest one that loads, and repeats the losses the run had."""
    run(tmp_path, data, "--checkpoint.interval", "1", "--checkpoint.keep", "3")
    uninterrupted = losses(tmp_path)
    shard = tmp_path / "checkpoints" / "step_0000006" / "model.rank0.safetensors"
    shard.write_bytes(shard.read_bytes()[:1000])
    capsys.readouterr()
    resumed = run(tmp_path, data, "--checkpoint.interval", "1", "--checkpoint.keep", "3")
    out = capsys.readouterr().out
    assert "skipping damaged checkpoint step_0000006: checkpoint " in out
    assert "model.rank0.safetensors: 1000 bytes" in out
    assert "resuming from step_0000005, the newest checkpoint that loads" in out and "resumed at step 5" in out
    assert resumed["step"] == 6 and losses(tmp_path) == uninterrupted
    ckpt.load_model(tmp_path / "checkpoints" / "step_0000006")  # written again

    for path in ckpt.list_checkpoints(tmp_path / "checkpoints"):
        (path / "index.json").write_text("{")
    with pytest.raises(ckpt.CheckpointError, match="step_0000006, step_0000005, step_0000004: no checkpoint of this "
                                                   "run loads"):
        run(tmp_path, data, "--steps", "8")
    with pytest.raises(ckpt.CheckpointError, match="step_0000006: index.json: JSONDecodeError"):
        run(tmp_path, data, "--resume", str(tmp_path / "checkpoints" / "step_0000006"))


def test_a_record_cut_short_in_the_metrics_log_does_not_stop_the_run(tmp_path, data):
    """A full disk during an append leaves a partial last line in metrics.jsonl: every later run there died
    in read_jsonl with a bare JSONDecodeError. It is skipped with a warning naming the file."""
    run(tmp_path, data, "--steps", "2")
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 6.1, "l')
    with pytest.warns(UserWarning, match=f"{tmp_path / 'metrics.jsonl'}: skipped 1 line\\(s\\) that are not JSON "
                                         "records \\(line 5\\)"):
        # the run's attention-mode note, then loss, loss, val_loss
        assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [0, 1, 2, 2]
    with pytest.warns(UserWarning, match="metrics.jsonl: skipped 1 line"):
        summary = run(tmp_path, data, "--steps", "4")
    assert summary["step"] == 4 and sorted(losses(tmp_path)) == [1, 2, 3, 4]


def test_signals_after_the_first_do_not_lose_the_save(tmp_path, data, monkeypatch, capfd):
    """A double SIGTERM (a scheduler and torchrun both signalling) ended in a KeyboardInterrupt traceback and no
    save: the second signal raised at once. Here two arrive during step 3 and a third during the save."""
    original_step, real_save_file = Trainer.train_step, ckpt.save_file

    def signalled_twice_at_step_3(self, step):
        out = original_step(self, step)
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    def signalled_while_saving(tensors, path, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        return real_save_file(tensors, path, *args, **kwargs)

    monkeypatch.setattr(Trainer, "train_step", signalled_twice_at_step_3)
    monkeypatch.setattr(ckpt, "save_file", signalled_while_saving)
    stopped = run(tmp_path, data)
    assert stopped["step"] == 3 and stopped["stopped"]
    assert ckpt.latest_checkpoint(tmp_path / "checkpoints").name == "step_0000003"
    ckpt.load_model(tmp_path)
    err = capfd.readouterr().err
    assert "SIGTERM again: already stopping; the checkpoint is saved before exiting" in err and "SIGINT again" in err


@pytest.mark.parametrize("flag, value, message", [
    ("--optim.lr", "inf", "optim.lr must be a finite number in \\[0.0, 1.0\\], got inf"),
    ("--optim.lr", "1e39", "optim.lr must be a finite number in \\[0.0, 1.0\\], got 1e\\+39"),
    ("--optim.eps", "0", "optim.eps must be a finite number in \\(0.0, 1.0\\], got 0.0"),
    ("--optim.weight_decay", "nan", "optim.weight_decay must be a finite number in \\[0.0, inf\\], got nan"),
    ("--optim.grad_clip", "nan", "optim.grad_clip must be a finite number in \\[0.0, inf\\], got nan"),
    ("--model.norm_eps", "-1", "model.norm_eps must be a finite number in \\(0.0, inf\\], got -1.0"),
    ("--model.rope_theta", "0", "model.rope_theta must be a finite number in \\(0.0, inf\\], got 0.0"),
    ("--train.seed", "-1", "train.seed must be a finite number in \\[0, 4294967295\\], got -1"),
    ("--data.val_fraction", "1", "data.val_fraction must be a finite number in \\[0, 1\\), got 1.0"),
    ("--log.peak_flops", "inf", "log.peak_flops must be a finite number in \\[0.0, inf\\], got inf"),
])
def test_config_values_that_would_fail_later_are_refused_up_front(flag, value, message):
    """Each passed validation and failed later: 'non-finite training ... lower optim.lr' (lr inf, eps 0, weight
    decay NaN, norm_eps -1, rope_theta 0), clipping silently off (grad_clip NaN), Adam's raw RuntimeError
    (lr 1e39), numpy's message (seed -1)."""
    with pytest.raises(ValueError, match=message):
        from_args(build_parser().parse_args([flag, value]))


def test_llama_config_refuses_a_non_positive_norm_eps_or_rope_theta():
    from llama_fast import LlamaConfig

    for name, value in (("norm_eps", 0.0), ("norm_eps", math.nan), ("rope_theta", -10000.0), ("rope_theta", math.inf)):
        with pytest.raises(ValueError, match=f"LlamaConfig.{name} must be a finite number > 0, got {value!r}"):
            LlamaConfig.from_name("tiny", **{name: value})


def _worker_pids(parent: int) -> dict[int, int]:
    """rank -> pid of torchrun's worker processes (children of ``parent`` with RANK in their environment)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
            env = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        ppid = int(next(line.split()[1] for line in status.splitlines() if line.startswith("PPid:")))
        rank = [v[5:] for v in env if v.startswith(b"RANK=")]
        if ppid == parent and rank:
            found[int(rank[0])] = int(entry.name)
    return found


def test_a_stalled_rank_is_reported_by_the_waiting_one_before_the_timeout_ends_the_run(tmp_path, data):
    """SIGSTOP of rank 1 in a 2-process run left rank 0 waiting without a word for torch's 30-minute
    timeout. The timeout is train.collective_timeout_s; rank 0 says where it waits and for how long, every
    tenth of it, and the timeout then ends the run."""
    timeout_s = 12
    log = tmp_path / "out.txt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "llama_fast.train",
           *tiny_args(tmp_path / "run", data, "--steps", "100000", "--train.collective_timeout_s", str(timeout_s))]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    workers = {}
    try:
        deadline = time.time() + 180
        while len(losses(tmp_path / "run")) < 3 and time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
        workers = _worker_pids(proc.pid)
        assert sorted(workers) == [0, 1], log.read_text()[-3000:]
        os.kill(workers[1], signal.SIGSTOP)
        stopped_at = time.time()
        while "llama_fast rank 0: waiting" not in log.read_text() and time.time() < stopped_at + timeout_s:
            time.sleep(0.1)
        reported_after = time.time() - stopped_at
        assert reported_after < timeout_s * 0.5, log.read_text()[-3000:]
        line = next(line for line in log.read_text().splitlines() if "llama_fast rank 0: waiting" in line)
        assert re.search(r"llama_fast rank 0: waiting \d+ s for the other processes in (step \d+'s forward/backward "
                         r"\(DDP's gradient all-reduce\)|"
                         r"step \d+'s gradient clipping and loss all-reduce|the stop-signal check after step \d+); "
                         r"one of them may be stalled \(train.collective_timeout_s = 12 ends the run\)", line), line
        while _worker_pids(proc.pid).get(0) == workers[0] and time.time() < stopped_at + timeout_s + 60:
            time.sleep(0.5)  # rank 0's collective times out and it exits
        assert time.time() - stopped_at < timeout_s + 60, "rank 0 kept waiting past the collective timeout"
    finally:
        for pid in workers.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.kill()
        proc.wait(timeout=60)
