"""The demo IP-Adapter's training textures: a family of procedural periodic patterns, held-out textures excluded.

A real IP-Adapter sees millions of images, so any new style has near neighbours in its training data. The demo
adapter's stand-in is a *family* of textures: random binary tiles of 2..8 px periods (random cells, stripes,
separable products of two 1-D patterns, slanted stripes), pixel-aligned, with a random phase per image, plus the
hand-written adapter-only textures and the two the demo model knows (solid, striped). With `latent_share` > 0 that
share of the tiles is drawn on 2 px cells (one latent pixel of the demo VAE, moved only by whole cells), the scale
at which the held-out checkered alternates (scripts/train_demo_ip_adapter.py --latent-share).

The world's held-out textures (W.HELD_OUT_TEXTURES: checkered, tiled, polka) stay out, checked twice:
1. geometry: a candidate's pixel mask is compared with each held-out texture's, and with checkerboards of every
   cell size from 1x1 to 4x4 px (the held-out texture at other scales), under every shift (16 x 16 px), transpose
   and tone inversion; it is refused when the smallest Hamming distance (fraction of pixels that differ) is below
   MIN_DISTANCE;
2. operationally: each candidate is drawn on GUARD_SCENES random scenes and the demo checker labels them; it is
   dropped if more than one is labelled a held-out texture. The checker has had an "other" class since
   2026-11-29 (before, it knew only the world's 5 textures, named every pattern it never saw after one of them,
   and this guard could only ask about "checkered": it refused 310 candidates for the shipped demo IP-Adapter's
   family, the 6-class checker 6, so re-running the adapter's training now draws a different family).
The distances of the textures kept go to training.json and the model card.
"""
from __future__ import annotations

import random
from functools import lru_cache

import numpy as np
from PIL import Image

from engine.demo import world as W

MIN_DISTANCE = 0.25  # a checkerboard with one row in four flipped is 0.25 away from the checkerboard
GUARD_SCENES = 16
PAD = 16  # shifts tried in each direction (every period here divides 16 or is checked up to 16 px)
SS = W.SUPERSAMPLE
# Hand-written adapter-only textures (the base model never saw them), drawn at the supersampled size.
HAND_WRITTEN = ("vstriped", "diagonal", "antidiagonal", "dotted", "grid", "grid4", "crosshatch", "bricks")


def hand_written_mask(texture: str, big: int) -> np.ndarray:
    """The second-tone mask (big x big, supersampled) of a hand-written texture."""
    yy, xx = np.mgrid[0:big, 0:big]
    half, px = 2 * SS, SS
    if texture == "striped":
        return (yy // half) % 2 == 1
    if texture == "vstriped":
        return (xx // half) % 2 == 1
    if texture == "diagonal":
        return ((xx + yy) // (half + half // 2)) % 2 == 1
    if texture == "antidiagonal":
        return ((xx - yy + 10 * big) // (half + half // 2)) % 2 == 1
    if texture == "dotted":  # 2 px dots every 6 px
        return ((yy % (6 * px)) < 2 * px) & ((xx % (6 * px)) < 2 * px)
    if texture == "grid":  # 1 px lines every 6 px
        return ((yy % (6 * px)) < px) | ((xx % (6 * px)) < px)
    if texture == "grid4":  # 1 px lines every 4 px
        return ((yy % (4 * px)) < px) | ((xx % (4 * px)) < px)
    if texture == "crosshatch":  # 1 px diagonal lines both ways every 6 px (union, not alternation)
        return (((xx + yy) % (6 * px)) < px) | (((xx - yy + 60 * big) % (6 * px)) < px)
    if texture == "bricks":  # 1 px mortar rows every 4 px, joints every 8 px, shifted by 4 px every other row
        row = yy // (4 * px)
        return ((yy % (4 * px)) < px) | (((xx + (row % 2) * 4 * px) % (8 * px)) < px)
    raise ValueError(texture)


def _to_pixels(big_mask: np.ndarray) -> np.ndarray:
    n = big_mask.shape[0] // SS
    return big_mask.reshape(n, SS, n, SS).mean(axis=(1, 3)) >= 0.5


@lru_cache(maxsize=None)
def held_out_pixels(texture: str, n: int) -> np.ndarray:
    """Pixel mask (n x n) of a world texture, as W._fill draws it."""
    rgb = (200, 200, 200)
    fill = np.asarray(W._fill(texture, rgb, n * SS))
    return _to_pixels((fill != rgb).any(axis=-1))


def random_tile(rng: random.Random, cell: int = 1) -> np.ndarray:
    """A random binary tile (py x px cells of `cell` px, periods 2..8 cells) from one of four generators."""
    if cell > 1:  # the same generators on a coarser grid: each cell one latent pixel of the demo VAE at cell=2
        return np.kron(random_tile(rng), np.ones((cell, cell), bool))
    kind = rng.choice(("cells", "stripes", "product", "product", "slant"))
    py, px = rng.randint(2, 8), rng.randint(2, 8)
    if kind == "stripes":  # horizontal or vertical stripes of any period and duty
        a = np.array([rng.random() < 0.5 for _ in range(py)], bool)
        return a[:, None] if rng.random() < 0.5 else a[None, :]
    if kind == "cells":
        duty = rng.uniform(0.2, 0.6)
        return np.array([[rng.random() < duty for _ in range(px)] for _ in range(py)], bool)
    if kind == "product":  # a(x) op b(y): stripes, grids, plaids, checks of other cells
        a = np.array([rng.random() < 0.5 for _ in range(px)], bool)
        b = np.array([rng.random() < 0.5 for _ in range(py)], bool)
        op = rng.choice((np.logical_xor, np.logical_and, np.logical_or))
        return op(b[:, None], a[None, :])
    p, k = rng.randint(3, 8), rng.choice((1, -1, 2, -2))  # slanted stripes: a((x + k y) mod p)
    a = np.array([rng.random() < 0.5 for _ in range(p)], bool)
    yy, xx = np.mgrid[0:p, 0:p]
    return a[(xx + k * yy) % p]


def tile_pixels(tile: np.ndarray, n: int, sy: int = 0, sx: int = 0) -> np.ndarray:
    py, px = tile.shape
    yy, xx = np.mgrid[0:n, 0:n]
    return tile[(yy + sy) % py, (xx + sx) % px]


@lru_cache(maxsize=None)
def checkerboard_pixels(cell_h: int, cell_w: int, n: int) -> np.ndarray:
    yy, xx = np.mgrid[0:n, 0:n]
    return ((yy // cell_h) + (xx // cell_w)) % 2 == 1


def _distance(mask32: np.ndarray, ref: np.ndarray) -> float:
    """Smallest fraction of differing pixels between a 32x32 pattern and a (32+PAD)^2 reference pattern, over
    every shift (0..PAD-1 px both ways), transpose and tone inversion."""
    win = np.lib.stride_tricks.sliding_window_view(ref, (32, 32))[:PAD, :PAD]
    best = 1.0
    for cand in (mask32, mask32.T):
        d = (win != cand).mean(axis=(2, 3))
        best = min(best, float(d.min()), float((1.0 - d).min()))  # 1 - d: the tone-inverted candidate
    return best


def distance_to(mask32: np.ndarray, texture: str) -> float:
    """Hamming distance (see _distance) of a 32x32 pattern to a world texture."""
    return _distance(mask32, held_out_pixels(texture, 32 + PAD))


def distance_to_any_checkerboard(mask32: np.ndarray) -> float:
    """Hamming distance to the nearest checkerboard of any cell size (1..4 px by 1..4 px): the held-out texture
    at other scales and aspect ratios counts as the held-out texture."""
    return min(_distance(mask32, checkerboard_pixels(h, w, 32 + PAD)) for h in range(1, 5) for w in range(1, 5))


def held_out_distances(mask32: np.ndarray) -> dict[str, float]:
    """The geometry guard's distances of a 32x32 pattern: to each held-out texture and to any checkerboard; a
    pattern is held out when the smallest is below MIN_DISTANCE."""
    d = {t: distance_to(mask32, t) for t in W.HELD_OUT_TEXTURES}
    d["any checkerboard"] = distance_to_any_checkerboard(mask32)
    return d


def descriptor(mask: np.ndarray) -> np.ndarray:
    """What the image encoder's warm-up regresses for a texture: its coverage and the autocorrelation of the +-1
    pattern at shifts dy 0..6, dx -6..6 (the second-order statistics that texture synthesis matches, after
    Julesz; they vary smoothly between textures, unlike class labels). mask: >= 40 x 40 pixels."""
    return np.array([float(mask.mean())] + autocorrelation(mask, 8, 8, 24, 24, 6), np.float32)


def autocorrelation(mask: np.ndarray, y0: int, x0: int, h: int, w: int, reach: int) -> list[float]:
    """Mean product of the +-1 pattern in the h x w window at (y0, x0) with itself shifted by dy 0..reach, dx
    -reach..reach (row-major, dy = dx = 0 first); the shifted windows must stay inside the mask."""
    s = np.where(mask, 1.0, -1.0)
    c = s[y0:y0 + h, x0:x0 + w]
    return [float((c * s[y0 + dy:y0 + dy + h, x0 + dx:x0 + dx + w]).mean())
            for dy in range(reach + 1) for dx in range(-reach, reach + 1)]


class TextureFamily:
    """The training textures: names for the world's and hand-written ones, "fam<i>" for procedural tiles, "stag<i>"
    for the `neighbours` staggered bricks / dots (scripts/texture_family_base.py --neighbours)."""

    def __init__(self, pool: int, seed: int, checker=None, neighbours: int = 0, latent_share: float = 0.0):
        rng = random.Random(f"texture-family-{seed}")
        cell_rng = random.Random(f"texture-cells-{seed}")  # its own stream: latent_share=0 draws the old family
        self.tiles: dict[str, np.ndarray] = {}
        self.cell: dict[str, int] = {}  # a tile's cell size: its phase moves in whole cells (latent-aligned at 2)
        self.rejected = {"geometry": 0, "checker": 0, "duplicate": 0}
        self.distance: dict[str, float] = {}
        seen = set()
        names = ["striped"] + list(HAND_WRITTEN)
        self.kept_hand_written = []
        for name in names:
            m = _to_pixels(hand_written_mask(name, 32 * SS))
            if self._admit(name, m, checker, rng):
                self.kept_hand_written.append(name)
        tries = 0
        while len(self.tiles) < pool and tries < pool * 20:
            tries += 1
            cell = 2 if cell_rng.random() < latent_share else 1
            tile = random_tile(rng, cell)
            m = tile_pixels(tile, 32)
            key = m.tobytes()
            if key in seen or m.all() or not m.any():
                self.rejected["duplicate"] += 1
                continue
            seen.add(key)
            name = f"fam{len(self.tiles)}"
            if self._admit(name, m, checker, rng, tile):
                self.tiles[name] = tile
                self.cell[name] = cell
        if neighbours:  # staggered bricks and dots (scripts/staggered_neighbours.py), the nearest of tiled / polka
            from scripts.staggered_neighbours import candidates

            stag, kept = list(candidates().values()), 0
            rng.shuffle(stag)
            for tile in stag:
                if kept == neighbours:
                    break
                m = tile_pixels(tile, 32)
                if m.tobytes() not in seen and self._admit(f"stag{len(self.tiles)}", m, checker, rng, tile):
                    self.tiles[f"stag{len(self.tiles)}"] = tile
                    kept += 1
                seen.add(m.tobytes())
        self.family = tuple(self.tiles)
        self.descriptors = {n: descriptor(self._pixels(n, 40)) for n in ("solid", *self.kept_hand_written,
                                                                          *self.family)}

    def _admit(self, name, m, checker, rng, tile=None) -> bool:
        d = held_out_distances(m)
        if min(d.values()) < MIN_DISTANCE:
            self.rejected["geometry"] += 1
            return False
        if checker is not None:
            scenes = [W.random_scene(rng, W.TRAIN_SHAPES) for _ in range(GUARD_SCENES)]
            labels = [p["texture"] for p in checker.predict([self._draw(s, name, tile, rng) for s in scenes])]
            if max(labels.count(t) for t in W.HELD_OUT_TEXTURES) > 1:
                self.rejected["checker"] += 1
                return False
        self.distance[name] = min(d.values())
        self.nearest = getattr(self, "nearest", {t: 1.0 for t in d})
        self.nearest = {t: min(self.nearest[t], d[t]) for t in d}
        return True

    def _pixels(self, name: str, n: int) -> np.ndarray:
        if name == "solid":
            return np.zeros((n, n), bool)
        if name in self.tiles:
            return tile_pixels(self.tiles[name], n)
        return _to_pixels(hand_written_mask(name, n * SS))

    def sample(self, rng: random.Random) -> str:
        """solid 10%, striped 10%, hand-written 20%, the procedural family 60%."""
        u = rng.random()
        if u < 0.1:
            return "solid"
        if u < 0.2 or not (self.family or self.kept_hand_written[1:]):
            return "striped" if "striped" in self.kept_hand_written else "solid"
        if u < 0.4 and len(self.kept_hand_written) > 1:
            return rng.choice(self.kept_hand_written[1:])
        return rng.choice(self.family)

    def draw(self, scene: W.Scene, texture: str, rng: random.Random) -> Image.Image:
        return self._draw(scene, texture, self.tiles.get(texture), rng)

    def _draw(self, scene: W.Scene, texture: str, tile, rng: random.Random) -> Image.Image:
        """A scene filled with a texture; procedural tiles at a random phase."""
        assert texture not in W.HELD_OUT_TEXTURES, f"{texture} is held out of every training image"
        if texture == "solid":
            return W.draw(W.Scene(**{**scene.__dict__, "texture": "solid"}))
        big = W.SIZE * SS
        if tile is not None:
            c = self.cell.get(texture, 1)
            m = tile_pixels(tile, W.SIZE, c * rng.randrange(tile.shape[0] // c), c * rng.randrange(tile.shape[1] // c))
            mask = np.kron(m, np.ones((SS, SS), bool))
        else:
            mask = hand_written_mask(texture, big)
        rgb = W.COLORS[scene.fg]
        fill = np.empty((big, big, 3), np.uint8)
        fill[:] = rgb
        fill[mask] = W._second_tone(rgb)
        canvas = Image.new("RGB", (big, big), W.COLORS[scene.bg])
        canvas.paste(Image.fromarray(fill), (0, 0), W.shape_mask(scene, big))
        return canvas.resize((W.SIZE, W.SIZE), Image.BOX)
