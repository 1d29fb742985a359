"""The examples in assets/examples are what scripts/make_examples.py draws (issue 14): the colour design of
SUBJECT_SCENES and STYLE_SCENES, every colour once as the shape and once as the background, is what the learning
table measured (all three textures since 2026-11-28)."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from engine.demo import world as W
from scripts.make_examples import OUT, STYLE_SCENES, SUBJECT_SCENES, example_set

# The heart predates the script and keeps its own colours (scripts/make_examples.py says why).
SCRIPTED_SUBJECTS = tuple(s for s in W.HELD_OUT_SHAPES if s != "heart")


def _luma(colour: str) -> float:
    r, g, b = W.COLORS[colour]
    return 0.299 * r + 0.587 * g + 0.114 * b  # ITU-R BT.601


def test_subject_colours_are_a_polarity_balanced_cycle():
    fgs, bgs = [s[0] for s in SUBJECT_SCENES], [s[1] for s in SUBJECT_SCENES]
    assert len(SUBJECT_SCENES) == 4 and sorted(fgs) == sorted(bgs) and len(set(fgs)) == 4  # each colour both roles
    dark_on_light = sum(_luma(fg) < _luma(bg) for fg, bg in zip(fgs, bgs))
    assert dark_on_light == 2  # two dark shapes on light grounds, two light shapes on dark grounds


def test_style_colours_are_a_cycle():
    fgs, bgs = [s[1] for s in STYLE_SCENES], [s[2] for s in STYLE_SCENES]
    assert len(STYLE_SCENES) == 4 and sorted(fgs) == sorted(bgs) and len(set(fgs)) == 4  # each colour both roles


@pytest.mark.parametrize("concept", SCRIPTED_SUBJECTS + W.HELD_OUT_TEXTURES)
def test_examples_on_disk_are_the_scripts(concept):
    for i, (scene, caption) in enumerate(example_set(concept), 1):
        on_disk = np.asarray(Image.open(OUT / concept / f"{concept}-{i}.png").convert("RGB"))
        assert np.array_equal(on_disk, np.asarray(W.draw(scene))), f"{concept}-{i}.png: rerun make_examples.py"
        assert (OUT / concept / f"{concept}-{i}.txt").read_text("utf-8").strip() == caption
    assert len(list((OUT / concept).glob("*.png"))) == 4
