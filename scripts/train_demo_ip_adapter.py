"""Train the demo IP-Adapter (Ye et al. 2023) for the bundled demo model, on the shapes world.

What it learns: *style transfer*, not reconstruction, split between the UNet's blocks the way InstantStyle (Wang et
al. 2024) reads them. A training pair is a reference image of one scene and a target scene with the **same texture
and colours**; the caption never names the texture, so the only way to get it right is to read it from the
reference through the adapter. Two kinds of step:
- style steps (--style-fraction, default 75%): InstantStyle's style-only block scales are on (image tokens only in
  the decoder's STYLE_BLOCKS, engine/styles/instant.py); the target always has *another* shape, named in the
  caption. The style blocks learn to carry texture and colours on their own, which is what "style only" uses.
- content steps: every block on; the target keeps the reference's shape and the caption mostly says "shape", so
  the image has to supply it; only the *other* blocks' to_k_ip/to_v_ip are updated. They learn the reference's
  content, which is what "style and content" adds.

Stages: (1) a tiny `CLIPVisionModelWithProjection` (from a config, 32x32 input, 4x4 patches) gets a warm start
with linear heads that read texture, colours and shape from its embedding; (2) it is trained jointly with the
IP-Adapter layers (an `ImageProjection`: image embedding -> 4 tokens, and `to_k_ip`/`to_v_ip` per cross-attention
block) on the denoising loss through the frozen demo model (UNet, VAE, text encoder), with half of each batch at
low-to-mid noise where texture is decided. Fixed step counts, seeded, one thread: the run is reproducible
(--minutes caps the wall time if you must, at the cost of that).

Training textures (scripts/ip_adapter_textures.py): solid and striped (the base model knows them), the
hand-written adapter-only ones, and a family of procedural periodic patterns (random 2..8 px tiles: random cells,
stripes, products of two 1-D patterns, slanted stripes; 300 by default), the demo's stand-in for the millions of images a
real IP-Adapter sees, so a new texture has neighbours. The world's held-out textures (checkered, tiled, polka) are
in no training pair, reference or warm-up image: every candidate is refused if it is within a Hamming distance of
0.25 of any of them or of a checkerboard of any cell size (every shift, transpose, tone inversion), or if the demo
checker calls it a held-out texture on more than 1 of 16 drawings (the shipped adapter was trained when the checker
had no "other" class and the guard asked about checkered only; scripts/ip_adapter_textures.py).

Saved in diffusers' IP-Adapter layout, loadable by plain diffusers:
    assets/demo-ip-adapter/ip_adapter.safetensors   keys image_proj.* and ip_adapter.<1,3,5..>.to_{k,v}_ip.weight
    assets/demo-ip-adapter/image_encoder/            CLIPVisionModelWithProjection (config.json + model.safetensors)
    pipe.load_ip_adapter("assets/demo-ip-adapter", subfolder="", weight_name="ip_adapter.safetensors",
                         image_encoder_folder="image_encoder")

Usage: python scripts/train_demo_ip_adapter.py --out assets/demo-ip-adapter [--steps N] [--minutes M]
"""
from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from engine.demo import world as W  # noqa: E402
from engine.styles.instant import STYLE_BLOCKS  # noqa: E402
from scripts.ip_adapter_textures import TextureFamily  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
VISION_CONFIG = dict(image_size=32, patch_size=4, num_channels=3, hidden_size=64, intermediate_size=128,
                     num_hidden_layers=2, num_attention_heads=4, projection_dim=64)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # CLIPImageProcessor's defaults: intake uses the same numbers
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
NUM_TOKENS = 4  # diffusers' ImageProjection loader assumes 4 image tokens
def clip_pixels(images) -> torch.Tensor:
    """32x32 RGB images -> CLIPImageProcessor-normalised pixel values (resize/crop are identities at 32 px)."""
    a = torch.from_numpy(np.stack([np.asarray(im, np.float32) / 255.0 for im in images])).permute(0, 3, 1, 2)
    mean, std = torch.tensor(CLIP_MEAN)[:, None, None], torch.tensor(CLIP_STD)[:, None, None]
    return ((a - mean) / std).contiguous()


def vae_pixels(images) -> torch.Tensor:
    a = np.stack([np.asarray(im, np.float32) for im in images]) / 127.5 - 1.0
    return torch.from_numpy(a).permute(0, 3, 1, 2).contiguous()


def caption_without_texture(scene: W.Scene, rng: random.Random, keep_shape: bool) -> str:
    """The world's captions for the target with the texture word removed; "shape" for content-kept pairs."""
    cap = W.caption(W.Scene(**{**scene.__dict__, "texture": "solid"}), rng).replace("solid ", "")
    return cap.replace(scene.shape, "shape") if not keep_shape else cap


def make_pair(rng: random.Random, content: bool, family: TextureFamily):
    """(reference image, target image, caption), same texture and colours.

    Style pairs (content=False): the target always has another shape and the caption names it, so the image may
    only bring texture and colours. Content pairs: the target keeps the reference's shape and the caption mostly
    says "shape", so the image has to bring the shape too."""
    texture = family.sample(rng)
    ref = W.random_scene(rng, W.TRAIN_SHAPES)
    tgt = W.random_scene(rng, W.TRAIN_SHAPES if content else tuple(s for s in W.TRAIN_SHAPES if s != ref.shape))
    tgt = W.Scene(**{**tgt.__dict__, "fg": ref.fg, "bg": ref.bg, "shape": ref.shape if content else tgt.shape})
    cap = caption_without_texture(tgt, rng, keep_shape=not content or rng.random() < 0.2)
    return family.draw(ref, texture, rng), family.draw(tgt, texture, rng), cap


class WithHeldOut:
    """Diagnostic only (`--diagnostic-include`): the family, plus one held-out texture in `share` of the adapter
    stage's pairs (not in the encoder's warm-up). It answers "would the adapter pass that texture if it had seen
    it?"; an adapter trained so can say nothing about unseen textures, and is never written into assets/."""

    def __init__(self, family: TextureFamily, texture: str, share: float):
        self.family, self.texture, self.share = family, texture, share

    def sample(self, rng: random.Random) -> str:
        return self.texture if rng.random() < self.share else self.family.sample(rng)

    def draw(self, scene: W.Scene, texture: str, rng: random.Random):
        if texture == self.texture:
            return W.draw(W.Scene(**{**scene.__dict__, "texture": texture}))
        return self.family.draw(scene, texture, rng)


def pretrain_encoder(enc, family: TextureFamily, steps: int, batch: int, seed: int, seconds: float,
                     plus: bool = False) -> None:
    """Stage 1: teach the tiny encoder what a scene is made of with linear heads on its projected embedding: a
    cheap supervised warm start, so the adapter stage does not spend its budget on it. Colours and shape are
    classes; the texture is regressed as a continuous descriptor (coverage and autocorrelation, see
    ip_adapter_textures.descriptor), so textures it never saw land between the ones it did, not on a label."""
    names = {"fg": tuple(sorted(W.COLORS)), "bg": tuple(sorted(W.COLORS)), "shape": W.TRAIN_SHAPES}
    dim = enc.config.projection_dim
    ddim = len(next(iter(family.descriptors.values())))
    heads = torch.nn.ModuleDict({k: torch.nn.Linear(dim, len(v)) for k, v in names.items()})
    heads["texture"] = torch.nn.Linear(dim, ddim)
    if plus:  # Plus reads the penultimate patch features: the texture descriptor must be readable there too
        heads["patch_texture"] = torch.nn.Linear(enc.config.hidden_size, ddim)
    opt = torch.optim.AdamW(list(enc.parameters()) + list(heads.parameters()), lr=2e-3, weight_decay=1e-2)
    t0 = time.time()
    for step in range(steps):
        rng = random.Random(seed * 31 + step)
        imgs, desc, labels = [], [], {k: [] for k in names}
        for _ in range(batch):
            sc = W.random_scene(rng, W.TRAIN_SHAPES)
            tex = family.sample(rng)
            imgs.append(family.draw(sc, tex, rng))
            desc.append(family.descriptors[tex])
            for k, v in (("fg", sc.fg), ("bg", sc.bg), ("shape", sc.shape)):
                labels[k].append(names[k].index(v))
        out = enc(clip_pixels(imgs), output_hidden_states=plus)
        emb, target = out.image_embeds, torch.from_numpy(np.stack(desc))
        loss = sum(F.cross_entropy(heads[k](emb), torch.tensor(labels[k])) for k in names)
        loss = loss + 10.0 * F.mse_loss(heads["texture"](emb), target)
        if plus:  # mean over the patch tokens (not the class token) of the hidden states the Resampler reads
            patches = out.hidden_states[-2][:, 1:].mean(dim=1)
            loss = loss + 10.0 * F.mse_loss(heads["patch_texture"](patches), target)
        opt.zero_grad(set_to_none=True); loss.backward(); opt.step()
        if (step + 1) % 50 == 0:
            print(f"encoder step {step+1} loss {loss.item():.3f} {time.time()-t0:.0f}s", flush=True)
        if seconds and time.time() - t0 > seconds:
            break


def build_initial_state(unet, image_dim: int, plus_tokens: int = 0) -> dict:
    """diffusers' IP-Adapter state dict; to_k_ip/to_v_ip start as copies of each block's to_k/to_v (as Ye et al.).

    plus_tokens > 0: IP-Adapter Plus (Ye et al. 2023, sec. 4.2's fine-grained variant): a perceiver Resampler
    (Jaegle et al. 2021; diffusers' IPAdapterPlusImageProjection, depth 4 and 64-d heads as its loader assumes)
    turns the encoder's patch features (penultimate hidden states) into `plus_tokens` image tokens, instead of 4
    tokens from the pooled embedding: a periodic texture is local, and patch tokens keep its cells and phase."""
    cad = unet.config.cross_attention_dim
    if plus_tokens:
        from diffusers.models.embeddings import IPAdapterPlusImageProjection

        resampler = IPAdapterPlusImageProjection(embed_dims=image_dim, output_dims=cad, hidden_dims=64, heads=1,
                                                 num_queries=plus_tokens)
        sd = {"image_proj": plus_to_original(resampler.state_dict()), "ip_adapter": {}}
    else:
        proj = torch.nn.Linear(image_dim, NUM_TOKENS * cad)
        sd = {"image_proj": {"proj.weight": proj.weight.data.clone() * 0.5, "proj.bias": torch.zeros(NUM_TOKENS * cad),
                             "norm.weight": torch.ones(cad), "norm.bias": torch.zeros(cad)}, "ip_adapter": {}}
    key_id = 1
    for name, mod in unet.named_modules():
        if name.endswith("attn2"):
            sd["ip_adapter"][f"{key_id}.to_k_ip.weight"] = mod.to_k.weight.data.clone()
            sd["ip_adapter"][f"{key_id}.to_v_ip.weight"] = mod.to_v.weight.data.clone()
            key_id += 2
    return sd


def plus_to_original(state: dict) -> dict:
    """IPAdapterPlusImageProjection's diffusers names -> the original IP-Adapter Plus names that diffusers'
    `_convert_ip_adapter_image_proj_to_diffusers` reads (the inverse of its renaming; to_k/to_v joined as to_kv)."""
    out = {}
    for k, v in state.items():
        parts = k.split(".")
        if parts[0] != "layers":
            out[k] = v
            continue
        i, rest = parts[1], ".".join(parts[2:])
        if rest.startswith("attn.to_k."):
            out[f"layers.{i}.0.to_kv.weight"] = torch.cat([v, state[k.replace("to_k.", "to_v.")]])
            continue
        ren = {"ln0.": "0.norm1.", "ln1.": "0.norm2.", "attn.to_q.": "0.to_q.", "attn.to_out.0.": "0.to_out.",
               "ff.0.": "1.0.", "ff.1.net.0.proj.": "1.1.", "ff.1.net.2.": "1.3."}
        for a, b in ren.items():
            if rest.startswith(a):
                out[f"layers.{i}.{b}{rest[len(a):]}"] = v
                break
        else:
            if not rest.startswith("attn.to_v."):
                raise KeyError(f"unexpected Resampler key {k}")
    return {k: v.detach().clone() for k, v in out.items()}


def export_state(unet) -> dict[str, torch.Tensor]:
    """The trained adapter back in the flat safetensors layout that `load_ip_adapter` reads."""
    out = {}
    p = unet.encoder_hid_proj.image_projection_layers[0]
    if hasattr(p, "latents"):  # IP-Adapter Plus
        out.update({f"image_proj.{k}": v for k, v in plus_to_original(p.state_dict()).items()})
    else:
        out["image_proj.proj.weight"], out["image_proj.proj.bias"] = p.image_embeds.weight, p.image_embeds.bias
        out["image_proj.norm.weight"], out["image_proj.norm.bias"] = p.norm.weight, p.norm.bias
    key_id = 1
    for name, proc in unet.attn_processors.items():  # same order diffusers' loader walks
        if not name.endswith("attn2.processor"):  # self-attention, or the Resampler's own attention
            continue
        out[f"ip_adapter.{key_id}.to_k_ip.weight"] = proc.to_k_ip[0].weight
        out[f"ip_adapter.{key_id}.to_v_ip.weight"] = proc.to_v_ip[0].weight
        key_id += 2
    return {k: v.detach().float().contiguous().clone() for k, v in out.items()}


def image_condition(enc, pixels: torch.Tensor, plus: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(image embeddings, unconditional ones) as diffusers' `encode_image` makes them: the projected embedding and
    zeros, or (Plus) the penultimate hidden states of the image and of an all-zero pixel tensor."""
    if not plus:
        emb = enc(pixels).image_embeds
        return emb, torch.zeros_like(emb)
    emb = enc(pixels, output_hidden_states=True).hidden_states[-2]
    return emb, enc(torch.zeros_like(pixels[:1]), output_hidden_states=True).hidden_states[-2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", type=Path, default=REPO / "assets" / "demo-model")
    ap.add_argument("--out", type=Path, default=REPO / "assets" / "demo-ip-adapter")
    ap.add_argument("--steps", type=int, default=600, help="cosine LR horizon (the time budget may stop earlier)")
    ap.add_argument("--minutes", type=float, default=0,
                    help="stop (and save) after this wall time; 0 (default): no limit, so runs are reproducible")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--encoder-steps", type=int, default=240)
    ap.add_argument("--encoder-seconds", type=float, default=0, help="wall-time cap of stage 1; 0: none")
    ap.add_argument("--encoder-width", type=int, default=64, help="image encoder's hidden size")
    ap.add_argument("--encoder-layers", type=int, default=2)
    ap.add_argument("--pool", type=int, default=300, help="procedural textures in the training family")
    ap.add_argument("--latent-share", type=float, default=0.0,
                    help="share of the procedural textures drawn on 2 px cells (one latent pixel of the demo VAE) "
                         "instead of 1 px ones; the held-out guard applies to them as to every candidate")
    ap.add_argument("--plus-tokens", type=int, default=0,
                    help="IP-Adapter Plus: a Resampler over the encoder's patch features with this many image "
                         "tokens; 0: the basic adapter (4 tokens from the pooled embedding)")
    ap.add_argument("--style-fraction", type=float, default=0.75,
                    help="share of steps with InstantStyle's style-only block scales on (style pairs)")
    ap.add_argument("--unet-lr", type=float, default=0.0,
                    help="experiment: also train the UNet's own weights at this rate (saved to OUT/unet; the "
                         "adapter then only works with that UNet); 0 (default): frozen, as IP-Adapter")
    ap.add_argument("--diagnostic-include", choices=W.HELD_OUT_TEXTURES,
                    help="diagnostic: put this held-out texture into --diagnostic-share of the adapter stage's "
                         "pairs (never for an adapter that is shipped; refused for an --out under assets/)")
    ap.add_argument("--diagnostic-share", type=float, default=1 / 16,
                    help="with --diagnostic-include: the share of pairs drawn in that texture (default 1/16)")
    ap.add_argument("--image-dropout", type=float, default=0.1,
                    help="share of samples with the unconditional image condition (for classifier-free guidance)")
    a = ap.parse_args()
    if a.diagnostic_include and (REPO / "assets") in a.out.resolve().parents:
        ap.error("--diagnostic-include trains on a held-out texture: write it outside assets/")
    if not 0.0 < a.diagnostic_share <= 1.0:
        ap.error("--diagnostic-share is a share of the pairs: give a number above 0 and at most 1")
    if not 0.0 <= a.latent_share <= 1.0:
        ap.error("--latent-share is a share of the procedural textures: give a number from 0 to 1")
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor, IPAdapterAttnProcessor
    from transformers import CLIPTextModel, CLIPTokenizer, CLIPVisionConfig, CLIPVisionModelWithProjection

    unet = UNet2DConditionModel.from_pretrained(a.base / "unet").requires_grad_(False)
    vae = AutoencoderKL.from_pretrained(a.base / "vae").requires_grad_(False)
    te = CLIPTextModel.from_pretrained(a.base / "text_encoder").requires_grad_(False)
    tok = CLIPTokenizer.from_pretrained(a.base / "tokenizer")
    noise_sched = DDPMScheduler.from_pretrained(a.base / "scheduler")
    vision = {**VISION_CONFIG, "hidden_size": a.encoder_width, "intermediate_size": 2 * a.encoder_width,
              "num_hidden_layers": a.encoder_layers}
    enc = CLIPVisionModelWithProjection(CLIPVisionConfig(**vision))
    t_start = time.time()
    from engine.demo.checker import DemoChecker
    family = TextureFamily(a.pool, a.seed, DemoChecker.load(), latent_share=a.latent_share)
    print(f"texture family: {len(family.family)} procedural + {family.kept_hand_written} (+ solid); rejected "
          f"{family.rejected}; nearest to the held-out textures: {family.nearest}", flush=True)
    pretrain_encoder(enc, family, a.encoder_steps, 64, a.seed, a.encoder_seconds, plus=a.plus_tokens > 0)
    pairs = WithHeldOut(family, a.diagnostic_include, a.diagnostic_share) if a.diagnostic_include else family
    plus = a.plus_tokens > 0
    image_dim = vision["hidden_size"] if plus else vision["projection_dim"]
    unet._load_ip_adapter_weights([build_initial_state(unet, image_dim, a.plus_tokens)])
    # classic (non-SDPA) processors for training: CPU SDPA backward is slow for 2-head attention
    procs = {}
    for name, proc in unet.attn_processors.items():
        if not name.endswith("attn2.processor"):  # self-attention, or the Resampler's own attention
            procs[name] = AttnProcessor()
        else:
            new = IPAdapterAttnProcessor(hidden_size=proc.hidden_size, cross_attention_dim=proc.cross_attention_dim,
                                         num_tokens=proc.num_tokens, scale=1.0)
            new.load_state_dict(proc.state_dict())
            procs[name] = new
    unet.set_attn_processor(procs)
    adapter_params = list(unet.encoder_hid_proj.parameters())
    style_blocks = STYLE_BLOCKS["demo"]
    ip_procs = {n: p for n, p in unet.attn_processors.items() if isinstance(p, IPAdapterAttnProcessor)}
    style_params = [p for n, proc in ip_procs.items() if n.startswith(style_blocks) for p in proc.parameters()]
    content_params = [p for n, proc in ip_procs.items() if not n.startswith(style_blocks) for p in proc.parameters()]
    adapter_params += style_params + content_params
    for p in adapter_params:
        p.requires_grad_(True)
    trained = {id(p) for p in adapter_params}
    unet_params = [p.requires_grad_(True) for p in unet.parameters() if id(p) not in trained] if a.unet_lr else []
    params = adapter_params + list(enc.parameters()) + unet_params
    groups = [{"params": adapter_params, "lr": a.lr}, {"params": list(enc.parameters()), "lr": a.lr * 0.3}]
    groups += [{"params": unet_params, "lr": a.unet_lr}] if unet_params else []
    print(f"trainable: adapter {sum(p.numel() for p in adapter_params):,} + encoder "
          f"{sum(p.numel() for p in enc.parameters()):,} params", flush=True)
    opt = torch.optim.AdamW(groups, weight_decay=1e-2)
    warm = 100
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(s, a.steps) / a.steps))))
    t0, losses, step = t_start, [], 0
    for step in range(a.steps):
        rng = random.Random(a.seed * 1_000_003 + step)
        g = torch.Generator().manual_seed(a.seed * 7919 + step)
        # Two kinds of step (InstantStyle, Wang et al. 2024, applied at training time): style steps run with the
        # style-only block scales (image tokens in the decoder's STYLE_BLOCKS only) on style pairs, so those blocks
        # learn to carry texture and colours on their own; content steps run with every block on, on content
        # pairs, and update only the other blocks' to_k_ip/to_v_ip, which so learn the reference's shape: that
        # is what "style and content" adds and "style only" leaves out.
        style_step = rng.random() < a.style_fraction
        for name, proc in ip_procs.items():
            proc.scale = [1.0 if not style_step or name.startswith(style_blocks) else 0.0]
        refs, tgts, caps = zip(*[make_pair(rng, not style_step, pairs) for _ in range(a.batch)])
        caps = [c if rng.random() > 0.1 else "" for c in caps]
        with torch.no_grad():
            ids = tok(list(caps), padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
            cond = te(ids)[0]
            lat = vae.encode(vae_pixels(tgts)).latent_dist.sample(g) * vae.config.scaling_factor
        noise = torch.randn(lat.shape, generator=g)
        # half the batch at low-to-mid noise, where fine texture is decided (uniform t spends most steps on layout)
        t = torch.randint(0, 1000, (a.batch,), generator=g)
        t[a.batch // 2:] = torch.randint(0, 500, (a.batch - a.batch // 2,), generator=g)
        noisy = noise_sched.add_noise(lat, noise, t)
        target = noise_sched.get_velocity(lat, noise, t)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            emb, uncond = image_condition(enc, clip_pixels(refs), plus)
            # 10% image dropout to the unconditional image condition diffusers uses for CFG
            keep = (torch.rand(a.batch, generator=g) > a.image_dropout).view(-1, *[1] * (emb.dim() - 1))
            emb = torch.where(keep, emb.float(), uncond.float())
            pred = unet(noisy, t, cond, added_cond_kwargs={"image_embeds": [emb[:, None]]}).sample
        per = F.mse_loss(pred.float(), target, reduction="none").mean(dim=(1, 2, 3))
        # plain v-loss: min-SNR weighting (used for the base model) would down-weight exactly the low-noise steps
        # where the texture lives
        loss = per.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for p in (content_params if style_step else style_params):
            p.grad = None  # AdamW leaves a parameter without a gradient alone (no momentum, no decay this step)
        torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], 1.0)
        opt.step(); sched.step()
        losses.append(loss.item())
        el = time.time() - t0
        if (step + 1) % 25 == 0:
            print(f"step {step+1}/{a.steps} loss {np.mean(losses[-25:]):.4f} {el:.0f}s ({el/(step+1):.2f}s/step)",
                  flush=True)
        if a.minutes and el > a.minutes * 60:
            print(f"time budget reached after {step+1} steps", flush=True)
            break
    seconds = time.time() - t_start
    a.out.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file
    save_file(export_state(unet), str(a.out / "ip_adapter.safetensors"))
    enc.save_pretrained(a.out / "image_encoder", safe_serialization=True)
    if unet_params:  # the UNet's own weights only (the adapter's layers are in ip_adapter.safetensors)
        plain = UNet2DConditionModel.from_pretrained(a.base / "unet")
        keys = plain.state_dict().keys()
        plain.load_state_dict({k: v for k, v in unet.state_dict().items() if k in keys})
        plain.save_pretrained(a.out / "unet", safe_serialization=True)
    (a.out / "training.json").write_text(json.dumps(
        {"steps_done": step + 1, "seconds": round(seconds), "final_loss": float(np.mean(losses[-50:])),
         "batch": a.batch, "lr": a.lr, "seed": a.seed, "threads": a.threads, "vision_config": vision,
         "textures": {"solid": 0.1, "striped": 0.1, "hand_written": family.kept_hand_written[1:],
                      "hand_written_share": 0.2, "procedural": len(family.family), "procedural_share": 0.6,
                      "procedural_on_2px_cells": sum(c == 2 for c in family.cell.values())},
         "held_out": list(W.HELD_OUT_TEXTURES), "diagnostic_included": a.diagnostic_include or None,
         "diagnostic_share": a.diagnostic_share if a.diagnostic_include else None,
         "family_rejected": family.rejected,
         "nearest_hamming_distance": {k: round(v, 4) for k, v in family.nearest.items()},
         "style_fraction": a.style_fraction, "unet_lr": a.unet_lr, "image_dropout": a.image_dropout,
         "image_proj": f"plus ({a.plus_tokens} tokens)" if plus else "basic (4 tokens)", "style_blocks": list(style_blocks)}, indent=1))
    print(f"done: {step+1} steps in {seconds:.0f}s -> {a.out}", flush=True)


if __name__ == "__main__":
    main()
