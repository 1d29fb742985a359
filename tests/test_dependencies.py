"""Issue 8 point 13: every third-party module that engine/, ui/ and launcher.py import is declared in pyproject.

A module that only works because another package happens to pull it in (pandas through gradio) breaks the day
that package drops it. Imports are read from the source (ast), top-level and inside functions alike.
"""
from __future__ import annotations

import ast
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Import name -> distribution name, where they differ.
DISTRIBUTION = {"PIL": "pillow", "yaml": "pyyaml", "tomli_w": "tomli-w", "huggingface_hub": "huggingface-hub",
                "google": "protobuf", "sklearn": "scikit-learn", "cv2": "opencv-python",
                "gradio_client": "gradio-client"}
# Installed with a declared distribution, which depends on them by design (their API is part of it).
COMES_WITH = {"huggingface-hub": "diffusers", "gradio-client": "gradio"}
# Optional: imported only inside a guard, with a message telling the user to install it.
# ray: the `cluster` extra, imported only on the --ray-address path (engine/cluster: ray_backend says what to install).
OPTIONAL = {"wandb", "bitsandbytes", "ray"}


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text("utf-8"))):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module.split(".")[0])
    return out


def _declared() -> set[str]:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text("utf-8"))["project"]["dependencies"]
    return {re.split(r"[<>=!~\[; ]", d, maxsplit=1)[0].lower().replace("_", "-") for d in deps}


def test_p13_every_third_party_import_is_declared_in_pyproject():
    files = [ROOT / "launcher.py", *sorted((ROOT / "engine").rglob("*.py")), *sorted((ROOT / "ui").rglob("*.py"))]
    local = {"engine", "ui", "launcher", "scripts"}
    declared = _declared()
    missing = {}
    for f in files:
        for mod in _imports(f) - local - set(sys.stdlib_module_names) - {"__future__"} - OPTIONAL:
            dist = DISTRIBUTION.get(mod, mod).lower().replace("_", "-")
            if dist not in declared and COMES_WITH.get(dist) not in declared:
                missing.setdefault(dist, []).append(str(f.relative_to(ROOT)))
    assert not missing, f"imported but not in pyproject's dependencies: {missing}"


def test_p13_the_import_scan_sees_imports_inside_functions(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("def f():\n    import pandas as pd\n    from PIL import Image\n")
    assert _imports(f) == {"pandas", "PIL"}
