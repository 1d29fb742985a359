"""Requests and results of the feedback loop (torch-free, so the UI can build and match them)."""
from __future__ import annotations

from dataclasses import dataclass, field

from engine.core.errors import ConfigError

# Documented defaults for a refinement round (checked on the demo model's training seeds, tests/test_feedback.py).
REFINE_STEPS = 40
REFINE_BETA = 2000.0  # β·T of Diffusion-DPO (the paper's SD1.5 runs use β = 2000-5000 with per-pixel means)
REFINE_LR = 5e-4


@dataclass(frozen=True)
class RefineRequest:
    """Make version N+1 of a style from the ratings of images made with version N.

    `style` is "id@vN" (or "id": its newest version). Ratings of that version by `raters` (all when empty) are
    used: liked images (4-5 stars, thumbs up) for rating-weighted fine-tuning, liked x disliked pairs for
    Diffusion-DPO with v(N) as the reference model."""

    style: str
    steps: int = REFINE_STEPS
    beta: float = REFINE_BETA
    learning_rate: float = REFINE_LR
    sft_weight: float = 1.0  # weight of the liked-image denoising loss
    dpo_weight: float = 1.0  # weight of the Diffusion-DPO loss
    batch_size: int = 4
    seed: int = 0
    # steps between checkpoints under runs/<id>/checkpoints/ (0: only when cancelled); an interrupted refinement
    # (power cut, kill) resumes from the newest one
    checkpoint_every: int = 10
    raters: tuple[str, ...] = ()

    def __post_init__(self):
        if not isinstance(self.style, str) or not self.style.strip():
            raise ConfigError("pick the style version to refine")
        if not isinstance(self.steps, int) or isinstance(self.steps, bool) or not 1 <= self.steps <= 2000:
            raise ConfigError(f"`steps` must be a whole number 1..2000 but is {self.steps!r}")
        if not 0 < float(self.beta) <= 1e6:
            raise ConfigError(f"`beta` must be above 0 (e.g. {REFINE_BETA:g}) but is {self.beta!r}")
        if not 0 < float(self.learning_rate) <= 1e-1:
            raise ConfigError(f"`learning_rate` must be in (0, 0.1] but is {self.learning_rate!r}")
        if min(self.sft_weight, self.dpo_weight) < 0 or self.sft_weight + self.dpo_weight <= 0:
            raise ConfigError("`sft_weight` and `dpo_weight` must be >= 0 and not both 0")
        if not isinstance(self.batch_size, int) or not 1 <= self.batch_size <= 64:
            raise ConfigError(f"`batch_size` must be 1..64 but is {self.batch_size!r}")
        if not isinstance(self.checkpoint_every, int) or self.checkpoint_every < 0:
            raise ConfigError(f"`checkpoint_every` must be a whole number >= 0 but is {self.checkpoint_every!r}")
        object.__setattr__(self, "raters", tuple(self.raters))


@dataclass(frozen=True)
class RefineResult:
    style: object | None  # the new StyleInfo (v(N+1)), None when cancelled
    parent: object  # the StyleInfo refined (v(N))
    steps: int
    losses: list[float] = field(default_factory=list)
    liked: int = 0
    disliked: int = 0
    cancelled: bool = False
    seconds: float = 0.0
