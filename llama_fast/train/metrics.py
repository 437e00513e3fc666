"""Metrics on rank 0: a progress bar, console lines, a JSONL log, TensorBoard, Weights & Biases, a loss plot.

Every step's loss goes to the log (the plot starts at step 1); the console shows every
``log.interval``-th step. TensorBoard is used where installed (``loggers`` says whether it
is), Weights & Biases when asked for (``log.wandb``; WANDB_MODE=offline keeps it on disk).

MFU is ``LlamaConfig.flops_per_token(seq_len) * tokens_per_s / (peak_flops * processes)``.
The peak is the device's dense bf16 rate (989e12 for H100 / H200) or ``log.peak_flops``;
on CPU, or a GPU not listed, MFU is reported as n/a (None in the log). ``peak_mem_gib`` is
torch.cuda.max_memory_allocated on GPUs and the process's peak resident set on CPU.
"""
from __future__ import annotations

import json
import math
import resource
import sys
import time
import warnings
from pathlib import Path

import torch

# Dense bf16 tensor-core peaks, by a substring of torch.cuda.get_device_name().
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12, "L40S": 362e12}


def peak_flops(device: torch.device, override: float = 0.0) -> float | None:
    if override > 0:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def read_jsonl(path: str | Path) -> list[dict]:
    """The records of a JSONL log. A line that is not a JSON object (the last record cut short by a crash
    or a full disk) is skipped with a warning naming the file: the log never stops a run."""
    path = Path(path)
    if not path.is_file():
        return []
    records, skipped = [], []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if isinstance(record, dict):
            records.append(record)
        else:
            skipped.append(number)
    if skipped:
        others = " and others" if len(skipped) > 1 else ""
        warnings.warn(f"{path}: skipped {len(skipped)} line(s) that are not JSON records (line {skipped[0]}{others}), "
                      "e.g. a record cut short by a crash or a full disk", stacklevel=2)
    return records


class Metrics:
    """Rank 0 writes; on other ranks every method is a no-op."""

    def __init__(self, run_dir: str | Path, enabled: bool, start_step: int, max_steps: int, progress: bool,
                 tensorboard: bool, wandb_project: str | None = None, run_config: dict | None = None):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.bar = self.writer = self.wandb = None
        self.loggers: list[str] = []  # what each optional logger is doing, for the first lines of the run
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # A resumed run continues the log from its checkpoint: drop what came after it.
        kept = [r for r in read_jsonl(self.path) if r.get("step", 0) <= start_step]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        if wandb_project is not None:
            try:
                import wandb
            except ImportError:
                raise ValueError("log.wandb needs the wandb package (pip install wandb), which is not installed") \
                    from None
            self.wandb = wandb.init(project=wandb_project, dir=str(run_dir), name=Path(run_dir).name, config=run_config)
            self.loggers.append(f"wandb: project {wandb_project}, run {self.wandb.id}")
        self.file = open(self.path, "a")
        if progress:
            from tqdm import tqdm

            self.bar = tqdm(total=max_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True,
                            file=sys.stderr)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional
                self.loggers.append("tensorboard: not installed (pip install tensorboard)")
            else:
                self.writer = SummaryWriter(str(Path(run_dir) / "tensorboard"))
                self.loggers.append(f"tensorboard: {Path(run_dir) / 'tensorboard'}")
        else:
            self.loggers.append("tensorboard: off (log.tensorboard false)")

    def print(self, message: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(message)
        else:
            print(message, flush=True)

    def note(self, step: int, **values) -> None:
        """A JSONL record of the run's settings (not a metric: no scalars, no console line)."""
        if self.enabled:
            self.file.write(json.dumps({"step": step, "time": time.time(), **values}) + "\n")
            self.file.flush()

    def log(self, step: int, console: bool = True, **values) -> None:
        """One JSONL record; TensorBoard and wandb scalars; a console line unless ``console`` is False."""
        if not self.enabled:
            return
        record = {"step": step, "time": time.time(), **values}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        scalars = {k: v for k, v in values.items() if isinstance(v, (int, float))}
        if self.writer is not None:
            for k, v in scalars.items():
                self.writer.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)
        if console:
            self.print(f"step {step:>6} | " + " | ".join(_format(k, v) for k, v in values.items()))

    def advance(self, step: int, loss: float) -> None:
        if self.enabled and self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
        if self.wandb is not None:
            self.wandb.finish()
        self.file.close()


def _format(key: str, value) -> str:
    if value is None:
        return f"{key} n/a"
    if key == "lr":
        return f"lr {value:.3e}"
    if key == "mfu":
        return f"mfu {100 * value:.1f}%"
    if key == "tokens_per_s":
        return f"{value:,.0f} tok/s"
    if isinstance(value, float):
        return f"{key} {value:.4f}"
    return f"{key} {value}"


def plot_loss_curve(jsonl_path: str | Path, out_png: str | Path) -> Path | None:
    """Training and validation loss against step, as a PNG (matplotlib's Agg backend); None without matplotlib."""
    records = read_jsonl(jsonl_path)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r and math.isfinite(r["loss"])]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    if not train:
        return None
    try:
        import matplotlib
    except ImportError:  # optional: pip install llama_fast[train]
        return None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(*zip(*train), linewidth=0.8, alpha=0.8, label="train loss (every step)")
    if val:  # drawn over the train curve, in a colour of its own, each evaluation marked
        ax.plot(*zip(*val), "o-", color="tab:red", markersize=5, linewidth=1.8, zorder=3, label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats / token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    return out_png
