"""Assembles and runs the gRPC server: PruningService, health, reflection, optional TLS.

The server is a ``grpc.aio`` server whose event loop runs in a thread of its own, so the
public API stays synchronous. Start-up order matters for crash safety: first the workers a
previous instance left are ended (:func:`fate.reap`), then what a crash left on disk is removed
(partial uploads, folders without a row), and only then are unfinished jobs re-queued, so a job
never runs twice at once. A sweeper thread deletes expired uploads and results.

Example::

    from metaprune.serving.server import ServerConfig, PruningServer
    server = PruningServer(ServerConfig(state_dir=Path("/tmp/state"), port=0))
    port = server.start()
    ...
    server.stop()
"""

from __future__ import annotations

import asyncio
import fcntl
import ipaddress
import logging
import shutil
import threading
import time
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from metaprune.errors import MetaPruneError

from . import fate
from . import limits as vocabulary
from . import pruning_pb2, pruning_pb2_grpc, reflection_v1
from .auth import Authenticator
from .limits import Limits
from .local_backend import LocalBackend
from .scheduler import Scheduler
from .servicer import PruningServicer
from .store import JobStore

log = logging.getLogger(__name__)
# threads for the unary RPCs (GetJob, SubmitJob, ...); streams and health need none
UNARY_THREADS = 16
SERVICE_NAME = pruning_pb2.DESCRIPTOR.services_by_name["PruningService"].full_name


class ServerConfigError(MetaPruneError):
    """The server cannot start with these options."""


@dataclass
class ServerConfig:
    """Options of `metaprune serve` (DESIGN.md §5)."""

    # folder with the SQLite job store and the artifacts; survives restarts
    state_dir: Path
    # address to bind; loopback unless tokens protect the server
    host: str = "127.0.0.1"
    # 0 picks a free port
    port: int = 50051
    # jobs running at once (each in its own worker process)
    workers: int = 2
    # torch threads inside each worker process
    worker_threads: int = 1
    # dispatch jobs to this Ray cluster instead of local processes
    ray_address: str | None = None
    # "TOKEN TENANT" per line; None: open server
    tokens_file: Path | None = None
    # serve the metanetwork checkpoints of this folder (None: the ones the library ships)
    metanet_dir: Path | None = None
    # PEM files for TLS; both or neither
    tls_cert: Path | None = None
    tls_key: Path | None = None
    limits: Limits = field(default_factory=Limits)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class PruningServer:
    """The running service; `start()` returns the bound port."""

    def __init__(self, config: ServerConfig):
        # the options the server runs with
        self.config = config
        self.auth = Authenticator.from_file(config.tokens_file)
        if not self.auth.required and not _is_loopback(config.host):
            raise ServerConfigError(
                f"refusing to serve without --tokens on the non-loopback address {config.host}; "
                "give a token file or bind 127.0.0.1")
        if (config.tls_cert is None) != (config.tls_key is None):
            raise ServerConfigError("--tls-cert and --tls-key go together")
        if config.workers < 1:
            raise ServerConfigError("--workers must be at least 1")
        if config.metanet_dir is not None and not Path(config.metanet_dir).is_dir():
            raise ServerConfigError(f"--metanet-dir {config.metanet_dir} is not a folder")
        self._state_lock = _lock_state_dir(Path(config.state_dir))
        self.store = JobStore(config.state_dir)
        limits = config.limits
        self.validator = LocalBackend(limits.worker_memory_bytes, config.worker_threads,
                                      registry=self.store)
        if config.ray_address:
            from .ray_backend import RayBackend  # Ray is imported only when asked for

            backend = RayBackend(config.ray_address, limits.worker_memory_bytes, config.worker_threads,
                                 hosts=config.workers)
        else:
            backend = self.validator
        self.scheduler = Scheduler(self.store, backend, workers=config.workers,
                                   job_time_seconds=limits.job_time_seconds)
        self.servicer = PruningServicer(self.store, self.scheduler, self.validator, self.auth,
                                        limits, validations=max(2, config.workers),
                                        metanet_dir=Path(config.metanet_dir) if config.metanet_dir else None)
        self._server: grpc.aio.Server | None = None
        self._health: health.aio.HealthServicer | None = None
        self._loop = asyncio.new_event_loop()
        self._loop_thread = threading.Thread(target=self._loop.run_forever, daemon=True, name="grpc-aio")
        self._stopped = threading.Event()
        self._sweeper = threading.Thread(target=self._sweep, daemon=True, name="expiry")

    def start(self) -> int:
        """Reap, clean up, bind and serve; returns the bound port. Call it from the thread that
        lives as long as the server (the fork server's parent-death signal is tied to it)."""
        self._end_previous_workers()
        self._remove_leftovers()
        self.validator.warm_up()
        self._loop_thread.start()
        port = asyncio.run_coroutine_threadsafe(self._start_grpc(), self._loop).result()
        self.scheduler.start()
        self._sweeper.start()
        return port

    def _end_previous_workers(self) -> None:
        killed = fate.reap(self.store.recorded_processes())
        if killed:
            log.warning("ended %d worker process(es) a previous server left: %s", len(killed), killed)
        self.store.forget_all_processes()

    def _remove_leftovers(self) -> None:
        leftovers = self.store.orphan_folders()
        for path in leftovers:
            _delete(path)
        if leftovers:
            log.warning("removed %d partial upload(s) or folder(s) without a record", len(leftovers))

    def _sweep(self) -> None:
        """Delete expired uploads and results, rows first (a crash leaves only orphan folders)."""
        limits = self.config.limits
        interval = min(60.0, max(0.5, min(limits.upload_expiry_seconds, limits.result_expiry_seconds) / 4))
        while not self._stopped.wait(interval):
            now = time.time()
            try:
                uploads, jobs = self.store.expire(uploads_before=now - limits.upload_expiry_seconds,
                                                  results_before=now - limits.result_expiry_seconds)
            except Exception:  # noqa: BLE001 - a failed sweep is retried at the next one
                log.exception("expiry sweep failed")
                continue
            for upload_id in uploads:
                _delete(self.store.upload_dir(upload_id))
            for job_id in jobs:
                _delete(self.store.job_dir(job_id))

    async def _start_grpc(self) -> int:
        config = self.config
        message_limit = vocabulary.MAX_MESSAGE_BYTES
        self._server = grpc.aio.server(
            migration_thread_pool=futures.ThreadPoolExecutor(UNARY_THREADS, thread_name_prefix="rpc"),
            options=[("grpc.max_receive_message_length", message_limit),
                     ("grpc.max_send_message_length", message_limit)],
        )
        self.servicer.attach(asyncio.get_running_loop())
        pruning_pb2_grpc.add_PruningServiceServicer_to_server(self.servicer, self._server)
        self._health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        services = (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME, reflection_v1.SERVICE_NAME)
        reflection.enable_server_reflection(services, self._server)
        reflection_v1.enable_server_reflection(services, self._server)
        address = f"{config.host}:{config.port}"
        if config.tls_cert is not None:
            credentials = grpc.ssl_server_credentials(
                [(Path(config.tls_key).read_bytes(), Path(config.tls_cert).read_bytes())])
            port = self._server.add_secure_port(address, credentials)
        else:
            port = self._server.add_insecure_port(address)
        if port == 0:
            raise ServerConfigError(f"cannot bind {address}")
        await self._server.start()
        for name in ("", SERVICE_NAME):
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        return port

    async def _stop_grpc(self, grace: float) -> None:
        if self._health is not None:
            await self._health.enter_graceful_shutdown()
        if self._server is not None:
            await self._server.stop(grace)

    def wait(self) -> None:
        """Block until :meth:`stop` has run (e.g. from a SIGTERM handler)."""
        while not self._stopped.wait(1.0):
            pass

    def stop(self, grace: float = 2.0) -> None:
        if self._stopped.is_set():
            return
        self._stopped.set()
        if self._loop_thread.is_alive():
            asyncio.run_coroutine_threadsafe(self._stop_grpc(grace), self._loop).result(grace + 10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._loop_thread.join(10)
        self.servicer.close()
        self.scheduler.stop()
        self.store.close()
        self._state_lock.close()


def _lock_state_dir(state_dir: Path):
    """Hold an exclusive lock on the state directory for the life of this process.

    Two servers on one state directory would each re-run the other's RUNNING jobs (and reap
    its workers). The kernel drops the lock when the process dies, however it dies; the file is
    not inherited by worker processes (Python opens files non-inheritable).
    """
    state_dir.mkdir(parents=True, exist_ok=True)
    handle = open(state_dir / "server.lock", "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise ServerConfigError(f"another server is running on the state directory {state_dir}") from None
    return handle


def _delete(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
