"""Several styles at once: typed (id, strength) pairs, triggers of every style, recipes that list every style and
refill the request (old single-style recipes migrate), and MU-6: concurrent generations with different styles
give exactly the images each gives alone."""
from __future__ import annotations

import json
import threading

import numpy as np
import pytest
import torch
from PIL import Image, PngImagePlugin

from engine.api import Engine
from engine.core.config import ConfigError, GenerateRequest, Settings
from engine.generate.recipes import read_recipe
from tests.lora_support import make_random_style

PROMPT = "a red circle on a blue background"


@pytest.fixture(scope="module")
def eng(tiny_sd, tmp_path_factory):
    torch.manual_seed(0)
    e = Engine(Settings(model=str(tiny_sd), data_dir=str(tmp_path_factory.mktemp("multi-data"))))
    e.a = make_random_style(e.model, e.data_dir, "Alpha", seed=1, scale=0.5, trigger="zwx")
    e.b = make_random_style(e.model, e.data_dir, "Beta", seed=2, scale=0.5, trigger="qop", preset="subject")
    return e


def _px(img) -> np.ndarray:
    return np.asarray(img, np.int16)


@pytest.mark.parametrize("kwargs, words", [
    (dict(styles=(("a", "0.5"),)), "must be a number"),
    (dict(styles=(("a", True),)), "must be a number"),
    (dict(styles=(("a", float("inf")),)), "finite"),
    (dict(styles=(("a", 3.0),)), "between -2 and 2"),
    (dict(styles=("a",)), "pair"),
    (dict(style="a", styles=(("a", 1.0),)), "listed twice"),
    (dict(styles=tuple((f"s{i}", 1.0) for i in range(9))), "at most 8"),
])
def test_style_pairs_are_typed_and_validated(kwargs, words):
    with pytest.raises(ConfigError, match=words):
        GenerateRequest(prompt="x", **kwargs)


def test_lists_and_recipe_dicts_become_pairs():
    req = GenerateRequest(prompt="x", style="a", style_strength=0.5,
                          styles=[["b", 1], {"id": "c", "strength": -0.5, "name": "C", "version": 2}])
    assert req.styles == (("b", 1.0), ("c", -0.5))
    assert req.active_styles == (("a", 0.5), ("b", 1.0), ("c", -0.5))


def test_two_styles_apply_both_triggers_and_the_recipe_lists_both(eng):
    req = GenerateRequest(prompt=PROMPT, styles=((eng.a.id, 0.8), (eng.b.id, 0.6)), num_inference_steps=3, seed=2)
    res = eng.generate(req)
    g = res.images[0]
    assert "zwx style" in g.recipe["prompt"] and g.recipe["prompt"].startswith("qop ")
    assert [(s["id"], s["strength"]) for s in g.recipe["styles"]] == [(eng.a.id, 0.8), (eng.b.id, 0.6)]
    assert "Lora: Alpha:0.8, Lora: Beta:0.6" in Image.open(g.path).text["parameters"]
    one = eng.generate(GenerateRequest(prompt=PROMPT, style=eng.a.id, style_strength=0.8, num_inference_steps=3,
                                       seed=2))
    assert np.abs(_px(one.images[0].image) - _px(g.image)).max() > 5  # the second style does something
    # the recipe read back from the PNG refills the request and remakes the image exactly
    r = read_recipe(g.path)
    again = eng.generate(GenerateRequest(**{k: r[k] for k in GenerateRequest.__dataclass_fields__ if k in r}))
    assert np.array_equal(_px(again.images[0].image), _px(g.image))


def test_an_old_single_style_recipe_migrates(eng, tmp_path):
    old = {"prompt": "a cat", "seed": 3, "style": eng.a.id, "style_strength": 0.7, "num_inference_steps": 2,
           "styles": [{"id": eng.a.id, "version": 1, "name": "Alpha", "strength": 0.7, "trigger_token": "zwx"}]}
    info = PngImagePlugin.PngInfo()
    info.add_text("stylebooth", json.dumps({"schema_version": 1, **old}))
    Image.new("RGB", (8, 8)).save(tmp_path / "old.png", pnginfo=info)
    r = read_recipe(tmp_path / "old.png")
    assert "style" not in r and [(s["id"], s["strength"]) for s in r["styles"]] == [(eng.a.id, 0.7)]
    req = GenerateRequest(**{k: r[k] for k in GenerateRequest.__dataclass_fields__ if k in r})
    assert req.active_styles == ((eng.a.id, 0.7),)


def test_recipe_drop_refills_the_form_with_every_style(eng, tmp_path):
    from ui.generate_tab import GenerateHandlers

    res = eng.generate(GenerateRequest(prompt=PROMPT, styles=((eng.a.id, 0.8), (eng.b.id, 0.6)),
                                       num_inference_steps=1))
    out = GenerateHandlers(eng).load_recipe(res.images[0].path)
    assert (out["style"], out["style_strength"], out["styles"]) == (eng.a.id, 0.8, ((eng.b.id, 0.6),))
    assert "Plus 1 more style" in out["status"]


def test_concurrent_generations_with_different_styles_match_each_alone(eng):
    """MU-6: adapter load/set happen under the model lock, so a job never denoises with another job's styles."""
    reqs = [GenerateRequest(prompt=PROMPT, style=eng.a.id, num_inference_steps=12, seed=5),
            GenerateRequest(prompt=PROMPT, styles=((eng.b.id, 1.0), (eng.a.id, -0.5)), num_inference_steps=12,
                            seed=5)]
    alone = [_px(eng.generate(r).images[0].image) for r in reqs]
    assert np.abs(alone[0] - alone[1]).max() > 5
    for _ in range(2):
        out, start = [None, None], threading.Barrier(2)

        def run(k):
            start.wait()
            out[k] = _px(eng.generate(reqs[k]).images[0].image)
        threads = [threading.Thread(target=run, args=(k,)) for k in (1, 0)]
        [t.start() for t in threads]
        [t.join(300) for t in threads]
        assert np.array_equal(out[0], alone[0]) and np.array_equal(out[1], alone[1])
