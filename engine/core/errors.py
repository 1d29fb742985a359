"""Every error the engine raises on purpose. Torch-free, so ui/ can match them by type (`except ConfigError`).

Each message says what is wrong and what to do; the UI shows it as it is, once.
"""
from __future__ import annotations


class ConfigError(ValueError):
    """A request or config file that cannot be used as it is; the message says how to fix it."""


class Cancelled(Exception):
    """Raised inside the loop when the step callback asks to stop."""


class ModelLoadError(ValueError):
    """The base model cannot be loaded; the message says what is wrong and what to do."""


class ModelFileError(ValueError):
    """The file is not a usable model file: empty, truncated, corrupt, unknown, or named as something else."""


class UnsafeModelFile(ValueError):
    """The file contains pickle data (raw pickle or a torch.save archive) and could run code if loaded."""


class SingleFileError(ValueError):
    """A single-file checkpoint cannot be loaded; the message says why and what to do."""


class NotACheckpointError(SingleFileError):
    """The file is something other than a full checkpoint (a LoRA, a VAE, an embedding, random tensors...)."""


class UnsupportedCheckpointError(SingleFileError):
    """A real checkpoint, but of a kind Stylebooth does not load (SDXL, inpainting, ControlNet...)."""


class ImageRejected(ValueError):
    """An image cannot be used. The message names the file, the problem and what to do about it."""

    def __init__(self, filename: str, problem: str, advice: str):
        self.filename, self.problem, self.advice = filename, problem, advice
        super().__init__(f"{filename}: {problem}. {advice}")

    @property
    def reason(self) -> str:
        """The message without the file name (for tables that show the name in their own column)."""
        return f"{self.problem}. {self.advice}"


class TrainingError(RuntimeError):
    """Training stopped; the message says why and what to do. The last valid checkpoint is kept."""


class TrainingDiverged(TrainingError):
    pass


class TrainingOOM(TrainingError):
    pass


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written, verified or restored exactly; the message says what to do."""


class DiskFullError(RuntimeError):
    """Not enough free disk space; the last valid checkpoint is kept."""


class LibraryError(ConfigError):
    """A style-library request that cannot be done (unknown id, database from a newer version, refused import)."""


class AccessDenied(ConfigError):
    """The caller may not do this (not logged in, not an admin, not the owner); the message says what to do."""
