"""Per-image captions: sidecar .txt files, the {token} placeholder, messages, and their way into training."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engine.core.captions import read_captions
from engine.core.config import ConfigError
from engine.core.images import ingest_dataset
from engine.core.train_config import TrainConfig, presets


def _png(path: Path, colour) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((32, 32, 3), colour, np.uint8)).save(path)
    return path


def test_sidecars_next_to_images_and_uploaded_by_stem(tmp_path):
    a, b = _png(tmp_path / "a.png", 10), _png(tmp_path / "b.png", 20)
    (tmp_path / "a.txt").write_text("a photo of {token} shape\n in red ", "utf-8")  # placeholder, one line
    upload = tmp_path / "up" / "b.txt"
    upload.parent.mkdir()
    upload.write_text("\ufeffolis on a table", "utf-8")  # a BOM from Windows editors is dropped
    caps, notes = read_captions([a, b], "olis", "a photo of olis shape", [upload])
    assert caps == ("a photo of olis shape in red", "olis on a table") and notes == []


def test_images_without_captions_use_the_instance_prompt_with_a_notice(tmp_path):
    a, b = _png(tmp_path / "a.png", 10), _png(tmp_path / "b.png", 20)
    assert read_captions([a, b], "olis", "x olis") == ((), [])  # none at all: the config stays without captions
    (tmp_path / "a.txt").write_text("olis in blue", "utf-8")
    stray = tmp_path / "c.txt"
    stray.write_text("olis", "utf-8")
    caps, notes = read_captions([a, b], "olis", "x olis", [stray])
    assert caps == ("olis in blue", "x olis")
    assert "b.png has no caption file (b.txt)" in notes[0] and "c.txt" in notes[1]


@pytest.mark.parametrize("content, message", [
    ("a red shape".encode(), "a.txt: the caption 'a red shape' does not name the trigger token 'olis'"),
    (b"\xff\xfe olis", "a.txt: the caption is not UTF-8"),
    (("olis " * 300).encode(), "keep it under 1000"),
])
def test_bad_captions_name_the_file_and_the_fix(tmp_path, content, message):
    a = _png(tmp_path / "a.png", 10)
    (tmp_path / "a.txt").write_bytes(content)
    with pytest.raises(ConfigError, match=message):
        read_captions([a], "olis", "olis")


def test_captions_follow_their_images_through_ingest(tmp_path):
    """Duplicates and refused files drop out of the dataset; `sources` keeps each caption with its image."""
    a, dup, b = _png(tmp_path / "a.png", 10), _png(tmp_path / "dup.png", 10), _png(tmp_path / "b.png", 200)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    report = ingest_dataset([bad, a, dup, b], tmp_path / "dataset", resolution=32)
    assert report.sources == [1, 3]
    caps = ("olis bad", "olis a", "olis dup", "olis b")
    kept_caps = [caps[i] for i in report.sources]
    pixels = [np.asarray(Image.open(p))[0, 0, 0] for p in report.kept]
    assert list(zip(kept_caps, pixels)) == [("olis a", 10), ("olis b", 200)]


def test_each_training_example_gets_its_own_caption(tiny_sd, tmp_path):
    from diffusers import StableDiffusionPipeline

    from engine.generate.sampler import tokenize
    from engine.train.data import DreamBoothData

    tok = StableDiffusionPipeline.from_pretrained(tiny_sd).tokenizer
    imgs = [str(_png(tmp_path / f"{i}.png", 40 * i)) for i in range(3)]
    caps = ("olis red", "olis green", "olis blue")
    cfg = TrainConfig(**{**presets("subject"), "instance_images": tuple(imgs), "instance_captions": caps,
                         "with_prior_preservation": False})
    data = DreamBoothData(cfg, [], tok, 32)
    import torch
    batch = data.batch([2, 0], torch.Generator().manual_seed(0))
    assert [k[1] for k in batch["keys"]] == [2, 0]
    assert torch.equal(batch["ids"], torch.cat([tokenize(tok, ["olis blue"]), tokenize(tok, ["olis red"])]))


def test_caption_dropout_trains_some_steps_on_the_instance_prompt(tiny_sd, tmp_path):
    """caption_dropout p: each instance example takes the instance prompt instead of its caption with probability p
    (drawn from the training generator); at 0 nothing is drawn, so older runs keep their random stream."""
    import torch
    from diffusers import StableDiffusionPipeline

    from engine.generate.sampler import tokenize
    from engine.train.data import DreamBoothData

    tok = StableDiffusionPipeline.from_pretrained(tiny_sd).tokenizer
    imgs = [str(_png(tmp_path / f"{i}.png", 40 * i)) for i in range(3)]
    caps = ("olis red", "olis green", "olis blue")
    own, plain = [tokenize(tok, [c]) for c in caps], tokenize(tok, ["a photo of olis shape"])

    def run(p: float, seed: int = 0):
        cfg = TrainConfig(**{**presets("subject"), "instance_images": tuple(imgs), "instance_captions": caps,
                             "with_prior_preservation": False, "caption_dropout": p})
        data, gen = DreamBoothData(cfg, [], tok, 32), torch.Generator().manual_seed(seed)
        out = [data.batch([i % 3], gen)["ids"] for i in range(300)]
        return [0 if torch.equal(x, own[i % 3]) else 1 if torch.equal(x, plain) else -1 for i, x in enumerate(out)], gen

    never, gen = run(0.0)
    assert never == [0] * 300 and torch.equal(gen.get_state(), torch.Generator().manual_seed(0).get_state())
    assert run(1.0)[0] == [1] * 300
    half = run(0.5)[0]
    assert -1 not in half and 110 <= sum(half) <= 190  # binomial(300, 0.5): 150 +- 4.6 sigma
    assert half == run(0.5)[0] and half != run(0.5, seed=1)[0]  # from the run's generator: resumes exactly
    with pytest.raises(ConfigError, match="caption_dropout"):
        TrainConfig(**{**presets("subject"), "instance_images": tuple(imgs), "caption_dropout": 1.5})


def test_class_images_get_their_own_captions_and_several_prompts_need_them(tiny_sd, tmp_path):
    import torch
    from diffusers import StableDiffusionPipeline

    from engine.train import loop as T
    from engine.generate.sampler import tokenize
    from engine.train.data import DreamBoothData

    tok = StableDiffusionPipeline.from_pretrained(tiny_sd).tokenizer
    imgs = [str(_png(tmp_path / f"{i}.png", 40 * i)) for i in range(2)]
    cls = [_png(tmp_path / "c" / f"{i}.png", 90 + i) for i in range(2)]
    cfg = TrainConfig(**{**presets("subject"), "instance_images": tuple(imgs), "with_prior_preservation": True,
                         "class_prompt": "a photo of a shape\n a photo of a circle \n", "num_class_images": 2})
    assert cfg.class_prompts == ["a photo of a shape", "a photo of a circle"]
    data = DreamBoothData(cfg, cls, tok, 32, ["a photo of a shape", "a photo of a circle"])
    batch = data.batch([1], torch.Generator().manual_seed(0))
    assert torch.equal(batch["ids"][1:], tokenize(tok, ["a photo of a circle"]))  # class half: image 1's prompt

    class FakeRun:
        def __init__(self, cfg):
            self.cfg, self.emit = cfg, lambda e: None
    with pytest.raises(ConfigError, match="several class prompts need"):
        T.step3_priors(FakeRun(cfg), cls)
    one = TrainConfig(**{**presets("subject"), "instance_images": tuple(imgs), "with_prior_preservation": True,
                         "num_class_images": 2})
    assert T.step3_priors(FakeRun(one), cls) == (cls, ["a photo of shape"] * 2)
