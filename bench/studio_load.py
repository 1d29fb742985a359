"""Studio load: simulated users against a really launched studio (`launcher.py --listen`, reached at 127.0.0.1).

    python bench/studio_load.py [--users 20] [--seconds 30] [--generate-every 20]

Starts the app in a temporary data dir, creates the users (each with one private style, plus one style shared with
the studio) and runs one thread per user until the time is up. Each thread loops: log in (POST /login, a fresh
session), list the library (the Library tab's Refresh event, posted to /gradio_api/run/predict as the page does for
events that skip the queue),
and every `--generate-every` seconds generate one 2-step image with gradio_client (`/generate`, the GPU endpoint,
queued one at a time). Every listing is checked for other users' style ids (cross-user data counts as an error).

Prints, per endpoint, the count, error count and p50/p95/max latency, plus the cross-user count. The issue's load
test is `--users 20 --seconds 120`; acceptance: no errors, no cross-user data, p95 of login and listing under 1 s.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
from engine.studio.accounts import Accounts  # noqa: E402
from engine.studio.quota import Quotas  # noqa: E402
from http_support import launched_app, owned_style  # noqa: E402


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))] if xs else float("nan")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--users", type=int, default=20)
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--generate-every", type=float, default=20.0, help="seconds between a user's generations (0: off)")
    args = p.parse_args(argv)

    times: dict[str, list[float]] = defaultdict(list)
    errors: dict[str, list[str]] = defaultdict(list)
    cross = []
    lock = threading.Lock()

    def record(kind: str, t0: float, error: str | None = None) -> None:
        with lock:
            times[kind].append(time.perf_counter() - t0)
            if error:
                errors[kind].append(error[:200])

    with tempfile.TemporaryDirectory() as tmp, launched_app(Path(tmp), "--listen") as app:
        tmp = Path(tmp)
        acc, quotas = Accounts(app.data_dir / "stylebooth.db"), Quotas(app.data_dir / "stylebooth.db")
        names = [f"user{i:02d}" for i in range(args.users)]
        own = {}
        for n in names:
            acc.add(n, f"{n}-password")
            quotas.set_monthly_free(n, 1000)
            own[n] = owned_style(app.data_dir, tmp, f"{n} style", n)
        shared = owned_style(app.data_dir, tmp, "studio shared", names[0], shared=True)
        admin = app.login("admin", app.one_time_password())
        cfg = admin.get("/config").json()
        by_elem = {c.get("props", {}).get("elem_id"): c for c in cfg["components"]}
        comps = {c["id"]: c for c in cfg["components"]}
        refresh = next(d for d in cfg["dependencies"]
                       if [by_elem["lib-refresh"]["id"], "click"] in [list(t) for t in d["targets"]])
        list_data = [comps[i].get("props", {}).get("value") for i in refresh["inputs"]]
        deadline = time.monotonic() + args.seconds
        print(f"{args.users} users for {args.seconds:.0f} s against {app.url} …", flush=True)

        def user_loop(name: str) -> None:
            from gradio_client import Client

            next_gen = time.monotonic() + (args.generate_every * names.index(name) / max(1, len(names))
                                           if args.generate_every else float("inf"))
            client = None
            while time.monotonic() < deadline:
                t0 = time.perf_counter()
                http = httpx.Client(base_url=app.url, timeout=60)
                try:
                    r = http.post("/login", data={"username": name, "password": f"{name}-password"})
                    record("login", t0, None if r.status_code == 200 else f"HTTP {r.status_code}")
                    t0 = time.perf_counter()
                    try:
                        # queue=False events skip the queue: the page posts them to /run/predict, as here
                        r = http.post("/gradio_api/run/predict", json={"data": list_data, "fn_index": refresh["id"],
                                                                      "session_hash": name + "-bench"})
                        text = r.text
                        record("library list", t0, None if r.status_code == 200 and own[name] in text else
                               f"HTTP {r.status_code}: {text[:150]}")
                        others = [o for o, sid in own.items() if o != name and sid in text]
                        if others or shared not in text:
                            cross.append((name, others))
                    except Exception as e:  # noqa: BLE001 - counted and reported
                        record("library list", t0, repr(e))
                finally:
                    http.close()
                if time.monotonic() >= next_gen:
                    next_gen = time.monotonic() + args.generate_every
                    t0 = time.perf_counter()
                    try:
                        client = client or Client(app.url, auth=(name, f"{name}-password"), verbose=False)
                        client.predict(prompt="a red circle on a blue background", num_inference_steps=2,
                                       api_name="/generate")
                        record("generate (GPU, queued)", t0)
                    except Exception as e:  # noqa: BLE001
                        record("generate (GPU, queued)", t0, repr(e))

        threads = [threading.Thread(target=user_loop, args=(n,), daemon=True) for n in names]
        [t.start() for t in threads]
        [t.join(args.seconds + 300) for t in threads]

    print(f"\n{'endpoint':<24} {'calls':>6} {'errors':>6} {'p50 s':>7} {'p95 s':>7} {'max s':>7}")
    for kind, xs in times.items():
        print(f"{kind:<24} {len(xs):>6} {len(errors[kind]):>6} {statistics.median(xs):>7.3f} "
              f"{percentile(xs, 0.95):>7.3f} {max(xs):>7.3f}")
    print(f"cross-user data seen: {len(cross)}")
    for kind, errs in errors.items():
        for e in errs[:3]:
            print(f"  {kind} error: {e}")
    bad = any(errors.values()) or cross or any(percentile(times[k], 0.95) >= 1.0 for k in ("login", "library list"))
    print("RESULT:", "FAIL" if bad else "PASS", "(no errors, no cross-user data, p95 of login and listing < 1 s)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
