"""Issue 8 point 3: values of the wrong type are refused by field name, never guessed (settings, requests, runs).

`bool("false")` is True in Python, so a quoted boolean used to switch things ON (`listen = "false"` bound the app to
0.0.0.0). Types are now checked once, from the dataclass annotations (engine.core.config._coerce), for every field of
Settings, GenerateRequest and TrainConfig; the UI converts its sliders' whole floats where it knows the component.
"""
from __future__ import annotations

import dataclasses

import gradio as gr
import pytest

import launcher
from engine.core.config import ConfigError, GenerateRequest, Settings, from_dict, load_toml
from engine.core.train_config import TrainConfig, load_train_config, presets

VALID = {
    Settings: {},
    GenerateRequest: {"prompt": "a red circle"},
    TrainConfig: {**presets("subject"), "instance_images": ("a.png",)},
}
# For each annotation: values a TOML file, a JSON recipe or a direct API call may carry that are NOT of that type.
WRONG = {
    "bool": ["false", "no", "true", 0, 1, 1.0, None],
    "int": [True, False, 2.0, 2.5, "2", None],
    "float": [True, "0.5", None],
    "str": [1, True, 1.5, None, ["a"]],
    "tuple[str, ...]": ["a, b", 1, [1, 2], None],
    "tuple[tuple[str, float], ...]": ["a:1", 1, None],
}
CASES = [(cls, f.name, f.type, bad) for cls in VALID for f in dataclasses.fields(cls) for bad in WRONG[f.type]]


@pytest.mark.parametrize("cls, name, kind, bad", CASES, ids=[f"{c.__name__}.{n}={b!r}" for c, n, _, b in CASES])
def test_p03_every_field_refuses_a_value_of_another_type_by_name(cls, name, kind, bad):
    with pytest.raises(ConfigError) as e:
        from_dict(cls, {**VALID[cls], name: bad})
    assert f"`{name}`" in str(e.value) and repr(bad) in str(e.value)


def test_p03_the_right_types_still_work_and_ints_widen_to_floats():
    r = GenerateRequest(prompt="x", guidance_scale=7, num_inference_steps=4)
    assert r.guidance_scale == 7.0 and isinstance(r.guidance_scale, float)
    cfg = from_dict(TrainConfig, {**VALID[TrainConfig], "instance_images": ["a.png"], "learning_rate": 1e-4})
    assert cfg.instance_images == ("a.png",)  # TOML lists become tuples


@pytest.fixture()
def cfg(tmp_path, monkeypatch):
    monkeypatch.setenv("STYLEBOOTH_CONFIG_DIR", str(tmp_path / "cfg"))
    (tmp_path / "cfg").mkdir()
    return tmp_path / "cfg" / "settings.toml"


@pytest.mark.parametrize("line, field", [('listen = "false"', "listen"), ('open_browser = "false"', "open_browser"),
                                          ("listen = 1", "listen"), ("port = 7860.0", "port"),
                                          ("port = true", "port"), ("model = 3", "model")])
def test_p03_settings_toml_with_a_quoted_boolean_is_reported_and_never_binds_all_interfaces(cfg, capsys, line, field):
    cfg.write_text(line + "\n")
    s = launcher.resolve_settings(launcher.parse_args([]), cfg)
    err = capsys.readouterr().err
    assert f"`{field}` must be" in err and "Fix or delete that file" in err
    assert s.listen is False  # the safe default, not bool("false")
    assert cfg.read_text() == line + "\n"  # left for the user to fix


def test_p03_real_booleans_in_settings_toml_still_work(cfg):
    cfg.write_text("listen = true\nopen_browser = false\n")
    s = launcher.resolve_settings(launcher.parse_args([]), cfg)
    assert s.listen is True and s.open_browser is False


@pytest.mark.parametrize("line, message", [
    ('center_crop = "no"', "`center_crop` must be true or false (a TOML boolean, without quotes) but is 'no'"),
    ("max_train_steps = true", "`max_train_steps` must be a whole number (e.g. 20) but is True"),
    ("max_train_steps = 400.0", "`max_train_steps` must be a whole number (e.g. 20) but is 400.0"),
    ('learning_rate = "1e-4"', "`learning_rate` must be a number (e.g. 0.5) but is '1e-4'"),
    ("instance_images = [1, 2]", "`instance_images` must be a list of texts in quotes but is [1, 2]"),
])
def test_p03_train_toml_with_wrong_types_names_the_field(tmp_path, line, message):
    path = tmp_path / "run.toml"
    path.write_text('instance_images = ["a.png"]\ninstance_prompt = "a photo of olis shape"\n'
                    'with_prior_preservation = false\n' + line + "\n")
    if line.startswith("instance_images"):
        path.write_text(line + '\ninstance_prompt = "a photo of olis shape"\nwith_prior_preservation = false\n')
    with pytest.raises(ConfigError) as e:
        load_train_config(path)
    assert message in str(e.value)


def test_p03_settings_from_toml_refuses_a_quoted_boolean(tmp_path):
    path = tmp_path / "settings.toml"
    path.write_text('listen = "false"\n')
    with pytest.raises(ConfigError, match=r"`listen` must be true or false .* but is 'false'"):
        load_toml(Settings, path)


def test_p03_forms_convert_whole_slider_floats_and_refuse_the_rest():
    """Sliders send 20.0 for 20: the UI converts it where it knows the component; the dataclass never guesses."""
    from ui.generate_tab import GenerateHandlers
    from ui.train_form import FIELD_NAMES
    from ui.train_handlers import TrainHandlers

    g = GenerateHandlers(None)
    r = g.request({"prompt": "x", "num_inference_steps": 20.0, "width": 64.0, "seed": 3.0})
    assert (r.num_inference_steps, r.width, r.seed) == (20, 64, 3)
    with pytest.raises(gr.Error, match="`num_inference_steps` must be a whole number but is 20.5"):
        g.request({"prompt": "x", "num_inference_steps": 20.5})
    with pytest.raises(gr.Error, match="`num_inference_steps` must be a whole number .* but is True"):
        g.request({"prompt": "x", "num_inference_steps": True})  # a direct API call
    with pytest.raises(gr.Error, match="`prompt_per_line` must be true or false .* but is 'false'"):
        g.request({"prompt": "x", "prompt_per_line": "false"})
    t = TrainHandlers(None)
    values = {k: v for k, v in presets("subject").items() if k in FIELD_NAMES}
    values.update(max_train_steps=12.0, lora_rank=8.0, with_prior_preservation=False)
    cfg = t.config(values, ["a.png", "b.png", "c.png"])
    assert (cfg.max_train_steps, cfg.lora_rank) == (12, 8)
    with pytest.raises(gr.Error, match="`center_crop` must be true or false .* but is 'no'"):
        t.config({**values, "center_crop": "no"}, ["a.png"])
    with pytest.raises(gr.Error, match="`max_train_steps` must be a whole number but is 1.5"):
        t.config({**values, "max_train_steps": 1.5}, ["a.png"])
