"""The `metaprune` command: a thin dispatcher.

Each sub-command lives in its own module `metaprune/cli/<name>_cmd.py` exposing
`register(subparsers)`, which adds its parser and sets `handler` to a function taking the parsed
arguments and returning an exit code. Heavy imports (torch, Ray, gRPC) happen inside handlers,
so `metaprune --help` is fast.
"""

import argparse
import sys
from importlib import import_module

from metaprune.errors import MetaPruneError

# Order is the order shown by `metaprune --help`.
COMMANDS = ("data", "bench", "serve", "zoo", "inspect", "prune", "metanet", "tune")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="metaprune",
        description="Meta-learned structured pruning of neural networks.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for name in COMMANDS:
        import_module(f"metaprune.cli.{name}_cmd").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except MetaPruneError as error:
        # Errors a user can cause: a clear message, no traceback, non-zero exit.
        print(f"metaprune {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
