"""The Engine's job-queue methods (GR-12, TR-9): a user's own jobs, one job's status, and reattaching to a job
after the browser was closed or the app restarted. A mixin of engine.api.Engine, which owns the queue
(`job_store`), the jobs running in this process (`_live`) and the fair line (`fair`)."""
from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path
from typing import Iterator

from engine.core.caller import LOCAL, Caller
from engine.core.errors import ConfigError
from engine.core.jobs import JobInfo
from engine.api.cluster import CLUSTER_KINDS
from engine.jobs.cancel import Job
from engine.jobs.records import error_state, result_record
from engine.jobs.runner import ProgressRecorder, current_frame


class JobMethods:
    @contextlib.contextmanager
    def _job(self, kind: str, user: str, job_id: str | None) -> Iterator[Job]:
        """Register the job (cancellable from now on) and record it queued, wait for its fair turn and the model,
        record it running, and run it; an error records it failed (cancelled for Cancelled).

        Its result is recorded by the outermost call that sees it (`charged`, or the worker of `iterate`: the
        thread's JobFrame); a job outside any frame is recorded done here. A job cancelled while it waits leaves
        the line at once; its body sees the set token before it touches the model and reports itself cancelled."""
        job = self.jobs.start(kind, user, job_id)
        frame = current_frame()
        if frame is not None and frame.settle is not None:
            frame = None  # a second job inside one call: it records itself
        self.job_store.add(job.id, user, kind, frame.request if frame else None)
        if frame is not None:
            frame.settle = lambda result, job_id=job.id: self._settle(job_id, result)
            frame.fail = lambda e, job_id=job.id: self._failed(job_id, e)
            if frame.live is not None:
                frame.live.job_id = job.id
                frame.live.listen(ProgressRecorder(self.job_store, job.id))
                self._live[job.id] = frame.live
                frame.closers.append(lambda job_id=job.id: self._live.pop(job_id, None))
        try:
            with self.fair.turn(user, job.id, cancelled=job.token):
                if job.token.is_set():
                    yield job
                elif self.cluster is not None and kind in CLUSTER_KINDS:  # runs on a Ray worker: no model here
                    self.job_store.start(job.id)
                    yield job
                else:
                    with self._lock:
                        self.job_store.start(job.id)
                        yield job
        except BaseException as e:
            self._failed(job.id, e)
            raise
        else:
            if frame is None:
                self.job_store.finish(job.id, "done")
        finally:
            if frame is None:
                self.jobs.finish(job)
            else:  # once its result is recorded: who waits for the job to end then finds it settled
                frame.closers.append(lambda: self.jobs.finish(job))

    def _failed(self, job_id: str, e: BaseException) -> None:
        state, message = error_state(e)
        self.job_store.finish(job_id, state, error=message)

    def _settle(self, job_id: str, result) -> None:
        """Record a finished job's result: its files (relative to the data dir), style, run; done or cancelled."""
        state, record = result_record(result, self.job_store.relative)
        self.job_store.finish(job_id, state, record)

    def _run_started(self, job_id: str, run_dir: Path, user: str) -> None:
        """A training job has its run folder: its owner and the queue row know it before any step (TR-9)."""
        self.library.set_run_owner(run_dir.name, user)
        self.job_store.note(job_id, run_id=run_dir.name)

    def my_jobs(self, user: str | Caller = LOCAL, *, limit: int = 50) -> list[JobInfo]:
        """The caller's jobs, newest first (admins and the local user: everyone's), each with its place in the
        line (queued or running here) and whether a stopped training run can resume."""
        caller = self.caller(user)
        jobs = self.job_store.list(None if caller.admin else caller.name, limit=limit)
        resumable: set[str] | None = None
        out = []
        for j in jobs:
            if resumable is None and self._may_resume(j):
                resumable = {r.run_id for r in self.resumable_runs(user=caller)}
            out.append(self._job_facts(j, resumable or set()))
        return out

    def job_status(self, job_id: str, user: str | Caller = LOCAL) -> JobInfo:
        """One job of the caller's (admins: anyone's); another user's job is as unknown as a made-up id."""
        caller = self.caller(user)
        job = self.job_store.get(job_id) if isinstance(job_id, str) else None
        if job is None or not caller.can_see(job.user):
            raise ConfigError(f"unknown job {str(job_id)[:40]!r}; pick one from your list of jobs")
        runs = {r.run_id for r in self.resumable_runs(user=caller)} if self._may_resume(job) else set()
        return self._job_facts(job, runs)

    @staticmethod
    def _may_resume(job: JobInfo) -> bool:
        return job.kind == "train" and job.state in ("interrupted", "cancelled") and bool(job.result.get("run_id"))

    def _job_facts(self, job: JobInfo, resumable_runs: set[str]) -> JobInfo:
        """What this process knows beyond the row: the job's place in line, whether its run can resume."""
        extra = {}
        if job.open:
            extra["position"] = self.fair.position(job.id)
        if self._may_resume(job):
            extra["resumable"] = job.result["run_id"] in resumable_runs
        return dataclasses.replace(job, **extra) if extra else job

    def reattach(self, job_id: str, user: str | Caller = LOCAL) -> Iterator:
        """Follow a job again after its page was closed: while it runs in this process, its latest event, the
        ones after it and its result (as the page that started it got them); once it has finished (or this
        process never ran it), its JobInfo with the stored result (files, style, run).

        Ownership is checked as in `job_status`. Files are the job's own outputs, by the queue's record, never
        a path from the client."""
        job = self.job_status(job_id, user)
        live = self._live.get(job.id)
        if live is not None and not live.finished:
            return live.follow(self._waiting(job.id, job.user), replay_last=True)
        return iter([self.job_status(job_id, user)])
