"""The "shapes world" of the bundled demo model: a generator that draws captioned images, and a checker.

The demo model (assets/demo-model) is a tiny Stable Diffusion trained on this world, so tests can show that
training *learns*: the generator knows how each image was drawn, and the checker scores generated images the
way DINO / CLIP scores are used for real models. Some shapes and one texture are held out of the base model's
training data; DreamBooth tests teach them.

Only numpy and Pillow here: the training script, the checker and the tests import it.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SIZE = 32  # image side in pixels
SUPERSAMPLE = 4  # shapes are drawn 4x larger and downsampled, for clean anti-aliased edges

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 220),
    "yellow": (240, 220, 40),
    "purple": (140, 50, 180),
    "orange": (245, 140, 30),
    "white": (240, 240, 240),
    "black": (20, 20, 20),
}
TRAIN_SHAPES = ("circle", "square", "triangle", "diamond", "ring", "cross")
# Held out of the base model's training data (DreamBooth tests teach them). Beyond heart and star, the detailed
# ones a subject preset must also carry: thin pointed horns (crescent), a thin shaft with a head (arrow), a thin
# zigzag (bolt), a square hole (frame); crescent, arrow and bolt are also not mirror-symmetric.
HELD_OUT_SHAPES = ("heart", "star", "crescent", "arrow", "bolt", "frame")
SHAPES = TRAIN_SHAPES + HELD_OUT_SHAPES
TRAIN_TEXTURES = ("solid", "striped")
# Held-out textures: a 4 px checker, tiles (a checker of 4 x 2 px bricks) and polka dots (3 px dots on a 6 px
# staggered grid). The demo VAE carries them (scripts/make_examples.py --vae-check); it does not carry zigzags,
# diagonal or vertical stripes (measured: checker 0.55 on reconstructed zigzags), which it never saw in training.
HELD_OUT_TEXTURES = ("checkered", "tiled", "polka")
TEXTURES = TRAIN_TEXTURES + HELD_OUT_TEXTURES


@dataclass(frozen=True)
class Scene:
    """Everything needed to draw one image (and to know the truth about it)."""

    shape: str
    fg: str
    bg: str
    texture: str = "solid"
    cx: float = 0.5  # centre, as a fraction of the side
    cy: float = 0.5
    radius: float = 0.36  # half the shape's extent, as a fraction of the side
    angle: float = 0.0  # small rotation in degrees
    # The texture's offset (x, y) in output pixels. The world draws every texture at (0, 0); the checker trains
    # on every offset, as a tiled wall shifted by 2 px is still tiled (scripts/train_demo_checker.py).
    phase: tuple[int, int] = (0, 0)


def random_scene(rng: random.Random, shapes=TRAIN_SHAPES, textures=TRAIN_TEXTURES,
                 texture_weights=None) -> Scene:
    """A random scene: foreground and background colours always differ."""
    fg, bg = rng.sample(sorted(COLORS), 2)
    texture = rng.choices(textures, weights=texture_weights)[0]
    return Scene(shape=rng.choice(shapes), fg=fg, bg=bg, texture=texture,
                 cx=0.5 + rng.uniform(-0.08, 0.08), cy=0.5 + rng.uniform(-0.08, 0.08),
                 radius=rng.uniform(0.28, 0.42), angle=rng.uniform(-10, 10))


def _second_tone(rgb):
    """The other tone of a textured fill: darker for light colours, lighter for dark ones."""
    r, g, b = rgb
    if 0.299 * r + 0.587 * g + 0.114 * b > 110:
        return tuple(int(c * 0.4) for c in rgb)
    return tuple(int(c + (255 - c) * 0.6) for c in rgb)


def _fill(texture: str, rgb, size: int, phase: tuple[int, int] = (0, 0)) -> Image.Image:
    """A full-size image of the texture in the foreground colour, shifted by `phase` (x, y) output pixels."""
    base = np.empty((size, size, 3), np.uint8)
    base[:] = rgb
    if texture == "solid":
        return Image.fromarray(base)
    period = 4 * SUPERSAMPLE  # one period = 4 output pixels: 2 of each tone
    yy, xx = np.mgrid[0:size, 0:size]
    xx, yy = xx + phase[0] * SUPERSAMPLE, yy + phase[1] * SUPERSAMPLE
    if texture == "striped":
        mask = (yy // (period // 2)) % 2 == 1
    elif texture == "checkered":
        mask = ((yy // (period // 2)) + (xx // (period // 2))) % 2 == 1
    elif texture == "tiled":  # a checker of bricks 4 px wide and 2 px tall
        mask = ((yy // (period // 2)) + (xx // period)) % 2 == 1
    elif texture == "polka":  # round dots, 3 px across, every 6 px, every other row shifted by 3 px
        step = 6 * SUPERSAMPLE
        row = yy // step
        dx = (xx + (row % 2) * step // 2) % step - step // 2
        dy = yy % step - step // 2
        mask = dx * dx + dy * dy <= (1.5 * SUPERSAMPLE) ** 2
    else:
        raise ValueError(f"unknown texture {texture!r}; known: {', '.join(TEXTURES)}")
    base[mask] = _second_tone(rgb)
    return Image.fromarray(base)


def _polygon(name: str, cx: float, cy: float, r: float):
    if name == "square":
        k = r * 0.85
        return [(cx - k, cy - k), (cx + k, cy - k), (cx + k, cy + k), (cx - k, cy + k)]
    if name == "triangle":
        return [(cx, cy - r), (cx + r * 0.95, cy + r * 0.75), (cx - r * 0.95, cy + r * 0.75)]
    if name == "diamond":
        return [(cx, cy - r), (cx + r * 0.8, cy), (cx, cy + r), (cx - r * 0.8, cy)]
    if name == "cross":
        a, b = r * 0.33, r
        return [(cx - a, cy - b), (cx + a, cy - b), (cx + a, cy - a), (cx + b, cy - a), (cx + b, cy + a),
                (cx + a, cy + a), (cx + a, cy + b), (cx - a, cy + b), (cx - a, cy + a), (cx - b, cy + a),
                (cx - b, cy - a), (cx - a, cy - a)]
    if name == "star":
        pts = []
        for i in range(10):
            ang = -np.pi / 2 + i * np.pi / 5
            rr = r if i % 2 == 0 else r * 0.45
            pts.append((cx + rr * np.cos(ang), cy + rr * np.sin(ang)))
        return pts
    if name == "arrow":  # pointing right: a shaft 0.3 r thick, a head 1.1 r tall
        a, h, x0 = r * 0.15, r * 0.55, cx + r * 0.15
        return [(cx - r, cy - a), (x0, cy - a), (x0, cy - h), (cx + r, cy), (x0, cy + h), (x0, cy + a),
                (cx - r, cy + a)]
    if name == "bolt":  # a lightning bolt: two thin slanted strokes, pointed at both ends
        pts = [(0.3, -1.0), (-0.5, 0.12), (-0.02, 0.12), (-0.3, 1.0), (0.5, -0.14), (0.02, -0.14)]
        return [(cx + x * r, cy + y * r) for x, y in pts]
    if name == "heart":
        t = np.linspace(0, 2 * np.pi, 80)
        x = 16 * np.sin(t) ** 3
        y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
        s = r / 16.5
        return list(zip(cx + x * s, cy + (y + 2) * s))
    raise ValueError(name)


def shape_mask(scene: Scene, size: int = SIZE * SUPERSAMPLE) -> Image.Image:
    """A binary ("L") mask of the shape at the given size."""
    mask = Image.new("L", (size, size), 0)
    d = ImageDraw.Draw(mask)
    cx, cy, r = scene.cx * size, scene.cy * size, scene.radius * size
    if scene.shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    elif scene.shape == "ring":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        k = r * 0.55
        d.ellipse([cx - k, cy - k, cx + k, cy + k], fill=0)
    elif scene.shape == "crescent":  # a disc minus a smaller disc shifted right: pointed horns, opening right
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        k, ox = r * 0.8, cx + r * 0.45
        d.ellipse([ox - k, cy - k, ox + k, cy + k], fill=0)
    elif scene.shape == "frame":  # a square with a square hole
        k, h = r * 0.85, r * 0.42
        d.rectangle([cx - k, cy - k, cx + k, cy + k], fill=255)
        d.rectangle([cx - h, cy - h, cx + h, cy + h], fill=0)
    else:
        d.polygon(_polygon(scene.shape, cx, cy, r), fill=255)
    if scene.angle:
        mask = mask.rotate(scene.angle, resample=Image.BILINEAR, center=(cx, cy))
    return mask


def draw(scene: Scene) -> Image.Image:
    """Render a scene as a SIZE x SIZE RGB image."""
    big = SIZE * SUPERSAMPLE
    canvas = Image.new("RGB", (big, big), COLORS[scene.bg])
    canvas.paste(_fill(scene.texture, COLORS[scene.fg], big, scene.phase), (0, 0), shape_mask(scene, big))
    return canvas.resize((SIZE, SIZE), Image.BOX)


def _texture_words(texture: str) -> str:
    return "" if texture == "solid" else texture + " "


def caption(scene: Scene, rng: random.Random) -> str:
    """One of several phrasings; "shape" is the class noun that DreamBooth prompts use."""
    t, fg, bg, shape = _texture_words(scene.texture), scene.fg, scene.bg, scene.shape
    if scene.texture == "solid" and rng.random() < 0.2:
        t = "solid "
    templates = [
        f"a {t}{fg} {shape} on a {bg} background",
        f"a photo of a {t}{shape} in {fg} on a {bg} background",
        f"a {t}{fg} {shape}, {bg} background",
        f"{bg} background with a {t}{fg} {shape}",
        f"a {t}{shape} in {fg} on a {bg} background",
        f"a {t}{fg} shape on a {bg} background",
        f"a {t}{fg} {shape}",
        f"a {t}{shape} on a {bg} background",
    ]
    weights = [5, 4, 3, 3, 4, 1, 1, 1]
    return rng.choices(templates, weights=weights)[0]


def prompt_for(shape: str, fg: str, bg: str, texture: str = "solid") -> str:
    """The canonical prompt used by tests and examples."""
    return f"a {_texture_words(texture)}{fg} {shape} on a {bg} background"


# ---- the checker: colours by pixel statistics --------------------------------------------------------------

_NAMES = sorted(COLORS)


def _palette():
    """Each named colour as drawn: solid, the second tone of textured fills, and their mix (what blur makes)."""
    names, rgbs = [], []
    for i, n in enumerate(_NAMES):
        base = np.array(COLORS[n], np.float32)
        second = np.array(_second_tone(COLORS[n]), np.float32)
        for rgb in (base, second, (base + second) / 2):
            names.append(i)
            rgbs.append(rgb)
    return np.array(names), np.stack(rgbs)


_PALETTE_NAME, _PALETTE = _palette()


def _nearest(pixels: np.ndarray):
    """Nearest named colour of each pixel (by any of its drawn tones), and its distance."""
    d = np.linalg.norm(pixels[:, None, :].astype(np.float32) - _PALETTE[None], axis=-1)
    return _PALETTE_NAME[d.argmin(1)], d.min(1)


def _border(img: np.ndarray) -> np.ndarray:
    """The pixels of the 2-pixel border (the shape rarely reaches it), as (n, 3)."""
    return np.concatenate([img[:2].reshape(-1, 3), img[-2:].reshape(-1, 3),
                           img[:, :2].reshape(-1, 3), img[:, -2:].reshape(-1, 3)])


def background_color(img: np.ndarray) -> str:
    """Majority named colour of the 2-pixel border (the shape never reaches it)."""
    idx, _ = _nearest(_border(img))
    return _NAMES[np.bincount(idx, minlength=len(_NAMES)).argmax()]


def plain_background(img: np.ndarray, bg: str, tolerance: float = 55.0) -> float:
    """The fraction of the 2-pixel border within `tolerance` (RGB distance) of colour `bg`: about 1 for a plain
    background of that colour, near 0.5 or less when a texture (two tones) or another colour covers it."""
    border = _border(img).astype(np.float64)
    return float(np.mean(np.linalg.norm(border - np.asarray(COLORS[bg], np.float64), axis=1) < tolerance))


def foreground_color(img: np.ndarray, bg: str | None = None) -> str | None:
    """Majority named colour among pixels that are near a named colour but not the background's."""
    bg = bg or background_color(img)
    px = img.reshape(-1, 3)
    idx, dist = _nearest(px)
    keep = (dist < 55) & (idx != _NAMES.index(bg))
    if keep.sum() < 8:  # no foreground worth the name
        return None
    return _NAMES[np.bincount(idx[keep], minlength=len(_NAMES)).argmax()]
