"""`metaprune bench NAME`: run a benchmark that prints figures (speed, memory, accuracy)."""

import argparse
from importlib import import_module

from metaprune.bench import BENCHMARKS


def register(subparsers) -> None:
    parser = subparsers.add_parser("bench", help="run a benchmark and print its figures")
    names = parser.add_subparsers(dest="benchmark", metavar="NAME")
    names.required = True
    for name in BENCHMARKS:
        module = import_module(f"metaprune.bench.{name}")
        sub = names.add_parser(name, help=(module.__doc__ or "").strip().splitlines()[0])
        module.add_arguments(sub)
        sub.set_defaults(handler=module.run)
    all_parser = names.add_parser("all", help="run every benchmark with its defaults")
    all_parser.set_defaults(handler=_run_all)


def _run_all(args) -> int:
    for name in BENCHMARKS:
        module = import_module(f"metaprune.bench.{name}")
        sub = argparse.ArgumentParser(prog=f"metaprune bench {name}")
        module.add_arguments(sub)
        print(f"== bench {name} ==", flush=True)
        module.run(sub.parse_args([]))
    return 0
