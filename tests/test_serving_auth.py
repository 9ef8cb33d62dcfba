"""Bearer tokens and tenants: no or wrong token -> UNAUTHENTICATED, another tenant's ids ->
NOT_FOUND; health and reflection stay open."""

import grpc
import numpy as np
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from metaprune.serving.auth import Authenticator, TokenFileError
from metaprune.serving.client import PruningClient, status_of
from metaprune.serving.process import ServerProcess

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("auth")
    tokens = root / "tokens.txt"
    tokens.write_text("# token tenant\nalpha-token alice\nbeta-token bob\n")
    with ServerProcess(root / "state", args=("--tokens", str(tokens))) as proc:
        yield proc


def _data_file(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, x_train=np.random.rand(8, 1, 40).astype(np.float32), y_train=np.arange(8) % 2,
             x_test=np.random.rand(4, 1, 40).astype(np.float32), y_test=np.arange(4) % 2)
    return path


@pytest.mark.parametrize("token", [None, "wrong-token", "alpha-token "])
def test_missing_or_wrong_token(server, token, tmp_path):
    with PruningClient(server.address, token=token.strip() + "x" if token else None) as client:
        assert status_of(client.info) == "UNAUTHENTICATED"
        assert status_of(lambda: client.upload_data(_data_file(tmp_path))) == "UNAUTHENTICATED"
        assert status_of(lambda: client.get_job("job-x")) == "UNAUTHENTICATED"
        assert client.health() == "SERVING"  # health stays open


def test_reflection_is_open(server):
    with grpc.insecure_channel(server.address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                            timeout=30)
        names = {service.name for reply in replies for service in reply.list_services_response.service}
    assert "metaprune.v1.PruningService" in names and "grpc.health.v1.Health" in names


def test_reflection_v1_is_served_too(server):
    # issue 12: grpcio-reflection serves v1alpha only; a v1 client got UNIMPLEMENTED
    from google.protobuf import descriptor_pb2

    from metaprune.serving import reflection_v1

    request_type = reflection_v1.message_class("ServerReflectionRequest")
    reply_type = reflection_v1.message_class("ServerReflectionResponse")
    with grpc.insecure_channel(server.address) as channel:
        info = channel.stream_stream("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
                                     request_serializer=request_type.SerializeToString,
                                     response_deserializer=reply_type.FromString)
        replies = list(info(iter([request_type(list_services=""),
                                  request_type(file_containing_symbol="metaprune.v1.PruningService")]),
                            timeout=30))
    names = {service.name for service in replies[0].list_services_response.service}
    assert {"metaprune.v1.PruningService", "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection"} <= names
    files = [descriptor_pb2.FileDescriptorProto.FromString(raw)
             for raw in replies[1].file_descriptor_response.file_descriptor_proto]
    assert "metaprune/v1/pruning.proto" in {file.name for file in files}


def test_tenants_are_isolated(server, tmp_path):
    with PruningClient(server.address, token="alpha-token") as alice, \
            PruningClient(server.address, token="beta-token") as bob:
        assert alice.info().auth_required
        data_id = alice.upload_data(_data_file(tmp_path)).id
        # bob cannot use alice's data, even knowing its id
        assert status_of(lambda: bob.submit("model-x", speedup=2.0, data_id=data_id)) == "NOT_FOUND"
        assert bob.list_jobs() == []


def test_other_tenants_job_is_not_found(server, tmp_path):
    from metaprune.serving.samples import write_model

    model = write_model(tmp_path / "m.pt2")
    with PruningClient(server.address, token="alpha-token") as alice, \
            PruningClient(server.address, token="beta-token") as bob:
        model_id = alice.upload_model(model).id
        assert status_of(lambda: bob.submit(model_id, speedup=2.0)) == "NOT_FOUND"
        job = alice.submit(model_id, speedup=2.0)
        for call in (bob.get_job, bob.cancel, bob.watch):
            assert status_of(lambda call=call: call(job.job_id)) == "NOT_FOUND"
        assert status_of(lambda: bob.download(job.job_id, tmp_path / "o.pt2")) == "NOT_FOUND"
        assert [j.job_id for j in alice.list_jobs()] == [job.job_id]
        assert alice.get_job(job.job_id).job_id == job.job_id


def test_token_file_parsing(tmp_path):
    good = tmp_path / "t"
    good.write_text("a x\n\n# c\nb y  # trailing comment\n")
    auth = Authenticator.from_file(good)
    assert auth.tenant_for([("authorization", "Bearer b")]) == "y"
    assert auth.tenant_for([("authorization", "b")]) is None
    assert auth.tenant_for([]) is None
    bad = tmp_path / "bad"
    bad.write_text("only-one-field\n")
    with pytest.raises(TokenFileError, match="TOKEN TENANT"):
        Authenticator.from_file(bad)


def test_open_server_refuses_public_bind(tmp_path):
    from metaprune.cli.main import main

    assert main(["serve", "--host", "0.0.0.0", "--port", "0", "--state-dir", str(tmp_path)]) == 2


def test_tls_with_token(tmp_path):
    import shutil
    import subprocess

    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed: cannot make a test certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
                   check=True, capture_output=True, timeout=60)
    tokens = tmp_path / "tokens"
    tokens.write_text("tls-token carol\n")
    args = ("--tokens", str(tokens), "--tls-cert", str(cert), "--tls-key", str(key))
    with ServerProcess(tmp_path / "state", args=args) as server:
        with PruningClient(server.address, token="tls-token", tls_ca=cert, timeout=30) as client:
            assert client.info().auth_required and client.health() == "SERVING"
        with PruningClient(server.address, token="tls-token", timeout=10) as plaintext:
            assert status_of(plaintext.info) == "UNAVAILABLE"  # no TLS, no service
