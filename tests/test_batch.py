"""Batch generation: prompts x seeds x styles as one job, PNGs with recipes written as they are made, a labelled
X/Y grid, a zip, cancel that keeps what was made, and memory that does not grow with the batch."""
from __future__ import annotations

import gc
import threading
import weakref
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from engine.api import Engine
from engine.core.batch_config import BatchRequest
from engine.core.config import ConfigError, GenerateRequest, Settings
from engine.core.events import BatchResult, Progress
from engine.generate import batch as B
from engine.generate.recipes import read_recipe
from tests.lora_support import make_random_style


@pytest.fixture(scope="module")
def eng(tiny_sd, tmp_path_factory):
    torch.manual_seed(0)
    e = Engine(Settings(model=str(tiny_sd), data_dir=str(tmp_path_factory.mktemp("batch-data"))))
    e.style_a = make_random_style(e.model, e.data_dir, "Alpha", seed=1, scale=0.5, trigger="zwx")
    return e


def test_requests_are_validated():
    with pytest.raises(ConfigError, match="empty"):
        BatchRequest(prompts=" \n ")
    with pytest.raises(ConfigError, match="must be a list of numbers"):
        BatchRequest(prompts="a", styles=("s",), strengths=("0.5",))
    with pytest.raises(ConfigError, match="no style"):
        BatchRequest(prompts="a", styles=("", "s"), strengths=(0.5, 1.0))
    with pytest.raises(ConfigError, match="true or false"):
        BatchRequest(prompts="a", make_zip="false")
    with pytest.raises(ConfigError, match="limit is"):
        BatchRequest(prompts="\n".join(f"p{i}" for i in range(100)), seeds_per_prompt=11)
    with pytest.raises(ConfigError, match="divisible by 8"):
        BatchRequest(prompts="a", width=30)
    assert BatchRequest(prompts="a\n\nb\n", seeds_per_prompt=3, styles=("x", "y"), strengths=(0, 1)).num_images == 24


def test_prompts_from_a_text_file(tmp_path):
    f = tmp_path / "prompts.txt"
    f.write_text("a red circle\n\na blue square\n", "utf-8")
    assert BatchRequest.from_file(f, seeds_per_prompt=2).lines == ["a red circle", "a blue square"]


def test_2x2_batch_writes_pngs_with_recipes_a_labelled_grid_and_a_zip(eng):
    req = BatchRequest(prompts="a red circle\na blue square", styles=("", eng.style_a.id), num_inference_steps=3,
                       seed=4)
    seen: list[Progress] = []
    res = eng.generate_batch(req, seen.append)
    assert isinstance(res, BatchResult) and not res.cancelled and res.total == 4 and len(res.paths) == 4
    recipes = [read_recipe(p) for p in res.paths]
    assert sorted((r["prompt"].split(",")[0], bool(r["styles"])) for r in recipes) == [
        ("a blue square", False), ("a blue square", True), ("a red circle", False), ("a red circle", True)]
    styled = [r for r in recipes if r["styles"]]
    assert all(r["prompt"].endswith("zwx style") and r["styles"][0]["id"] == eng.style_a.id for r in styled)
    assert all(r["seed"] == 4 for r in recipes)
    # one progress stream over the whole batch, counted in images
    assert {p.total for p in seen} == {4} and seen[-1].done == 4
    assert [p.done for p in seen] == sorted(p.done for p in seen)
    with Image.open(res.grid_path) as g:
        assert g.size == B.grid_size(2, 2, 64) == (B.LABEL_W + 2 * 64, B.LABEL_H + 2 * 64)
        arr = np.asarray(g.convert("L"))
    assert (arr[: B.LABEL_H, B.LABEL_W:] < 128).any() and (arr[B.LABEL_H:, : B.LABEL_W] < 128).any()  # labels
    with zipfile.ZipFile(res.zip_path) as z:
        assert sorted(z.namelist()) == sorted([p.name for p in res.paths] + [res.grid_path.name])
    # an image's recipe remakes it
    r = recipes[0]
    again = eng.generate(GenerateRequest(**{k: r[k] for k in GenerateRequest.__dataclass_fields__ if k in r}))
    with Image.open(res.paths[0]) as im:
        assert np.array_equal(np.asarray(im), np.asarray(again.images[0].image))


def test_strengths_axis_labels_and_grid(eng):
    req = BatchRequest(prompts="a cat", styles=(eng.style_a.id,), strengths=(0.0, 0.5, 1.0), num_inference_steps=2)
    cells, rows, cols = B.plan(req)
    assert cols == ["strength 0", "strength 0.5", "strength 1"] and len(rows) == 1 and len(cells) == 3
    res = eng.generate_batch(req)
    assert [read_recipe(p)["styles"][0]["strength"] for p in res.paths] == [0.0, 0.5, 1.0]
    with Image.open(res.grid_path) as g:
        assert g.size == B.grid_size(1, 3, 64)


def test_cancel_mid_batch_stops_and_keeps_what_was_made(eng):
    req = BatchRequest(prompts="a\nb\nc\nd", seeds_per_prompt=3, num_inference_steps=4, batch_size=2)

    def on_progress(p: Progress):
        if p.done >= 4:
            threading.Thread(target=eng.cancel, kwargs={"kind": "batch"}).start()
    res = eng.generate_batch(req, on_progress)
    assert res.cancelled and 4 <= len(res.paths) <= 6 < res.total == 12
    assert all(p.is_file() and read_recipe(p) for p in res.paths)
    with zipfile.ZipFile(res.zip_path) as z:
        assert len(z.namelist()) == len(res.paths) + 1
    assert eng.jobs.running() == []


def test_a_batch_of_40_keeps_no_images_alive(eng, monkeypatch):
    made = []
    real = B.to_pil

    def tracking(x):
        out = real(x)
        made.extend(weakref.ref(im) for im in out)
        return out
    monkeypatch.setattr(B, "to_pil", tracking)
    res = eng.generate_batch(BatchRequest(prompts="a\nb", seeds_per_prompt=20, num_inference_steps=1, batch_size=8,
                                          guidance_scale=1.0))
    assert len(res.paths) == len(made) == 40
    gc.collect()
    assert sum(r() is not None for r in made) == 0  # every image was dropped once written
    assert all(isinstance(p, type(res.paths[0])) for p in res.paths)  # the result holds paths only
