"""The Generate tab's handlers, called directly (no browser), against a tiny random model on CPU."""
from __future__ import annotations

import dataclasses
import threading

import gradio as gr
import pytest
from PIL import Image, PngImagePlugin

from engine.core.config import GenerateRequest, Settings
from engine.api import Engine
from engine.generate.recipes import read_recipe
from ui.app import AppHandlers, blocked_paths, build_app, model_summary
from ui.generate_tab import FIELD_NAMES, GenerateHandlers, build_generate_tab, default_values


@pytest.fixture(scope="module")
def engine(tiny_sd, tmp_path_factory):
    return Engine(Settings(model=str(tiny_sd), data_dir=str(tmp_path_factory.mktemp("data"))))


@pytest.fixture()
def h(engine):
    return GenerateHandlers(engine)


def form(**kw):
    return {**default_values(), "prompt": "a red circle on a blue background", "num_inference_steps": 4, **kw}


def run(h, values, progress=None):
    return list(h.generate(values, progress))


def test_every_request_field_has_a_component_and_back():
    with gr.Blocks():
        tab = build_generate_tab(engine=None)  # building touches no model
    request_fields = {f.name for f in dataclasses.fields(GenerateRequest)} - {"schema_version"}
    assert set(tab.fields) == request_fields == set(FIELD_NAMES)
    for name, comp in tab.fields.items():  # the form starts at the dataclass defaults
        assert comp.value == default_values()[name], name


def test_generate_yields_progress_then_gallery(h):
    seen = []
    updates = run(h, form(num_inference_steps=8, batch_size=2, seed=5), progress=lambda p, **kw: seen.append(p))
    assert seen == [(i, 8) for i in range(1, 9)]  # one progress tick per denoising step
    *partial, final = updates
    assert partial and all("gallery" not in u for u in partial)
    assert any(isinstance(u.get("preview"), Image.Image) for u in partial)  # live preview while sampling
    assert [cap for _, cap in final["gallery"]] == ["seed 5", "seed 6"]
    assert len(final["files"]) == 2 and final["status"].startswith("Done: 2 image(s)")
    recipe = read_recipe(final["files"][0])  # the download keeps the recipe
    assert recipe["seed"] == 5 and recipe["prompt"] == "a red circle on a blue background"


def test_cancel_mid_run_stops_promptly_and_engine_stays_usable(h):
    updates, first = [], threading.Event()

    def consume():
        for u in h.generate(form(num_inference_steps=150, batch_count=50)):
            updates.append(u)
            first.set()

    t = threading.Thread(target=consume)
    t.start()
    assert first.wait(60)
    assert h.cancel() == {"status": "Cancelled."}  # answered once the worker stopped
    t.join(60)
    assert not t.is_alive() and updates[-1]["status"].startswith("Cancelled after 0 of 50")
    assert run(h, form())[-1]["status"].startswith("Done: 1 image(s)")  # still usable, stop flag cleared


def test_closing_the_generator_leaves_the_job_running_and_cancel_stops_it(h):
    """Gradio closes the generator when the page goes away: the job runs on (GR-12, found again under My jobs);
    Cancel (`cancels=[ev]` plus h.cancel) stops the worker within a step, not after 50 images."""
    saved = lambda: len(list(h.engine.data_dir.glob("outputs/**/*.png")))  # noqa: E731
    before = saved()
    gen = h.generate(form(num_inference_steps=150, batch_count=50))
    next(gen)
    gen.close()
    job = h.engine.my_jobs()[0]
    assert job.kind == "generate" and job.state in ("queued", "running")
    assert h.engine.job_status(job.id).state in ("queued", "running")  # still going with nobody following it
    assert h.cancel() == {"status": "Cancelled."}
    assert saved() == before  # stopped inside its first 150-step image, not after 50 of them
    assert h.engine.job_status(job.id).state == "cancelled"
    assert run(h, form())[-1]["status"].startswith("Done")


@pytest.mark.parametrize("change, message", [
    ({"width": 500}, "`width` must be divisible by 8"),
    ({"prompt": "  "}, "`prompt` is empty"),
    ({"seed": -1}, "`seed` must be between"),
    ({"scheduler": "plms"}, "unknown scheduler 'plms'"),
    ({"num_inference_steps": [3]}, "`num_inference_steps` must be a whole number"),  # only a direct API call
])
def test_bad_input_gives_gr_error_with_the_message(h, change, message):
    with pytest.raises(gr.Error) as e:
        run(h, form(**change))
    assert message in e.value.message


def test_missing_model_gives_gr_error(tmp_path):
    h = GenerateHandlers(Engine(Settings(model=str(tmp_path / "nope"), data_dir=str(tmp_path / "d"))))
    with pytest.raises(gr.Error, match="not found"):
        run(h, form())


def test_emptied_number_box_falls_back_to_default(h):
    assert h.request(form(seed=None)).seed == GenerateRequest.__dataclass_fields__["seed"].default


def test_recipe_drop_refills_the_form(h):
    final = run(h, form(seed=77, guidance_scale=7.5, negative_prompt="blurry", scheduler="euler_a"))[-1]
    out = h.load_recipe(final["files"][0])
    assert out.pop("status").startswith("Recipe loaded")
    assert out["seed"] == 77 and out["guidance_scale"] == 7.5 and out["negative_prompt"] == "blurry"
    assert out["scheduler"] == "euler_a" and set(out) <= set(FIELD_NAMES)
    h.request({**form(), **out})  # a refilled form is a valid request


def test_recipe_with_an_unknown_style_selects_none(h, tmp_path):
    info = PngImagePlugin.PngInfo()
    info.add_text("stylebooth", '{"prompt": "a red circle", "style": "gone-1234", "style_strength": 0.8}')
    Image.new("RGB", (8, 8)).save(tmp_path / "s.png", pnginfo=info)
    out = h.load_recipe(str(tmp_path / "s.png"))
    assert out["style"] == "" and out["style_strength"] == 0.8 and "'gone-1234' is not in this library" in out["status"]
    assert h.style_choices()[0] == ("No style", "")


def test_a1111_png_refills_the_form(h, tmp_path):
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "a green ring\nNegative prompt: ugly\n"
                                "Steps: 12, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6, Seed: 42, "
                                "Size: 64x64, Model: whatever")
    path = tmp_path / "a1111.png"
    Image.new("RGB", (8, 8)).save(path, pnginfo=info)
    out = h.load_recipe(str(path))
    assert out["prompt"] == "a green ring" and out["negative_prompt"] == "ugly" and out["seed"] == 42
    assert out["num_inference_steps"] == 12 and out["scheduler"] == "dpmpp_2m_karras" and out["width"] == 64


def test_plain_or_broken_images(h, tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "plain.png")
    assert set(h.load_recipe(str(tmp_path / "plain.png"))) == {"status"}
    (tmp_path / "junk.png").write_bytes(b"not an image")
    with pytest.raises(gr.Error, match="Could not read"):
        h.load_recipe(str(tmp_path / "junk.png"))
    assert h.load_recipe(None) == {}


def test_random_seed():
    seeds = {GenerateHandlers.random_seed()["seed"] for _ in range(20)}
    assert len(seeds) > 1 and all(0 <= s < 2**32 for s in seeds)


def test_app_header_and_model_switch(engine, tiny_sd):
    app = AppHandlers(engine)
    assert "**Model:** model · folder · epsilon · 64 px" in app.refresh()
    with pytest.raises(gr.Error, match="not found"):
        app.switch_model("/no/such/model")
    assert engine.model.source == str(tiny_sd)  # the old model stays
    assert "model" in app.switch_model(str(tiny_sd))
    assert "No model loaded" in model_summary(None, "boom")


def test_app_wiring(engine):
    demo = build_app(engine)
    by_id = dict(demo.fns)
    gen_id = next(i for i, f in by_id.items() if f.api_name == "generate")
    gpu = [f for f in by_id.values() if f.concurrency_id == "gpu"]
    assert {f.name for f in gpu} == {"on_generate", "on_switch", "on_train", "on_resume", "on_import", "on_batch",
                                     "on_strip", "on_preview", "on_bake", "on_round", "on_refine",
                                     "on_create_instant", "on_train_instant"}  # one GPU
    assert any(gen_id in f.cancels for f in by_id.values() if f.is_cancel_function)  # Cancel also stops the UI side


def test_blocked_paths_cover_the_data_dir_but_not_gradio_temp(tmp_path, monkeypatch):
    data = tmp_path / "data"
    (data / "outputs").mkdir(parents=True)
    (data / "notes.txt").write_text("x")
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(data / "gradio-tmp"))
    blocked = blocked_paths(data, [tmp_path / "cfg"])
    for p in ("outputs", "styles", "stylebooth.db", "notes.txt"):
        assert str((data / p).resolve()) in blocked
    assert str((data / "gradio-tmp").resolve()) not in blocked and str(data.resolve()) not in blocked
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "elsewhere"))
    assert str(data.resolve()) in blocked_paths(data)
