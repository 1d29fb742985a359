"""Instant styles (IP-Adapter) in the engine, on the tiny random model with a random tiny IP-Adapter: library
versions of kind "instant", generation and batches with one, exact detach, "train it properly" as v2."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from engine.api import Engine
from engine.core.batch_config import BatchRequest
from engine.core.config import ConfigError, GenerateRequest, Settings
from engine.core.errors import LibraryError


@pytest.fixture(scope="module")
def engine(tiny_sd, tiny_ip_adapter, tmp_path_factory):
    return Engine(Settings(model=str(tiny_sd), data_dir=str(tmp_path_factory.mktemp("instant-data")),
                           ip_adapter=str(tiny_ip_adapter)))


@pytest.fixture(scope="module")
def refs(tmp_path_factory):
    d = tmp_path_factory.mktemp("refs")
    out = []
    for i in range(4):
        rng = np.random.default_rng(i)
        p = d / f"ref{i}.png"
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(p)
        out.append(str(p))
    return out


def _gen(engine, **kw):
    req = GenerateRequest(prompt="a red circle", num_inference_steps=3, seed=5, **kw)
    return np.asarray(engine.generate(req).images[0].image, np.float32)


def test_create_stores_references_by_hash_and_cached_embeddings(engine, refs):
    info = engine.create_instant_style("Noise look", refs + [refs[0]], strength=0.6)  # a duplicate is dropped
    assert info.kind == "instant" and info.version == 1
    meta = json.loads((info.folder / "style.json").read_text())
    assert meta["instant"]["style_only"] is True and meta["instant"]["strength"] == 0.6
    assert len(meta["instant"]["references"]) == 4 == len(engine.instant_references(info.id))
    from safetensors import safe_open
    with safe_open(str(info.folder / "image_embeds.safetensors"), framework="pt") as f:
        assert f.get_tensor("image_embeds").shape == (4, 16)
    assert info.preview is not None


def test_create_refuses_bad_input(engine, refs, tmp_path):
    with pytest.raises(ConfigError):
        engine.create_instant_style("x", [])
    with pytest.raises(ConfigError):
        engine.create_instant_style("x", refs * 3)
    bad = tmp_path / "not-an-image.png"
    bad.write_bytes(b"#!/bin/sh\necho hi\n")
    with pytest.raises(Exception, match="not-an-image"):
        engine.create_instant_style("x", [str(bad)])


def test_generate_with_instant_then_without_is_bare_again(engine, refs):
    sid = engine.create_instant_style("Look", refs[:2]).id
    bare = _gen(engine)
    styled = _gen(engine, instant_style=sid, instant_strength=1.0, instant_style_only=False)
    assert np.abs(styled - bare).max() > 1
    only = _gen(engine, instant_style=sid, instant_strength=1.0, instant_style_only=True)
    assert np.abs(only - styled).max() > 0  # block scales change the result
    assert np.array_equal(_gen(engine), bare)  # detached exactly
    res = engine.generate(GenerateRequest(prompt="a red circle", num_inference_steps=2, instant_style=sid,
                                          instant_strength=0.5))
    r = res.images[0].recipe
    assert r["instant_style"] == sid and r["instant_style_version"] == 1 and r["instant_strength"] == 0.5 and r["instant_style_only"] is True


def test_instant_with_a_lora_style_and_in_a_2x2_batch(engine, tiny_sd, refs):
    from tests.lora_support import make_random_style

    sid = engine.create_instant_style("Look2", refs[2:]).id
    lora = make_random_style(engine.model, engine.data_dir, "lora-x", seed=3)
    inst = _gen(engine, instant_style=sid)
    both = _gen(engine, style=lora.id, instant_style=sid)
    assert np.abs(both - inst).max() > 1  # the LoRA style applies on top of the instant style
    res = engine.generate_batch(BatchRequest(prompts="a red circle\na blue square", seeds_per_prompt=2,
                                             num_inference_steps=2, instant_style=sid, styles=("", lora.id)))
    assert len(res.paths) == 8 and res.grid_path is not None
    assert all(engine.read_recipe(p)["instant_style"] == sid for p in res.paths)


def test_unknown_or_non_instant_style_is_refused(engine):
    with pytest.raises(LibraryError):
        engine.generate(GenerateRequest(prompt="a", num_inference_steps=1, instant_style="nope-123"))
    with pytest.raises(ConfigError):
        GenerateRequest(prompt="a", instant_strength=3.0)


def test_offline_hub_id_gives_a_clear_message(tiny_sd, tmp_path):
    from engine.styles.instant import resolve_adapter
    with pytest.raises(LibraryError, match="offline|folder"):
        resolve_adapter("nobody/no-such-ip-adapter", demo=False)
    with pytest.raises(LibraryError, match="ip_adapter"):
        resolve_adapter("", demo=False)


def test_train_it_properly_makes_v2_of_the_same_entry(engine, tmp_path):
    p = tmp_path / "r.png"
    Image.new("RGB", (64, 64), (200, 30, 30)).save(p)
    sid = engine.create_instant_style("Red look", [str(p)]).id
    events = list(engine.train_from_instant(sid, max_train_steps=2))
    result = events[-1]
    assert result.style is not None and result.style.id == sid and result.style.version == 2
    versions = engine.style_versions(sid)
    assert [v.kind for v in versions] == ["instant", "lora"]
    assert engine.instant_references(sid)  # the card still shows the references of v1


def test_ui_panel_creates_previews_and_trains(engine, refs):
    from ui.generate_tab import GenerateHandlers
    from ui.instant_panel import InstantHandlers

    h = InstantHandlers(engine)
    out = h.create(refs[:2], "Panel look", 0.7, True)
    assert out["preview"] is not None and len(h.references(out["style_id"])) == 2
    assert out["style_id"] in {sid for _, sid in GenerateHandlers(engine).instant_choices()}
    assert out["style_id"] not in {sid for _, sid in GenerateHandlers(engine).style_choices()}
    lines = list(h.train(out["style_id"], steps=2))
    assert "v2" in lines[-1]


def test_the_app_builds_with_the_panel(engine):
    from ui.app import build_app

    assert build_app(engine) is not None


def test_batch_panel_takes_the_forms_instant_style_and_references_are_served_from_copies(engine, refs):
    from ui.batch_panel import BatchHandlers
    from ui.generate_tab import default_values
    from ui.instant_panel import InstantHandlers

    sid = engine.create_instant_style("Batch look", refs[:2]).id
    form = {**default_values(), "instant_style": sid, "instant_strength": 0.4, "instant_style_only": False}
    req = BatchHandlers(engine).request(form, "a red circle\na blue square", None, 1, "styles", [""], "", "")
    assert (req.instant_style, req.instant_strength, req.instant_style_only) == (sid, 0.4, False)
    shown = InstantHandlers(engine).references(sid)
    assert len(shown) == 2 and not any(str(engine.data_dir) in p for p in shown)  # the data dir is blocked


def test_ip_adapter_plus_matches_plain_diffusers_and_detaches(tiny_sd, tiny_ip_adapter_plus, refs, tmp_path):
    """IP-Adapter Plus (Resampler over patch features): cached hidden states per reference, the unconditional
    half is the zero image's hidden states (diffusers' encode_image), images equal plain diffusers' to 1e-4, and
    the Resampler's attention layers go away on detach."""
    import torch
    from diffusers import StableDiffusionPipeline
    from safetensors import safe_open

    from engine.generate.sampler import make_scheduler

    eng = Engine(Settings(model=str(tiny_sd), data_dir=str(tmp_path / "data"), ip_adapter=str(tiny_ip_adapter_plus)))
    info = eng.create_instant_style("Plus look", refs[:2])
    with safe_open(str(info.folder / "image_embeds.safetensors"), framework="pt") as f:
        assert f.get_tensor("image_embeds").shape == (2, 17, 32)  # (32 / 8)^2 patches + class token, width 32
    bare = _gen(eng)
    n_procs = len(eng.model.components.unet.attn_processors)
    req = GenerateRequest(prompt="a red circle", negative_prompt="blurry", num_inference_steps=5, seed=5,
                          guidance_scale=6.0, instant_style=info.id, instant_strength=0.7, instant_style_only=False)
    ours = np.asarray(eng.generate(req).images[0].image, np.float32)
    assert np.abs(ours - bare).max() > 1
    assert np.array_equal(_gen(eng), bare) and len(eng.model.components.unet.attn_processors) == n_procs

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None, requires_safety_checker=False)
    pipe.load_ip_adapter(str(tiny_ip_adapter_plus), subfolder="", weight_name="ip_adapter.safetensors",
                         image_encoder_folder="image_encoder")
    pipe.set_ip_adapter_scale(0.7)
    pipe.scheduler = make_scheduler("dpmpp_2m", pipe.scheduler.config)
    images = [Image.open(p).convert("RGB") for p in refs[:2]]
    emb, neg = pipe.encode_image(images, "cpu", 1, output_hidden_states=True)
    emb, neg = emb.mean(0, keepdim=True).detach(), neg[:1].detach()  # ours: the mean of the references
    ref = pipe("a red circle", negative_prompt="blurry", num_inference_steps=5, guidance_scale=6.0,
               generator=torch.Generator().manual_seed(5), ip_adapter_image_embeds=[torch.cat([neg, emb])[:, None]],
               output_type="np").images[0]
    assert np.abs(ours - np.round(ref * 255)).max() <= 1  # our PNG is the pipeline's image to a rounding step
    with eng._lock:
        _, (our_emb, our_neg) = eng._activate_instant(info.id, 0.7, False)
        eng._detach_instant()
    assert (our_emb - emb).abs().max().item() <= 1e-5 and (our_neg - neg).abs().max().item() <= 1e-5
