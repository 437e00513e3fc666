"""The `llama-fast` command: one subcommand per entry point.

Each subcommand lives in its own module, which defines ``add_cli(subparsers)`` to add its
parser and set ``func`` (called with the parsed arguments).

A user's mistake (a bad value, a missing file, an unknown flag) ends in one line on stderr
and exit status 2; ``--debug`` anywhere on the line, or LLAMA_FAST_DEBUG=1, shows the traceback.
Flags are never abbreviated: an unknown one is refused with the nearest known flag.
"""
from __future__ import annotations

import argparse
import difflib
import importlib
import os
import sys

SUBCOMMAND_MODULES = (
    "llama_fast.tokenizer",  # llama-fast tokenizer train|encode|decode
    "llama_fast.convert",  # llama-fast convert (Hugging Face / Meta import and export)
    "llama_fast.data",  # llama-fast prepare
    "llama_fast.train",  # llama-fast train
    "llama_fast.generate",  # llama-fast generate
    "llama_fast.evaluate",  # llama-fast eval
)
DEBUG_ENV = "LLAMA_FAST_DEBUG"
# What a user's input can raise: bad values and config files (TOML and JSON errors are ValueErrors), missing
# or unreadable files. Everything else is ours and keeps its traceback.
USER_ERRORS = (ValueError, OSError)


class Parser(argparse.ArgumentParser):
    """argparse without prefix matching, with negative numbers as values, and with a suggestion for an
    unknown flag. Subcommand parsers are of this class too (argparse creates them as the parent's type)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def parse_known_args(self, args=None, namespace=None):
        args = self._negative_values_attached(list(sys.argv[1:] if args is None else args))
        namespace, extras = super().parse_known_args(args, namespace)
        if extras and not any(isinstance(a, argparse._SubParsersAction) for a in self._actions):
            self.error(f"unrecognized argument{'s' * (len(extras) > 1)} {' '.join(extras)}" + self._suggestion(extras))
        return namespace, extras

    def _negative_values_attached(self, args: list[str]) -> list[str]:
        """``--lr -1e-3`` -> ``--lr=-1e-3``: argparse takes '-1e-3' for a flag (it knows only '-1' and '-1.5')."""
        out = []
        for arg in args:
            action = self._option_string_actions.get(out[-1]) if out else None
            if action is not None and action.nargs is None and action.option_strings and _is_negative_number(arg):
                out[-1] = f"{out[-1]}={arg}"
            else:
                out.append(arg)
        return out

    def _suggestion(self, extras: list[str]) -> str:
        unknown = next((e.split("=", 1)[0] for e in extras if e.startswith("-")), None)
        if unknown is None:
            return ""
        # Compare on the flag's words: '--max-steps' finds '--train.max_steps' by its field name.
        keys = {}
        for option in (o for a in self._actions for o in a.option_strings if o.startswith("--")):
            key = _flag_key(option)
            keys.setdefault(key, option)
            keys.setdefault(key.rpartition(".")[2], option)
        match = difflib.get_close_matches(_flag_key(unknown), keys, n=1, cutoff=0.6)
        return f"; did you mean {keys[match[0]]}?" if match else ""


def _flag_key(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_").lower()


def _is_negative_number(arg: str) -> bool:
    if not arg.startswith("-"):
        return False
    try:
        float(arg)
    except ValueError:
        return False
    return True


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="llama-fast", description=__doc__.splitlines()[0],
                    epilog=f"A mistake in the input prints one line (exit status 2); --debug anywhere on the line, "
                           f"or {DEBUG_ENV}=1, prints the traceback instead.")
    parser.add_argument("--debug", action="store_true", help="tracebacks for errors in the input")
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
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get(DEBUG_ENV, "0") not in ("", "0")
    args = build_parser().parse_args([a for a in argv if a != "--debug"])
    try:
        return int(args.func(args) or 0)
    except USER_ERRORS as exc:
        if debug:
            raise
        message = " ".join(str(exc).split())  # one line, whatever the message held
        print(f"llama-fast {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
