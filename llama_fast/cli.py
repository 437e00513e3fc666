"""The `llama-fast` command: one subcommand per entry point.

Each subcommand lives in its own module, which defines ``add_cli(subparsers)`` to add its
parser and set ``func`` (called with the parsed arguments).
"""
from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMAND_MODULES = (
    "llama_fast.tokenizer",  # llama-fast tokenizer train|encode|decode
    "llama_fast.convert",  # llama-fast convert (Hugging Face / Meta import and export)
    "llama_fast.data",  # llama-fast prepare
    "llama_fast.train",  # llama-fast train
    "llama_fast.generate",  # llama-fast generate
    "llama_fast.evaluate",  # llama-fast eval
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llama-fast", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:  # this entry point is not part of this build
                continue
            raise
        module.add_cli(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
