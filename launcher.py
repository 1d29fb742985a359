"""Start Stylebooth: `python launcher.py` (or double-click) opens the app in the default browser.

Thin on purpose: parse flags, load settings, build the Engine, build the app, launch. Settings live in
`<config dir>/settings.toml` (platformdirs, or $STYLEBOOTH_CONFIG_DIR); --model, --data-dir and --port are
saved there when given, so the next double-click uses them.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import socket
import sys
from pathlib import Path

from engine.core.config import ConfigError, Settings, load_toml, save_toml

APP_NAME = "Stylebooth"
# Saved when given. --listen and --no-browser are deliberately per run: a one-off --listen must not make every
# later double-click expose the app to the network, and a scripted --no-browser must not stop the browser from
# opening next time. Set `listen`/`open_browser` in settings.toml to make them stick.
SAVED_FLAGS = ("model", "data_dir", "port")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="launcher.py", description="Start the Stylebooth app in your browser.")
    p.add_argument("--model", help="base model: a diffusers folder, a hub id or a .safetensors file "
                                   "(empty string: the bundled demo model)")
    p.add_argument("--data-dir", help="where styles, outputs and the database live")
    p.add_argument("--port", type=int, help="first port to try (the next free one is used if it is taken)")
    p.add_argument("--listen", action="store_true", default=None,
                   help="serve on all network interfaces (0.0.0.0) instead of this computer only")
    p.add_argument("--no-browser", dest="open_browser", action="store_false", default=None,
                   help="do not open a browser window")
    return p.parse_args(argv)


def config_dir() -> Path:
    env = os.environ.get("STYLEBOOTH_CONFIG_DIR")
    if env:
        return Path(env).expanduser()
    from platformdirs import user_config_dir

    return Path(user_config_dir(APP_NAME, appauthor=False))


def default_data_dir() -> Path:
    from platformdirs import user_data_dir  # the same place engine.api.default_data_dir() picks

    return Path(user_data_dir(APP_NAME, appauthor=False))


def resolve_settings(args: argparse.Namespace, path: Path) -> Settings:
    """Settings from the TOML file (if any) with the given flags on top; saves them when flags changed them.

    A broken settings file is reported and left alone (not overwritten) so the user can fix it.
    """
    saved, broken = Settings(), False
    if path.is_file():
        try:
            saved = load_toml(Settings, path)
        except ConfigError as e:
            print(f"Warning: ignoring {path}: {e}. Fix or delete that file.", file=sys.stderr)
            broken = True
    given = {k: v for k, v in vars(args).items() if v is not None}
    if "data_dir" in given:
        given["data_dir"] = str(Path(given["data_dir"]).expanduser().resolve())
    settings = dataclasses.replace(saved, **given)  # ConfigError for e.g. a bad port
    to_save = dataclasses.replace(saved, **{k: v for k, v in given.items() if k in SAVED_FLAGS})
    if not broken and (to_save != saved or not path.exists()):
        path.parent.mkdir(parents=True, exist_ok=True)
        save_toml(to_save, path)
    return settings


def find_free_port(start: int, host: str = "127.0.0.1", tries: int = 100) -> int:
    """The first port from `start` on that nothing listens on (start itself if free)."""
    for port in range(start, min(start + tries, 65536)):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))  # no SO_REUSEADDR: a port some server holds must count as taken
            except OSError:
                continue
            return port
    raise OSError(f"no free port in {start}..{start + tries - 1}; pass another one with --port")


def prepare_environment(data_dir: Path) -> Path:
    """Gradio reads these when imported or launched: no analytics, and temp files on the data volume."""
    temp = data_dir / "gradio-tmp"
    temp.mkdir(parents=True, exist_ok=True)
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    os.environ["GRADIO_TEMP_DIR"] = str(temp)
    return temp


def check_torch() -> None:
    """Refuse torch < 2.10 (RELIABILITY MF-5) when engine.models.safety provides the check."""
    from engine.models import safety

    check = getattr(safety, "check_torch_version", None)
    if check is not None:
        check()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg_path = config_dir() / "settings.toml"
    try:
        settings = resolve_settings(args, cfg_path)
    except ConfigError as e:
        print(f"Error: {e}", file=sys.stderr)
        return 2
    data_dir = Path(settings.data_dir).expanduser() if settings.data_dir else default_data_dir()
    settings = dataclasses.replace(settings, data_dir=str(data_dir))
    data_dir.mkdir(parents=True, exist_ok=True)
    prepare_environment(data_dir)  # before gradio is imported below
    try:
        check_torch()
    except RuntimeError as e:
        print(f"Error: {e}", file=sys.stderr)
        return 1

    host = "0.0.0.0" if settings.listen else "127.0.0.1"
    print(f"Starting {APP_NAME}: loading the model…", flush=True)
    from engine.api import Engine  # imports torch: slow, so only after the cheap checks
    from ui.app import build_app, launch_options

    demo = build_app(Engine(settings))
    port = find_free_port(settings.port, host)
    url = f"http://127.0.0.1:{port}"
    print(f"\n{APP_NAME} is running at {url}", flush=True)
    if settings.listen:
        print(f"It is also reachable from other computers on port {port} (--listen).")
    print(f"Data: {data_dir}\nSettings: {cfg_path}")
    print("To stop it, press Ctrl+C or close this window.\n", flush=True)
    demo.launch(server_name=host, server_port=port, inbrowser=settings.open_browser, quiet=True,
                **launch_options(data_dir, extra_blocked=[cfg_path.parent]))
    return 0


if __name__ == "__main__":
    code = main()
    if code and len(sys.argv) == 1 and sys.stdin and sys.stdin.isatty() and os.name == "nt":
        input("Press Enter to close this window.")  # a double-clicked console would vanish before it can be read
    sys.exit(code)
