"""``saint`` command line: a thin layer over the library. Each subcommand lives in
``saint.commands.<name>`` and exposes ``register(subparsers)`` which adds its parser
and sets ``func(args) -> int``."""

from __future__ import annotations

import argparse
import importlib
import sys

# One entry per subcommand module (saint/commands/<name>.py).
COMMANDS = ["demo", "bench", "eval", "sweep", "analyze", "viz", "vlm_bench", "calibrate"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="saint", description="Similarity-aware token pruning for ViTs and VLMs.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"saint.commands.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = ["saint", *(sys.argv[1:] if argv is None else argv)]  # as typed, for the records a command writes
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
