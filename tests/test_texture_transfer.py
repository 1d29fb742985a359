"""The pattern score of scripts/texture_transfer.py: high for a texture's own pattern, not for another, 0 for none."""
from __future__ import annotations

from engine.demo import world as W
from scripts.ip_adapter_textures import held_out_pixels, hand_written_mask, _to_pixels
from scripts.texture_transfer import score


def _img(texture: str, fg: str = "red", phase=(0, 0)):
    return W.draw(W.Scene(shape="square", fg=fg, bg="white", texture=texture, phase=phase))


def test_pattern_score_tells_a_texture_from_another_and_from_a_plain_fill():
    checkered, tiled = held_out_pixels("checkered", 4), held_out_pixels("tiled", 8)
    striped = _to_pixels(hand_written_mask("striped", 4 * W.SUPERSAMPLE))
    for fg in ("red", "green", "white"):  # light and dark colours: the second tone is darker or lighter
        for phase in ((0, 0), (1, 2)):  # the statistics do not depend on where the pattern starts
            assert score(_img("checkered", fg, phase), checkered) > 0.9
            assert score(_img("tiled", fg, phase), tiled) > 0.9
            assert score(_img("striped", fg, phase), striped) > 0.9
        assert score(_img("striped", fg), checkered) < 0.0  # rows against a checker's alternation
        assert score(_img("tiled", fg), checkered) < 0.5  # a checker of bricks shares some of it
        assert score(_img("solid", fg), checkered) == 0.0
