"""Durable state of the service: a SQLite database plus an artifact folder.

Layout under the state directory::

    state.sqlite3               uploads, jobs, job events
    uploads/<id>/model.pt2      (or model.safetensors + model.json, or data.npz)
    jobs/<id>/result/           the finished job's files (model, spec, report.json)
    jobs/<id>/attempt-<n>/      where a running attempt writes; renamed to result/ on success
    incoming/                   uploads being received (deleted on failure)

Everything a restart needs is here: QUEUED and RUNNING jobs are re-queued by
:meth:`JobStore.requeue_unfinished`, and finished results stay downloadable.
"""

from __future__ import annotations

import json
import secrets
import sqlite3
import threading
import time
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
"""


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
    """Thread-safe access to the database; watchers wait on :attr:`changed` for new events.

    Example::

        store = JobStore(Path("/tmp/state"))
        job = store.add_job("tenant", "m-1", {"model_id": "m-1"}, {"options": {}})
        store.set_state(job.id, RUNNING)
    """

    def __init__(self, root: Path):
        # folder holding the database and the artifacts
        self.root = Path(root)
        for folder in ("uploads", "jobs", "incoming"):
            (self.root / folder).mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        # notified whenever an event is recorded or a job changes state
        self.changed = threading.Condition(self._lock)
        self._db = sqlite3.connect(self.root / "state.sqlite3", check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
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
    def add_job(self, tenant: str, model_id: str, request: dict, task: dict) -> JobRecord:
        job_id = new_id("job")
        with self._lock:
            self._db.execute(
                "INSERT INTO jobs (id, tenant, model_id, request, task, state, created) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (job_id, tenant, model_id, json.dumps(request), json.dumps(task), QUEUED, time.time()),
            )
            self._record_event(job_id, {"kind": "state", "state": QUEUED})
            self._db.commit()
        return self.get_job(job_id)

    def get_job(self, job_id: str, tenant: str | None = None) -> JobRecord | None:
        """The job, or None when unknown or (with `tenant`) another tenant's."""
        query, args = "SELECT * FROM jobs WHERE id = ?", [job_id]
        if tenant is not None:
            query, args = query + " AND tenant = ?", args + [tenant]
        with self._lock:
            row = self._db.execute(query, args).fetchone()
        return None if row is None else _job_from_row(row)

    def list_jobs(self, tenant: str, state: str | None, limit: int) -> list[JobRecord]:
        query, args = "SELECT * FROM jobs WHERE tenant = ?", [tenant]
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
            self.changed.notify_all()
        return attempts

    def finish(self, job_id: str, state: str, *, message: str = "", error_code: str = "",
               report: str = "", only_from: tuple[str, ...] = (QUEUED, RUNNING)) -> bool:
        """Move an unfinished job to a final state; False if it had already finished."""
        marks = ",".join("?" * len(only_from))
        with self._lock:
            cursor = self._db.execute(
                f"UPDATE jobs SET state = ?, message = ?, error_code = ?, report = ?, finished = ? "
                f"WHERE id = ? AND state IN ({marks})",
                (state, message, error_code, report, time.time(), job_id, *only_from),
            )
            done = cursor.rowcount > 0
            if done:
                self._record_event(job_id, {"kind": "state", "state": state, "message": message})
            self._db.commit()
            self.changed.notify_all()
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

    # --- events ------------------------------------------------------------------------------
    def add_event(self, job_id: str, event: dict) -> None:
        with self._lock:
            if event.get("kind") == "phase" and isinstance(event.get("phase"), str):
                self._db.execute("UPDATE jobs SET phase = ? WHERE id = ?", (event["phase"][:200], job_id))
            self._record_event(job_id, event)
            self._db.commit()
            self.changed.notify_all()

    def events_after(self, job_id: str, seq: int, limit: int = 500) -> list[tuple[int, float, dict]]:
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, time, body FROM events WHERE job_id = ? AND seq > ? ORDER BY seq LIMIT ?",
                (job_id, seq, limit),
            ).fetchall()
        return [(seq, at, json.loads(body)) for seq, at, body in rows]

    def _record_event(self, job_id: str, event: dict) -> None:
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
