"""Styles on disk: atomic publish into the library, newest first, trigger insertion, lookup by id only."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine.core.config import ConfigError
from engine.styles.library import Library
from engine.styles.store import StyleInfo, apply_trigger, publish


def _style(preset, noun="shape"):
    return StyleInfo("s-1", "S", 1, "olis", preset, noun, "", "", Path("."))


@pytest.mark.parametrize("preset, prompt, expected", [
    ("subject", "a red shape on a blue background", "a red olis shape on a blue background"),
    ("subject", "a olis shape in red", "a olis shape in red"),
    ("subject", "a red thing", "olis a red thing"),
    ("style", "a red circle on a blue background", "a red circle on a blue background, olis style"),
])
def test_apply_trigger(preset, prompt, expected):
    assert apply_trigger(prompt, _style(preset)) == expected


def test_publish_list_and_find(tmp_path):
    lora = tmp_path / "l.safetensors"
    lora.write_bytes(b"x")
    meta = tmp_path / "style.json"
    for i, name in enumerate(["First", "Second"]):
        meta.write_text(json.dumps({"trigger_token": "olis", "preset": "subject", "created": f"2026-01-0{i + 1}",
                                    "training_config": {"class_prompt": "a shape"}}))
        publish(tmp_path / "data", name, lora, meta)
    lib = Library(tmp_path / "data")
    styles = [s.latest for s in lib.list()]
    assert [s.name for s in styles] == ["Second", "First"] and styles[0].class_noun == "shape"
    assert lib.find_version(styles[1].id).name == "First"
    assert not list((tmp_path / "data" / "styles").glob("*/.tmp-*"))
    with pytest.raises(ConfigError):
        lib.find_version("../../etc/passwd")
