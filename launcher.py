"""Start Stylebooth: `python launcher.py` (or double-click) opens the app in the default browser.

Thin on purpose: parse flags, load settings, build the Engine, build the app, launch. Settings live in
`<config dir>/settings.toml` (platformdirs, or $STYLEBOOTH_CONFIG_DIR); --data-dir and --port are saved there
when given, and --model once it has loaded, so the next double-click uses them.

--listen and --share open the app to other people while it has no user accounts: --listen prints what that
exposes, and --share is refused without --auth USER:PASSWORD (or --auth-file PATH).
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import re
import socket
import sys
from pathlib import Path

from engine.core.config import ConfigError, Settings, load_toml, save_toml

APP_NAME = "Stylebooth"
# Saved when given. --listen and --no-browser are deliberately per run: a one-off --listen must not make every
# later double-click expose the app to the network, and a scripted --no-browser must not stop the browser from
# opening next time. Set `listen`/`open_browser` in settings.toml to make them stick.
SAVED_FLAGS = ("data_dir", "port")
# --model is saved too, but only once that model has loaded (remember_model): a model that cannot load must not
# become the setting every later double-click starts with.
RUN_ONLY = ("share", "auth", "auth_file")  # flags that are not Settings fields

# Warnings that every start printed and a new user read as errors. Each is matched exactly, so the same logger's
# other messages still show:
# - transformers: torchvision is not installed (not needed: images are processed with PIL) and CLIP's image processor
#   falls back to its PIL version; the safety checker, its only user, is off.
# - diffusers: `.to(dtype)` warns that some modules "should be kept in float32" even when that list is empty.
EXPECTED_WARNINGS = {
    "transformers.utils.import_utils": re.compile(r"`\w+ImageProcessor` requires torchvision \(not installed\); "
                                                  r"falling back to `\w+ImageProcessorPil`"),
    "diffusers.models.modeling_utils": re.compile(r"There are modules in \w+ that should be kept in float32: \[\]\."),
}


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
    p.add_argument("--share", action="store_true", default=None,
                   help="also make a public gradio.live link (needs --auth or --auth-file)")
    p.add_argument("--auth", metavar="USER:PASSWORD",
                   help="require this login (for --listen and --share); --auth-file keeps it out of the process list")
    p.add_argument("--auth-file", metavar="PATH", help="a file of USER:PASSWORD lines, one login per line")
    return p.parse_args(argv)


def read_auth(args: argparse.Namespace) -> list[tuple[str, str]]:
    """The logins from --auth and --auth-file ([] when neither is given); ConfigError for a malformed one."""
    lines: list[tuple[str, str]] = []
    if args.auth:
        lines.append(("--auth", args.auth))
    if args.auth_file:
        path = Path(args.auth_file).expanduser()
        try:
            text = path.read_text("utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"cannot read the --auth-file {path} ({type(e).__name__}); give a text file of "
                              "USER:PASSWORD lines") from None
        lines += [(f"{path.name} line {i}", ln.strip()) for i, ln in enumerate(text.splitlines(), 1)
                  if ln.strip() and not ln.strip().startswith("#")]
    out = []
    for where, entry in lines:
        user, sep, password = entry.partition(":")
        if not sep or not user.strip() or not password:
            # The entry itself is not echoed: it may be a password with a typo.
            raise ConfigError(f"{where}: a login must be USER:PASSWORD (both parts non-empty)")
        out.append((user.strip(), password))
    if args.auth_file and not out:
        raise ConfigError(f"the --auth-file {args.auth_file} holds no USER:PASSWORD line")
    return out


def network_warning(port: int, listen: bool, share: bool, auth: list) -> str:
    """What --listen/--share expose, printed at every such start (there are no user accounts yet)."""
    where = " and ".join([f"on every network interface (0.0.0.0, port {port})"] * listen +
                         ["through a public gradio.live link"] * share)
    who = (f"only after a login ({len(auth)} user(s) from --auth/--auth-file)" if auth else
           "with NO password: anyone who can reach it can use it")
    return (f"WARNING: Stylebooth is served {where}, {who}. Users can generate and train with this computer's GPU "
            "and disk, use and add to its one style library, and switch among the models listed in settings.toml "
            "(`allowed_models`). Stylebooth has no user accounts yet: every login sees the same library."
            + ("" if auth else " Add --auth USER:PASSWORD (or --auth-file PATH) to require a login."))


class _DropExpected(logging.Filter):
    def __init__(self, pattern: re.Pattern):
        super().__init__()
        self.pattern = pattern

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(record.getMessage())


def quiet_expected_warnings() -> None:
    """Drop EXPECTED_WARNINGS at their own loggers (a logger's filter sees only the records made there)."""
    for name, pattern in EXPECTED_WARNINGS.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropExpected) for f in logger.filters):
            logger.addFilter(_DropExpected(pattern))


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
    given = {k: v for k, v in vars(args).items() if v is not None and k not in RUN_ONLY}
    if "data_dir" in given:
        given["data_dir"] = str(Path(given["data_dir"]).expanduser().resolve())
    settings = dataclasses.replace(saved, **given)  # ConfigError for e.g. a bad port
    to_save = dataclasses.replace(saved, **{k: v for k, v in given.items() if k in SAVED_FLAGS})
    if not broken and (to_save != saved or not path.exists()):
        path.parent.mkdir(parents=True, exist_ok=True)
        save_toml(to_save, path)
    return settings


def remember_model(path: Path, model: str) -> None:
    """Save --model in settings.toml once it has loaded; a broken settings file is left for the user to fix."""
    try:
        saved = load_toml(Settings, path) if path.is_file() else Settings()
    except ConfigError:
        return
    if saved.model != model:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_toml(dataclasses.replace(saved, model=model), path)


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
        auth = read_auth(args)
        settings = resolve_settings(args, cfg_path)
    except ConfigError as e:
        print(f"Error: {e}", file=sys.stderr)
        return 2
    if args.share and not auth:
        print("Error: --share makes a public link that anyone who gets it can open, and Stylebooth has no user "
              "accounts yet. Add a login: --auth USER:PASSWORD, or --auth-file PATH with USER:PASSWORD lines.",
              file=sys.stderr)
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
    quiet_expected_warnings()  # before torch, diffusers and transformers are imported
    from engine.api import Engine  # imports torch: slow, so only after the cheap checks
    from ui.app import build_app, launch_options

    engine = Engine(settings, fallback_to_demo=True)  # a bad --model must not stop the app from starting
    # Open to others: only the models in settings.toml can be loaded from the UI (see ui.app.AppHandlers).
    demo = build_app(engine, remote=bool(settings.listen or args.share))
    if engine.load_error:
        print(f"Warning: {engine.load_error}", file=sys.stderr, flush=True)
    elif args.model is not None:
        remember_model(cfg_path, args.model)
    port = find_free_port(settings.port, host)
    url = f"http://127.0.0.1:{port}"
    print(f"\n{APP_NAME} is running at {url}", flush=True)
    if settings.listen or args.share:
        print(network_warning(port, bool(settings.listen), bool(args.share), auth), file=sys.stderr, flush=True)
    print(f"Data: {data_dir}\nSettings: {cfg_path}")
    print("To stop it, press Ctrl+C or close this window.\n", flush=True)
    demo.launch(server_name=host, server_port=port, inbrowser=settings.open_browser, quiet=True,
                share=bool(args.share), auth=auth or None,
                **launch_options(data_dir, extra_blocked=[cfg_path.parent, *filter(None, [args.auth_file])]))
    return 0


if __name__ == "__main__":
    code = main()
    if code and len(sys.argv) == 1 and sys.stdin and sys.stdin.isatty() and os.name == "nt":
        input("Press Enter to close this window.")  # a double-clicked console would vanish before it can be read
    sys.exit(code)
