"""Benchmarks behind `metaprune bench NAME`: each module prints figures, none asserts.

A benchmark module `metaprune/bench/<name>.py` exposes `add_arguments(parser)` and `run(args)`.
Register a new one by adding its name to `BENCHMARKS`.
"""

BENCHMARKS: tuple[str, ...] = ("zoo", "graph", "formats", "prune", "metanet", "startup", "latency",
                               "metanet-scale", "textlm")
