"""Load figures: N concurrent clients each prune their own small model through one server.

Prints wall time, per-job latency and the server process's peak resident memory (sampled from
/proc every 50 ms); asserts nothing. Run: ``python -m metaprune.serving.load_bench --clients 16``.
The test suite (tests/test_serving_load.py) runs the same function and checks the figures.

``--soak JOBS`` runs the crash soak instead (issue 16): JOBS jobs from the clients against a
server with a small queue, SIGKILLed and restarted ``--kills`` times while they run; afterwards
every job the server holds is checked to have ended SUCCEEDED exactly once::

    nice -n 10 python -m metaprune.serving.load_bench --soak 200 --clients 16 --kills 2

``--watchers N`` times health checks and GetJob while N WatchJob streams are open;
``--orphans`` times how fast the processes of a SIGKILLed server are gone.

``--ray ADDRESS`` compares the back-ends instead (issue 12): the same tiny job 8 times in a row
on a local-back-end server and on one using the Ray cluster at ADDRESS (after one warm-up job
each); prints each median and their ratio.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .client import PruningClient, prune_remote
from .process import ServerProcess
from .samples import write_model


class _PeakMemory:
    """Samples a server's resident memory every 50 ms (across restarts) until stopped."""

    def __init__(self, server: ServerProcess):
        self.server = server
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, self.server.rss_bytes())
            except (OSError, RuntimeError, AttributeError):  # between a kill and the restart
                pass
            self._stop.wait(0.05)

    def __enter__(self) -> "_PeakMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def run_load(root: Path, *, clients: int = 16, workers: int = 2, speedup: float = 2.0,
             suffix: str = ".pt2") -> dict:
    """Start a server, prune `clients` models (.pt2 or .safetensors) concurrently; the figures."""
    models = [write_model(root / f"model-{index}{suffix}", seed=index) for index in range(clients)]
    with ServerProcess(root / "state", args=("--workers", str(workers))) as server, \
            _PeakMemory(server) as memory:

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
        rss_after = server.rss_bytes()
    return {
        "clients": clients, "workers": workers, "format": suffix, "succeeded": len(latencies),
        "wall_s": wall, "latency_median_s": statistics.median(latencies),
        "latency_max_s": max(latencies), "server_peak_rss_mib": memory.peak / (1 << 20),
        "server_rss_after_mib": rss_after / (1 << 20),
    }


def run_soak(root: Path, *, jobs: int = 200, clients: int = 16, kills: int = 2, workers: int = 2,
             queue: int = 8, nice: int = 0) -> dict:
    """`jobs` small jobs from `clients` clients; the server is SIGKILLed and restarted `kills`
    times, evenly spread over the accepted jobs. Returns the figures; asserts nothing."""
    from . import pruning_pb2 as pb

    models = [write_model(root / f"model-{index}.safetensors", seed=index) for index in range(clients)]
    accepted: list[str] = []
    lock = threading.Lock()
    restarts: list[float] = []
    server = ServerProcess(root / "state", args=("--workers", str(workers), "--max-queued-jobs", str(queue)),
                           nice=nice).start()

    def client_loop(index: int) -> tuple[int, list[float]]:
        latencies = []
        with PruningClient(server.address, timeout=60, patience=180) as client:
            model_id = client.upload_model(models[index]).id
            while True:
                with lock:
                    if len(accepted) >= jobs:
                        return client.retries, latencies
                    accepted.append("")  # reserve the slot, filled in once accepted
                    slot = len(accepted) - 1
                began = time.perf_counter()
                job = client.submit(model_id, speedup=2.0)
                accepted[slot] = job.job_id
                client.wait(job.job_id)
                latencies.append(time.perf_counter() - began)

    def killer() -> None:
        for kill in range(1, kills + 1):
            while len(accepted) < jobs * kill / (kills + 1):
                time.sleep(0.05)
            began = time.perf_counter()
            server.restart()  # SIGKILL, then the same port and state
            restarts.append(time.perf_counter() - began)

    began = time.perf_counter()
    try:
        with _PeakMemory(server) as memory:
            crashes = threading.Thread(target=killer, daemon=True)
            crashes.start()
            with ThreadPoolExecutor(max_workers=clients) as pool:
                outcomes = list(pool.map(client_loop, range(clients)))
            crashes.join()
        wall = time.perf_counter() - began
        with PruningClient(server.address, timeout=60) as client:
            held = client.list_jobs(limit=1000)
            finished_once = 0
            for job in held:
                events = client.watch(job.job_id)
                succeeded = [e for e in events if e.kind == "state" and e.state == pb.SUCCEEDED]
                finished_once += job.state == pb.SUCCEEDED and len(succeeded) == 1
            rss_after = server.rss_bytes()
    finally:
        server.stop()
    latencies = [latency for _, measured in outcomes for latency in measured]
    return {
        "jobs_accepted": len(accepted), "jobs_held_by_server": len(held),
        "jobs_unknown_to_clients": len({job.job_id for job in held} - set(accepted)),
        "succeeded_exactly_once": finished_once,
        "jobs_rerun_after_a_kill": sum(job.attempts > 1 for job in held),
        "kills": len(restarts), "restart_s_max": max(restarts, default=0.0),
        "client_retries": sum(retries for retries, _ in outcomes),
        "clients": clients, "workers": workers, "queue_limit": queue, "wall_s": wall,
        "job_latency_median_s": statistics.median(latencies), "job_latency_max_s": max(latencies),
        "server_peak_rss_mib": memory.peak / (1 << 20), "server_rss_after_mib": rss_after / (1 << 20),
    }


def run_backends(root: Path, ray_address: str, *, jobs: int = 8) -> dict:
    """Median wall time of `jobs` tiny jobs in a row (submit to SUCCEEDED), local vs Ray."""
    from . import pruning_pb2 as pb

    model = write_model(root / "model.safetensors")
    figures: dict = {"jobs": jobs}
    for name, args in (("local", ()), ("ray", ("--ray-address", ray_address))):
        with ServerProcess(root / f"state-{name}", args=("--workers", "1", *args), startup_timeout=180) as server, \
                PruningClient(server.address, timeout=120) as client:
            model_id = client.upload_model(model).id
            client.wait(client.submit(model_id, speedup=2.0).job_id)  # the first job warms up
            times = []
            for _ in range(jobs):
                began = time.perf_counter()
                job = client.wait(client.submit(model_id, speedup=2.0).job_id)
                times.append(time.perf_counter() - began)
                if job.state != pb.SUCCEEDED:
                    raise RuntimeError(f"a {name} job failed: {job.message}")
        figures[f"{name}_median_s"] = statistics.median(times)
        figures[f"{name}_times_s"] = " ".join(f"{seconds:.2f}" for seconds in times)
    figures["ray_over_local"] = figures["ray_median_s"] / figures["local_median_s"]
    return figures


def run_watchers(root: Path, *, streams: int = 100, seconds: float = 5.0) -> dict:
    """Open `streams` WatchJob streams on a running job; meanwhile time health checks and
    GetJob calls (issue 16: 64 streams used to hold every RPC thread)."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from . import pruning_pb2 as pb

    with ServerProcess(root / "state", args=("--workers", "1")) as server, \
            PruningClient(server.address, timeout=60) as client:
        model_id = client.upload_model(write_model(root / "model.safetensors")).id
        job = client.submit(model_id, speedup=2.0, dataset="mnist1d", finetune_epochs=500)
        request = pb.WatchJobRequest(job_id=job.job_id)
        opened = [client.stub.WatchJob(request, timeout=300) for _ in range(streams)]
        for stream in opened:
            next(stream)  # its handler runs on the server
        health = health_pb2_grpc.HealthStub(client.channel)
        health_s, get_job_s = [], []
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            began = time.perf_counter()
            health.Check(health_pb2.HealthCheckRequest(), timeout=5)
            health_s.append(time.perf_counter() - began)
            began = time.perf_counter()
            client.stub.GetJob(pb.GetJobRequest(job_id=job.job_id), timeout=5)
            get_job_s.append(time.perf_counter() - began)
        client.cancel(job.job_id)
        ended = sum(1 for stream in opened if list(stream)[-1].state == pb.CANCELLED)
        rss = server.rss_bytes()
    return {"streams": streams, "calls": len(health_s), "health_median_ms": 1e3 * statistics.median(health_s),
            "health_max_ms": 1e3 * max(health_s), "get_job_median_ms": 1e3 * statistics.median(get_job_s),
            "get_job_max_ms": 1e3 * max(get_job_s), "streams_ended_cancelled": ended,
            "server_rss_mib": rss / (1 << 20)}


def run_orphans(root: Path) -> dict:
    """SIGKILL the server alone while a job runs; seconds until none of its processes lives,
    and the job's outcome after a restart (issue 16: the worker ran on for 23.6 s)."""
    import os
    import signal

    from . import pruning_pb2 as pb
    from .fate import descendants, start_ticks

    server = ServerProcess(root / "state", args=("--workers", "1")).start()
    try:
        with PruningClient(server.address, timeout=60) as client:
            model_id = client.upload_model(write_model(root / "model.safetensors")).id
            job = client.submit(model_id, speedup=2.0, dataset="mnist1d", finetune_epochs=8)
            while True:
                family = descendants(server.pid)
                if len(family) >= 3:  # fork server, resource tracker, the job's worker
                    break
                time.sleep(0.02)
            os.kill(server.pid, signal.SIGKILL)
            killed = time.perf_counter()
            while any(start_ticks(pid) is not None for pid in family):
                time.sleep(0.01)
            gone_s = time.perf_counter() - killed
            server.process.wait(10)
            server.start()
            final = client.wait(job.job_id)
        return {"processes_of_the_server": len(family), "all_gone_after_s": gone_s,
                "job_after_restart": pb.JobState.Name(final.state), "attempts": final.attempts}
    finally:
        server.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--format", choices=(".pt2", ".safetensors"), default=".pt2")
    parser.add_argument("--soak", type=int, default=0, metavar="JOBS",
                        help="run the crash soak with this many jobs instead")
    parser.add_argument("--kills", type=int, default=2, help="soak: SIGKILL+restart events")
    parser.add_argument("--queue", type=int, default=8, help="soak: the server's --max-queued-jobs")
    parser.add_argument("--nice", type=int, default=0, help="niceness of the server and its workers")
    parser.add_argument("--ray", default=None, metavar="ADDRESS",
                        help="compare 8 tiny jobs on the local back-end and on this Ray cluster instead")
    parser.add_argument("--watchers", type=int, default=0, metavar="N",
                        help="time health and GetJob with N open WatchJob streams instead")
    parser.add_argument("--orphans", action="store_true",
                        help="time how fast a SIGKILLed server's workers are gone instead")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="metaprune-load-") as folder:
        if args.watchers:
            figures = run_watchers(Path(folder), streams=args.watchers)
        elif args.orphans:
            figures = run_orphans(Path(folder))
        elif args.ray:
            figures = run_backends(Path(folder), args.ray)
        elif args.soak:
            figures = run_soak(Path(folder), jobs=args.soak, clients=args.clients, kills=args.kills,
                               workers=args.workers, queue=args.queue, nice=args.nice)
        else:
            figures = run_load(Path(folder), clients=args.clients, workers=args.workers, suffix=args.format)
    for key, value in figures.items():
        print(f"{key:24s} {value:.2f}" if isinstance(value, float) else f"{key:24s} {value}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
