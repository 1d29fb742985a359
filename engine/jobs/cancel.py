"""Per-job cancel tokens: Cancel in one tab stops that tab's job, and only that one.

Each piece of model work (a generation, a training run with its prior images) is registered as a `Job` with its
own `CancelToken` the moment it is asked for, before it waits for the model lock, so a Cancel pressed while it
still waits is not lost. The sampler's step callback and the trainer's step loop check the token.
"""
from __future__ import annotations

import threading
import uuid
from dataclasses import dataclass, field

from engine.core.errors import Cancelled

JOB_KINDS = ("generate", "train", "batch", "blend", "refine")


class CancelToken(threading.Event):
    """A threading.Event that the job polls; `set()` (or `cancel()`) asks it to stop at its next step."""

    def cancel(self) -> None:
        self.set()

    def check(self) -> None:
        """Raise Cancelled if the job was asked to stop (called once per denoising or training step)."""
        if self.is_set():
            raise Cancelled()


@dataclass(frozen=True)
class Job:
    kind: str
    user: str
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    token: CancelToken = field(default_factory=CancelToken, compare=False, repr=False)


class JobRegistry:
    """The jobs that are queued or running in this process, by id. Thread-safe."""

    def __init__(self):
        self._lock = threading.Condition()  # notified whenever a job finishes
        self._jobs: dict[str, Job] = {}

    def start(self, kind: str, user: str, job_id: str | None = None) -> Job:
        if kind not in JOB_KINDS:
            raise ValueError(f"unknown job kind {kind!r}")
        job = Job(kind, user, job_id) if job_id else Job(kind, user)
        with self._lock:
            if job.id in self._jobs:
                raise ValueError(f"job id {job.id!r} is already in use")
            self._jobs[job.id] = job
        return job

    def finish(self, job: Job) -> None:
        with self._lock:
            self._jobs.pop(job.id, None)
            self._lock.notify_all()

    def wait_until_done(self, *, kind: str | None = None, user: str | None = None, timeout: float) -> bool:
        """Block until no job matching the filters is queued or running (True), or `timeout` seconds pass (False)."""
        with self._lock:
            return self._lock.wait_for(lambda: not self._match(None, kind, user), timeout=timeout)

    def running(self) -> list[Job]:
        with self._lock:
            return list(self._jobs.values())

    def cancel(self, job_id: str | None = None, *, kind: str | None = None, user: str | None = None) -> int:
        """Cancel the jobs matching every filter given (none given: all jobs); returns how many were asked."""
        with self._lock:
            hits = self._match(job_id, kind, user)
        for j in hits:
            j.token.cancel()
        return len(hits)

    def _match(self, job_id: str | None, kind: str | None, user: str | None) -> list[Job]:
        return [j for j in self._jobs.values() if (job_id is None or j.id == job_id)
                and (kind is None or j.kind == kind) and (user is None or j.user == user)]
