"""Issue 8, files an attacker or an unlucky user can hand the app: each test is named after the issue's point and
failed on the code before its fix (points 2, 4, 7, 8, 9, 10, 11, 12)."""
from __future__ import annotations

import json
import logging

import pytest
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


# ---- 7: one malformed style.json must not empty the style picker -----------------------------------------------
@pytest.mark.parametrize("bad", [
    "[]", '{"id": "x", "trigger_token": "olis", "version": null}',
    '{"id": "x", "trigger_token": "olis", "created": 20260101}', '{"trigger_token": "olis"}', "{not json",
    '{"id": "x", "trigger_token": "olis", "training_config": []}', '{"id": "x", "trigger_token": "olis", "version": true}',
    "[" * 100_000,
], ids=["list", "version-null", "created-int", "no-id", "invalid-json", "config-list", "version-bool", "deep"])
def test_p07_malformed_style_json_is_skipped_with_a_warning(tmp_path, caplog, bad):
    from engine.styles import list_styles, publish

    lora, meta = tmp_path / "l.safetensors", tmp_path / "style.json"
    lora.write_bytes(b"x")
    meta.write_text(json.dumps({"trigger_token": "olis", "preset": "subject", "created": "2026-01-01"}))
    good = publish(tmp_path / "data", "Good", lora, meta)
    broken = tmp_path / "data" / "styles" / "broken-1" / "v1"
    broken.mkdir(parents=True)
    (broken / "style.json").write_text(bad)
    with caplog.at_level(logging.WARNING, logger="engine.styles"):
        styles = list_styles(tmp_path / "data")
    assert [s.id for s in styles] == [good.id]
    assert any("broken-1" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
