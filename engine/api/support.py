"""Pieces the Engine's methods share: charging around a job (studio quotas), trigger words, running a job in a
worker thread for a UI that renders while it runs."""
from __future__ import annotations

import functools
import uuid
from typing import Callable, Iterator


from engine.core.caller import LOCAL, Caller
from engine.core.events import (BakeResult, BatchResult, BlendStripResult, GenerateResult)
from engine.jobs.records import request_record
from engine.jobs.runner import LiveJob, job_frame, run_job, settle
from engine.styles.store import apply_trigger


def charged(kind: str):
    """Wrap a job method: resolve the caller, check the styles it uses, reserve the price before any GPU work
    (studio mode), run, then commit on success or refund exactly once on failure or cancel (MU-2).

    kind: "generate" (generate, blend strips, batches: one unit per image), "train" (one run), "refine" (a
    refinement round of a style the caller may see: priced as one training run), "bake" (no charge; the new style
    belongs to the caller). A decorator, so the job bodies stay as they are: ownership and quotas sit
    around them, not inside."""
    def deco(fn):
        @functools.wraps(fn)
        def wrapper(self, req, *args, user: str | Caller = LOCAL, job_id: str | None = None, **kw):
            caller = self.caller(user)
            if kind != "train":
                self._check_style_refs(caller, req)
            if kind == "refine":  # only whoever may change the style refines it: say so before asking for credits
                self._style_for(caller, self.library.find_version(req.style).id, change=True)
            request_id = job_id or uuid.uuid4().hex
            price = "train" if kind == "refine" else kind  # a refinement is a (short) training run
            charged = price in ("generate", "train") and self._reserve(
                caller, price, image_count(req) if price == "generate" else 1, request_id)
            if job_id is not None:
                kw["job_id"] = job_id
            ok = False
            try:
                with job_frame(request_record(req, *args[:1])) as frame:  # the queue records what was asked
                    result = fn(self, req, *args, user=caller.name, **kw)
                    settle(frame, result)
                ok = not was_cancelled(result)
                if kind == "train":
                    self._own_training(caller, result)
                if kind == "bake" and getattr(result, "style", None) is not None and caller.name != LOCAL:
                    self.library.set_owner(result.style.id, caller.name)
                return result
            finally:
                if charged:
                    if ok:
                        self.studio.quotas.commit(request_id)
                    else:
                        self.studio.quotas.refund(request_id)
        return wrapper
    return deco


def image_count(req) -> int:
    n = getattr(req, "num_images", None)
    return int(n) if isinstance(n, int) and n > 0 else len(req.prompts) * int(getattr(req, "batch_count", 1))


def was_cancelled(result) -> bool:
    if isinstance(result, (GenerateResult, BlendStripResult)):
        return bool(result.cancelled) or not result.images
    if isinstance(result, BatchResult):
        return bool(result.cancelled) or not result.paths
    if isinstance(result, BakeResult):
        return False
    inner = getattr(result, "result", None)
    return bool(getattr(inner, "cancelled", False)) or getattr(result, "style", None) is None


def with_triggers(prompt: str, styles) -> str:
    """The prompt with every applied style's trigger word (each added only where missing; none for weight 0)."""
    for s, wu, wt in styles:
        if (wu, wt) != (0.0, 0.0):
            prompt = apply_trigger(prompt, s)
    return prompt


class StripCell:
    """Where an image goes in a one-row strip (the fields engine.generate.batch.Grid.paste reads)."""

    def __init__(self, row: int, col: int):
        self.row, self.col = row, col


def iterate(job: Callable[[Callable], object], result_type, poll: Callable[[], object] | None = None) -> Iterator:
    """Start `job(emit)` now (engine/jobs/runner.run_job); return an iterator over what it emits, then its return
    value; it re-raises the job's error.

    The job runs on when the iterator is dropped (the browser went away): its state and result go to the queue,
    and `Engine.reattach` follows it again. `poll`: asked every second while nothing was emitted; what it returns
    (if not None) is yielded (a Queued event while the job waits for its turn)."""
    live = LiveJob(result_type)
    run_job(job, live)
    return live.follow(poll)
