"""One GPU, served fairly: jobs wait for their turn in round-robin order across users.

Within one user, jobs run in the order they were asked for; across users, the next turn goes to the waiting user
who was served least recently. So a user who queues ten jobs and a user who then queues one do not wait ten jobs:
the second user's job runs right after the job in progress.
"""
from __future__ import annotations

import contextlib
import itertools
import threading
from dataclasses import dataclass
from typing import Iterator


@dataclass(frozen=True)
class _Ticket:
    seq: int
    user: str
    job_id: str


class FairScheduler:
    """A lock handed out in round-robin order by user. Thread-safe; not re-entrant."""

    def __init__(self):
        self._cond = threading.Condition()
        self._waiting: list[_Ticket] = []
        self._busy: _Ticket | None = None
        self._served: dict[str, int] = {}  # user -> when they were last served (a turn counter)
        self._turns = itertools.count(1)
        self._seq = itertools.count()

    def _next(self) -> _Ticket | None:
        """The ticket whose user waited longest since their last turn; FIFO within a user."""
        if not self._waiting:
            return None
        return min(self._waiting, key=lambda t: (self._served.get(t.user, 0), t.seq))

    @contextlib.contextmanager
    def turn(self, user: str, job_id: str, cancelled=None) -> Iterator[None]:
        """Wait for this job's turn, run the body, then hand the GPU to the next user in line.

        `cancelled` (a threading.Event) lets a waiting job leave the line early: the body still runs, at once, so
        the job can report itself cancelled; it never waits behind others for that."""
        ticket = _Ticket(next(self._seq), user, job_id)
        with self._cond:
            self._waiting.append(ticket)
            while not (self._busy is None and self._next() == ticket):
                if cancelled is not None and cancelled.is_set():
                    self._waiting.remove(ticket)
                    self._cond.notify_all()
                    break
                self._cond.wait(timeout=0.5)  # wake up now and then to see a cancel that nobody notified
            else:
                self._waiting.remove(ticket)
                self._busy = ticket
                self._served[user] = next(self._turns)
        try:
            yield
        finally:
            with self._cond:
                if self._busy == ticket:
                    self._busy = None
                self._cond.notify_all()

    def position(self, job_id: str) -> int | None:
        """0 while the job runs, k when k jobs will run before it, None when it is not here."""
        with self._cond:
            if self._busy is not None and self._busy.job_id == job_id:
                return 0
            order, served, pending = [], dict(self._served), list(self._waiting)
            turn = max(served.values(), default=0)
            while pending:  # replay the scheduler's choices without running anything
                nxt = min(pending, key=lambda t: (served.get(t.user, 0), t.seq))
                pending.remove(nxt)
                turn += 1
                served[nxt.user] = turn
                order.append(nxt.job_id)
            if job_id not in order:
                return None
            return order.index(job_id) + (self._busy is not None)
