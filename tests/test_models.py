"""Base-model loading: folders, wrong folders, hub ids offline, fingerprints, and pickle refusal everywhere."""
from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from engine.core.config import Settings
from engine.api import Engine
from engine.models.loading import ModelLoadError, load_base_model
from engine.models.safety import ModelFileError, UnsafeModelFile


class _Canary:
    """Unpickling this would create the canary file: the test proves that nothing ever unpickles it."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _payload(tmp_path: Path, name: str) -> tuple[Path, Path]:
    canary = tmp_path / f"canary-{name}"
    f = tmp_path / name
    f.write_bytes(pickle.dumps(_Canary(canary), protocol=4))
    return f, canary


def test_folder_loads_and_fingerprint_is_stable(tiny_sd, tmp_path):
    a = load_base_model(tiny_sd, cache_dir=tmp_path)
    b = load_base_model(tiny_sd, cache_dir=tmp_path)
    assert a.kind == "folder" and a.fingerprint == b.fingerprint and len(a.fingerprint) == 64
    assert a.components.default_size == 64 and not a.components.unet.training


def test_fingerprint_changes_with_weights(tiny_sd, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(tiny_sd, other)
    from safetensors.torch import load_file, save_file
    f = other / "unet" / "diffusion_pytorch_model.safetensors"
    sd = load_file(f)
    k = next(iter(sd))
    sd[k] = sd[k] + 1
    save_file(sd, f)
    assert load_base_model(other).fingerprint != load_base_model(tiny_sd).fingerprint


def test_incomplete_folder_names_what_is_missing(tiny_sd, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_sd, broken)
    shutil.rmtree(broken / "vae")
    (broken / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(ModelLoadError) as e:
        load_base_model(broken)
    assert "vae/config.json" in str(e.value) and "unet/diffusion_pytorch_model.safetensors" in str(e.value)
    with pytest.raises(ModelLoadError, match="model_index.json is missing"):
        load_base_model(tmp_path)


def test_unknown_hub_id_offline_gives_a_clear_message():
    with pytest.raises(ModelLoadError, match="offline"):
        load_base_model("nobody/no-such-model")


def test_missing_path_gives_a_clear_message(tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        load_base_model(str(tmp_path / "nope.safetensors"))


@pytest.mark.parametrize("name", ["model.ckpt", "model.bin", "model.pt", "model.safetensors"])
def test_pickle_payload_refused_as_base_model_file(tmp_path, name):
    f, canary = _payload(tmp_path, name)
    with pytest.raises((UnsafeModelFile, ModelFileError), match="pickle"):
        load_base_model(f)
    assert not canary.exists()


def test_torch_save_zip_refused_even_when_renamed(tmp_path):
    f = tmp_path / "weights.safetensors"
    torch.save({"w": torch.zeros(2)}, f)
    with pytest.raises(UnsafeModelFile):
        load_base_model(f)


def test_pickle_weights_inside_a_folder_are_refused(tiny_sd, tmp_path):
    """A folder whose UNet weights are a pickle (.bin, or a pickle renamed .safetensors) never loads it."""
    for variant in ("bin", "renamed"):
        d = tmp_path / variant
        shutil.copytree(tiny_sd, d)
        (d / "unet" / "diffusion_pytorch_model.safetensors").unlink()
        target = "diffusion_pytorch_model.bin" if variant == "bin" else "diffusion_pytorch_model.safetensors"
        _, canary = _payload(d / "unet", target)
        os.replace(d / "unet" / target, d / "unet" / target)
        with pytest.raises((ModelLoadError, UnsafeModelFile), match="pickle"):
            load_base_model(d)
        assert not canary.exists()


def test_engine_entry_point_refuses_pickle_and_keeps_previous_model(tiny_sd, tmp_path):
    eng = Engine(Settings(model=str(tiny_sd), data_dir=str(tmp_path / "data")))
    before = eng.model.fingerprint
    f, canary = _payload(tmp_path, "evil.ckpt")
    with pytest.raises(UnsafeModelFile):
        eng.load_model(str(f))
    assert eng.model.fingerprint == before and not canary.exists()


def test_torch_load_is_never_called(tiny_sd, tmp_path, monkeypatch):
    """MF-6: loading (and refusing) never falls back to torch.load."""
    calls = []
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(a))
    load_base_model(tiny_sd)
    f, _ = _payload(tmp_path, "x.bin")
    with pytest.raises(UnsafeModelFile):
        load_base_model(f)
    assert calls == []
