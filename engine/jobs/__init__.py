"""Jobs: the persisted queue (store.py: the `jobs` table), running and following a job (runner.py: the seam a
cluster backend replaces), what is recorded of a request and a result (records.py), per-job cancel tokens
(cancel.py), fair turns on the one GPU (fair.py) and a training run's checkpoint state on disk (state.py).

May import: engine.core, engine.studio.db (the shared SQLite helper).
"""
