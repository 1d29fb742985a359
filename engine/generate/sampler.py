"""The one sampler: classifier-free-guidance denoising over diffusers components and schedulers.

Generation, training previews, prior images, blends and feedback all go through `sample()`, so what an artist sees
while training is what they get afterwards. diffusers' `StableDiffusionPipeline` is the referee: for the same
components, scheduler, steps, guidance and seeds, `sample()` reproduces its output (tests/test_sampling.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                       EulerDiscreteScheduler, UniPCMultistepScheduler)
from diffusers.utils.torch_utils import randn_tensor

from engine.core.config import SCHEDULERS


@dataclass
class Components:
    """The parts of a Stable Diffusion model that sampling needs (a pipeline has them all as attributes)."""

    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    unet: torch.nn.Module
    scheduler: object  # the model's own scheduler; its config seeds every scheduler we build

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def default_size(self) -> int:
        return self.unet.config.sample_size * self.vae_scale_factor

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype


def make_scheduler(name: str, base_config):
    """A fresh scheduler of the named kind, keeping the model's training schedule and prediction type."""
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; choose one of: {', '.join(SCHEDULERS)}")
    if name == "dpmpp_2m":
        return DPMSolverMultistepScheduler.from_config(base_config, algorithm_type="dpmsolver++", solver_order=2,
                                                       use_karras_sigmas=False)
    if name == "dpmpp_2m_karras":
        return DPMSolverMultistepScheduler.from_config(base_config, algorithm_type="dpmsolver++", solver_order=2,
                                                       use_karras_sigmas=True)
    if name == "ddim":
        # DDIM clips its x0 estimate to [-1, 1] unless told not to (diffusers' default clip_sample=True, meant for
        # pixel-space models). Stable Diffusion denoises VAE latents, which leave that range, so its own configs
        # say clip_sample=False; a config saved by another scheduler class (the demo model's DPM-Solver++ one)
        # lacks the key, and the default turned every DDIM image on the demo model into noise (checker: shape
        # 0.09 against 0.84 with DPM++).
        return DDIMScheduler.from_config(base_config, clip_sample=False)
    cls = {"euler": EulerDiscreteScheduler, "euler_a": EulerAncestralDiscreteScheduler,
           "unipc": UniPCMultistepScheduler}[name]
    return cls.from_config(base_config)


def tokenize(tokenizer, prompts: Sequence[str]) -> torch.Tensor:
    return tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids


@torch.no_grad()
def encode_prompts(c: Components, prompts: Sequence[str]) -> torch.Tensor:
    """Text-encoder hidden states for each prompt ([B, 77, dim]), as the pipeline computes them."""
    ids = tokenize(c.tokenizer, prompts).to(c.device)
    return c.text_encoder(ids)[0].to(c.dtype)


def cfg_combine(uncond: torch.Tensor, cond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance, Ho & Salimans 2022, eq. 6: e = e_u + w (e_c - e_u)."""
    return uncond + scale * (cond - uncond)


def rescale_guidance(guided: torch.Tensor, cond: torch.Tensor, phi: float) -> torch.Tensor:
    """Guidance rescale, Lin et al. 2023 ("Common diffusion noise schedules...") eqs. 15-16.

    Match the per-sample standard deviation of the guided prediction to the conditional one, then blend by phi.
    """
    dims = list(range(1, cond.ndim))
    std_cond = cond.std(dim=dims, keepdim=True)
    std_guided = guided.std(dim=dims, keepdim=True)
    rescaled = guided * (std_cond / std_guided)
    return phi * rescaled + (1 - phi) * guided


StepCallback = Callable[[int, int, torch.Tensor], None]  # (step index, total steps, latents); raise Cancelled


@torch.no_grad()
def sample(c: Components, prompts: Sequence[str], negative_prompts: Sequence[str], seeds: Sequence[int], *,
           num_inference_steps: int = 20, guidance_scale: float = 5.0, guidance_rescale: float = 0.0,
           scheduler: str = "dpmpp_2m", height: int | None = None, width: int | None = None,
           callback: StepCallback | None = None, output: str = "image",
           prompt_embeds: torch.Tensor | None = None, negative_embeds: torch.Tensor | None = None,
           image_embeds: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None = None,
           on_step_start: Callable[[int, int, torch.Tensor], None] | None = None) -> torch.Tensor:
    """Denoise one batch: image i uses `prompts[i]`, `negative_prompts[i]` and its own generator seeded `seeds[i]`.

    Returns images in [0, 1] as [B, 3, H, W] float32 on the CPU (or latents with output="latent").
    Conditional and unconditional halves go through the UNet in **one** batched call, in the pipeline's order
    (unconditional first), so results match `StableDiffusionPipeline` to float precision.
    `on_step_start(i, n, t)` runs before each UNet call (FABRIC collects its reference attention there).

    `image_embeds` conditions an IP-Adapter loaded into the UNet (Ye et al. 2023): one image-encoder embedding per
    image ([B, ...] or [1, ...]: [*, D] for the basic adapter, [*, tokens, width] hidden states for IP-Adapter
    Plus), or a pair (embeddings, unconditional embeddings) as the pipeline's `encode_image` returns them. The
    conditional half gets the embeddings, the unconditional half the second of the pair (default zeros), exactly as
    `StableDiffusionPipeline.prepare_ip_adapter_image_embeds` does.
    """
    n = len(prompts)
    if not (len(negative_prompts) == len(seeds) == n):
        raise ValueError("prompts, negative_prompts and seeds must have the same length")
    height = height or c.default_size
    width = width or c.default_size
    sched = make_scheduler(scheduler, c.scheduler.config)
    sched.set_timesteps(num_inference_steps, device=c.device)
    do_cfg = guidance_scale > 1.0  # as the pipeline: w <= 1 needs no unconditional pass

    cond = prompt_embeds if prompt_embeds is not None else encode_prompts(c, prompts)
    if do_cfg:
        uncond = negative_embeds if negative_embeds is not None else encode_prompts(c, negative_prompts)
        embeds = torch.cat([uncond, cond])
    else:
        embeds = cond
    added = None
    if image_embeds is not None:
        pos, neg = image_embeds if isinstance(image_embeds, tuple) else (image_embeds, None)

        def per_image(e):  # [B or 1, ...] -> [n, 1, ...]: one reference image per prompt
            e = e.to(c.device, c.dtype).unsqueeze(1)
            return e.expand(n, *e.shape[1:])

        ie = per_image(pos)
        added = {"image_embeds": [torch.cat([torch.zeros_like(ie) if neg is None else per_image(neg), ie])
                                  if do_cfg else ie]}

    # One generator per image: image i of a batch with seed s equals a single image with seed s + i.
    generators = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]
    shape = (n, c.unet.config.in_channels, height // c.vae_scale_factor, width // c.vae_scale_factor)
    latents = randn_tensor(shape, generator=generators, device=c.device, dtype=embeds.dtype)
    latents = latents * sched.init_noise_sigma
    step_kwargs = {"generator": generators} if "generator" in _step_params(sched) else {}

    timesteps = sched.timesteps
    for i, t in enumerate(timesteps):
        model_in = torch.cat([latents] * 2) if do_cfg else latents
        model_in = sched.scale_model_input(model_in, t)
        if on_step_start is not None:
            on_step_start(i, len(timesteps), t)
        pred = c.unet(model_in, t, encoder_hidden_states=embeds, added_cond_kwargs=added, return_dict=False)[0]
        if do_cfg:
            pred_uncond, pred_cond = pred.chunk(2)
            pred = cfg_combine(pred_uncond, pred_cond, guidance_scale)
            if guidance_rescale > 0:
                pred = rescale_guidance(pred, pred_cond, guidance_rescale)
        latents = sched.step(pred, t, latents, **step_kwargs, return_dict=False)[0]
        if callback is not None:
            callback(i, len(timesteps), latents)
    if output == "latent":
        return latents
    return decode(c, latents)


@torch.no_grad()
def decode(c: Components, latents: torch.Tensor) -> torch.Tensor:
    """Latents -> images in [0, 1] (float32, CPU), as the pipeline's VAE decode + postprocess."""
    images = c.vae.decode(latents / c.vae.config.scaling_factor, return_dict=False)[0]
    return (images / 2 + 0.5).clamp(0, 1).float().cpu()


def _step_params(sched) -> set[str]:
    import inspect

    return set(inspect.signature(sched.step).parameters)


def to_pil(images: torch.Tensor):
    """[B, 3, H, W] in [0, 1] -> list of PIL images (rounded as diffusers' numpy_to_pil does)."""
    from PIL import Image

    arr = (images.permute(0, 2, 3, 1).numpy() * 255).round().astype("uint8")
    return [Image.fromarray(a) for a in arr]
