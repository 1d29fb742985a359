"""Session fixtures shared by several test files: the demo base model, the checker and the LoRAs trained on the
demo examples (a pytest plugin, registered in conftest.py).

They live here, not in tests/test_learning.py, because a fixture imported into another test file is a second
fixture to pytest, with its own cache: each LoRA was trained once per importing file. Registered once, each is
trained once per session (per pytest-xdist worker; conftest.py keeps the files that use `TRAINED` on one worker).
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.core.train_config import TrainConfig, presets
from engine.demo.checker import DemoChecker
from engine.models.loading import load_base_model
from engine.train.loop import train
from scripts.learning_table import EXAMPLES, TOKEN, Probe, train_concept

# The expensive ones (minutes each); quick_subject (20 steps) is cheap enough to train once per worker.
TRAINED = ("subject_no_prior", "style_lora", "feedback_subject")  # subject_prior: one file, see conftest


@pytest.fixture(scope="session")
def base():
    torch.set_num_threads(max(1, torch.get_num_threads()))
    return load_base_model(None)


@pytest.fixture(scope="session")
def checker():
    return DemoChecker.load()


def _train(tmp_path_factory, base, kind: str, prior: bool) -> Path:
    """The preset with the demo model's settings (what the Train tab's example button fills in); with prior
    preservation, the class prompts derived from the captions (scripts/learning_table.config_for)."""
    concept = "heart" if kind == "subject" else "checkered"
    return train_concept(base, concept, tmp_path_factory.mktemp(f"{kind}-{prior}"), prior=prior)


@pytest.fixture(scope="session")
def subject_prior(tmp_path_factory, base):
    return _train(tmp_path_factory, base, "subject", prior=True)


@pytest.fixture(scope="session")
def subject_no_prior(tmp_path_factory, base):
    return _train(tmp_path_factory, base, "subject", prior=False)


@pytest.fixture(scope="session")
def feedback_subject(tmp_path_factory, base):
    """The heart subject with the demo subject settings the simulated rater of tests/test_feedback.py was built on
    (text encoder trained, every timestep): its "a photo of olis shape" hearts come in black, orange and red, which
    the rater needs to like some and dislike others. Pinned here, so a preset change (issue 14 froze the text encoder,
    skips t < 300: 23 of 24 hearts black; then 500 steps at rank 16) does not silently take the feedback tests'
    premise away."""
    return train_concept(base, "heart", tmp_path_factory.mktemp("feedback-subject"),
                         overrides={"train_text_encoder": True, "min_timestep": 0, "max_train_steps": 300,
                                    "lora_rank": 8, "lora_alpha": 8})


@pytest.fixture(scope="session")
def style_lora(tmp_path_factory, base):
    return _train(tmp_path_factory, base, "style", prior=False)


@pytest.fixture(scope="session")
def probe(base, checker):
    return Probe(base, checker)


@pytest.fixture(scope="session")
def quick_subject(tmp_path_factory):
    """A 20-step subject LoRA on the demo model: enough to change images, quick enough for every run."""
    p = presets("subject", token=TOKEN, class_noun="shape")
    p.update(with_prior_preservation=False, max_train_steps=20, learning_rate=1e-3, validation_steps=0,
             report_to="none", checkpointing_steps=10_000, cache_latents=True)
    cfg = TrainConfig(instance_images=tuple(str(f) for f in sorted((EXAMPLES / "heart").glob("*.png"))), **p)
    return train(cfg, tmp_path_factory.mktemp("quick") / "run", resume=False).lora_path
