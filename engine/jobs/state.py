"""Crash-safe run state (RELIABILITY TR-9): run_dir/job.json says queued → running → checkpointed(step) →
done/failed/cancelled, so a run whose worker died is found again and offered "interrupted — resume?".

One owner per piece of state: this file is a training run's own (written by the trainer, also outside the app:
the CLI, a Ray worker's run shipped back), and says which checkpoint a resume starts from; the app's queue
(engine/jobs/store.py, the `jobs` table) owns the job's state and points to the run by its folder name."""
from __future__ import annotations

import datetime as dt
import json
import os
import socket
from pathlib import Path

from engine.core.files import atomic_write_bytes

SCHEMA_VERSION = 1
JOB_STATES = ("queued", "running", "checkpointed", "done", "failed", "cancelled")


def write_job(run_dir: Path, state: str, **info) -> dict:
    """Record queued → running → checkpointed(step) → done/failed/cancelled in run_dir/job.json, atomically."""
    if state not in JOB_STATES:
        raise ValueError(f"unknown job state {state!r}")
    path = run_dir / "job.json"
    old = read_job(run_dir) or {}
    job = dict(old, **info, state=state, schema_version=SCHEMA_VERSION, pid=os.getpid(), host=socket.gethostname(),
               updated=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"))
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, json.dumps(job, indent=1, sort_keys=True).encode())
    return job


def read_job(run_dir: Path) -> dict | None:
    """run_dir/job.json, or None when it is missing or unreadable."""
    try:
        return json.loads((run_dir / "job.json").read_text("utf-8"))
    except (OSError, ValueError):
        return None


def alive(pid: int) -> bool:
    """Whether a process with this id runs on this host."""
    if pid <= 0:  # os.kill(0 or -1, ...) would address a whole process group
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
