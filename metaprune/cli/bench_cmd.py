"""`metaprune bench NAME [ARGS...]`: run a benchmark that prints figures (speed, memory, accuracy).

The benchmark module is imported only when it runs: benchmarks import torch and build models at
import time, and the rest of the CLI (notably `metaprune serve`, whose process must stay small)
should not pay for that. Each benchmark parses its own arguments.
"""

import argparse
from importlib import import_module

from metaprune.bench import BENCHMARKS


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="run a benchmark and print its figures",
        description="Benchmarks: " + ", ".join(BENCHMARKS) + ", or 'all'. "
        "`metaprune bench NAME --help` lists a benchmark's options.",
    )
    parser.add_argument("benchmark", choices=(*BENCHMARKS, "all"), metavar="NAME")
    parser.add_argument("benchmark_args", nargs=argparse.REMAINDER, metavar="ARGS")
    parser.set_defaults(handler=_run)


def _run(args) -> int:
    names = BENCHMARKS if args.benchmark == "all" else (args.benchmark,)
    for name in names:
        module = import_module(f"metaprune.bench.{name.replace('-', '_')}")
        parser = argparse.ArgumentParser(
            prog=f"metaprune bench {name}", description=(module.__doc__ or "").strip()
        )
        module.add_arguments(parser)
        # `all` runs every benchmark with its defaults.
        options = parser.parse_args(args.benchmark_args if len(names) == 1 else [])
        if len(names) > 1:
            print(f"== bench {name} ==", flush=True)
        status = module.run(options)
        if status:
            return int(status)
    return 0
