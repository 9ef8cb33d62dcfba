"""Crash safety: SIGKILL the server alone while a job runs: within 2 s no fork server or worker
of it is alive; restarted on the same state directory, the running job re-runs once and the
queued one runs, a client waiting on the job waits through it, and earlier results still
download. A worker a previous server left (one the
parent-death signal missed) is ended at start-up, before any job re-runs."""

import hashlib
import os
import subprocess
import threading
import time

import pytest

from metaprune.serving import pruning_pb2 as pb
from metaprune.serving.client import PruningClient
from metaprune.serving.fate import descendants, start_ticks
from metaprune.serving.process import ServerProcess
from metaprune.serving.samples import write_model
from metaprune.serving.store import JobStore

pytestmark = pytest.mark.timeout(300)


def _state(client, job_id):
    return pb.JobState.Name(client.get_job(job_id).state)


def test_sigkill_during_a_job_then_restart(tmp_path):
    state = tmp_path / "state"
    model_file = write_model(tmp_path / "m.pt2")
    server = ServerProcess(state, args=("--workers", "1")).start()
    outcome = {}
    try:
        with PruningClient(server.address, timeout=120, patience=120) as client:
            model_id = client.upload_model(model_file).id
            done = client.wait(client.submit(model_id, speedup=2.0).job_id, timeout=120)
            assert pb.JobState.Name(done.state) == "SUCCEEDED", done.message
            client.download(done.job_id, tmp_path / "before.pt2")
            # ~3 s of fine-tuning: still running when the server is killed
            running = client.submit(model_id, speedup=2.0, dataset="mnist1d", finetune_epochs=6)
            queued = client.submit(model_id, params_ratio=0.5)
            # a client waits on the running job through the crash and the restart
            waiting = threading.Thread(target=lambda: outcome.update(job=client.wait(running.job_id)))
            waiting.start()
            deadline = time.monotonic() + 60
            # the server's children: the fork server and the resource tracker; below the fork
            # server: the worker (RUNNING is recorded just before it is forked: wait for it)
            while _state(client, running.job_id) != "RUNNING" or len(family := descendants(server.pid)) < 3:
                assert time.monotonic() < deadline, "the job's worker process should be running"
                time.sleep(0.02)
            os.kill(server.pid, 9)  # the server process alone, as an OOM killer would
            killed_at = time.monotonic()
            server.process.wait(10)
            # nothing of the killed server keeps running: the fork server dies with the server,
            # the worker with the fork server
            while any(start_ticks(pid) is not None for pid in family):
                assert time.monotonic() - killed_at < 2.0, "orphaned worker processes"
                time.sleep(0.02)
            server.start()  # the same state and port
            waiting.join(180)
            assert pb.JobState.Name(outcome["job"].state) == "SUCCEEDED", outcome["job"].message
            assert outcome["job"].attempts == 2 and client.retries > 0  # re-run once
            job = client.wait(queued.job_id, timeout=180)
            assert pb.JobState.Name(job.state) == "SUCCEEDED", job.message
            report = client.download(running.job_id, tmp_path / "after.pt2")
            assert report["finetune"] is not None
            # the result finished before the crash is still there, byte for byte
            client.download(done.job_id, tmp_path / "again.pt2")
            digest = lambda path: hashlib.sha256(path.read_bytes()).hexdigest()  # noqa: E731
            assert digest(tmp_path / "again.pt2") == digest(tmp_path / "before.pt2")
    finally:
        server.stop()


def test_start_up_ends_workers_a_previous_server_left(tmp_path):
    # what the parent-death signal could miss (e.g. a worker of a server on another kernel
    # feature set): a recorded process that still runs is killed before jobs are re-queued
    state = tmp_path / "state"
    leftover = subprocess.Popen(["sleep", "60"])
    try:
        store = JobStore(state)
        store.record_process(leftover.pid, start_ticks(leftover.pid), "prune")
        store.close()
        with ServerProcess(state) as server:
            assert leftover.wait(5) == -9
            assert "ended 1 worker process" in server.log()
            assert leftover.pid not in dict(JobStore(state).recorded_processes())
    finally:
        leftover.kill()


def test_one_server_per_state_directory(tmp_path):
    # a second server would re-run the first one's running jobs: it is refused in one line
    with ServerProcess(tmp_path / "state"):
        second = ServerProcess(tmp_path / "state", startup_timeout=30)
        with pytest.raises(RuntimeError, match="another server is running on the state directory"):
            second.start()
        assert "Traceback" not in second.log()
