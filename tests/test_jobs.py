"""The job line on the one GPU: round-robin across users, queue positions, cancel while waiting."""
from __future__ import annotations

import threading

from engine.jobs.cancel import CancelToken
from engine.jobs.fair import FairScheduler


def _queue(sched: FairScheduler, user: str, job_id: str, order: list, gate: threading.Event | None = None,
           token=None) -> threading.Thread:
    def work():
        with sched.turn(user, job_id, cancelled=token):
            order.append(job_id)
            if gate is not None:
                gate.wait(60)

    t = threading.Thread(target=work)
    t.start()
    return t


def _wait_until(cond) -> None:
    ev = threading.Event()
    while not cond():
        ev.wait(0.01)


def test_a_user_with_one_job_is_not_stuck_behind_another_users_ten():
    """User A queues 10 jobs, then B queues 1: B's job runs second (right after the job in progress)."""
    sched, order, gate = FairScheduler(), [], threading.Event()
    threads = [_queue(sched, "a", "a0", order, gate)]
    _wait_until(lambda: order == ["a0"])
    for k in range(1, 10):
        threads.append(_queue(sched, "a", f"a{k}", order))
        _wait_until(lambda k=k: sched.position(f"a{k}") is not None)
    threads.append(_queue(sched, "b", "b0", order))
    _wait_until(lambda: sched.position("b0") is not None)
    assert sched.position("a0") == 0 and sched.position("b0") == 1 and sched.position("a1") == 2
    assert sched.position("a9") == 10 and sched.position("nope") is None
    gate.set()
    for t in threads:
        t.join(60)
    assert order == ["a0", "b0"] + [f"a{k}" for k in range(1, 10)]


def test_three_users_alternate():
    sched, order, gate = FairScheduler(), [], threading.Event()
    threads = [_queue(sched, "x", "x0", order, gate)]
    _wait_until(lambda: order == ["x0"])
    for job in ("x1", "x2", "y0", "y1", "z0"):
        threads.append(_queue(sched, job[0], job, order))
        _wait_until(lambda job=job: sched.position(job) is not None)
    gate.set()
    for t in threads:
        t.join(60)
    assert order == ["x0", "y0", "z0", "x1", "y1", "x2"]


def test_a_job_cancelled_while_waiting_leaves_the_line_at_once():
    sched, order, gate, token = FairScheduler(), [], threading.Event(), CancelToken()
    running = _queue(sched, "a", "a0", order, gate)
    _wait_until(lambda: order == ["a0"])
    waiting = _queue(sched, "b", "b0", order, token=token)
    _wait_until(lambda: sched.position("b0") == 1)
    token.cancel()
    waiting.join(60)
    assert not waiting.is_alive() and order == ["a0", "b0"]  # it ran its body (to report "cancelled") early
    assert sched.position("a0") == 0  # the running job still holds the GPU
    gate.set()
    running.join(60)
