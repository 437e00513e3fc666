"""The run's configuration: a TOML or YAML file, then command-line overrides.

Every field has a default (the paper's recipe for the optimizer, the CPU demo for sizes)
and a flag ``--section.field VALUE``; ``[model]`` also takes any LlamaConfig field as an
override of the flavor (``--model.dim 512``). The resolved configuration is saved, as
JSON, with every checkpoint.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from ..config import PAPER_LR, LlamaConfig, flavor_name
from ..model import RECOMPUTE

LLAMA_FIELDS = {f.name: typing.get_type_hints(LlamaConfig)[f.name] for f in dataclasses.fields(LlamaConfig) if f.init}


@dataclass
class ModelSection:
    flavor: str = "small"  # a LlamaConfig flavor
    backend: str = "auto"  # "fused" | "reference"; auto: fused on GPUs, reference on CPU
    recompute: str = "none"  # "none" | "cheap" (norm and SwiGLU outputs; fused backend) | "blocks" (whole blocks)
    overrides: dict = field(default_factory=dict)  # LlamaConfig fields that replace the flavor's


@dataclass
class DataSection:
    sources: list[str] = field(default_factory=list)  # "[name=]PATH[:weight]" or one prepared dir; empty: stdlib
    tokenizer: str = ""  # a SentencePiece .model; empty: train one of the model's vocab size
    seq_len: int = 128  # tokens per sequence; 0: the model's max_seq_len
    val_fraction: float = 0.01
    cache_dir: str = ""  # where raw sources are prepared once; empty: <run_dir>/data
    # true: attention stops at document boundaries (EOS): each document attends to itself, positions restart
    # (LLaMA 3); false: the packed stream is one causal sequence per row, as the LLaMA paper trained.
    document_mask: bool = False


@dataclass
class OptimSection:
    lr: float = 0.0  # peak rate; 0: the paper's for its flavors (PAPER_LR), else default_lr()
    min_lr_ratio: float = 0.1  # the cosine ends at this share of the peak
    warmup_steps: int = -1  # -1: min(2000, max_steps // 10)
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1  # on the linear layers' matrices only (see trainer.param_groups)
    grad_clip: float = 1.0  # max global gradient norm; 0 disables


@dataclass
class TrainSection:
    # The defaults are the CPU demo (the small flavor on the standard library in a few minutes).
    max_steps: int = 150
    batch_tokens: int = 2048  # global tokens per optimizer step (reached by gradient accumulation)
    micro_batch: int = 16  # sequences per forward pass per process
    seed: int = 0
    device: str = "auto"  # "cuda" | "cpu"; auto: cuda where available
    parallel: str = "auto"  # "none" | "ddp" | "fsdp"; auto: none for one process, else ddp unless it does not fit
    mixed_precision: str = "auto"  # "bf16" | "fp32"; auto: bf16 on GPUs
    # Seconds a collective waits for the other processes before it fails the run (rank 0 preparing the
    # data included); the waiting ones say where they wait every min(60 s, a tenth of this).
    collective_timeout_s: float = 1800.0
    cpu_threads: int = 0  # torch's intra-op threads per process; 0: auto (see trainer.cpu_threads)


@dataclass
class CheckpointSection:
    interval: int = 100  # steps between checkpoints (one is always written at the end); 0: end only
    keep: int = 3  # the last K checkpoints are kept
    resume: str = "auto"  # "auto": the latest in run_dir, if any; "never"; or a checkpoint directory


@dataclass
class LogSection:
    interval: int = 10  # steps between metric lines
    eval_interval: int = 25  # steps between validation losses; 0: only at the end
    eval_batches: int = 4  # validation batches (of micro_batch sequences per process)
    sample_tokens: int = 64  # tokens of the sample printed at the end; 0: none
    sample_prompt: str = "def "
    progress: bool = True  # tqdm bar on rank 0
    tensorboard: bool = True  # where tensorboard is installed (the startup line says whether it is)
    wandb: bool = False  # Weights & Biases (pip install wandb; WANDB_MODE=offline writes under run_dir/wandb)
    wandb_project: str = "llama_fast"
    peak_flops: float = 0.0  # for MFU; 0: known GPUs (989e12 for H100 bf16), n/a on CPU


SECTIONS = {
    "model": ModelSection,
    "data": DataSection,
    "optim": OptimSection,
    "train": TrainSection,
    "checkpoint": CheckpointSection,
    "log": LogSection,
}


@dataclass
class TrainConfig:
    run_dir: str = "runs/llama"
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    log: LogSection = field(default_factory=LogSection)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        config = cls()
        config.update(d)
        return config

    def update(self, d: dict) -> None:
        """Merge a nested dict (from a file or a checkpoint) into this config, checking every key."""
        for key, value in d.items():
            if key == "run_dir":
                self.run_dir = str(value)
            elif key in SECTIONS:
                if not isinstance(value, dict):
                    raise ValueError(f"config [{key}]: expected a table, got {value!r}")
                for name, v in value.items():
                    self.set(f"{key}.{name}", v)
            else:
                raise ValueError(f"config: unknown key {key!r}; expected run_dir or one of {sorted(SECTIONS)}")

    def set(self, dotted: str, value) -> None:
        """Set ``section.field`` (``model.<LlamaConfig field>`` goes to model.overrides)."""
        section_name, _, name = dotted.partition(".")
        if section_name not in SECTIONS:
            raise ValueError(f"config: unknown section {section_name!r} in {dotted!r}; expected one of {sorted(SECTIONS)}")
        section = getattr(self, section_name)
        if section_name == "model" and name == "overrides":
            for k, v in dict(value).items():
                self.set(f"model.{k}", v)
            return
        if section_name == "model" and name in LLAMA_FIELDS:
            section.overrides[name] = _coerce(value, LLAMA_FIELDS[name], dotted)
            return
        hints = typing.get_type_hints(type(section))
        if section_name == "model" and name == "activation_checkpointing":
            raise ValueError(f"config {dotted!r} was replaced by model.recompute: 'blocks' recomputes whole blocks, "
                             "'cheap' only the norm and SwiGLU outputs, 'none' nothing")
        if name not in hints:
            known = sorted(hints) + (sorted(LLAMA_FIELDS) if section_name == "model" else [])
            raise ValueError(f"config: unknown field {dotted!r}; [{section_name}] has {known}")
        setattr(section, name, _coerce(value, hints[name], dotted))

    def llama_config(self) -> LlamaConfig:
        return LlamaConfig.from_name(self.model.flavor, **self.model.overrides)

    def validate(self) -> None:
        self.model.flavor = flavor_name(self.model.flavor, "model.flavor")
        _check_choice("model.backend", self.model.backend, ("auto", "fused", "reference"))
        _check_choice("model.recompute", self.model.recompute, RECOMPUTE)
        if self.model.recompute == "cheap" and self.model.backend == "reference":
            raise ValueError("model.recompute='cheap' needs model.backend 'fused' (or 'auto' on a GPU), "
                             "got 'reference'")
        _check_choice("train.device", self.train.device, ("auto", "cuda", "cpu"))
        _check_choice("train.parallel", self.train.parallel, ("auto", "none", "ddp", "fsdp"))
        _check_choice("train.mixed_precision", self.train.mixed_precision, ("auto", "bf16", "fp32"))
        for name in ("train.max_steps", "train.batch_tokens", "train.micro_batch", "checkpoint.keep",
                     "log.interval", "log.eval_batches"):
            _check_min(name, self._get(name), 1)
        for name in ("data.seq_len", "train.cpu_threads", "checkpoint.interval", "log.eval_interval",
                     "log.sample_tokens",
                     "optim.weight_decay", "optim.grad_clip", "optim.lr", "log.peak_flops"):
            _check_min(name, self._get(name), 0)
        _check_min("optim.warmup_steps", self.optim.warmup_steps, -1)
        if not 0 < self.optim.min_lr_ratio <= 1:
            raise ValueError(f"optim.min_lr_ratio must lie in (0, 1], got {self.optim.min_lr_ratio}")
        for name in ("optim.beta1", "optim.beta2"):
            if not 0 <= self._get(name) < 1:
                raise ValueError(f"{name} must lie in [0, 1), got {self._get(name)}")
        self._check_ranges()
        model = self.llama_config()  # validates the overrides
        if self.data.seq_len > model.max_seq_len:
            raise ValueError(f"data.seq_len ({self.data.seq_len}) exceeds the model's max_seq_len ({model.max_seq_len})")

    def _check_ranges(self) -> None:
        """Values that pass the type check but would fail later (NaN or Inf anywhere, an Adam eps of 0, a
        learning rate Adam cannot hold, a seed numpy refuses, a RoPE base of 0) are refused here."""
        ranges = {  # name -> (low, high, whether low itself is allowed)
            "optim.lr": (0.0, 1.0, True),  # 0: the flavor's default
            "optim.eps": (0.0, 1.0, False),
            "optim.weight_decay": (0.0, math.inf, True),
            "optim.grad_clip": (0.0, math.inf, True),  # 0: no clipping
            "log.peak_flops": (0.0, math.inf, True),
            "train.seed": (0, 2**32 - 1, True),  # numpy's seeds
            "train.collective_timeout_s": (0.0, math.inf, False),
        }
        for name, (low, high, closed) in ranges.items():
            _check_range(name, self._get(name), low, high, closed)
        for name in ("norm_eps", "rope_theta"):
            if name in self.model.overrides:
                _check_range(f"model.{name}", self.model.overrides[name], 0.0, math.inf, False)
        if not 0 <= self.data.val_fraction < 1:  # (NaN fails too)
            raise ValueError(f"data.val_fraction must be a finite number in [0, 1), got {self.data.val_fraction!r}")

    def _get(self, dotted: str):
        section, name = dotted.split(".")
        return getattr(getattr(self, section), name)


def default_lr(flavor: str, model: LlamaConfig) -> float:
    """The paper's peak rate for its flavors; for smaller models a rate that suits their size."""
    if flavor in PAPER_LR:
        return PAPER_LR[flavor]
    return 1e-3 if model.num_params() < 100e6 else 4e-4


def _check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"{name}: expected one of {list(choices)}, got {value!r}")


def _check_range(name, value, low, high, low_allowed: bool) -> None:
    """A finite number in [low, high] ((low, high] when low itself is not allowed)."""
    if not (math.isfinite(value) and (low <= value if low_allowed else low < value) and value <= high):
        interval = f"{'[' if low_allowed else '('}{low}, {high}]"
        raise ValueError(f"{name} must be a finite number in {interval}, got {value!r}")


def _check_min(name, value, minimum):
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")


def _coerce(value, hint, name: str):
    """A value from a file or the command line (strings) -> the field's type."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):  # "int | None"
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() == "none"):
            return None
        return _coerce(value, args[0], name)
    if origin is list or hint is list:
        if isinstance(value, str):
            value = [v for v in value.split(",") if v] if value else []
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"config {name}: expected a list, got {value!r}")
        return [str(v) for v in value]
    if hint is dict:
        if isinstance(value, str):
            value = json.loads(value)
        if not isinstance(value, dict):
            raise ValueError(f"config {name}: expected a table, got {value!r}")
        return dict(value)
    if hint is bool:
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return value.lower() in ("1", "true", "yes", "on")
        if isinstance(value, bool):
            return value
        raise ValueError(f"config {name}: expected a boolean, got {value!r}")
    try:
        if hint is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(float(value)) if isinstance(value, str) and ("e" in value.lower()) else int(value)
        if hint is float:
            return float(value)
        if hint is str:
            return str(value)
    except (TypeError, ValueError):
        raise ValueError(f"config {name}: expected {hint.__name__}, got {value!r}") from None
    raise TypeError(f"config {name}: unsupported field type {hint}")


def load_file(path: str | Path) -> dict:
    """A TOML (.toml) or YAML (.yaml, .yml) file -> nested dict."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--config: no such file {str(path)!r}")
    if path.suffix == ".toml":
        if sys.version_info >= (3, 11):
            import tomllib
        else:
            try:
                import tomli as tomllib
            except ModuleNotFoundError:
                raise RuntimeError("TOML configs need Python >= 3.11 or `pip install tomli`; or use YAML") from None
        with open(path, "rb") as f:
            try:
                return tomllib.load(f)
            except tomllib.TOMLDecodeError as exc:
                raise ValueError(f"--config {path}: not valid TOML: {exc}") from exc
    if path.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ModuleNotFoundError:
            raise RuntimeError("YAML configs need `pip install pyyaml`; or use TOML") from None
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ValueError(f"--config {path}: not valid YAML: {exc}") from exc
        if not isinstance(data, dict):
            raise ValueError(f"--config {path}: expected a mapping at the top level, got {type(data).__name__}")
        return data
    raise ValueError(f"--config: expected a .toml, .yaml or .yml file, got {str(path)!r}")


# Short flags for the settings people change most; every field also has --section.field.
SHORTCUTS = {
    "--flavor": "model.flavor",
    "--backend": "model.backend",
    "--steps": "train.max_steps",
    "--lr": "optim.lr",
    "--seq-len": "data.seq_len",
    "--tokenizer": "data.tokenizer",
    "--resume": "checkpoint.resume",
}


# What an automatic default becomes, for --help (the run's first line prints what it became).
AUTO_HELP = {
    "model.backend": "auto: fused on a GPU, reference on the CPU (the fused forwards need a GPU)",
    "data.tokenizer": "empty: one trained on the data, of the model's vocab_size",
    "data.seq_len": "0: the model's max_seq_len",
    "data.cache_dir": "empty: $LLAMA_FAST_CACHE, else ~/.cache/llama_fast, shared by every run",
    "data.document_mask": "true: documents split at EOS attend to themselves only, positions restarting "
                          "(LLaMA 3); false: one causal run per sequence, as the LLaMA paper",
    "optim.lr": "0: auto, the paper's rate for 7B to 65B, else 1e-3 below 100M parameters (small, tiny) "
                "and 4e-4 above",
    "optim.warmup_steps": "-1: auto, min(2000, max_steps // 10), so 15 for 150 steps",
    "train.device": "auto: cuda where available, else cpu",
    "train.parallel": "auto: none for one process, else ddp when the model fits a GPU, else fsdp",
    "train.mixed_precision": "auto: bf16 on a GPU, fp32 on the CPU",
    "train.cpu_threads": "0: auto, $OMP_NUM_THREADS when set, else the cores this process may use "
                         "divided by the processes on its node",
    "checkpoint.resume": "auto: the latest checkpoint in run_dir, if any; never; or a checkpoint directory",
    "log.peak_flops": "0: known GPUs (989e12 for H100 bf16); MFU n/a on the CPU",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="a TOML or YAML file; flags override it")
    parser.add_argument("--run-dir", help="checkpoints, logs and plots go here (default runs/llama)")
    parser.add_argument("--data", action="append", metavar="[NAME=]PATH[:WEIGHT]",
                        help="a data source and its sampling weight (repeat to mix), or one prepared directory; "
                             "default: the standard library's *.py files")
    for flag, dotted in SHORTCUTS.items():
        parser.add_argument(flag, dest=dotted, default=argparse.SUPPRESS, help=f"= --{dotted}")
    for section_name, cls in SECTIONS.items():
        group = parser.add_argument_group(f"[{section_name}]")
        for f in dataclasses.fields(cls):
            if f.name == "overrides":
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            dotted = f"{section_name}.{f.name}"
            auto = f"; {AUTO_HELP[dotted]}" if dotted in AUTO_HELP else ""
            group.add_argument(f"--{dotted}", dest=dotted, metavar="V", default=argparse.SUPPRESS,
                               help=f"(default {default!r}{auto})")
        if section_name == "model":
            for name in LLAMA_FIELDS:
                group.add_argument(f"--model.{name}", dest=f"model.{name}", metavar="V", default=argparse.SUPPRESS,
                                   help="LlamaConfig override")


def from_args(args: argparse.Namespace) -> TrainConfig:
    """Defaults, then the --config file, then flags."""
    config = TrainConfig()
    if args.config:
        config.update(load_file(args.config))
    if args.run_dir:
        config.run_dir = args.run_dir
    if args.data:
        config.data.sources = list(args.data)
    for key, value in vars(args).items():
        if "." in key:
            config.set(key, value)
    config.validate()
    return config
