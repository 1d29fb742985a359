"""Issue 8, files an attacker or an unlucky user can hand the app: each test is named after the issue's point and
failed on the code before its fix (points 2, 4, 7, 8, 9, 10, 11, 12)."""
from __future__ import annotations

import torch

from engine.models import DEMO_MODEL


def test_p12_demo_model_runs_in_plain_diffusers_without_dtype():
    """The first thing a diffusers user types: no dtype argument, and it must generate (was: Half and Float)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(DEMO_MODEL)
    pipe.set_progress_bar_config(disable=True)
    out = pipe("a red circle on a blue background", num_inference_steps=2,
               generator=torch.Generator().manual_seed(0))
    assert out.images[0].size == (32, 32)
