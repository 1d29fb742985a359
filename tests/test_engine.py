"""Engine: generate with recipes, per-image seeds, cancel within a step, validation messages."""
from __future__ import annotations

import threading

import numpy as np
import pytest
from PIL import Image

from engine.core.config import ConfigError, GenerateRequest, Settings
from engine.api import Engine
from engine.core.events import GenerateResult, Progress
from engine.generate.recipes import a1111_parameters, parse_a1111, read_recipe


@pytest.fixture(scope="module")
def engine(tiny_sd, tmp_path_factory):
    return Engine(Settings(model=str(tiny_sd), data_dir=str(tmp_path_factory.mktemp("data"))))


def test_generate_saves_pngs_with_recipe_and_no_exif(engine):
    req = GenerateRequest(prompt="a red circle", negative_prompt="blurry", num_inference_steps=3, seed=7,
                          batch_size=2, batch_count=2, scheduler="euler")
    res = engine.generate(req)
    assert not res.cancelled and len(res.images) == 4
    assert [g.recipe["seed"] for g in res.images] == [7, 8, 9, 10]
    for g in res.images:
        assert g.path.is_file() and g.path.is_relative_to(engine.data_dir / "outputs")
        with Image.open(g.path) as im:
            assert not im.getexif() and "exif" not in im.info  # IM-9
            recipe = read_recipe(im)
            assert "Negative prompt: blurry" in im.text["parameters"]
        assert recipe["seed"] == g.recipe["seed"] and recipe["prompt"] == "a red circle"
        # the recipe refills a request exactly
        fields = {k: recipe[k] for k in GenerateRequest.__dataclass_fields__ if k in recipe}
        assert GenerateRequest(**fields).scheduler == "euler"


def test_image_k_of_a_run_equals_a_single_run_with_seed_plus_k(engine):
    run = engine.generate(GenerateRequest(prompt="a cat", num_inference_steps=3, seed=100, batch_size=3))
    one = engine.generate(GenerateRequest(prompt="a cat", num_inference_steps=3, seed=102))
    a, b = np.asarray(run.images[2].image, np.int16), np.asarray(one.images[0].image, np.int16)
    assert np.abs(a - b).max() <= 1


def test_one_prompt_per_line_runs_every_line_in_one_batch(engine, monkeypatch):
    import engine.api as E

    calls = []
    real = E.sample
    monkeypatch.setattr(E, "sample", lambda c, prompts, *a, **k: calls.append(list(prompts)) or real(c, prompts, *a, **k))
    req = GenerateRequest(prompt="a red circle\n\n  a blue square  \na cat", prompt_per_line=True, batch_size=2,
                          batch_count=2, num_inference_steps=3, seed=5)
    assert req.num_images == 12
    res = engine.generate(req)
    lines = ["a red circle", "a blue square", "a cat"]
    assert calls == [[ln for ln in lines for _ in range(2)]] * 2  # one sampling loop per batch, all lines in it
    assert [g.recipe["prompt"] for g in res.images] == [ln for ln in lines for _ in range(2)] * 2
    assert [g.recipe["seed"] for g in res.images] == list(range(5, 17))
    # each image's recipe alone reproduces it (per-image generators: batching changes nothing)
    g = res.images[9]
    fields = {k: g.recipe[k] for k in GenerateRequest.__dataclass_fields__ if k in g.recipe}
    alone = engine.generate(GenerateRequest(**fields))
    assert np.abs(np.asarray(alone.images[0].image, np.int16) - np.asarray(g.image, np.int16)).max() <= 1
    with pytest.raises(ConfigError, match="at most 64 images"):
        GenerateRequest(prompt="\n".join(["x"] * 9), prompt_per_line=True, batch_size=8)
    assert GenerateRequest(prompt="a\nb").prompts == ["a\nb"]  # off: the prompt is one prompt, newlines and all


def test_cancel_during_50_step_run_stops_within_2_steps_and_engine_stays_usable(engine):
    steps_seen = []

    def on_progress(p: Progress):
        steps_seen.append(p.done)
        if p.done == 5:
            threading.Thread(target=engine.cancel).start()

    res = engine.generate(GenerateRequest(prompt="a dog", num_inference_steps=50), on_progress)
    assert res.cancelled and res.images == []
    assert max(steps_seen) <= 5 + 2
    again = engine.generate(GenerateRequest(prompt="a dog", num_inference_steps=2))
    assert not again.cancelled and len(again.images) == 1


def test_train_tab_cancel_during_a_generation_leaves_the_generation_running(engine):
    """Per-job cancel: the Train tab's Cancel (kind "train") must not stop a generation; Generate's Cancel does."""
    from ui.generate_tab import GenerateHandlers
    from ui.train_handlers import TrainHandlers

    train_tab, seen = TrainHandlers(engine), []

    def on_progress(p: Progress):
        seen.append(p.done)
        if p.done == 3:
            assert [j.kind for j in engine.jobs.running()] == ["generate"]
            train_tab.cancel(wait_s=0)  # what the Train tab's Cancel button runs
    res = engine.generate(GenerateRequest(prompt="a dog", num_inference_steps=12), on_progress)
    assert not res.cancelled and len(res.images) == 1 and seen == list(range(1, 13))

    gen_tab, seen = GenerateHandlers(engine), []

    def cancel_from_generate_tab(p: Progress):
        seen.append(p.done)
        if p.done == 3:
            gen_tab.cancel()
    res = engine.generate(GenerateRequest(prompt="a dog", num_inference_steps=12), cancel_from_generate_tab)
    assert res.cancelled and max(seen) <= 3 + 1
    assert engine.jobs.running() == []


def test_a_job_cancelled_while_it_waits_for_the_model_stops_before_its_first_step(engine):
    """The token exists from the moment the job is asked for: a Cancel pressed while it queues is not lost."""
    seen = []
    with engine._lock:  # another job holds the model
        t = threading.Thread(target=lambda: seen.append(engine.generate(
            GenerateRequest(prompt="a cat", num_inference_steps=4), job_id="queued-1")))
        t.start()
        while not engine.jobs.running():
            t.join(0.01)
        assert engine.cancel("queued-1") == 1 and engine.cancel("no-such-job") == 0
    t.join(120)
    assert seen[0].cancelled and seen[0].images == []


def test_generate_iter_yields_progress_then_result(engine):
    events = list(engine.generate_iter(GenerateRequest(prompt="a tree", num_inference_steps=8)))
    assert isinstance(events[-1], GenerateResult) and len(events[-1].images) == 1
    progress = [e for e in events if isinstance(e, Progress)]
    assert [p.done for p in progress] == list(range(1, 9))
    assert any(p.preview is not None for p in progress)


@pytest.mark.parametrize("kwargs, words", [
    (dict(prompt=""), "prompt"),
    (dict(prompt="x", width=500), "divisible by 8"),
    (dict(prompt="x", num_inference_steps=0), "num_inference_steps"),
    (dict(prompt="x", scheduler="plms"), "unknown scheduler"),
    (dict(prompt="x", num_inference_steps=20.5), "whole number"),
])
def test_requests_are_validated_with_messages_that_say_how_to_fix(kwargs, words):
    with pytest.raises(ConfigError, match=words):
        GenerateRequest(**kwargs)


def test_a1111_parameters_round_trip():
    r = dict(prompt="a red circle", negative_prompt="blurry, ugly", num_inference_steps=20, guidance_scale=5.5,
             guidance_rescale=0.0, width=32, height=32, seed=42, scheduler="dpmpp_2m_karras", model="demo",
             model_fingerprint="abcdef0123456789")
    text = a1111_parameters(r)
    assert "Sampler: DPM++ 2M, Schedule type: Karras" in text
    back = parse_a1111(text)
    for k in ("prompt", "negative_prompt", "num_inference_steps", "guidance_scale", "seed", "width", "height",
              "scheduler"):
        assert back[k] == r[k], k
