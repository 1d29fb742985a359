"""launcher.py: flags, settings persistence, port choice, and a real start in a subprocess."""
from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

import launcher
from engine.core.config import ConfigError, Settings, load_toml, save_toml
from http_support import launched_app

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def cfg(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("STYLEBOOTH_CONFIG_DIR", str(tmp_path / "cfg"))
    return tmp_path / "cfg" / "settings.toml"


def test_flags():
    a = launcher.parse_args([])
    assert (a.model, a.data_dir, a.port, a.listen, a.open_browser) == (None, None, None, None, None)
    a = launcher.parse_args(["--model", "m", "--data-dir", "d", "--port", "9000", "--listen", "--no-browser"])
    assert (a.model, a.data_dir, a.port, a.listen, a.open_browser) == ("m", "d", 9000, True, False)


def test_config_dir_env_overrides(cfg):
    assert launcher.config_dir() == cfg.parent


def test_settings_are_created_then_flags_override_and_persist(cfg, tmp_path):
    s = launcher.resolve_settings(launcher.parse_args([]), cfg)
    assert s == Settings() and load_toml(Settings, cfg) == Settings()  # first run writes the defaults
    s = launcher.resolve_settings(launcher.parse_args(["--model", "/m", "--port", "9001", "--data-dir",
                                                       str(tmp_path / "d"), "--listen", "--no-browser"]), cfg)
    assert (s.model, s.port, s.data_dir, s.listen, s.open_browser) == ("/m", 9001, str(tmp_path / "d"), True, False)
    saved = load_toml(Settings, cfg)
    assert (saved.model, saved.port, saved.data_dir) == ("", 9001, str(tmp_path / "d"))  # model: once it loaded
    assert (saved.listen, saved.open_browser) == (False, True)  # per-run flags are not saved (see launcher)
    launcher.remember_model(cfg, "/m")  # what main() does after the model loaded
    again = launcher.resolve_settings(launcher.parse_args([]), cfg)  # a later double-click
    assert (again.model, again.port, again.listen, again.open_browser) == ("/m", 9001, False, True)


def test_hand_edited_listen_is_honoured(cfg):
    cfg.parent.mkdir(parents=True)
    cfg.write_text('listen = true\nopen_browser = false\n')
    s = launcher.resolve_settings(launcher.parse_args([]), cfg)
    assert s.listen and not s.open_browser


def test_broken_settings_file_is_reported_and_kept(cfg, capsys):
    cfg.parent.mkdir(parents=True)
    cfg.write_text("prot = 1\n")
    s = launcher.resolve_settings(launcher.parse_args(["--port", "9002"]), cfg)
    assert s.port == 9002 and cfg.read_text() == "prot = 1\n"
    assert "unknown key(s) for Settings: prot" in capsys.readouterr().err


def test_bad_port_is_a_clear_error(cfg, capsys):
    with pytest.raises(ConfigError, match="`port` must be between"):
        launcher.resolve_settings(launcher.parse_args(["--port", "70000"]), cfg)
    assert launcher.main(["--port", "0"]) == 2 and "`port` must be between" in capsys.readouterr().err


def test_next_free_port():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        free = launcher.find_free_port(port)
        assert free > port
    assert launcher.find_free_port(free) == free


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as e:
        return e.code, ""


def test_launcher_serves_the_app(tiny_sd, tmp_path):
    data = tmp_path / "data"
    (data / "outputs").mkdir(parents=True)
    secret = data / "outputs" / "secret.png"
    secret.write_bytes(b"x")
    env = {**os.environ, "STYLEBOOTH_CONFIG_DIR": str(tmp_path / "cfg"), "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "launcher.py", "--no-browser", "--port", str(_free_port()), "--data-dir", str(data),
           "--model", str(tiny_sd)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
    try:
        deadline, url = time.monotonic() + 240, None
        while url is None and time.monotonic() < deadline and proc.poll() is None:
            m = re.search(r"running at (http://\S+)", "".join(lines))
            url = m and m.group(1)
            time.sleep(0.5)
        assert url, f"launcher did not start:\n{''.join(lines)[-3000:]}"
        while time.monotonic() < deadline:  # the banner is printed just before launch() binds the port
            try:
                status, body = _get(url + "/")
                break
            except OSError:
                time.sleep(0.5)
        assert status == 200 and "Stylebooth" in body
        assert "press Ctrl+C or close this window" in "".join(lines)
        # GR-10: Gradio 6.31 answers 403 "Monitoring is not enabled" (RELIABILITY expects 404); with the default
        # enable_monitoring=None, /monitoring/summary would be served.
        assert _get(url + "/monitoring")[0] in (403, 404) and _get(url + "/monitoring/summary")[0] in (403, 404)
        assert _get(f"{url}/gradio_api/file={secret}")[0] == 403  # GR-3: the data dir is never served
        # Results are served from GRADIO_TEMP_DIR inside the data dir, which blocked_paths must leave open.
        from gradio_client import Client

        client = Client(url, verbose=False, download_files=str(tmp_path / "dl"))
        status, _preview, gallery, files = client.predict(prompt="a red circle on a blue background",
                                                          num_inference_steps=2, seed=3, api_name="/generate")
        assert status.startswith("Done: 1 image(s)") and gallery[0]["caption"] == "seed 3"
        assert Path(files[0]).is_file() and Path(files[0]).read_bytes()[:4] == b"\x89PNG"
        assert (data / "gradio-tmp").is_dir()
        assert load_toml(Settings, tmp_path / "cfg" / "settings.toml").model == str(tiny_sd)
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def _broken_model(out: Path, how: str) -> Path:
    """A tiny diffusers folder whose UNet weights do not fit its config: a tensor missing, or of the wrong shape."""
    from safetensors.torch import load_file, save_file

    from conftest import build_tiny_sd

    build_tiny_sd(out)
    f = out / "unet" / "diffusion_pytorch_model.safetensors"
    sd = load_file(f)
    if how == "missing":
        del sd["conv_in.weight"]  # diffusers leaves it on the meta device: NotImplementedError on .to()
    else:
        sd["conv_in.weight"] = sd["conv_in.weight"][..., :1, :1].contiguous()  # ValueError: shape mismatch
    save_file(sd, f)
    return out


@pytest.mark.parametrize("how", ["missing", "shape"])
def test_p06_a_model_that_does_not_fit_is_a_plain_model_load_error(tmp_path, how):
    from engine.models.loading import ModelLoadError, load_base_model

    bad = _broken_model(tmp_path / "bad", how)
    with pytest.raises(ModelLoadError) as e:
        load_base_model(bad)
    msg = str(e.value)
    assert f"could not load the model {str(bad)!r}" in msg and "Pick a complete Stable Diffusion" in msg
    assert "Traceback" not in msg and "\n" not in msg


def test_p06_a_bad_model_at_start_falls_back_to_the_demo_model_and_is_not_saved(tmp_path):
    bad = _broken_model(tmp_path / "bad", "missing")
    (tmp_path / "cfg").mkdir()
    save_toml(Settings(model=""), tmp_path / "cfg" / "settings.toml")
    with launched_app(tmp_path, "--model", str(bad)) as app:
        header = next(c for c in app.config()["components"] if c.get("props", {}).get("elem_id") == "header")
        text = header["props"]["value"]
        assert "**Model:** demo-model" in text  # the app runs, on the bundled model
        assert f"could not load the model {str(bad)!r}" in text and "demo model was loaded instead" in text
        assert "Traceback" not in text
        assert "Warning: could not load the model" in app.output  # the terminal says so too
    assert load_toml(Settings, tmp_path / "cfg" / "settings.toml").model == ""  # the next plain start is fine


def test_p14_expected_library_warnings_are_silenced_and_real_ones_still_show(tmp_path):
    with launched_app(tmp_path) as app:
        out = app.output
    assert "is running at" in out
    assert "requires torchvision" not in out and "should be kept in float32" not in out, out
    # The same filters in the start-up path, then real warnings from the same two loggers: those must show.
    script = (
        "import logging, launcher\n"
        "launcher.quiet_expected_warnings()\n"
        "from engine.api import Engine\n"
        "from engine.core.config import Settings\n"
        "import transformers, diffusers\n"
        "logging.getLogger('transformers.utils.import_utils').warning('REAL transformers warning')\n"
        "logging.getLogger('diffusers.models.modeling_utils').warning('There are modules in UNet2DConditionModel "
        "that should be kept in float32: [\\'conv_in\\']. REAL')\n"
        f"Engine(Settings(data_dir={str(tmp_path / 'd')!r})).model\n"
        "print('loaded')\n")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
    res = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
    both = res.stdout + res.stderr
    assert res.returncode == 0 and "loaded" in both, both
    assert "REAL transformers warning" in both and "should be kept in float32: ['conv_in']. REAL" in both
    assert "requires torchvision" not in both and "should be kept in float32: []" not in both, both
