"""The PruningService implementation: authentication, uploads, jobs, downloads.

Every handler resolves the caller's tenant first; ids of other tenants answer NOT_FOUND exactly
like unknown ones. Uploads are streamed to disk (never held in memory), checked against the
limits chunk by chunk, and validated in a worker process before they get an id.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import math
import os
import shutil
import threading
import time
from pathlib import Path

import grpc
from google.protobuf import json_format

import metaprune

from . import limits as vocabulary
from . import pruning_pb2 as pb
from . import pruning_pb2_grpc
from .auth import Authenticator
from .job_request import FORMAT_NAMES, RequestError, available_metanetworks, build_task
from .files import sha256_of
from .limits import Limits
from .scheduler import Scheduler
from .store import FINISHED, JobStore, Upload, new_id
from .worker import TaskFailure

_DOWNLOAD_CHUNK = 1 << 20
_MODEL_SUFFIXES = {".pt2": "pt2", ".safetensors": "safetensors"}


def _answers_errors(method):
    """Turns RequestError into the call's status (for plain and streaming handlers)."""
    if inspect.isgeneratorfunction(method):
        @functools.wraps(method)
        def streaming(self, request, context):
            try:
                yield from method(self, request, context)
            except RequestError as error:
                context.abort(grpc.StatusCode[error.code], error.message)
        return streaming

    @functools.wraps(method)
    def unary(self, request, context):
        try:
            return method(self, request, context)
        except RequestError as error:
            context.abort(grpc.StatusCode[error.code], error.message)
    return unary


class PruningServicer(pruning_pb2_grpc.PruningServiceServicer):
    """Example::

        servicer = PruningServicer(store, scheduler, validator, Authenticator(None), Limits())
        pruning_pb2_grpc.add_PruningServiceServicer_to_server(servicer, server)
    """

    def __init__(self, store: JobStore, scheduler: Scheduler, validator, auth: Authenticator,
                 limits: Limits, *, validations: int = 2):
        # SQLite rows and artifact folders
        self.store = store
        # runs the submitted jobs
        self.scheduler = scheduler
        # LocalBackend used to validate uploads in a worker process
        self.validator = validator
        # token -> tenant
        self.auth = auth
        # the server's limits
        self.limits = limits
        # uploads validated at once (each takes a worker process)
        self._validation_slots = threading.BoundedSemaphore(validations)
        self._submit_lock = threading.Lock()

    # --- helpers -----------------------------------------------------------------------------
    def _tenant(self, context) -> str:
        tenant = self.auth.tenant_for(context.invocation_metadata())
        if tenant is None:
            context.abort(grpc.StatusCode.UNAUTHENTICATED,
                          "missing or wrong token: send 'authorization: Bearer TOKEN' metadata")
        return tenant

    def _job(self, job_id: str, tenant: str):
        job = self.store.get_job(job_id, tenant) if job_id else None
        if job is None:
            raise RequestError("NOT_FOUND", f"no job with id {job_id[:80]!r}")
        return job

    def _job_message(self, job) -> pb.Job:
        message = pb.Job(
            job_id=job.id, model_id=job.model_id, state=pb.JobState.Value(job.state),
            phase=job.phase, message=job.message, error_code=job.error_code,
            created_at=job.created, started_at=job.started, finished_at=job.finished,
            attempts=job.attempts, report_json=job.report,
        )
        json_format.ParseDict(job.request, message.request)
        return message

    def _receive_file(self, request_iterator, context, allowed: dict[str, str]):
        """Streams an upload to a private temporary file; returns (path, format, metadata, size, sha)."""
        first = next(request_iterator, None)
        if first is None or first.WhichOneof("payload") != "metadata":
            raise RequestError("INVALID_ARGUMENT", "the first upload message must carry metadata")
        metadata = first.metadata
        suffix = Path(metadata.filename).suffix.lower()
        file_format = FORMAT_NAMES.get(metadata.format) or allowed.get(suffix)
        if file_format not in allowed.values():
            raise RequestError("INVALID_ARGUMENT",
                               f"unsupported file type {suffix[:20] or metadata.format!r}; "
                               f"accepted: {', '.join(allowed)}")
        if metadata.size_bytes > self.limits.max_upload_bytes:
            raise RequestError("RESOURCE_EXHAUSTED", self._too_big(metadata.size_bytes))
        path = self.store.incoming_dir() / new_id("in")
        digest, size = hashlib.sha256(), 0
        stalled = threading.Timer(self.limits.upload_time_seconds, context.cancel)
        stalled.daemon = True
        stalled.start()
        try:
            with open(path, "xb") as sink:
                for message in request_iterator:
                    if message.WhichOneof("payload") != "data":
                        raise RequestError("INVALID_ARGUMENT", "only the first upload message may carry metadata")
                    if len(message.data) > vocabulary.MAX_CHUNK_BYTES:
                        raise RequestError("RESOURCE_EXHAUSTED",
                                           f"an upload chunk holds {len(message.data)} bytes; the limit "
                                           f"is {vocabulary.MAX_CHUNK_BYTES}")
                    size += len(message.data)
                    if size > self.limits.max_upload_bytes:
                        raise RequestError("RESOURCE_EXHAUSTED", self._too_big(size))
                    digest.update(message.data)
                    sink.write(message.data)
            if size == 0:
                raise RequestError("INVALID_ARGUMENT", "the upload is empty")
            if metadata.size_bytes and metadata.size_bytes != size:
                raise RequestError("INVALID_ARGUMENT",
                                   f"announced {metadata.size_bytes} bytes, received {size}")
            sha = digest.hexdigest()
            if metadata.sha256 and metadata.sha256.lower() != sha:
                raise RequestError("INVALID_ARGUMENT", "the sha256 of the received bytes does not match")
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        finally:
            stalled.cancel()
        return path, file_format, metadata, size, sha

    def _too_big(self, size: int) -> str:
        return f"the upload has {size} bytes; this server accepts at most {self.limits.max_upload_bytes}"

    def _validate(self, task: dict, context) -> dict:
        cancelled = threading.Event()
        context.add_callback(cancelled.set)  # the client hung up: stop the worker
        with self._validation_slots:
            try:
                return self.validator.run(task, on_event=lambda event: None,
                                          timeout=self.limits.validate_time_seconds, cancelled=cancelled)
            except TaskFailure as failure:
                # a file that crashes or confuses the loader is the file's fault
                code = "INVALID_ARGUMENT" if failure.code == "INTERNAL" else failure.code
                raise RequestError(code, f"the upload was refused: {failure.message}") from None

    # --- uploads -----------------------------------------------------------------------------
    @_answers_errors
    def UploadModel(self, request_iterator, context):
        tenant = self._tenant(context)
        incoming, file_format, metadata, size, sha = self._receive_file(
            request_iterator, context, _MODEL_SUFFIXES)
        upload_id = new_id("model")
        folder = self.store.upload_dir(upload_id)
        try:
            folder.mkdir()
            model_path = folder / f"model.{file_format}"
            os.replace(incoming, model_path)
            if file_format == "safetensors":
                (folder / "model.json").write_text(_spec_json(metadata.spec_json))
            elif metadata.spec_json:
                raise RequestError("INVALID_ARGUMENT", "a spec JSON only goes with a .safetensors model")
            info = self._validate({"kind": "validate_model", "model_path": str(model_path),
                                   "max_parameters": self.limits.max_parameters}, context)
            self.store.add_upload(Upload(upload_id, tenant, "model", file_format, size, sha, info, time.time()))
        except BaseException:
            incoming.unlink(missing_ok=True)
            shutil.rmtree(folder, ignore_errors=True)
            raise
        return pb.UploadReply(
            id=upload_id, size_bytes=size, sha256=sha, num_parameters=info["num_parameters"],
            macs=info["macs"], input_shape=info["input_shape"], output_shape=info["output_shape"],
            summary_json=json.dumps(info),
        )

    @_answers_errors
    def UploadData(self, request_iterator, context):
        tenant = self._tenant(context)
        incoming, _, metadata, size, sha = self._receive_file(request_iterator, context, {".npz": "npz"})
        upload_id = new_id("data")
        folder = self.store.upload_dir(upload_id)
        try:
            folder.mkdir()
            data_path = folder / "data.npz"
            os.replace(incoming, data_path)
            info = self._validate({"kind": "validate_data", "data_path": str(data_path)}, context)
            self.store.add_upload(Upload(upload_id, tenant, "data", "npz", size, sha, info, time.time()))
        except BaseException:
            incoming.unlink(missing_ok=True)
            shutil.rmtree(folder, ignore_errors=True)
            raise
        return pb.UploadReply(id=upload_id, size_bytes=size, sha256=sha, summary_json=json.dumps(info))

    # --- jobs --------------------------------------------------------------------------------
    @_answers_errors
    def SubmitJob(self, request, context):
        tenant = self._tenant(context)
        task = build_task(request, tenant=tenant, store=self.store,
                          metanetworks=available_metanetworks(), limits=self.limits)
        with self._submit_lock:  # count and insert together, so the queue limit holds
            if self.store.count_active() >= self.limits.max_queued_jobs:
                raise RequestError("RESOURCE_EXHAUSTED",
                                   f"the job queue is full ({self.limits.max_queued_jobs} jobs); retry later")
            job = self.store.add_job(tenant, request.model_id,
                                     json_format.MessageToDict(request), task)
        self.scheduler.enqueue(job.id)
        return self._job_message(job)

    @_answers_errors
    def GetJob(self, request, context):
        return self._job_message(self._job(request.job_id, self._tenant(context)))

    @_answers_errors
    def ListJobs(self, request, context):
        tenant = self._tenant(context)
        state = pb.JobState.Name(request.state) if request.state else None
        limit = request.limit if 0 < request.limit <= 1000 else 100
        jobs = [self._job_message(job) for job in self.store.list_jobs(tenant, state, limit)]
        for job in jobs:  # reports can be large; GetJob has them, a listing stays under 4 MiB
            job.ClearField("report_json")
        return pb.ListJobsReply(jobs=jobs)

    @_answers_errors
    def CancelJob(self, request, context):
        job = self._job(request.job_id, self._tenant(context))
        self.scheduler.cancel(job.id)
        return self._job_message(self.store.get_job(job.id))

    @_answers_errors
    def WatchJob(self, request, context):
        job = self._job(request.job_id, self._tenant(context))
        seq = max(0, request.after_seq)
        while context.is_active():
            events = self.store.events_after(job.id, seq)
            for seq, at, event in events:
                yield _event_message(job.id, seq, at, event)
            if events:
                continue
            if self.store.get_job(job.id).state in FINISHED:
                return
            with self.store.changed:
                self.store.changed.wait(timeout=1.0)

    @_answers_errors
    def DownloadResult(self, request, context):
        job = self._job(request.job_id, self._tenant(context))
        if job.state != "SUCCEEDED":
            detail = f": {job.message}" if job.message else ""
            raise RequestError("FAILED_PRECONDITION", f"job {job.id} is {job.state}{detail}; no result to download")
        result = self.store.job_dir(job.id) / "result"
        fmt = job.task["output_format"]
        artifacts = [] if request.report_only else [("model", result / f"model.{fmt}")]
        if fmt == "safetensors" and not request.report_only:
            artifacts.append(("spec", result / "model.json"))
        artifacts.append(("report", result / "report.json"))
        for kind, path in artifacts:
            if not path.is_file():
                raise RequestError("NOT_FOUND", f"the job's {kind} file is missing on the server")
            yield pb.ResultChunk(header=pb.ArtifactHeader(
                kind=kind, filename=path.name, size_bytes=path.stat().st_size, sha256=sha256_of(path)))
            with open(path, "rb") as source:
                while chunk := source.read(_DOWNLOAD_CHUNK):
                    yield pb.ResultChunk(data=chunk)

    @_answers_errors
    def GetServerInfo(self, request, context):
        self._tenant(context)
        limits = self.limits
        return pb.ServerInfo(
            version=metaprune.__version__, methods=vocabulary.METHODS, criteria=vocabulary.CRITERIA,
            allocations=vocabulary.ALLOCATIONS, metanetworks=list(available_metanetworks()),
            datasets=vocabulary.DATASETS, input_formats=vocabulary.INPUT_FORMATS,
            output_formats=vocabulary.OUTPUT_FORMATS,
            limits=pb.Limits(
                max_upload_bytes=limits.max_upload_bytes, max_parameters=limits.max_parameters,
                max_queued_jobs=limits.max_queued_jobs, worker_memory_bytes=limits.worker_memory_bytes,
                job_time_seconds=limits.job_time_seconds, max_chunk_bytes=vocabulary.MAX_CHUNK_BYTES,
                max_message_bytes=vocabulary.MAX_MESSAGE_BYTES,
                max_finetune_epochs=limits.max_finetune_epochs,
            ),
            auth_required=self.auth.required, backend=self.scheduler.backend.name,
            workers=self.scheduler.workers,
        )


def _spec_json(text: str) -> str:
    """The safetensors spec, re-serialised after a shape check (the worker checks the content)."""
    if not text:
        raise RequestError("INVALID_ARGUMENT", "a .safetensors model needs its spec JSON in the metadata")
    if len(text) > vocabulary.MAX_SPEC_BYTES:
        raise RequestError("INVALID_ARGUMENT", f"the spec JSON is over {vocabulary.MAX_SPEC_BYTES} bytes")
    try:
        spec = json.loads(text, parse_constant=_reject_constant)
    except ValueError as error:
        raise RequestError("INVALID_ARGUMENT", f"the spec is not valid JSON: {error}") from None
    if not isinstance(spec, dict) or not {"family", "config", "input_shape"} <= spec.keys():
        raise RequestError("INVALID_ARGUMENT",
                           'the spec must be {"format": 1, "family": ..., "config": {...}, "input_shape": [...]}')
    return json.dumps(spec)


def _reject_constant(name: str):
    raise ValueError(f"{name} is not allowed in the spec")


def _event_message(job_id: str, seq: int, at: float, event: dict) -> pb.JobEvent:
    state = event.get("state")
    metrics = {key: value for key, value in (event.get("metrics") or {}).items()
               if isinstance(value, (int, float)) and math.isfinite(value)}
    return pb.JobEvent(
        job_id=job_id, seq=seq, time=at, kind=event.get("kind", "log"),
        state=pb.JobState.Value(state) if state in pb.JobState.keys() else 0,
        phase=event.get("phase", ""), message=event.get("message", ""),
        epoch=event.get("epoch", 0), metrics=metrics,
    )
