"""Start Stylebooth: `python launcher.py` (or double-click) opens the app in the default browser.

Thin on purpose: parse flags, load settings, build the Engine, build the app, launch. Settings live in
`<config dir>/settings.toml` (platformdirs, or $STYLEBOOTH_CONFIG_DIR); --data-dir and --port are saved there
when given, and --model once it has loaded, so the next double-click uses them.

--listen and --share open the app to other people, so they start it in **studio mode**: user accounts in
<data_dir>/stylebooth.db (a first admin is created with a one-time password printed here), a login on every route,
per-user styles, outputs and jobs, and quotas. Accounts are managed with `python launcher.py users ...` (see
users_main) or the Studio tab. On 127.0.0.1 without those flags the app has one local user and no login.
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
RUN_ONLY = ("share", "auth", "auth_file", "ray_address")  # flags that are not Settings fields
USERS_HELP = """python launcher.py users [--data-dir DIR] COMMAND
  add NAME [--admin]      create an account (the password is asked for, or read from stdin)
  remove NAME             delete an account (its styles stay, visible to admins)
  list                    accounts with role, free generations left and credits
  passwd NAME             set a new password (asked for, or read from stdin); unlocks the account
  set-quota NAME N        N free generations per month
  add-credits NAME N      add N credits (one credit = one image)"""

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
                   help="also make a public gradio.live link (studio mode: accounts and a login)")
    p.add_argument("--ray-address", metavar="auto|HOST:PORT",
                   help="run generation and training jobs on a Ray cluster (one job per GPU worker) instead of in "
                        "this process: 'auto' for a cluster started on this machine with `ray start --head`, or the "
                        "head's HOST:PORT (needs pip install \"stylebooth[cluster]\")")
    p.add_argument("--eval-model", help="CLIP model (a folder, or a hub id when online) that scores training "
                                        "checkpoints for likeness and prompt fidelity")
    p.add_argument("--auth", metavar="USER:PASSWORD", help=argparse.SUPPRESS)  # replaced by studio accounts
    p.add_argument("--auth-file", metavar="PATH", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def network_warning(port: int, listen: bool, share: bool, users: int) -> str:
    """What --listen/--share expose, printed at every such start (studio mode)."""
    where = " and ".join([f"on every network interface (0.0.0.0, port {port})"] * listen +
                         ["through a public gradio.live link"] * share)
    return (f"Studio mode: Stylebooth is served {where}, only after a login ({users} account(s)). Each user sees "
            "their own styles, outputs and jobs plus the styles shared with the studio, and pays for GPU work from "
            "their quota. Manage accounts with `python launcher.py users ...` or in the Studio tab (admins).")


def studio_login_banner(url: str, password: str) -> str:
    """How to log in the first time (printed once, when the admin account is created; the password only here)."""
    return (f"\nNo studio admin existed, so one was created.\n  Open {url} and log in as: admin\n"
            f"  One-time password: {password}\n"
            "Change it now with `python launcher.py users passwd admin`; it is not shown again (only a hash is kept).\n")


def _read_password(prompt: str = "Password: ") -> str:
    """From the terminal without echo, or the first line of stdin when it is not a terminal (scripts); never argv."""
    import getpass

    if sys.stdin is not None and sys.stdin.isatty():
        first = getpass.getpass(prompt)
        if getpass.getpass("Again: ") != first:
            raise ConfigError("the two passwords differ")
        return first
    line = sys.stdin.readline() if sys.stdin is not None else ""
    return line.rstrip("\r\n")


def _users_data_dir(given: str | None) -> Path:
    """--data-dir, else the one settings.toml names, else the default: the database the app itself opens."""
    if given:
        return Path(given).expanduser().resolve()
    path = config_dir() / "settings.toml"
    try:
        saved = load_toml(Settings, path) if path.is_file() else Settings()
    except ConfigError:
        saved = Settings()
    return Path(saved.data_dir).expanduser() if saved.data_dir else default_data_dir()


def users_main(argv: list[str]) -> int:
    """`python launcher.py users ...`: the admin command line on the same database as the app (see USERS_HELP)."""
    p = argparse.ArgumentParser(prog="launcher.py users", usage=USERS_HELP)
    p.add_argument("--data-dir")
    p.add_argument("command", choices=["add", "remove", "list", "passwd", "set-quota", "add-credits"])
    p.add_argument("name", nargs="?")
    p.add_argument("number", nargs="?")
    p.add_argument("--admin", action="store_true")
    args = p.parse_args(argv)
    try:
        data_dir = _users_data_dir(args.data_dir)
        from engine.studio.service import ADMIN_CLI, Studio  # torch-free: this command starts in a blink

        studio = Studio(data_dir / "stylebooth.db")
        if args.command != "list" and not args.name:
            raise ConfigError(f"`users {args.command}` needs a NAME")
        if args.command in ("set-quota", "add-credits") and args.number is None:
            raise ConfigError(f"`users {args.command}` needs a NAME and a number")
        if args.command == "list":
            rows = studio.users(ADMIN_CLI)
            print(f"{'name':<24} {'role':<6} {'free/month':>10} {'free left':>9} {'credits':>8}  renews")
            for r in rows:
                lock = f"  (locked {r['locked_s']} s)" if r["locked_s"] else ""
                print(f"{r['name']:<24} {r['role']:<6} {r['monthly_free']:>10} {r['free_left']:>9} "
                      f"{r['credits']:>8}  {r['renews_on']}{lock}")
            if not rows:
                print("(no accounts yet: `python launcher.py users add NAME --admin`)")
        elif args.command == "add":
            user = studio.add_user(ADMIN_CLI, args.name, _read_password(), "admin" if args.admin else "user")
            print(f"Added {user.role} {user.name!r}.")
        elif args.command == "remove":
            studio.remove_user(ADMIN_CLI, args.name)
            print(f"Removed {args.name!r}; their styles stay (admins still see them).")
        elif args.command == "passwd":
            studio.set_password(ADMIN_CLI, args.name, _read_password("New password: "))
            print(f"Password of {args.name!r} changed; the account is unlocked.")
        elif args.command == "set-quota":
            b = studio.set_monthly_free(ADMIN_CLI, args.name, args.number)
            print(f"{b.user}: {b.monthly_free} free generations a month, {b.free_left} left until {b.renews_on}.")
        else:
            b = studio.add_credits(ADMIN_CLI, args.name, args.number)
            print(f"{b.user}: {b.credits} credits.")
    except ConfigError as e:
        print(f"Error: {e}", file=sys.stderr)
        return 2
    return 0


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
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["users"]:
        return users_main(argv[1:])
    args = parse_args(argv)
    cfg_path = config_dir() / "settings.toml"
    if args.auth or args.auth_file:
        print("Error: --auth and --auth-file were replaced by studio accounts. --listen or --share start studio "
              "mode with a login; add users with `python launcher.py users add NAME` (the password is asked for, "
              "never put on the command line).", file=sys.stderr)
        return 2
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

    if args.ray_address:  # before the slow imports: a missing Ray is said at once
        import importlib.util

        from engine.cluster import RAY_MISSING

        if importlib.util.find_spec("ray") is None:
            print(f"Error: {RAY_MISSING}", file=sys.stderr)
            return 2
    host = "0.0.0.0" if settings.listen else "127.0.0.1"
    print(f"Starting {APP_NAME}: loading the model…", flush=True)
    quiet_expected_warnings()  # before torch, diffusers and transformers are imported
    from engine.api import Engine  # imports torch: slow, so only after the cheap checks
    from ui.app import build_app, launch_options

    cluster = None
    if args.ray_address:
        from engine.cluster import ray_backend

        try:
            cluster = ray_backend(args.ray_address)
        except (ConnectionError, RuntimeError, ValueError) as e:
            print(f"Error: could not connect to the Ray cluster at {args.ray_address!r} ({e}). Start its head with "
                  "`ray start --head` (see README, \"Past one machine\"), or leave out --ray-address.",
                  file=sys.stderr)
            return 1
        print(f"Jobs run on the Ray cluster at {args.ray_address}: {cluster.capacity()} at once.", flush=True)
    # A bad --model must not stop the app from starting.
    engine = Engine(settings, fallback_to_demo=True, cluster=cluster)
    studio_mode = bool(settings.listen or args.share)
    one_time = None
    if studio_mode:  # open to others: accounts, ownership and quotas (the same database as `launcher.py users`)
        one_time = engine.enable_studio().accounts.ensure_admin()
    # Open to others: only the models in settings.toml can be loaded from the UI (see ui.app.AppHandlers).
    demo = build_app(engine, remote=studio_mode)
    if engine.load_error:
        print(f"Warning: {engine.load_error}", file=sys.stderr, flush=True)
    elif args.model is not None:
        remember_model(cfg_path, args.model)
    port = find_free_port(settings.port, host)
    url = f"http://127.0.0.1:{port}"
    print(f"\n{APP_NAME} is running at {url}", flush=True)
    if studio_mode:
        print(network_warning(port, bool(settings.listen), bool(args.share), len(engine.studio.accounts.list())),
              file=sys.stderr, flush=True)
        if one_time:
            print(studio_login_banner(url, one_time), flush=True)
    print(f"Data: {data_dir}\nSettings: {cfg_path}")
    print("To stop it, press Ctrl+C or close this window.\n", flush=True)
    demo.launch(server_name=host, server_port=port, inbrowser=settings.open_browser, quiet=True,
                share=bool(args.share), auth=engine.studio.accounts.gradio_auth if studio_mode else None,
                auth_message="Stylebooth studio: log in with the account your studio admin gave you." if studio_mode
                else None, **launch_options(data_dir, extra_blocked=[cfg_path.parent]))
    return 0


if __name__ == "__main__":
    code = main()
    if code and len(sys.argv) == 1 and sys.stdin and sys.stdin.isatty() and os.name == "nt":
        input("Press Enter to close this window.")  # a double-clicked console would vanish before it can be read
    sys.exit(code)
