"""Tests for engine/models/safety.py (RELIABILITY.md MF-1, MF-2, MF-4, MF-5, MF-7, MF-9)."""
from __future__ import annotations

import io
import json
import math
import mmap
import os
import pickle
import re
import struct
import tokenize
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

from engine.core.files import atomic_path, atomic_write_bytes
from engine.models.safety import (
    ModelFileError, UnsafeModelFile, check_model_file, check_torch_version, sniff_format, validate_safetensors,
)

ROOT = Path(__file__).resolve().parents[1]


class Payload:
    """Unpickling this creates the canary file: proof that a loader executed code from the file."""

    def __init__(self, canary: Path):
        self.canary = str(canary)

    def __reduce__(self):
        return (open, (self.canary, "w"))


def raw_st(path: Path, header: dict | bytes, data: bytes = b"", length: int | None = None) -> Path:
    """Write a safetensors file by hand so tests control every header byte."""
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h) if length is None else length) + h + data)
    return path


def good_st(path: Path, **tensors) -> Path:
    save_file(tensors or {"a": torch.zeros(2, 3), "b": torch.ones(4, dtype=torch.float16)}, str(path),
              metadata={"format": "pt"})
    return path


# ---------------------------------------------------------------- MF-1 / MF-4: pickles and magic bytes

@pytest.mark.parametrize("name,protocol", [("evil.ckpt", 2), ("evil.bin", 4), ("evil.safetensors", 5),
                                           ("evil.pt", 0), ("evil.pth", 1)])
def test_malicious_pickle_refused_and_canary_never_appears(tmp_path, name, protocol):
    canary = tmp_path / "canary"
    path = tmp_path / name
    path.write_bytes(pickle.dumps(Payload(canary), protocol=protocol))
    assert sniff_format(path) == "pickle"
    with pytest.raises(UnsafeModelFile) as exc:
        check_model_file(path)
    msg = str(exc.value)
    assert name in msg and "pickle-based checkpoint" in msg and "Convert it to .safetensors" in msg
    with pytest.raises(ModelFileError):  # the validator on its own never touches pickle content either
        validate_safetensors(path)
    assert not canary.exists()


@pytest.mark.parametrize("name,zipped,fmt", [("model.pt", True, "torch-zip"), ("model.safetensors", True, "torch-zip"),
                                             ("model.bin", True, "torch-zip"), ("old.ckpt", False, "pickle")])
def test_real_torch_save_refused(tmp_path, name, zipped, fmt):
    canary = tmp_path / "canary"
    path = tmp_path / name
    torch.save({"w": torch.zeros(2), "evil": Payload(canary)}, path, _use_new_zipfile_serialization=zipped)
    assert not canary.exists()  # saving only pickles the reduce tuple
    assert sniff_format(path) == fmt
    with pytest.raises(UnsafeModelFile, match="torch.save zip archive" if zipped else "raw pickle"):
        check_model_file(path)
    assert not canary.exists()


def test_safetensors_named_ckpt_is_a_mismatch(tmp_path):
    assert check_model_file(good_st(tmp_path / "x.safetensors")) == {"format": "pt"}
    path = good_st(tmp_path / "x.ckpt")
    assert sniff_format(path) == "safetensors"
    with pytest.raises(ModelFileError, match="does not match") as exc:
        check_model_file(path)
    assert type(exc.value) is ModelFileError and "x.ckpt" in str(exc.value)


@pytest.mark.parametrize("content,problem", [(b"", "empty"), (b"hello world, not a model", "unknown format"),
                                             (b"PK\x03\x04" + b"\0" * 40, "unknown format")])
def test_empty_and_unknown_refused(tmp_path, content, problem):
    path = tmp_path / "x.safetensors"
    path.write_bytes(content)
    with pytest.raises(ModelFileError, match=problem):
        check_model_file(path)


def test_truncated_safetensors_refused(tmp_path):
    data = good_st(tmp_path / "full.safetensors").read_bytes()
    path = tmp_path / "cut.safetensors"
    path.write_bytes(data[:-5])
    with pytest.raises(ModelFileError, match="cut.safetensors.*trailing|past the end"):
        check_model_file(path)
    path.write_bytes(data[:20])
    with pytest.raises(ModelFileError, match="larger than the file"):
        check_model_file(path)


def test_gguf_sniffed_and_refused_where_safetensors_expected(tmp_path):
    for name in ("m.safetensors", "m.gguf"):
        (tmp_path / name).write_bytes(b"GGUF" + b"\0" * 60)
    assert sniff_format(tmp_path / "m.safetensors") == "gguf"
    with pytest.raises(ModelFileError, match="gguf data but a safetensors file was expected"):
        check_model_file(tmp_path / "m.safetensors")
    assert check_model_file(tmp_path / "m.gguf", expected="gguf") == {}


# ---------------------------------------------------------------- MF-7: validator, hand-made cases

def _t(dtype, shape, begin, end):
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


@pytest.mark.parametrize("header,data,problem", [
    ({"a": _t("F99", [2], 0, 8)}, b"\0" * 8, "unknown dtype"),
    ({"a": _t("F32", [3], 0, 8)}, b"\0" * 8, "12 bytes.*span 8"),
    ({"a": _t("F32", [2], 0, 8), "b": _t("F32", [2], 4, 12)}, b"\0" * 12, "overlaps"),
    ({"a": _t("F32", [1], 0, 4), "b": _t("F32", [1], 8, 12)}, b"\0" * 12, "hole of 4 bytes"),
    ({"a": _t("F32", [2], 0, 8)}, b"\0" * 4, "past the end"),
    ({"a": _t("F32", [1], 0, 4)}, b"\0" * 8, "4 trailing bytes"),
    ({"a": _t("F32", [1], 4, 0)}, b"\0" * 4, "backwards"),
    ({"a": _t("F32", [-1], 0, 4)}, b"\0" * 4, "invalid shape"),
    ({"a": _t("F32", [True], 0, 4)}, b"\0" * 4, "invalid shape"),
    ({"a": {"dtype": "F32", "shape": [1]}}, b"\0" * 4, "exactly the fields"),
    ({"a": _t("U8", [2**40, 2**40, 0], 0, 0)}, b"", "absurdly large"),
    ({"__metadata__": {"k": 1}}, b"", "must map strings"),
    (b"[1, 2]", b"", "does not start with"),
    (b"{not json}", b"", "not valid JSON"),
    (b'{"a": NaN}', b"", "not valid JSON"),
    (b'{"a": 1, "a": 2}', b"", "duplicate key"),
    (b"{" + b"[" * 100000, b"", "not valid JSON"),
    (b'{"a": "\xff"}', b"", "not valid JSON"),
], ids=lambda v: repr(v)[:40] if isinstance(v, (dict, bytes)) else None)
def test_validator_rejects(tmp_path, header, data, problem):
    path = raw_st(tmp_path / "bad.safetensors", header, data)
    with pytest.raises(ModelFileError, match=problem) as exc:
        validate_safetensors(path)
    assert "bad.safetensors" in str(exc.value)


def test_header_length_checks(tmp_path):
    with pytest.raises(ModelFileError, match="larger than the file"):
        validate_safetensors(raw_st(tmp_path / "a.safetensors", {}, length=10**12))
    path = raw_st(tmp_path / "b.safetensors", {"__metadata__": {"pad": "x" * 5000}})
    with pytest.raises(ModelFileError, match="over the limit of 1000"):
        validate_safetensors(path, max_header_bytes=1000)
    (tmp_path / "c.safetensors").write_bytes(b"\1\0")
    with pytest.raises(ModelFileError, match="too short"):
        validate_safetensors(tmp_path / "c.safetensors")


def test_tensor_count_and_allowed_keys(tmp_path):
    path = good_st(tmp_path / "x.safetensors", **{f"t{i}": torch.zeros(1) for i in range(5)})
    with pytest.raises(ModelFileError, match="5 tensors, over the limit of 4"):
        validate_safetensors(path, max_tensors=4)
    with pytest.raises(ModelFileError, match="'t3' is not an allowed key"):
        validate_safetensors(path, allowed_key=lambda k: k != "t3")
    assert validate_safetensors(path, allowed_key=lambda k: k.startswith("t")) == {"format": "pt"}


@pytest.mark.parametrize("bad,dtype", [(b, d) for b in (float("nan"), float("inf"), float("-inf"))
                                       for d in (torch.float32, torch.float16, torch.bfloat16)]
                         + [(float("nan"), torch.float8_e4m3fn)])  # e4m3fn has no Inf (casts saturate)
def test_nan_inf_rejected(tmp_path, bad, dtype):
    t = torch.tensor([1.0, bad, 2.0]).to(dtype)
    path = good_st(tmp_path / "lora.safetensors", ok=torch.zeros(2), **{"w.lora_up": t})
    with pytest.raises(ModelFileError, match="'w.lora_up' contains 1 NaN or Inf"):
        validate_safetensors(path)
    assert validate_safetensors(path, check_values=False) == {"format": "pt"}


# ---------------------------------------------------------------- MF-7: property tests

DTYPES = ["F32", "F16", "BF16", "U8", "I64", "BOOL", "F8_E4M3", "F64"]
SIZES = {"F32": 4, "F16": 2, "BF16": 2, "U8": 1, "I64": 8, "BOOL": 1, "F8_E4M3": 1, "F64": 8}
tensor_st = st.tuples(st.text(min_size=1, max_size=8), st.sampled_from(DTYPES + ["F7", "int", ""]),
                      st.lists(st.integers(0, 4), max_size=3), st.booleans())
mutation_st = st.one_of(
    st.none(),
    st.tuples(st.just("offset"), st.integers(0, 5), st.integers(-9, 9)),
    st.tuples(st.just("length"), st.integers(-20, 20)),
    st.tuples(st.just("truncate"), st.integers(1, 30)),
    st.tuples(st.just("append"), st.binary(min_size=1, max_size=9)),
    st.tuples(st.just("flip"), st.integers(0, 400), st.integers(1, 255)),
    st.tuples(st.just("metadata"), st.sampled_from([{"a": "b"}, {"a": 1}, [], "x", {"": ""}])),
)


def _build(tensors, mutation) -> bytes:
    header, data = {}, b""
    for key, dtype, shape, zeros in tensors:
        n = SIZES.get(dtype, 1) * math.prod(shape)
        header[key] = _t(dtype, shape, len(data), len(data) + n)
        data += bytes(n) if zeros else bytes((i * 37 + 11) % 256 for i in range(n))
    kind, *args = mutation or ("none",)
    if kind == "offset" and header:
        list(header.values())[args[0] % len(header)]["data_offsets"][args[0] % 2] += args[1]
    if kind == "metadata":
        header["__metadata__"] = args[0]
    h = json.dumps(header).encode()
    blob = struct.pack("<Q", max(0, len(h) + (args[0] if kind == "length" else 0))) + h + data
    if kind == "truncate":
        blob = blob[: max(0, len(blob) - args[0])]
    if kind == "append":
        blob += args[0]
    if kind == "flip" and blob:
        i = args[0] % len(blob)
        blob = blob[:i] + bytes([blob[i] ^ args[1]]) + blob[i + 1:]
    return blob


def _assert_clean_outcome(path: Path, check=lambda p: validate_safetensors(p, max_tensors=6)):
    try:
        meta = check(path)
    except (ModelFileError, UnsafeModelFile) as e:
        assert path.name in str(e)
        return
    # Accepted: safetensors itself must agree and every float must be finite.
    assert isinstance(meta, dict)
    with safe_open(str(path), framework="pt") as f:
        assert (f.metadata() or {}) == meta
        for key in f.keys():
            t = f.get_tensor(key)
            if t.is_floating_point():  # float8 has no isfinite kernel; widening anything else could overflow
                assert torch.isfinite(t.float() if t.element_size() == 1 else t).all()


@settings(max_examples=200, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tensors=st.lists(tensor_st, max_size=5, unique_by=lambda t: t[0]), mutation=mutation_st)
def test_property_generated_headers(tmp_path, tensors, mutation):
    path = tmp_path / "gen.safetensors"
    path.write_bytes(_build(tensors, mutation))
    _assert_clean_outcome(path)


@settings(max_examples=150, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(header=st.binary(max_size=80), body=st.binary(max_size=40), claim=st.integers(0, 2**64 - 1) | st.none())
def test_property_random_bytes(tmp_path, header, body, claim):
    path = tmp_path / "rnd.safetensors"
    length = len(header) if claim is None else claim
    path.write_bytes(struct.pack("<Q", length) + header + body)
    _assert_clean_outcome(path)


@settings(max_examples=100, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(blob=st.binary(max_size=200))
def test_property_sniff_and_check_never_crash(tmp_path, blob):
    path = tmp_path / "any.safetensors"
    path.write_bytes(blob)
    assert sniff_format(path) in {"safetensors", "pickle", "torch-zip", "gguf", "unknown"}
    _assert_clean_outcome(path, check_model_file)


# ---------------------------------------------------------------- MF-9: atomic writes

def test_atomic_write_over_memory_mapped_file(tmp_path):
    path = tmp_path / "lora.safetensors"
    good_st(path, w=torch.zeros(1000))
    old = path.read_bytes()
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm, \
            safe_open(str(path), framework="pt") as reader:
        new_src = good_st(tmp_path / "src.bin", w=torch.ones(1000))
        atomic_write_bytes(path, new_src.read_bytes())
        assert mm[:] == old  # old readers keep a consistent old file instead of torn bytes
        assert torch.equal(reader.get_tensor("w"), torch.zeros(1000))
    assert path.read_bytes() == new_src.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lora.safetensors", "src.bin"]


def test_atomic_path_failure_leaves_target_and_no_temp(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"old")
    os.chmod(path, 0o640)
    with pytest.raises(RuntimeError):
        with atomic_path(path) as tmp:
            assert tmp.parent == tmp_path and tmp != path
            tmp.write_bytes(b"half")
            raise RuntimeError("disk full")
    assert path.read_bytes() == b"old" and list(tmp_path.iterdir()) == [path]
    with atomic_path(path) as tmp:
        save_file({"x": torch.zeros(1)}, str(tmp))  # any writer that takes a path works
    assert validate_safetensors(path) == {} and (path.stat().st_mode & 0o777) == 0o640


# ---------------------------------------------------------------- MF-5: torch version

@pytest.mark.parametrize("version,ok", [("2.9.1", False), ("1.13.0", False), ("2.10.0a0+git123", False),
                                        ("2.10.0rc1", False), ("garbage", False), ("2.10.0", True),
                                        ("2.13.0+cpu", True), ("2.11.0.dev20260101", True), ("3.0", True)])
def test_torch_version_gate(version, ok, monkeypatch):
    monkeypatch.delenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", raising=False)
    if ok:
        assert check_torch_version(version) == version
    else:
        with pytest.raises(RuntimeError, match="2.10"):
            check_torch_version(version)


def test_installed_torch_ok_and_env_override_warns(monkeypatch):
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with pytest.warns(RuntimeWarning, match="Unset it"):
        check_torch_version()


# ---------------------------------------------------------------- MF-2: no unsafe load anywhere

BANNED = [
    (re.compile(r"weights_only\s*=\s*False"), "weights_only=False"),
    (re.compile(r"\bpickle\.loads?\s*\("), "pickle.load(s)("),
    (re.compile(r"\bdill\b"), "dill"),
    (re.compile(r"\bjoblib\.load\b"), "joblib.load"),
    (re.compile(r"TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"), "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"),
    # Aliases that would dodge the patterns above.
    (re.compile(r"\bfrom\s+(pickle|joblib)\s+import\b|\bfrom\s+torch\s+import\b.*\bload\b|\bUnpickler\b"),
     "aliased unpickling"),
]
# The one line allowed to name the override: safety.py's own constant for the MF-5 warning.
ALLOWED_LINE = ("engine/models/safety.py", '_UNSAFE_LOAD_ENV = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"')


def _code_without_comments(text: str) -> str:
    """Drop comments (explanations may name the banned calls); strings stay, they can hold env names."""
    try:
        tokens = [t for t in tokenize.generate_tokens(io.StringIO(text).readline) if t.type != tokenize.COMMENT]
        return tokenize.untokenize(tokens)
    except (tokenize.TokenError, SyntaxError, ValueError):
        return text


def _call_text(code: str, start: int) -> str:
    depth, i = 0, start
    while i < len(code):
        depth += {"(": 1, ")": -1}.get(code[i], 0)
        if depth == 0 and code[i] == ")":
            return code[start:i + 1]
        i += 1
    return code[start:]


def _offenders(files: list[Path], root: Path = ROOT) -> list[str]:
    found = []
    for path in files:
        rel = path.relative_to(root).as_posix()
        code = _code_without_comments(path.read_text(encoding="utf-8", errors="replace"))
        for m in re.finditer(r"\btorch\.load\s*\(", code):
            if not re.search(r"weights_only\s*=\s*True", _call_text(code, m.end() - 1)):
                found.append(f"{rel}:{code.count(chr(10), 0, m.start()) + 1}: torch.load( without weights_only=True")
        for lineno, line in enumerate(code.splitlines(), 1):
            if (rel, line.strip()) == ALLOWED_LINE:
                continue
            found += [f"{rel}:{lineno}: {label}" for rx, label in BANNED if rx.search(line)]
    return found


def _scanned_files() -> list[Path]:
    files = [p for d in ("engine", "ui", "scripts", "bench") for p in sorted((ROOT / d).rglob("*.py"))]
    return files + ([ROOT / "launcher.py"] if (ROOT / "launcher.py").exists() else [])


def test_mf2_no_unsafe_loads_in_codebase():
    files = _scanned_files()
    assert ROOT / "engine" / "models" / "safety.py" in files
    offenders = _offenders(files)
    assert not offenders, "unsafe model loading (MF-2):\n" + "\n".join(offenders)


def test_mf2_scanner_catches_each_pattern(tmp_path):
    bad = tmp_path / "engine" / "bad.py"
    bad.parent.mkdir()
    bad.write_text(
        "import torch, pickle\n"
        "a = torch.load(p)\n"
        "b = torch.load(p,\n    map_location='cpu', weights_only=False)\n"
        "c = pickle.loads(x)\nd = pickle.load(f)\nimport dill\nimport joblib\ne = joblib.load(p)\n"
        "os.environ['TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD'] = '1'\n"
        "ok = torch.load(p, weights_only=True)  # torch.load(p) in a comment is fine\n"
        "from pickle import loads\nfrom torch import nn, load\n"
    )
    found = _offenders([bad], root=tmp_path)
    assert len([f for f in found if "torch.load(" in f]) == 2
    for label in ("weights_only=False", "pickle.load(s)(", "dill", "joblib.load", "TORCH_FORCE"):
        assert any(label in f for f in found), label
    assert [f for f in found if "aliased" in f] == ["engine/bad.py:12: aliased unpickling",
                                                    "engine/bad.py:13: aliased unpickling"]
    assert not any(":11:" in f for f in found)  # the weights_only=True line and its comment
