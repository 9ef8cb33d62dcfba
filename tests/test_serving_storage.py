"""What a crash leaves on disk is removed at the next start (a partial upload, an upload folder
without a record), and each tenant's storage is bounded: a quota on uploads + results, and an
expiry that deletes files and rows together."""

import threading
import time

import grpc
import pytest

from metaprune.serving import pruning_pb2 as pb
from metaprune.serving.client import PruningClient, status_of
from metaprune.serving.process import ServerProcess
from metaprune.serving.samples import write_model

pytestmark = pytest.mark.timeout(300)


def _call_ignoring_errors(rpc, messages):
    try:
        rpc(messages, timeout=30)
    except grpc.RpcError:
        pass  # the server was killed under it


def test_sigkill_during_an_upload_leaves_nothing_behind(tmp_path):
    state = tmp_path / "state"
    server = ServerProcess(state).start()
    release = threading.Event()

    def stalled_upload():
        yield pb.UploadChunk(metadata=pb.UploadMetadata(filename="big.pt2"))
        yield pb.UploadChunk(data=b"PK" + bytes(512 * 1024))
        release.wait(30)

    try:
        with PruningClient(server.address, timeout=30) as client:
            kept = client.upload_model(write_model(tmp_path / "m.pt2")).id
            uploading = threading.Thread(target=_call_ignoring_errors,
                                         args=(client.stub.UploadModel, stalled_upload()))
            uploading.start()
            deadline = time.monotonic() + 20
            while not any((state / "incoming").iterdir()):
                assert time.monotonic() < deadline, "the upload never reached the server"
                time.sleep(0.02)
            server.kill()
            release.set()
            uploading.join(30)
        # a kill during validation leaves a folder without a record; fake one such folder
        orphan = state / "uploads" / "model-0123456789abcdef01234567"
        orphan.mkdir()
        (orphan / "model.pt2").write_bytes(b"half")
        assert any((state / "incoming").iterdir())
        server.start()
        assert list((state / "incoming").iterdir()) == []
        assert [path.name for path in (state / "uploads").iterdir()] == [kept]
        with PruningClient(server.address, timeout=30) as client:  # the kept upload is counted
            assert client.info().storage_used_bytes == (tmp_path / "m.pt2").stat().st_size
    finally:
        release.set()
        server.stop()


def test_quota_and_expiry(tmp_path):
    state = tmp_path / "state"
    model = write_model(tmp_path / "m.pt2")  # ~80 KiB
    args = ("--tenant-quota-mb", "0.12", "--upload-expiry-s", "3", "--result-expiry-s", "3")
    with ServerProcess(state, args=args) as server, PruningClient(server.address, timeout=30) as client:
        limits = client.info().limits
        assert limits.tenant_quota_bytes == int(0.12 * (1 << 20))
        assert limits.upload_expiry_seconds == 3 and limits.result_expiry_seconds == 3
        model_id = client.upload_model(model).id
        assert client.info().storage_used_bytes == model.stat().st_size
        with pytest.raises(Exception, match="RESOURCE_EXHAUSTED.*quota"):
            client.upload_model(model)
        job = client.wait(client.submit(model_id, speedup=2.0).job_id)
        assert pb.JobState.Name(job.state) == "SUCCEEDED", job.message
        assert client.info().storage_used_bytes > model.stat().st_size  # the result counts
        # both expire: rows and files go together, and the quota is free again
        deadline = time.monotonic() + 20
        while status_of(lambda: client.get_job(job.job_id)) != "NOT_FOUND":
            assert time.monotonic() < deadline, "the result never expired"
            time.sleep(0.2)
        while (state / "uploads" / model_id).exists() or (state / "jobs" / job.job_id).exists():
            assert time.monotonic() < deadline, "expired files are still on disk"
            time.sleep(0.2)
        assert status_of(lambda: client.submit(model_id, speedup=2.0)) == "NOT_FOUND"
        assert client.info().storage_used_bytes == 0
        assert client.upload_model(model).id

