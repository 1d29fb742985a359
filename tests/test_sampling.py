"""Our sampler against the referee, diffusers' StableDiffusionPipeline (max abs difference <= 1e-4 in fp32)."""
from __future__ import annotations

import pytest
import torch
from diffusers import StableDiffusionPipeline

from engine.core.config import SCHEDULERS
from engine.core.errors import Cancelled
from engine.generate.sampler import Components, make_scheduler, rescale_guidance, sample


@pytest.fixture(scope="module")
def pipes(tiny_sd, tiny_sd_v):
    torch.manual_seed(0)
    return {"epsilon": StableDiffusionPipeline.from_pretrained(tiny_sd),
            "v_prediction": StableDiffusionPipeline.from_pretrained(tiny_sd_v)}


def _components(pipe):
    return Components(pipe.vae, pipe.text_encoder, pipe.tokenizer, pipe.unet, pipe.scheduler)


def _reference(pipe, name, prompt, negative, seeds, steps, guidance, rescale=0.0, **extra):
    base = pipe.scheduler
    pipe.scheduler = make_scheduler(name, base.config)
    try:
        out = pipe(prompt, negative_prompt=negative, num_inference_steps=steps, guidance_scale=guidance,
                   guidance_rescale=rescale, num_images_per_prompt=len(seeds), output_type="pt",
                   generator=[torch.Generator().manual_seed(s) for s in seeds], **extra).images
    finally:
        pipe.scheduler = base
    return out


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_matches_diffusers_pipeline(pipes, scheduler, prediction):
    pipe = pipes[prediction]
    seeds = [11, 12, 13]
    ref = _reference(pipe, scheduler, "a red circle", "blurry", seeds, steps=6, guidance=6.0)
    ours = sample(_components(pipe), ["a red circle"] * 3, ["blurry"] * 3, seeds, num_inference_steps=6,
                  guidance_scale=6.0, scheduler=scheduler)
    assert ours.shape == ref.shape == (3, 3, 64, 64)
    assert (ours - ref).abs().max().item() <= 1e-4


def test_guidance_rescale_matches(pipes):
    pipe = pipes["v_prediction"]
    ref = _reference(pipe, "ddim", "a cat", "", [5, 6], steps=5, guidance=7.0, rescale=0.7)
    ours = sample(_components(pipe), ["a cat"] * 2, [""] * 2, [5, 6], num_inference_steps=5, guidance_scale=7.0,
                  guidance_rescale=0.7, scheduler="ddim")
    assert (ours - ref).abs().max().item() <= 1e-4


def test_rescale_is_identity_at_zero_and_matches_cond_std_at_one():
    g, c = torch.randn(2, 4, 8, 8) * 3, torch.randn(2, 4, 8, 8)
    assert torch.equal(rescale_guidance(g, c, 0.0), g)
    out = rescale_guidance(g, c, 1.0)
    assert torch.allclose(out.std(dim=(1, 2, 3)), c.std(dim=(1, 2, 3)), atol=1e-5)


@pytest.mark.parametrize("scheduler", ["dpmpp_2m", "euler_a"])
def test_per_image_seeds_reproduce_one_by_one(pipes, scheduler):
    c = _components(pipes["epsilon"])
    batch = sample(c, ["a dog"] * 3, ["ugly"] * 3, [40, 41, 42], num_inference_steps=5, scheduler=scheduler)
    for i, s in enumerate([40, 41, 42]):
        one = sample(c, ["a dog"], ["ugly"], [s], num_inference_steps=5, scheduler=scheduler)
        assert (one[0] - batch[i]).abs().max().item() <= 1e-4
    assert (batch[0] - batch[1]).abs().max().item() > 1e-3  # different seeds, different images


def test_one_batched_unet_call_per_step(pipes):
    c = _components(pipes["epsilon"])
    calls = []
    hook = c.unet.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    try:
        sample(c, ["a"] * 2, ["b"] * 2, [1, 2], num_inference_steps=4, guidance_scale=5.0)
    finally:
        hook.remove()
    assert calls == [4] * 4  # cond + uncond halves of 2 images, in one call per step


def test_callback_can_cancel(pipes):
    c = _components(pipes["epsilon"])
    seen = []

    def cb(i, total, latents):
        seen.append(i)
        if i == 2:
            raise Cancelled()

    with pytest.raises(Cancelled):
        sample(c, ["a"], [""], [0], num_inference_steps=50, callback=cb)
    assert seen == [0, 1, 2]


@pytest.mark.parametrize("scale", [0.8, {"up": {"block_1": [0.0, 1.0]}}])
def test_matches_pipeline_with_ip_adapter(tiny_sd, tiny_ip_adapter, scale):
    """Image-embedding conditioning (IP-Adapter, uncond half = zeros) matches the pipeline, incl. block scales."""
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd)
    pipe.load_ip_adapter(str(tiny_ip_adapter), subfolder="", weight_name="ip_adapter.safetensors",
                         image_encoder_folder="image_encoder")
    pipe.set_ip_adapter_scale(scale)
    emb = pipe.image_encoder(torch.randn(1, 3, 32, 32)).image_embeds.detach()  # [1, D]
    seeds = [3, 4]
    ref = _reference(pipe, "dpmpp_2m", "a red circle", "blurry", seeds, steps=5, guidance=6.0,
                     ip_adapter_image_embeds=[torch.cat([torch.zeros_like(emb), emb])[:, None, :]])
    ours = sample(_components(pipe), ["a red circle"] * 2, ["blurry"] * 2, seeds, num_inference_steps=5,
                  guidance_scale=6.0, image_embeds=emb)
    assert (ours - ref).abs().max().item() <= 1e-4
    bare = sample(_components(pipe), ["a red circle"] * 2, ["blurry"] * 2, seeds, num_inference_steps=5,
                  guidance_scale=6.0, image_embeds=torch.zeros_like(emb))
    assert (ours - bare).abs().max().item() > 1e-3  # the image embedding really conditions


def test_matches_pipeline_with_ip_adapter_plus(tiny_sd, tiny_ip_adapter_plus):
    """IP-Adapter Plus (Resampler over the encoder's penultimate hidden states): our sampler given the pair the
    pipeline's encode_image makes (image, zero image) matches the pipeline encoding the reference itself."""
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd)
    pipe.load_ip_adapter(str(tiny_ip_adapter_plus), subfolder="", weight_name="ip_adapter.safetensors",
                         image_encoder_folder="image_encoder")
    pipe.set_ip_adapter_scale({"up": {"block_1": [0.0, 1.0]}})
    image = torch.rand(1, 3, 32, 32)
    emb, neg = pipe.encode_image(image, "cpu", 1, output_hidden_states=True)  # [1, patches + 1, width] each
    assert emb.dim() == 3 and (neg - emb).abs().max().item() > 1e-3  # the zero image's states, not zeros
    seeds = [3, 4]
    ref = _reference(pipe, "dpmpp_2m", "a red circle", "blurry", seeds, steps=5, guidance=6.0, ip_adapter_image=image)
    ours = sample(_components(pipe), ["a red circle"] * 2, ["blurry"] * 2, seeds, num_inference_steps=5,
                  guidance_scale=6.0, image_embeds=(emb.detach(), neg.detach()))
    assert (ours - ref).abs().max().item() <= 1e-4
    with_zeros = sample(_components(pipe), ["a red circle"] * 2, ["blurry"] * 2, seeds, num_inference_steps=5,
                        guidance_scale=6.0, image_embeds=emb.detach())
    assert (ours - with_zeros).abs().max().item() > 1e-4  # the unconditional half really is the zero image's
