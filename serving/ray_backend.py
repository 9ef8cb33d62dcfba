"""Runs jobs on a Ray cluster instead of local worker processes (`metaprune serve --ray-address`).

Each job is one Ray task with ``max_calls=1`` (its worker process exits afterwards, so nothing a
model did survives it), a data-segment limit (RLIMIT_DATA: the address-space limit would also
count Ray's shared object-store mappings) and the job's time limit (``ray.cancel(force=True)``
past it). Files travel as bytes, so the cluster needs no shared disk with the server; progress
events go through one small actor the server drains.

``--ray-address local`` starts a private single-node Ray bound to 127.0.0.1; anything else is
passed to ``ray.init(address=...)`` ("auto", "HOST:PORT", "ray://HOST:PORT").
"""

from __future__ import annotations

import os
import resource
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from .worker import TaskFailure

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
import ray  # noqa: E402 - the environment above must be set first

_POLL_SECONDS = 0.2


@ray.remote(num_cpus=0)
class _EventSink:
    """Buffers job events until the server drains them."""

    def __init__(self):
        self._events: dict[str, list[dict]] = {}

    def put(self, key: str, event: dict) -> None:
        self._events.setdefault(key, []).append(event)

    def drain(self, key: str) -> list[dict]:
        return self._events.pop(key, [])


def _run_on_ray(task: dict, files: dict[str, bytes], sink, key: str, memory_bytes: int, threads: int) -> dict:
    """The Ray task: writes the inputs locally, runs the worker code, returns the outputs."""
    from .worker import apply_process_limits, run_task

    apply_process_limits(0, threads)
    if memory_bytes > 0:
        resource.setrlimit(resource.RLIMIT_DATA, (memory_bytes, memory_bytes))
    with tempfile.TemporaryDirectory(prefix="metaprune-ray-") as folder:
        local = Path(folder)
        for name, payload in files.items():
            (local / name).write_bytes(payload)
        task = dict(task, out_dir=str(local / "out"))
        for key_name in ("model_path", "data"):
            if task.get(key_name) and Path(task[key_name]).name in files:
                task[key_name] = str(local / Path(task[key_name]).name)
        try:
            report = run_task(task, lambda event: sink.put.remote(key, event))
        except TaskFailure as failure:
            return {"failure": [failure.code, failure.message]}
        outputs = {path.name: path.read_bytes() for path in (local / "out").iterdir() if path.is_file()}
    return {"result": report, "files": outputs}


class RayBackend:
    """Example::

        backend = RayBackend("local", memory_bytes=4 << 30, threads=1)
        report = backend.run(task, on_event=print, timeout=3600.0, cancelled=threading.Event())
    """

    name = "ray"

    def __init__(self, address: str, memory_bytes: int, threads: int = 1, num_cpus: int | None = None):
        # "local" (a private cluster on 127.0.0.1) or an address for ray.init
        self.address = address
        # RLIMIT_DATA of each job's Ray worker
        self.memory_bytes = memory_bytes
        # torch threads inside the job
        self.threads = threads
        if address == "local":
            ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=False,
                     _node_ip_address="127.0.0.1", log_to_driver=False, configure_logging=False)
        else:
            ray.init(address=address, log_to_driver=False, configure_logging=False)
        self._sink = _EventSink.remote()
        self._remote = ray.remote(num_cpus=threads, max_calls=1)(_run_on_ray)

    def warm_up(self) -> None:
        """Nothing to warm: Ray keeps its own worker pool."""

    def run(self, task: dict, *, on_event: Callable[[dict], None], timeout: float,
            cancelled: threading.Event) -> dict:
        files = {}
        for key_name in ("model_path", "data"):
            path = task.get(key_name)
            if path and Path(path).is_file():
                files[Path(path).name] = Path(path).read_bytes()
                if key_name == "model_path" and Path(path).suffix == ".safetensors":
                    files[Path(path).with_suffix(".json").name] = Path(path).with_suffix(".json").read_bytes()
        key = uuid.uuid4().hex
        reference = self._remote.remote(task, files, self._sink, key, self.memory_bytes, self.threads)
        deadline = time.monotonic() + timeout
        try:
            while True:
                ready, _ = ray.wait([reference], timeout=_POLL_SECONDS)
                for event in ray.get(self._sink.drain.remote(key)):
                    on_event(event)
                if ready:
                    break
                if cancelled.is_set():
                    raise TaskFailure("CANCELLED", "the job was cancelled")
                if time.monotonic() > deadline:
                    raise TaskFailure("RESOURCE_EXHAUSTED", f"the job exceeded its time limit of {timeout:g} s")
            try:
                outcome = ray.get(reference)
            except ray.exceptions.RayError as error:
                raise TaskFailure("INTERNAL", f"the Ray worker failed: {str(error)[:500]}") from None
        except TaskFailure:
            ray.cancel(reference, force=True)
            raise
        if "failure" in outcome:
            raise TaskFailure(*outcome["failure"])
        out_dir = Path(task["out_dir"])
        out_dir.mkdir(parents=True, exist_ok=True)
        for name, payload in outcome["files"].items():
            (out_dir / Path(name).name).write_bytes(payload)
        return outcome["result"]
