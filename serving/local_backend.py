"""Runs each task in its own worker process, forked from a warm fork server.

The server process never imports torch: the fork server (a separate interpreter started by
``multiprocessing``'s "forkserver" context) preloads it, and every task gets a fresh fork of
it with its own memory and time limits. Results and events come back as JSON bytes, never
pickles, so even a compromised worker cannot run code in the server.
"""

from __future__ import annotations

import json
import multiprocessing
import threading
import time
from collections.abc import Callable

from .worker import TaskFailure, process_main

_MAX_MESSAGE = 8 << 20  # one event or result from a worker


class LocalBackend:
    """Process-per-task execution on this machine.

    Example::

        backend = LocalBackend(memory_bytes=4 << 30, threads=1)
        report = backend.run(task, on_event=print, timeout=3600.0, cancelled=threading.Event())
    """

    name = "local"

    def __init__(self, memory_bytes: int, threads: int = 1, *, warm: bool = True):
        # RLIMIT_AS of each worker process
        self.memory_bytes = memory_bytes
        # torch threads per worker (the machine's cores are shared by the parallel workers)
        self.threads = threads
        self._context = multiprocessing.get_context("forkserver")
        # warm: the fork server preloads torch and the library (see preload.py); the fork
        # server is one per process, so the first backend created decides
        self._context.set_forkserver_preload(["metaprune.serving.preload"] if warm else [])

    def warm_up(self) -> None:
        """Start the fork server in the background so the first task does not wait for it."""
        from multiprocessing import forkserver

        threading.Thread(target=forkserver.ensure_running, daemon=True, name="forkserver").start()

    def run(self, task: dict, *, on_event: Callable[[dict], None], timeout: float,
            cancelled: threading.Event) -> dict:
        """Run `task` to completion; raises TaskFailure (code CANCELLED, RESOURCE_EXHAUSTED...)."""
        receiver, sender = self._context.Pipe(duplex=False)
        sender_bytes = _JsonSender(sender)
        process = self._context.Process(
            target=process_main, args=(task, sender_bytes, self.memory_bytes, self.threads),
            daemon=True, name=f"metaprune-{task['kind']}",
        )
        try:
            process.start()
        except OSError as error:  # no fork server, no memory for a process, too many processes
            raise TaskFailure("UNAVAILABLE", f"cannot start a worker process: {error}") from None
        finally:
            sender.close()
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
