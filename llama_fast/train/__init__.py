"""The trainer: ``llama-fast train`` (one process) or ``torchrun ... -m llama_fast.train`` (many).

Parts: config (file + flags), parallelize (DDP / FSDP2 from outside the model),
checkpoint (atomic, sharded under FSDP, pickle-free), metrics (progress, JSONL, plot), trainer (the loop).
"""
from __future__ import annotations

import argparse


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    from .config import add_arguments

    parser = parser or argparse.ArgumentParser(prog="llama-fast train", description=__doc__.splitlines()[0],
                                               allow_abbrev=False)
    add_arguments(parser)
    parser.set_defaults(func=main_from_args)
    return parser


def main_from_args(args: argparse.Namespace) -> int:
    import sys

    from .config import from_args
    from .trainer import NonFiniteError, train

    try:
        train(from_args(args))
    except NonFiniteError as exc:
        print(f"llama-fast train: {exc}", file=sys.stderr)
        return 1
    return 0


def add_cli(subparsers) -> None:
    parser = subparsers.add_parser(
        "train", help="train a LLaMA model (default: the small flavor on the Python standard library)",
        usage="%(prog)s [--config FILE] [--run-dir DIR] [--data SOURCE ...] [--section.field VALUE ...]",
    )
    build_parser(parser)
