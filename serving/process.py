"""Runs the `metaprune serve` command as a child process on 127.0.0.1 with an ephemeral port.

Used by the tests, the demo and the load benchmark: the server lives in its own process, so it
can be killed (SIGKILL) and restarted on the same state directory, and its resident memory can
be read from /proc.

Example::

    with ServerProcess(Path("/tmp/state")) as server:
        client = PruningClient(server.address)
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path


class ServerProcess:
    """A `metaprune serve --port 0` child process."""

    def __init__(self, state_dir: Path, *, args: tuple[str, ...] = (), startup_timeout: float = 60.0,
                 nice: int = 0, env: dict[str, str] | None = None):
        # the server's --state-dir (kept across restarts)
        self.state_dir = Path(state_dir)
        # niceness of the server and its workers (benchmarks on a shared machine)
        self.nice = nice
        # environment variables added to the server's (e.g. RAY_AUTH_TOKEN_PATH)
        self.env = dict(env or {})
        # extra `metaprune serve` options (limits, --tokens, --workers ...)
        self.args = tuple(args)
        # seconds to wait for the port to be bound
        self.startup_timeout = startup_timeout
        self.process: subprocess.Popen | None = None
        self.port: int | None = None
        self.log_path = self.state_dir.parent / f"{self.state_dir.name}-server.log"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.process.pid

    def start(self) -> "ServerProcess":
        self.state_dir.mkdir(parents=True, exist_ok=True)
        port_file = self.state_dir.parent / f"{self.state_dir.name}.port"
        port_file.unlink(missing_ok=True)
        # `metaprune serve`'s own module: the same handler, without the other commands' imports;
        # a restart binds the port of the first start, so clients can reconnect
        command = [sys.executable, "-m", "metaprune.cli.serve_cmd", "--host", "127.0.0.1",
                   "--port", str(self.port or 0),
                   "--state-dir", str(self.state_dir), "--port-file", str(port_file), *self.args]
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                            env={**os.environ, **self.env},
                                            preexec_fn=(lambda: os.nice(self.nice)) if self.nice else None)
        deadline = time.monotonic() + self.startup_timeout
        while not port_file.exists():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the server did not start; its log:\n{self.log()[-3000:]}")
            time.sleep(0.05)
        self.port = int(port_file.read_text())
        return self

    def restart(self) -> "ServerProcess":
        """SIGKILL the server (a crash) and start it again on the same state and port."""
        self.kill()
        return self.start()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def rss_bytes(self) -> int:
        """Resident memory of the server process (VmRSS)."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS line")

    def kill(self) -> None:
        """SIGKILL, as a crash would: no clean-up runs in the server."""
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(10)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.kill()

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
