"""Runs jobs on a Ray cluster instead of local worker processes (`metaprune serve --ray-address`).

**Warm and isolated.** The back-end keeps one Ray actor per dispatcher (a "job host"). Each
host runs a :class:`LocalBackend` of its own on its node: a fork server that preloaded torch and
the library, from which every job gets a fresh forked process with the limits of the local
back-end (RLIMIT_AS, no core dumps, the job's time limit; a cancel kills the process; the
process dies with the host, the host with the server, since Ray ends the actors of a dead
driver). A job therefore starts in milliseconds instead of a cold Ray worker's seconds, and
nothing a job does survives it. Files travel as bytes, so the cluster needs no disk shared with
the server; the server polls the host for the job's events.

**Connecting.** ``--ray-address local`` starts a private single-node Ray bound to 127.0.0.1.
Any other address goes to ``ray.init(address=...)``. A ``HOST:PORT`` address is first checked
with one gRPC call to the cluster's GCS: a cluster with token authentication (``ray start``
enables it when a token exists; Ray >= 2.59) gets the token Ray itself would send
(``RAY_AUTH_TOKEN``, else the file ``RAY_AUTH_TOKEN_PATH``, else ``~/.ray/auth_token``) and token
mode is switched on for this process (as ``RAY_AUTH_MODE=token`` would); a missing or refused
token, or no cluster at all, is one line of :class:`RayConnectError`, not Ray's retry log.

Example::

    backend = RayBackend("127.0.0.1:6379", memory_bytes=4 << 30, threads=1, hosts=2)
    report = backend.run(task, on_event=print, timeout=3600.0, cancelled=threading.Event())
"""

from __future__ import annotations

import os
import queue
import tempfile
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from pathlib import Path

from metaprune.errors import MetaPruneError

from .worker import TaskFailure

_POLL_SECONDS = 0.2
# the host enforces the job's time limit; the server waits this much longer for its answer
_HOST_GRACE_SECONDS = 30.0


class RayConnectError(MetaPruneError):
    """The Ray cluster cannot be used (not there, or it refused our authentication)."""


def ray_auth_token() -> tuple[str | None, str]:
    """The token Ray would send, and where it came from (Ray's own order of precedence)."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip(), "RAY_AUTH_TOKEN"
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    try:
        token = path.read_text().strip()
    except OSError:
        return None, str(path)
    return token or None, str(path)


def _gcs_answer(address: str, token: str | None) -> str:
    """Status name of one cheap GCS call (GetClusterId) to `address`, with `token` if given."""
    import grpc

    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    with grpc.insecure_channel(address) as channel:
        call = channel.unary_unary("/ray.rpc.NodeInfoGcsService/GetClusterId",
                                   request_serializer=bytes, response_deserializer=bytes)
        try:
            call(b"", metadata=metadata, timeout=10)
        except grpc.RpcError as error:
            return error.code().name
    return "OK"


def prepare_authentication(address: str) -> None:
    """Check a "HOST:PORT" cluster before Ray is imported (Ray reads RAY_AUTH_MODE once, when
    it loads); switch token mode on when the cluster needs it.

    Raises RayConnectError with one line that says what to do.
    """
    answer = _gcs_answer(address, None)
    if answer == "OK":
        return
    if answer != "UNAUTHENTICATED":
        raise RayConnectError(f"no Ray cluster answers at {address} ({answer}); start one with "
                              f"`ray start --head --node-ip-address 127.0.0.1 --port PORT`")
    token, source = ray_auth_token()
    if token is None:
        raise RayConnectError(
            f"the Ray cluster at {address} requires token authentication and no token was found "
            f"(RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or {source}); `ray get-auth-token` on its head "
            "prints it")
    if _gcs_answer(address, token) != "OK":
        raise RayConnectError(f"the Ray cluster at {address} refused the authentication token from "
                              f"{source}; give the cluster's token (`ray get-auth-token` on its head)")
    os.environ["RAY_AUTH_MODE"] = "token"


class _JobHost:
    """A warm Ray actor: runs each job in a process forked from its own fork server."""

    def __init__(self, memory_bytes: int, threads: int):
        import importlib.machinery
        import sys

        from .local_backend import LocalBackend

        # multiprocessing re-runs the parent's __main__ in each child; here that is Ray's
        # default_worker.py (~0.5 s of imports per job). A name ending in ".__main__" makes the
        # child skip it; our job processes need nothing from it.
        sys.modules["__main__"].__spec__ = importlib.machinery.ModuleSpec("metaprune.serving.__main__", None)
        self._backend = LocalBackend(memory_bytes, threads, warm=True)
        self._backend.warm_up()
        self._events: dict[str, deque] = {}
        self._cancel: dict[str, threading.Event] = {}
        # names this host in the job's events, so a client can see that hosts are reused
        self._name = f"ray-job-host-{uuid.uuid4().hex[:8]}"

    def pid(self) -> int:
        return os.getpid()

    def run(self, key: str, task: dict, files: dict[str, bytes], timeout: float) -> dict:
        events = self._events.setdefault(key, deque())
        events.append({"kind": "log", "message": f"running on {self._name} (a fresh process forked "
                       "from its warm fork server)"})
        cancelled = self._cancel.setdefault(key, threading.Event())
        with tempfile.TemporaryDirectory(prefix="metaprune-ray-") as folder:
            local = Path(folder)
            for name, payload in files.items():
                (local / Path(name).name).write_bytes(payload)
            task = dict(task, out_dir=str(local / "out"))
            for key_name in ("model_path", "data"):
                if task.get(key_name) and Path(task[key_name]).name in files:
                    task[key_name] = str(local / Path(task[key_name]).name)
            try:
                report = self._backend.run(task, on_event=events.append, timeout=timeout,
                                           cancelled=cancelled)
            except TaskFailure as failure:
                return {"failure": [failure.code, failure.message]}
            finally:
                self._cancel.pop(key, None)
            outputs = {path.name: path.read_bytes() for path in (local / "out").iterdir() if path.is_file()}
        return {"result": report, "files": outputs}

    def drain(self, key: str, last: bool = False) -> list[dict]:
        events = self._events.pop(key, deque()) if last else self._events.get(key, deque())
        return [events.popleft() for _ in range(len(events))]

    def cancel(self, key: str) -> None:
        flag = self._cancel.setdefault(key, threading.Event())  # also before run() began
        flag.set()


class RayBackend:
    """`hosts` warm job hosts on a Ray cluster; `run` has the LocalBackend's contract."""

    name = "ray"

    def __init__(self, address: str, memory_bytes: int, threads: int = 1, hosts: int = 1,
                 num_cpus: int | None = None):
        # "local" (a private cluster on 127.0.0.1) or an address for ray.init
        self.address = address
        # RLIMIT_AS of each job's process
        self.memory_bytes = memory_bytes
        # torch threads inside the job (and CPUs a host reserves on the cluster)
        self.threads = threads
        if address not in ("local", "auto") and ":" in address and "://" not in address:
            prepare_authentication(address)
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        import ray  # here: after the authentication mode is settled

        if address == "local":
            ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=False,
                     _node_ip_address="127.0.0.1", log_to_driver=False, configure_logging=False)
        else:
            try:
                ray.init(address=address, log_to_driver=False, configure_logging=False)
            except (ConnectionError, RuntimeError, ray.exceptions.RayError) as error:
                raise RayConnectError(f"cannot connect to the Ray cluster at {address}: "
                                      f"{str(error).splitlines()[0][:300]}") from None
        self._actor = ray.remote(num_cpus=threads, max_concurrency=4)(_JobHost)
        self._idle: queue.Queue = queue.Queue()
        for _ in range(hosts):
            self._idle.put(self._new_host())

    def _new_host(self):
        return self._actor.remote(self.memory_bytes, self.threads)

    @staticmethod
    def _ray():
        import ray

        return ray

    def warm_up(self) -> None:
        """Nothing here: each host warms its own fork server when it starts."""

    def run(self, task: dict, *, on_event: Callable[[dict], None], timeout: float,
            cancelled: threading.Event) -> dict:
        files = {}
        for key_name in ("model_path", "data"):
            path = task.get(key_name)
            if path and Path(path).is_file():
                files[Path(path).name] = Path(path).read_bytes()
                if key_name == "model_path" and Path(path).suffix == ".safetensors":
                    files[Path(path).with_suffix(".json").name] = Path(path).with_suffix(".json").read_bytes()
        host = self._idle.get()
        key = uuid.uuid4().hex
        try:
            outcome = self._follow(host, key, host.run.remote(key, task, files, timeout),
                                   on_event, timeout, cancelled)
        except TaskFailure:
            host = self._replace_if_dead(host)
            raise
        finally:
            self._idle.put(host)
        if "failure" in outcome:
            raise TaskFailure(*outcome["failure"])
        out_dir = Path(task["out_dir"])
        out_dir.mkdir(parents=True, exist_ok=True)
        for name, payload in outcome["files"].items():
            (out_dir / Path(name).name).write_bytes(payload)
        return outcome["result"]

    def _follow(self, host, key, reference, on_event, timeout, cancelled) -> dict:
        ray = self._ray()
        deadline = time.monotonic() + timeout + _HOST_GRACE_SECONDS
        cancel_sent = False
        try:
            while True:
                ready, _ = ray.wait([reference], timeout=_POLL_SECONDS)
                for event in ray.get(host.drain.remote(key, bool(ready))):
                    on_event(event)
                if ready:
                    return ray.get(reference)
                if cancelled.is_set() and not cancel_sent:
                    host.cancel.remote(key)  # the host kills the job's process and answers
                    cancel_sent = True
                if time.monotonic() > deadline:  # the host did not stop it: stop it now
                    host.cancel.remote(key)
                    raise TaskFailure("RESOURCE_EXHAUSTED", f"the job exceeded its time limit of {timeout:g} s")
        except ray.exceptions.RayError as error:
            raise TaskFailure("INTERNAL", f"the Ray job host failed: {str(error)[:500]}") from None

    def _replace_if_dead(self, host):
        ray = self._ray()
        try:
            ray.get(host.pid.remote(), timeout=10)
            return host
        except ray.exceptions.RayError:
            ray.kill(host)
            return self._new_host()
