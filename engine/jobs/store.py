"""The job queue's table: every generation and training job, its state, progress and result (GR-12, TR-9).

One row per job in <data_dir>/stylebooth.db (the studio's and the library's database; this module alone writes
the `jobs` table). The row is the truth about a job: the UI lists and reattaches by it, and a process that starts
marks rows left open by a dead worker `interrupted` (`recover`). A training run's checkpoint facts stay in its
run_dir/job.json (engine/jobs/state.py, written by the trainer); the row points to the run by `run_id`.

Each row names its worker (host, boot, pid, process start time), so a worker that died is told from one that runs,
also when the pid was reused after a reboot or a container restart.
"""
from __future__ import annotations

import json
import os
import socket
import time
from functools import lru_cache
from pathlib import Path

from engine.core.errors import ConfigError
from engine.core.jobs import FINAL_STATES, JOB_STATES, OPEN_STATES, JobInfo
from engine.jobs.cancel import JOB_KINDS
from engine.jobs.state import alive
from engine.studio.db import StudioDB

SCHEMA_VERSION = 1
_SCHEMA = f"""
CREATE TABLE jobs (
    id       TEXT PRIMARY KEY,
    user     TEXT NOT NULL,
    kind     TEXT NOT NULL,
    state    TEXT NOT NULL CHECK (state IN ({", ".join(repr(s) for s in JOB_STATES)})),
    request  TEXT NOT NULL DEFAULT '{{}}',  -- JSON: what was asked (enough to show it and run it again)
    step     INTEGER NOT NULL DEFAULT 0,
    total    INTEGER NOT NULL DEFAULT 0,
    message  TEXT NOT NULL DEFAULT '',
    result   TEXT NOT NULL DEFAULT '{{}}',  -- JSON: files (relative to the data dir), style, run_id, ...
    error    TEXT NOT NULL DEFAULT '',
    created  REAL NOT NULL,
    started  REAL,
    finished REAL,
    updated  REAL NOT NULL,
    host     TEXT NOT NULL,
    worker   TEXT NOT NULL              -- boot id:pid:process start time (see worker_id)
);
CREATE INDEX jobs_by_user ON jobs(user, created);
CREATE INDEX jobs_open ON jobs(state) WHERE state IN ('queued', 'running', 'checkpointed')
"""
_COLS = "id, user, kind, state, request, step, total, message, result, error, created, started, finished"


def _read(path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return ""


def worker_id(pid: int) -> str | None:
    """This boot's id, the pid and the process's start time (Linux /proc); None when no such process runs.

    Elsewhere the start time is unknown and a live pid counts as the same worker."""
    if not alive(pid):
        return None
    stat = _read(f"/proc/{pid}/stat")
    start = stat.rsplit(")", 1)[-1].split()[19] if stat else "?"  # field 22, counted after the comm field
    return f"{_boot_id()}:{pid}:{start}"


@lru_cache(maxsize=1)
def _boot_id() -> str:
    return _read("/proc/sys/kernel/random/boot_id") or "?"


class JobStore:
    """The `jobs` table. Thread-safe (a connection per thread); every change is one short transaction."""

    def __init__(self, db_path: str | Path, *, clock=time.time):
        self.db = StudioDB(db_path, "jobs", SCHEMA_VERSION, _SCHEMA)
        self.data_dir = Path(db_path).parent
        self.clock = clock
        self.host = socket.gethostname()
        self.worker = worker_id(os.getpid()) or f"?:{os.getpid()}:?"

    # ---- writes: one per state change; progress is throttled by the caller (engine/jobs/runner.py) ----------
    def add(self, job_id: str, user: str, kind: str, request: dict | None = None) -> None:
        """A new job waits in the queue of this process."""
        if kind not in JOB_KINDS:
            raise ValueError(f"unknown job kind {kind!r}")
        now = self.clock()
        with self.db.write() as con:
            # The same id again (a caller retrying one request, charged once): the finished row of the same user
            # starts over; an open job or another user's is never replaced.
            cur = con.execute(
                "INSERT INTO jobs (id, user, kind, state, request, created, updated, host, worker) "
                "VALUES (?, ?, ?, 'queued', ?, ?, ?, ?, ?) ON CONFLICT(id) DO UPDATE SET kind = excluded.kind, "
                "state = 'queued', request = excluded.request, step = 0, total = 0, message = '', result = '{}', "
                "error = '', created = excluded.created, started = NULL, finished = NULL, updated = excluded.updated, "
                "host = excluded.host, worker = excluded.worker "
                f"WHERE jobs.user = excluded.user AND jobs.state IN {FINAL_STATES!r}",
                (job_id, user, kind, _json(request or {}), now, now, self.host, self.worker))
            if cur.rowcount != 1:
                raise ValueError(f"job id {job_id[:40]!r} is already in use")

    def start(self, job_id: str) -> None:
        now = self.clock()
        self._update(job_id, ("queued",), "state = 'running', started = ?, updated = ?", (now, now))

    def progress(self, job_id: str, step: int, total: int, message: str = "") -> None:
        """Where a running job is (throttled by engine/jobs/runner.ProgressRecorder)."""
        self._update(job_id, ("running", "checkpointed"), "step = ?, total = ?, message = ?, updated = ?",
                     (int(step), int(total), str(message)[:300], self.clock()))

    def checkpoint(self, job_id: str, step: int) -> None:
        """A training checkpoint at `step` is on disk: the run can resume from here (state checkpointed)."""
        self._update(job_id, ("running", "checkpointed"),
                     "state = 'checkpointed', step = ?, message = ?, updated = ?",
                     (int(step), f"checkpoint saved at step {int(step)}", self.clock()))

    def note(self, job_id: str, **result) -> None:
        """Merge facts into an open job's result while it runs (a training run's id, as soon as it has one)."""
        with self.db.write() as con:
            row = con.execute("SELECT result FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is not None:
                con.execute("UPDATE jobs SET result = ? WHERE id = ?", (_json({**json.loads(row[0]), **result}),
                                                                       job_id))

    def finish(self, job_id: str, state: str, result: dict | None = None, error: str = "") -> bool:
        """done / failed / cancelled, once: a job that already finished keeps its first ending (False)."""
        if state not in FINAL_STATES:
            raise ValueError(f"not a final job state: {state!r}")
        with self.db.write() as con:
            row = con.execute("SELECT result, state FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None or row[1] in FINAL_STATES:
                return False
            merged = {**json.loads(row[0]), **(result or {})}
            now = self.clock()
            con.execute("UPDATE jobs SET state = ?, result = ?, error = ?, finished = ?, updated = ? WHERE id = ?",
                        (state, _json(merged), str(error)[:2000], now, now, job_id))
        return True

    def recover(self) -> list[str]:
        """Mark `interrupted` every open job of this host whose worker is gone (killed app, power cut); returns
        their ids. Jobs of other hosts are left to their own host (their workers cannot be checked from here)."""
        rows = self.db.read(f"SELECT id, worker FROM jobs WHERE host = ? AND state IN {OPEN_STATES!r}", (self.host,))
        dead = [job_id for job_id, worker in rows if not self._worker_alive(worker)]
        now = self.clock()
        with self.db.write() as con:
            for job_id in dead:
                con.execute("UPDATE jobs SET state = 'interrupted', finished = ?, updated = ?, "
                            "message = 'the app stopped while this job ran or waited' "
                            f"WHERE id = ? AND state IN {OPEN_STATES!r}", (now, now, job_id))
        return dead

    @staticmethod
    def _worker_alive(worker: str) -> bool:
        try:
            pid = int(worker.split(":")[1])
        except (IndexError, ValueError):
            return False
        return worker_id(pid) == worker

    def _update(self, job_id: str, from_states: tuple[str, ...], assignments: str, args: tuple) -> None:
        with self.db.write() as con:
            con.execute(f"UPDATE jobs SET {assignments} WHERE id = ? AND state IN ({','.join('?' * len(from_states))})",
                        (*args, job_id, *from_states))

    # ---- reads -------------------------------------------------------------------------------------------
    def get(self, job_id: str) -> JobInfo | None:
        if not isinstance(job_id, str) or not job_id or len(job_id) > 64:
            return None
        rows = self.db.read(f"SELECT {_COLS} FROM jobs WHERE id = ?", (job_id,))
        return self._info(rows[0]) if rows else None

    def list(self, user: str | None = None, *, limit: int = 50) -> list[JobInfo]:
        """Newest first: `user`'s jobs, or everyone's (None)."""
        if not isinstance(limit, int) or not 1 <= limit <= 1000:
            raise ConfigError("`limit` must be a whole number from 1 to 1000")
        where, args = ("WHERE user = ?", (user,)) if user is not None else ("", ())
        rows = self.db.read(f"SELECT {_COLS} FROM jobs {where} ORDER BY created DESC, rowid DESC LIMIT ?",
                            (*args, limit))
        return [self._info(r) for r in rows]

    def _info(self, row) -> JobInfo:
        (job_id, user, kind, state, request, step, total, message, result, error, created, started,
         finished) = row
        result = json.loads(result)
        files = tuple(self._file(user, f) for f in result.get("files", ()) if isinstance(f, str))
        return JobInfo(job_id, user, kind, state, json.loads(request), step, total, message, result, error,
                       created, started, finished, tuple(f for f in files if f is not None))

    def _file(self, user: str, rel: str) -> Path | None:
        """An output file of `user`'s job: only under <data_dir>/outputs/<user>/ (a row never names another)."""
        root = (self.data_dir / "outputs" / user).resolve()
        p = (self.data_dir / rel).resolve()
        return p if p.is_relative_to(root) else None

    def relative(self, path: Path) -> str:
        """How `result.files` stores an output: relative to the data dir, so a moved data dir keeps its jobs."""
        return Path(path).resolve().relative_to(self.data_dir.resolve()).as_posix()


def _json(obj) -> str:
    return json.dumps(obj, default=str, sort_keys=True)
