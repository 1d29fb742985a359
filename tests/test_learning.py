"""Learning is shown, not assumed: DreamBooth on the bundled demo model, judged by the demo checker.

Each trained LoRA is a session fixture shared by the tests that need it. The base model has never seen hearts or
checkered fills (tests/test_demo_model.py shows it), so what they learn here comes from four example images.
"""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.demo import world as W
from engine.core.captions import read_captions
from engine.demo.checker import DemoChecker
from engine.models.loading import DEMO_MODEL, load_base_model
from engine.train.priors import PriorSpec, ensure_prior_set
from engine.generate.sampler import sample, to_pil
from engine.styles.adapters import AdapterCache
from engine.styles.store import publish
from engine.core.train_config import TrainConfig, demo_settings, presets
from engine.train.loop import train

pytestmark = pytest.mark.skipif(not (DEMO_MODEL / "model_index.json").exists(), reason="demo model not built")
# The threshold tests carry the `learning` marker: `python -m pytest -m learning` runs just them (~6 min on 2 cores).
learning = pytest.mark.learning
EXAMPLES = Path(__file__).resolve().parents[1] / "assets" / "examples"
TOKEN = "olis"
CLASS_PROMPT = "a photo of a shape"
# Class prompts that mirror the instance captions with the trigger replaced by real members of the class, so the
# priors cover the contexts the captions train ("a photo of a circle in red on a ..."). Measured (non-token shape
# accuracy with the LoRA on; base model 0.92, needed 0.83): "a photo of a shape" alone 0.38; plus "a photo of a
# <shape>" for each shape 0.46; 24 prompts like these and 200 images 0.67; the world's own phrasing ("a red circle
# on a blue background") 0.54; these 13 prompts with prior_loss_weight 2: 0.79; as below: 0.83 (20 of 24, a
# one-image margin).
_rng = random.Random(1234)
CLASS_PROMPTS = [CLASS_PROMPT] + [f"a photo of a {s.shape} in {s.fg} on a {s.bg} background"
                                  for s in (W.random_scene(_rng, W.TRAIN_SHAPES, ("solid",)) for _ in range(12))]


@pytest.fixture(scope="session")
def base():
    torch.set_num_threads(max(1, torch.get_num_threads()))
    return load_base_model(None)


@pytest.fixture(scope="session")
def checker():
    return DemoChecker.load()


def _train(tmp_path_factory, base, kind: str, prior: bool) -> Path:
    """The preset with the demo model's settings (what the Train tab's example button fills in)."""
    p = {**presets(kind, token=TOKEN, class_noun="shape"), **demo_settings(kind)}
    folder = "heart" if kind == "subject" else "checkered"
    p.update(with_prior_preservation=prior, validation_steps=0, report_to="none", checkpointing_steps=10_000,
             seed=0)
    if kind == "subject":
        p.update(class_prompt="\n".join(CLASS_PROMPTS), num_class_images=8 * len(CLASS_PROMPTS))
    images = sorted((EXAMPLES / folder).glob("*.png"))
    captions, _ = read_captions(images, TOKEN, p["instance_prompt"])  # the examples' .txt sidecars
    cfg = TrainConfig(instance_images=tuple(str(f) for f in images), instance_captions=captions, **p)
    classes = []
    root = tmp_path_factory.mktemp(f"{kind}-{prior}")
    captions = []
    if prior:
        spec = PriorSpec(base.fingerprint, CLASS_PROMPT, resolution=base.components.default_size)
        classes, captions, _ = ensure_prior_set(base.components, spec, cfg.class_prompts, root / "priors",
                                                cfg.num_class_images)
    result = train(cfg, root / "run", class_images=classes, class_captions=captions, resume=False)
    assert result.lora_path and result.lora_path.is_file()
    return result.lora_path


@pytest.fixture(scope="session")
def subject_prior(tmp_path_factory, base):
    return _train(tmp_path_factory, base, "subject", prior=True)


@pytest.fixture(scope="session")
def subject_no_prior(tmp_path_factory, base):
    return _train(tmp_path_factory, base, "subject", prior=False)


@pytest.fixture(scope="session")
def style_lora(tmp_path_factory, base):
    return _train(tmp_path_factory, base, "style", prior=False)


class Probe:
    """Generate with the base model or with one LoRA, and ask the checker."""

    def __init__(self, base, checker):
        self.base, self.checker = base, checker
        self.cache = AdapterCache(base.components)
        self.names = {}

    def use(self, lora: Path | None):
        if lora is None:
            self.cache.pipe.disable_lora() if self.names else None
            return
        if lora not in self.names:
            self.names[lora] = f"a{len(self.names)}"
            self.cache.pipe.load_lora_weights(str(lora), adapter_name=self.names[lora], use_safetensors=True)
        self.cache.pipe.enable_lora()
        self.cache.pipe.set_adapters([self.names[lora]], adapter_weights=[1.0])

    def predict(self, prompts, seed0=0):
        imgs = sample(self.base.components, prompts, [""] * len(prompts), [seed0 + i for i in range(len(prompts))],
                      num_inference_steps=20, guidance_scale=5.0, scheduler="dpmpp_2m")
        return self.checker.predict([np.asarray(im) for im in to_pil(imgs)])


@pytest.fixture(scope="session")
def probe(base, checker):
    return Probe(base, checker)


def _colour_prompts(template: str, n: int = 16, seed: int = 5):
    rng = random.Random(seed)
    pairs = [tuple(rng.sample(sorted(W.COLORS), 2)) for _ in range(n)]
    return [template.format(fg=fg, bg=bg) for fg, bg in pairs], pairs


def _shape_accuracy(probe) -> float:
    rng = random.Random(6)
    scenes = [W.random_scene(rng, W.TRAIN_SHAPES, ("solid",)) for _ in range(24)]
    preds = probe.predict([W.prompt_for(s.shape, s.fg, s.bg) for s in scenes], seed0=100)
    return float(np.mean([p["shape"] == s.shape for p, s in zip(preds, scenes)]))


@learning
def test_learns_a_subject(probe, subject_no_prior):
    """The subject preset (prior preservation off by default, see engine.core.train_config.presets)."""
    prompts, pairs = _colour_prompts(f"a photo of {TOKEN} shape in {{fg}} on a {{bg}} background")
    probe.use(None)
    before = probe.predict(prompts)
    probe.use(subject_no_prior)
    after = probe.predict(prompts)
    rate = lambda preds: float(np.mean([p["shape"] == "heart" for p in preds]))  # noqa: E731
    colours = float(np.mean([p["fg"] == fg and p["bg"] == bg for p, (fg, bg) in zip(after, pairs)]))
    print(f"subject: heart before {rate(before):.2f}, after {rate(after):.2f}; colours obeyed {colours:.2f}")
    assert rate(before) <= 0.10
    assert rate(after) >= 0.80
    assert colours >= 0.80


@learning
def test_prior_preservation_protects_the_class(probe, subject_prior, subject_no_prior):
    """Same data and seeds with and without class priors: the class prompt itself turns into the subject far less
    often with them, and other prompts keep their shapes. (Class prompts that also name colours drift either way,
    printed for the record: the priors show the class prompt alone.)"""
    coloured, _ = _colour_prompts("a photo of a shape in {fg} on a {bg} background", seed=9)
    probe.use(None)
    base_acc = _shape_accuracy(probe)
    drift, drift_coloured, acc = {}, {}, {}
    heart = lambda preds: float(np.mean([p["shape"] == "heart" for p in preds]))  # noqa: E731
    for name, lora in (("prior", subject_prior), ("no prior", subject_no_prior)):
        probe.use(lora)
        drift[name] = heart(probe.predict([CLASS_PROMPT] * 32, seed0=200))
        drift_coloured[name] = heart(probe.predict(coloured))
        acc[name] = _shape_accuracy(probe)
    print(f"'{CLASS_PROMPT}' -> heart: {drift}; with colours: {drift_coloured}; shape accuracy on non-token "
          f"prompts: base {base_acc:.2f}, {acc}")
    assert drift["prior"] <= drift["no prior"] - 0.25
    assert acc["prior"] >= 0.9 * base_acc


@learning
def test_learns_a_style(probe, style_lora):
    rng = random.Random(11)
    scenes = [W.random_scene(rng, W.TRAIN_SHAPES, ("solid",)) for _ in range(16)]
    # The demo world names a texture as a word before the shape ("a striped circle in red ..."), so the examples'
    # captions put the trigger there ("a olis circle in blue ...") and so do these prompts.
    prompts = [f"a {TOKEN} {s.shape} in {s.fg} on a {s.bg} background" for s in scenes]
    probe.use(None)
    before = float(np.mean([p["texture"] == "checkered" for p in probe.predict(prompts, seed0=50)]))
    probe.use(style_lora)
    preds = probe.predict(prompts, seed0=50)
    after = float(np.mean([p["texture"] == "checkered" for p in preds]))
    print(f"style: checkered before {before:.2f}, after {after:.2f}")
    assert before <= 0.10 and after >= 0.70


@pytest.fixture(scope="session")
def quick_subject(tmp_path_factory):
    """A 20-step subject LoRA on the demo model: enough to change images, quick enough for every run."""
    p = presets("subject", token=TOKEN, class_noun="shape")
    p.update(with_prior_preservation=False, max_train_steps=20, learning_rate=1e-3, validation_steps=0,
             report_to="none", checkpointing_steps=10_000, cache_latents=True)
    cfg = TrainConfig(instance_images=tuple(str(f) for f in sorted((EXAMPLES / "heart").glob("*.png"))), **p)
    return train(cfg, tmp_path_factory.mktemp("quick") / "run", resume=False).lora_path


def test_trained_style_is_used_by_the_engine(tmp_path, quick_subject):
    """The published style drives the Generate path: trigger inserted, LoRA applied, recipe records it."""
    from engine.core.config import GenerateRequest, Settings
    from engine.api import Engine

    eng = Engine(Settings(data_dir=str(tmp_path)))
    style_json = quick_subject.parent / "style.json"
    style = publish(eng.data_dir, "heart", quick_subject, style_json, quick_subject.parent / "preview.png")
    res = eng.generate(GenerateRequest(prompt="a red shape on a blue background", style=style.id, seed=3))
    assert res.images[0].recipe["prompt"] == f"a red {TOKEN} shape on a blue background"
    assert res.images[0].recipe["styles"][0]["id"] == style.id
    plain = eng.generate(GenerateRequest(prompt="a red shape on a blue background", seed=3))
    assert np.abs(np.asarray(plain.images[0].image, np.int16) - np.asarray(res.images[0].image, np.int16)).max() > 10
