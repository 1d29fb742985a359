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
# What each part of the code base may import of ours (DESIGN.md, engine/__init__.py): a module's own subpackage is
# always allowed. ui/ sees the engine only through the facade (passed in by the launcher) and the torch-free core.
OURS = ("engine", "ui", "launcher")
LAYERS = {
    "engine.core": ("engine.core",),
    "engine.jobs": ("engine.core", "engine.studio.db"),
    "engine.demo": ("engine.core",),
    "engine.studio": ("engine.core",),
    "engine.generate": ("engine.core",),
    "engine.models": ("engine.core", "engine.generate.sampler"),
    "engine.styles": ("engine.core", "engine.models"),
    "engine.train": ("engine.core", "engine.models", "engine.generate", "engine.styles", "engine.jobs", "engine.demo"),
    "engine.feedback": ("engine.core", "engine.models", "engine.generate", "engine.styles", "engine.jobs",
                        "engine.train"),
    "engine.cluster": ("engine.core", "engine.models", "engine.generate", "engine.styles", "engine.train",
                       "engine.jobs"),
    "ui": ("engine.core", "engine.api"),
}
RULES = {"engine": ("gradio", "gradio_client"), "ui": ML_STACK}


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


def _module(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


def layer_offenders(root: Path | None = None) -> list[str]:
    """Imports of our own modules that cross a layer the LAYERS table does not allow."""
    root = root or ROOT
    bad: dict[tuple[str, int], str] = {}
    for part, allowed in LAYERS.items():
        folder = root.joinpath(*part.split("."))
        for path in sorted(folder.rglob("*.py")):
            for line, mod in imported_modules(path):
                if not _hits(mod, OURS) or _hits(mod, (part,)) or _hits(mod, allowed) or mod in ("engine", "ui"):
                    continue
                bad.setdefault((str(path.relative_to(root)), line), f"{mod} ({part} may import {', '.join(allowed)})")
    return [f"{p}:{line} imports {what}" for (p, line), what in sorted(bad.items())]


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
        "import os\nfrom engine import engine\nfrom ..engine.generate.sampler import sample\n"
        "def f():\n    import torch.nn\n    importlib.import_module('diffusers')\nfrom engine.core.config import Settings\n")
    assert offenders("ui", RULES["ui"]) == ["ui/x.py:5 imports torch.nn", "ui/x.py:6 imports diffusers"]
    assert layer_offenders(tmp_path) == [
        "ui/x.py:2 imports engine.engine (ui may import engine.core, engine.api)",
        "ui/x.py:3 imports engine.generate.sampler (ui may import engine.core, engine.api)"]


def test_each_subpackage_imports_only_what_its_layer_allows():
    bad = layer_offenders()
    assert not bad, "layering (see engine/__init__.py and each subpackage's docstring):\n" + "\n".join(bad)


def test_the_layer_check_fails_on_a_forbidden_import(tmp_path, monkeypatch):
    """Generation must never depend on training, and core on nothing of ours: plant both and see them caught."""
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    for rel, code in (("engine/generate/x.py", "from engine.train.loop import train\n"),
                      ("engine/core/y.py", "def f():\n    from engine.models import loading\n"),
                      ("engine/train/ok.py", "from engine.generate.sampler import sample\nfrom . import data\n")):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(code)
    assert layer_offenders(tmp_path) == [
        "engine/core/y.py:2 imports engine.models (engine.core may import engine.core)",
        "engine/generate/x.py:1 imports engine.train.loop (engine.generate may import engine.core)"]


def test_every_subpackage_says_what_it_owns_and_may_import():
    for init in sorted((ROOT / "engine").glob("*/__init__.py")):
        doc = ast.get_docstring(ast.parse(init.read_text("utf-8"))) or ""
        assert "May import" in doc, f"{init.relative_to(ROOT)} must say what it may import"


def test_ui_does_not_pull_torch_in_transitively():
    """The AST rule sees only direct imports; this catches an engine helper that ui uses starting to import torch."""
    code = ("import sys, ui.app, ui.generate_tab, ui.train_tab, engine.core.config, engine.core.events, "
            "engine.core.errors, engine.core.train_config, engine.core.images, engine.core.captions; "
            f"bad = [m for m in {ML_STACK!r} if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"})
    assert r.returncode == 0, f"importing ui/ loaded {r.stdout.strip()}\n{r.stderr[-2000:]}"
