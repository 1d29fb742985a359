"""Train the bundled demo model: a tiny Stable Diffusion (diffusers format) on the shapes world.

Stages (each resumable from its own checkpoint in --work):
  1. tokenizer  CLIP's real BPE vocabulary (scripts/build_tokenizer.py)
  2. vae        a small AutoencoderKL, 32x32x3 -> 16x16x4, trained on every shape and texture
  3. latents    the training set (train shapes and textures only) encoded once by the frozen VAE
  4. diffusion  CLIP text encoder + UNet trained jointly from scratch, v-prediction (Salimans & Ho 2022),
                min-SNR-5 loss weighting (Hang et al. 2023, eq. 9 for v), 10% caption dropout for
                classifier-free guidance (Ho & Salimans 2022), EMA weights shipped
  5. export     fp32 safetensors folder loadable by StableDiffusionPipeline.from_pretrained

Deterministic for a given --seed on CPU. Usage:
  python scripts/train_demo_model.py --work /tmp/demo-work --out assets/demo-model
"""
from __future__ import annotations

import argparse
import copy
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

UNET_CONFIG = dict(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
                   block_out_channels=(64, 128, 128),
                   down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                   up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                   cross_attention_dim=64, attention_head_dim=2, norm_num_groups=32)
VAE_CONFIG = dict(in_channels=3, out_channels=3, latent_channels=4, sample_size=32,
                  block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=16,
                  mid_block_add_attention=False)
TEXT_CONFIG = dict(vocab_size=49408, hidden_size=64, intermediate_size=256, num_hidden_layers=3,
                   num_attention_heads=4, max_position_embeddings=77, projection_dim=64,
                   bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
# DDPM's linear schedule ends near zero SNR (alpha_bar_T ~ 4e-5), so sampling from pure noise matches training;
# with epsilon prediction that made x0 estimates explode, v-prediction is stable (Lin et al. 2023, sec. 3.2).
SCHEDULER_CONFIG = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                        prediction_type="v_prediction", timestep_spacing="trailing", steps_offset=0,
                        algorithm_type="dpmsolver++", solver_order=2, use_karras_sigmas=False)


def to_tensor(images) -> torch.Tensor:
    a = np.stack([np.asarray(im, np.float32) for im in images]) / 127.5 - 1.0
    return torch.from_numpy(a).permute(0, 3, 1, 2).contiguous()


def save_ckpt(path: Path, obj) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


def load_ckpt(path: Path):
    return torch.load(path, weights_only=True) if path.exists() else None


# ---- stage 2: VAE -------------------------------------------------------------------------------------------
def train_vae(work: Path, steps: int, seed: int, schedule_steps: int):
    from diffusers import AutoencoderKL
    torch.manual_seed(seed)
    vae = AutoencoderKL(**VAE_CONFIG)
    opt = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=schedule_steps,
                                                pct_start=0.05)
    start, ck = 0, load_ckpt(work / "vae.pt")
    if ck:
        vae.load_state_dict(ck["model"]); opt.load_state_dict(ck["opt"]); sched.load_state_dict(ck["sched"])
        start = ck["step"]
    t0 = time.time()
    for step in range(start, steps):
        rng = random.Random(seed * 1_000_003 + step)
        x = to_tensor([W.draw(W.random_scene(rng, W.SHAPES, W.TEXTURES)) for _ in range(64)])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            post = vae.encode(x).latent_dist
            rec = vae.decode(post.sample()).sample.float()
        kl = post.kl().mean() / x[0].numel()
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + 1e-4 * kl
        opt.zero_grad(set_to_none=True); loss.backward(); opt.step(); sched.step()
        if (step + 1) % 100 == 0 or step + 1 == steps:
            psnr = 10 * math.log10(4 / F.mse_loss(rec, x).item())
            print(f"vae step {step+1}/{steps} loss {loss.item():.4f} psnr {psnr:.1f} dB {time.time()-t0:.0f}s",
                  flush=True)
            save_ckpt(work / "vae.pt", dict(model=vae.state_dict(), opt=opt.state_dict(),
                                            sched=sched.state_dict(), step=step + 1))
    vae.eval()
    return vae


# ---- stage 3: latents ---------------------------------------------------------------------------------------
@torch.no_grad()
def encode_dataset(work: Path, vae, n: int, seed: int):
    path = work / "latents.pt"
    ck = load_ckpt(path)
    if ck and ck["n"] == n:
        return ck
    rng = random.Random(seed + 7)
    scenes = [W.random_scene(rng, W.TRAIN_SHAPES, W.TRAIN_TEXTURES, texture_weights=[0.7, 0.3]) for _ in range(n)]
    means, stds = [], []
    for i in range(0, n, 256):
        d = vae.encode(to_tensor([W.draw(s) for s in scenes[i:i + 256]])).latent_dist
        means.append(d.mean); stds.append(d.std)
    mean, std = torch.cat(means), torch.cat(stds)
    scaling = float(1.0 / mean.std())
    ck = dict(n=n, mean=mean, std=std, scenes=[s.__dict__ for s in scenes], scaling=scaling)
    save_ckpt(path, ck)
    print(f"encoded {n} images, latent std {mean.std():.3f} -> scaling_factor {scaling:.4f}", flush=True)
    return ck


# ---- stage 4: text encoder + UNet ---------------------------------------------------------------------------
def min_snr_v_weight(alphas_cumprod: torch.Tensor, t: torch.Tensor, gamma: float = 5.0) -> torch.Tensor:
    """Min-SNR-gamma weight for a v-prediction loss: min(SNR, gamma) / (SNR + 1) (Hang et al. 2023)."""
    snr = alphas_cumprod[t] / (1 - alphas_cumprod[t])
    return torch.clamp(snr, max=gamma) / (snr + 1)


def ema_update(ema, model, decay: float) -> None:
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters()):
            e.lerp_(p, 1 - decay)


def train_diffusion(work: Path, tok, data, steps: int, batch: int, lr: float, seed: int, extra_steps: int = 0,
                    extra_lr: float = 1e-4):
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor
    from transformers import CLIPTextConfig, CLIPTextModel
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**UNET_CONFIG)
    # 2 heads and the classic attention processor: CPU flash-attention backward is slow for small heads
    unet.set_attn_processor(AttnProcessor())
    te = CLIPTextModel(CLIPTextConfig(**TEXT_CONFIG))
    ema_unet, ema_te = copy.deepcopy(unet).requires_grad_(False), copy.deepcopy(te).requires_grad_(False)
    params = list(unet.parameters()) + list(te.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2, betas=(0.9, 0.99))
    warm = 200
    # warm-up + cosine over `steps`, then `extra_steps` at a constant `extra_lr` (shape binding keeps improving there)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: extra_lr / lr if s >= steps else
        min(1.0, (s + 1) / warm) * (0.03 + 0.97 * 0.5 * (1 + math.cos(math.pi * s / steps))))
    noise_sched = DDPMScheduler.from_config(SCHEDULER_CONFIG)
    acp = noise_sched.alphas_cumprod
    start, ck = 0, load_ckpt(work / "diffusion.pt")
    if ck:
        unet.load_state_dict(ck["unet"]); te.load_state_dict(ck["te"])
        ema_unet.load_state_dict(ck["ema_unet"]); ema_te.load_state_dict(ck["ema_te"])
        opt.load_state_dict(ck["opt"]); sched.load_state_dict(ck["sched"]); start = ck["step"]
    scenes = [W.Scene(**s) for s in data["scenes"]]
    mean, std, scaling = data["mean"], data["std"], data["scaling"]
    t0, losses = time.time(), []
    total = steps + extra_steps
    for step in range(start, total):
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)  # per-step RNG: resume is exact
        rng = random.Random(seed * 7919 + step)
        idx = torch.randint(0, len(scenes), (batch,), generator=g)
        caps = [W.caption(scenes[i], rng) if rng.random() > 0.1 else "" for i in idx.tolist()]
        ids = tok(caps, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        lat = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=g)) * scaling
        noise = torch.randn(lat.shape, generator=g)
        t = torch.randint(0, 1000, (batch,), generator=g)
        noisy = noise_sched.add_noise(lat, noise, t)
        target = noise_sched.get_velocity(lat, noise, t)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            cond = te(ids).last_hidden_state
            pred = unet(noisy, t, cond).sample
        per = F.mse_loss(pred.float(), target, reduction="none").mean(dim=(1, 2, 3))
        loss = (per * min_snr_v_weight(acp, t)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step(); sched.step()
        ema_update(ema_unet, unet, min(0.999, (1 + step) / (10 + step)))
        ema_update(ema_te, te, min(0.999, (1 + step) / (10 + step)))
        losses.append(loss.item())
        if (step + 1) % 50 == 0 or step + 1 == total:
            el = time.time() - t0
            print(f"diffusion step {step+1}/{total} loss {np.mean(losses[-50:]):.4f} lr {sched.get_last_lr()[0]:.2e} "
                  f"{el:.0f}s ({el/(step+1-start):.2f}s/step)", flush=True)
        if (step + 1) % 250 == 0 or step + 1 == total:
            save_ckpt(work / "diffusion.pt", dict(unet=unet.state_dict(), te=te.state_dict(),
                                                  ema_unet=ema_unet.state_dict(), ema_te=ema_te.state_dict(),
                                                  opt=opt.state_dict(), sched=sched.state_dict(), step=step + 1))
    return ema_unet, ema_te


# ---- stage 5: export ----------------------------------------------------------------------------------------
def export(out: Path, tok_dir: Path, vae, unet, te, scaling: float) -> None:
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer
    vae.register_to_config(scaling_factor=scaling)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=CLIPTokenizer.from_pretrained(tok_dir),
                                   unet=unet, scheduler=DPMSolverMultistepScheduler.from_config(SCHEDULER_CONFIG),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    # fp32 on disk, every component: transformers 5 loads the text encoder in its stored dtype while diffusers
    # loads the UNet and VAE in fp32, so fp16 files made plain `from_pretrained(folder)` fail with "mat1 and mat2
    # must have the same dtype". The tiny model is ~40 MB in fp32, small enough to ship. The values are rounded
    # through fp16 first so a rerun reproduces the shipped weights (first shipped as fp16) and their measurements.
    pipe.to(torch.float16)
    pipe.to(torch.float32)
    pipe.save_pretrained(out, safe_serialization=True)
    # keep the SD1.5 tokenizer layout (vocab.json + merges.txt, smaller than tokenizer.json) and the licence
    for f in (out / "tokenizer").iterdir():
        f.unlink()
    for f in tok_dir.iterdir():
        (out / "tokenizer" / f.name).write_bytes(f.read_bytes())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--wheel", type=Path, help="open-clip-torch wheel (else pip downloads it)")
    # 500 steps of a 900-step one-cycle schedule: 31 dB PSNR already, and the CPU time goes to the UNet instead
    ap.add_argument("--vae-steps", type=int, default=500)
    ap.add_argument("--vae-schedule-steps", type=int, default=900)
    ap.add_argument("--steps", type=int, default=2500)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--extra-steps", type=int, default=600, help="after the cosine: steps at --extra-lr")
    ap.add_argument("--extra-lr", type=float, default=1e-4)
    ap.add_argument("--dataset", type=int, default=40000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    a.work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    tok_dir = a.work / "tokenizer"
    if not (tok_dir / "vocab.json").exists():
        import subprocess
        cmd = [sys.executable, str(Path(__file__).parent / "build_tokenizer.py"), str(tok_dir)]
        subprocess.run(cmd + (["--wheel", str(a.wheel)] if a.wheel else []), check=True)
    from transformers import CLIPTokenizer
    tok = CLIPTokenizer.from_pretrained(tok_dir)
    vae = train_vae(a.work, a.vae_steps, a.seed, max(a.vae_steps, a.vae_schedule_steps))
    data = encode_dataset(a.work, vae, a.dataset, a.seed)
    unet, te = train_diffusion(a.work, tok, data, a.steps, a.batch, a.lr, a.seed, a.extra_steps, a.extra_lr)
    export(a.out, tok_dir, vae, unet, te, data["scaling"])
    (a.work / "timing.json").write_text(json.dumps({"seconds_this_run": time.time() - t0, **vars(a)}, default=str))
    print(f"done in {time.time()-t0:.0f}s -> {a.out}")


if __name__ == "__main__":
    main()
