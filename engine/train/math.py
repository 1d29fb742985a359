"""The math of a DreamBooth step: small pure functions, each naming its source (used by engine/train/loop.py)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.core.config import ConfigError

# ---- math: small pure functions, each naming its source --------------------------------------------------------

def diffusion_target(noise_scheduler, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """What the UNet must predict, as the scheduler's `prediction_type` says: ε (Ho et al. 2020, eq. 14) or
    v = α_t ε − σ_t x0 (Salimans & Ho 2022, "Progressive Distillation", §4)."""
    kind = noise_scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return noise_scheduler.get_velocity(latents, noise, t)
    raise ConfigError(f"base model predicts {kind!r}; only 'epsilon' and 'v_prediction' models can be trained")


def sample_timesteps(n: int, lo: int, hi: int, num_train_timesteps: int, generator: torch.Generator) -> torch.Tensor:
    """n timesteps uniform in [lo, min(hi, num_train_timesteps)) (Ho et al. 2020, Algorithm 1 draws them from the
    whole range; kohya sd-scripts' --min_timestep/--max_timestep narrow it), on the CPU generator."""
    hi = min(hi, num_train_timesteps)
    if lo >= hi:
        raise ConfigError(f"`min_timestep` {lo} leaves no timestep: this model has {num_train_timesteps}; "
                          f"use a min_timestep below {num_train_timesteps}")
    return torch.randint(lo, hi, (n,), generator=generator)


def min_snr_weights(snr: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-γ loss weights (Hang et al. 2023): min(SNR, γ)/SNR for ε-prediction, min(SNR, γ)/(SNR+1) for v."""
    clipped = torch.minimum(snr, torch.full_like(snr, gamma))
    if prediction_type == "v_prediction":
        return clipped / (snr + 1)
    return torch.where(snr > 0, clipped / snr.clamp_min(1e-12), torch.ones_like(snr))  # SNR 0: zero-terminal-SNR


def offset_noise(shape, generator: torch.Generator, offset: float) -> torch.Tensor:
    """Gaussian noise plus a per-channel constant (Guttenberg 2023, "Diffusion with Offset Noise"), on the CPU
    generator so that runs are identical on any device."""
    noise = torch.randn(shape, generator=generator)
    if offset > 0:
        noise = noise + offset * torch.randn((shape[0], shape[1], 1, 1), generator=generator)
    return noise


def dreambooth_loss(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor, with_prior: bool,
                    prior_loss_weight: float) -> torch.Tensor:
    """DreamBooth objective with class-prior preservation (Ruiz et al. 2023, eq. 2): instance MSE + λ · class MSE.

    The batch is [instance half; class half]; `weights` are per-sample (min-SNR or ones) and apply to both halves,
    since both are ordinary denoising losses."""
    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=list(range(1, pred.ndim)))
    per_sample = per_sample * weights
    if not with_prior:
        return per_sample.mean()
    instance, prior = per_sample.chunk(2)
    return instance.mean() + prior_loss_weight * prior.mean()


def uncond_preservation_mse(pred_empty: torch.Tensor, base_empty: torch.Tensor) -> torch.Tensor:
    """Mean squared difference between the trained model's prediction for the empty prompt and the frozen base
    model's at the same noisy latents and timesteps (TrainConfig.uncond_preservation_weight).

    Why: sampling uses classifier-free guidance (Ho & Salimans 2022, eq. 6): e~ = e_u + w (e_c - e_u), with e_u the
    empty prompt's prediction. A LoRA that learns its style into e_u as much as into e_c (its convolutions see
    every prompt) puts little of it into e_c - e_u, so guidance w = 5 amplifies the base model's prompted look
    over it. Holding e_u to the base model's moves the style into e_c - e_u, which guidance amplifies. The base
    prediction is a constant target (no gradient): only the LoRA branch learns from this term."""
    return F.mse_loss(pred_empty.float(), base_empty.detach().float())


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or (isinstance(exc, RuntimeError) and "out of memory" in str(exc))
