"""The PruningService implementation: authentication, uploads, jobs, downloads.

Every handler resolves the caller's tenant first; ids of other tenants answer NOT_FOUND exactly
like unknown ones. Uploads are streamed to disk (never held in memory), checked against the
limits and the tenant's storage quota chunk by chunk, and validated in a worker process before
they get an id.

The server is a ``grpc.aio`` server: the streaming RPCs (uploads, WatchJob, DownloadResult) are
coroutines on its event loop, so an open stream holds no thread (issue 16: 64 watchers used to
starve every other call); blocking work (files, SQLite, validation) goes to small thread pools.
Unary RPCs are plain functions run on their own thread pool, health checks on the loop. Open
streams are counted per tenant and in total; past a limit RESOURCE_EXHAUSTED with ``retry-after``.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import inspect
import json
import math
import os
import shutil
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import grpc
from google.protobuf import json_format

import metaprune
from metaprune.vocabulary import CHECKPOINT_DIR

from . import limits as vocabulary
from . import pruning_pb2 as pb
from . import pruning_pb2_grpc
from .auth import Authenticator
from .job_request import FORMAT_NAMES, RequestError, available_metanetworks, build_task
from .files import sha256_of
from .limits import Limits
from .metanets import describe_checkpoints
from .model_facts import check_options
from .scheduler import Scheduler
from .store import FINISHED, JobStore, Upload, new_id
from .worker import TaskFailure, result_file_name

_DOWNLOAD_CHUNK = 1 << 20
# ".tar": a HuggingFace folder as an uncompressed tar (metaprune.formats.hf_archive)
_MODEL_SUFFIXES = {".pt2": "pt2", ".safetensors": "safetensors", ".tar": "hf"}
# a watcher re-reads its job this often even without a notification (belt and braces)
_WATCH_RECHECK_SECONDS = 30.0
_MAX_REQUEST_KEY = 128


class Busy(RequestError):
    """RESOURCE_EXHAUSTED for a limit that frees itself (a full queue, open streams): the
    client is told when to come back, in a `retry-after` trailing metadata entry (seconds)."""

    def __init__(self, message: str, retry_after: int):
        super().__init__("RESOURCE_EXHAUSTED", message)
        self.retry_after = retry_after


def _trailers(error: RequestError) -> tuple:
    retry_after = getattr(error, "retry_after", 0)
    return (("retry-after", str(retry_after)),) if retry_after else ()


def _answers_errors(method):
    """Turns RequestError into the call's status (+ `retry-after`), for plain functions (unary
    RPCs on the thread pool), coroutines and async generators (on the event loop)."""
    if inspect.isasyncgenfunction(method):
        @functools.wraps(method)
        async def streaming(self, request, context):
            try:
                async for message in method(self, request, context):
                    yield message
            except RequestError as error:
                await context.abort(grpc.StatusCode[error.code], error.message, _trailers(error))
        return streaming

    if inspect.iscoroutinefunction(method):
        @functools.wraps(method)
        async def coroutine(self, request, context):
            try:
                return await method(self, request, context)
            except RequestError as error:
                await context.abort(grpc.StatusCode[error.code], error.message, _trailers(error))
        return coroutine

    @functools.wraps(method)
    def unary(self, request, context):
        try:
            return method(self, request, context)
        except RequestError as error:
            if _trailers(error):
                context.set_trailing_metadata(_trailers(error))
            context.abort(grpc.StatusCode[error.code], error.message)
    return unary


class PruningServicer(pruning_pb2_grpc.PruningServiceServicer):
    """Example::

        servicer = PruningServicer(store, scheduler, validator, Authenticator(None), Limits())
        pruning_pb2_grpc.add_PruningServiceServicer_to_server(servicer, aio_server)
        servicer.attach(asyncio.get_running_loop())   # watchers learn of new events
    """

    def __init__(self, store: JobStore, scheduler: Scheduler, validator, auth: Authenticator,
                 limits: Limits, *, validations: int = 2, metanet_dir: Path | None = None):
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
        # folder of the metanetwork checkpoints served (None: the ones the library ships)
        self.metanet_dir = metanet_dir
        # their descriptions (name, scope, hash), read once: a malformed folder fails here
        self._metanet_info = [pb.MetanetInfo(**_known_fields(pb.MetanetInfo, info))
                              for info in describe_checkpoints(metanet_dir or CHECKPOINT_DIR)]
        # uploads validated at once (each takes a worker process)
        self._validations = ThreadPoolExecutor(validations, thread_name_prefix="validate")
        # file and SQLite work of the streaming RPCs, off the event loop
        self._io = ThreadPoolExecutor(4, thread_name_prefix="stream-io")
        self._submit_lock = threading.Lock()
        # the rest is touched on the event loop only (no locks needed)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._open_streams: Counter[str] = Counter()
        self._watchers: dict[str, set[asyncio.Event]] = {}
        self._receiving: Counter[str] = Counter()  # bytes of uploads being received, per tenant

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Called once the event loop runs: store changes wake the job's watchers."""
        self._loop = loop
        self.store.add_listener(lambda job_id: loop.call_soon_threadsafe(self._wake, job_id))

    def _metanetworks(self) -> dict[str, str]:
        return available_metanetworks(self.metanet_dir)

    def close(self) -> None:
        self._validations.shutdown(wait=False, cancel_futures=True)
        self._io.shutdown(wait=False, cancel_futures=True)

    # --- helpers -----------------------------------------------------------------------------
    def _tenant(self, context) -> str:
        tenant = self.auth.tenant_for(context.invocation_metadata())
        if tenant is None:
            raise RequestError("UNAUTHENTICATED",
                               "missing or wrong token: send 'authorization: Bearer TOKEN' metadata")
        return tenant

    def _job(self, job_id: str, tenant: str):
        job = self.store.get_job(job_id, tenant) if job_id else None
        if job is None:
            raise RequestError("NOT_FOUND", f"no job with id {job_id[:80]!r}")
        return job

    async def _blocking(self, function, *args):
        return await asyncio.get_running_loop().run_in_executor(self._io, functools.partial(function, *args))

    def _retry_after(self) -> int:
        """Seconds until a queue slot or a stream is likely free: one typical job per worker."""
        return max(1, min(60, math.ceil(self.scheduler.typical_job_seconds() / self.scheduler.workers)))

    @contextmanager
    def _stream_slot(self, tenant: str):
        """One of the tenant's open streams (event loop only); RESOURCE_EXHAUSTED past a limit."""
        limits = self.limits
        if self._open_streams.total() >= limits.max_streams:
            raise Busy(f"the server has {limits.max_streams} open streams; retry later", self._retry_after())
        if self._open_streams[tenant] >= limits.max_streams_per_tenant:
            raise Busy(f"{limits.max_streams_per_tenant} streams of this tenant are open "
                       "(WatchJob, DownloadResult, uploads); close one or retry later", self._retry_after())
        self._open_streams[tenant] += 1
        try:
            yield
        finally:
            self._open_streams[tenant] -= 1

    def _wake(self, job_id: str) -> None:
        for event in self._watchers.get(job_id, ()):
            event.set()

    def _job_message(self, job) -> pb.Job:
        message = pb.Job(
            job_id=job.id, model_id=job.model_id, state=pb.JobState.Value(job.state),
            phase=job.phase, message=job.message, error_code=job.error_code,
            created_at=job.created, started_at=job.started, finished_at=job.finished,
            attempts=job.attempts, report_json=job.report,
        )
        json_format.ParseDict(job.request, message.request)
        return message

    async def _receive_file(self, request_iterator, tenant: str, allowed: dict[str, str]):
        """Streams an upload to a private temporary file; returns (path, format, metadata, size, sha)."""
        messages = aiter(request_iterator)
        first = await anext(messages, None)
        if first is None or first.WhichOneof("payload") != "metadata":
            raise RequestError("INVALID_ARGUMENT", "the first upload message must carry metadata")
        metadata = first.metadata
        file_format = self._upload_format(metadata, allowed)
        room = self.limits.tenant_quota_bytes - await self._blocking(self.store.tenant_bytes, tenant)
        if metadata.size_bytes:
            self._check_room(metadata.size_bytes, room - self._receiving[tenant])
        path = self.store.incoming_dir() / new_id("in")
        digest, size = hashlib.sha256(), 0
        sink = await self._blocking(open, path, "xb")
        try:
            async with asyncio.timeout(self.limits.upload_time_seconds):
                async for message in messages:
                    if message.WhichOneof("payload") != "data":
                        raise RequestError("INVALID_ARGUMENT", "only the first upload message may carry metadata")
                    if len(message.data) > vocabulary.MAX_CHUNK_BYTES:
                        raise RequestError("RESOURCE_EXHAUSTED",
                                           f"an upload chunk holds {len(message.data)} bytes; the limit "
                                           f"is {vocabulary.MAX_CHUNK_BYTES}")
                    size += len(message.data)
                    self._receiving[tenant] += len(message.data)
                    self._check_room(size, room - self._receiving[tenant] + size)
                    await self._blocking(_append, sink, digest, message.data)
            if size == 0:
                raise RequestError("INVALID_ARGUMENT", "the upload is empty")
            if metadata.size_bytes and metadata.size_bytes != size:
                raise RequestError("INVALID_ARGUMENT",
                                   f"announced {metadata.size_bytes} bytes, received {size}")
            sha = digest.hexdigest()
            if metadata.sha256 and metadata.sha256.lower() != sha:
                raise RequestError("INVALID_ARGUMENT", "the sha256 of the received bytes does not match")
        except TimeoutError:
            path.unlink(missing_ok=True)
            raise RequestError("CANCELLED", f"the upload was not complete after "
                               f"{self.limits.upload_time_seconds:g} s; it was dropped") from None
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        finally:
            self._receiving[tenant] -= size
            sink.close()
        return path, file_format, metadata, size, sha

    @staticmethod
    def _upload_format(metadata, allowed: dict[str, str]) -> str:
        suffix = Path(metadata.filename).suffix.lower()
        file_format = FORMAT_NAMES.get(metadata.format) or allowed.get(suffix)
        if file_format not in allowed.values():
            given = (f"file name {metadata.filename[:80]!r}" if metadata.filename
                     else "no file name and no format")
            raise RequestError("INVALID_ARGUMENT", f"unknown upload type ({given}); send a file name "
                               f"ending in {' or '.join(allowed)}")
        return file_format

    def _check_room(self, size: int, room: int) -> None:
        if size > self.limits.max_upload_bytes:
            raise RequestError("RESOURCE_EXHAUSTED", f"the upload has {size} bytes; this server accepts "
                               f"at most {self.limits.max_upload_bytes}")
        if size > room:
            raise RequestError("RESOURCE_EXHAUSTED",
                               f"the upload ({size} bytes) does not fit in this tenant's storage quota "
                               f"({self.limits.tenant_quota_bytes} bytes, {max(0, room)} free); uploads "
                               f"expire after {self.limits.upload_expiry_seconds:g} s, results after "
                               f"{self.limits.result_expiry_seconds:g} s")

    async def _validate(self, task: dict) -> dict:
        cancelled = threading.Event()
        run = functools.partial(self.validator.run, task, on_event=lambda event: None,
                                timeout=self.limits.validate_time_seconds, cancelled=cancelled)
        try:
            return await asyncio.get_running_loop().run_in_executor(self._validations, run)
        except asyncio.CancelledError:
            cancelled.set()  # the client hung up: stop the worker
            raise
        except TaskFailure as failure:
            # a file that crashes or confuses the loader is the file's fault
            code = "INVALID_ARGUMENT" if failure.code == "INTERNAL" else failure.code
            raise RequestError(code, f"the upload was refused: {failure.message}") from None

    async def _store_upload(self, request_iterator, context, kind: str, allowed: dict[str, str],
                            prepare) -> tuple[Upload, dict]:
        """Receive, place under uploads/<id>/, validate, record: the common path of uploads.

        `prepare(folder, incoming, file_format, metadata)` moves the file into place and returns
        the validation task. A crash anywhere here leaves at most an orphan folder or an
        incoming file, which the next start removes.
        """
        tenant = self._tenant(context)
        with self._stream_slot(tenant):
            incoming, file_format, metadata, size, sha = await self._receive_file(
                request_iterator, tenant, allowed)
            upload_id = new_id(kind)
            folder = self.store.upload_dir(upload_id)
            try:
                folder.mkdir()
                task = await self._blocking(prepare, folder, incoming, file_format, metadata)
                info = await self._validate(task)
                upload = Upload(upload_id, tenant, kind, file_format, size, sha, info, time.time())
                await self._blocking(self._record_upload, upload)
            except BaseException:
                incoming.unlink(missing_ok=True)
                await self._blocking(functools.partial(shutil.rmtree, folder, ignore_errors=True))
                raise
        return upload, info

    def _record_upload(self, upload: Upload) -> None:
        with self._submit_lock:  # the final, exact quota check and the insert together
            used = self.store.tenant_bytes(upload.tenant)
            self._check_room(upload.size, self.limits.tenant_quota_bytes - used)
            self.store.add_upload(upload)

    # --- uploads -----------------------------------------------------------------------------
    @_answers_errors
    async def UploadModel(self, request_iterator, context):
        def prepare(folder, incoming, file_format, metadata):
            model_path = folder / f"model.{file_format}"
            if file_format == "hf":  # the worker checks the tar entry by entry, unpacks it
                archive = folder / "model.tar"
                os.replace(incoming, archive)
                if metadata.spec_json:
                    raise RequestError("INVALID_ARGUMENT", "a spec JSON only goes with a "
                                       ".safetensors model")
                return {"kind": "validate_model", "model_path": str(model_path),
                        "archive": str(archive), "max_parameters": self.limits.max_parameters,
                        "max_bytes": self.limits.max_upload_bytes}
            os.replace(incoming, model_path)
            if file_format == "safetensors":
                (folder / "model.json").write_text(_spec_json(metadata.spec_json))
            elif metadata.spec_json:
                raise RequestError("INVALID_ARGUMENT", "a spec JSON only goes with a .safetensors model")
            return {"kind": "validate_model", "model_path": str(model_path),
                    "max_parameters": self.limits.max_parameters}

        upload, info = await self._store_upload(request_iterator, context, "model", _MODEL_SUFFIXES, prepare)
        return pb.UploadReply(
            id=upload.id, size_bytes=upload.size, sha256=upload.sha256,
            num_parameters=info["num_parameters"], macs=info["macs"], input_shape=info["input_shape"],
            output_shape=info["output_shape"], summary_json=json.dumps(info),
        )

    @_answers_errors
    async def UploadData(self, request_iterator, context):
        def prepare(folder, incoming, file_format, metadata):
            data_path = folder / "data.npz"
            os.replace(incoming, data_path)
            return {"kind": "validate_data", "data_path": str(data_path)}

        upload, info = await self._store_upload(request_iterator, context, "data", {".npz": "npz"}, prepare)
        return pb.UploadReply(id=upload.id, size_bytes=upload.size, sha256=upload.sha256,
                              summary_json=json.dumps(info))

    # --- jobs --------------------------------------------------------------------------------
    @_answers_errors
    def SubmitJob(self, request, context):
        tenant = self._tenant(context)
        key = request.request_id
        if len(key) > _MAX_REQUEST_KEY:
            raise RequestError("INVALID_ARGUMENT", f"request_id is over {_MAX_REQUEST_KEY} characters")
        task = build_task(request, tenant=tenant, store=self.store,
                          metanetworks=self._metanetworks(), limits=self.limits)
        if self.metanet_dir is not None:  # "default" chooses among that folder's checkpoints
            task["metanet_dir"] = str(self.metanet_dir)
        model = self.store.get_upload(request.model_id, tenant, "model")
        if model is None:  # expired since build_task looked it up
            raise RequestError("NOT_FOUND", f"no model with id {request.model_id[:80]!r}")
        check_options(task["options"], model.info)
        with self._submit_lock:  # count and insert together, so the queue limit holds
            earlier = self.store.job_for_key(tenant, key)
            if earlier is not None:  # the same submit again (its reply was lost): same job
                return self._job_message(earlier)
            if self.store.count_active() >= self.limits.max_queued_jobs:
                raise Busy(f"the job queue is full ({self.limits.max_queued_jobs} jobs); retry later",
                           self._retry_after())
            job = self.store.add_job(tenant, request.model_id, json_format.MessageToDict(request), task,
                                     data_id=request.data_id, request_key=key)
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
    async def WatchJob(self, request, context):
        tenant = self._tenant(context)
        job = await self._blocking(self._job, request.job_id, tenant)
        with self._stream_slot(tenant):
            wake = asyncio.Event()
            self._watchers.setdefault(job.id, set()).add(wake)
            try:
                seq = max(0, request.after_seq)
                while True:
                    wake.clear()  # before reading: an event recorded after the read wakes us
                    events = await self._blocking(self.store.events_after, job.id, seq)
                    for seq, at, event in events:
                        yield _event_message(job.id, seq, at, event)
                    if events:
                        continue
                    current = await self._blocking(self.store.get_job, job.id)
                    if current is None or current.state in FINISHED:
                        return
                    try:
                        await asyncio.wait_for(wake.wait(), _WATCH_RECHECK_SECONDS)
                    except TimeoutError:
                        pass
            finally:
                watchers = self._watchers.get(job.id, set())
                watchers.discard(wake)
                if not watchers:
                    self._watchers.pop(job.id, None)

    @_answers_errors
    async def DownloadResult(self, request, context):
        tenant = self._tenant(context)
        job = await self._blocking(self._job, request.job_id, tenant)
        if job.state != "SUCCEEDED":
            detail = f": {job.message}" if job.message else ""
            raise RequestError("FAILED_PRECONDITION", f"job {job.id} is {job.state}{detail}; no result to download")
        result = self.store.job_dir(job.id) / "result"
        fmt = job.task["output_format"]
        artifacts = [] if request.report_only else [("model", result / result_file_name(fmt))]
        if fmt == "safetensors" and not request.report_only:
            artifacts.append(("spec", result / "model.json"))
        artifacts.append(("report", result / "report.json"))
        with self._stream_slot(tenant):
            for kind, path in artifacts:
                if not path.is_file():
                    raise RequestError("NOT_FOUND", f"the job's {kind} file is missing on the server")
                yield pb.ResultChunk(header=pb.ArtifactHeader(
                    kind=kind, filename=path.name, size_bytes=path.stat().st_size,
                    sha256=await self._blocking(sha256_of, path)))
                with open(path, "rb") as source:
                    while chunk := await self._blocking(source.read, _DOWNLOAD_CHUNK):
                        yield pb.ResultChunk(data=chunk)

    @_answers_errors
    def GetServerInfo(self, request, context):
        tenant = self._tenant(context)
        limits = self.limits
        return pb.ServerInfo(
            version=metaprune.__version__, methods=vocabulary.METHODS, criteria=vocabulary.CRITERIA,
            allocations=vocabulary.ALLOCATIONS, metanetworks=list(self._metanetworks()),
            metanet_info=self._metanet_info,
            datasets=vocabulary.DATASETS + vocabulary.TEXT_DATASETS, input_formats=vocabulary.INPUT_FORMATS,
            output_formats=vocabulary.OUTPUT_FORMATS,
            limits=pb.Limits(
                max_upload_bytes=limits.max_upload_bytes, max_parameters=limits.max_parameters,
                max_queued_jobs=limits.max_queued_jobs, worker_memory_bytes=limits.worker_memory_bytes,
                job_time_seconds=limits.job_time_seconds, max_chunk_bytes=vocabulary.MAX_CHUNK_BYTES,
                max_message_bytes=vocabulary.MAX_MESSAGE_BYTES,
                max_finetune_epochs=limits.max_finetune_epochs,
                tenant_quota_bytes=limits.tenant_quota_bytes,
                upload_expiry_seconds=limits.upload_expiry_seconds,
                result_expiry_seconds=limits.result_expiry_seconds,
                max_streams_per_tenant=limits.max_streams_per_tenant, max_streams=limits.max_streams,
            ),
            auth_required=self.auth.required, backend=self.scheduler.backend.name,
            workers=self.scheduler.workers, storage_used_bytes=self.store.tenant_bytes(tenant),
        )


def _known_fields(message_type, values: dict) -> dict:
    return {key: value for key, value in values.items() if key in message_type.DESCRIPTOR.fields_by_name}


def _append(sink, digest, data: bytes) -> None:
    digest.update(data)
    sink.write(data)


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
