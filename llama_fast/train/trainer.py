"""The training loop: the paper's recipe on one process or many.

Per step: set the learning rate; for each micro-batch, forward and backward (gradients
accumulate, DDP synchronises on the last one); clip the global gradient norm; stop on a
non-finite loss or norm; optimizer step; log. The global batch of a step is a pure
function of (seed, step) (see llama_fast.data.TokenBatches), each process taking its rows,
so any number of processes with the same ``batch_tokens`` trains on the same data.
"""
from __future__ import annotations

import contextlib
import gc
import math
import random
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ..data import TokenBatches, cache_key, default_cache_dir, parse_source, prepare, read_meta
from ..model import document_starts, sample
from ..tokenizer import Tokenizer
from . import checkpoint as ckpt
from .config import TrainConfig, default_lr
from .metrics import Metrics, peak_flops, peak_memory_gib, plot_loss_curve
from .parallelize import (
    Dist,
    Watchdog,
    all_reduce_mean,
    any_rank,
    barrier,
    build_model,
    choose_parallel,
    cpu_threads,
    init_distributed,
    shutdown,
)


class NonFiniteError(RuntimeError):
    """The loss or the gradient norm was NaN or Inf."""


def lr_at(step: int, peak: float, warmup: int, max_steps: int, min_ratio: float) -> float:
    """Linear warmup to ``peak`` over ``warmup`` steps, then cosine to ``min_ratio * peak`` at ``max_steps``."""
    if step <= warmup:
        return peak * step / warmup
    progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on the matrices of linear layers (attention, MLP, lm_head) only.

    RMSNorm gains (1-D) and the token embedding are not decayed: shrinking a gain or the
    vectors of rarely seen tokens toward zero only fights the normalisation.
    """
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.ndim >= 2 and not name.endswith("embed.weight"):
            decay.append(p)
        else:
            no_decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def prepared_dir(config: TrainConfig) -> Path | None:
    """The data source when it is one prepared directory (``llama-fast prepare``)."""
    sources = config.data.sources
    return Path(sources[0]) if len(sources) == 1 and (Path(sources[0]) / "meta.json").is_file() else None


def data_vocab_size(config: TrainConfig) -> int | None:
    """The vocabulary the data comes with (a prepared directory's or the given tokenizer's); None when the run
    trains its tokenizer (of the model's vocab_size)."""
    if (given := prepared_dir(config)) is not None:
        return read_meta(given)["vocab_size"]
    return Tokenizer(config.data.tokenizer).vocab_size if config.data.tokenizer else None


def prepare_data(config: TrainConfig, d: Dist, vocab_size: int, watchdog: Watchdog) -> Path:
    """The prepared data directory: given, or built once (rank 0) into the cache every run shares."""
    if (given := prepared_dir(config)) is not None:
        return given
    parsed = [parse_source(s) for s in config.data.sources] or None
    tokenizer = config.data.tokenizer or None
    if tokenizer is not None:
        tok = Tokenizer(tokenizer)  # a clear error for a missing file, before any work
        _check_vocab(tok.vocab_size, vocab_size, tokenizer)
    cache = Path(config.data.cache_dir) if config.data.cache_dir else default_cache_dir()
    data_dir = cache / f"prepared-{cache_key(parsed, tokenizer, vocab_size, config.data.val_fraction, 0)}"
    if d.is_main and not (data_dir / "meta.json").is_file():
        print(f"preparing data into {data_dir} (once: later runs of the same sources and tokenizer reuse it)",
              flush=True)
        prepare(parsed, data_dir, tokenizer=tokenizer, vocab_size=vocab_size, val_fraction=config.data.val_fraction,
                progress=config.log.progress)
    with watchdog.waiting("the barrier after data preparation (rank 0 prepares the data)"):
        barrier(d)
    return data_dir


def _check_vocab(tokenizer_vocab: int, model_vocab: int, where) -> None:
    if tokenizer_vocab > model_vocab:
        raise ValueError(
            f"the tokenizer of {where} has a vocabulary of {tokenizer_vocab} ids, which does not fit the model's "
            f"vocab_size {model_vocab}; set --model.vocab_size {tokenizer_vocab} (or larger) or use a smaller tokenizer"
        )


def resume_notes(path: Path, state: dict, config: TrainConfig) -> list[str]:
    """What resuming ``path`` with ``config`` does, where that may surprise: a schedule recomputed for another
    max_steps, nothing left to train."""
    step, t, o = state["step"], config.train, config.optim
    fresh = "--checkpoint.resume never (or another --run-dir) starts afresh"
    notes = [f"resuming {path} at step {step} (checkpoint.resume={config.checkpoint.resume}; {fresh})"]
    saved = state["schedule"]
    if step >= t.max_steps:
        notes.append(f"nothing to train: the checkpoint is at step {step} and train.max_steps is {t.max_steps}; "
                     f"a larger --train.max_steps continues it, {fresh}")
    else:
        now = dict(max_steps=t.max_steps, warmup_steps=o.warmup_steps, peak_lr=o.lr, min_lr_ratio=o.min_lr_ratio)
        changed = [f"{k} {saved[k]:g} -> {v:g}" for k, v in now.items() if saved[k] != v]
        if changed:
            before, after = (lr_at(step + 1, s["peak_lr"], s["warmup_steps"], s["max_steps"], s["min_lr_ratio"])
                             for s in (saved, now))
            notes.append(f"the learning-rate schedule is recomputed: {', '.join(changed)}; step {step + 1} runs at "
                         f"lr {after:.3e} where the checkpoint's schedule had {before:.3e}")
    return notes


class Trainer:
    def __init__(self, config: TrainConfig, d: Dist, threads: tuple[int, str] | None = None):
        self.config, self.d = config, d
        self.run_dir = Path(config.run_dir)
        t, o = config.train, config.optim

        # Resolve every "auto" so the saved config says what ran, and the log's second line too.
        self.auto: dict[str, str] = {}  # field -> what it became, and why

        def resolve(section, name: str, value, why: str = "") -> None:
            setattr(section, name, value)
            self.auto[name] = (f"{value:g}" if isinstance(value, float) else str(value)) + (f" ({why})" if why else "")

        vocab = data_vocab_size(config)
        if vocab is not None and "vocab_size" not in config.model.overrides:
            config.model.overrides["vocab_size"] = vocab
            self.auto["vocab_size"] = f"{vocab} (the tokenizer's)"
        self.model_config = config.llama_config()
        if config.model.backend == "auto":
            resolve(config.model, "backend", "fused" if d.device.type == "cuda" else "reference")
        if t.mixed_precision == "auto":
            resolve(t, "mixed_precision", "bf16" if d.device.type == "cuda" else "fp32")
        t.device = d.device.type
        t.parallel = choose_parallel(t.parallel, self.model_config, d)
        if not config.data.seq_len:
            resolve(config.data, "seq_len", self.model_config.max_seq_len, "the model's max_seq_len")
        self.seq_len = config.data.seq_len
        if o.lr == 0:
            resolve(o, "lr", default_lr(config.model.flavor, self.model_config))
        if o.warmup_steps < 0:
            resolve(o, "warmup_steps", min(2000, t.max_steps // 10), "max_steps // 10, at most 2000")
        t.cpu_threads, why = threads or (torch.get_num_threads(), "torch's")
        self.auto["cpu threads"] = f"{t.cpu_threads} ({why})"

        # Batch geometry: batch_tokens = seq_len * micro_batch * processes * accumulation steps.
        per_pass = self.seq_len * t.micro_batch * d.world_size
        if t.batch_tokens % per_pass:
            raise ValueError(
                f"train.batch_tokens ({t.batch_tokens}) must be a multiple of seq_len * micro_batch * processes "
                f"= {self.seq_len} * {t.micro_batch} * {d.world_size} = {per_pass}"
            )
        self.accum_steps = t.batch_tokens // per_pass
        self.global_sequences = t.batch_tokens // self.seq_len

        self.watchdog = Watchdog(d, t.collective_timeout_s)
        self.data_dir = prepare_data(config, d, self.model_config.vocab_size, self.watchdog)
        meta = read_meta(self.data_dir)
        _check_vocab(meta["vocab_size"], self.model_config.vocab_size, self.data_dir)
        self.tokenizer_path = self.data_dir / meta["tokenizer"]
        self.batches = TokenBatches(self.data_dir, self.seq_len, seed=t.seed)
        self.eos_id = meta["eos_id"] if config.data.document_mask else None

        for seed in (random.seed, np.random.seed, torch.manual_seed):
            seed(t.seed)
        bf16 = t.mixed_precision == "bf16"
        self.model, self.wrapped = build_model(
            self.model_config, config.model.backend, d, t.parallel, t.seed,
            param_dtype=torch.bfloat16 if bf16 and t.parallel == "fsdp" else None, recompute=config.model.recompute,
        )
        # FSDP casts parameters through its policy; elsewhere bf16 is autocast.
        self.autocast = torch.autocast(d.device.type, dtype=torch.bfloat16, enabled=bf16 and t.parallel != "fsdp")
        self.optimizer = torch.optim.AdamW(
            param_groups(self.model, o.weight_decay), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
            fused=d.device.type == "cuda" and t.parallel != "fsdp",  # one kernel per step where supported
        )
        self.step = 0
        self.resumed_from: Path | None = None
        self.resume_notes: list[str] = []
        self.stop_requested = False
        self.peak_flops = peak_flops(d.device, config.log.peak_flops)

    # ---- one optimizer step -------------------------------------------------------------
    def train_step(self, step: int) -> tuple[float, float, float]:
        """(loss, gradient norm before clipping, learning rate) of global step ``step``."""
        o, d = self.config.optim, self.d
        lr = lr_at(step, o.lr, o.warmup_steps, self.config.train.max_steps, o.min_lr_ratio)
        for group in self.optimizer.param_groups:
            group["lr"] = lr

        source, offset = self.batches.rows(step, self.global_sequences)
        mb = self.config.train.micro_batch
        loss_sum = torch.zeros((), device=d.device)
        waits_in = {"ddp": " (DDP's gradient all-reduce)", "fsdp": " (FSDP's all-gathers and reduce-scatters)"}
        with self.watchdog.waiting(f"step {step}'s forward/backward{waits_in.get(self.config.train.parallel, '')}"):
            for micro in range(self.accum_steps):
                rows = slice((micro * d.world_size + d.rank) * mb, (micro * d.world_size + d.rank + 1) * mb)
                tokens = torch.from_numpy(self.batches.read(source[rows], offset[rows])).to(d.device, non_blocking=True)
                inputs, targets = tokens[:, :-1], tokens[:, 1:]  # (mb, seq_len) each
                last = micro == self.accum_steps - 1
                no_sync = (self.wrapped.no_sync() if hasattr(self.wrapped, "no_sync") and not last
                           else contextlib.nullcontext())
                with no_sync:  # entered once: a DDP no_sync() context cannot be entered twice
                    with self.autocast:
                        _, loss = self.wrapped(inputs, targets, documents=self._documents(inputs))
                    (loss / self.accum_steps).backward()
                loss_sum += loss.detach()

        max_norm = o.grad_clip if o.grad_clip > 0 else math.inf
        with self.watchdog.waiting(f"step {step}'s gradient clipping and loss all-reduce"):
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
            if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP
                grad_norm = grad_norm.full_tensor()
            loss_value = all_reduce_mean(loss_sum / self.accum_steps, d).item()
        grad_norm_value = grad_norm.item()
        if not (math.isfinite(loss_value) and math.isfinite(grad_norm_value)):
            raise NonFiniteError(
                f"non-finite training at step {step}: loss {loss_value}, gradient norm {grad_norm_value}; "
                "stopped before the optimizer step, the last checkpoint is intact (lower optim.lr or check the data)"
            )
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_value, grad_norm_value, lr

    def _documents(self, inputs: torch.Tensor) -> torch.Tensor | None:
        """cu_seqlens of the documents in a batch (data.document_mask), else None (one causal run per row)."""
        return None if self.eos_id is None else document_starts(inputs, self.eos_id)

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Mean loss over a fixed set of validation batches (the same at every evaluation)."""
        if not self.batches.has_validation():
            return None
        d, mb = self.d, self.config.train.micro_batch
        total = torch.zeros((), device=d.device)
        for k in range(self.config.log.eval_batches):
            source, offset = self.batches.rows(k, mb * d.world_size, split="val")
            rows = slice(d.rank * mb, (d.rank + 1) * mb)
            tokens = torch.from_numpy(self.batches.read(source[rows], offset[rows], split="val")).to(d.device)
            with self.autocast:
                _, loss = self.model(tokens[:, :-1], tokens[:, 1:], documents=self._documents(tokens[:, :-1]))
            total += loss.float()
        return all_reduce_mean(total / self.config.log.eval_batches, d).item()

    # ---- checkpoints --------------------------------------------------------------------
    def save(self) -> Path:
        state = dict(
            step=self.step,
            schedule=dict(peak_lr=self.config.optim.lr, warmup_steps=self.config.optim.warmup_steps,
                          max_steps=self.config.train.max_steps, min_lr_ratio=self.config.optim.min_lr_ratio),
            data=dict(dir=str(self.data_dir), seed=self.config.train.seed, next_step=self.step + 1,
                      global_sequences=self.global_sequences, seq_len=self.seq_len),
            config=self.config.to_dict(),
            model_config=self.model_config.to_dict(),
        )
        with self.watchdog.waiting(f"the checkpoint save of step {self.step}"):
            return ckpt.save_checkpoint(self.run_dir, self.step, self.model, self.optimizer, state, self.d,
                                        self.config.checkpoint.keep, tokenizer_path=self.tokenizer_path)

    def maybe_resume(self) -> None:
        resume = self.config.checkpoint.resume
        if resume == "never":
            return
        if resume != "auto":
            self.resume_from(Path(resume))
            return
        candidates = ckpt.list_checkpoints(ckpt.checkpoint_dir(self.run_dir))[::-1]
        if candidates:
            self.resume_from_newest_that_loads(candidates)

    def resume_from_newest_that_loads(self, candidates: list[Path]) -> None:
        """Automatic resume: the newest checkpoint that loads on every rank, saying which it skipped and why.

        Loading reads only (no collective), so the ranks agree after each try; a damaged checkpoint
        leaves the model and optimizer partly overwritten, which the next one overwrites whole.
        """
        skipped = []
        for path in candidates:
            error = None
            try:
                self.resume_from(path)
            except ckpt.CheckpointError as e:
                error = e
            if not any_rank(error is not None, self.d):
                if skipped and self.d.is_main:
                    print(f"resuming from {path.name}, the newest checkpoint that loads", flush=True)
                return
            rank = f"rank {self.d.rank}: " if self.d.world_size > 1 else ""
            if error is not None:
                print(f"{rank}skipping damaged checkpoint {path.name}: {error}", flush=True)
            elif self.d.is_main:
                print(f"skipping checkpoint {path.name}: another process could not load it (its message says why)",
                      flush=True)
            skipped.append(path.name)
        raise ckpt.CheckpointError(
            candidates[0].parent, ", ".join(skipped),
            "no checkpoint of this run loads (the reasons are printed above); move them away or start over with "
            "--checkpoint.resume never")

    def resume_from(self, path: Path) -> None:
        state = ckpt.load_checkpoint(path, self.model, self.optimizer, self.d)
        data = ckpt.checked_field(state, "data", dict, path, "state.json")
        saved_seq, saved_sequences = (ckpt.checked_field(data, k, int, path, "state.json", "data")
                                      for k in ("seq_len", "global_sequences"))
        if saved_seq != self.seq_len or saved_sequences != self.global_sequences:
            raise ValueError(
                f"checkpoint {path} was trained with seq_len {saved_seq} and {saved_sequences} "
                f"sequences per step; this run has {self.seq_len} and {self.global_sequences}"
            )
        self.step, self.resumed_from = state["step"], path
        self.resume_notes = resume_notes(path, state, self.config)

    # ---- the run ------------------------------------------------------------------------
    def _on_signal(self, signum, frame) -> None:
        """SIGINT/SIGTERM: finish the step, save, exit. Later signals change nothing: raising here would lose
        the save under way (a scheduler and torchrun often deliver SIGTERM twice, moments apart)."""
        if self.stop_requested and self.d.is_main:  # os.write: print() may be mid-write on this thread
            note = (f"llama_fast: {signal.Signals(signum).name} again: already stopping; the checkpoint is saved "
                    "before exiting (SIGKILL stops without saving)\n")
            os.write(sys.stderr.fileno(), note.encode())
        self.stop_requested = True

    def run(self) -> dict:
        c, d = self.config, self.d
        if d.is_main:
            ckpt.remove_stale_temporaries(ckpt.checkpoint_dir(self.run_dir))
        barrier(d)
        self.maybe_resume()
        start_step = self.step
        metrics = Metrics(self.run_dir, d.is_main, self.step, c.train.max_steps, c.log.progress, c.log.tensorboard,
                          wandb_project=c.log.wandb_project if c.log.wandb else None, run_config=c.to_dict())
        n_params = self.model_config.num_params()
        metrics.print(
            f"llama_fast: {c.model.flavor} ({n_params / 1e6:.1f}M params, backend {c.model.backend}) on "
            f"{d.world_size} x {d.device.type} ({c.train.parallel}, {c.train.mixed_precision}); "
            f"{c.train.batch_tokens} tokens/step = {self.global_sequences} x {self.seq_len} "
            f"({self.accum_steps} accumulation steps); peak lr {c.optim.lr:g}, warmup {c.optim.warmup_steps}; "
            f"run dir {self.run_dir}" + (f"; resumed at step {self.step}" if self.step else "")
        )
        metrics.print("auto: " + ", ".join(f"{k} {v}" for k, v in self.auto.items()))
        attention = "documents" if self.eos_id is not None else "causal"
        metrics.print("attention: " + ("each document (split at EOS) attends to itself, positions restarting "
                                       "(data.document_mask true)" if attention == "documents" else
                                       "one causal run per row across document boundaries (data.document_mask false)"))
        metrics.note(self.step, attention=attention)
        metrics.print(f"logging: {self.run_dir / 'metrics.jsonl'}; " + "; ".join(metrics.loggers))
        for note in self.resume_notes:
            metrics.print(note)
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        flops_per_token = self.model_config.flops_per_token(self.seq_len)
        last_loss = math.nan
        try:
            tick, tokens_since = time.perf_counter(), 0
            while self.step < c.train.max_steps:
                step = self.step + 1
                loss, grad_norm, lr = self.train_step(step)
                self.step, last_loss = step, loss
                tokens_since += c.train.batch_tokens
                metrics.advance(step, loss)
                if step % c.log.interval == 0 or step == c.train.max_steps:
                    elapsed = time.perf_counter() - tick
                    tokens_per_s = tokens_since / elapsed
                    mfu = None if self.peak_flops is None else flops_per_token * tokens_per_s / (self.peak_flops * d.world_size)
                    metrics.log(step, loss=loss, lr=lr, grad_norm=grad_norm, tokens_per_s=tokens_per_s, mfu=mfu,
                                peak_mem_gib=peak_memory_gib(d.device))
                    tick, tokens_since = time.perf_counter(), 0
                else:  # every step's loss is kept (the plot starts at step 1); the console gets the intervals
                    metrics.log(step, console=False, loss=loss, lr=lr, grad_norm=grad_norm)
                if (c.log.eval_interval and step % c.log.eval_interval == 0) or step == c.train.max_steps:
                    with self.watchdog.waiting(f"the validation at step {step}"):
                        val = self.evaluate()
                    if val is not None:
                        metrics.log(step, val_loss=val, val_ppl=math.exp(min(val, 50.0)))
                with self.watchdog.waiting(f"the stop-signal check after step {step}"):
                    stop = any_rank(self.stop_requested, d)
                if stop:
                    metrics.print(f"stop requested: saving a checkpoint at step {step} and exiting")
                    self.stop_requested = True
                    break
                if c.checkpoint.interval and step % c.checkpoint.interval == 0 and step < c.train.max_steps:
                    self.save()
            # A run resumed at max_steps has nothing new to save.
            path = self.save() if self.step > start_step or self.resumed_from is None else self.resumed_from
            metrics.print(f"checkpoint: {path}")
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            metrics.close()
            self.watchdog.close()
        summary = dict(step=self.step, loss=last_loss, checkpoint=str(path), stopped=self.stop_requested)
        if d.is_main:
            png = plot_loss_curve(metrics.path, ckpt.checkpoint_dir(self.run_dir) / "loss_curve.png")
            summary["plot"] = str(png) if png else None
        if c.log.sample_tokens and not self.stop_requested:
            summary["sample"] = self.sample_text()
            metrics.print(f"sample (prompt {c.log.sample_prompt!r}):\n{summary['sample']}")
        return summary

    def sample_text(self) -> str:
        """A sample from the trained model (every rank samples: FSDP's forward is collective)."""
        tok = Tokenizer(self.tokenizer_path)
        prompt = tok.encode(self.config.log.sample_prompt, bos=True)
        new = sample(self.model, prompt, self.config.log.sample_tokens, seed=self.config.train.seed, eos_id=tok.eos_id,
                     vocab_size=tok.vocab_size)
        return tok.decode(prompt[1:] + new)


def train(config: TrainConfig) -> dict:
    """Run (or resume) training; returns a summary (final step, loss, checkpoint, sample)."""
    config.validate()
    threads = cpu_threads(config.train.cpu_threads)  # first: it reads the load before this run adds to it
    callers_threads = torch.get_num_threads()
    torch.set_num_threads(threads[0])
    d = init_distributed(config.train.device, config.train.collective_timeout_s)
    try:
        summary = Trainer(config, d, threads).run()
        # Free the model (FSDP's state holds collective work in reference cycles) while its process
        # group is alive, and leave together: gloo aborts a process that tears its group down under
        # live work ("terminate called without an active exception"). Only on success: after a
        # failure the others may never arrive, and torchrun ends them.
        gc.collect()
        barrier(d)
        return summary
    finally:
        shutdown(d)
        torch.set_num_threads(callers_threads)
