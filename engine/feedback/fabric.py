"""Instant feedback without training: FABRIC (von Rütte et al. 2023, "FABRIC: Personalizing Diffusion Models with
Iterative Feedback").

At every denoising step inside a window, the liked and disliked reference images are noised to the current timestep
and run through the UNet once; the inputs of every self-attention layer (attn1) are kept. In the sampler's own UNet
call, each attn1 then attends to its own tokens *and* to the references' tokens: liked references are joined to
the conditional half of the batch, disliked ones to the unconditional half, so classifier-free guidance pushes
towards the liked and away from the disliked images. A reference token's attention weight is scaled by `w`
(the paper's eq. 3: probabilities multiplied by w and renormalised, i.e. log w added to its logit).

The processor wraps whatever attn1 runs: LoRA styles live in the attention's to_q/to_k/to_v/to_out layers (peft
layers or fused weights), which it calls, so styles and feedback compose. Cross-attention (attn2) is untouched.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F

from engine.core.errors import ConfigError

# Documented defaults (FABRIC's own defaults are a window of the first 80% of the steps and weights 0.8 / 0.5;
# our demo model, 32x32 with a 4x4 latent at the attention layers, was checked on its training seeds).
MAX_REFERENCES = 8  # liked + disliked images used per generation; more cost one UNet batch row each per step
POS_WEIGHT = 0.8
NEG_WEIGHT = 0.5
FEEDBACK_START = 0.0  # fraction of the denoising steps
FEEDBACK_END = 0.8


@dataclass(frozen=True)
class FabricParams:
    """How strongly and when rated images steer generation (see module doc)."""

    pos_weight: float = POS_WEIGHT
    neg_weight: float = NEG_WEIGHT
    start: float = FEEDBACK_START
    end: float = FEEDBACK_END
    max_references: int = MAX_REFERENCES
    reference_prompt: str = ""  # FABRIC runs the references with the null prompt

    def __post_init__(self):
        if not (0.0 <= self.pos_weight <= 10.0 and 0.0 <= self.neg_weight <= 10.0):
            raise ConfigError(f"feedback weights must be between 0 and 10, not {self.pos_weight} / {self.neg_weight}")
        if not (0.0 <= self.start < self.end <= 1.0):
            raise ConfigError(f"feedback window must satisfy 0 <= start < end <= 1, not {self.start}..{self.end}")
        if not (1 <= self.max_references <= 32):
            raise ConfigError(f"`max_references` must be 1..32 but is {self.max_references}")


@dataclass
class _State:
    mode: str = "off"  # "off" | "collect" | "apply"
    cached: dict = field(default_factory=dict)  # attn1 name -> reference hidden states [R, seq, dim]
    n_pos: int = 0
    pos_weight: float = 0.0
    neg_weight: float = 0.0
    cfg: bool = True


def weighted_attention(attn, x: torch.Tensor, refs: torch.Tensor, w: float) -> torch.Tensor:
    """Self-attention of `x` [B, n, d] over its own tokens plus `refs` [m, d] (shared by the batch), reference
    tokens weighted by w (FABRIC eq. 3); the same projections (LoRA included) and output layers as attn1."""
    b, n, _ = x.shape
    ctx = torch.cat([x, refs[None].expand(b, -1, -1).to(x)], dim=1)
    q, k, v = attn.to_q(x), attn.to_k(ctx), attn.to_v(ctx)
    heads = attn.heads
    q, k, v = (t.view(b, -1, heads, t.shape[-1] // heads).transpose(1, 2) for t in (q, k, v))
    if getattr(attn, "norm_q", None) is not None:
        q = attn.norm_q(q)
    if getattr(attn, "norm_k", None) is not None:
        k = attn.norm_k(k)
    bias = torch.zeros(ctx.shape[1], dtype=q.dtype, device=q.device)
    bias[n:] = math.log(max(w, 1e-6))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias[None, None, None, :].expand(b, heads, n, -1))
    out = out.transpose(1, 2).reshape(b, n, -1).to(x.dtype)
    out = attn.to_out[1](attn.to_out[0](out))
    if attn.residual_connection:
        out = out + x
    return out / attn.rescale_output_factor


class FabricAttnProcessor:
    """Wraps one attn1 processor: records its input while references run, joins them while the sample runs."""

    def __init__(self, name: str, inner, state: _State):
        self.name, self.inner, self.state = name, inner, state

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args,
                 **kwargs):
        st = self.state
        plain = lambda h: self.inner(attn, h, encoder_hidden_states, attention_mask, temb, *args, **kwargs)  # noqa
        if st.mode == "collect":
            st.cached[self.name] = hidden_states.detach()
            return plain(hidden_states)
        refs = st.cached.get(self.name)
        if st.mode != "apply" or refs is None or hidden_states.ndim != 3 or attention_mask is not None:
            return plain(hidden_states)
        pos, neg = refs[:st.n_pos].flatten(0, 1), refs[st.n_pos:].flatten(0, 1)
        b = hidden_states.shape[0]
        halves = ([(hidden_states[: b // 2], neg, st.neg_weight), (hidden_states[b // 2:], pos, st.pos_weight)]
                  if st.cfg else [(hidden_states, pos, st.pos_weight)])
        outs = [weighted_attention(attn, h, r, w) if len(r) and w > 0 else plain(h) for h, r, w in halves]
        return torch.cat(outs)


@torch.no_grad()
def encode_images(c, images: Sequence) -> torch.Tensor:
    """PIL images -> VAE latents (mean, scaled), at the model's default size."""
    import numpy as np

    size = c.default_size
    arr = np.stack([np.asarray(im.convert("RGB").resize((size, size)), np.float32) / 127.5 - 1 for im in images])
    px = torch.from_numpy(arr).permute(0, 3, 1, 2).to(c.device, c.dtype)
    lat = c.vae.encode(px).latent_dist.mean
    shift = getattr(c.vae.config, "shift_factor", None) or 0.0
    return (lat - shift) * c.vae.config.scaling_factor


@contextlib.contextmanager
def fabric(c, liked: Sequence, disliked: Sequence, params: FabricParams = FabricParams(), *,
           do_cfg: bool = True, seed: int = 0) -> Iterator:
    """Install FABRIC on `c.unet`'s attn1 layers for one `sample()` call; yields its `on_step_start` hook.

    `liked` / `disliked` are PIL images (capped at `params.max_references` together, liked first, half each when
    both lists are long). The original processors are restored on exit, also after an error or a cancel.
    """
    from diffusers import DDPMScheduler

    from engine.generate.sampler import encode_prompts

    cap = params.max_references
    n_pos = min(len(liked), max(cap - min(len(disliked), cap // 2), cap // 2))
    n_neg = min(len(disliked), cap - n_pos)
    liked, disliked = list(liked)[-n_pos:] if n_pos else [], list(disliked)[-n_neg:] if n_neg else []
    state = _State(n_pos=len(liked), cfg=do_cfg)
    if not liked and not disliked:
        yield None
        return
    z0 = encode_images(c, liked + disliked)
    noise = torch.randn(z0.shape, generator=torch.Generator().manual_seed(seed)).to(z0)
    noiser = DDPMScheduler.from_config(c.scheduler.config)
    ref_embeds = encode_prompts(c, [params.reference_prompt]).expand(len(z0), -1, -1)
    unet = c.unet
    original = unet.attn_processors
    unet.set_attn_processor({k: FabricAttnProcessor(k, p, state) if k.endswith("attn1.processor") else p
                             for k, p in original.items()})

    def on_step_start(i: int, n: int, t) -> None:
        frac = i / max(n, 1)
        if not (params.start <= frac < params.end):
            state.mode, state.cached = "off", {}
            return
        tt = torch.full((len(z0),), int(t), dtype=torch.long)
        z_t = noiser.add_noise(z0, noise, tt).to(z0)
        state.mode = "collect"
        unet(z_t, t, encoder_hidden_states=ref_embeds, return_dict=False)
        state.mode, state.pos_weight, state.neg_weight = "apply", params.pos_weight, params.neg_weight

    try:
        yield on_step_start
    finally:
        state.mode, state.cached = "off", {}
        unet.set_attn_processor(original)
