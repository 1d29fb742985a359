"""One GPU (or a cluster's job slots), served fairly: jobs wait for their turn in round-robin order across users.

Within one user, jobs start in the order they were asked for; across users, a free slot goes to the waiting user
who was served least recently. So a user who queues ten jobs and a user who then queues one do not wait ten jobs:
the second user's job runs right after the job in progress. With `capacity` slots (engine/cluster: one per Ray
worker) up to that many jobs run at once; capacity is a callable, asked again while jobs wait, so a worker that joins
or dies changes how many run without a restart.
"""
from __future__ import annotations

import contextlib
import itertools
import threading
from dataclasses import dataclass
from typing import Callable, Iterator


@dataclass(frozen=True)
class _Ticket:
    seq: int
    user: str
    job_id: str


class FairScheduler:
    """Round-robin by user over `capacity()` slots (one GPU: 1; a Ray cluster: its workers). Thread-safe; not
    re-entrant."""

    def __init__(self, capacity: Callable[[], int] | int = 1):
        self._capacity = capacity if callable(capacity) else (lambda: capacity)
        self._cond = threading.Condition()
        self._waiting: list[_Ticket] = []
        self._busy: list[_Ticket] = []
        self._served: dict[str, int] = {}
        self._turns = itertools.count(1)
        self._seq = itertools.count()

    def _order(self, served: dict[str, int], pending: list[_Ticket]) -> list[_Ticket]:
        """The waiting tickets in the order they will start (replaying the rule without running anything)."""
        order, served, pending = [], dict(served), list(pending)
        turn = max(served.values(), default=0)
        while pending:
            nxt = min(pending, key=lambda t: (served.get(t.user, 0), t.seq))
            pending.remove(nxt)
            turn += 1
            served[nxt.user] = turn
            order.append(nxt)
        return order

    @contextlib.contextmanager
    def turn(self, user: str, job_id: str, cancelled=None) -> Iterator[None]:
        """Wait for a free slot and this job's turn, run the body, then free the slot. A job cancelled while it
        waits leaves the line at once (its body runs, to report itself cancelled)."""
        ticket = _Ticket(next(self._seq), user, job_id)
        with self._cond:
            self._waiting.append(ticket)
            while True:
                free = max(1, int(self._capacity())) - len(self._busy)
                if free > 0 and ticket in self._order(self._served, self._waiting)[:free]:
                    self._waiting.remove(ticket)
                    self._busy.append(ticket)
                    self._served[user] = next(self._turns)
                    break
                if cancelled is not None and cancelled.is_set():
                    self._waiting.remove(ticket)
                    self._cond.notify_all()
                    break
                self._cond.wait(timeout=0.5)  # also notices a cancel, or a changed capacity, that nobody notified
        try:
            yield
        finally:
            with self._cond:
                if ticket in self._busy:
                    self._busy.remove(ticket)
                self._cond.notify_all()

    def position(self, job_id: str) -> int | None:
        """0 while the job runs, k when k jobs start before it (plus one if every slot is busy), None when unknown."""
        with self._cond:
            if any(t.job_id == job_id for t in self._busy):
                return 0
            ids = [t.job_id for t in self._order(self._served, self._waiting)]
            if job_id not in ids:
                return None
            full = len(self._busy) >= max(1, int(self._capacity()))
            return ids.index(job_id) + full

    def running(self) -> int:
        with self._cond:
            return len(self._busy)
