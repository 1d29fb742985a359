"""Jobs: job state on disk (state.py) and per-job cancel tokens (cancel.py). The queue grows here.

May import: engine.core.
"""
