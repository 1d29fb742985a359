"""scripts/family_base_words.py (docs/learning-log.md's evidence that the family bases do not render their own texture
words) runs and writes its grid: one row per word, the texture as drawn beside three generations."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def test_writes_one_row_per_word(tmp_path):
    out = tmp_path / "words.png"
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "family_base_words.py"),
                          str(ROOT / "assets" / "demo-model"), "--pool", "2", "--neighbours", "2", "--out", str(out)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    words = [line.split() for line in run.stdout.splitlines() if line.startswith(("stag", "fam"))]
    assert len(words) == 4 and len({w for _, w in words}) == 4  # 2 staggered + 2 procedural, distinct words
    rows = len(run.stdout.splitlines()) - 1  # every printed line but the last ("wrote ...") is a row
    grid = Image.open(out)
    assert grid.size == (4 * 32 * 4, rows * 32 * 4)
    assert rows == 6  # + the first two hand-written textures after striped
