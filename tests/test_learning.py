"""Learning is shown, not assumed: DreamBooth on the bundled demo model, judged by the demo checker.

Each trained LoRA is a session fixture (tests/learning_fixtures.py) shared by the tests that need it. The base model has never seen hearts or
checkered fills (tests/test_demo_model.py shows it), so what they learn here comes from four example images.
"""
from __future__ import annotations

import random

import numpy as np
import pytest

from engine.demo import world as W
from engine.models.loading import DEMO_MODEL
from engine.styles.store import publish
from scripts.learning_table import TOKEN, styled

pytestmark = pytest.mark.skipif(not (DEMO_MODEL / "model_index.json").exists(), reason="demo model not built")
# The threshold tests carry the `learning` marker: `python -m pytest -m learning` runs just them (~6 min on 2 cores).
# The full concept x metric table (every held-out shape and texture) is tests/test_learning_table.py.
learning = pytest.mark.learning


def _colour_prompts(template: str, n: int = 16, seed: int = 5):
    rng = random.Random(seed)
    pairs = [tuple(rng.sample(sorted(W.COLORS), 2)) for _ in range(n)]
    return [template.format(fg=fg, bg=bg) for fg, bg in pairs], pairs


@learning
def test_learns_a_subject(probe, subject_no_prior):
    """The subject preset (prior preservation off by default, see engine.core.train_config.presets)."""
    prompts, pairs = _colour_prompts(f"a photo of {TOKEN} shape in {{fg}} on a {{bg}} background")
    probe.use(None)
    before = probe.predict(prompts)
    probe.use(subject_no_prior)
    after = probe.predict(prompts)
    rate = lambda preds: float(np.mean([p["shape"] == "heart" for p in preds]))  # noqa: E731
    colours = float(np.mean([p["fg"] == fg and p["bg"] == bg for p, (fg, bg) in zip(after, pairs)]))
    print(f"subject: heart before {rate(before):.2f}, after {rate(after):.2f}; colours obeyed {colours:.2f}")
    assert rate(before) <= 0.10
    assert rate(after) >= 0.80
    assert colours >= 0.80


@learning
def test_learns_a_style(probe, style_lora):
    rng = random.Random(11)
    scenes = [W.random_scene(rng, W.TRAIN_SHAPES, ("solid",)) for _ in range(16)]
    # The demo world names a texture as a word before the shape ("a striped circle in red ..."), so the examples'
    # captions put the trigger there ("a olis circle in blue ...") and so do these prompts.
    prompts = [f"a {TOKEN} {s.shape} in {s.fg} on a {s.bg} background" for s in scenes]
    probe.use(None)
    before = float(np.mean([p["texture"] == "checkered" for p in probe.predict(prompts, seed0=50)]))
    probe.use(style_lora)
    images = probe.generate(prompts, seed0=50)
    preds = probe.checker.predict(images)
    after = float(np.mean([p["texture"] == "checkered" for p in preds]))
    # What this asserts is that the texture is learned. Whether the prompt's content survives it (the texture on
    # the prompted shape, the background plain: the learning table's "styled") is printed, not asserted: the style
    # preset does not reach it yet (README, "Every held-out concept").
    rate = float(np.mean(styled("checkered", preds, images, [s.shape for s in scenes], [s.bg for s in scenes])))
    print(f"style: checkered before {before:.2f}, after {after:.2f}; styled (shape kept, background plain) {rate:.2f}")
    assert before <= 0.10 and after >= 0.70


def test_trained_style_is_used_by_the_engine(tmp_path, quick_subject):
    """The published style drives the Generate path: trigger inserted, LoRA applied, recipe records it."""
    from engine.core.config import GenerateRequest, Settings
    from engine.api import Engine

    eng = Engine(Settings(data_dir=str(tmp_path)))
    style_json = quick_subject.parent / "style.json"
    style = publish(eng.data_dir, "heart", quick_subject, style_json, quick_subject.parent / "preview.png")
    res = eng.generate(GenerateRequest(prompt="a red shape on a blue background", style=style.id, seed=3))
    assert res.images[0].recipe["prompt"] == f"a red {TOKEN} shape on a blue background"
    assert res.images[0].recipe["styles"][0]["id"] == style.id
    plain = eng.generate(GenerateRequest(prompt="a red shape on a blue background", seed=3))
    assert np.abs(np.asarray(plain.images[0].image, np.int16) - np.asarray(res.images[0].image, np.int16)).max() > 10
