"""`metaprune tune --ray-address` against a Ray cluster with token authentication (issue #15
item 3): the test starts its own `ray start --head` on 127.0.0.1 with a token of its own and
stops it by PID (never `ray stop`, which would end every Ray on the machine).

Before: the driver was refused (`InvalidAuthToken`, ~20 warning lines, then a bare
`ConnectionError` traceback) unless `RAY_AUTH_MODE=token` was exported by hand."""

import json
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
import torch

import metaprune
from metaprune import zoo

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]

RAY = Path(sys.executable).with_name("ray")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS")}
    env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    return {**env, **extra}


@pytest.fixture(scope="module")
def token_cluster():
    """(address, token file) of a one-CPU Ray head with token auth, stopped by its PID."""
    token = secrets.token_hex(16)
    folder = Path(tempfile.mkdtemp(prefix="mpray", dir="/tmp"))  # short: Ray's socket paths
    (folder / "token").write_text(token)
    port = _free_port()
    log = open(folder / "ray-start.log", "wb")
    head = subprocess.Popen(
        [str(RAY), "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port),
         "--num-cpus", "1", "--include-dashboard", "false", "--temp-dir", str(folder / "ray"),
         "--block"],
        env=_clean_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token), stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 120
        while b"--block" not in (folder / "ray-start.log").read_bytes():
            assert head.poll() is None, (folder / "ray-start.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "ray start did not come up in 120 s"
            time.sleep(0.5)
        yield f"127.0.0.1:{port}", folder / "token"
    finally:
        # --block: on SIGINT the head stops every process it started (SIGTERM is ignored)
        head.send_signal(signal.SIGINT)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.kill()
            head.wait()
        log.close()
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    model = zoo.build("cnn1d", {"input_shape": [1, 40], "num_classes": 10, "widths": [16, 32]})
    path = tmp_path_factory.mktemp("ray-token") / "cnn.safetensors"
    metaprune.save_model(model.eval(), (torch.randn(2, 1, 40),), path)
    return path


def _tune(model_file, address, out, env):
    return subprocess.run(
        [sys.executable, "-m", "metaprune.cli.main", "tune", str(model_file), "--dataset",
         "mnist1d", "--speedup", "2", "--samples", "1", "--finetune-epochs", "0",
         "--ray-address", address, "--out", str(out)],
        env=env, capture_output=True, text=True, timeout=300)


def test_tune_joins_a_token_cluster_with_the_token_file_alone(token_cluster, model_file,
                                                              tmp_path):
    address, token_file = token_cluster
    done = _tune(model_file, address, tmp_path / "out",
                 _clean_env(RAY_AUTH_TOKEN_PATH=str(token_file)))  # no RAY_AUTH_MODE
    # the trial ran on the cluster (a random policy may still miss the target: exit code 1)
    assert done.returncode in (0, 1), done.stdout[-3000:] + done.stderr[-3000:]
    trials = json.loads((tmp_path / "out" / "trials.json").read_text())["trials"]
    assert [t["status"] for t in trials] in (["complete"], ["infeasible"]), trials
    assert "InvalidAuthToken" not in done.stderr


def test_a_refused_token_is_one_clear_line(token_cluster, model_file, tmp_path):
    address, _ = token_cluster
    done = _tune(model_file, address, tmp_path / "out", _clean_env(RAY_AUTH_TOKEN="wrong"))
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2
    assert len(lines) == 1, done.stderr[-3000:]
    assert "refused" in lines[0] and "RAY_AUTH_TOKEN_PATH" in lines[0] and "Traceback" not in \
        done.stderr
