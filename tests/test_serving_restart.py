"""Crash safety: SIGKILL the server while a job runs, restart it on the same state directory:
the running and the queued job complete, and earlier results still download."""

import hashlib
import os
import time

import pytest

from metaprune.serving import pruning_pb2 as pb
from metaprune.serving.client import PruningClient
from metaprune.serving.process import ServerProcess
from metaprune.serving.samples import write_model

pytestmark = pytest.mark.timeout(300)


def _state(client, job_id):
    return pb.JobState.Name(client.get_job(job_id).state)


def _children(pid):
    found = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as stat:
                parent = int(stat.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if parent == pid:
            found.append(int(entry))
    return found


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_sigkill_during_a_job_then_restart(tmp_path):
    state = tmp_path / "state"
    model_file = write_model(tmp_path / "m.pt2")
    server = ServerProcess(state, args=("--workers", "1")).start()
    try:
        with PruningClient(server.address, timeout=120) as client:
            model_id = client.upload_model(model_file).id
            done = client.wait(client.submit(model_id, speedup=2.0).job_id, timeout=120)
            assert pb.JobState.Name(done.state) == "SUCCEEDED", done.message
            client.download(done.job_id, tmp_path / "before.pt2")
            running = client.submit(model_id, speedup=2.0, dataset="mnist1d", finetune_epochs=1)
            queued = client.submit(model_id, params_ratio=0.5)
            deadline = time.monotonic() + 60
            while _state(client, running.job_id) != "RUNNING":
                assert time.monotonic() < deadline
                time.sleep(0.05)
        # the server's children: the fork server (and its resource tracker); theirs: the worker
        helpers = _children(server.pid)
        workers = [pid for helper in helpers for pid in _children(helper)]
        server.kill()
    finally:
        server.stop()
    # nothing of the killed server keeps running (workers die with their fork server)
    deadline = time.monotonic() + 20
    while any(_alive(pid) for pid in helpers + workers):
        assert time.monotonic() < deadline, "orphaned worker processes"
        time.sleep(0.1)

    with ServerProcess(state, args=("--workers", "1")) as restarted, \
            PruningClient(restarted.address, timeout=120) as client:
        for job_id in (running.job_id, queued.job_id):
            job = client.wait(job_id, timeout=180)
            assert pb.JobState.Name(job.state) == "SUCCEEDED", job.message
        assert client.get_job(running.job_id).attempts == 2
        report = client.download(running.job_id, tmp_path / "after.pt2")
        assert report["finetune"] is not None
        # the result finished before the crash is still there, byte for byte
        client.download(done.job_id, tmp_path / "again.pt2")
        digest = lambda path: hashlib.sha256(path.read_bytes()).hexdigest()  # noqa: E731
        assert digest(tmp_path / "again.pt2") == digest(tmp_path / "before.pt2")
