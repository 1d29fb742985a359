"""The persisted job queue (GR-12, TR-9), engine level: every job is a row that goes queued → running → done /
failed / cancelled with its request and result; users see only their own jobs; a row left open by a dead worker is
marked interrupted at the next start; a page that went away reattaches to a running job and gets the rest of it."""
from __future__ import annotations

import subprocess
import sys

import pytest

from engine.api import Engine
from engine.core.config import GenerateRequest, Settings
from engine.core.errors import ConfigError
from engine.core.events import GenerateResult, Progress, TrainCheckpoint
from engine.jobs.runner import ProgressRecorder
from engine.jobs.store import JobStore, worker_id


@pytest.fixture(scope="module")
def engine(tiny_sd, tmp_path_factory):
    return Engine(Settings(model=str(tiny_sd), data_dir=str(tmp_path_factory.mktemp("data"))))


def req(**kw) -> GenerateRequest:
    return GenerateRequest(**{"prompt": "a red circle", "num_inference_steps": 2, "seed": 3, **kw})


def test_a_generation_is_recorded_from_queued_to_done_with_its_request_and_files(engine):
    res = engine.generate(req(batch_size=2))
    job = engine.my_jobs()[0]
    assert (job.kind, job.state, job.user) == ("generate", "done", "local")
    assert job.request["prompt"] == "a red circle" and job.request["batch_size"] == 2
    assert job.started is not None and job.created <= job.started <= job.finished
    assert list(job.files) == [img.path for img in res.images] and all(p.is_file() for p in job.files)
    # the row is in the database, not only in this process: a fresh reader sees the same
    assert JobStore(engine.data_dir / "stylebooth.db").get(job.id).files == job.files


def test_failed_and_cancelled_jobs_say_so(engine, tmp_path):
    broken = Engine(Settings(model=str(tmp_path / "nope"), data_dir=str(tmp_path / "d")))
    with pytest.raises(ValueError, match="not found"):
        broken.generate(req())
    failed = broken.my_jobs()[0]
    assert failed.state == "failed" and "not found" in failed.error

    it = engine.generate_iter(req(num_inference_steps=50, batch_count=20))
    first = next(it)
    job_id = engine.my_jobs()[0].id
    assert isinstance(first, Progress) and engine.job_status(job_id).state == "running"
    engine.cancel(job_id)
    assert isinstance(list(it)[-1], GenerateResult)
    assert engine.job_status(job_id).state == "cancelled"


def test_progress_reaches_the_queue_throttled_and_checkpoints_at_once(engine):
    writes = []

    class Store:
        def progress(self, *a):
            writes.append(("progress", *a))

        def checkpoint(self, *a):
            writes.append(("checkpoint", *a))

    now = [0.0]
    rec = ProgressRecorder(Store(), "j", every_s=20.0, clock=lambda: now[0])
    for step in range(1, 101):  # a step a second: one write per 20 s, plus the last step
        now[0] = float(step)
        rec(Progress(step, 100, f"step {step}"))
    rec(TrainCheckpoint(100, None))
    assert [w[2] for w in writes if w[0] == "progress"] == [1, 21, 41, 61, 81, 100]
    assert writes[-1] == ("checkpoint", "j", 100)

    it = engine.generate_iter(req(num_inference_steps=4, batch_count=2))
    result = list(it)[-1]
    job = engine.my_jobs()[0]
    assert (job.step, job.total) == (8, 8) and job.message == "batch 2/2, step 4/4" and not result.cancelled


def test_reattach_to_a_running_job_yields_the_rest_of_it_then_the_result(engine):
    it = engine.generate_iter(req(num_inference_steps=30, batch_count=4, seed=11))
    first = next(it)
    job_id = engine.my_jobs()[0].id
    del it  # the page went away: nobody follows the job any more
    events = list(engine.reattach(job_id))
    steps = [ev.done for ev in events if isinstance(ev, Progress)]
    result = events[-1]
    assert isinstance(result, GenerateResult) and len(result.images) == 4 and not result.cancelled
    assert steps[-1] == 120 and steps == sorted(steps) and steps[0] >= first.done
    job = engine.job_status(job_id)
    assert job.state == "done" and list(job.files) == [img.path for img in result.images]
    # once finished, reattaching gives the stored record: the same files, no images in memory needed
    (again,) = list(engine.reattach(job_id))
    assert again.id == job_id and again.files == job.files


def test_users_see_only_their_own_jobs(tiny_sd, tmp_path):
    eng = Engine(Settings(model=str(tiny_sd), data_dir=str(tmp_path)))
    studio = eng.enable_studio()
    studio.accounts.add("ann", "ann-password-1")
    studio.accounts.add("bob", "bob-password-1")
    studio.accounts.add("root", "root-password-1", role="admin")
    studio.quotas.set_monthly_free("ann", 10)
    eng.generate(req(), user="ann")
    ann_job = eng.my_jobs("ann")[0]
    assert ann_job.user == "ann" and eng.my_jobs("bob") == []
    for call in (lambda: eng.job_status(ann_job.id, "bob"), lambda: eng.reattach(ann_job.id, "bob"),
                 lambda: eng.job_status("no-such-job", "bob")):
        with pytest.raises(ConfigError, match="unknown job"):
            call()
    assert eng.cancel(ann_job.id, user="bob") == 0
    assert [j.id for j in eng.my_jobs("root")] == [ann_job.id]  # an admin sees everyone's


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_jobs_left_open_by_a_dead_worker_are_marked_interrupted_at_start(tiny_sd, tmp_path):
    store = JobStore(tmp_path / "stylebooth.db")
    for job_id, state in (("gen-dead", "running"), ("queued-dead", "queued"), ("train-dead", "checkpointed"),
                          ("reused-pid", "running"), ("alive", "running"), ("done", "done")):
        store.add(job_id, "local", "train" if job_id.startswith("train") else "generate", {"prompt": job_id})
        if state != "queued":
            store.start(job_id)
    store.checkpoint("train-dead", 5)
    store.finish("done", "done")
    pid = _dead_pid()
    with store.db.write() as con:
        for job_id in ("gen-dead", "queued-dead", "train-dead"):
            con.execute("UPDATE jobs SET worker = ? WHERE id = ?", (f"{store.worker.split(':')[0]}:{pid}:1", job_id))
        # a live pid (ours) that started at another time: a reused pid, not the worker that ran the job
        con.execute("UPDATE jobs SET worker = ? WHERE id = 'reused-pid'", (store.worker.rsplit(":", 1)[0] + ":0",))
    assert worker_id(pid) is None
    eng = Engine(Settings(model=str(tiny_sd), data_dir=str(tmp_path)))
    states = {j.id: j.state for j in eng.my_jobs()}
    assert states == {"gen-dead": "interrupted", "queued-dead": "interrupted", "train-dead": "interrupted",
                      "reused-pid": "interrupted", "alive": "running", "done": "done"}
    assert sorted(eng.interrupted_at_start) == ["gen-dead", "queued-dead", "reused-pid", "train-dead"]
    assert eng.job_status("train-dead").step == 5  # where the checkpoint was: what a resume starts from


def test_a_job_id_is_reused_only_by_its_own_user_once_finished(tmp_path):
    store = JobStore(tmp_path / "stylebooth.db")
    store.add("r1", "ann", "generate", {"prompt": "first"})
    with pytest.raises(ValueError, match="already in use"):
        store.add("r1", "ann", "generate")  # still queued
    store.start("r1")
    store.finish("r1", "done", {"files": ["outputs/ann/x.png"]})
    with pytest.raises(ValueError, match="already in use"):
        store.add("r1", "bob", "generate")  # another user's id
    store.add("r1", "ann", "generate", {"prompt": "again"})  # a retry of the same request
    job = store.get("r1")
    assert (job.state, job.request["prompt"], job.result, job.user) == ("queued", "again", {}, "ann")
