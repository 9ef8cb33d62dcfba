"""Open streams hold no thread: with 100 WatchJob streams open, health checks and GetJob still
answer within 1 s; a tenant's streams are limited, and a refusal (like a full queue) carries a
`retry-after` hint that the client honours."""

import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from metaprune.serving import pruning_pb2 as pb
from metaprune.serving.client import PruningClient, retry_after_of
from metaprune.serving.process import ServerProcess
from metaprune.serving.samples import write_model

pytestmark = pytest.mark.timeout(300)

STREAMS = 100
LONG = dict(speedup=2.0, dataset="mnist1d", finetune_epochs=500)  # runs until cancelled


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("streams")
    tokens = root / "tokens"
    tokens.write_text("token-a alice\ntoken-b bob\n")
    args = ("--workers", "1", "--max-queued-jobs", "2", "--max-streams-per-tenant", str(STREAMS),
            "--tokens", str(tokens))
    with ServerProcess(root / "state", args=args) as proc:
        yield proc


def _metadata(token):
    return (("authorization", f"Bearer {token}"),)


def test_hundred_watchers_do_not_starve_unary_calls(server, tmp_path):
    with PruningClient(server.address, token="token-a", timeout=30) as alice:
        job = alice.submit(alice.upload_model(write_model(tmp_path / "m.safetensors")).id, **LONG)
        request = pb.WatchJobRequest(job_id=job.job_id)
        streams = [alice.stub.WatchJob(request, metadata=_metadata("token-a"), timeout=120)
                   for _ in range(STREAMS)]
        try:
            for stream in streams:  # each stream's handler runs: the history arrives
                assert pb.JobState.Name(next(stream).state) == "QUEUED"
            health = health_pb2_grpc.HealthStub(alice.channel)
            slowest = 0.0
            deadline = time.monotonic() + 3
            while time.monotonic() < deadline:
                began = time.monotonic()
                assert health.Check(health_pb2.HealthCheckRequest(), timeout=1).status == 1
                assert alice.stub.GetJob(pb.GetJobRequest(job_id=job.job_id),
                                         metadata=_metadata("token-a"), timeout=1).job_id == job.job_id
                slowest = max(slowest, time.monotonic() - began)
            assert slowest < 1.0
            # alice's 101st stream is refused with a hint; bob has streams of his own
            with pytest.raises(grpc.RpcError) as refused:
                next(alice.stub.WatchJob(request, metadata=_metadata("token-a"), timeout=10))
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert retry_after_of(refused.value) >= 1
            with PruningClient(server.address, token="token-b", timeout=30) as bob:
                assert bob.info().limits.max_streams_per_tenant == STREAMS
        finally:
            alice.cancel(job.job_id)
        # every stream ends with the job's final state
        for stream in streams:
            assert pb.JobState.Name(list(stream)[-1].state) == "CANCELLED"


def test_full_queue_hint_is_honoured(server, tmp_path):
    with PruningClient(server.address, token="token-b", timeout=30, patience=60) as bob:
        model_id = bob.upload_model(write_model(tmp_path / "m.safetensors")).id
        jobs = [bob.submit(model_id, **LONG) for _ in range(2)]  # the queue holds 2
        request = pb.SubmitJobRequest(model_id=model_id, speedup=2.0)
        with pytest.raises(grpc.RpcError) as refused:
            bob.stub.SubmitJob(request, metadata=_metadata("token-b"), timeout=10)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        hint = retry_after_of(refused.value)
        assert 1 <= hint <= 60
        # the client waits as told and gets in once a job leaves the queue
        threading.Timer(0.5, bob.cancel, args=(jobs[0].job_id,)).start()
        began = time.monotonic()
        accepted = bob.submit(model_id, speedup=2.0)
        assert bob.retries >= 1 and time.monotonic() - began >= hint * 0.9
        for job in [jobs[1], accepted]:
            bob.cancel(job.job_id)
