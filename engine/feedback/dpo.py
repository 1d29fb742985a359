"""The losses of a refinement round: small pure functions, each naming its source (used by refine.py)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def diffusion_dpo_loss(policy_w: torch.Tensor, ref_w: torch.Tensor, policy_l: torch.Tensor, ref_l: torch.Tensor,
                       beta: float, weight: torch.Tensor | float = 1.0) -> torch.Tensor:
    """Diffusion-DPO, Wallace et al. 2024 ("Diffusion Model Alignment Using Direct Preference Optimization"), eq. 14:

        L = -log σ( -β T ω(λ_t) ( ‖ε_w - ε_θ(x^w_t,t)‖² - ‖ε_w - ε_ref(x^w_t,t)‖²
                                 - (‖ε_l - ε_θ(x^l_t,t)‖² - ‖ε_l - ε_ref(x^l_t,t)‖²) ) )

    The arguments are the per-pair squared errors ‖ε - ε_·(x_t, t)‖² ([B]) of the policy and of the reference
    model on the preferred (w) and the dispreferred (l) image; `beta` is β·T (T folded in, as the paper's code
    does), `weight` is ω(λ_t) (1 by default, the paper's choice). Averaged over the pairs. When the policy equals
    the reference, every difference is 0 and L = log 2.
    """
    inside = (policy_w - ref_w) - (policy_l - ref_l)
    return -F.logsigmoid(-beta * weight * inside).mean()


def per_sample_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """‖target - pred‖² averaged over every dimension but the batch ([B]), in fp32."""
    return F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=list(range(1, pred.ndim)))


def rated_sft_loss(errors: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Reward-weighted regression on the liked images (Lee et al. 2023, "Aligning Text-to-Image Models using Human
    Feedback", eq. 1 without the pre-training term): Σ_i r_i ‖ε_i - ε_θ(x_t,i, t)‖² / Σ_i r_i."""
    weights = weights.to(errors)
    return (weights * errors).sum() / weights.sum().clamp_min(1e-8)
