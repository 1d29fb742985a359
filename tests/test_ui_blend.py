"""The Blend tab's and the batch panel's handlers over a real Engine (tiny model, two random-B styles): strip,
preview, exact and SVD bakes that land in the style list; a 2x2 batch with its grid and zip; plain-words errors."""
from __future__ import annotations

import zipfile

import gradio as gr
import pytest

from engine.api import Engine
from engine.core.config import Settings
from lora_support import make_random_style
from ui.batch_panel import BatchHandlers
from ui.blend_tab import BlendHandlers
from ui.generate_tab import default_values


@pytest.fixture(scope="module")
def engine(tiny_sd, tmp_path_factory):
    e = Engine(Settings(model=str(tiny_sd), data_dir=str(tmp_path_factory.mktemp("data"))))
    e.style_a = make_random_style(e.model, e.data_dir, "Ink", seed=1, trigger="inkz")
    e.style_b = make_random_style(e.model, e.data_dir, "Wash", seed=2, trigger="washz")
    return e


def rows(engine, wa=0.5, wb=0.5) -> dict:
    return {"style_0": engine.style_a.id, "weight_0": wa, "style_1": engine.style_b.id, "weight_1": wb,
            "style_2": "", "weight_2": 0.0, "style_3": "", "weight_3": 0.0}


def test_strip_preview_and_bakes(engine):
    h = BlendHandlers(engine)
    assert {engine.style_a.id, engine.style_b.id} <= {sid for _, sid in h.style_choices()}
    out = list(h.strip(rows(engine), "a red circle", 3, 3, 2))[-1]
    assert len(out["strip_gallery"]) == 3 and out["strip_image"] and out["status"].startswith("Done: 3 image(s)")
    assert [cap for _, cap in out["strip_gallery"]] == ["A 1 · B 0", "A 0.5 · B 0.5", "A 0 · B 1"]
    assert h.preview(rows(engine), "a red circle", 3, 2)["preview"]

    exact = h.bake(rows(engine), "Ink and wash", "exact", 8)["status"]  # the rank slider is ignored for exact
    assert "Saved **Ink and wash**" in exact and "exact" in exact
    svd = h.bake(rows(engine), "Ink and wash small", "svd", 1)["status"]
    err = float(svd.split("relative error ")[1].split(" ")[0])
    assert 0 < err < 1  # a rank-1 compression of a rank-8 blend loses something, and says how much
    names = {s.name for s in engine.list_styles()}
    assert {"Ink and wash", "Ink and wash small"} <= names  # in the Generate tab's picker


def test_blend_mistakes_are_plain_errors(engine):
    h = BlendHandlers(engine)
    with pytest.raises(gr.Error, match="at least two styles"):
        h.blend({**rows(engine), "style_1": ""})
    with pytest.raises(gr.Error):
        h.bake(rows(engine), "", "exact", 0)  # a style needs a name
    with pytest.raises(gr.Error):
        list(h.strip(rows(engine), "", 0, 3, 2))  # an empty prompt


def test_a_2x2_batch_gives_a_grid_and_a_zip(engine):
    h = BatchHandlers(engine)
    form = {**default_values(), "num_inference_steps": 2.0, "seed": 7.0}
    req = h.request(form, "a red circle\na blue square", None, 1, "styles", ["", engine.style_a.id], "", "")
    assert req.num_inference_steps == 2 and req.styles == ("", engine.style_a.id)
    out = list(h.run(req))[-1]
    assert out["batch_status"].startswith("Done: 4 of 4 image(s)") and len(out["batch_gallery"]) == 4
    with zipfile.ZipFile(out["batch_zip"]) as z:
        names = z.namelist()
    assert sum(n.endswith(".png") for n in names) == 5  # 4 images + the grid
    strengths = h.request(form, "a red circle", None, 2, "strengths", None, engine.style_a.id, "0, 1")
    assert strengths.strengths == (0.0, 1.0) and strengths.seeds_per_prompt == 2
    with pytest.raises(gr.Error, match="numbers separated by commas"):
        h.request(form, "a red circle", None, 1, "strengths", None, engine.style_a.id, "zero, one")
    with pytest.raises(gr.Error, match="Pick the style"):
        h.request(form, "a red circle", None, 1, "strengths", None, "", "0, 1")
    with pytest.raises(gr.Error, match="prompts"):
        h.request(form, "  \n ", None, 1, "styles", None, "", "")
