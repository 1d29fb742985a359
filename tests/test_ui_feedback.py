"""The Feedback tab's handlers over a real engine (demo model, a 20-step heart LoRA): a round, ratings, history,
export, Refine, compare and revert; and the tab builds inside the app."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine.core.config import Settings
from engine.models.loading import DEMO_MODEL

pytestmark = pytest.mark.skipif(not (DEMO_MODEL / "model_index.json").exists(), reason="demo model not built")


def test_feedback_tab_round_rate_refine_revert(tmp_path, quick_subject):  # noqa: F811
    import gradio as gr
    import torch

    from engine.api import Engine
    from engine.styles.store import publish
    from ui.app import build_app
    from ui.feedback_tab import FeedbackHandlers

    torch.set_num_threads(1)
    eng = Engine(Settings(data_dir=str(tmp_path)))
    v1 = publish(eng.data_dir, "heart", quick_subject, quick_subject.parent / "style.json",
                 quick_subject.parent / "preview.png")
    assert isinstance(build_app(eng), gr.Blocks)
    h = FeedbackHandlers(eng)
    ref = f"{v1.id}@v1"
    assert (f"heart v1 ({v1.id})", ref) in h.version_choices()
    out = h.new_round(ref, "a photo of a shape", 0, 3, False)
    assert len(out["gallery"]) == 3 and len(h.round.paths) == 3
    with pytest.raises(gr.Error, match="click an image"):
        h.rate("up")
    h.select(0)
    assert h.rate("up", "nice")["status"].startswith("image 1: 5/5")
    h.select(1)
    h.rate("down", "too dark")
    h.rate(4, index=2)
    assert [row[3] for row in h.ratings_table(ref)] == [5, 1, 4]
    hist = h.history(ref)["history"]
    assert list(hist["version"]) == ["v1"] and abs(hist["liked"][0] - 2 / 3) < 1e-9
    doc = json.loads(Path(h.export(ref)["export"]).read_text())
    assert len(doc["ratings"]) == 3
    assert "saved" in h.save_defaults(ref, 0.5, 1.0, 0.0)["status"]
    assert h.load_defaults(ref) == {"strength": 0.5, "unet_weight": 1.0, "te_weight": 0.0, "block_down": 1.0,
                                    "block_mid": 1.0, "block_up": 1.0}
    res = eng.generate(__import__("engine.core.config", fromlist=["x"]).GenerateRequest(
        prompt="a photo of a shape", style=v1.id, seed=1, num_inference_steps=2))
    applied = res.images[0].recipe["styles"][0]
    assert (applied["strength"], applied["text_encoder_strength"]) == (0.5, 0.0)
    h.save_defaults(ref, 1.0, 1.0, 1.0)
    updates = list(h.refine(ref, 5, 2000.0))
    final = updates[-1]
    assert final["new_version"] == f"{v1.id}@v2" and len(final["before"]) == len(final["after"]) == 4
    assert [c.split(" seed ")[1] for _, c in final["before"]] == [c.split(" seed ")[1] for _, c in final["after"]]
    assert (f"heart v2 ({v1.id})", f"{v1.id}@v2") in h.version_choices()
    assert "v1 is the newest again" in h.revert(final["new_version"])["status"]
    assert [v.version for v in eng.style_versions(v1.id)] == [1]
    with pytest.raises(gr.Error):
        h.revert(ref)  # the only version is never removed
