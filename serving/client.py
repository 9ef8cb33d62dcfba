"""Python client of the pruning service, and `prune_remote` behind `metaprune prune --server`.

Example::

    from metaprune.serving.client import PruningClient
    with PruningClient("127.0.0.1:50051", token="s3cret") as client:
        model = client.upload_model("model.pt2")
        job = client.submit(model.id, method="l2", speedup=2.0)
        job = client.wait(job.job_id, on_event=print)
        report = client.download(job.job_id, "pruned.pt2", report_path="report.json")
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import random
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from metaprune.errors import MetaPruneError
from metaprune.vocabulary import PruneRequest

from . import pruning_pb2 as pb
from . import pruning_pb2_grpc
from .files import sha256_of
from .limits import MAX_CHUNK_BYTES, MAX_MESSAGE_BYTES

_FORMATS = {".pt2": pb.PT2, ".safetensors": pb.SAFETENSORS, ".onnx": pb.ONNX}
_FINISHED = (pb.SUCCEEDED, pb.FAILED, pb.CANCELLED)


class RemoteError(MetaPruneError):
    """The service refused a request or a job failed; `code` is the gRPC status name."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code


def status_of(call: Callable[[], object]) -> str:
    """Run `call()`; "OK", or the status name of the RemoteError it raised (scripts, tests)."""
    try:
        call()
    except RemoteError as error:
        return error.code
    return "OK"


def retry_after_of(error: grpc.RpcError) -> float | None:
    """The server's `retry-after` hint (seconds) of a refused call, or None."""
    for key, value in error.trailing_metadata() or ():
        if key == "retry-after":
            try:
                return max(0.0, float(value))
            except ValueError:
                return None
    return None


class _Patience:
    """How long a client keeps trying: exponential backoff while the server is away, the
    server's `retry-after` while it is busy, both within `budget` seconds per outage."""

    def __init__(self, budget: float):
        self.budget = budget
        self.retries = 0
        self._deadline: float | None = None
        self._attempt = 0

    def recovered(self) -> None:
        self._deadline, self._attempt = None, 0

    def pause(self, error: grpc.RpcError) -> bool:
        """Sleep before the next try and return True, or False when the error is final."""
        code = error.code()
        hint = retry_after_of(error) if code == grpc.StatusCode.RESOURCE_EXHAUSTED else None
        if code != grpc.StatusCode.UNAVAILABLE and hint is None:
            return False
        now = time.monotonic()
        if self._deadline is None:
            self._deadline = now + self.budget
        delay = hint if hint is not None else min(2.0, 0.1 * 2 ** self._attempt) * random.uniform(0.8, 1.2)
        if now + delay > self._deadline:
            return False
        self._attempt += 1
        self.retries += 1
        time.sleep(delay)
        return True


def _remote_errors(call):
    """Turns grpc.RpcError into RemoteError, so callers see one error type with a message."""
    def wrapped(*args, **kwargs):
        try:
            return call(*args, **kwargs)
        except grpc.RpcError as error:
            code = error.code().name if error.code() is not None else "UNKNOWN"
            raise RemoteError(code, error.details() or "") from None
    wrapped.__name__, wrapped.__doc__ = call.__name__, call.__doc__
    return wrapped


class PruningClient:
    """A connection to a MetaPrune server.

    Methods raise :class:`RemoteError` (a MetaPruneError) carrying the server's status code.
    """

    def __init__(self, target: str, *, token: str | None = None, tls_ca: str | Path | None = None,
                 timeout: float | None = None, patience: float = 60.0):
        # "HOST:PORT" of the server
        self.target = target
        # per-call deadline in seconds for unary calls (None: none)
        self.timeout = timeout
        # seconds to keep retrying while the server is away (UNAVAILABLE, e.g. restarting) or
        # busy (RESOURCE_EXHAUSTED with `retry-after`): submit, uploads, downloads and wait retry;
        # 0 turns retries off
        self.patience = patience
        # calls retried so far (for figures and tests)
        self.retries = 0
        options = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                   ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]
        if tls_ca is not None:
            credentials = grpc.ssl_channel_credentials(root_certificates=Path(tls_ca).read_bytes())
            self.channel = grpc.secure_channel(target, credentials, options=options)
        else:
            self.channel = grpc.insecure_channel(target, options=options)
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.stub = pruning_pb2_grpc.PruningServiceStub(self.channel)

    def __enter__(self) -> "PruningClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def _retrying(self, call: Callable[[], object]):
        """`call()`, retried while the server is away or busy (see `patience`); the last
        grpc.RpcError is raised when patience runs out."""
        patience = _Patience(self.patience)
        while True:
            try:
                result = call()
                patience.recovered()
                return result
            except grpc.RpcError as error:
                if not patience.pause(error):
                    raise
                self.retries += 1

    # --- uploads -----------------------------------------------------------------------------
    @staticmethod
    def _chunks(path: Path, metadata: pb.UploadMetadata) -> Iterator[pb.UploadChunk]:
        yield pb.UploadChunk(metadata=metadata)
        with open(path, "rb") as source:
            while chunk := source.read(MAX_CHUNK_BYTES):
                yield pb.UploadChunk(data=chunk)

    @_remote_errors
    def upload_model(self, path: str | Path, *, spec_path: str | Path | None = None) -> pb.UploadReply:
        """Upload a .pt2, a .safetensors with its spec (default: the sibling NAME.json), or a
        HuggingFace folder (config.json + safetensors), sent as an uncompressed tar of it."""
        path = Path(path)
        if path.is_dir():
            from metaprune.formats.hf_archive import write_hf_archive

            with tempfile.TemporaryDirectory() as scratch:
                archive = write_hf_archive(path, Path(scratch) / f"{path.name or 'model'}.tar")
                return self.upload_model(archive)
        spec = ""
        if path.suffix == ".safetensors":
            spec = Path(spec_path or path.with_suffix(".json")).read_text()
        metadata = pb.UploadMetadata(filename=path.name, spec_json=spec,
                                     size_bytes=path.stat().st_size, sha256=sha256_of(path))
        return self._retrying(lambda: self.stub.UploadModel(self._chunks(path, metadata),
                                                            metadata=self._metadata))

    @_remote_errors
    def upload_data(self, path: str | Path) -> pb.UploadReply:
        """Upload an .npz holding x_train, y_train, x_test, y_test."""
        path = Path(path)
        metadata = pb.UploadMetadata(filename=path.name, size_bytes=path.stat().st_size,
                                     sha256=sha256_of(path))
        return self._retrying(lambda: self.stub.UploadData(self._chunks(path, metadata),
                                                           metadata=self._metadata))

    # --- jobs --------------------------------------------------------------------------------
    @_remote_errors
    def submit(self, model_id: str, *, method: str = "l2", criterion: str | None = None,
               allocation: str | None = None, speedup: float | None = None,
               params_ratio: float | None = None, policy: dict | None = None,
               dataset: str | None = None, data_id: str | None = None, finetune_epochs: int = 0,
               finetune: dict | None = None, output_format: str | None = None,
               metanet: str | None = None, extra: dict | None = None) -> pb.Job:
        """Queue a pruning job; arguments mean what they mean for `metaprune.prune`.

        Nothing is checked here (the server checks everything); `extra` sets further
        SubmitJobRequest fields by name. A full queue is retried after the server's
        `retry-after`, a server that is away with backoff; the request carries a fresh
        idempotency key, so a retry never queues it twice.
        """
        request = pb.SubmitJobRequest(
            model_id=model_id, method=method, criterion=criterion or "", allocation=allocation or "",
            policy_json=json.dumps(policy) if policy else "", finetune_epochs=finetune_epochs,
            metanet=metanet or "", request_id=uuid.uuid4().hex,
            output_format=_FORMATS[f".{output_format}"] if output_format else pb.MODEL_FORMAT_UNSPECIFIED,
        )
        if speedup is not None:
            request.speedup = speedup
        if params_ratio is not None:
            request.params_ratio = params_ratio
        if dataset is not None:
            request.dataset = dataset
        if data_id is not None:
            request.data_id = data_id
        if finetune:
            request.finetune.CopyFrom(pb.FinetuneOptions(**finetune))
        for name, value in (extra or {}).items():
            if isinstance(value, (list, tuple)):
                getattr(request, name).extend(value)
            else:
                setattr(request, name, value)
        return self._retrying(lambda: self.stub.SubmitJob(request, metadata=self._metadata,
                                                          timeout=self.timeout))

    @_remote_errors
    def get_job(self, job_id: str) -> pb.Job:
        return self._retrying(lambda: self.stub.GetJob(pb.GetJobRequest(job_id=job_id),
                                                       metadata=self._metadata, timeout=self.timeout))

    @_remote_errors
    def list_jobs(self, state: str | None = None, limit: int = 100) -> list[pb.Job]:
        request = pb.ListJobsRequest(state=pb.JobState.Value(state) if state else 0, limit=limit)
        return list(self.stub.ListJobs(request, metadata=self._metadata, timeout=self.timeout).jobs)

    @_remote_errors
    def cancel(self, job_id: str) -> pb.Job:
        return self.stub.CancelJob(pb.CancelJobRequest(job_id=job_id), metadata=self._metadata,
                                   timeout=self.timeout)

    @_remote_errors
    def watch(self, job_id: str, after_seq: int = 0) -> list[pb.JobEvent]:
        """Every event of the job until it finishes (blocks while it runs)."""
        return list(self.stub.WatchJob(pb.WatchJobRequest(job_id=job_id, after_seq=after_seq),
                                       metadata=self._metadata))

    @_remote_errors
    def wait(self, job_id: str, *, on_event: Callable[[pb.JobEvent], None] | None = None,
             timeout: float | None = None) -> pb.Job:
        """Follow the job's events until it finishes; returns the final Job.

        If the stream breaks (the server restarted), it is opened again after the last event
        seen, with backoff while the server is away; a server away for longer than `patience`
        seconds ends the wait with RemoteError UNAVAILABLE. `timeout` bounds each stream.
        """
        seq = 0
        patience = _Patience(self.patience)
        while True:
            try:
                stream = self.stub.WatchJob(pb.WatchJobRequest(job_id=job_id, after_seq=seq),
                                            metadata=self._metadata, timeout=timeout)
                for event in stream:
                    seq = event.seq
                    patience.recovered()
                    if on_event is not None:
                        on_event(event)
                job = self.stub.GetJob(pb.GetJobRequest(job_id=job_id), metadata=self._metadata,
                                       timeout=self.timeout)
            except grpc.RpcError as error:
                if not patience.pause(error):
                    raise
                self.retries += 1
                continue
            if job.state in _FINISHED:
                return job

    @_remote_errors
    def download(self, job_id: str, out_path: str | Path, *, report_path: str | Path | None = None) -> dict:
        """Write the pruned model to `out_path` (its spec beside it for safetensors); returns the report."""
        out_path = Path(out_path)
        targets = {"model": out_path, "spec": out_path.with_suffix(".json")}
        report_bytes = b""
        sink, header, digest, temporary = None, None, None, None

        def finish():
            if sink is None:
                return
            sink.close()
            if digest.hexdigest() != header.sha256:
                temporary.unlink(missing_ok=True)
                raise RemoteError("DATA_LOSS", f"the downloaded {header.kind} does not match its sha256")
            if header.filename.endswith(".tar") and targets[header.kind].suffix != ".tar":
                _unpack_folder(temporary, targets[header.kind])  # a HuggingFace folder
            else:
                os.replace(temporary, targets[header.kind])

        stream = self._retrying(lambda: _first_and_rest(self.stub.DownloadResult(
            pb.DownloadResultRequest(job_id=job_id), metadata=self._metadata)))
        for chunk in stream:
            if chunk.WhichOneof("payload") == "header":
                finish()
                header, digest, sink = chunk.header, hashlib.sha256(), None
                if header.kind in targets:
                    targets[header.kind].parent.mkdir(parents=True, exist_ok=True)
                    temporary = targets[header.kind].with_name(targets[header.kind].name + ".part")
                    sink = open(temporary, "wb")
                continue
            digest.update(chunk.data)
            if sink is not None:
                sink.write(chunk.data)
            elif header.kind == "report":
                report_bytes += chunk.data
        finish()
        if report_path is not None:
            Path(report_path).write_bytes(report_bytes)
        return json.loads(report_bytes) if report_bytes else {}

    # --- server ------------------------------------------------------------------------------
    @_remote_errors
    def info(self) -> pb.ServerInfo:
        return self.stub.GetServerInfo(pb.GetServerInfoRequest(), metadata=self._metadata,
                                       timeout=self.timeout)

    @_remote_errors
    def health(self, service: str = "") -> str:
        """"SERVING" when the server is up (the health service needs no token)."""
        stub = health_pb2_grpc.HealthStub(self.channel)
        reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=self.timeout or 10)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def _first_and_rest(stream) -> Iterator:
    """Wait for a stream's first message (where a refused or unreachable call fails), then
    give the whole stream; so retrying the call covers what can be retried safely."""
    first = next(stream, None)
    return iter(()) if first is None else itertools.chain([first], stream)


def _print_event(event: pb.JobEvent) -> None:
    if event.kind == "state":
        text = pb.JobState.Name(event.state) + (f" ({event.message})" if event.message else "")
    elif event.kind == "phase":
        text = f"phase {event.phase}"
    elif event.kind == "metrics":
        text = f"epoch {event.epoch} " + " ".join(f"{k}={v:.4g}" for k, v in sorted(event.metrics.items()) if k != "epoch")
    else:
        text = event.message
    print(f"[job] {text}", file=sys.stderr, flush=True)


# PruneRequest fields that SubmitJobRequest carries under the same name (a newer proto may
# carry more; `_submit_arguments` sets every one the message has and refuses the rest).
_SUBMIT_FIELDS = ("method", "criterion", "allocation", "speedup", "params_ratio",
                  "finetune_epochs", "finetune", "metanet")


def _submit_arguments(request: PruneRequest, client: PruningClient) -> dict:
    """`PruningClient.submit` arguments for a checked request (an .npz data file is uploaded)."""
    options = request.to_options()
    options.pop("allocation", None)
    if request.allocation not in ("global", "policy"):
        options["allocation"] = request.allocation
    submit = {key: options.pop(key) for key in _SUBMIT_FIELDS if key in options}
    if "policy" in options:
        submit["policy"] = options.pop("policy")  # already a checked mapping, even from a recipe
    data = options.pop("data", None)
    if isinstance(data, (str, Path)) and str(data).endswith(".npz") and Path(data).is_file():
        submit["data_id"] = client.upload_data(data).id
    elif isinstance(data, (str, Path)):
        submit["dataset"] = str(data)
    elif data is not None:
        raise RemoteError("INVALID_ARGUMENT", "remote pruning takes a dataset id or an .npz file as data")
    if "round_to" in options:  # an int or "auto"; the message carries it as text
        options["round_to"] = str(options["round_to"])
    carried = pb.SubmitJobRequest.DESCRIPTOR.fields_by_name
    extra = {key: value for key, value in options.items() if key in carried}
    refused = sorted(set(options) - set(extra))
    if refused:
        raise RemoteError("INVALID_ARGUMENT", f"options this service's protocol does not carry yet: "
                                              f"{', '.join(refused)}")
    submit["extra"] = extra
    return submit


def _unpack_folder(archive: Path, folder: Path) -> None:
    """A downloaded HuggingFace folder's tar, checked and unpacked into `folder` (replaced)."""
    from metaprune.formats.hf_archive import extract_hf_archive

    try:
        if folder.is_dir():
            shutil.rmtree(folder)
        extract_hf_archive(archive, folder)
    finally:
        archive.unlink(missing_ok=True)


def prune_remote(server: str, input_path: str | Path, out_path: str | Path, *, token: str | None = None,
                 tls_ca: str | Path | None = None, request: PruneRequest | None = None,
                 options: dict | None = None, output_format: str | None = None,
                 report_path: str | Path | None = None, progress: bool = True) -> dict:
    """Prune a model file on a MetaPrune server; writes `out_path` and returns the report.

    The job is a :class:`~metaprune.vocabulary.PruneRequest` (as `metaprune prune` builds it),
    or `options`: `metaprune.prune` keywords (a policy may be a dict, a `tune` recipe or a JSON
    path of either; data/dataset an id or an .npz path) plus, for compatibility,
    output_format. Either is checked here, before anything is uploaded. The output format
    otherwise follows `out_path`'s suffix. Raises :class:`RemoteError` with the server's status
    code.

    Example::

        report = prune_remote("127.0.0.1:50051", "model.pt2", "pruned.pt2",
                              options={"method": "l2", "speedup": 2.0})
    """
    out_path = Path(out_path)
    if request is None:
        options = dict(options or {})
        output_format = options.pop("output_format", output_format)
        if "dataset" in options:
            options["data"] = options.pop("dataset")
        request = PruneRequest.from_options(options)
    with PruningClient(server, token=token, tls_ca=tls_ca) as client:
        submit = _submit_arguments(request, client)
        model = client.upload_model(input_path)
        if output_format is None and out_path.suffix in _FORMATS:
            output_format = out_path.suffix[1:]
        if output_format is not None:
            submit["output_format"] = output_format
        job = client.submit(model.id, **submit)
        job = client.wait(job.job_id, on_event=_print_event if progress else None)
        if job.state != pb.SUCCEEDED:
            raise RemoteError(job.error_code or pb.JobState.Name(job.state),
                              job.message or f"job {job.job_id} ended {pb.JobState.Name(job.state)}")
        return client.download(job.job_id, out_path, report_path=report_path)
