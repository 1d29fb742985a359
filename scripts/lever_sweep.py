"""Many learning-table runs at once: one process per run, on a GPU or the CPU, results streamed to a JSON-lines file.

Each job trains one held-out concept with the shipped preset (`learning_table.config_for`) plus its overrides, on
the demo model or another base folder (e.g. scripts/texture_family_base.py's output), and measures it on every
seed set (tune, report, fresh; 32 images each). Choose on `tune` only; the other sets say whether it generalises.

    python scripts/lever_sweep.py scripts/sweeps/2026-11-28-gpu.json --device cuda --workers 14 --out results.jsonl

A job: {"tag": "F1", "concept": "tiled", "base": "" | "/path/to/base", "overrides": {...}, "prior": false};
build a family base first (`python scripts/texture_family_base.py --out /tmp/fam --device cuda`, ~3 GPU min).
On one H200 with 14 workers a style job (900 steps) took ~220 s and a family base 160-290 s alongside: about 14
one-thread CPU runs at once (docs/learning-log.md).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_job(args: tuple[dict, str, str]) -> dict:
    job, device, workdir = args
    import torch

    torch.set_num_threads(1)  # one core per worker: the pool is the parallelism
    sys.path.insert(0, str(ROOT))
    import scripts.learning_table as LT
    from engine.demo.checker import DemoChecker
    from engine.models.loading import load_base_model

    base_dir = job.get("base", "")
    t0 = time.time()
    try:
        base = load_base_model(base_dir or None, device=device)
        overrides = dict(job.get("overrides", {}), base_model=base_dir)
        work = Path(workdir) / f"{job['tag']}-{job['concept']}"
        lora = LT.train_concept(base, job["concept"], work, prior=job.get("prior", False), overrides=overrides)
        t1 = time.time()
        probe = LT.Probe(base, DemoChecker.load())
        metrics = {s: LT.measure(probe, lora, job["concept"], s) for s in LT.SEED_SETS}
        return dict(job, metrics=metrics, train_s=t1 - t0, measure_s=time.time() - t1)
    except Exception:  # one failed job is a result, not the end of the sweep
        return dict(job, error=traceback.format_exc()[-2000:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("jobs", type=Path, help="a JSON list of jobs (see above)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--workdir", default="/tmp/lever-sweep")
    ap.add_argument("--out", type=Path, required=True, help="JSON lines, one per finished job, appended")
    a = ap.parse_args()
    jobs = json.loads(a.jobs.read_text("utf-8"))
    with mp.get_context("spawn").Pool(a.workers) as pool, a.out.open("a", encoding="utf-8") as f:
        for res in pool.imap_unordered(run_job, [(j, a.device, a.workdir) for j in jobs]):
            f.write(json.dumps(res) + "\n")
            f.flush()
            print(res["tag"], res["concept"], res.get("metrics", "ERROR"), flush=True)


if __name__ == "__main__":
    main()
