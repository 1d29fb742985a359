"""Issue 8 points 1 and 5 over HTTP, against a really launched app (`launcher.py --listen`, reached at 127.0.0.1).

What each event that takes a path or a string from the client accepts, and why that is safe
(`api_visibility="private"` only hides an event from the API docs: every event here can be called directly):

- **Train tab, Load config** (`TrainHandlers.load_config`, UploadButton, file_count="multiple"): only files of
  this upload. Gradio refuses a FileData path outside its upload folder before the handler runs, and the handler
  checks again (regular file, not a symlink, inside the upload folder). The TOML's `instance_images` are *names*:
  each is matched by its last path component against the files uploaded with it; absolute paths, `~`, `..` and
  symlinks on the server are never opened, so no file content can come back. Captions from the TOML are written as
  new sidecar files in a fresh upload folder.
- **Model box, Load model** (`AppHandlers.switch_model`, Textbox): on 127.0.0.1 without --share, any model source
  (the user sits at the machine). Open to the network (--listen or --share): only the demo model (""), the model
  the app started with and `allowed_models` from settings.toml, compared as exact strings before anything touches
  the disk; every other string gets the same refusal, so the box is no file oracle (no "not found" versus "not a
  model folder" difference) and cannot make the server open a file.
- **Generate tab, recipe drop** (`GenerateHandlers.load_recipe`, Image upload): a file of this upload only (Gradio
  checks the path); the handler reads its PNG text chunks and returns form values of the fields' types, never
  file content; an unreadable file is a fixed message.
- **Train tab, Resume** (`TrainHandlers.resume`, Dropdown): a run *id* is accepted only if it is one of the runs
  the server itself lists (`Engine.resumable_runs()`: interrupted and cancelled runs under the data dir), compared
  as exact strings; the engine builds the run folder from its own list, never from the client's string.
- **Generate tab, Style** (GenerateRequest.style): an id looked up in the library (engine.styles.store.find_style), never
  turned into a path.
"""
from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import pytest

from http_support import launched_app

import launcher

SECRET = "SECRET-" + uuid.uuid4().hex  # in every planted file: it must never come back or be copied


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> dict:
    """Files an attacker would like to read: outside the data dir, in a fake $HOME, and behind a symlink."""
    root = tmp_path_factory.mktemp("http")
    home = root / "home"
    (root / "secrets").mkdir()
    home.mkdir()
    for p in (root / "secrets" / "passwd", root / "secrets" / "dotdot.png", home / "id_rsa.png"):
        p.write_text(SECRET)
    (root / "links").mkdir()
    (root / "links" / "cat.png").symlink_to(root / "secrets" / "passwd")
    return {"root": root, "home": home}


@pytest.fixture(scope="module")
def app(planted):
    with launched_app(planted["root"], "--listen", env={"HOME": str(planted["home"])}) as a:
        a.client = a.login("admin", a.one_time_password())  # studio mode: every route needs a session
        yield a


def _no_secret_anywhere(app, msg: dict) -> None:
    """Not in the answer, not in any file the answer points to, not in any file Gradio holds."""
    text = json.dumps(msg)
    assert SECRET not in text
    for url in _urls(msg):
        assert SECRET not in app.http.get(url).text
    for f in (app.data_dir / "gradio-tmp").rglob("*"):
        if f.is_file() and not f.is_symlink():
            assert SECRET not in f.read_bytes().decode("utf-8", "replace"), f"copied to {f}"


def _urls(obj) -> list[str]:
    if isinstance(obj, dict):
        return ([obj["url"]] if isinstance(obj.get("url"), str) else []) + [u for v in obj.values() for u in _urls(v)]
    if isinstance(obj, list):
        return [u for v in obj for u in _urls(v)]
    return []


def _load_config(app, *uploads) -> dict:
    """Call the Train tab's Load config event as the page would, in whatever shape the button takes."""
    paths = app.upload(*uploads)
    files = [app.file_data(p) for p in paths]
    multiple = app.component("load-config")["props"].get("file_count") == "multiple"
    return app.call(app.fn_index("load-config", "upload"), [files if multiple else files[0]])


def test_p01_a_toml_naming_server_paths_gets_no_file_back(app, planted):
    root, home = planted["root"], planted["home"]
    names = [str(root / "secrets" / "passwd"),  # absolute
             "~/id_rsa.png",  # the server user's home
             "../../../secrets/dotdot.png",  # relative to the uploaded TOML: <data>/gradio-tmp/<hash>/run.toml
             str(root / "links" / "cat.png")]  # a symlink to a secret
    toml = ("instance_images = [" + ", ".join(json.dumps(n) for n in names) + "]\n"
            'instance_prompt = "a photo of olis shape"\nwith_prior_preservation = false\n')
    msg = _load_config(app, ("run.toml", toml.encode()))
    _no_secret_anywhere(app, msg)
    assert msg["success"], msg
    status = [v for v in msg["output"]["data"] if isinstance(v, str) and v.startswith("Config loaded")]
    assert status and "4 image(s) named in it were not uploaded with it" in status[0]


def test_p01_a_toml_with_its_images_loads_them_and_only_them(app, planted):
    from PIL import Image
    import io

    buf = io.BytesIO()
    Image.new("RGB", (64, 64), "red").save(buf, format="PNG")
    toml = (f'instance_images = ["{planted["root"]}/secrets/passwd", "C:\\\\art\\\\heart.png"]\n'
            'instance_prompt = "a photo of olis shape"\nwith_prior_preservation = false\n'
            'instance_captions = ["a photo of olis shape, leaked?", "a photo of olis shape in red"]\n')
    msg = _load_config(app, ("run.toml", toml.encode()), ("heart.png", buf.getvalue()))
    _no_secret_anywhere(app, msg)
    files = [f for v in msg["output"]["data"] if isinstance(v, list) for f in v if isinstance(f, dict)]
    names = sorted(f["orig_name"] if f.get("orig_name") else Path(f["path"]).name for f in files)
    assert names == ["heart.png", "heart.txt"], msg  # the uploaded image and its caption from the TOML
    assert "1 image(s) named in it were not uploaded with it (passwd)" in json.dumps(msg)


def test_p01_a_client_path_outside_the_upload_folder_is_refused(app, planted):
    """Handing a server path straight to the event (no upload): Gradio refuses it before the handler runs."""
    secret = str(planted["root"] / "secrets" / "passwd")
    multiple = app.component("load-config")["props"].get("file_count") == "multiple"
    data = [app.file_data(secret)]
    msg = app.call(app.fn_index("load-config", "upload"), [data if multiple else data[0]])
    assert not msg["success"]
    _no_secret_anywhere(app, msg)
    drop = app.call(app.fn_index("recipe-drop", "upload"), [app.file_data(secret, "x.png")])
    assert not drop["success"]
    _no_secret_anywhere(app, drop)


def test_p01_model_box_is_no_file_oracle_when_open_to_the_network(app, planted, tiny_sd):
    """--listen: a server path is refused with one message whatever is there, and nothing is loaded."""
    fn = app.fn_index("Load model", "click")
    answers = {}
    for source in ("/etc/passwd", str(planted["root"] / "secrets" / "passwd"), "/no/such/file.safetensors",
                   "~/id_rsa.png", "../../..", str(planted["root"] / "links" / "cat.png"), str(tiny_sd)):
        msg = app.call(fn, [source])
        assert not msg["success"], (source, msg)
        _no_secret_anywhere(app, msg)
        answers[source] = msg["output"].get("error")
    assert len(set(answers.values())) == 1, answers  # the same words for every path: existence is not revealed
    assert "allowed_models" in next(iter(answers.values()))
    ok = app.call(fn, [""])  # the bundled demo model is always allowed
    assert ok["success"] and "demo-model" in json.dumps(ok["output"])


def test_p01_resume_takes_only_runs_the_server_lists(app, planted):
    fn = app.fn_index("resume", "click")
    for run_dir in (str(planted["root"] / "secrets"), "../../..", str(app.data_dir / "runs" / "x"), "/"):
        msg = app.call(fn, [run_dir])
        assert not msg["success"], (run_dir, msg)
        _no_secret_anywhere(app, msg)


