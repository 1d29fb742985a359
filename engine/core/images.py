"""Image intake for training datasets (RELIABILITY.md section 3, IM-1..IM-8).

Uploads are untrusted: the format is decided by content, the size is checked from the header before any pixel
is decoded, every image is fully decoded once here, and only a clean re-encoded PNG (no metadata) reaches the
dataset folder. A bad file is reported by name with what to do; it never reaches training.
"""
from __future__ import annotations

import hashlib
import io
import mmap
import os
import stat
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from engine.core.files import atomic_write_bytes
from engine.core.errors import ImageRejected  # noqa: F401

__all__ = ["ImageRejected", "IngestReport", "load_image", "ingest_dataset", "ALLOWED_FORMATS"]

ALLOWED_FORMATS = ["PNG", "JPEG", "WEBP"]  # IM-1: every other Pillow plugin is an attack surface we do not need
_USE_ALLOWED = "Save it as PNG, JPEG or WEBP and upload it again."
_REEXPORT = "Open it in an image editor, export it again as PNG or JPEG, and upload that."
_ANIMATED_POLICIES = ("first_frame_warn", "reject")
# Magic bytes of formats people commonly upload by mistake, so the refusal can say what the file really is.
_OTHER_MAGIC = [
    (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"), (b"GIF8", "GIF"), (b"BM", "BMP"), (b"8BPS", "PSD"),
    (b"%PDF", "PDF"), (b"%!PS", "EPS"), (b"\xc5\xd0\xd3\xc6", "EPS"), (b"SIMPLE  =", "FITS"),
    (b"\x00\x00\x01\x00", "ICO"), (b"\x00\x00\x00\x0cjP  ", "JPEG 2000"), (b"\xff\x0a", "JPEG XL"),
    (b"PK\x03\x04", "ZIP archive"), (b"qoif", "QOI"),
]


@dataclass(frozen=True)
class IngestReport:
    """Outcome of `ingest_dataset`: stored PNGs, refused files with reasons, and notices for the user."""

    kept: list[Path]
    rejected: list[tuple[str, str]]
    notices: list[str]
    sources: list[int] = field(default_factory=list)  # for each kept file, its index in the input (for captions)


def _sniff(head: bytes) -> str:
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    for magic, name in _OTHER_MAGIC:
        if head.startswith(magic):
            return name
    if head[4:12] in (b"ftypheic", b"ftypheix", b"ftypmif1", b"ftypavif"):
        return "HEIC/AVIF"
    if head.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"<"):
        return "HTML/SVG/XML text"
    return "unknown"


def _jpeg_has_end(path: str | Path) -> bool:
    """True if an EOI marker follows the last start-of-scan. Pillow's own truncation check is switched off
    process-wide by `ImageFile.LOAD_TRUNCATED_IMAGES` (some trainers set it), so we do not rely on it."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        sos = mm.rfind(b"\xff\xda")  # entropy-coded data never contains FF DA or FF D9 (FF is stuffed)
        return sos >= 0 and mm.find(b"\xff\xd9", sos) >= 0


def _require_regular_file(path: str | Path, name: str) -> None:
    """Refuse FIFOs, devices, sockets and directories before opening: open() on a FIFO blocks until a writer
    appears (forever), and a device such as /dev/zero never ends. os.stat follows symlinks, so a link to one of
    those is refused too."""
    try:
        st = os.stat(path)
    except OSError as e:
        advice = "Check the file and upload it again."
        raise ImageRejected(name, f"cannot be read ({e.strerror or e})", advice) from None
    if not stat.S_ISREG(st.st_mode):
        kind = ("a folder" if stat.S_ISDIR(st.st_mode) else "a pipe (FIFO)" if stat.S_ISFIFO(st.st_mode)
                else "a socket" if stat.S_ISSOCK(st.st_mode) else "a device" if stat.S_ISCHR(st.st_mode)
                or stat.S_ISBLK(st.st_mode) else "not a regular file")
        raise ImageRejected(name, f"is {kind}, not an image file", "Pick a regular PNG, JPEG or WEBP file.")


def _to_l(arr: np.ndarray) -> Image.Image:
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "L")


def _scale_int(arr: np.ndarray) -> Image.Image:
    """Mode "I": keep 8-bit data, shift 16-bit data by 8 (not clip, IM-6), stretch anything else."""
    arr = arr.astype(np.int64)
    lo, hi = int(arr.min()), int(arr.max())
    if lo >= 0 and hi <= 255:
        return _to_l(arr)
    if lo >= 0 and hi <= 65535:
        return _to_l(arr >> 8)
    return _to_l((arr - lo) * 255 // max(hi - lo, 1))


def _scale_float(arr: np.ndarray) -> Image.Image:
    """Mode "F": 0..1 data (the usual convention) or 0..255 kept, anything else stretched to 0..255."""
    arr = np.nan_to_num(arr.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = float(arr.min()), float(arr.max())
    if lo >= 0 and hi <= 1:
        return _to_l(np.rint(arr * 255))
    if lo >= 0 and hi <= 255:
        return _to_l(np.rint(arr))
    return _to_l(np.rint((arr - lo) * 255 / max(hi - lo, 1e-12)))


def _cmyk_to_rgb(im: Image.Image, name: str, warns: list[str]) -> Image.Image:
    """Use the embedded ICC profile when there is one: a naive CMYK->RGB conversion shifts colours badly."""
    icc = im.info.get("icc_profile")
    if icc:
        try:
            from PIL import ImageCms  # optional: Pillow may be built without littlecms

            src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            return ImageCms.profileToProfile(im, src, ImageCms.createProfile("sRGB"), outputMode="RGB")
        except Exception as e:  # a broken profile is the file's fault, not a reason to refuse the picture
            warns.append(f"{name}: its CMYK colour profile could not be applied ({e}); colours may be off.")
    return im.convert("RGB")


def _normalize(im: Image.Image, name: str, background: tuple[int, int, int], warns: list[str]) -> Image.Image:
    """Mode table (IM-6): every mode ends as RGB; transparency is composited, never left to turn black."""
    mode = im.mode
    if mode == "CMYK":
        return _cmyk_to_rgb(im, name, warns)
    if mode.startswith("I;16"):
        return (_to_l(np.asarray(im).astype(np.uint16) >> 8)).convert("RGB")
    if mode == "I":
        return _scale_int(np.asarray(im)).convert("RGB")
    if mode == "F":
        return _scale_float(np.asarray(im)).convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info:
        rgba = im.convert("RGBA")
        base = Image.new("RGBA", im.size, (*background, 255))
        return Image.alpha_composite(base, rgba).convert("RGB")
    return im.convert("RGB")  # RGB (copy), L, 1, P, YCbCr


def load_image(
    path: str | Path,
    *,
    max_pixels: int = 40_000_000,
    max_side: int = 8192,
    background: tuple[int, int, int] = (255, 255, 255),
    animated: str = "first_frame_warn",
) -> tuple[Image.Image, list[str]]:
    """Open an untrusted image and return (fully loaded RGB image without metadata, warnings).

    Only PNG, JPEG and WEBP are accepted, judged by content (IM-1). The size is checked from the header before
    decoding (IM-2); the file is verified, reopened and fully decoded (IM-3); EXIF orientation is applied
    (IM-5) and the mode normalized (IM-6). Animated files use frame 0 with a warning, or are refused with
    `animated="reject"` (IM-7). Raises ImageRejected naming the file and what to do.
    """
    if animated not in _ANIMATED_POLICIES:
        raise ValueError(f"animated must be one of {_ANIMATED_POLICIES}, not {animated!r}")
    name = Path(path).name
    _require_regular_file(path, name)
    try:
        with open(path, "rb") as fp:
            head = fp.read(64)
    except OSError as e:
        raise ImageRejected(name, f"cannot be read ({e.strerror or e})", "Check the file and upload it again.")
    fmt = _sniff(head)
    if not head:
        raise ImageRejected(name, "is empty", _USE_ALLOWED)
    if fmt not in ALLOWED_FORMATS:
        raise ImageRejected(name, f"unsupported format ({fmt}, whatever the file name says)", _USE_ALLOWED)
    too_big = f"Resize it to at most {max_side} px per side and {max_pixels / 1e6:g} megapixels, then upload it again"

    warns: list[str] = []
    # catch_warnings is process-wide, so another thread could briefly lose this filter; the explicit
    # max_pixels check below (stricter than Pillow's bomb limit) is what really guards, this is a backstop.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.simplefilter("error", Image.DecompressionBombWarning)  # IM-2: a bomb warning is a refusal
        with open(path, "rb") as fp:
            try:
                im = Image.open(fp, formats=ALLOWED_FORMATS)
            except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
                raise ImageRejected(name, f"is too large to decode safely ({e})", too_big) from None
            except Exception as e:  # UnidentifiedImageError and friends: header of a known format is broken
                kind = "header is unreadable" if isinstance(e, UnidentifiedImageError) else type(e).__name__
                raise ImageRejected(name, f"is a corrupt {fmt} file ({kind})", _REEXPORT) from None
            w, h = im.size  # from the header only: nothing is decoded yet
            if w <= 0 or h <= 0:
                raise ImageRejected(name, f"has no pixels ({w}x{h})", _REEXPORT)
            if w * h > max_pixels or max(w, h) > max_side:
                raise ImageRejected(name, f"is {w}x{h} pixels, too large", too_big)
            frames = getattr(im, "n_frames", 1)
            # Phone photos are often MPO (a JPEG plus depth/preview images): not animation, frame 0 is the photo.
            if frames > 1 and im.format != "MPO":
                if animated == "reject":
                    advice = "Export a single frame as PNG and upload that."
                    raise ImageRejected(name, f"is animated ({frames} frames)", advice)
                warns.append(f"{name} is animated ({frames} frames); only the first frame is used.")
            try:
                im.verify()  # checks what the plugin can (PNG CRCs) without decoding
                fp.seek(0)
                im = Image.open(fp, formats=ALLOWED_FORMATS)  # verify() leaves the object unusable: reopen
                if im.size != (w, h):
                    raise ValueError("size changed between reads")
                im.load()  # full decode now, so truncation shows up at upload and never in training
                if fmt == "JPEG" and not _jpeg_has_end(path):
                    raise OSError("image file is truncated (no end-of-image marker)")
            except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
                raise ImageRejected(name, f"is too large to decode safely ({e})", too_big) from None
            except Exception as e:  # OSError "truncated", SyntaxError from verify, zlib errors, ...
                problem = f"is corrupt or truncated ({type(e).__name__}: {str(e)[:120]})"
                raise ImageRejected(name, problem, _REEXPORT) from None
        try:
            im = ImageOps.exif_transpose(im)
        except Exception as e:  # bad EXIF should not cost the user the picture
            warns.append(f"{name}: its EXIF orientation could not be read ({type(e).__name__}); used as stored.")
        try:
            out = _normalize(im, name, background, warns)
        except Exception as e:
            raise ImageRejected(name, f"has an unsupported colour mode {im.mode} ({e})", _REEXPORT) from None
    # Pillow reports oddities (e.g. "Truncated File Read" in a text chunk) as UserWarning: show them to the user.
    warns += [f"{name}: {c.message}" for c in caught if issubclass(c.category, UserWarning)]
    out.info = {}  # strip EXIF/ICC/text so nothing leaks into the stored copy (IM-3, IM-9)
    return out, warns


def ingest_dataset(
    paths: Iterable[str | Path],
    out_dir: str | Path,
    *,
    resolution: int,
    max_images: int = 200,
    max_total_bytes: int = 500 * 2**20,
    **load_options,
) -> IngestReport:
    """Load every file with `load_image` and store the usable ones as clean PNGs in `out_dir`.

    Files are named by the sha256 of the PNG bytes. Bad files are listed in `rejected` and skipped; duplicates
    (same decoded pixels) are removed and images whose smaller side is below resolution/2 are kept, both with
    a notice (IM-8). `max_images` and `max_total_bytes` (uploaded bytes of kept files) bound the dataset.
    `load_options` go to `load_image`. Raises ImageRejected only if no image is usable.
    """
    if resolution <= 0:
        raise ValueError(f"resolution must be positive, not {resolution}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    kept: list[Path] = []
    sources: list[int] = []
    rejected: list[tuple[str, str]] = []
    notices: list[str] = []
    seen: dict[str, str] = {}  # pixel hash -> first file name with those pixels
    total = 0
    for index, raw in enumerate(paths):
        src = Path(raw)
        name = src.name
        if len(kept) >= max_images:
            rejected.append((name, f"the dataset already has the maximum of {max_images} images. Remove some first."))
            continue
        try:
            size = src.stat().st_size
        except OSError as e:
            rejected.append((name, f"cannot be read ({e.strerror or e}). Check the file and upload it again."))
            continue
        if total + size > max_total_bytes:  # checked before decoding: a huge upload costs no CPU
            limit = max_total_bytes / 2**20
            rejected.append((name, f"would take the dataset over {limit:g} MiB. Use smaller files or fewer images."))
            continue
        try:
            img, warns = load_image(src, **load_options)
        except ImageRejected as e:
            rejected.append((name, e.reason))
            continue
        notices.extend(warns)
        pixel_hash = hashlib.sha256(f"{img.size}".encode() + img.tobytes()).hexdigest()
        if pixel_hash in seen:
            notices.append(f"{name} is a duplicate of {seen[pixel_hash]} (same pixels); removed it.")
            continue
        seen[pixel_hash] = name
        total += size
        if min(img.size) < resolution / 2:
            notices.append(
                f"{name} is only {img.size[0]}x{img.size[1]}, below half the training resolution ({resolution}); "
                "it will be upscaled and may look blurry. A larger version would train better."
            )
        buf = io.BytesIO()
        img.save(buf, "PNG")  # info was cleared in load_image, so no EXIF, ICC or text chunks are written
        data = buf.getvalue()
        dest = out / f"{hashlib.sha256(data).hexdigest()}.png"
        atomic_write_bytes(dest, data)
        kept.append(dest)
        sources.append(index)
    if not kept:
        names = ", ".join(n for n, _ in rejected[:5]) or "dataset"
        details = "; ".join(f"{n}: {r}" for n, r in rejected[:5]) or "no files were given"
        raise ImageRejected(names, f"no usable images ({details})", "Add PNG, JPEG or WEBP images and try again.")
    return IngestReport(kept=kept, rejected=rejected, notices=notices, sources=sources)
