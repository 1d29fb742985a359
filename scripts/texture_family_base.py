"""Experiment: continue training the demo base model on a family of textures, held-out textures excluded.

The demo model knows two textures (solid, striped), so a style LoRA must teach its UNet to draw a texture at all,
where Stable Diffusion has seen thousands. This script trains the shipped demo model on for a few hundred steps on
half world images and half the demo IP-Adapter's texture family (scripts/ip_adapter_textures.py: procedural
periodic patterns, checkered / tiled / polka kept out by geometry and by the checker), each texture named by a
made-up word ("a kalomi red circle on a blue background"), and writes a diffusers folder. Measured and not
shipped (docs/learning-log.md): it lifts checkered and tiled as styles but not to the threshold.

    python scripts/texture_family_base.py --out /tmp/base-family [--steps 800] [--lr 1e-4] [--device cuda]

Then copy its unet/ and text_encoder/ over assets/demo-model/ in a scratch checkout and run
scripts/learning_table.py there (or pass the folder as a job's base to scripts/lever_sweep.py). 800 steps take
about 14 CPU minutes on 2 threads (bit-identical on a re-run), 160-290 s on one H200 beside a sweep's workers.
The base measured on 2026-11-28 was built when the family's checker guard used the 5-class checker; since the
checker has an "other" class (2026-11-29) the same command draws a different family (scripts/ip_adapter_textures.py).
"""
from __future__ import annotations

import argparse
import copy
import random
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from engine.demo import world as W  # noqa: E402
from scripts.train_demo_model import SCHEDULER_CONFIG, ema_update, min_snr_v_weight, to_tensor  # noqa: E402

SYLLABLES = ("ka", "lo", "mi", "ru", "ve", "zo", "ta", "ne", "pi", "su", "go", "fe", "bu", "xi", "da", "wo")


def texture_words(names, seed: int = 5) -> dict[str, str]:
    """A distinct three-syllable made-up word per texture: the text encoder gets a name, not a description."""
    rng, words = random.Random(seed), {}
    for name in names:
        while (w := "".join(rng.choice(SYLLABLES) for _ in range(3))) in words.values():
            pass
        words[name] = w
    return words


def dataset(family, words, n: int, seed: int):
    """n (scene, image) pairs: half the world's own (solid/striped 70/30), half a family texture by its word."""
    rng, scenes, images = random.Random(seed), [], []
    names = list(words)
    for _ in range(n):
        if rng.random() < 0.5:
            s = W.random_scene(rng, W.TRAIN_SHAPES, W.TRAIN_TEXTURES, texture_weights=[0.7, 0.3])
            images.append(W.draw(s))
        else:
            s, name = W.random_scene(rng, W.TRAIN_SHAPES, W.TRAIN_TEXTURES), rng.choice(names)
            images.append(family.draw(s, name, rng))
            s = W.Scene(**{**s.__dict__, "texture": words[name]})  # only its caption uses the texture field
        scenes.append(s)
    return scenes, images


def main() -> None:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor
    from transformers import CLIPTextModel, CLIPTokenizer

    from engine.demo.checker import DemoChecker
    from scripts.ip_adapter_textures import TextureFamily

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--images", type=int, default=16_000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--pool", type=int, default=300, help="procedural family textures (made-up words)")
    ap.add_argument("--neighbours", type=int, default=0,
                    help="also this many staggered bricks / dots (scripts/staggered_neighbours.py)")
    ap.add_argument("--device", default="cpu", help="cuda: the same recipe on a GPU (not bit-identical to CPU)")
    a = ap.parse_args()
    torch.set_num_threads(2)
    model = ROOT / "assets" / "demo-model"
    tok = CLIPTokenizer.from_pretrained(model / "tokenizer")
    dev = torch.device(a.device)
    vae = AutoencoderKL.from_pretrained(model / "vae").eval().to(dev)
    unet = UNet2DConditionModel.from_pretrained(model / "unet").to(dev)
    unet.set_attn_processor(AttnProcessor())  # as scripts/train_demo_model.py: faster backward for 2-wide heads
    te = CLIPTextModel.from_pretrained(model / "text_encoder").to(dev)
    t0 = time.time()
    family = TextureFamily(a.pool, 0, DemoChecker.load(), neighbours=a.neighbours)
    words = texture_words([*family.kept_hand_written[1:], *family.family])  # [0] is striped, which has its word
    scenes, images = dataset(family, words, a.images, seed=11)
    with torch.no_grad():
        dists = [vae.encode(to_tensor(images[i:i + 256]).to(dev)).latent_dist for i in range(0, len(images), 256)]
    mean, std = torch.cat([d.mean for d in dists]).cpu(), torch.cat([d.std for d in dists]).cpu()
    print(f"{len(words)} family textures, {len(images)} images encoded in {time.time() - t0:.0f}s", flush=True)

    ema_unet, ema_te = copy.deepcopy(unet).requires_grad_(False), copy.deepcopy(te).requires_grad_(False)
    params = [*unet.parameters(), *te.parameters()]
    opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=1e-2, betas=(0.9, 0.99))
    warmup = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 50))
    noise_sched = DDPMScheduler.from_config(SCHEDULER_CONFIG)
    losses = []
    for step in range(a.steps):  # the same loss as the base model's training (v-prediction, min-SNR-5)
        g, rng = torch.Generator().manual_seed(1234 + step), random.Random(99 + step)
        idx = torch.randint(0, len(scenes), (a.batch,), generator=g)
        caps = [W.caption(scenes[i], rng) if rng.random() > 0.1 else "" for i in idx.tolist()]
        ids = tok(caps, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        lat = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=g)) * vae.config.scaling_factor
        noise, t = torch.randn(lat.shape, generator=g), torch.randint(0, 1000, (a.batch,), generator=g)
        lat, noise, t, ids = lat.to(dev), noise.to(dev), t.to(dev), ids.to(dev)
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            pred = unet(noise_sched.add_noise(lat, noise, t), t, te(ids).last_hidden_state).sample
        per = F.mse_loss(pred.float(), noise_sched.get_velocity(lat, noise, t), reduction="none").mean(dim=(1, 2, 3))
        loss = (per * min_snr_v_weight(noise_sched.alphas_cumprod, t.cpu()).to(dev)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        warmup.step()
        decay = min(0.995, (1 + step) / (10 + step))
        ema_update(ema_unet, unet, decay)
        ema_update(ema_te, te, decay)
        losses.append(loss.item())
        if (step + 1) % 50 == 0:
            print(f"step {step + 1}/{a.steps} loss {np.mean(losses[-50:]):.4f} {time.time() - t0:.0f}s", flush=True)
    if a.out.exists():
        shutil.rmtree(a.out)
    shutil.copytree(model, a.out)
    ema_unet.save_pretrained(a.out / "unet")
    ema_te.save_pretrained(a.out / "text_encoder")
    print(f"saved {a.out} in {time.time() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
