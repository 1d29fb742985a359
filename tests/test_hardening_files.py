"""Issue 8, files an attacker or an unlucky user can hand the app: each test is named after the issue's point and
failed on the code before its fix (points 2, 4, 7, 8, 9, 10, 11, 12)."""
from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
from pathlib import Path

import pytest
import torch
from PIL import Image

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


# ---- 9: a FIFO (or any non-regular file) named .png must not hang image intake ---------------------------------
def _call_with_deadline(fn, fifo: Path, seconds: float = 20.0):
    """Run fn in a thread; if it blocks (the old code: open() on a FIFO waits for a writer), unblock it by opening
    the FIFO for writing, then fail. Returns fn's result or raises its exception."""
    box: dict = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the test thread
            box["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    if t.is_alive():
        with contextlib.suppress(OSError):
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))  # gives the blocked reader EOF
        t.join(5)
        pytest.fail(f"image intake blocked for {seconds} s on a FIFO")
    if "error" in box:
        raise box["error"]
    return box["value"]


@pytest.mark.timeout(60)
def test_p09_fifo_and_other_non_regular_files_are_refused(tmp_path):
    from engine.images import ImageRejected, ingest_dataset, load_image

    fifo = tmp_path / "evil.png"
    os.mkfifo(fifo)
    folder = tmp_path / "folder.png"
    folder.mkdir()
    link = tmp_path / "link.png"
    link.symlink_to(fifo)
    good = tmp_path / "good.png"
    Image.new("RGB", (16, 16), "red").save(good)
    for bad, kind in ((fifo, "pipe"), (link, "pipe"), (folder, "folder")):
        with pytest.raises(ImageRejected, match=f"{kind}.*Pick a regular PNG"):
            _call_with_deadline(lambda b=bad: load_image(b), fifo)
    report = _call_with_deadline(lambda: ingest_dataset([fifo, good, folder], tmp_path / "out", resolution=16), fifo)
    assert len(report.kept) == 1 and [n for n, _ in report.rejected] == ["evil.png", "folder.png"]
