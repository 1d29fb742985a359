"""Requests for blending styles: a blend (styles and weights), an interpolation strip, and baking a blend into a
new style. Frozen and validated on construction, torch-free so ui/ can build them.

Whether every style was trained on the loaded base model is checked by the engine (it knows the model).
"""
from __future__ import annotations

from dataclasses import dataclass

from engine.core.config import (MAX_STYLES, STRENGTH_RANGE, GenerateRequest, _check, _coerce, real_number)

BAKE_METHODS = ("exact", "svd")
MAX_STRIP = 33


def _ids(value, field: str) -> tuple[str, ...]:
    _check(isinstance(value, (tuple, list)) and all(isinstance(s, str) and 0 < len(s) <= 200 for s in value),
           f"`{field}` must be a list of style ids from the list of styles")
    return tuple(value)


def _numbers(value, field: str) -> tuple[float, ...]:
    _check(isinstance(value, (tuple, list)), f"`{field}` must be a list of numbers")
    lo, hi = STRENGTH_RANGE
    out = tuple(real_number(v, f"`{field}[{k}]`") for k, v in enumerate(value))
    for k, v in enumerate(out):
        _check(lo <= v <= hi, f"`{field}[{k}]` must be between {lo:g} and {hi:g} but is {v}")
    return out


@dataclass(frozen=True)
class BlendRequest:
    """Two or more styles with a weight each; the blend adds their LoRA updates, each times its weight.

    `text_encoder_weights` (optional, one per style) weighs the text-encoder part separately from the UNet part,
    e.g. one style's subject words with another's look; empty means the same weights for both.
    """

    styles: tuple[str, ...]
    weights: tuple[float, ...]
    text_encoder_weights: tuple[float, ...] = ()
    schema_version: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "styles", _ids(self.styles, "styles"))
        object.__setattr__(self, "weights", _numbers(self.weights, "weights"))
        object.__setattr__(self, "text_encoder_weights", _numbers(self.text_encoder_weights, "text_encoder_weights"))
        n = len(self.styles)
        _check(n >= 2, f"a blend needs at least 2 styles but has {n}; pick another style to blend with")
        _check(n <= MAX_STYLES, f"a blend holds at most {MAX_STYLES} styles but has {n}")
        _check(len(set(self.styles)) == n, "a style is listed twice; give each style once, with one weight")
        _check(len(self.weights) == n, f"give one weight per style: {n} styles but {len(self.weights)} weights")
        _check(not self.text_encoder_weights or len(self.text_encoder_weights) == n,
               f"give one text-encoder weight per style ({n}), or none to use the same weights")
        _check(self.schema_version == 1, f"unsupported schema_version {self.schema_version}; this app reads 1")

    @property
    def weighted(self) -> tuple[tuple[str, float, float], ...]:
        """(style id, UNet weight, text-encoder weight) for each style."""
        te = self.text_encoder_weights or self.weights
        return tuple(zip(self.styles, self.weights, te))


@dataclass(frozen=True)
class BlendStripRequest:
    """K images with the same prompt and seed, weights going from all style A (1, 0) to all style B (0, 1).

    Image k uses w_B = k / (K - 1) and w_A = 1 - w_B, so the first image is style A alone and the last is B alone.
    """

    prompt: str
    style_a: str
    style_b: str
    num_images: int = 9
    negative_prompt: str = ""
    num_inference_steps: int = 20
    guidance_scale: float = 5.0
    guidance_rescale: float = 0.0
    width: int = 0
    height: int = 0
    seed: int = 0
    scheduler: str = "dpmpp_2m"
    schema_version: int = 1

    def __post_init__(self) -> None:
        _coerce(self)
        _check(2 <= self.num_images <= MAX_STRIP,
               f"`num_images` must be between 2 and {MAX_STRIP} but is {self.num_images}")
        for name in ("style_a", "style_b"):
            _check(isinstance(getattr(self, name), str) and getattr(self, name) != "",
                   f"`{name}` is empty; pick a style to blend")
        _check(self.style_a != self.style_b, "`style_a` and `style_b` are the same style; pick two different ones")
        self.generate_request(self.weights[0])  # the generation settings are checked exactly as Generate checks them

    @property
    def weights(self) -> list[tuple[float, float]]:
        """(w_A, w_B) for each image, from (1, 0) to (0, 1)."""
        k = self.num_images - 1
        return [(1.0 - i / k, i / k) for i in range(self.num_images)]

    def generate_request(self, w: tuple[float, float]) -> GenerateRequest:
        """The GenerateRequest of one image of the strip (what its recipe refills)."""
        return GenerateRequest(prompt=self.prompt, negative_prompt=self.negative_prompt,
                               num_inference_steps=self.num_inference_steps, guidance_scale=self.guidance_scale,
                               guidance_rescale=self.guidance_rescale, width=self.width, height=self.height,
                               seed=self.seed, scheduler=self.scheduler,
                               styles=((self.style_a, w[0]), (self.style_b, w[1])))


@dataclass(frozen=True)
class BakeRequest:
    """Save a blend as a new style: `exact` concatenates the LoRA ranks (no error, rank = sum of ranks); `svd`
    compresses the summed update to `rank` by truncated SVD (smaller file, reports its relative error)."""

    name: str
    blend: BlendRequest
    method: str = "exact"
    rank: int = 0  # svd only: the target rank (1..1024)
    schema_version: int = 1

    def __post_init__(self) -> None:
        _coerce(self)
        _check(isinstance(self.name, str) and 0 < len(self.name.strip()) <= 80,
               "`name` is empty; name the new style (up to 80 characters)")
        _check(isinstance(self.blend, BlendRequest), "`blend` must be a BlendRequest")
        _check(self.method in BAKE_METHODS, f"unknown bake method {self.method!r}; choose one of: "
                                            f"{', '.join(BAKE_METHODS)}")
        _check(isinstance(self.rank, int) and not isinstance(self.rank, bool), "`rank` must be a whole number")
        if self.method == "svd":
            _check(1 <= self.rank <= 1024, f"`rank` must be between 1 and 1024 for an SVD bake but is {self.rank}")
        else:
            _check(self.rank == 0, "`rank` applies to the svd method only; leave it 0 for an exact bake")
