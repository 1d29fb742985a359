"""Crash-safe job state (RELIABILITY TR-9): run_dir/job.json says queued → running → checkpointed(step) →
done/failed/cancelled, so a run whose worker died is found again and offered "interrupted — resume?"."""
from __future__ import annotations

import datetime as dt
import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path

from .checkpoints import SCHEMA_VERSION, latest_step
from .safety import atomic_write_bytes

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
    try:
        return json.loads((run_dir / "job.json").read_text("utf-8"))
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    if pid <= 0:  # os.kill(0 or -1, ...) would address a whole process group
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass(frozen=True)
class InterruptedRun:
    """A run whose worker died while it was running: offer "interrupted — resume?"."""

    run_dir: Path
    step: int
    last_checkpoint: int | None
    config: dict  # the TrainConfig as a dict: TrainConfig(**config) resumes it


def find_interrupted_runs(runs_dir: Path) -> list[InterruptedRun]:
    """Runs left `running`/`checkpointed` whose worker process is gone (on this host)."""
    found = []
    for job_file in sorted(Path(runs_dir).glob("*/job.json")):
        job = read_job(job_file.parent)
        if not job or job.get("state") not in ("running", "checkpointed"):
            continue
        if job.get("host") == socket.gethostname() and _alive(int(job.get("pid", -1))):
            continue  # still training
        found.append(InterruptedRun(job_file.parent, int(job.get("step", 0)),
                                    latest_step(job_file.parent / "checkpoints"), job.get("config", {})))
    return found
