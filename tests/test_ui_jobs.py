"""The My jobs tab's handlers (ui/jobs_panel.py) over a real Engine: list, follow a running job to its images,
show a finished one, cancel one whose page is gone; the wiring of the tab in the app."""
from __future__ import annotations

import gradio as gr
import pytest

from engine.api import Engine
from engine.core.config import GenerateRequest, Settings
from ui.app import build_app
from ui.jobs_panel import COLUMNS, JobsHandlers


@pytest.fixture(scope="module")
def engine(tiny_sd, tmp_path_factory):
    return Engine(Settings(model=str(tiny_sd), data_dir=str(tmp_path_factory.mktemp("data"))))


def test_a_job_whose_page_went_away_is_listed_followed_to_its_images_and_shown_again(engine):
    h = JobsHandlers(engine)
    it = engine.generate_iter(GenerateRequest(prompt="a red circle", num_inference_steps=6, batch_count=3))
    next(it)
    del it  # the page went away
    listing = h.listing("local")
    job_id = listing["job"].value
    assert list(listing["table"].columns) == COLUMNS and listing["table"].iloc[0]["kind"] == "generate"
    updates = list(h.follow(job_id, "local"))
    final = updates[-1]
    assert final["status"].startswith("**generate** · done") and len(final["gallery"]) == 3
    assert all("stylebooth-" in p for p in final["gallery"])  # copies Gradio may serve, not the data dir
    assert list(h.follow(job_id, "local"))[-1]["status"] == final["status"]  # later visits: the same result
    assert "nothing to cancel" in h.cancel(job_id, "local")["status"]


def test_cancel_stops_a_job_that_nobody_follows(engine):
    h = JobsHandlers(engine)
    it = engine.generate_iter(GenerateRequest(prompt="a blue square", num_inference_steps=50, batch_count=40))
    next(it)
    del it
    job_id = engine.my_jobs()[0].id
    assert h.cancel(job_id, "local")["status"].startswith("Cancelling")
    assert engine.wait_for_jobs(timeout=120)
    assert engine.job_status(job_id).state == "cancelled"
    with pytest.raises(gr.Error, match="unknown job"):
        list(h.follow("not-a-job", "local"))
    with pytest.raises(gr.Error, match="pick a job"):
        list(h.follow(None, "local"))


def test_the_tab_is_wired(engine):
    demo = build_app(engine)
    names = {d.get("api_name") for d in demo.config["dependencies"]}
    assert {"my_jobs", "follow_job"} <= names
    assert any(c.get("props", {}).get("elem_id") == "tab-jobs" for c in demo.config["components"])
