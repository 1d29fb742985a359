"""Running a queued job's body and following it (GR-12): the seam between the queue and whatever runs the work.

`run_job(body, live)` is the one place where a job's body is executed: today in a daemon thread of this process;
a cluster backend (engine/cluster, Ray) replaces that thread by a remote task and feeds the same `LiveJob` with
the events it receives. Everything else reads the queue (engine/jobs/store.py) or follows a `LiveJob`.

A `LiveJob` keeps a job's recent events and its result in memory while it runs, so any number of followers can
come and go: the page that started it, and a page that reattaches after the browser was closed. A follower that
leaves (Gradio closes its generator) changes nothing for the job.
"""
from __future__ import annotations

import collections
import contextlib
import threading
import time
from typing import Callable, Iterator

from engine.core.events import Progress, TrainCheckpoint, TrainProgress

KEEP_EVENTS = 256  # recent events kept for a follower that reattaches or lags (a preview every few steps: small)


class LiveJob:
    """A running job's event stream, for many followers. Thread-safe."""

    def __init__(self, result_type):
        self.result_type = result_type
        self.job_id: str | None = None  # known once the job is registered (Engine._job)
        self._cond = threading.Condition()
        self._events: collections.deque = collections.deque(maxlen=KEEP_EVENTS)
        self._seq = 0  # number of events emitted so far
        self._listeners: list[Callable] = []
        self._end: tuple[str, object] | None = None  # ("result", value) or ("error", exception)

    def listen(self, fn: Callable) -> None:
        """Call `fn(event)` for every later event, in the job's thread (the progress recorder)."""
        self._listeners.append(fn)

    def emit(self, ev) -> None:
        for fn in list(self._listeners):
            fn(ev)
        with self._cond:
            self._seq += 1
            self._events.append((self._seq, ev))
            self._cond.notify_all()

    def end(self, kind: str, value) -> None:
        with self._cond:
            self._end = (kind, value)
            self._cond.notify_all()

    @property
    def finished(self) -> bool:
        return self._end is not None

    def follow(self, poll: Callable[[], object] | None = None, *, replay_last: bool = False) -> Iterator:
        """Yield the job's events from now on (`replay_last`: the latest one first), then its result; re-raise its
        error. `poll` is asked every second while nothing happens (a Queued event while the job waits)."""
        with self._cond:
            seen = self._seq - (1 if replay_last and self._events else 0)
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._seq > seen or self._end is not None, timeout=1.0)
                fresh = [(s, ev) for s, ev in self._events if s > seen]
                end = self._end if not fresh else None
            for s, ev in fresh:
                seen = s
                yield ev
            if end is not None:
                if end[0] == "error":
                    raise end[1]
                yield end[1]
                return
            if not fresh and poll is not None:
                waiting = poll()
                if waiting is not None:
                    yield waiting


class JobFrame:
    """What the outermost job call in a thread knows: the request to record, the LiveJob its events go to, and
    what to do with the result (set by Engine._job once the job has an id)."""

    def __init__(self, request: dict | None = None, live: LiveJob | None = None):
        self.request = request or {}
        self.live = live
        self.settle: Callable[[object], None] | None = None  # record the result in the queue
        self.fail: Callable[[BaseException], None] | None = None
        self.closers: list[Callable[[], None]] = []
        self.settled = False


_local = threading.local()


def current_frame() -> JobFrame | None:
    return getattr(_local, "frame", None)


@contextlib.contextmanager
def job_frame(request: dict | None = None, live: LiveJob | None = None) -> Iterator[JobFrame]:
    """Open the thread's frame, or join the one already open (the iterate worker around a charged method)."""
    outer = current_frame()
    if outer is not None:
        if request:
            outer.request = {**outer.request, **request}
        yield outer
        return
    frame = _local.frame = JobFrame(request, live)
    try:
        yield frame
    except BaseException as e:
        if frame.fail is not None and not frame.settled:
            frame.fail(e)
        raise
    finally:
        _local.frame = None
        for close in frame.closers:
            close()


def settle(frame: JobFrame, result) -> None:
    """Record the job's result in the queue once (the outermost caller that sees it)."""
    if frame.settle is not None and not frame.settled:
        frame.settled = True
        frame.settle(result)


def run_job(body: Callable[[Callable], object], live: LiveJob) -> None:
    """THE seam: execute a job's body, with `live.emit` for its events; its result or error ends `live`.

    Runs the body in a daemon thread of this process. The queue row is written by the body's own Engine._job
    (queued → running → ...) and the result by `settle`, before `live` ends, so a follower that finds the job
    finished in memory also finds it finished in the database."""
    def work():
        try:
            with job_frame(live=live) as frame:
                result = body(live.emit)
                settle(frame, result)
        except BaseException as e:  # noqa: BLE001 - handed to the followers, who re-raise it
            live.end("error", e)
        else:
            live.end("result", result)

    threading.Thread(target=work, daemon=True, name="stylebooth-job").start()


class ProgressRecorder:
    """Writes a job's progress to the queue at most every `every_s` seconds (a step is not a transaction), but
    every checkpoint at once: it is what a resume starts from."""

    def __init__(self, store, job_id: str, every_s: float = 2.0, clock=time.monotonic):
        self.store, self.job_id, self.every_s, self.clock = store, job_id, every_s, clock
        self._last = -float("inf")

    def __call__(self, ev) -> None:
        if isinstance(ev, TrainCheckpoint):
            self.store.checkpoint(self.job_id, ev.step)
            return
        if isinstance(ev, Progress):
            step, total, message = ev.done, ev.total, ev.message
        elif isinstance(ev, TrainProgress) and ev.loss == ev.loss:  # NaN loss: the prior-image phase
            step, total, message = ev.step, ev.total, f"step {ev.step}/{ev.total} · loss {ev.loss:.4f}"
        else:
            return
        now = self.clock()
        if now - self._last < self.every_s and step != total:
            return
        self._last = now
        self.store.progress(self.job_id, step, total, message)
