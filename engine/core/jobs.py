"""A queued job as the UI sees it (RELIABILITY GR-12, TR-9): torch-free, so ui/ can read it.

States: queued → running → checkpointed(step) → done / failed / cancelled; `interrupted` when the process that
ran it died (found at the next start, engine/jobs/store.py). The rows live in <data_dir>/stylebooth.db.
"""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path

JOB_STATES = ("queued", "running", "checkpointed", "done", "failed", "cancelled", "interrupted")
OPEN_STATES = ("queued", "running", "checkpointed")  # a worker still owns the job
FINAL_STATES = ("done", "failed", "cancelled", "interrupted")


@dataclass(frozen=True)
class JobInfo:
    """One job of the queue. `result` holds names, never images: `files` are the outputs it wrote (absolute
    paths under <data_dir>/outputs/<user>/), `style` the "id@vN" it published, `run_id` its training run."""

    id: str
    user: str
    kind: str
    state: str
    request: dict = field(default_factory=dict)
    step: int = 0
    total: int = 0
    message: str = ""
    result: dict = field(default_factory=dict)
    error: str = ""
    created: float = 0.0
    started: float | None = None
    finished: float | None = None
    files: tuple[Path, ...] = ()
    position: int | None = None  # 0 running, k: k jobs run before it; None when not in this process's line
    resumable: bool = False  # an interrupted or cancelled training run that can continue from its checkpoint

    @property
    def open(self) -> bool:
        return self.state in OPEN_STATES

    @property
    def summary(self) -> str:
        """What it was, in a few words: the prompt or the style name."""
        r = self.request
        what = r.get("name") or r.get("prompt") or r.get("style") or ""
        if not what and isinstance(r.get("prompts"), list) and r["prompts"]:
            what = str(r["prompts"][0])
        return str(what)[:60]

    @property
    def label(self) -> str:
        when = dt.datetime.fromtimestamp(self.created).strftime("%m-%d %H:%M")
        return f"{when} · {self.kind} · {self.summary} · {self.status}"

    @property
    def status(self) -> str:
        if self.state == "queued":
            return "queued" + (f" ({self.position} before it)" if self.position else "")
        if self.state in ("running", "checkpointed"):
            return f"running {self.step}/{self.total}" if self.total else "running"
        if self.state == "interrupted":
            return "interrupted (app stopped)" + (": resume it in the Train tab" if self.resumable else "")
        if self.state == "failed":
            return f"failed: {self.error[:80]}"
        return self.state
