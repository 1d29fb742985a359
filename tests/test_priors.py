"""Prior-image cache: hits generate nothing, top-ups generate only what is missing, keys never mix."""
from __future__ import annotations

import dataclasses

import pytest

from engine.models.loading import load_base_model
from engine.train.priors import PriorSpec, ensure_class_images, ensure_prior_set


@pytest.fixture(scope="module")
def model(tiny_sd):
    return load_base_model(tiny_sd)


def test_cache_hit_top_up_and_new_keys(model, tmp_path):
    spec = PriorSpec(model.fingerprint, "a shape", resolution=64, num_inference_steps=2)
    first = ensure_class_images(model.components, spec, tmp_path, 3)
    assert first.generated == 3 and len(first.paths) == 3
    again = ensure_class_images(model.components, spec, tmp_path, 3)
    assert again.generated == 0 and again.paths == first.paths
    more = ensure_class_images(model.components, spec, tmp_path, 5)
    assert more.generated == 2 and more.paths[:3] == first.paths
    other_prompt = ensure_class_images(model.components, dataclasses.replace(spec, class_prompt="a dog"), tmp_path, 2)
    other_model = ensure_class_images(model.components, dataclasses.replace(spec, model_fingerprint="f" * 64),
                                      tmp_path, 2)
    assert other_prompt.generated == 2 and other_model.generated == 2
    assert len({first.folder, other_prompt.folder, other_model.folder}) == 3
    assert (first.folder / "manifest.json").is_file()


def test_altered_cached_image_is_regenerated(model, tmp_path):
    spec = PriorSpec(model.fingerprint, "a shape", resolution=64, num_inference_steps=2)
    import numpy as np
    from PIL import Image

    res = ensure_class_images(model.components, spec, tmp_path, 2)
    original = np.asarray(Image.open(res.paths[1]), np.int16)
    res.paths[1].write_bytes(b"garbage")
    again = ensure_class_images(model.components, spec, tmp_path, 2)
    assert again.generated == 1
    # Same seed, same image -- up to 1/255: made alone now, in a batch of 2 before, and a batched matmul may round
    # a last bit differently (as test_image_k_of_a_run_equals_a_single_run_with_seed_plus_k allows).
    assert np.abs(np.asarray(Image.open(again.paths[1]), np.int16) - original).max() <= 1


def test_a_style_left_active_does_not_leak_into_class_images(tiny_sd, tmp_path):
    """Generate may leave a LoRA switched on; prior images are the base model's and cached under its fingerprint."""
    import torch
    from peft import LoraConfig, inject_adapter_in_model

    m = load_base_model(tiny_sd)
    spec = PriorSpec(m.fingerprint, "a shape", resolution=64, num_inference_steps=2)
    clean = ensure_class_images(m.components, spec, tmp_path / "a", 2).paths
    torch.manual_seed(0)
    inject_adapter_in_model(LoraConfig(r=4, init_lora_weights=False, target_modules=["to_q", "to_v"]),
                            m.components.unet)  # random A and B: a visible change
    styled = [p.read_bytes() for p in ensure_class_images(m.components, spec, tmp_path / "b", 2).paths]
    assert styled == [p.read_bytes() for p in clean]
    lora = [x for x in m.components.unet.modules() if hasattr(x, "disable_adapters") and hasattr(x, "lora_A")]
    assert lora and not any(x.disable_adapters for x in lora)  # switched back on afterwards
    import numpy as np
    from PIL import Image

    from engine.generate.sampler import sample, to_pil
    with_lora = to_pil(sample(m.components, ["a shape"], [""], [0], num_inference_steps=2, height=64, width=64))[0]
    assert not np.array_equal(np.asarray(with_lora), np.asarray(Image.open(clean[0])))  # the LoRA is visible


def test_several_class_prompts_share_the_images_each_under_its_own_key(model, tmp_path):
    spec = PriorSpec(model.fingerprint, "a shape", resolution=64, num_inference_steps=2)
    seen = []
    paths, prompts, made = ensure_prior_set(model.components, spec, ["a shape", "a circle", "a square"], tmp_path,
                                            5, on_progress=lambda k, n: seen.append((k, n)))
    assert prompts == ["a shape", "a circle", "a square", "a shape", "a circle"]  # interleaved: any prefix covers all
    assert made == 6 and len(paths) == 5 and seen[-1] == (6, 6)  # ceil(5/3) = 2 per prompt
    alone = ensure_class_images(model.components, dataclasses.replace(spec, class_prompt="a circle"), tmp_path, 2)
    assert alone.generated == 0 and [paths[1], paths[4]] == alone.paths  # the same cache entries
    again = ensure_prior_set(model.components, spec, ["a shape", "a circle", "a square"], tmp_path, 5)
    assert again == (paths, prompts, 0)
