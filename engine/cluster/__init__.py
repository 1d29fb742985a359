"""Past one machine: jobs run as Ray tasks on GPU workers while the queue (ownership, quotas, fairness) stays here.

`RayBackend` (backend.py) connects to a Ray cluster and runs one generation or training job per task; the
Engine's FairScheduler (engine/jobs/fair.py) hands out that many turns at once, round-robin across users; models, styles and datasets reach the workers
by content hash (content.py) from a store on the app's own node (head.py), which also receives training checkpoints
as they are saved, so a retried task resumes exactly where the dead worker's last checkpoint left off. The task
bodies run on the workers (worker.py). Ray is optional (`pip install "stylebooth[cluster]"`); nothing here imports
it at module level except backend.py and worker.py, which only the cluster path loads.

May import: engine.core, engine.models, engine.generate, engine.styles, engine.train, engine.jobs.state (reading and
writing a run's job.json); never engine.api (the Engine calls this package, not the reverse).
"""
from __future__ import annotations

RAY_MISSING = ('Running jobs on a Ray cluster needs Ray: pip install "stylebooth[cluster]" (on the app\'s machine '
               "and on every worker), or leave out --ray-address to run jobs in this process.")


def ray_backend(address: str, **kw):
    """A RayBackend connected to `address` ("auto" or HOST:PORT); a plain ImportError message when Ray is absent."""
    try:
        import ray  # noqa: F401
    except ImportError:
        raise ImportError(RAY_MISSING) from None
    from engine.cluster.backend import RayBackend

    return RayBackend(address, **kw)
