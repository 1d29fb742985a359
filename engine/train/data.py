"""DreamBooth data: a deterministic epoch sampler with a position (exact resume) and the instance/class examples."""
from __future__ import annotations

from pathlib import Path

import torch

from engine.core.errors import CheckpointError
from engine.core.images import load_image
from engine.core.train_config import TrainConfig

# ---- data: a deterministic sampler with a position, and the DreamBooth examples --------------------------------

class EpochSampler:
    """Shuffled order, one permutation per epoch from its own generator; (epoch, pos, perm, generator) are saved in
    checkpoints, so a resume continues mid-epoch exactly where it stopped (what skip_first_batches approximates)."""

    def __init__(self, n: int, seed: int):
        self.n, self.gen = n, torch.Generator().manual_seed(seed)
        self.epoch, self.pos = 0, 0
        self.perm = torch.randperm(n, generator=self.gen)

    def take(self, k: int) -> list[int]:
        out = []
        while len(out) < k:
            if self.pos == self.n:
                self.epoch, self.pos = self.epoch + 1, 0
                self.perm = torch.randperm(self.n, generator=self.gen)
            out.append(int(self.perm[self.pos]))
            self.pos += 1
        return out

    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        return {"gen": self.gen.get_state(), "perm": self.perm.clone()}, {"epoch": self.epoch, "pos": self.pos,
                                                                          "n": self.n}

    def load(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        if meta["n"] != self.n:
            raise CheckpointError(f"the checkpoint was made with {meta['n']} examples but the dataset has "
                                     f"{self.n}; resume with the same images, or start a new run")
        self.gen.set_state(tensors["gen"])
        self.perm, self.epoch, self.pos = tensors["perm"], meta["epoch"], meta["pos"]


class DreamBoothData:
    """Instance (and class) images resized once; crops and flips drawn from the training generator per example."""

    def __init__(self, cfg: TrainConfig, class_images: list[Path], tokenizer, resolution: int,
                 class_captions: list[str] = ()):
        from engine.generate.sampler import tokenize

        self.cfg, self.res = cfg, resolution
        self.images = {"instance": [self._resize(p) for p in cfg.instance_images],
                       "class": [self._resize(p) for p in class_images]}
        self.n = len(self.images["instance"])
        if cfg.with_prior_preservation:  # as diffusers: every class image is seen once per epoch
            self.n = max(self.n, len(self.images["class"]))
        captions = cfg.instance_captions or (cfg.instance_prompt,) * len(cfg.instance_images)
        self.ids = {"instance": [tokenize(tokenizer, [c]) for c in captions],
                    "class": [tokenize(tokenizer, [c]) for c in class_captions or [cfg.class_prompt.strip()]],
                    "dropped": [tokenize(tokenizer, [cfg.instance_prompt])]}
        self.latent_cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] | None = None

    def _resize(self, path):
        """Load an image and scale its shorter side to the resolution (once: crops are taken per example)."""
        from PIL import Image

        img, _ = load_image(path)  # untrusted input: format by content, size checked, fully decoded (IM-1..8)
        scale = self.res / min(img.size)
        size = (max(self.res, round(img.size[0] * scale)), max(self.res, round(img.size[1] * scale)))
        return img.resize(size, Image.BICUBIC)

    def place(self, img, gen: torch.Generator | None) -> tuple[int, int, bool]:
        """(top, left, flip): centred or drawn from `gen` (crop first, then flip: the order is part of the run)."""
        w, h = img.size
        if self.cfg.center_crop or gen is None:
            top, left = (h - self.res) // 2, (w - self.res) // 2
        else:
            top = int(torch.randint(0, h - self.res + 1, (1,), generator=gen))
            left = int(torch.randint(0, w - self.res + 1, (1,), generator=gen))
        flip = bool(self.cfg.random_flip and gen is not None and float(torch.rand(1, generator=gen)) < 0.5)
        return top, left, flip

    def pixels(self, kind: str, i: int, top: int, left: int, flip: bool) -> torch.Tensor:
        """Image i of `kind` cropped to resolution, as [3, H, W] in [-1, 1]."""
        img = self.images[kind][i]
        crop = img.crop((left, top, left + self.res, top + self.res))
        x = torch.tensor(bytearray(crop.tobytes()), dtype=torch.uint8).view(self.res, self.res, 3)
        x = x.permute(2, 0, 1).float() / 127.5 - 1.0
        return x.flip(-1) if flip else x

    def example(self, kind: str, i: int, gen: torch.Generator) -> tuple[tuple, torch.Tensor | None]:
        """(cache key, pixels or None when latents are cached) for image i % count of `kind`."""
        i = i % len(self.images[kind])
        top, left, flip = self.place(self.images[kind][i], gen)
        key = (kind, i, flip)
        return key, None if self.latent_cache is not None else self.pixels(kind, i, top, left, flip)

    def batch(self, indices: list[int], gen: torch.Generator) -> dict:
        """Instance examples, then (with prior preservation) the class examples of the same indices."""
        kinds = ["instance"] + (["class"] if self.cfg.with_prior_preservation else [])
        keys, pixels, ids = [], [], []
        for kind in kinds:
            for i in indices:
                key, px = self.example(kind, i, gen)
                keys.append(key)
                pixels.append(px)
                # instance: that image's own caption, or with probability caption_dropout the instance prompt (drawn
                # only when on, so runs without it keep their random stream)
                dropped = (kind == "instance" and self.cfg.caption_dropout > 0
                           and float(torch.rand(1, generator=gen)) < self.cfg.caption_dropout)
                ids.append(self.ids["dropped"][0] if dropped else self.ids[kind][key[1] % len(self.ids[kind])])
        return {"keys": keys, "pixels": None if pixels[0] is None else torch.stack(pixels), "ids": torch.cat(ids)}
