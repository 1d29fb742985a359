"""The batch request: prompts x seeds x styles (or x strengths of one style), as one job with one grid and zip.

Torch-free so ui/ can build it; engine/generate/batch.py runs it.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from engine.core.config import (MAX_PROMPT_CHARS, STRENGTH_RANGE, GenerateRequest, _check, _coerce, real_number)

MAX_BATCH_IMAGES = 1000
MAX_PROMPT_LINES = 200


@dataclass(frozen=True)
class BatchRequest:
    """Every prompt line x `seeds_per_prompt` seeds x every style (x every strength, when `strengths` is set).

    `prompts`: one prompt per non-empty line. `styles`: style ids, "" meaning no style (default: no style only).
    `strengths`: when given, each style is run at each of these strengths (an X/Y plot of style x strength);
    otherwise at `style_strength`. Image seeds: prompt line p, seed index s uses `seed + s` for every style, so a
    grid row compares styles on the same noise.
    """

    prompts: str
    seeds_per_prompt: int = 1
    styles: tuple[str, ...] = ("",)
    strengths: tuple[float, ...] = ()
    style_strength: float = 1.0
    negative_prompt: str = ""
    num_inference_steps: int = 20
    guidance_scale: float = 5.0
    guidance_rescale: float = 0.0
    width: int = 0
    height: int = 0
    seed: int = 0
    scheduler: str = "dpmpp_2m"
    batch_size: int = 4  # images per sampling call (same style and strength)
    make_grid: bool = True
    make_zip: bool = True
    # An instant style over the whole batch (on top of each cell's LoRA style); see GenerateRequest.
    instant_style: str = ""
    instant_strength: float = 1.0
    instant_style_only: bool = True
    schema_version: int = 1

    def __post_init__(self) -> None:
        _coerce(self)
        _check(isinstance(self.prompts, str) and self.lines, "`prompts` is empty: write one prompt per line")
        _check(len(self.lines) <= MAX_PROMPT_LINES,
               f"at most {MAX_PROMPT_LINES} prompt lines per batch but there are {len(self.lines)}")
        _check(all(len(ln) <= MAX_PROMPT_CHARS for ln in self.lines),
               f"prompts are limited to {MAX_PROMPT_CHARS} characters each; shorten the long line")
        for b in ("make_grid", "make_zip"):
            _check(isinstance(getattr(self, b), bool), f"`{b}` must be true or false, not {getattr(self, b)!r}")
        _check(isinstance(self.styles, (tuple, list)) and len(self.styles) >= 1
               and all(isinstance(s, str) and len(s) <= 200 for s in self.styles),
               "`styles` must be a list of style ids (\"\" for no style)")
        object.__setattr__(self, "styles", tuple(self.styles))
        _check(len(set(self.styles)) == len(self.styles), "a style is listed twice in `styles`")
        _check(isinstance(self.strengths, (tuple, list)), "`strengths` must be a list of numbers")
        lo, hi = STRENGTH_RANGE
        strengths = tuple(real_number(v, f"`strengths[{k}]`") for k, v in enumerate(self.strengths))
        _check(all(lo <= v <= hi for v in strengths), f"every strength must be between {lo:g} and {hi:g}")
        object.__setattr__(self, "strengths", strengths)
        _check(not strengths or "" not in self.styles,
               "`strengths` vary a style's strength; remove the \"no style\" entry from `styles`")
        _check(1 <= self.seeds_per_prompt <= 100,
               f"`seeds_per_prompt` must be between 1 and 100 but is {self.seeds_per_prompt}")
        _check(1 <= self.batch_size <= 64, f"`batch_size` must be between 1 and 64 but is {self.batch_size}")
        _check(self.num_images <= MAX_BATCH_IMAGES,
               f"this batch makes {self.num_images} images; the limit is {MAX_BATCH_IMAGES}: use fewer prompts, "
               "seeds, styles or strengths")
        _check(self.seed + self.seeds_per_prompt <= 2**32, "`seed` + `seeds_per_prompt` must stay below 2**32")
        # The generation settings are checked exactly as Generate checks them.
        self.generate_request(self.lines[0], self.seed, self.styles[0], self.column_strengths[0])

    @classmethod
    def from_file(cls, path: str | Path, **kwargs) -> "BatchRequest":
        """A batch whose prompts are a text file's lines (UTF-8)."""
        text = Path(path).read_text("utf-8")
        _check(len(text) <= MAX_PROMPT_LINES * MAX_PROMPT_CHARS, f"{path} is too long for a prompt list")
        return cls(prompts=text, **kwargs)

    @property
    def lines(self) -> list[str]:
        return [ln.strip() for ln in self.prompts.splitlines() if ln.strip()]

    @property
    def column_strengths(self) -> tuple[float, ...]:
        return self.strengths or (self.style_strength,)

    @property
    def num_images(self) -> int:
        return len(self.lines) * self.seeds_per_prompt * len(self.styles) * len(self.column_strengths)

    def generate_request(self, prompt: str, seed: int, style: str, strength: float) -> GenerateRequest:
        """The GenerateRequest for one image (what its recipe refills)."""
        return GenerateRequest(prompt=prompt, negative_prompt=self.negative_prompt,
                               num_inference_steps=self.num_inference_steps, guidance_scale=self.guidance_scale,
                               guidance_rescale=self.guidance_rescale, width=self.width, height=self.height,
                               seed=seed, scheduler=self.scheduler, style=style,
                               style_strength=strength if style else 1.0, instant_style=self.instant_style,
                               instant_strength=self.instant_strength, instant_style_only=self.instant_style_only)
