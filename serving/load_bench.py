"""Load figures: N concurrent clients each prune their own small model through one server.

Prints wall time, per-job latency and the server process's peak resident memory (sampled from
/proc every 50 ms); asserts nothing. Run: ``python -m metaprune.serving.load_bench --clients 16``.
The test suite (tests/test_serving_load.py) runs the same function and checks the figures.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .client import prune_remote
from .process import ServerProcess
from .samples import write_model


def run_load(root: Path, *, clients: int = 16, workers: int = 2, speedup: float = 2.0,
             suffix: str = ".pt2") -> dict:
    """Start a server, prune `clients` models (.pt2 or .safetensors) concurrently; the figures."""
    models = [write_model(root / f"model-{index}{suffix}", seed=index) for index in range(clients)]
    peak = {"rss": 0}
    with ServerProcess(root / "state", args=("--workers", str(workers))) as server:
        stop = threading.Event()

        def sample():
            while not stop.is_set():
                peak["rss"] = max(peak["rss"], server.rss_bytes())
                stop.wait(0.05)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()

        def one(index: int) -> float:
            began = time.perf_counter()
            report = prune_remote(server.address, models[index], root / f"pruned-{index}{suffix}",
                                  options={"method": "l2", "speedup": speedup}, progress=False)
            assert report["flops_after"] < report["flops_before"]
            return time.perf_counter() - began

        began = time.perf_counter()
        with ThreadPoolExecutor(max_workers=clients) as pool:
            latencies = list(pool.map(one, range(clients)))
        wall = time.perf_counter() - began
        stop.set()
        sampler.join()
        rss_after = server.rss_bytes()
    return {
        "clients": clients, "workers": workers, "format": suffix, "succeeded": len(latencies),
        "wall_s": wall, "latency_median_s": statistics.median(latencies),
        "latency_max_s": max(latencies), "server_peak_rss_mib": peak["rss"] / (1 << 20),
        "server_rss_after_mib": rss_after / (1 << 20),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--format", choices=(".pt2", ".safetensors"), default=".pt2")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="metaprune-load-") as folder:
        figures = run_load(Path(folder), clients=args.clients, workers=args.workers, suffix=args.format)
    for key, value in figures.items():
        print(f"{key:24s} {value:.2f}" if isinstance(value, float) else f"{key:24s} {value}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
