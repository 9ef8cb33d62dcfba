"""Worker processes share the server's fate: they die with it, and a restarted server ends any
that a previous instance left behind before it re-runs their jobs.

Two mechanisms, because either alone has a gap:

* **Parent-death signals.** The fork server asks the kernel for SIGKILL when the server dies
  (``PR_SET_PDEATHSIG``, set by :mod:`metaprune.serving.forkserver_guard` as the fork server
  starts), and every worker asks for the same when the fork server dies. Without the first, a
  SIGKILLed server leaves a fork server that waits for its workers, which hold the fork server's
  "alive" pipe open, so both run on (issue 16). The kernel sends the signal when the *thread*
  that started the child exits, so the fork server must be started by a thread that lives as
  long as the server (``LocalBackend.warm_up`` is called from the thread that serves).
* **Recorded processes.** The server records the PID and kernel start time of the fork server
  and of each worker in the job store; at start-up :func:`reap` SIGKILLs every recorded process
  that still runs (the start time tells a reused PID apart) and waits until it is gone, so a job
  never runs twice at once.

Example::

    die_with_parent(expected_parent=os.getppid())      # in a child, first thing
    ticks = start_ticks(os.getpid())                    # (pid, ticks) identifies a process
    reap([(pid, ticks)], timeout=5.0)                   # after a crash: end the leftovers
"""

from __future__ import annotations

import ctypes
import os
import signal
import time
from collections.abc import Iterable

_PR_SET_PDEATHSIG = 1


def die_with_parent(expected_parent: int | None = None) -> None:
    """SIGKILL this process when its parent dies; exit now if the parent is already gone.

    `expected_parent` closes the race between fork and prctl: if the parent died in between,
    this process was re-parented and no signal would ever come.
    """
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:  # not Linux/glibc: start-up reaping still ends leftovers
        return
    if expected_parent is not None and os.getppid() != expected_parent:
        os._exit(1)


def start_ticks(pid: int) -> int | None:
    """The process's start time (clock ticks since boot, /proc/PID/stat field 22), or None if
    it is gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    # fields[0] is field 3 (state); field 22 is fields[19]
    return None if fields[0] in ("Z", "X") else int(fields[19])


def is_running(pid: int, ticks: int | None) -> bool:
    """True when `pid` still runs and is the same process (same start time)."""
    now = start_ticks(pid)
    return now is not None and (ticks is None or now == ticks)


def reap(processes: Iterable[tuple[int, int | None]], *, timeout: float = 5.0) -> list[int]:
    """SIGKILL each recorded (pid, start ticks) that still runs; wait until all are gone.

    Returns the PIDs that were killed. Raises TimeoutError if one survives `timeout` seconds
    (a process stuck in the kernel), since re-running its job then could run it twice.
    """
    killed = []
    for pid, ticks in processes:
        if pid != os.getpid() and is_running(pid, ticks):
            try:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            except (ProcessLookupError, PermissionError):
                continue
    deadline = time.monotonic() + timeout
    for pid in killed:
        while start_ticks(pid) is not None:
            _collect(pid)
            if time.monotonic() > deadline:
                raise TimeoutError(f"process {pid} of a previous server survives SIGKILL")
            time.sleep(0.02)
    return killed


def descendants(pid: int) -> list[int]:
    """PIDs of every living process below `pid` (children, their children, ...)."""
    children: dict[int, list[int]] = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as stat:
                parent = int(stat.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(parent, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _collect(pid: int) -> None:
    """Reap the zombie if `pid` happens to be our own child (e.g. in tests)."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass
