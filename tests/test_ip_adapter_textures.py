"""The demo IP-Adapter's training textures keep the held-out textures out (scripts/ip_adapter_textures.py)."""
from __future__ import annotations

import random

import numpy as np
import pytest

from engine.demo import world as W
from scripts.ip_adapter_textures import MIN_DISTANCE, TextureFamily, descriptor, held_out_pixels, tile_pixels


def _brute_distance(m: np.ndarray, ref_tile: np.ndarray) -> float:
    """Independent of the module's sliding windows: np.roll over one full period of the reference."""
    best = 1.0
    ref = np.tile(ref_tile, (64 // ref_tile.shape[0] + 1, 64 // ref_tile.shape[1] + 1))[:64, :64]
    for cand in (m, m.T):
        for sy in range(ref_tile.shape[0]):
            for sx in range(ref_tile.shape[1]):
                d = float((np.roll(ref, (-sy, -sx), axis=(0, 1))[:32, :32] != cand).mean())
                best = min(best, d, 1 - d)
    return best


def test_checkered_in_any_shift_transpose_or_tone_is_refused():
    fam = TextureFamily(pool=0, seed=0)
    m = held_out_pixels("checkered", 40)
    for variant in (m[:32, :32], m[1:33, 3:35], m[2:34, 0:32].T, ~m[5:37, 7:39]):
        assert not fam._admit("x", variant, None, random.Random(0))
    big_cells = (np.add.outer(np.arange(32) // 3, np.arange(32) // 1) % 2).astype(bool)  # 3 x 1 px checkerboard
    assert not fam._admit("y", big_cells, None, random.Random(0))
    with pytest.raises(AssertionError):
        fam.draw(W.random_scene(random.Random(0)), "checkered", random.Random(0))


def test_family_stays_away_from_every_held_out_texture():
    fam = TextureFamily(pool=15, seed=3)
    assert len(fam.family) == 15
    cells = {"checkered": (4, 4), "tiled": (4, 8), "polka": (12, 6)}  # periods in px
    refs = {t: held_out_pixels(t, 48)[:p[0], :p[1]] for t, p in cells.items()}
    for h in range(1, 5):
        for w in range(1, 5):
            refs[f"checker {h}x{w}"] = (np.add.outer(np.arange(2 * h) // h, np.arange(2 * w) // w) % 2).astype(bool)
    for name, tile in fam.tiles.items():
        m = tile_pixels(tile, 32)
        for ref_name, ref in refs.items():
            assert _brute_distance(m, ref) >= MIN_DISTANCE, (name, ref_name)
    assert min(fam.nearest.values()) >= MIN_DISTANCE


def test_staggered_neighbours_join_the_family_and_stay_away_from_the_held_out_ones():
    # texture_family_base.py --neighbours: the nearest patterns to tiled and polka that the geometry guard admits.
    fam = TextureFamily(pool=0, seed=0, neighbours=6)
    stag = [n for n in fam.family if n.startswith("stag")]
    assert len(stag) == 6 and len({fam.tiles[n].tobytes() for n in stag}) == 6
    refs = {t: held_out_pixels(t, 48)[:p[0], :p[1]] for t, p in {"tiled": (4, 8), "polka": (12, 6)}.items()}
    for name in stag:
        for ref_name, ref in refs.items():
            assert _brute_distance(tile_pixels(fam.tiles[name], 32), ref) >= MIN_DISTANCE, (name, ref_name)


def test_texture_descriptor_ignores_the_phase_but_tells_textures_apart():
    fam = TextureFamily(pool=5, seed=1)
    tile = fam.tiles["fam0"]
    a = descriptor(tile_pixels(tile, 40))
    b = descriptor(tile_pixels(tile, 40, 1, 2))
    assert np.abs(a - b).max() < 0.15  # a 24 px window of a periodic pattern: nearly the same statistics
    assert np.abs(descriptor(held_out_pixels("checkered", 40)) - descriptor(held_out_pixels("tiled", 40))).max() > 0.5


def test_latent_cell_textures_sit_on_the_latent_grid_and_stay_away_from_every_held_out_texture():
    # --latent-share: procedural tiles on 2 px cells (one latent pixel of the demo VAE), drawn at even phases only.
    fam = TextureFamily(pool=12, seed=5, latent_share=1.0)
    assert len(fam.family) == 12 and set(fam.cell.values()) == {2}
    refs = {t: held_out_pixels(t, 48)[:p[0], :p[1]] for t, p in {"checkered": (4, 4), "tiled": (4, 8)}.items()}
    refs["checker 2x2"] = (np.add.outer(np.arange(4) // 2, np.arange(4) // 2) % 2).astype(bool)
    rng = random.Random(0)
    for name, tile in fam.tiles.items():
        assert tile.shape[0] % 2 == 0 and tile.shape[1] % 2 == 0
        assert (tile[::2, ::2].repeat(2, 0).repeat(2, 1) == tile).all()  # whole 2 x 2 px cells
        for ref_name, ref in refs.items():
            assert _brute_distance(tile_pixels(tile, 32), ref) >= MIN_DISTANCE, (name, ref_name)
        scene = W.Scene(shape="square", fg="red", bg="blue")
        img = np.asarray(fam.draw(scene, name, rng)).astype(int)[8:24, 8:24]  # inside the square
        assert (img[::2, ::2].repeat(2, 0).repeat(2, 1) == img).all(), name  # phase in whole cells
    assert TextureFamily(pool=12, seed=5).tiles.keys() == fam.tiles.keys()  # same names, the default stays 1 px
    assert any(TextureFamily(pool=12, seed=5).cell[n] == 1 for n in fam.tiles)
