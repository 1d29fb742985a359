"""The job queue against a really launched app (GR-12, TR-9, over HTTP at 127.0.0.1).

GR-12: ann starts a generation and her page goes away mid-run (the event stream is closed); a new client logged in
as ann finds the job under My jobs and gets its images; bob neither sees it nor can follow it by id.
TR-9: a training run is killed with the app (SIGKILL) after its first checkpoint; the restarted app lists it as
interrupted with a resume offered.
"""
from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import httpx
import pytest
from gradio_client import Client
from PIL import Image

from http_support import launched_app, page_values

from engine.jobs.store import JobStore
from engine.studio.accounts import Accounts
from engine.studio.quota import Quotas



def _start_and_leave(app, http: httpx.Client, fn: int, data: list, store: JobStore, user: str) -> str:
    """Join the queue as a page does, read the stream until the job runs, then close it (the tab went away)."""
    session = uuid.uuid4().hex
    r = http.post("/gradio_api/queue/join", json={"data": data, "fn_index": fn, "session_hash": session,
                                                  "event_data": None, "trigger_id": None})
    r.raise_for_status()
    with http.stream("GET", f"/gradio_api/queue/data?session_hash={session}",
                     timeout=httpx.Timeout(240, connect=30)) as stream:
        for line in stream.iter_lines():
            if line.startswith("data:") and json.loads(line[5:]).get("msg") == "process_completed":
                raise AssertionError(f"the job ended before the page left: {line[:300]}")
            jobs = store.list(user)
            if jobs and jobs[0].state == "running" and jobs[0].step > 0:
                return jobs[0].id
    raise AssertionError("the stream ended before the job ran")


@pytest.fixture(scope="module")
def studio(tiny_sd, tmp_path_factory):
    root = tmp_path_factory.mktemp("jobs-studio")
    with launched_app(root, "--listen", "--model", str(tiny_sd)) as app:
        acc = Accounts(app.data_dir / "stylebooth.db")
        acc.add("ann", "ann-password")
        acc.add("bob", "bob-password")
        quotas = Quotas(app.data_dir / "stylebooth.db")
        quotas.set_monthly_free("ann", 100)
        quotas.add_credits("ann", 50)  # a training run costs 50 credits
        app.client = app.login("bob", "bob-password")  # reads /config (the page layout) for _values
        yield app


def test_gr12_a_generation_survives_its_page_and_is_found_again_by_its_user_only(studio):
    store = JobStore(studio.data_dir / "stylebooth.db")
    ann = studio.login("ann", "ann-password")
    fn = studio.fn_index("generate", "click")
    data = page_values(studio, fn, {"prompt": "a red circle", "steps": 60, "batches": 3})
    job_id = _start_and_leave(studio, ann, fn, data, store, "ann")
    ann.close()

    again = Client(studio.url, auth=("ann", "ann-password"), verbose=False, analytics_enabled=False)
    table, picker = again.predict(api_name="/my_jobs")
    assert picker["value"] == job_id and [c[1] for c in picker["choices"]] == [job_id]
    assert len(table["data"]) == 1 and table["data"][0][1] == "generate" and "a red circle" in table["data"][0][2]
    status, gallery, files = again.predict(job_id, api_name="/follow_job")  # follows it to its end
    job = store.get(job_id)
    assert job.state == "done" and len(job.files) == 3, (job, studio.output[-2000:])
    assert "**generate** · done" in status and len(gallery) == 3 and len(files) == 3
    for item in gallery:  # the images themselves, fetched over HTTP by the client
        with Image.open(item["image"]) as im:
            assert im.size == (64, 64)
    again.close()

    bob = Client(studio.url, auth=("bob", "bob-password"), verbose=False, analytics_enabled=False)
    table, picker = bob.predict(api_name="/my_jobs")
    assert picker["value"] is None and picker["choices"] == [] and job_id not in json.dumps(table)
    # Following ann's job by its id: refused (by the picker's choices, which are bob's own jobs; behind it the
    # engine's ownership check, tests/test_jobs_queue.py), with nothing of ann's job in the answer.
    with pytest.raises(Exception) as refused:
        bob.predict(job_id, api_name="/follow_job")
    assert "not in the list of choices" in str(refused.value) or "unknown job" in str(refused.value)
    assert "red circle" not in str(refused.value) and "outputs" not in str(refused.value)
    bob.close()


def _draw(folder: Path, n: int = 3) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        p = folder / f"shape{i}.png"
        Image.new("RGB", (64, 64), ("red", "green", "blue")[i]).save(p)
        out.append(p)
    return out


def test_tr9_a_training_run_killed_with_the_app_is_interrupted_and_resumable_after_restart(studio, tiny_sd,
                                                                                          tmp_path):
    """Runs after the GR-12 test on the same app (one app start less; the last test of this module: it kills the
    app): ann's run dies with the app."""
    store = JobStore(studio.data_dir / "stylebooth.db")
    ann = studio.login("ann", "ann-password")
    uploads = studio.upload(*_draw(tmp_path / "imgs"))
    fn = studio.fn_index("train", "click")
    data = page_values(studio, fn, {"train-images": [studio.file_data(p) for p in uploads], "style-name": "killed run",
                                "train-steps": 100000, "checkpointing-steps": 3, "validation-steps": 0,
                                "with-prior-preservation": False})
    ann.post("/gradio_api/queue/join", json={"data": data, "fn_index": fn, "session_hash": uuid.uuid4().hex,
                                             "event_data": None, "trigger_id": None}).raise_for_status()
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        job = next((j for j in store.list("ann") if j.kind == "train"), None)
        if job is not None and job.state == "checkpointed":
            break
        assert job is None or job.state in ("queued", "running"), (job, studio.output[-3000:])
        time.sleep(0.5)
    else:
        raise AssertionError(f"no checkpoint within 240 s: {store.list()}\n{studio.output[-3000:]}")
    studio.proc.kill()  # the worker dies with the app: no chance to write anything
    studio.proc.wait(30)
    assert store.get(job.id).state == "checkpointed"  # what the dead app left behind

    with launched_app(tmp_path, "--listen", "--model", str(tiny_sd), "--data-dir", str(studio.data_dir)) as app:
        job = store.get(job.id)
        assert job.state == "interrupted" and job.result["run_id"] and job.step >= 3
        client = Client(app.url, auth=("ann", "ann-password"), verbose=False, analytics_enabled=False)
        table, picker = client.predict(api_name="/my_jobs")
        assert picker["value"] == job.id and table["data"][0][1] == "train"
        assert "interrupted" in table["data"][0][3] and "resume" in table["data"][0][3]
        status, gallery, files = client.predict(job.id, api_name="/follow_job")
        assert "interrupted" in status and "resume it in the Train tab" in status
        client.close()
        bob = Client(app.url, auth=("bob", "bob-password"), verbose=False, analytics_enabled=False)
        table, picker = bob.predict(api_name="/my_jobs")
        assert picker["choices"] == [] and "killed run" not in json.dumps(table)
        bob.close()
