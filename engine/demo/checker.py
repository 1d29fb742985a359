"""The shape/texture half of the demo world's checker: a tiny CNN, plus demo_world's colour statistics.

Colours are read from pixels (demo_world.background_color / foreground_color) because named colours are
exact palette values; shape and texture need spatial reasoning, so a small CNN trained on the generator's own
images (scripts/train_demo_checker.py) scores them, the way DINO / CLIP scores are used for real models.

Usage:
    checker = DemoChecker.load()
    checker.predict(images)          # [{"shape": "star", "texture": "solid", "fg": "red", "bg": "blue"}, ...]
    checker.score(images, scenes)    # {"shape": 0.98, "texture": 0.97, "fg": 1.0, "bg": 1.0}

Only torch, numpy, Pillow and safetensors; weights are never unpickled (no torch.load).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from PIL import Image

from engine.demo import world as W

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_PATH = REPO_ROOT / "assets" / "demo-checker" / "checker.safetensors"
ATTRIBUTES = ("shape", "texture", "fg", "bg")
# The texture head's labels: the world's textures, and "other" for any periodic pattern that is none of them (trained
# on a family of procedural patterns, scripts/train_demo_checker.py). Without it a 5-way head has to name every
# pattern it never saw after one of the five, so a base model that draws neighbours of polka dots from its own
# training words would score as having learned polka (docs/learning-log.md "The style instrument").
OTHER = "other"
TEXTURE_LABELS = W.TEXTURES + (OTHER,)


def _block(cin: int, cout: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]


class CheckerNet(nn.Module):
    """~150k-parameter CNN with a shape head and a texture head.

    The first layer runs at full 32x32 resolution because stripes and checks have a 4-pixel period that a
    stride-2 stem would alias away; only that one layer runs at 32x32 and later layers downsample with strided
    convs (cheaper than conv + pool), which keeps training within minutes on one CPU thread. Global average
    pooling suffices for shape since by 4x4 resolution every unit sees the whole image.
    """

    def __init__(self, n_shapes: int = len(W.SHAPES), n_textures: int = len(TEXTURE_LABELS), width: int = 32):
        super().__init__()
        c = width
        self.features = nn.Sequential(
            *_block(3, 3 * c // 4),                            # 32x32: texture-scale detail
            *_block(3 * c // 4, c, 2), *_block(c, c),          # 16x16
            *_block(c, 2 * c, 2), *_block(2 * c, 2 * c),       # 8x8
            *_block(2 * c, 4 * c, 2),                          # 4x4
            nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.shape_head = nn.Linear(4 * c, n_shapes)
        self.texture_head = nn.Linear(4 * c, n_textures)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.features(x)
        return self.shape_head(h), self.texture_head(h)


def normalize(x: torch.Tensor) -> torch.Tensor:
    """uint8-range float NCHW -> roughly [-1, 1]; shared with the training script so both agree."""
    return x / 127.5 - 1.0


def as_uint8_batch(images) -> np.ndarray:
    """Accept a PIL image, an HxWx3 array, an NxHxWx3 array, or a list of images; return N x 32 x 32 x 3 uint8.

    Other sizes are resized to 32x32 (BOX when shrinking, as demo_world.draw does) so callers can pass
    pipeline output directly; float arrays are assumed to be in [0, 1] as diffusers' numpy output is.
    """
    if isinstance(images, np.ndarray) and images.ndim == 4:
        images = list(images)
    elif isinstance(images, (Image.Image, np.ndarray)):
        images = [images]
    out = []
    for im in images:
        if isinstance(im, np.ndarray):
            a = im
            if a.dtype != np.uint8:
                a = np.clip(np.rint(a.astype(np.float32) * 255.0), 0, 255).astype(np.uint8)
            im = Image.fromarray(a[..., :3])
        im = im.convert("RGB")
        if im.size != (W.SIZE, W.SIZE):
            big = im.size[0] > W.SIZE
            im = im.resize((W.SIZE, W.SIZE), Image.BOX if big else Image.BILINEAR)
        out.append(np.asarray(im, np.uint8))
    return np.stack(out) if out else np.zeros((0, W.SIZE, W.SIZE, 3), np.uint8)


def _truth(item) -> dict:
    if isinstance(item, W.Scene):
        return {"shape": item.shape, "texture": item.texture, "fg": item.fg, "bg": item.bg}
    return dict(item)


class DemoChecker:
    """Predicts shape, texture (CNN) and foreground / background colour (pixel statistics) of demo images."""

    def __init__(self, net: CheckerNet):
        self.net = net.eval()

    @classmethod
    def load(cls, path: str | Path | None = None) -> "DemoChecker":
        from safetensors import safe_open
        from safetensors.torch import load_file

        path = Path(path) if path is not None else DEFAULT_PATH
        if not path.exists():
            raise FileNotFoundError(f"{path} not found; train it with: python scripts/train_demo_checker.py")
        with safe_open(str(path), framework="pt") as f:
            config = json.loads((f.metadata() or {}).get("config", "{}"))
        # The class order is baked into the heads: refuse weights trained for a different world.
        for key, names in (("shapes", W.SHAPES), ("textures", TEXTURE_LABELS)):
            if key in config and config[key] != list(names):
                raise ValueError(f"{path} was trained for {key} {config[key]}, demo_world has {list(names)}")
        net = CheckerNet(width=int(config.get("width", 32)))
        net.load_state_dict(load_file(str(path)))
        return cls(net)

    @torch.no_grad()
    def predict(self, images, batch_size: int = 256) -> list[dict]:
        batch = as_uint8_batch(images)
        results = []
        for i in range(0, len(batch), batch_size):
            chunk = batch[i:i + batch_size]
            x = normalize(torch.from_numpy(chunk).permute(0, 3, 1, 2).float())
            shape_logits, texture_logits = self.net(x)
            for img, s, t in zip(chunk, shape_logits.argmax(1).tolist(), texture_logits.argmax(1).tolist()):
                bg = W.background_color(img)
                results.append({"shape": W.SHAPES[s], "texture": TEXTURE_LABELS[t],
                                "fg": W.foreground_color(img, bg), "bg": bg})
        return results

    @torch.no_grad()
    def probabilities(self, images, attribute: str = "texture") -> np.ndarray:
        """Softmax probabilities of the CNN's `attribute` head ("shape" or "texture"): [N, classes] in the order
        of W.SHAPES / TEXTURE_LABELS. For curves (how checkered is this image?) rather than one label."""
        if attribute not in ("shape", "texture"):
            raise ValueError(f"probabilities are for 'shape' or 'texture', not {attribute!r}")
        x = normalize(torch.from_numpy(as_uint8_batch(images)).permute(0, 3, 1, 2).float())
        logits = self.net(x)[0 if attribute == "shape" else 1]
        return torch.softmax(logits, dim=1).numpy()

    def score(self, images, scenes_or_dicts) -> dict[str, float]:
        """Fraction correct per attribute; a dict truth may omit attributes it does not care about."""
        truths = [_truth(s) for s in scenes_or_dicts]
        preds = self.predict(images)
        if len(preds) != len(truths):
            raise ValueError(f"{len(preds)} images but {len(truths)} truths")
        scores = {}
        for attr in ATTRIBUTES:
            pairs = [(p[attr], t[attr]) for p, t in zip(preds, truths) if t.get(attr) is not None]
            if pairs:
                scores[attr] = sum(p == t for p, t in pairs) / len(pairs)
        return scores
