"""`metaprune serve --ray-address`: jobs run on a Ray cluster.

The cluster is this test's own `ray start --head --block` on 127.0.0.1 with token
authentication, stopped by its PID (never `ray stop`, which ends every Ray on the machine).
Issue 12: a token-auth cluster answered with ~20 lines of InvalidAuthToken and a traceback, and
every job started a cold Ray worker. Now the token Ray would use is sent, a refusal is one line,
and jobs run in processes forked from a warm job host, with the local back-end's limits.
"""

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from metaprune.serving import pruning_pb2 as pb
from metaprune.serving.client import PruningClient, status_of
from metaprune.serving.process import ServerProcess
from metaprune.serving.samples import write_model

pytestmark = [
    pytest.mark.timeout(400),
    # a Ray head costs ~15 s of a 2-core machine; CI is the only place the Ray path runs
    pytest.mark.slow,
]

LONG = dict(speedup=2.0, dataset="mnist1d", finetune_epochs=500)  # runs until stopped


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def head():
    from metaprune.serving.ray_backend import _gcs_answer

    # a short folder: Ray's unix socket paths live under --temp-dir
    root = Path(tempfile.mkdtemp(prefix="mpray-", dir="/tmp"))
    token = root / "token"
    token.write_text(secrets.token_hex(16))
    address = f"127.0.0.1:{_free_port()}"
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token),
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    ray_command = str(Path(sys.executable).with_name("ray"))
    with open(root / "head.log", "wb") as log:
        process = subprocess.Popen(
            [ray_command, "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
             "--port", address.split(":")[1], "--num-cpus", "1", "--include-dashboard=false",
             "--disable-usage-stats", "--temp-dir", str(root / "r")],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while _gcs_answer(address, token.read_text()) != "OK":
            assert process.poll() is None and time.monotonic() < deadline, (root / "head.log").read_text()
            time.sleep(0.5)
        yield address, token
    finally:
        process.terminate()  # `ray start --block` stops the processes it started
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
        shutil.rmtree(root, ignore_errors=True)


def _serve_fails(tmp_path, address, env):
    command = [sys.executable, "-m", "metaprune.cli.serve_cmd", "--port", "0", "--state-dir",
               str(tmp_path / "refused"), "--ray-address", address]
    environment = {key: value for key, value in os.environ.items() if not key.startswith("RAY_AUTH")}
    return subprocess.run(command, env={**environment, **env}, capture_output=True, text=True, timeout=120)


def test_refused_token_is_one_clear_line(head, tmp_path):
    address, _ = head
    missing = _serve_fails(tmp_path, address, {"RAY_AUTH_TOKEN_PATH": str(tmp_path / "none"),
                                               "HOME": str(tmp_path)})
    wrong = _serve_fails(tmp_path, address, {"RAY_AUTH_TOKEN": "not-the-token"})
    for outcome, words in ((missing, "no token was found"), (wrong, "refused the authentication token")):
        assert outcome.returncode == 2
        lines = outcome.stderr.strip().splitlines()
        assert len(lines) == 1 and words in lines[0] and "Traceback" not in outcome.stderr, outcome.stderr


def _hosts(events):
    return {event.message.split()[2] for event in events if event.message.startswith("running on ray-job-host")}


def test_jobs_on_a_token_cluster_with_warm_isolated_hosts(head, tmp_path):
    address, token = head
    state = tmp_path / "state"
    args = ("--ray-address", address, "--workers", "1", "--job-time-s", "8")
    with ServerProcess(state, args=args, env={"RAY_AUTH_TOKEN_PATH": str(token)},
                       startup_timeout=180) as server, PruningClient(server.address, timeout=120) as client:
        assert client.info().backend == "ray"
        model_id = client.upload_model(write_model(tmp_path / "m.safetensors")).id
        seen = []
        for _ in range(2):
            events = []
            job = client.wait(client.submit(model_id, speedup=2.0).job_id, on_event=events.append)
            assert pb.JobState.Name(job.state) == "SUCCEEDED", job.message
            assert "pruning" in {event.phase for event in events}
            seen.append(_hosts(events))
        assert seen[0] == seen[1] and len(seen[0]) == 1  # the same warm host ran both jobs
        report = client.download(job.job_id, tmp_path / "pruned.safetensors")
        assert report["flops_after"] < report["flops_before"] and (tmp_path / "pruned.json").exists()

        # cancel: the job's process is killed, the host serves the next job at once
        running = client.submit(model_id, **LONG)
        while pb.JobState.Name(client.get_job(running.job_id).state) != "RUNNING":
            time.sleep(0.05)
        client.cancel(running.job_id)
        job = client.wait(client.submit(model_id, speedup=2.0).job_id)
        assert pb.JobState.Name(job.state) == "SUCCEEDED", job.message

        # time limit: killed past --job-time-s
        job = client.wait(client.submit(model_id, **LONG).job_id)
        assert (pb.JobState.Name(job.state), job.error_code) == ("FAILED", "RESOURCE_EXHAUSTED")
        assert "time limit" in job.message
        # a hostile upload never reaches the cluster: refused by the local validation
        (tmp_path / "bad.pt2").write_bytes(b"PK\x03\x04" + os.urandom(200))
        assert status_of(lambda: client.upload_model(tmp_path / "bad.pt2")) == "INVALID_ARGUMENT"

    # memory limit: the same stored model, a server whose job processes get 256 MiB
    args = ("--ray-address", address, "--workers", "1", "--worker-memory-mb", "256")
    with ServerProcess(state, args=args, env={"RAY_AUTH_TOKEN_PATH": str(token)},
                       startup_timeout=180) as server, PruningClient(server.address, timeout=120) as client:
        job = client.wait(client.submit(model_id, speedup=2.0).job_id)
        assert (pb.JobState.Name(job.state), job.error_code) == ("FAILED", "RESOURCE_EXHAUSTED"), job.message
