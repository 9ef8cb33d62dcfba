"""Assembles and runs the gRPC server: PruningService, health, reflection, optional TLS.

Example::

    from metaprune.serving.server import ServerConfig, PruningServer
    server = PruningServer(ServerConfig(state_dir=Path("/tmp/state"), port=0))
    port = server.start()
    ...
    server.stop()
"""

from __future__ import annotations

import ipaddress
import logging
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from metaprune.errors import MetaPruneError

from . import limits as vocabulary
from . import pruning_pb2, pruning_pb2_grpc
from .auth import Authenticator
from .limits import Limits
from .local_backend import LocalBackend
from .scheduler import Scheduler
from .servicer import PruningServicer
from .store import JobStore

log = logging.getLogger(__name__)
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
        self.store = JobStore(config.state_dir)
        limits = config.limits
        self.validator = LocalBackend(limits.worker_memory_bytes, config.worker_threads)
        if config.ray_address:
            from .ray_backend import RayBackend  # Ray is imported only when asked for

            backend = RayBackend(config.ray_address, limits.worker_memory_bytes, config.worker_threads)
        else:
            backend = self.validator
        self.scheduler = Scheduler(self.store, backend, workers=config.workers,
                                   job_time_seconds=limits.job_time_seconds)
        self.health = health.HealthServicer()
        self._server: grpc.Server | None = None

    def start(self) -> int:
        config = self.config
        self.validator.warm_up()
        message_limit = vocabulary.MAX_MESSAGE_BYTES
        self._server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=64, thread_name_prefix="rpc"),
            options=[("grpc.max_receive_message_length", message_limit),
                     ("grpc.max_send_message_length", message_limit)],
            maximum_concurrent_rpcs=256,
        )
        servicer = PruningServicer(self.store, self.scheduler, self.validator, self.auth,
                                   config.limits, validations=max(2, config.workers))
        pruning_pb2_grpc.add_PruningServiceServicer_to_server(servicer, self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self._server)
        address = f"{config.host}:{config.port}"
        if config.tls_cert is not None:
            credentials = grpc.ssl_server_credentials(
                [(Path(config.tls_key).read_bytes(), Path(config.tls_cert).read_bytes())])
            port = self._server.add_secure_port(address, credentials)
        else:
            port = self._server.add_insecure_port(address)
        if port == 0:
            raise ServerConfigError(f"cannot bind {address}")
        self.scheduler.start()
        self._server.start()
        for name in ("", SERVICE_NAME):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        return port

    def wait(self) -> None:
        self._server.wait_for_termination()

    def stop(self, grace: float = 2.0) -> None:
        self.health.enter_graceful_shutdown()
        if self._server is not None:
            self._server.stop(grace).wait()
        self.scheduler.stop()
        self.store.close()
