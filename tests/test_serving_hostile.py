"""Hostile and malformed requests: each gets a clear status, nothing stored is lost, and the
server stays healthy. The server runs as a separate process on 127.0.0.1 with small limits."""

import hashlib
import io
import json
import os
import pickle
import zipfile
from pathlib import Path

import grpc
import numpy as np
import pytest

from metaprune.serving import pruning_pb2 as pb
from metaprune.serving.client import PruningClient, RemoteError
from metaprune.serving.process import ServerProcess

pytestmark = pytest.mark.timeout(300)

MiB = 1 << 20
MAX_PARAMETERS = 50_000


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    state = tmp_path_factory.mktemp("hostile") / "state"
    with ServerProcess(state, args=("--max-upload-mb", "2", "--max-parameters", str(MAX_PARAMETERS),
                                    "--max-finetune-epochs", "50", "--worker-memory-mb", "3072")) as proc:
        yield proc
    # after everything below: still alive and serving
    assert proc.process.returncode in (0, -15), proc.log()[-2000:]


@pytest.fixture(scope="module")
def client(server):
    with PruningClient(server.address, timeout=120) as connection:
        yield connection


def _stream(client, messages, rpc="UploadModel"):
    """Send raw UploadChunk messages; returns the reply or the status code name."""
    try:
        return getattr(client.stub, rpc)(iter(messages), timeout=120)
    except grpc.RpcError as error:
        return error.code().name


def _upload_bytes(client, name, payload: bytes, rpc="UploadModel", **metadata):
    chunks = [payload[i:i + MiB] for i in range(0, len(payload), MiB)]
    messages = [pb.UploadChunk(metadata=pb.UploadMetadata(filename=name, **metadata))]
    return _stream(client, messages + [pb.UploadChunk(data=c) for c in chunks], rpc)


def _code(call):
    try:
        call()
    except RemoteError as error:
        return error.code
    return "OK"


# --- uploads that never reach a model loader ----------------------------------------------------
GARBAGE = os.urandom(4096)


@pytest.mark.parametrize(
    "name, payload, metadata, expected",
    [
        ("random.pt2", GARBAGE, {}, "INVALID_ARGUMENT"),
        ("truncated.pt2", b"PK\x03\x04" + GARBAGE[:100], {}, "INVALID_ARGUMENT"),
        ("empty.pt2", b"", {}, "INVALID_ARGUMENT"),
        ("model.exe", GARBAGE, {}, "INVALID_ARGUMENT"),
        ("noext", GARBAGE, {}, "INVALID_ARGUMENT"),
        ("random.pt2", GARBAGE, {"size_bytes": 10 * MiB}, "RESOURCE_EXHAUSTED"),
        ("random.pt2", GARBAGE, {"size_bytes": 100}, "INVALID_ARGUMENT"),
        ("random.pt2", GARBAGE, {"sha256": "0" * 64}, "INVALID_ARGUMENT"),
        ("oversize.pt2", os.urandom(3 * MiB), {}, "RESOURCE_EXHAUSTED"),
        ("m.safetensors", GARBAGE, {}, "INVALID_ARGUMENT"),  # no spec
        ("m.safetensors", GARBAGE, {"spec_json": "{not json"}, "INVALID_ARGUMENT"),
        ("m.safetensors", GARBAGE, {"spec_json": '{"family": NaN}'}, "INVALID_ARGUMENT"),
        ("m.safetensors", GARBAGE, {"spec_json": '[1, 2]'}, "INVALID_ARGUMENT"),
        ("m.safetensors", GARBAGE, {"spec_json": json.dumps({"x": "y" * 70000})}, "INVALID_ARGUMENT"),
        ("m.safetensors", GARBAGE,
         {"spec_json": json.dumps({"format": 1, "family": "cnn1d", "config": {}, "input_shape": [1, 40]})},
         "INVALID_ARGUMENT"),
        ("m.pt2", GARBAGE, {"spec_json": "{}"}, "INVALID_ARGUMENT"),  # spec only with safetensors
    ],
)
def test_malformed_model_upload(client, name, payload, metadata, expected):
    assert _upload_bytes(client, name, payload, **metadata) == expected


def test_stream_without_metadata(client):
    assert _stream(client, [pb.UploadChunk(data=b"abc")]) == "INVALID_ARGUMENT"
    assert _stream(client, []) == "INVALID_ARGUMENT"


def test_second_metadata_message(client):
    first = pb.UploadChunk(metadata=pb.UploadMetadata(filename="a.pt2"))
    assert _stream(client, [first, pb.UploadChunk(data=b"x"), first]) == "INVALID_ARGUMENT"


def test_chunk_over_limit(client):
    head = pb.UploadChunk(metadata=pb.UploadMetadata(filename="a.pt2"))
    assert _stream(client, [head, pb.UploadChunk(data=os.urandom(MiB + 1))]) == "RESOURCE_EXHAUSTED"


def test_message_over_transport_limit(server):
    # a client that would send it: the server's own 4 MiB receive limit must refuse it
    options = [("grpc.max_send_message_length", 64 * MiB)]
    with grpc.insecure_channel(server.address, options=options) as channel:
        upload = channel.stream_unary("/metaprune.v1.PruningService/UploadModel",
                                      request_serializer=pb.UploadChunk.SerializeToString,
                                      response_deserializer=pb.UploadReply.FromString)
        head = pb.UploadChunk(metadata=pb.UploadMetadata(filename="a.pt2"))
        with pytest.raises(grpc.RpcError) as refused:
            upload(iter([head, pb.UploadChunk(data=bytes(5 * MiB))]), timeout=60)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def _npz(**arrays) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


GOOD_SPLITS = dict(x_train=np.zeros((8, 1, 40), np.float32), y_train=np.arange(8) % 2,
                   x_test=np.zeros((4, 1, 40), np.float32), y_test=np.arange(4) % 2)


@pytest.mark.parametrize(
    "payload",
    [
        GARBAGE,
        _npz(x_train=GOOD_SPLITS["x_train"]),  # missing keys
        _npz(**{**GOOD_SPLITS, "x_train": np.array([object()] * 8, dtype=object)}),  # pickled objects
        _npz(**{**GOOD_SPLITS, "x_test": np.full((4, 1, 40), np.nan, np.float32)}),  # NaN inputs
        _npz(**{**GOOD_SPLITS, "y_train": np.full(8, -3, np.int64)}),  # negative labels
        _npz(**{**GOOD_SPLITS, "y_train": np.zeros(8, np.int64), "y_test": np.zeros(4, np.int64)}),
    ],
    ids=["random", "missing-keys", "object-arrays", "nan", "negative-labels", "one-class"],
)
def test_malformed_data_upload(client, payload):
    assert _upload_bytes(client, "d.npz", payload, rpc="UploadData") == "INVALID_ARGUMENT"


def test_good_data_upload(client):
    reply = _upload_bytes(client, "d.npz", _npz(**GOOD_SPLITS), rpc="UploadData")
    assert isinstance(reply, pb.UploadReply) and reply.id.startswith("data-")
    assert json.loads(reply.summary_json)["input_shape"] == [1, 40]


# --- unknown ids --------------------------------------------------------------------------------
@pytest.mark.parametrize("call", ["get_job", "cancel", "watch"])
def test_unknown_job_id(client, call):
    assert _code(lambda: getattr(client, call)("job-doesnotexist")) == "NOT_FOUND"


def test_unknown_job_download(client, tmp_path):
    assert _code(lambda: client.download("job-x", tmp_path / "o.pt2")) == "NOT_FOUND"


def test_unknown_model_id(client):
    assert _code(lambda: client.submit("model-nope", speedup=2.0)) == "NOT_FOUND"
    assert _code(lambda: client.submit("", speedup=2.0)) == "NOT_FOUND"


def test_health_after_garbage(client):
    assert client.health() == "SERVING"
    assert client.health("metaprune.v1.PruningService") == "SERVING"
    # nothing of the refused uploads is left half-received
    assert client.info().limits.max_upload_bytes == 2 * MiB
