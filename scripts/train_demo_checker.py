"""Train the demo checker's shape/texture CNN (engine/demo/checker.py) on fresh shapes-world images.

Every shape and texture (held-out ones included: the checker must judge what DreamBooth teaches) is drawn by
demo_world with random colours, position, size and rotation, and a sixth texture label, "other", is trained on
periodic patterns that are none of the world's (so the checker need not name a pattern it never saw after one of
five). Each batch is re-augmented so the CNN keeps working
on what a small diffusion model + VAE actually output: Gaussian blur (sigma 0-1.2), colour shifts, real JPEG
round trips (smoothing and 8x8 block artefacts) and pixel noise. Deterministic on CPU for a given --seed.

Usage:
    python scripts/train_demo_checker.py            # writes assets/demo-checker/{checker.safetensors,README.md}
"""
from __future__ import annotations

import argparse
import io
import json
import random
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from engine.demo import world as W  # noqa: E402
from engine.demo.checker import ATTRIBUTES, OTHER, TEXTURE_LABELS, CheckerNet, DemoChecker, normalize  # noqa: E402

EVAL_SEED = 900_001  # held-out: training uses --seed (default 0); tests use yet another seed


# Every texture's period divides 12 px (checker 4, tiles 8 x 4, polka 6 x 12), so offsets 0..11 are every phase.
PHASES = 12
OTHER_SHARE = 1 / len(TEXTURE_LABELS)  # as many "other" images as of each world texture


def world_distance(mask32: np.ndarray) -> float:
    """Smallest Hamming distance of a 32x32 pattern to any world texture (the texture family's geometry guard,
    scripts/ip_adapter_textures.py, extended to striped and solid): an "other" pattern must be at least
    MIN_DISTANCE from all of them, so no image is both."""
    from scripts.ip_adapter_textures import distance_to, held_out_distances

    coverage = float(mask32.mean())
    return min(*held_out_distances(mask32).values(), distance_to(mask32, "striped"), coverage, 1 - coverage)


def other_tiles(seed: int, n: int, neighbours: bool = False) -> list[np.ndarray]:
    """Tiles for the "other" class: with `neighbours` (training), every staggered brick / dot pattern first
    (scripts/staggered_neighbours.py, the nearest neighbours of tiled and polka that the family guard lets through);
    then random family tiles (scripts/ip_adapter_textures.random_tile) drawn with this seed, until n; each far from
    every world texture. Without `neighbours` the tiles are fresh ones for evaluation."""
    from scripts.ip_adapter_textures import MIN_DISTANCE, random_tile, tile_pixels
    from scripts.staggered_neighbours import candidates

    rng, tiles, seen = random.Random(f"checker-other-{seed}"), [], set()
    pool = list(candidates().values()) if neighbours else []
    while len(tiles) < n:
        tile = pool.pop() if pool else random_tile(rng)
        m = tile_pixels(tile, 32)
        if m.tobytes() not in seen and world_distance(m) >= MIN_DISTANCE:
            seen.add(m.tobytes())
            tiles.append(tile)
    return tiles


def make_set(n: int, seed: int, any_phase: bool = True, other: list | None = None):
    """n scenes of every shape and texture; `any_phase`: each texture at a random offset (the world draws them at
    (0, 0), but a model's output may come out shifted and is still that texture: the first checker, trained at
    offset 0 only, called tiles shifted by 2 px "striped" 47 times in 48). `other`: tiles, one of which replaces
    the texture of OTHER_SHARE of the scenes (label OTHER, at a random phase)."""
    from scripts.ip_adapter_textures import TextureFamily

    rng, phase_rng = random.Random(seed), random.Random(seed + 7)  # the scenes are the same either way
    scenes = [W.random_scene(rng, W.SHAPES, W.TEXTURES) for _ in range(n)]
    if any_phase:
        scenes = [replace(s, phase=(phase_rng.randrange(PHASES), phase_rng.randrange(PHASES))) for s in scenes]
    truths = [{"shape": s.shape, "texture": s.texture, "fg": s.fg, "bg": s.bg} for s in scenes]
    images, other_rng, family = [], random.Random(seed + 13), TextureFamily(0, 0)
    for s, t in zip(scenes, truths):
        if other and other_rng.random() < OTHER_SHARE:
            images.append(family._draw(s, "other", other_rng.choice(other), other_rng))
            t["texture"] = OTHER
        else:
            images.append(W.draw(s))
    imgs = np.stack([np.asarray(im) for im in images])
    y_shape = torch.tensor([W.SHAPES.index(t["shape"]) for t in truths])
    y_tex = torch.tensor([TEXTURE_LABELS.index(t["texture"]) for t in truths])
    return truths, imgs, y_shape, y_tex


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Per-image Gaussian blur (sigma 0 = identity) as one grouped conv; 7 taps cover 2.5 sigma at 1.2."""
    n, c, h, w = x.shape
    t = torch.arange(-3, 4, dtype=torch.float32)
    k = torch.exp(-t[None] ** 2 / (2 * sigma.clamp(min=1e-3)[:, None] ** 2))
    k = k / k.sum(1, keepdim=True)
    k2 = (k[:, :, None] * k[:, None, :]).repeat_interleave(c, 0)[:, None]  # (n*c, 1, 7, 7)
    out = F.conv2d(F.pad(x.reshape(1, n * c, h, w), (3,) * 4, mode="replicate"), k2, groups=n * c)
    return out.reshape(n, c, h, w)


def jpeg(x: torch.Tensor, quality: int) -> torch.Tensor:
    buf = io.BytesIO()
    Image.fromarray(x.permute(1, 2, 0).round().clamp(0, 255).byte().numpy()).save(buf, "JPEG", quality=quality)
    return torch.from_numpy(np.asarray(Image.open(buf).convert("RGB")).copy()).permute(2, 0, 1).float()


def augment(imgs: np.ndarray, g: torch.Generator, rng: random.Random) -> torch.Tensor:
    """uint8 NHWC -> augmented float NCHW in 0..255 (before normalize)."""
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float()
    n = len(x)
    # a mirrored image keeps its label: most shapes are symmetric, and a mirrored crescent, arrow or bolt is still one
    flip = torch.rand(n, generator=g) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    gain = 1 + 0.08 * (2 * torch.rand(n, 3, 1, 1, generator=g) - 1)  # small colour shifts
    x = x * gain + 10 * torch.randn(n, 3, 1, 1, generator=g)
    sigma = torch.rand(n, generator=g) * 1.2
    sigma = torch.where(torch.rand(n, generator=g) < 0.3, torch.zeros(n), sigma)  # keep some images sharp
    x = gaussian_blur(x, sigma).clamp(0, 255)
    for i in range(n):  # real JPEG round trips on a quarter of the batch
        if rng.random() < 0.25:
            x[i] = jpeg(x[i], rng.randint(40, 90))
    x = x + torch.randn(n, 1, 1, 1, generator=g) * 6 * torch.randn(x.shape, generator=g)  # per-image noise level
    return x.round().clamp(0, 255)  # quantize, as saved generated images are uint8


def evaluate(checker: DemoChecker, n: int, seed: int) -> dict[str, dict[str, float]]:
    """Accuracy per attribute on fresh images, clean and blurred at fixed sigmas (no other augmentation), the
    clean ones also at the world's own texture offset (0, 0) without "other" patterns; then the "other" images
    alone (fresh random tiles, this seed's): the share called "other" and the share called a held-out texture."""
    scenes, imgs, _, _ = make_set(n, seed, any_phase=False)
    rows = {"clean, offset 0, world textures only": checker.score(imgs, scenes)}
    scenes, imgs, _, _ = make_set(n, seed, other=other_tiles(seed, 300))
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float()
    for name, sigma in (("clean", 0.0), ("blur s=0.6", 0.6), ("blur s=1.0", 1.0), ("blur s=1.2", 1.2)):
        xb = x if sigma == 0 else gaussian_blur(x, torch.full((n,), sigma)).round().clamp(0, 255)
        rows[name] = checker.score(xb.permute(0, 2, 3, 1).byte().numpy(), scenes)
    # The full training augmentation (blur, colour shift, JPEG, noise), seeded apart from training's.
    xa = augment(imgs, torch.Generator().manual_seed(seed), random.Random(seed))
    rows["augmented"] = checker.score(xa.permute(0, 2, 3, 1).byte().numpy(), scenes)
    others = [i for i, t in enumerate(scenes) if t["texture"] == OTHER]
    said = [p["texture"] for p in checker.predict(imgs[others])]
    rows["other patterns only (texture: called other)"] = {"texture": said.count(OTHER) / len(said)}
    rows["other patterns only (texture: called held-out)"] = {
        "texture": sum(t in W.HELD_OUT_TEXTURES for t in said) / len(said)}
    return rows


def write_readme(out_dir: Path, args, n_params: int, rows: dict, train_s: float, cpu_s: float) -> None:
    table = ["| images | shape | texture | fg | bg |", "|---|---|---|---|---|"]
    for name, r in rows.items():
        table.append(f"| {name} | " + " | ".join(f"{100 * r[a]:.2f}%" if a in r else "" for a in ATTRIBUTES) + " |")
    (out_dir / "README.md").write_text(f"""# Demo checker

Scores images of the shapes world (`engine/demo/world.py`) the way DINO / CLIP scores are used for real
models: `engine.demo.checker.DemoChecker.load().predict(images)` / `.score(images, scenes)`.

* **shape** ({len(W.SHAPES)} classes) and **texture** ({len(TEXTURE_LABELS)} classes: the world's {len(W.TEXTURES)} and
  "{OTHER}", any periodic pattern that is none of them): a small CNN, this file's
  `checker.safetensors` ({n_params:,} parameters, float32, safetensors only).
* **fg / bg colour**: pixel statistics, `demo_world.foreground_color` / `background_color` (no weights).

## Architecture
Conv3x3-BN-ReLU blocks, width {args.width}: 3->{3 * args.width // 4} at 32x32 (full resolution, as stripes and
checks have a 4-pixel period), stride-2 to 16x16 ({args.width}, {args.width}), stride-2 to 8x8
({2 * args.width}, {2 * args.width}), stride-2 to 4x4 ({4 * args.width}), global average pool, two linear heads.
Input: RGB uint8 / 127.5 - 1.

## Training recipe
`scripts/train_demo_checker.py --seed {args.seed}`: {args.n_train:,} fresh generator images
(`demo_world.random_scene(rng, SHAPES, TEXTURES)`: all shapes and textures, random colours, position, size,
rotation; each texture at a random offset of 0-11 px in x and y, i.e. every phase); in {OTHER_SHARE:.0%} of
them the fill is instead one of {args.other_tiles:,} "{OTHER}" patterns at a random phase (`other_tiles`: every
staggered brick / dot pattern of scripts/staggered_neighbours.py, i.e. the nearest neighbours of tiled and polka,
then random tiles of the texture family, scripts/ip_adapter_textures.py; each at least 0.25 in Hamming distance from
every world texture under every shift, transpose and tone inversion), {args.steps} AdamW steps
of batch {args.batch} (lr {args.lr}, one-cycle, weight decay 1e-4, label smoothing 0.05), summed
cross-entropy of both heads. Every batch is freshly augmented to look like small-model output: horizontal flip,
per-channel gain +-8% and offset (sd 10), Gaussian blur sigma U(0, 1.2) on 70% of images, a real JPEG
round trip (quality 40-90) on 25%, Gaussian pixel noise with a per-image sd ~ |N(0, 6)|.
Deterministic on CPU (1 thread). Drawing the images and training took {cpu_s:.0f} s of CPU time on one
thread ({train_s:.0f} s wall clock on a shared machine).

## Accuracy
{args.n_eval:,} fresh generator images (all shapes and textures, seed {EVAL_SEED}, never used in training;
textures at random offsets except in the first row, which has the world's own offset 0 and no "{OTHER}" images; the
others include "{OTHER}" patterns drawn with this seed, i.e. tiles the CNN never saw), clean, with a fixed
Gaussian blur, and with the training augmentations (the fg drop there is from colour shifts and noise moving
pixels away from the named palette):

{chr(10).join(table)}

The fg errors come from demo_world's `foreground_color`, not the CNN: on clean images the darker tone of
striped / checkered *green* (16, 68, 24) is nearer to `black` than to `green`; under blur sigma >= 1 a striped or
checkered fill averages its two tones into a colour far from every named one (often `None`, or yellow ->
orange). Solid fills and all backgrounds stay correct.

## Retrain
    python scripts/train_demo_checker.py          # ~{cpu_s / 60:.0f} min on 1 CPU thread; rewrites this folder
    python -m pytest tests/test_demo_checker.py -q
""")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=ROOT / "assets" / "demo-checker")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-train", type=int, default=28_800)
    p.add_argument("--other-tiles", type=int, default=2000, help="patterns for the 'other' texture class")
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--n-eval", type=int, default=2000)
    args = p.parse_args()
    assert args.seed != EVAL_SEED
    torch.set_num_threads(1)  # deterministic and polite: the reported time is for one thread
    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    rng = random.Random(args.seed + 1)

    t0, cpu0 = time.time(), time.process_time()
    other = other_tiles(args.seed, args.other_tiles, neighbours=True)
    _, imgs, y_shape, y_tex = make_set(args.n_train, args.seed, other=other)
    print(f"drew {len(imgs)} training images in {time.time() - t0:.0f}s", flush=True)
    net = CheckerNet(width=args.width)
    n_params = sum(p.numel() for p in net.parameters())
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps, pct_start=0.15)
    net.train()
    for step in range(args.steps):
        idx = torch.randint(0, len(imgs), (args.batch,), generator=g)
        x = normalize(augment(imgs[idx.numpy()], g, rng))
        ls, lt = net(x)
        loss = (F.cross_entropy(ls, y_shape[idx], label_smoothing=0.05)
                + F.cross_entropy(lt, y_tex[idx], label_smoothing=0.05))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == args.steps - 1:
            acc_s = (ls.argmax(1) == y_shape[idx]).float().mean().item()
            acc_t = (lt.argmax(1) == y_tex[idx]).float().mean().item()
            print(f"step {step:5d} loss {loss.item():.3f} batch acc shape {acc_s:.2f} texture {acc_t:.2f} "
                  f"({time.time() - t0:.0f}s)", flush=True)
    train_s, cpu_s = time.time() - t0, time.process_time() - cpu0  # wall time suffers from other jobs; CPU doesn't

    checker = DemoChecker(net)  # puts it in eval mode
    rows = evaluate(checker, args.n_eval, EVAL_SEED)
    for name, r in rows.items():
        print(f"{name:12s} " + "  ".join(f"{a} {100 * r[a]:.2f}%" for a in ATTRIBUTES if a in r))

    from safetensors.torch import save_file
    args.out.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in net.state_dict().items()}
    # One metadata key holding sorted JSON: safetensors writes several keys in hash order, so the file's
    # bytes would differ run to run even though the weights are bit-identical.
    config = {"shapes": list(W.SHAPES), "textures": list(TEXTURE_LABELS), "width": args.width,
              "seed": args.seed, "steps": args.steps}
    save_file(state, str(args.out / "checker.safetensors"), metadata={"config": json.dumps(config, sort_keys=True)})
    (args.out / "checker.safetensors").chmod(0o644)  # safetensors creates it owner-only (0600)
    write_readme(args.out, args, n_params, rows, train_s, cpu_s)
    print(f"wrote {args.out} ({n_params:,} params, trained in {train_s:.0f}s wall, {cpu_s:.0f}s CPU)")


if __name__ == "__main__":
    main()
