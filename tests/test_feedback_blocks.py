"""Per-block UNet weights of a style version (down / mid / up blocks): applied by AdapterCache on every LoRA layer
of each block, the same fused and unfused, 0 everywhere is the style off, saved with the version's defaults and
recorded in the recipe. Tiny random SD model and a random LoRA on attention, feed-forward and ResNet convs (the
trainer's layer set) plus the text encoder."""
from __future__ import annotations

import pytest
import torch

from engine.api import Engine
from engine.core.config import ConfigError, GenerateRequest, Settings
from engine.generate.sampler import sample
from tests.lora_support import make_random_style

PROMPT = "a red circle"


@pytest.fixture(scope="module")
def eng(tiny_sd, tmp_path_factory):
    torch.set_num_threads(1)
    e = Engine(Settings(model=str(tiny_sd), data_dir=str(tmp_path_factory.mktemp("blocks-data"))))
    e.style = make_random_style(e.model, e.data_dir, "S", seed=5, rank=4, alpha=4, scale=0.5)
    return e


def _images(eng, weight, *, fuse: bool):
    """Float images with the style at `weight` through AdapterCache (fused or not), seed 3."""
    from engine.styles.adapters import AdapterCache

    with eng._lock:
        if eng._adapters is None or eng._adapters.fuse != fuse:
            if eng._adapters is not None:
                eng._adapters.unload_all()
            eng._adapters = AdapterCache(eng.model.components, fuse=fuse)
        eng._adapters.activate_many([(eng.style, weight)] if weight is not None else [])
        return sample(eng.model.components, [PROMPT], [""], [3], num_inference_steps=4, guidance_scale=5.0)


def _diff(a, b) -> float:
    return float((a - b).abs().max())


@pytest.mark.parametrize("fuse", [False, True])
def test_zero_everywhere_is_the_style_off_and_blocks_change_the_image(eng, fuse):
    off = _images(eng, None, fuse=fuse)
    full = _images(eng, {"unet": 1.0, "text_encoder": 1.0}, fuse=fuse)
    zero = _images(eng, {"unet": {"down": 0.0, "mid": 0.0, "up": 0.0}, "text_encoder": 0.0}, fuse=fuse)
    ones = _images(eng, {"unet": {"down": 1.0, "mid": 1.0, "up": 1.0}, "text_encoder": 1.0}, fuse=fuse)
    no_up = _images(eng, {"unet": {"down": 1.0, "mid": 1.0, "up": 0.0}, "text_encoder": 1.0}, fuse=fuse)
    no_down = _images(eng, {"unet": {"down": 0.0, "mid": 1.0, "up": 1.0}, "text_encoder": 1.0}, fuse=fuse)
    print(f"fuse={fuse}: |full-off| {_diff(full, off):.4f}, |zero-off| {_diff(zero, off):.2e}, "
          f"|no_up-full| {_diff(no_up, full):.4f}, |no_down-full| {_diff(no_down, full):.4f}")
    assert _diff(full, off) > 1e-2  # the style does something
    assert _diff(zero, off) < 1e-5  # every LoRA layer of every block at 0 (and the text encoder): off
    assert _diff(ones, full) < 1e-5  # block weights 1 are the plain weight
    assert _diff(no_up, full) > 1e-3 and _diff(no_down, full) > 1e-3 and _diff(no_up, no_down) > 1e-3


def test_fused_and_unfused_give_the_same_image_with_block_weights(eng):
    w = {"unet": {"down": 0.3, "mid": 1.5, "up": 0.7}, "text_encoder": 0.8}
    unfused = _images(eng, w, fuse=False)
    fused = _images(eng, w, fuse=True)
    print(f"fused vs unfused with block weights: {_diff(fused, unfused):.2e}")
    assert _diff(fused, unfused) < 1e-4
    # switching back to plain weights restores exactly what plain weights give (the fused copy was unfused)
    plain = _images(eng, 1.0, fuse=True)
    assert _diff(plain, _images(eng, 1.0, fuse=False)) < 1e-4


def test_block_weights_are_version_defaults_applied_and_recorded(eng):
    ref = f"{eng.style.id}@v1"
    req = GenerateRequest(prompt=PROMPT, style=eng.style.id, seed=3, num_inference_steps=3)
    try:
        plain = eng.generate(req).images[0]
        assert "unet_blocks" not in plain.recipe["styles"][0]
        d = eng.set_version_defaults(ref, blocks={"down": 0.5, "up": 0.0})
        assert d["blocks"] == {"down": 0.5, "mid": 1.0, "up": 0.0}
        assert Engine(Settings(model=eng.settings.model, data_dir=str(eng.data_dir))).version_defaults(ref) == d
        shaped = eng.generate(req).images[0]
        assert shaped.recipe["styles"][0]["unet_blocks"] == {"down": 0.5, "mid": 1.0, "up": 0.0}
        assert _diff(_t(shaped), _t(plain)) > 0
        # 0 in every block and on the text encoder: the style is off (no adapter, no trigger), as at strength 0
        eng.set_version_defaults(ref, te_weight=0.0, blocks={"down": 0.0, "mid": 0.0, "up": 0.0})
        zero = eng.generate(req).images[0]
        off = eng.generate(GenerateRequest(prompt=PROMPT, styles=((eng.style.id, 0.0),), seed=3,
                                           num_inference_steps=3)).images[0]
        assert _diff(_t(zero), _t(off)) == 0 and zero.recipe["styles"][0]["strength"] == 0.0
        with pytest.raises(ConfigError, match="'down', 'mid' and 'up'"):
            eng.set_version_defaults(ref, blocks={"middle": 1.0})
    finally:
        eng.set_version_defaults(ref)


def _t(img):
    import numpy as np

    return torch.from_numpy(np.asarray(img.image, np.int16))
