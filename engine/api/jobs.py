"""The Engine's job-queue methods (GR-12, TR-9): a user's own jobs, one job's status, and reattaching to a job
after the browser was closed or the app restarted. A mixin of engine.api.Engine, which owns the queue
(`job_store`), the jobs running in this process (`_live`) and the fair line (`fair`)."""
from __future__ import annotations

import dataclasses
from typing import Iterator

from engine.core.caller import LOCAL, Caller
from engine.core.errors import ConfigError
from engine.core.jobs import JobInfo


class JobMethods:
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
