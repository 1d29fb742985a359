"""Handing engine files to the browser: Gradio serves only its upload folder, never the data dir."""
from __future__ import annotations

import contextlib
import shutil
import tempfile
import time
from pathlib import Path

from gradio.utils import get_upload_folder

COPY_MAX_AGE_S = 3600


def copy_for_download(paths: list[Path]) -> list[Path]:
    """Copies of engine files (PNGs with their recipe, exports, previews) in Gradio's upload folder, the one
    place it serves from: the data dir is in blocked_paths. Returns the copies, in order."""
    if not paths:
        return []
    folder = Path(get_upload_folder())
    folder.mkdir(parents=True, exist_ok=True)
    # Gradio copies results into its own cache (cleaned by delete_cache) but not ours: drop copies older than an
    # hour, long after Gradio has taken its copy.
    for old in folder.glob("stylebooth-*"):
        with contextlib.suppress(OSError):  # another process may be tidying up the same folder
            if time.time() - old.stat().st_mtime > COPY_MAX_AGE_S:
                shutil.rmtree(old, ignore_errors=True)
    run_dir = Path(tempfile.mkdtemp(prefix="stylebooth-", dir=folder))
    out = []
    for p in paths:
        dst = run_dir / Path(p).name
        shutil.copyfile(p, dst)
        out.append(dst)
    return out
