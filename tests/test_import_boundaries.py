"""The house rules of DESIGN.md, checked on the source: engine/ never imports gradio; ui/ never imports the ML
stack (torch & co.) nor the engine modules that pull it in. The launcher builds the Engine and hands it over.
"""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ML_STACK = ("torch", "diffusers", "transformers", "peft", "accelerate")
HEAVY_ENGINE = ("engine.engine", "engine.models", "engine.sampling", "engine.training")
RULES = {"engine": ("gradio", "gradio_client"), "ui": ML_STACK + HEAVY_ENGINE}


def _package(path: Path) -> list[str]:
    return list(path.relative_to(ROOT).with_suffix("").parts[:-1])


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, dotted name) for every import in the file, including lazy ones inside functions.

    Relative imports are resolved against the file's package; `from a import b` also yields `a.b`, because b may
    be a module (`from engine import engine`). `importlib.import_module("x")` / `__import__("x")` with a literal
    count too.
    """
    out = []
    for node in ast.walk(ast.parse(path.read_text("utf-8"), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = _package(path)
                pkg = pkg[: len(pkg) - (node.level - 1)]
                base = ".".join(pkg + ([node.module] if node.module else []))
            out.append((node.lineno, base))
            out += [(node.lineno, f"{base}.{a.name}") for a in node.names if a.name != "*"]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
            if name in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                out.append((node.lineno, node.args[0].value))
    return out


def _hits(module: str, banned: tuple[str, ...]) -> bool:
    return any(module == b or module.startswith(b + ".") for b in banned)


def offenders(folder: str, banned: tuple[str, ...]) -> list[str]:
    bad: dict[tuple[str, int], str] = {}
    for path in sorted((ROOT / folder).rglob("*.py")):
        for line, mod in imported_modules(path):
            if _hits(mod, banned):  # one report per line: `from a.b import c` also yields a.b.c
                bad.setdefault((str(path.relative_to(ROOT)), line), mod)
    return [f"{p}:{line} imports {mod}" for (p, line), mod in sorted(bad.items())]


def test_engine_never_imports_gradio():
    bad = offenders("engine", RULES["engine"])
    assert not bad, "engine/ must not import gradio (the UI calls the engine, not the reverse):\n" + "\n".join(bad)


def test_ui_never_imports_the_ml_stack():
    bad = offenders("ui", RULES["ui"])
    assert not bad, ("ui/ must not import torch & co. or the engine modules that do; take the Engine the launcher "
                     "passes in:\n" + "\n".join(bad))


def test_the_checker_sees_what_it_must(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    (tmp_path / "ui").mkdir()
    (tmp_path / "ui" / "x.py").write_text(
        "import os\nfrom engine import engine\nfrom ..engine.sampling import sample\n"
        "def f():\n    import torch.nn\n    importlib.import_module('diffusers')\nfrom engine.config import Settings\n")
    assert offenders("ui", RULES["ui"]) == [
        "ui/x.py:2 imports engine.engine", "ui/x.py:3 imports engine.sampling", "ui/x.py:5 imports torch.nn",
        "ui/x.py:6 imports diffusers"]


def test_ui_does_not_pull_torch_in_transitively():
    """The AST rule sees only direct imports; this catches an engine helper that ui uses starting to import torch."""
    code = ("import sys, ui.app, ui.generate_tab; "
            f"bad = [m for m in {ML_STACK!r} if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"})
    assert r.returncode == 0, f"importing ui/ loaded {r.stdout.strip()}\n{r.stderr[-2000:]}"
