"""`metaprune serve --ray-address local`: jobs run as Ray tasks on a private 127.0.0.1 cluster."""

import pytest

from metaprune.serving import pruning_pb2 as pb
from metaprune.serving.client import PruningClient
from metaprune.serving.process import ServerProcess
from metaprune.serving.samples import write_model

pytestmark = [
    pytest.mark.timeout(300),
    pytest.mark.slow,
    # starting a Ray cluster costs ~20 s of a 2-core machine; worth it: CI is the only place
    # the Ray dispatch path runs. Skip it locally with `-m "not slow"`.
]


def test_job_on_ray(tmp_path):
    with ServerProcess(tmp_path / "state", args=("--ray-address", "local", "--workers", "1"),
                       startup_timeout=120) as server, PruningClient(server.address) as client:
        assert client.info().backend == "ray"
        model_id = client.upload_model(write_model(tmp_path / "m.safetensors")).id
        events = []
        job = client.wait(client.submit(model_id, speedup=2.0).job_id, on_event=events.append, timeout=240)
        assert pb.JobState.Name(job.state) == "SUCCEEDED", job.message
        assert "pruning" in {event.phase for event in events}
        report = client.download(job.job_id, tmp_path / "pruned.safetensors")
        assert report["flops_after"] < report["flops_before"]
        assert (tmp_path / "pruned.json").exists()
