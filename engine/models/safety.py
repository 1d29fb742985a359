"""Safe handling of model files (RELIABILITY.md section 1, MF-1..MF-9).

Pickle-based checkpoints (.ckpt/.pt/.pth/.bin) can execute code when loaded, so Stylebooth only loads
safetensors. Everything here decides by *content*, never by file name, and nothing here ever unpickles: pickle
detection only walks opcodes with `pickletools.genops`, which parses but does not execute.
"""
from __future__ import annotations

import json
import os
import pickletools
import re
import struct
import warnings
import zipfile
from pathlib import Path
from typing import Callable

from engine.core.errors import ModelFileError, UnsafeModelFile  # noqa: F401

__all__ = [
    "ModelFileError", "UnsafeModelFile", "sniff_format", "check_model_file", "validate_safetensors",
    "check_torch_version", "MIN_TORCH",
]

MIN_TORCH = (2, 10)  # CVE-2025-32434 and CVE-2026-24747 are fixed from 2.10 on (MF-5)
# The only place in the code base allowed to name the override; the MF-2 grep test whitelists this line.
_UNSAFE_LOAD_ENV = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"

_HEAD_BYTES = 64 * 1024  # enough to sniff any format and to walk the start of a legacy pickle
_EXTENSIONS = {"safetensors": {".safetensors"}, "gguf": {".gguf"}}
_CONVERT_HINT = (
    "Convert it to .safetensors first, e.g. with the Hugging Face 'Convert to Safetensors' Space "
    "(https://huggingface.co/spaces/safetensors/convert) or with safetensors' convert.py on a machine you "
    "can throw away, and load that."
)
# Byte size per element, as defined by the safetensors format. Sub-byte dtypes (F4, F6_*) are deliberately
# missing: no LoRA or SD checkpoint uses them, and refusing them keeps the size arithmetic exact.
_DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8, "C64": 8,
}
_FLOAT_DTYPES = {"F8_E5M2", "F8_E4M3", "F8_E8M0", "F16", "BF16", "F32", "F64", "C64"}
_MAX_ELEMENTS = 2**60  # far above any real tensor; keeps us stricter than safetensors' own overflow checks
# Opcodes a protocol 0/1 pickle can start with: MARK, empty containers, GLOBAL, scalars, None/True/False.
_PICKLE_STARTERS = set(b"(}])cIJKLMNSVXFGUT\x88\x89")


def _read_head(path: str | os.PathLike) -> tuple[bytes, int]:
    try:
        with open(path, "rb") as f:
            return f.read(_HEAD_BYTES), os.fstat(f.fileno()).st_size
    except OSError as e:
        raise ModelFileError(f"cannot read model file {Path(path).name}: {e}") from e


def _looks_like_legacy_pickle(head: bytes) -> bool:
    """Walk protocol 0/1 opcodes without executing them; a real pickle parses cleanly for a while."""
    if not head or head[0] not in _PICKLE_STARTERS:
        return False
    count = 0
    try:
        for opcode, _arg, _pos in pickletools.genops(head):
            count += 1
            if opcode.name == "STOP" or count >= 8:
                return True
    except Exception:  # genops raises ValueError/others on garbage or on the truncated 64 KiB head
        pass
    return count >= 8


def _zip_has_pickle(path: str | os.PathLike) -> bool:
    try:
        with zipfile.ZipFile(path) as z:  # reads only the central directory, never a member's content
            return any(n.endswith(".pkl") for n in z.namelist())
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        return False


def sniff_format(path: str | os.PathLike) -> str:
    """Return "safetensors", "pickle", "torch-zip", "gguf" or "unknown", judged by magic bytes only.

    The extension is ignored on purpose (MF-4): a pickle renamed to .safetensors must still be seen as pickle.
    """
    head, size = _read_head(path)
    header_len = struct.unpack("<Q", head[:8])[0] if len(head) >= 8 else 0
    claims_safetensors = len(head) >= 9 and head[8:9] == b"{"
    # A plausible header length plus "{" first: a raw pickle would have to be crafted to look like this.
    if claims_safetensors and 2 <= header_len <= size - 8:
        return "safetensors"
    if head[:4] == b"GGUF":
        return "gguf"
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return "torch-zip" if _zip_has_pickle(path) else "unknown"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "pickle"
    # torch's pre-1.6 tar format keeps its object graph in a member named "pickle".
    if head[257:262] == b"ustar" and b"pickle" in head:
        return "pickle"
    if _looks_like_legacy_pickle(head):
        return "pickle"
    if claims_safetensors:
        return "safetensors"  # broken header length; validate_safetensors explains precisely
    # zipfile also finds archives with a prefix (torch refuses those, but be strict anyway).
    if size and zipfile.is_zipfile(path) and _zip_has_pickle(path):
        return "torch-zip"
    return "unknown"


def check_model_file(path: str | os.PathLike, expected: str = "safetensors", **validate_kwargs) -> dict:
    """Refuse anything but a well-formed file of the `expected` format; return its safetensors metadata.

    Raises UnsafeModelFile for pickle or torch.save content whatever the extension (MF-1, MF-4), and
    ModelFileError for empty, truncated or unknown files and for a file whose extension lies about its format
    (e.g. safetensors named x.ckpt). For safetensors, `validate_kwargs` go to `validate_safetensors`.
    Returns {} for formats other than safetensors.
    """
    p = Path(path)
    fmt = sniff_format(p)
    if fmt in ("pickle", "torch-zip"):
        kind = "a torch.save zip archive" if fmt == "torch-zip" else "raw pickle data"
        named = f" although it is named {p.suffix}" if p.suffix.lower() in {".safetensors", ".gguf"} else ""
        raise UnsafeModelFile(
            f"{p.name} is a pickle-based checkpoint (.ckpt/.pt/.bin) ({kind}{named}). Pickle files can run code "
            f"when loaded, so Stylebooth refuses them. {_CONVERT_HINT}"
        )
    if fmt == "unknown":
        size = p.stat().st_size
        problem = "is empty" if size == 0 else f"is not a recognised model file ({size} bytes, unknown format)"
        raise ModelFileError(f"{p.name} {problem}. Re-download it, or pick a .safetensors model file.")
    if fmt != expected:
        raise ModelFileError(f"{p.name} contains {fmt} data but a {expected} file was expected.")
    if p.suffix.lower() not in _EXTENSIONS.get(fmt, {p.suffix.lower()}):
        raise ModelFileError(
            f"{p.name} contains {fmt} data but is named {p.suffix or '(no extension)'}: the extension does not "
            f"match the content. Rename it to {p.stem}{sorted(_EXTENSIONS[fmt])[0]} if you trust where it came from."
        )
    if fmt == "safetensors":
        return validate_safetensors(p, **validate_kwargs)
    return {}


def _int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # JSON true would otherwise count as 1


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")  # JSON "\ud800" escapes decode to lone surrogates, which Rust's serde refuses
        return True
    except UnicodeEncodeError:
        return False


def _no_duplicates(pairs: list) -> dict:
    keys = [k for k, _ in pairs]
    if len(keys) != len(set(keys)):
        dup = next(k for k in keys if keys.count(k) > 1)
        raise ValueError(f"duplicate key {dup!r}")  # two entries for one key would hide a tensor
    return dict(pairs)


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")  # Python's json accepts NaN/Infinity, serde_json does not


def validate_safetensors(
    path: str | os.PathLike,
    *,
    max_header_bytes: int = 100 * 2**20,
    max_tensors: int = 100_000,
    allowed_key: Callable[[str], bool] | None = None,
    check_values: bool = True,
) -> dict:
    """Parse and check a safetensors file ourselves (MF-7); return its `__metadata__` dict ({} if none).

    Checks header length against the file and `max_header_bytes`, JSON object header, dtypes, shape byte sizes
    against offsets, offsets that overlap, leave holes or run past the end, tensor count, keys via
    `allowed_key`, and (with `check_values`) NaN/Inf in float tensors. Raises ModelFileError naming the file.
    """
    p = Path(path)

    def fail(problem: str) -> ModelFileError:
        return ModelFileError(f"{p.name} is not a valid safetensors file: {problem}.")

    try:
        with open(p, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 8:
                raise fail(f"file is only {size} bytes, too short for the 8-byte header length")
            n = struct.unpack("<Q", f.read(8))[0]
            if n > size - 8:
                raise fail(f"header length {n} is larger than the file ({size} bytes); the file is truncated")
            if n > max_header_bytes:
                raise fail(f"header is {n} bytes, over the limit of {max_header_bytes}")
            raw = f.read(n)
    except OSError as e:
        raise ModelFileError(f"cannot read model file {p.name}: {e}") from e
    if not raw.startswith(b"{"):
        raise fail("header does not start with '{'")
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates, parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise fail(f"header is not valid JSON ({type(e).__name__}: {str(e)[:200]})") from None
    if not isinstance(header, dict):
        raise fail("header is not a JSON object")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(
        isinstance(v, str) and _utf8(k) and _utf8(v) for k, v in metadata.items()
    ):
        raise fail("__metadata__ must map strings to strings")
    if len(header) > max_tensors:
        raise fail(f"it declares {len(header)} tensors, over the limit of {max_tensors}")

    data_len = size - 8 - n
    spans: list[tuple[int, int, str]] = []
    for key, info in header.items():
        where = f"tensor {key[:100]!r}"
        if not _utf8(key):
            raise fail(f"{where} has a name that is not valid UTF-8")
        if allowed_key is not None and not allowed_key(key):
            raise fail(f"{where} is not an allowed key (not part of the expected schema)")
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise fail(f"{where} must have exactly the fields dtype, shape and data_offsets")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dtype, str) or dtype not in _DTYPE_BYTES:
            raise fail(f"{where} has unknown dtype {str(dtype)[:40]!r}")
        if not isinstance(shape, list) or not all(_int(d) and d >= 0 for d in shape):
            raise fail(f"{where} has an invalid shape (must be a list of non-negative integers)")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_int(o) for o in offsets)):
            raise fail(f"{where} has invalid data_offsets (must be [begin, end] integers)")
        numel = 1
        for d in shape:  # early exit keeps a hostile shape from building giant integers
            numel *= d
            if numel > _MAX_ELEMENTS:
                raise fail(f"{where} has an absurdly large shape")
        begin, end = offsets
        if begin < 0 or end < begin:
            raise fail(f"{where} has data_offsets [{begin}, {end}] that go backwards")
        if end > data_len:
            raise fail(f"{where} ends at byte {end}, past the end of the data ({data_len} bytes)")
        need = numel * _DTYPE_BYTES[dtype]
        if end - begin != need:
            raise fail(f"{where} has shape {shape} of {dtype} ({need} bytes) but its offsets span {end - begin} bytes")
        spans.append((begin, end, key))

    expected_begin = 0
    for begin, end, key in sorted(spans):  # sorted by (begin, end) so empty tensors sit before their neighbour
        if begin > expected_begin:
            raise fail(f"hole of {begin - expected_begin} bytes before tensor {key[:100]!r}")
        if begin < expected_begin:
            raise fail(f"tensor {key[:100]!r} overlaps the previous tensor")
        expected_begin = end
    if expected_begin != data_len:
        raise fail(f"{data_len - expected_begin} trailing bytes are not covered by any tensor")

    if check_values:
        _check_finite(p, [k for k, i in header.items() if i["dtype"] in _FLOAT_DTYPES], fail)
    return dict(metadata)


def _check_finite(p: Path, keys: list[str], fail: Callable[[str], ModelFileError]) -> None:
    """Load float tensors through safetensors (never pickle) and refuse NaN/Inf, e.g. a diverged LoRA.

    The file is opened even without float tensors: safetensors' own parser then cross-checks ours.
    """
    import torch  # imported late: sniffing and header checks should not pay for torch
    from safetensors import safe_open

    try:
        with safe_open(str(p), framework="pt") as f:
            for key in keys:
                t = f.get_tensor(key)
                if t.numel() == 0:
                    continue
                if not t.is_complex() and t.element_size() == 1:
                    t = t.float()  # float8 kernels are incomplete on CPU; float32 holds every float8 value
                finite = torch.isfinite(t)
                if not bool(finite.all()):
                    bad = int((~finite).sum())
                    raise fail(f"tensor {key[:100]!r} contains {bad} NaN or Inf values (training probably diverged)")
    except ModelFileError:
        raise
    except Exception as e:  # safetensors or torch disagreeing with our parse is still a clean rejection
        raise fail(f"safetensors could not load it ({type(e).__name__}: {str(e)[:200]})") from None


def check_torch_version(version: str | None = None) -> str:
    """Refuse torch older than 2.10 with RuntimeError (MF-5); warn if the unsafe-load override is set.

    `version` defaults to `torch.__version__` (a parameter so tests can try old versions). Returns it.
    """
    if version is None:
        import torch

        version = str(torch.__version__)
    m = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?(.*)", version)
    if not m:
        raise RuntimeError(f"cannot parse the torch version {version!r}; Stylebooth needs torch >= 2.10")
    major, minor, patch = int(m[1]), int(m[2]), int(m[3] or 0)
    # A pre-release of 2.10.0 itself (2.10.0a0, rc1, .dev...) may predate the fixes.
    prerelease = bool(re.match(r"\.?(a|b|rc|dev)", m[4] or ""))
    if (major, minor) < MIN_TORCH or ((major, minor, patch) == (*MIN_TORCH, 0) and prerelease):
        raise RuntimeError(
            f"torch {version} is too old: versions before 2.10 can run code from model files even with "
            f"weights_only=True (CVE-2025-32434, CVE-2026-24747). Upgrade with: pip install -U 'torch>=2.10'"
        )
    if os.environ.get(_UNSAFE_LOAD_ENV):
        warnings.warn(
            f"{_UNSAFE_LOAD_ENV} is set: it makes torch load pickles unsafely. Unset it; Stylebooth never needs it.",
            RuntimeWarning,
            stacklevel=2,
        )
    return version
