"""The measurement write-ups are reached by pointers: code comments and docstrings name a README or
docs/learning-log.md passage by its words (`docs/learning-log.md "Prior preservation"`), and the write-ups name the
scripts, tests and files that reproduce them. Both kinds break silently when a passage moves or a file is renamed
(the lever history moved from the README to docs/learning-log.md once); these tests find such pointers."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGETS = {"README": ROOT / "README.md", "docs/learning-log.md": ROOT / "docs" / "learning-log.md"}
# `README "words"`, `README ("words", ...)`, `README, "words"`, `docs/learning-log.md's "words"`; the quoted words
# may wrap onto a comment's next line.
POINTER = re.compile(r'(README|docs/learning-log\.md)(?:\'s)?\)?,?:? \(?"([^"]{3,90})"')
PATH = re.compile(r"(?<![\w/.])((?:engine|scripts|tests|ui|bench|assets|docs)/[\w./-]+"
                  r"\.(?:py|md|jsonl|json|toml|safetensors))(?!\w)")


def _words(text: str) -> str:
    return " ".join(text.split())


def _sources() -> list[Path]:
    dirs = ("engine", "ui", "scripts", "tests", "bench", "assets", "docs")
    files = [ROOT / "README.md", ROOT / "launcher.py",
             *(p for d in dirs for p in (ROOT / d).rglob("*") if p.suffix in (".py", ".md"))]
    return [f for f in files if f != Path(__file__).resolve()]  # its own examples are not pointers


def _pointers(text: str) -> list[tuple[str, str]]:
    joined = re.sub(r"\n\s*(?:#\s?)?", " ", text)  # a quote that wraps onto the next (comment) line
    return [(m.group(1), _words(m.group(2))) for m in POINTER.finditer(joined)]


def test_pointer_pattern_reads_wrapped_comments():
    text = 'kept 107 (docs/learning-log.md "Prior\n    # preservation"); see README ("Instant style").'
    assert _pointers(text) == [("docs/learning-log.md", "Prior preservation"), ("README", "Instant style")]


def test_every_named_passage_exists():
    targets = {name: _words(path.read_text("utf-8")) for name, path in TARGETS.items()}
    found, missing = 0, []
    for src in _sources():
        for name, words in _pointers(src.read_text("utf-8", errors="replace")):
            found += 1
            if words not in targets[name]:
                missing.append(f"{src.relative_to(ROOT)}: {name} \"{words}\"")
    assert found >= 10, "the pointer pattern no longer matches the way the code names passages"
    assert not missing, "passages named but not found (moved or reworded?):\n" + "\n".join(missing)


def test_every_file_the_write_ups_name_exists():
    docs = [TARGETS["README"], TARGETS["docs/learning-log.md"], *(ROOT / "assets").rglob("README.md")]
    missing = [f"{doc.relative_to(ROOT)}: {p}" for doc in docs
               for p in sorted(set(PATH.findall(doc.read_text("utf-8")))) if not (ROOT / p).exists()]
    assert not missing, "files named in the write-ups but not in the repository:\n" + "\n".join(missing)
