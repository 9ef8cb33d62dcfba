"""Durable state of the service: a SQLite database plus an artifact folder.

Layout under the state directory::

    state.sqlite3               uploads, jobs, job events
    uploads/<id>/model.pt2      (or model.safetensors + model.json, or data.npz)
    jobs/<id>/result/           the finished job's files (model, spec, report.json)
    jobs/<id>/attempt-<n>/      where a running attempt writes; renamed to result/ on success
    incoming/                   uploads being received (deleted on failure)

Everything a restart needs is here: QUEUED and RUNNING jobs are re-queued by
:meth:`JobStore.requeue_unfinished`, and finished results stay downloadable. The worker
processes a server started are recorded (``processes``), so the next start can end any that
outlived a crash (:mod:`metaprune.serving.fate`). A row is always deleted before its folder:
a crash in between leaves a folder without a row, which :meth:`JobStore.orphan_folders` finds.
"""

from __future__ import annotations

import json
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = "QUEUED", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED"
FINISHED = (SUCCEEDED, FAILED, CANCELLED)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS uploads (
    id TEXT PRIMARY KEY, tenant TEXT NOT NULL, kind TEXT NOT NULL, format TEXT NOT NULL,
    size INTEGER NOT NULL, sha256 TEXT NOT NULL, info TEXT NOT NULL, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY, tenant TEXT NOT NULL, model_id TEXT NOT NULL, request TEXT NOT NULL,
    task TEXT NOT NULL, state TEXT NOT NULL, phase TEXT NOT NULL DEFAULT '',
    message TEXT NOT NULL DEFAULT '', error_code TEXT NOT NULL DEFAULT '',
    report TEXT NOT NULL DEFAULT '', created REAL NOT NULL, started REAL NOT NULL DEFAULT 0,
    finished REAL NOT NULL DEFAULT 0, attempts INTEGER NOT NULL DEFAULT 0);
CREATE INDEX IF NOT EXISTS jobs_by_tenant ON jobs (tenant, created);
CREATE TABLE IF NOT EXISTS events (
    job_id TEXT NOT NULL, seq INTEGER NOT NULL, time REAL NOT NULL, body TEXT NOT NULL,
    PRIMARY KEY (job_id, seq));
CREATE TABLE IF NOT EXISTS processes (
    pid INTEGER PRIMARY KEY, ticks INTEGER, role TEXT NOT NULL);
"""
# columns added after the first release: (table, column, definition); added when missing
_ADDED_COLUMNS = (
    ("jobs", "data_id", "TEXT NOT NULL DEFAULT ''"),
    ("jobs", "result_bytes", "INTEGER NOT NULL DEFAULT 0"),
    ("jobs", "request_key", "TEXT NOT NULL DEFAULT ''"),
)
_JOB_COLUMNS = ("id, tenant, model_id, request, task, state, phase, message, error_code, report, "
                "created, started, finished, attempts")


@dataclass(frozen=True)
class Upload:
    id: str
    tenant: str
    kind: str  # "model" | "data"
    format: str  # "pt2" | "safetensors" | "npz"
    size: int
    sha256: str
    info: dict
    created: float


@dataclass(frozen=True)
class JobRecord:
    id: str
    tenant: str
    model_id: str
    request: dict  # the SubmitJobRequest as JSON, echoed back to the client
    task: dict  # the validated worker options (see worker.run_prune)
    state: str
    phase: str
    message: str
    error_code: str
    report: str
    created: float
    started: float
    finished: float
    attempts: int


def new_id(prefix: str) -> str:
    """An unguessable id: knowing one tenant's ids reveals nothing about another's."""
    return f"{prefix}-{secrets.token_hex(12)}"


class JobStore:
    """Thread-safe access to the database; watchers learn of new events from listeners.

    Example::

        store = JobStore(Path("/tmp/state"))
        store.add_listener(lambda job_id: print("changed:", job_id))
        job = store.add_job("tenant", "m-1", {"model_id": "m-1"}, {"options": {}})
        store.start_attempt(job.id)
    """

    def __init__(self, root: Path):
        # folder holding the database and the artifacts
        self.root = Path(root)
        for folder in ("uploads", "jobs", "incoming"):
            (self.root / folder).mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        # called with the job id whenever an event is recorded (cheap, non-blocking callables)
        self._listeners: list[Callable[[str], None]] = []
        self._db = sqlite3.connect(self.root / "state.sqlite3", check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        for table, column, definition in _ADDED_COLUMNS:
            known = {row[1] for row in self._db.execute(f"PRAGMA table_info({table})")}
            if column not in known:
                self._db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {definition}")
        self._db.execute("CREATE INDEX IF NOT EXISTS jobs_by_key ON jobs (tenant, request_key)")
        self._db.commit()

    # --- paths -------------------------------------------------------------------------------
    def upload_dir(self, upload_id: str) -> Path:
        return self.root / "uploads" / upload_id

    def job_dir(self, job_id: str) -> Path:
        return self.root / "jobs" / job_id

    def incoming_dir(self) -> Path:
        return self.root / "incoming"

    # --- uploads -----------------------------------------------------------------------------
    def add_upload(self, upload: Upload) -> None:
        with self._lock:
            self._db.execute(
                "INSERT INTO uploads VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (upload.id, upload.tenant, upload.kind, upload.format, upload.size,
                 upload.sha256, json.dumps(upload.info), upload.created),
            )
            self._db.commit()

    def get_upload(self, upload_id: str, tenant: str, kind: str) -> Upload | None:
        """The upload, or None when unknown, of another kind, or another tenant's."""
        with self._lock:
            row = self._db.execute(
                "SELECT * FROM uploads WHERE id = ? AND tenant = ? AND kind = ?",
                (upload_id, tenant, kind),
            ).fetchone()
        if row is None:
            return None
        return Upload(*row[:6], json.loads(row[6]), row[7])

    # --- jobs --------------------------------------------------------------------------------
    def add_job(self, tenant: str, model_id: str, request: dict, task: dict, *, data_id: str = "",
                request_key: str = "") -> JobRecord:
        """Insert a QUEUED job. `request_key` (the client's idempotency key): a second submit
        with the same key from the same tenant gets the first job back instead of a new one."""
        job_id = new_id("job")
        with self._lock:
            self._db.execute(
                "INSERT INTO jobs (id, tenant, model_id, request, task, state, created, data_id, "
                "request_key) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (job_id, tenant, model_id, json.dumps(request), json.dumps(task), QUEUED, time.time(),
                 data_id, request_key),
            )
            self._record_event(job_id, {"kind": "state", "state": QUEUED})
            self._db.commit()
        return self.get_job(job_id)

    def job_for_key(self, tenant: str, request_key: str) -> JobRecord | None:
        """The tenant's job submitted with this idempotency key, if any."""
        if not request_key:
            return None
        with self._lock:
            row = self._db.execute(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE tenant = ? AND request_key = ?",
                                   (tenant, request_key)).fetchone()
        return None if row is None else _job_from_row(row)

    def get_job(self, job_id: str, tenant: str | None = None) -> JobRecord | None:
        """The job, or None when unknown or (with `tenant`) another tenant's."""
        query, args = f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id = ?", [job_id]
        if tenant is not None:
            query, args = query + " AND tenant = ?", args + [tenant]
        with self._lock:
            row = self._db.execute(query, args).fetchone()
        return None if row is None else _job_from_row(row)

    def list_jobs(self, tenant: str, state: str | None, limit: int) -> list[JobRecord]:
        query, args = f"SELECT {_JOB_COLUMNS} FROM jobs WHERE tenant = ?", [tenant]
        if state:
            query, args = query + " AND state = ?", args + [state]
        with self._lock:
            rows = self._db.execute(query + " ORDER BY created DESC LIMIT ?", [*args, limit]).fetchall()
        return [_job_from_row(row) for row in rows]

    def count_active(self) -> int:
        with self._lock:
            (count,) = self._db.execute(
                "SELECT COUNT(*) FROM jobs WHERE state IN (?, ?)", (QUEUED, RUNNING)
            ).fetchone()
        return count

    def start_attempt(self, job_id: str) -> int | None:
        """QUEUED -> RUNNING; returns the attempt number, or None if the job left QUEUED."""
        with self._lock:
            cursor = self._db.execute(
                "UPDATE jobs SET state = ?, started = ?, attempts = attempts + 1, phase = '' "
                "WHERE id = ? AND state = ?",
                (RUNNING, time.time(), job_id, QUEUED),
            )
            if cursor.rowcount == 0:
                self._db.commit()
                return None
            (attempts,) = self._db.execute("SELECT attempts FROM jobs WHERE id = ?", (job_id,)).fetchone()
            self._record_event(job_id, {"kind": "state", "state": RUNNING, "attempt": attempts})
            self._db.commit()
        self._notify(job_id)
        return attempts

    def finish(self, job_id: str, state: str, *, message: str = "", error_code: str = "",
               report: str = "", result_bytes: int = 0,
               only_from: tuple[str, ...] = (QUEUED, RUNNING)) -> bool:
        """Move an unfinished job to a final state; False if it had already finished."""
        marks = ",".join("?" * len(only_from))
        with self._lock:
            cursor = self._db.execute(
                f"UPDATE jobs SET state = ?, message = ?, error_code = ?, report = ?, finished = ?, "
                f"result_bytes = ? WHERE id = ? AND state IN ({marks})",
                (state, message, error_code, report, time.time(), result_bytes, job_id, *only_from),
            )
            done = cursor.rowcount > 0
            if done:
                self._record_event(job_id, {"kind": "state", "state": state, "message": message})
            self._db.commit()
        if done:
            self._notify(job_id)
        return done

    def requeue_unfinished(self) -> list[str]:
        """After a restart: jobs that were QUEUED or RUNNING go back to QUEUED, oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT id, state FROM jobs WHERE state IN (?, ?) ORDER BY created", (QUEUED, RUNNING)
            ).fetchall()
            for job_id, state in rows:
                if state == RUNNING:
                    self._db.execute("UPDATE jobs SET state = ? WHERE id = ?", (QUEUED, job_id))
                    self._record_event(job_id, {"kind": "state", "state": QUEUED,
                                                "message": "re-queued after a server restart"})
            self._db.commit()
        return [job_id for job_id, _ in rows]

    # --- storage: quota, expiry, orphans --------------------------------------------------------
    def tenant_bytes(self, tenant: str) -> int:
        """Bytes the tenant stores: its uploads plus its jobs' results."""
        with self._lock:
            (uploads,) = self._db.execute(
                "SELECT COALESCE(SUM(size), 0) FROM uploads WHERE tenant = ?", (tenant,)).fetchone()
            (results,) = self._db.execute(
                "SELECT COALESCE(SUM(result_bytes), 0) FROM jobs WHERE tenant = ?", (tenant,)).fetchone()
        return uploads + results

    def expire(self, *, uploads_before: float, results_before: float) -> tuple[list[str], list[str]]:
        """Delete the rows of uploads created before `uploads_before` that no unfinished job
        uses, and of jobs finished before `results_before` (with their events); returns the
        (upload ids, job ids) whose folders the caller deletes next."""
        with self._lock:
            uploads = [row[0] for row in self._db.execute(
                "SELECT id FROM uploads WHERE created < ? AND id NOT IN "
                "(SELECT model_id FROM jobs WHERE state IN (?, ?) UNION "
                " SELECT data_id FROM jobs WHERE state IN (?, ?))",
                (uploads_before, QUEUED, RUNNING, QUEUED, RUNNING))]
            jobs = [row[0] for row in self._db.execute(
                "SELECT id FROM jobs WHERE finished > 0 AND finished < ? AND state IN (?, ?, ?)",
                (results_before, *FINISHED))]
            self._db.executemany("DELETE FROM uploads WHERE id = ?", [(i,) for i in uploads])
            self._db.executemany("DELETE FROM events WHERE job_id = ?", [(i,) for i in jobs])
            self._db.executemany("DELETE FROM jobs WHERE id = ?", [(i,) for i in jobs])
            self._db.commit()
        return uploads, jobs

    def orphan_folders(self) -> list[Path]:
        """Folders under uploads/ and jobs/ without a row, and everything in incoming/: what a
        crash during an upload, a validation or a deletion leaves behind. Only safe to delete
        while no upload is being received (at start-up)."""
        with self._lock:
            uploads = {row[0] for row in self._db.execute("SELECT id FROM uploads")}
            jobs = {row[0] for row in self._db.execute("SELECT id FROM jobs")}
        found = [path for path in (self.root / "uploads").iterdir() if path.name not in uploads]
        found += [path for path in (self.root / "jobs").iterdir() if path.name not in jobs]
        return found + list(self.incoming_dir().iterdir())

    # --- worker processes ----------------------------------------------------------------------
    def record_process(self, pid: int, ticks: int | None, role: str) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO processes VALUES (?, ?, ?)", (pid, ticks, role))
            self._db.commit()

    def forget_process(self, pid: int) -> None:
        with self._lock:
            self._db.execute("DELETE FROM processes WHERE pid = ?", (pid,))
            self._db.commit()

    def recorded_processes(self) -> list[tuple[int, int | None]]:
        """(pid, start ticks) of every process a server recorded and did not forget."""
        with self._lock:
            return [(pid, ticks) for pid, ticks in self._db.execute("SELECT pid, ticks FROM processes")]

    def forget_all_processes(self) -> None:
        with self._lock:
            self._db.execute("DELETE FROM processes")
            self._db.commit()

    # --- events ------------------------------------------------------------------------------
    def add_event(self, job_id: str, event: dict) -> None:
        with self._lock:
            if event.get("kind") == "phase" and isinstance(event.get("phase"), str):
                self._db.execute("UPDATE jobs SET phase = ? WHERE id = ?", (event["phase"][:200], job_id))
            self._record_event(job_id, event)
            self._db.commit()
        self._notify(job_id)

    def add_listener(self, listener: Callable[[str], None]) -> None:
        """Call `listener(job_id)` after each recorded event (from the recording thread)."""
        self._listeners.append(listener)

    def _notify(self, job_id: str) -> None:
        for listener in self._listeners:
            listener(job_id)

    def events_after(self, job_id: str, seq: int, limit: int = 500) -> list[tuple[int, float, dict]]:
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, time, body FROM events WHERE job_id = ? AND seq > ? ORDER BY seq LIMIT ?",
                (job_id, seq, limit),
            ).fetchall()
        return [(seq, at, json.loads(body)) for seq, at, body in rows]

    def _record_event(self, job_id: str, event: dict) -> None:
        if "state" not in event:  # every event carries the job's state when it was recorded
            row = self._db.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
            event = {**event, "state": row[0] if row else RUNNING}
        (last,) = self._db.execute(
            "SELECT COALESCE(MAX(seq), 0) FROM events WHERE job_id = ?", (job_id,)
        ).fetchone()
        self._db.execute(
            "INSERT INTO events VALUES (?, ?, ?, ?)", (job_id, last + 1, time.time(), json.dumps(event))
        )

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _job_from_row(row) -> JobRecord:
    (job_id, tenant, model_id, request, task, state, phase, message, error_code, report,
     created, started, finished, attempts) = row
    return JobRecord(job_id, tenant, model_id, json.loads(request), json.loads(task), state, phase,
                     message, error_code, report, created, started, finished, attempts)
