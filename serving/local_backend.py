"""Runs each task in its own worker process, forked from a warm fork server.

The server process never imports torch: the fork server (a separate interpreter started by
``multiprocessing``'s "forkserver" context) preloads it, and every task gets a fresh fork of
it with its own memory and time limits. Results and events come back as JSON bytes, never
pickles, so even a compromised worker cannot run code in the server.

The fork server and every worker die with the server (:mod:`metaprune.serving.fate`); with a
`registry` (the job store), their PIDs are recorded so a restarted server can end leftovers.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import threading
import time
from collections.abc import Callable
from multiprocessing import forkserver

from .fate import start_ticks
from .worker import TaskFailure, process_main

_MAX_MESSAGE = 8 << 20  # one event or result from a worker


class LocalBackend:
    """Process-per-task execution on this machine.

    Example::

        backend = LocalBackend(memory_bytes=4 << 30, threads=1)
        report = backend.run(task, on_event=print, timeout=3600.0, cancelled=threading.Event())
    """

    name = "local"

    def __init__(self, memory_bytes: int, threads: int = 1, *, warm: bool = True, registry=None):
        # RLIMIT_AS of each worker process
        self.memory_bytes = memory_bytes
        # torch threads per worker (the machine's cores are shared by the parallel workers)
        self.threads = threads
        # where worker PIDs are recorded for start-up reaping: an object with
        # record_process(pid, ticks, role) and forget_process(pid) (the JobStore), or None
        self.registry = registry
        self._context = multiprocessing.get_context("forkserver")
        # the guard makes the fork server die with this process; warm: it also preloads torch
        # and the library (see preload.py); the fork server is one per process, so the first
        # backend created decides
        self._context.set_forkserver_preload(
            ["metaprune.serving.forkserver_guard", *(["metaprune.serving.preload"] if warm else [])])
        self._recorded_forkserver: int | None = None

    def warm_up(self) -> None:
        """Start the fork server now (it preloads in the background).

        Call it from the thread that serves until the end: the fork server's parent-death
        signal fires when the thread that started it exits.
        """
        os.environ["METAPRUNE_SERVER_PID"] = str(os.getpid())
        forkserver.ensure_running()
        self._record_forkserver()

    def _record_forkserver(self) -> None:
        pid = getattr(forkserver._forkserver, "_forkserver_pid", None)
        if self.registry is not None and pid is not None and pid != self._recorded_forkserver:
            self.registry.record_process(pid, start_ticks(pid), "forkserver")
            self._recorded_forkserver = pid

    def run(self, task: dict, *, on_event: Callable[[dict], None], timeout: float,
            cancelled: threading.Event) -> dict:
        """Run `task` to completion; raises TaskFailure (code CANCELLED, RESOURCE_EXHAUSTED...)."""
        receiver, sender = self._context.Pipe(duplex=False)
        sender_bytes = _JsonSender(sender)
        process = self._context.Process(
            target=process_main, args=(task, sender_bytes, self.memory_bytes, self.threads),
            daemon=True, name=f"metaprune-{task['kind']}",
        )
        os.environ["METAPRUNE_SERVER_PID"] = str(os.getpid())  # if the fork server restarts
        try:
            process.start()
        except OSError as error:  # no fork server, no memory for a process, too many processes
            raise TaskFailure("UNAVAILABLE", f"cannot start a worker process: {error}") from None
        finally:
            sender.close()
        if self.registry is not None:
            self._record_forkserver()
            self.registry.record_process(process.pid, start_ticks(process.pid), task["kind"])
        deadline = time.monotonic() + timeout
        try:
            while True:
                if cancelled.is_set():
                    raise TaskFailure("CANCELLED", "the job was cancelled")
                if time.monotonic() > deadline:
                    raise TaskFailure("RESOURCE_EXHAUSTED",
                                      f"the job exceeded its time limit of {timeout:g} s")
                if not receiver.poll(0.1):
                    continue
                try:
                    message = json.loads(receiver.recv_bytes(_MAX_MESSAGE))
                except EOFError:
                    process.join(5)
                    raise TaskFailure(*_death_reason(process.exitcode, self.memory_bytes)) from None
                except (OSError, ValueError) as error:
                    raise TaskFailure("INTERNAL", f"unreadable message from the worker: {error}") from None
                if message[0] == "event" and isinstance(message[1], dict):
                    on_event(message[1])
                elif message[0] == "result":
                    return message[1]
                elif message[0] == "failure":
                    raise TaskFailure(str(message[1]), str(message[2]))
        finally:
            receiver.close()
            if process.is_alive():
                process.kill()
            process.join(5)
            if self.registry is not None:
                self.registry.forget_process(process.pid)


class _JsonSender:
    """The worker's end of the pipe: sends JSON bytes (the server never unpickles)."""

    def __init__(self, connection):
        self._connection = connection

    def send(self, message) -> None:
        self._connection.send_bytes(json.dumps(message, default=str).encode())

    def close(self) -> None:
        self._connection.close()


def _death_reason(exitcode: int | None, memory_bytes: int) -> tuple[str, str]:
    if exitcode is not None and exitcode < 0:
        # SIGKILL/SIGSEGV/SIGABRT usually mean the address-space limit was hit in native code
        return ("RESOURCE_EXHAUSTED",
                f"the worker process died from signal {-exitcode} (memory limit "
                f"{memory_bytes / (1 << 30):.1f} GiB or a crash while reading the input)")
    return "INTERNAL", f"the worker process exited without a result (exit code {exitcode})"
