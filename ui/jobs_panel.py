"""The "My jobs" tab (GR-12): the caller's generation and training jobs from the engine's queue, with their state,
place in line and progress; a job started on a page that was closed is followed again here, and a finished job's
images are shown again.

`JobsHandlers` holds the work as plain methods (tests call them without a browser); `build_jobs_panel` lays out
the components. The user is always the request's login (ui/session.user_of); the engine checks ownership, and the
files shown are copies of the job's own outputs by the engine's record (ui/downloads.py), never a client path.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Iterator

import gradio as gr
import pandas as pd

from engine.core.events import Progress, Queued, TrainCheckpoint, TrainLog, TrainPreview, TrainProgress
from engine.core.jobs import JobInfo

from .downloads import copy_for_download
from .session import user_of

COLUMNS = ["when", "kind", "what", "state", "in line", "progress"]
STATUS_EVERY_S = 0.5
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def _row(j: JobInfo) -> list:
    when = time.strftime("%m-%d %H:%M", time.localtime(j.created))
    line = "" if j.position is None else ("running" if j.position == 0 else f"{j.position} before it")
    progress = f"{j.step}/{j.total}" if j.total else (f"step {j.step}" if j.step else "")
    return [when, j.kind, j.summary, j.status, line, progress]


class JobsHandlers:
    def __init__(self, engine):
        self.engine = engine

    def listing(self, user: str) -> dict[str, Any]:
        """{"table": the caller's jobs, "job": picker choices (newest first, the newest selected)}."""
        try:
            jobs = self.engine.my_jobs(user)
        except ValueError as e:
            raise gr.Error(str(e)) from None
        choices = [(j.label, j.id) for j in jobs]
        return {"table": pd.DataFrame([_row(j) for j in jobs], columns=COLUMNS),
                "job": gr.Dropdown(choices=choices, value=choices[0][1] if choices else None)}

    def follow(self, job_id: str | None, user: str) -> Iterator[dict[str, Any]]:
        """Stream a running job's progress until it ends, then show its result; a finished job's result at once."""
        if not job_id:
            raise gr.Error("pick a job from the list (press Refresh if it is empty)")
        try:
            events = self.engine.reattach(job_id, user)
            last = 0.0
            for ev in events:
                line = self._line(ev)
                if line is None:  # the job's result: read it back from the queue, as any later visit would
                    yield self.show(self.engine.job_status(job_id, user))
                    return
                now = time.monotonic()
                if line and now - last >= STATUS_EVERY_S:
                    last = now
                    yield {"status": line}
        except ValueError as e:  # unknown job (or another user's), errors of the job itself
            raise gr.Error(str(e)) from None

    def cancel(self, job_id: str | None, user: str) -> dict[str, Any]:
        """Stop one of the caller's jobs (also one whose page is gone); another user's job is not touched."""
        if not job_id:
            raise gr.Error("pick a job from the list first")
        try:
            job = self.engine.job_status(job_id, user)
        except ValueError as e:
            raise gr.Error(str(e)) from None
        if not job.open or not self.engine.cancel(job.id, user=user):
            return {"status": f"That job is not running here ({job.status}); nothing to cancel."}
        return {"status": "Cancelling: it stops within one step (a training run after saving a checkpoint)."}

    @staticmethod
    def _line(ev) -> str | None:
        """A progress line for an event ("" for one not worth showing); None for the job's result."""
        if isinstance(ev, (Progress, Queued, TrainLog)):
            return ev.message
        if isinstance(ev, TrainProgress):
            return f"step {ev.step}/{ev.total}" if ev.loss == ev.loss else "making class-prior images"
        if isinstance(ev, TrainCheckpoint):
            return f"checkpoint saved at step {ev.step}"
        if isinstance(ev, TrainPreview):
            return ""
        return None

    @staticmethod
    def show(job: JobInfo) -> dict[str, Any]:
        """A job as the tab shows it: a status line, its images and its files (copies the browser may fetch)."""
        if job.open:
            return {"status": f"**{job.kind}** · {job.status}", "gallery": None, "files": None}
        copies = copy_for_download(list(job.files))
        images = [str(p) for p in copies if p.suffix.lower() in IMAGE_SUFFIXES]
        parts = [f"**{job.kind}** · {job.status}"]
        if job.result.get("style"):
            parts.append(f"style “{job.result.get('style_name', '')}” ({job.result['style']})")
        if job.state == "interrupted" and job.kind != "train":
            parts.append("the app stopped before it finished; run it again from its tab")
        if job.files:
            parts.append(f"{len(job.files)} file(s)")
        return {"status": " · ".join(parts), "gallery": images or None, "files": [str(p) for p in copies] or None}


@dataclass
class JobsPanel:
    handlers: JobsHandlers
    components: dict
    refresh: dict  # keyword arguments for an event that refreshes the list (demo.load, tab select)


def build_jobs_panel(engine) -> JobsPanel:
    h = JobsHandlers(engine)
    gr.Markdown("Your generations and training runs, newest first. A job keeps running when you close the page: "
                "pick it here and press **Show** to follow it again or to see its images.")
    with gr.Row(equal_height=True):
        job = gr.Dropdown([], label="Job", scale=4, elem_id="jobs-pick")
        refresh = gr.Button("Refresh", scale=1, size="sm", elem_id="jobs-refresh")
        show = gr.Button("Show", variant="primary", scale=1, elem_id="jobs-show")
        stop = gr.Button("Cancel job", variant="stop", scale=1, size="sm", elem_id="jobs-cancel")
    table = gr.Dataframe(headers=COLUMNS, interactive=False, elem_id="jobs-table")
    status = gr.Markdown("", elem_id="jobs-status")
    gallery = gr.Gallery(label="Images", columns=4, height=300, format="png", elem_id="jobs-gallery")
    files = gr.File(label="Files", file_count="multiple", interactive=False)
    comps = {"job": job, "table": table, "status": status, "gallery": gallery, "files": files}

    def on_list(request: gr.Request):
        out = h.listing(user_of(engine, request))
        return out["table"], out["job"]

    def on_show(job_id, request: gr.Request):
        for update in h.follow(job_id, user_of(engine, request)):
            yield {comps[k]: v for k, v in update.items()}

    def on_cancel(job_id, request: gr.Request):
        return h.cancel(job_id, user_of(engine, request))["status"]

    listing = dict(fn=on_list, inputs=None, outputs=[table, job], queue=False, api_visibility="private")
    refresh.click(on_list, None, [table, job], api_name="my_jobs")
    # Following a job waits on the job, not on the GPU: several pages may follow at once.
    show.click(on_show, [job], [status, gallery, files], concurrency_limit=16, api_name="follow_job")
    stop.click(on_cancel, [job], [status], queue=False, api_visibility="private")
    return JobsPanel(h, comps, listing)
