"""Runs queued jobs on a back-end, records their events, and survives restarts.

`workers` dispatcher threads each take the next queued job, mark it RUNNING, hand it to the
back-end (one worker process per job) and record the outcome. The job's files are written to
`jobs/<id>/attempt-<n>/` and renamed to `result/` only on success, so an attempt killed half way
(a server crash) never leaves a half-written result behind.
"""

from __future__ import annotations

import json
import logging
import queue
import shutil
import threading
import time
from collections import deque

from .store import CANCELLED, FAILED, SUCCEEDED, JobStore
from .worker import TaskFailure

log = logging.getLogger(__name__)

# events recorded per job attempt; a worker that logs without end cannot fill the disk
MAX_EVENTS_PER_ATTEMPT = 10_000


class Scheduler:
    """Job queue in front of a back-end.

    Example::

        scheduler = Scheduler(store, LocalBackend(4 << 30), workers=2, job_time_seconds=3600)
        scheduler.start()              # re-queues what a previous run left unfinished
        scheduler.enqueue(job.id)
    """

    def __init__(self, store: JobStore, backend, *, workers: int, job_time_seconds: float):
        # where jobs, events and artifacts live
        self.store = store
        # LocalBackend or RayBackend: `run(task, on_event=, timeout=, cancelled=)`
        self.backend = backend
        # jobs running at once
        self.workers = workers
        # wall-clock limit of one job
        self.job_time_seconds = job_time_seconds
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._cancel_flags: dict[str, threading.Event] = {}
        self._flags_lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._stopping = False
        self._durations: deque[float] = deque(maxlen=20)  # seconds of recent finished jobs

    def typical_job_seconds(self) -> float:
        """Median wall time of the recent jobs (5 s before any finished): retry hints use it."""
        recent = sorted(self._durations)
        return recent[len(recent) // 2] if recent else 5.0

    def start(self) -> None:
        for job_id in self.store.requeue_unfinished():
            self._queue.put(job_id)
        for index in range(self.workers):
            thread = threading.Thread(target=self._loop, daemon=True, name=f"dispatch-{index}")
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        """Stop dispatching; running jobs are stopped and will re-run after the next start."""
        self._stopping = True
        for _ in self._threads:
            self._queue.put(None)
        with self._flags_lock:
            for flag in self._cancel_flags.values():
                flag.set()
        for thread in self._threads:
            thread.join(timeout=10)

    def enqueue(self, job_id: str) -> None:
        self._queue.put(job_id)

    def cancel(self, job_id: str) -> bool:
        """Cancel a QUEUED or RUNNING job; False if it had already finished."""
        done = self.store.finish(job_id, CANCELLED, message="cancelled by the client",
                                 error_code="CANCELLED")
        with self._flags_lock:
            flag = self._cancel_flags.get(job_id)
        if flag is not None:
            flag.set()  # the dispatcher kills the worker process
        return done

    def _loop(self) -> None:
        while True:
            job_id = self._queue.get()
            if job_id is None:
                return
            try:
                self._run(job_id)
            except Exception:  # noqa: BLE001 - one broken job must not stop the dispatcher
                log.exception("job %s crashed the dispatcher", job_id)
                self.store.finish(job_id, FAILED, message="internal error while dispatching",
                                  error_code="INTERNAL")

    def _run(self, job_id: str) -> None:
        attempt = self.store.start_attempt(job_id)
        if attempt is None:  # cancelled while queued
            return
        job = self.store.get_job(job_id)
        job_dir = self.store.job_dir(job_id)
        attempt_dir = job_dir / f"attempt-{attempt}"
        for stale in job_dir.glob("attempt-*"):  # left by an attempt a crash interrupted
            shutil.rmtree(stale, ignore_errors=True)
        task = dict(job.task, kind="prune", out_dir=str(attempt_dir))
        flag = threading.Event()
        with self._flags_lock:
            self._cancel_flags[job_id] = flag
        recorded = 0

        def record(event: dict) -> None:
            nonlocal recorded
            recorded += 1
            if recorded <= MAX_EVENTS_PER_ATTEMPT:
                self.store.add_event(job_id, _clean_event(event))

        began = time.monotonic()
        try:
            report = self.backend.run(task, on_event=record, timeout=self.job_time_seconds, cancelled=flag)
        except TaskFailure as failure:
            if self._stopping:  # left RUNNING on purpose: the next start re-runs it
                return
            if failure.code == "CANCELLED":
                self.store.finish(job_id, CANCELLED, message=failure.message, error_code="CANCELLED")
            else:
                self.store.finish(job_id, FAILED, message=failure.message, error_code=failure.code)
            shutil.rmtree(attempt_dir, ignore_errors=True)
            return
        finally:
            with self._flags_lock:
                self._cancel_flags.pop(job_id, None)
            self._durations.append(time.monotonic() - began)
        result_dir = job_dir / "result"
        shutil.rmtree(result_dir, ignore_errors=True)
        attempt_dir.rename(result_dir)
        size = sum(path.stat().st_size for path in result_dir.iterdir() if path.is_file())
        if not self.store.finish(job_id, SUCCEEDED, report=json.dumps(report, default=str),
                                 result_bytes=size):
            shutil.rmtree(result_dir, ignore_errors=True)  # cancelled at the last moment


def _clean_event(event: dict) -> dict:
    """Keep only the fields a JobEvent has, with their types (workers are not trusted)."""
    clean = {"kind": str(event.get("kind", "log"))[:20]}
    for key, kind in (("phase", str), ("message", str), ("epoch", int)):
        if isinstance(event.get(key), kind):
            clean[key] = event[key][:1000] if kind is str else event[key]
    metrics = event.get("metrics")
    if isinstance(metrics, dict):
        clean["metrics"] = {str(k)[:100]: float(v) for k, v in list(metrics.items())[:50]
                            if isinstance(v, (int, float))}
    return clean
