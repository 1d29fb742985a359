"""Blending styles: the live blend is the weighted LoRA sum, an exact bake reproduces it, an SVD bake reports its
error, and a strip runs from style A to style B. Tiny random model, two random-B LoRAs with conv layers (LoCon)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from engine.api import Engine
from engine.core.blend_config import BakeRequest, BlendRequest, BlendStripRequest
from engine.core.config import ConfigError, GenerateRequest, Settings
from engine.generate.recipes import read_recipe
from engine.generate.sampler import sample
from tests.lora_support import ATTN, make_random_style

PROMPT = "a red circle on a blue background"


@pytest.fixture(scope="module")
def eng(tiny_sd, tmp_path_factory):
    torch.manual_seed(0)
    e = Engine(Settings(model=str(tiny_sd), data_dir=str(tmp_path_factory.mktemp("blend-data"))))
    # A: rank 4, alpha 8 (scale 2), LoCon + text encoder; B: rank 2, alpha 2, attention only: different ranks,
    # scales and layer sets must all bake correctly.
    e.style_a = make_random_style(e.model, e.data_dir, "A", seed=1, rank=4, alpha=8, scale=0.5)
    e.style_b = make_random_style(e.model, e.data_dir, "B", seed=2, rank=2, alpha=2, unet_targets=ATTN,
                                  scale=0.8)
    return e


def _live(eng, weighted, prompt=PROMPT, seed=3):
    """Float images (not rounded to 8 bits) with these styles active, through the one sampler."""
    with eng._lock:
        eng._activate_styles(weighted)
        return sample(eng.model.components, [prompt], [""], [seed], num_inference_steps=4, guidance_scale=5.0)


def test_blend_requests_are_validated():
    with pytest.raises(ConfigError, match="at least 2 styles"):
        BlendRequest(("a",), (1.0,))
    with pytest.raises(ConfigError, match="one weight per style"):
        BlendRequest(("a", "b"), (1.0,))
    with pytest.raises(ConfigError, match="finite"):
        BlendRequest(("a", "b"), (1.0, float("nan")))
    with pytest.raises(ConfigError, match="must be a number"):
        BlendRequest(("a", "b"), (1.0, "0.5"))
    with pytest.raises(ConfigError, match="listed twice"):
        BlendRequest(("a", "a"), (1.0, 0.5))
    with pytest.raises(ConfigError, match="rank"):
        BakeRequest("x", BlendRequest(("a", "b"), (1, 1)), method="svd")
    with pytest.raises(ConfigError, match="different"):
        BlendStripRequest(prompt="x", style_a="a", style_b="a")
    assert BlendStripRequest(prompt="x", style_a="a", style_b="b", num_images=5).weights[1] == (0.75, 0.25)


def test_styles_change_images_and_blend_is_not_either(eng):
    a, b = eng.style_a.id, eng.style_b.id
    base, ia, ib = _live(eng, []), _live(eng, [(a, 1.0)]), _live(eng, [(b, 1.0)])
    mix = _live(eng, [(a, 0.5), (b, 0.5)])
    assert min((ia - base).abs().max(), (ib - base).abs().max(), (mix - ia).abs().max()) > 0.05


def test_exact_bake_gives_the_live_blends_images(eng):
    a, b = eng.style_a.id, eng.style_b.id
    blend = BlendRequest((a, b), (0.7, 0.6), text_encoder_weights=(0.3, 1.2))  # per-component weights too
    live = _live(eng, blend.weighted)
    res = eng.bake_blend(BakeRequest("A+B", blend))
    assert res.method == "exact" and res.rank == 4 + 2 and res.relative_error == 0.0
    baked = _live(eng, [(res.style.id, 1.0)])
    assert (baked - live).abs().max() <= 1e-4
    meta = json.loads((res.style.folder / "style.json").read_text())
    assert meta["provenance"]["description"].startswith("blend of A v1 (0.7) + B v1 (0.6)")
    assert meta["base_model_fingerprint"] == eng.model.fingerprint
    from safetensors import safe_open
    with safe_open(str(res.style.lora), "pt") as f:  # conv LoRA stays a conv kernel (LoCon), rank 6
        conv = [k for k in f.keys() if k.endswith("resnets.0.conv1.lora_A.weight")][0]
        assert f.get_tensor(conv).shape[0] == 6 and f.get_tensor(conv).ndim == 4


def test_svd_bake_reports_its_error_and_full_rank_is_exact(eng):
    a, b = eng.style_a.id, eng.style_b.id
    blend = BlendRequest((a, b), (0.5, 1.0))
    live = _live(eng, blend.weighted)
    full = eng.bake_blend(BakeRequest("full", blend, method="svd", rank=6))
    assert full.relative_error < 1e-5 and full.rank == 6
    assert (_live(eng, [(full.style.id, 1.0)]) - live).abs().max() <= 1e-4
    low = eng.bake_blend(BakeRequest("low", blend, method="svd", rank=1))
    assert 0.05 < low.relative_error < 1.0
    meta = json.loads((low.style.folder / "style.json").read_text())
    assert meta["provenance"]["relative_error"] == pytest.approx(low.relative_error)


def test_strip_runs_from_a_to_b_and_its_ends_are_the_styles_alone(eng):
    a, b = eng.style_a.id, eng.style_b.id
    req = BlendStripRequest(prompt=PROMPT, style_a=a, style_b=b, num_images=4, num_inference_steps=3, seed=11)
    res = eng.blend_strip(req)
    assert not res.cancelled and len(res.images) == 4 and res.strip_path.is_file()
    assert res.weights[0] == (1.0, 0.0) and res.weights[-1] == (0.0, 1.0)
    common = dict(prompt=PROMPT, num_inference_steps=3, seed=11)
    alone_a = eng.generate(GenerateRequest(style=a, **common)).images[0].image
    alone_b = eng.generate(GenerateRequest(style=b, **common)).images[0].image
    assert np.array_equal(np.asarray(res.images[0].image), np.asarray(alone_a))
    assert np.array_equal(np.asarray(res.images[-1].image), np.asarray(alone_b))
    recipe = read_recipe(res.images[1].path)
    assert [(s["id"], s["strength"]) for s in recipe["styles"]] == [(a, pytest.approx(2 / 3)), (b, pytest.approx(1 / 3))]
    refill = GenerateRequest(**{k: recipe[k] for k in GenerateRequest.__dataclass_fields__ if k in recipe})
    again = eng.generate(refill).images[0].image
    assert np.array_equal(np.asarray(again), np.asarray(res.images[1].image))


def test_a_style_of_another_base_model_is_refused(eng, tmp_path):
    import shutil

    other = eng.data_dir / "styles" / "other-1" / "v1"
    shutil.copytree(eng.style_b.folder, other)
    meta = json.loads((other / "style.json").read_text())
    meta.update(id="other-1", base_model_fingerprint="f" * 64)
    (other / "style.json").write_text(json.dumps(meta))
    eng.library.register_folder(other)  # as an import or a copy from another machine would be
    with pytest.raises(ConfigError, match="cannot be used here: trained on"):
        eng.bake_blend(BakeRequest("x", BlendRequest((eng.style_a.id, "other-1"), (1, 1))))
    with pytest.raises(ConfigError, match="cannot be used here: trained on"):
        eng.blend_strip(BlendStripRequest(prompt="x", style_a=eng.style_a.id, style_b="other-1", num_images=2,
                                          num_inference_steps=1))
    eng.library.delete("other-1")
    eng.library.empty_trash()
