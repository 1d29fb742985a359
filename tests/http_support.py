"""A really launched app over HTTP: `python launcher.py ...` in a subprocess, reached at 127.0.0.1 only.

`launched_app(tmp_path, *flags)` starts the launcher with its own config dir, data dir and free port, waits (up to
`start_s`, generous for a busy 2-core machine) until the port answers, and yields a `LaunchedApp` with helpers to
upload files and call any event, including `api_visibility="private"` ones: those are hidden from the API docs,
not from a client that reads /config and posts to /gradio_api/queue/join. Only 127.0.0.1 is ever contacted, also
when the app was started with --listen (it then binds 0.0.0.0).
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import httpx

ROOT = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


@dataclass
class LaunchedApp:
    url: str
    proc: subprocess.Popen
    data_dir: Path
    config_dir: Path
    lines: list[str] = field(default_factory=list)
    client: httpx.Client | None = None
    _clients: list = field(default_factory=list)

    @property
    def output(self) -> str:
        """Everything the launcher printed so far (stdout and stderr)."""
        return "".join(self.lines)

    @property
    def http(self) -> httpx.Client:
        if self.client is None:
            self.client = httpx.Client(base_url=self.url, timeout=60, follow_redirects=False)
        return self.client

    def one_time_password(self) -> str:
        """The admin password that studio mode printed when it created the first admin."""
        m = re.search(r"One-time password: (\S+)", self.output)
        if not m:
            raise AssertionError(f"no one-time password in the launcher's output:\n{self.output[-3000:]}")
        return m.group(1)

    def login(self, username: str, password: str, *, check: bool = True) -> httpx.Client:
        """A new client with its own session cookie, logged in through Gradio's /login form."""
        c = httpx.Client(base_url=self.url, timeout=60, follow_redirects=False)
        r = c.post("/login", data={"username": username, "password": password})
        if check and r.status_code != 200:
            c.close()
            raise AssertionError(f"login as {username!r} failed: {r.status_code} {r.text[:200]}")
        self._clients.append(c)
        return c

    def config(self) -> dict:
        r = self.http.get("/config")
        r.raise_for_status()
        return r.json()

    def component(self, key: str) -> dict:
        """The component whose elem_id is `key`, else the button whose text is `key`."""
        comps = self.config()["components"]
        for c in comps:
            if c.get("props", {}).get("elem_id") == key:
                return c
        for c in comps:
            if c.get("type") in ("button", "uploadbutton") and c.get("props", {}).get("value") == key:
                return c
        raise KeyError(f"no component with elem_id or text {key!r}")

    def fn_index(self, key: str, trigger: str) -> int:
        """The event that `trigger` ("click", "upload") of the component `key` (see component) runs."""
        cid = self.component(key)["id"]
        for dep in self.config()["dependencies"]:
            if [cid, trigger] in [list(t) for t in dep["targets"]]:
                return dep["id"]
        raise KeyError(f"no {trigger} event on {key!r}")

    def upload(self, *paths: Path | tuple[str, bytes]) -> list[str]:
        """POST files to /gradio_api/upload; returns the server-side paths Gradio gives them."""
        files = [("files", (p[0], p[1]) if isinstance(p, tuple) else (Path(p).name, Path(p).read_bytes()))
                 for p in paths]
        r = self.http.post("/gradio_api/upload", files=files)
        r.raise_for_status()
        return r.json()

    @staticmethod
    def file_data(server_path: str, name: str | None = None) -> dict:
        return {"path": server_path, "orig_name": name or Path(server_path).name, "meta": {"_type": "gradio.FileData"}}

    def call(self, fn_index: int, data: list[Any], timeout_s: float = 180, *, http: httpx.Client | None = None) -> dict:
        """Run one event through the queue (as `http`'s session, default `self.http`); the final message
        ({"success": ..., "output": ...}) as a dict."""
        http = http or self.http
        session = uuid.uuid4().hex
        r = http.post("/gradio_api/queue/join", json={"data": data, "fn_index": fn_index,
                                                           "session_hash": session, "event_data": None,
                                                           "trigger_id": None})
        r.raise_for_status()
        deadline = time.monotonic() + timeout_s
        with http.stream("GET", f"/gradio_api/queue/data?session_hash={session}",
                              timeout=httpx.Timeout(timeout_s, connect=30)) as stream:
            for line in stream.iter_lines():
                if time.monotonic() > deadline:
                    break
                if not line.startswith("data:"):
                    continue
                msg = json.loads(line[5:])
                if msg.get("msg") == "process_completed":
                    return msg
        raise TimeoutError(f"event {fn_index} did not complete in {timeout_s} s")


@contextlib.contextmanager
def launched_app(tmp_path: Path, *flags: str, env: dict[str, str] | None = None, start_s: float = 240,
                 expect_exit: bool = False) -> Iterator[LaunchedApp]:
    """Start launcher.py with `flags` (plus --no-browser, a free --port and a --data-dir unless given)."""
    data = tmp_path / "data"
    cfg = tmp_path / "cfg"
    flags = list(flags)
    if "--data-dir" not in flags:
        flags += ["--data-dir", str(data)]
    else:
        data = Path(flags[flags.index("--data-dir") + 1])
    port = free_port()
    cmd = [sys.executable, "launcher.py", "--no-browser", "--port", str(port), *flags]
    full_env = {**os.environ, "STYLEBOOTH_CONFIG_DIR": str(cfg), "PYTHONUNBUFFERED": "1",
                "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1", **(env or {})}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    app = LaunchedApp(f"http://{HOST}:{port}", proc, data, cfg)
    reader = threading.Thread(target=lambda: app.lines.extend(proc.stdout), daemon=True)
    reader.start()
    try:
        if not expect_exit:
            _wait_until_up(app, start_s)
        yield app
    finally:
        for c in [app.client, *app._clients]:
            if c is not None:
                c.close()
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(30)
        reader.join(10)


def _wait_until_up(app: LaunchedApp, start_s: float) -> None:
    """Poll the port (the launcher may pick the next one if it is taken: read its banner) until HTTP answers."""
    deadline = time.monotonic() + start_s
    while time.monotonic() < deadline:
        if app.proc.poll() is not None:
            raise RuntimeError(f"the launcher exited with {app.proc.returncode}:\n{app.output[-4000:]}")
        for line in app.output.splitlines():
            if "is running at http://127.0.0.1:" in line:
                app.url = line.split("running at ", 1)[1].strip()
        try:
            if httpx.get(app.url + "/", timeout=10).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"the app did not answer within {start_s} s:\n{app.output[-4000:]}")


def owned_style(data: Path, tmp: Path, name: str, owner: str, shared: bool = False, weights: bytes = b"w") -> str:
    """Publish a minimal style into the data dir's library, owned by `owner` (and shared with the studio if asked)."""
    from engine.styles.library import Library
    from engine.styles.store import publish

    lora, meta = tmp / f"{name}.safetensors", tmp / f"{name}.json"
    lora.write_bytes(weights)
    meta.write_text(json.dumps({"schema_version": 1, "trigger_token": "olis", "preset": "style",
                                "base_model": "demo", "base_model_fingerprint": "fp"}))
    sid = publish(data, name, lora, meta).id
    lib = Library(data, adopt=False)
    lib.set_owner(sid, owner)
    lib.set_shared(sid, shared)
    lib.close()
    return sid


def page_values(app, fn: int, overrides: dict) -> list:
    """The inputs of event `fn` as the page sends them: each component's value, or overrides[elem_id]."""
    cfg = app.config()
    comps = {c["id"]: c for c in cfg["components"]}
    dep = next(d for d in cfg["dependencies"] if d["id"] == fn)
    return [overrides.get(comps[cid].get("props", {}).get("elem_id"), comps[cid].get("props", {}).get("value"))
            for cid in dep["inputs"]]
