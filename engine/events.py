"""Typed events and results of long jobs. Plain dataclasses with no torch import, so ui/ can match on them."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class TrainProgress:
    step: int
    total: int
    loss: float
    lr: float
    eta_s: float


@dataclass(frozen=True)
class TrainPreview:
    step: int
    images: list  # PIL images, one per validation prompt


@dataclass(frozen=True)
class TrainCheckpoint:
    step: int
    path: Path


@dataclass(frozen=True)
class TrainLog:
    message: str
    level: str = "info"  # "info" | "warning" | "error"


TrainEvent = TrainProgress | TrainPreview | TrainCheckpoint | TrainLog


@dataclass(frozen=True)
class TrainResult:
    lora_path: Path | None  # None when cancelled
    style_json_path: Path | None
    steps: int
    losses: list[float]
    cancelled: bool
    resumed_from: int | None
    skipped_steps: int = 0  # updates skipped for NaN/Inf
    micro_batch_size: int = 0  # after any out-of-memory back-off
    gradient_accumulation: int = 0


@dataclass(frozen=True)
class TrainJobResult:
    run_dir: Path
    result: TrainResult
    style: object | None  # engine.styles.StyleInfo; None when cancelled
    rejected: list[tuple[str, str]]
    notices: list[str]


class TrainingError(RuntimeError):
    """Training stopped; the message says why and what to do. The last valid checkpoint is kept."""


class TrainingDiverged(TrainingError):
    pass


class TrainingOOM(TrainingError):
    pass
