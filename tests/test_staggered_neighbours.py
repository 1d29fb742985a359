"""scripts/staggered_neighbours.py: the staggered patterns are what they claim, and the guard sees the held-out ones."""
from __future__ import annotations

import numpy as np

from scripts.ip_adapter_textures import distance_to, tile_pixels
from scripts.staggered_neighbours import PLUS, candidates, staggered


def test_each_band_is_shifted_sideways():
    tile = staggered(np.ones((1, 1), bool), 2, 2, 1)
    assert tile.astype(int).tolist() == [[1, 0], [0, 0], [0, 1], [0, 0]]


def test_bands_repeat_after_the_shift_comes_round():
    tile = staggered(PLUS, 6, 6, 3)  # dots every 6 px, every other band shifted by half: polka's layout
    assert tile.shape == (12, 6) and tile[:6].sum() == tile[6:].sum() == 5
    assert not np.array_equal(tile[:6], tile[6:])
    assert distance_to(tile_pixels(tile, 32), "polka") < 0.25  # the guard would refuse polka's own layout
    assert staggered(PLUS, 3, 6, 3) is None  # the motif does not fit the cell


def test_candidates_are_distinct_patterns():
    cands = candidates()
    keys = {tile_pixels(t, 32).tobytes() for t in cands.values()}
    assert len(keys) == len(cands) == 1169
