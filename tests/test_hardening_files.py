"""Issue 8, files an attacker or an unlucky user can hand the app: each test is named after the issue's point and
failed on the code before its fix (points 2, 4, 7, 8, 9, 10, 11, 12)."""
from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing
import os
import pickle
import shutil
import struct
import threading
import time
import zlib
from pathlib import Path

import gradio as gr
import pytest
import torch
from PIL import Image, PngImagePlugin

from engine.models.loading import DEMO_MODEL


def test_p12_demo_model_runs_in_plain_diffusers_without_dtype():
    """The first thing a diffusers user types: no dtype argument, and it must generate (was: Half and Float)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(DEMO_MODEL)
    pipe.set_progress_bar_config(disable=True)
    out = pipe("a red circle on a blue background", num_inference_steps=2,
               generator=torch.Generator().manual_seed(0))
    assert out.images[0].size == (32, 32)


def _engine(tmp_path):
    """An Engine that has loaded no model (reading a recipe needs none)."""
    from engine.api import Engine
    from engine.core.config import Settings

    return Engine(Settings(data_dir=str(tmp_path / "engine-data")))


# ---- 7: one malformed style.json must not empty the style picker -----------------------------------------------
@pytest.mark.parametrize("bad", [
    "[]", '{"id": "x", "trigger_token": "olis", "version": null}',
    '{"id": "x", "trigger_token": "olis", "created": 20260101}', '{"trigger_token": "olis"}', "{not json",
    '{"id": "x", "trigger_token": "olis", "training_config": []}',
    '{"id": "x", "trigger_token": "olis", "version": true}',
    "[" * 100_000, '{"id": "x", "trigger_token": "olis", "version": ' + "[" * 900 + "]" * 900 + "}",
], ids=["list", "version-null", "created-int", "no-id", "invalid-json", "config-list", "version-bool", "deep",
        "deep-value"])
def test_p07_malformed_style_json_is_skipped_with_a_warning(tmp_path, caplog, bad):
    from engine.styles.library import Library
    from engine.styles.store import publish

    lora, meta = tmp_path / "l.safetensors", tmp_path / "style.json"
    lora.write_bytes(b"x")
    meta.write_text(json.dumps({"trigger_token": "olis", "preset": "subject", "created": "2026-01-01"}))
    good = publish(tmp_path / "data", "Good", lora, meta)
    broken = tmp_path / "data" / "styles" / "broken-1" / "v1"
    broken.mkdir(parents=True)
    (broken / "style.json").write_text(bad)
    with caplog.at_level(logging.WARNING, logger="engine.styles.library"):
        styles = Library(tmp_path / "data").list()  # opening the library adopts the folders it does not know
    assert [s.id for s in styles] == [good.id]
    assert any("broken-1" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)


# ---- 9: a FIFO (or any non-regular file) named .png must not hang image intake ---------------------------------
def _call_with_deadline(fn, fifo: Path, seconds: float = 20.0):
    """Run fn in a thread; if it blocks (the old code: open() on a FIFO waits for a writer), unblock it by opening
    the FIFO for writing, then fail. Returns fn's result or raises its exception."""
    box: dict = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the test thread
            box["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    if t.is_alive():
        with contextlib.suppress(OSError):
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))  # gives the blocked reader EOF
        t.join(5)
        pytest.fail(f"image intake blocked for {seconds} s on a FIFO")
    if "error" in box:
        raise box["error"]
    return box["value"]


@pytest.mark.timeout(60)
def test_p09_fifo_and_other_non_regular_files_are_refused(tmp_path):
    from engine.core.images import ImageRejected, ingest_dataset, load_image

    fifo = tmp_path / "evil.png"
    os.mkfifo(fifo)
    folder = tmp_path / "folder.png"
    folder.mkdir()
    link = tmp_path / "link.png"
    link.symlink_to(fifo)
    good = tmp_path / "good.png"
    Image.new("RGB", (16, 16), "red").save(good)
    for bad, kind in ((fifo, "pipe"), (link, "pipe"), (folder, "folder")):
        with pytest.raises(ImageRejected, match=f"{kind}.*Pick a regular PNG"):
            _call_with_deadline(lambda b=bad: load_image(b), fifo)
    report = _call_with_deadline(lambda: ingest_dataset([fifo, good, folder], tmp_path / "out", resolution=16), fifo)
    assert len(report.kept) == 1 and [n for n, _ in report.rejected] == ["evil.png", "folder.png"]


# ---- 2: a crafted PNG must not freeze the server ----------------------------------------------------------------
def _png_with_text(path: Path, key: str, text: str, size=(8, 8)) -> Path:
    info = PngImagePlugin.PngInfo()
    info.add_text(key, text)
    Image.new("RGB", size).save(path, pnginfo=info)
    return path


def _png_header_only(path: Path, width: int, height: int, key: str, text: str) -> Path:
    """A PNG that declares width x height but carries almost no pixel data (a few hundred bytes on disk)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    body = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"tEXt", key.encode() + b"\0" + text.encode())
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))
    path.write_bytes(body)
    return path


# The old regex needed minutes to hours for these; a linear parser needs milliseconds. CPU time (not wall time)
# keeps the bound meaningful on a busy machine.
_BOUND_S = 2.0


def _parse_cpu_seconds(text: str, deadline_s: float = 60.0) -> float:
    """CPU seconds parse_a1111(text) takes, measured in a forked child: a backtracking regex holds the GIL, so
    neither a signal nor a watchdog thread could stop it here, but the child can be killed."""
    from engine.generate.recipes import parse_a1111

    def child(conn):
        t0 = time.process_time()
        out = parse_a1111(text)
        conn.send((time.process_time() - t0, out.get("num_inference_steps")))

    ctx = multiprocessing.get_context("fork")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=child, args=(send,), daemon=True)
    proc.start()
    if not recv.poll(deadline_s):
        proc.kill()
        proc.join()
        pytest.fail(f"parsing a {len(text) // 1000} KB parameters text took over {deadline_s} s")
    seconds, steps = recv.recv()
    proc.join()
    assert steps in (1, 20)
    return seconds


def test_p02_megabyte_parameters_text_is_handled_quickly(tmp_path):
    evil = "a photo\nSteps: 20, " + "a" * 1_000_000  # no ": " after the run of word characters: worst case
    # The parser itself is linear (the old regex: 3.8 s CPU for 28 KB, quadratic, so hours for these).
    for text in (evil, "p\nSteps: 1, " + "a," * 500_000 + ": x", 'p\nSteps: 1, K: "' + "\\x" * 500_000):
        assert _parse_cpu_seconds(text) < _BOUND_S
    # And a PNG carrying it is refused by length, as a second line of defence.
    from engine.generate.recipes import RecipeError, read_recipe

    png = _png_with_text(tmp_path / "evil.png", "parameters", evil)
    t0 = time.process_time()
    with pytest.raises(RecipeError, match="over the 64 KB limit"):
        read_recipe(png)
    assert time.process_time() - t0 < _BOUND_S


def test_p02_a1111_quoted_values_and_long_real_recipe(tmp_path):
    from engine.generate.recipes import parse_a1111, read_recipe

    out = parse_a1111('a cat\nNegative prompt: ugly\nSteps: 12, Sampler: Euler a, Lora hashes: "a: 1, b: 2", '
                      'CFG scale: 6.5, Seed: 42, Size: 64x48')
    assert out == {"prompt": "a cat", "negative_prompt": "ugly", "num_inference_steps": 12, "guidance_scale": 6.5,
                   "seed": 42, "width": 64, "height": 48, "scheduler": "euler_a"}
    long_prompt = ", ".join(["a very detailed painting"] * 1500)  # ~38 KB: under the cap, parsed
    png = _png_with_text(tmp_path / "long.png", "parameters", f"{long_prompt}\nSteps: 5, Seed: 1")
    assert read_recipe(png)["prompt"] == long_prompt


@pytest.mark.timeout(60)
def test_p02_image_size_is_capped_before_decoding(tmp_path):
    from engine.generate.recipes import RecipeError, read_recipe

    png = _png_header_only(tmp_path / "big.png", 9000, 9000, "parameters", "a cat\nSteps: 5, Seed: 1")
    t0 = time.process_time()
    with pytest.raises(RecipeError, match="9000x9000 pixels, too large"):
        read_recipe(png)
    assert time.process_time() - t0 < _BOUND_S


# ---- 10: recipe drop with hostile values: a clear message, never a traceback ----------------------------------
@pytest.mark.parametrize("recipe, message", [
    ('{"prompt": "a cat", "width": 1000000000}', "`width` must be divisible by 8"),
    ('{"prompt": "a cat", "guidance_scale": 1e400}', "`guidance_scale` must be between 0 and 30 but is inf"),
    ('{"prompt": "a cat", "seed": 1e400}', "`seed` must be a whole number (e.g. 20) but is inf"),
    ('{"prompt": "a cat", "num_inference_steps": 7.5}', "`num_inference_steps` must be a whole number"),
    ('{"prompt": "a cat", "guidance_scale": NaN}', "`guidance_scale` must be between 0 and 30 but is nan"),
    ('{"prompt": "a cat", "seed": -1}', "`seed` must be between 0"),
    ('{"prompt": "' + "x" * 3000 + '"}', "prompts are limited to 2000 characters"),
    ('{"prompt": ' + "[" * 20_000 + "]" * 20_000 + "}", "nested too deeply"),
    ('{"prompt": "' + "x" * 70_000 + '"}', "over the 64 KB limit"),
], ids=["huge-width", "inf-float", "inf-int", "fraction-int", "nan", "negative-seed", "long-prompt", "deep",
        "long-text"])
def test_p10_recipe_drop_refuses_bad_values_with_a_message(tmp_path, recipe, message):
    from ui.generate_tab import GenerateHandlers

    png = _png_with_text(tmp_path / "r.png", "stylebooth", recipe)
    with pytest.raises(gr.Error) as e:
        GenerateHandlers(_engine(tmp_path)).load_recipe(str(png))
    assert message in str(e.value)


def test_p10_recipe_drop_a1111_huge_size_and_wrong_types(tmp_path):
    from ui.generate_tab import GenerateHandlers

    h = GenerateHandlers(_engine(tmp_path))
    png = _png_with_text(tmp_path / "a.png", "parameters", "a cat\nSteps: 5, Size: 1000000000x8, Seed: 1")
    with pytest.raises(gr.Error, match="`width` must be divisible by 8"):
        h.load_recipe(str(png))
    wrong = json.dumps({"prompt": "a cat", "width": "wide", "num_inference_steps": {"a": 1}, "negative_prompt": [1],
                        "prompt_per_line": "yes", "guidance_scale": True, "seed": "12", "steps": 4})
    out = h.load_recipe(str(_png_with_text(tmp_path / "w.png", "stylebooth", wrong)))
    assert out["prompt"] == "a cat" and out["seed"] == 12
    assert {"width", "num_inference_steps", "negative_prompt", "prompt_per_line", "guidance_scale"}.isdisjoint(out)
    assert "Ignored setting(s) of the wrong type: guidance_scale, negative_prompt, num_inference_steps, " \
           "prompt_per_line, width" in out["status"]


@pytest.mark.timeout(60)
def test_p10_read_recipe_refuses_fifo_and_crafted_json(tmp_path):
    from engine.generate.recipes import RecipeError, read_recipe
    from ui.generate_tab import GenerateHandlers

    fifo = tmp_path / "fifo.png"
    os.mkfifo(fifo)
    with pytest.raises(RecipeError, match="not a regular file"):
        _call_with_deadline(lambda: read_recipe(fifo), fifo)
    with pytest.raises(gr.Error, match="not a regular file"):
        _call_with_deadline(lambda: GenerateHandlers(_engine(tmp_path)).load_recipe(str(fifo)), fifo)
    deep = _png_with_text(tmp_path / "d.png", "stylebooth", "[" * 30_000)
    with pytest.raises(RecipeError, match="nested too deeply"):
        read_recipe(deep)


# ---- 4: shard index files are checked like the files they list ------------------------------------------------
class _Canary:
    """Unpickling this would create the canary file (the technique of tests/test_models.py)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _sharded_unet(tiny_sd: Path, dest: Path, shard_names: list[str], *, decoy: bool = True) -> tuple[Path, dict]:
    """A copy of tiny_sd whose UNet is loaded through diffusion_pytorch_model.safetensors.index.json."""
    from safetensors.torch import load_file

    shutil.copytree(tiny_sd, dest)
    unet = dest / "unet"
    single = unet / "diffusion_pytorch_model.safetensors"
    sd = load_file(single)
    if decoy:  # check_folder wants a *.safetensors; the index decides what is really loaded
        single.rename(unet / "decoy.safetensors")
    else:
        single.unlink()
    keys = sorted(sd)
    weight_map = {k: shard_names[i * len(shard_names) // len(keys)] for i, k in enumerate(keys)}
    (unet / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    return unet, {name: {k: sd[k] for k in keys if weight_map[k] == name} for name in shard_names}


def _no_torch_load(monkeypatch) -> list:
    calls: list = []

    def spy(*a, **k):
        calls.append(a[:1])
        raise AssertionError("torch.load was called")

    monkeypatch.setattr(torch, "load", spy)
    return calls


def test_p04_index_naming_pickle_shards_is_refused_and_nothing_is_unpickled(tiny_sd, tmp_path, monkeypatch):
    from engine.models.loading import ModelLoadError, load_base_model

    calls = _no_torch_load(monkeypatch)
    unet, parts = _sharded_unet(tiny_sd, tmp_path / "m", ["diffusion_pytorch_model-00001-of-00002.bin",
                                                          "diffusion_pytorch_model-00002-of-00002.bin"])
    canary = tmp_path / "canary"
    for name in parts:
        (unet / name).write_bytes(pickle.dumps(_Canary(canary), protocol=4))
    with pytest.raises(ModelLoadError, match=r"index\.json names the shard .*\.bin', which is not a \.safetensors"):
        load_base_model(tmp_path / "m")
    assert calls == [] and not canary.exists()


@pytest.mark.parametrize("variant", ["traversal", "absolute", "symlink-out", "pickle-renamed", "missing"])
def test_p04_index_shards_must_be_checked_safetensors_inside_the_folder(tiny_sd, tmp_path, monkeypatch, variant):
    from safetensors.torch import save_file

    from engine.models.loading import load_base_model
    from engine.models.safety import UnsafeModelFile

    calls = _no_torch_load(monkeypatch)
    outside = tmp_path / "outside"
    outside.mkdir()
    names = {"traversal": "../../outside/s.safetensors", "absolute": str(outside / "s.safetensors")}
    name = names.get(variant, "s.safetensors")
    unet, parts = _sharded_unet(tiny_sd, tmp_path / "m", [name])
    save_file(parts[name], outside / "s.safetensors")
    if variant == "symlink-out":
        (unet / name).symlink_to(outside / "s.safetensors")
    elif variant == "pickle-renamed":
        (unet / name).write_bytes(pickle.dumps(_Canary(tmp_path / "canary"), protocol=4))
    expected = {"traversal": "outside its folder", "absolute": "outside its folder", "missing": "which is missing",
                "symlink-out": "a link to a file outside the model folder", "pickle-renamed": "pickle"}[variant]
    with pytest.raises((ValueError, UnsafeModelFile), match=expected):
        load_base_model(tmp_path / "m")
    assert calls == [] and not (tmp_path / "canary").exists()


def test_p04_fingerprint_covers_every_shard_the_index_loads(tiny_sd, tmp_path):
    from safetensors.torch import save_file

    from engine.models.loading import load_base_model, weight_files

    names = ["diffusion_pytorch_model-00001-of-00002.safetensors", "diffusion_pytorch_model-00002-of-00002.safetensors"]
    unet, parts = _sharded_unet(tiny_sd, tmp_path / "m", names, decoy=False)
    for name, sd in parts.items():
        save_file(sd, unet / name)
    assert {unet / n for n in names} <= set(weight_files(tmp_path / "m"))
    a = load_base_model(tmp_path / "m")  # a real sharded model loads
    assert a.components.unet is not None
    sd = dict(parts[names[1]])
    k = next(iter(sd))
    sd[k] = sd[k] + 1
    save_file(sd, unet / names[1])
    assert load_base_model(tmp_path / "m").fingerprint != a.fingerprint


# ---- 8: a base model with NaN/Inf weights is refused at load ------------------------------------------------
@pytest.mark.parametrize("part, bad", [("unet", float("nan")), ("text_encoder", float("inf"))])
def test_p08_model_with_nan_or_inf_weights_is_refused(tiny_sd, tmp_path, part, bad):
    from safetensors.torch import load_file, save_file

    from engine.core.config import Settings
    from engine.api import Engine
    from engine.models.loading import ModelLoadError, load_base_model

    broken = tmp_path / "broken"
    shutil.copytree(tiny_sd, broken)
    f = next((broken / part).glob("*.safetensors"))
    sd = load_file(f)
    key = sorted(k for k, v in sd.items() if v.is_floating_point() and v.numel() > 1)[0]
    sd[key] = sd[key].clone()
    sd[key].view(-1)[1] = bad
    save_file(sd, f)
    with pytest.raises(ModelLoadError, match=rf"{part} weights contain 1 NaN or Inf value.*black images"):
        load_base_model(broken)
    eng = Engine(Settings(model=str(tiny_sd), data_dir=str(tmp_path / "data")))
    before = eng.model.fingerprint
    with pytest.raises(ModelLoadError):
        eng.load_model(str(broken))
    assert eng.model.fingerprint == before  # the working model stays loaded


# ---- 11: a trigger that is a common word is refused, with a rare suggestion ---------------------------------
def _train_config(token: str):
    from engine.core.train_config import TrainConfig, presets

    return TrainConfig(instance_images=("a.png",), **presets("subject", token=token))


@pytest.fixture(scope="module")
def demo_tokenizer():
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(DEMO_MODEL / "tokenizer")


@pytest.mark.parametrize("word", ["car", "girl", "anime", "red", "dog", "Dog"])
def test_p11_common_word_trigger_is_refused_with_a_suggestion(word, demo_tokenizer):
    from engine.core.config import ConfigError
    from engine.core.train_config import check_trigger_token

    with pytest.raises(ConfigError, match=rf"{word!r} is a common word.*such as 'olis'"):
        _train_config(word)  # TrainConfig alone: the embedded word list
    with pytest.raises(ConfigError, match=r"is a common word.*such as 'olis'"):
        check_trigger_token(word, demo_tokenizer)


@pytest.mark.parametrize("word", ["olis", "ohwx", "phol", "zyk"])
def test_p11_rare_triggers_are_accepted(word, demo_tokenizer):
    from engine.core.train_config import check_trigger_token

    assert _train_config(word).trigger_token == word
    check_trigger_token(word, demo_tokenizer)


def test_p11_the_tokenizer_knows_more_common_words_than_the_list(demo_tokenizer, tiny_sd):
    """Words missing from the embedded list but among CLIP's first merges are refused once the model is known."""
    from transformers import CLIPTokenizer

    from engine.core.train_config import is_common_word

    for word in ("pokemon", "nike", "bmw", "guitar", "castle"):
        assert not is_common_word(word) and is_common_word(word, demo_tokenizer), word
    for word in ("olis", "ohwx", "photorealisticx", "zwx"):  # rare, or several tokens
        assert not is_common_word(word, demo_tokenizer), word
    tiny = CLIPTokenizer.from_pretrained(tiny_sd / "tokenizer")  # no merges: only the list counts
    assert is_common_word("car", tiny) and not is_common_word("guitar", tiny)


def test_p11_training_start_checks_the_trigger_with_the_models_tokenizer(demo_tokenizer, tmp_path):
    from types import SimpleNamespace

    from engine.core.config import ConfigError
    from engine.train.job import run_training

    model = SimpleNamespace(components=SimpleNamespace(tokenizer=demo_tokenizer), source="demo")
    cfg = _train_config("guitar")  # not in the embedded list: TrainConfig accepts it
    with pytest.raises(ConfigError, match=r"'guitar' is a common word.*such as 'olis'"):
        run_training(model, tmp_path / "data", cfg, "my style")
    assert not (tmp_path / "data").exists()  # refused before any file was written
