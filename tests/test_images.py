"""Tests for engine/core/images.py (RELIABILITY.md IM-1..IM-3, IM-5..IM-8, IM-10)."""
from __future__ import annotations

import hashlib
import io
import resource
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from PIL import Image, ImageCms, ImageFile, PngImagePlugin

from engine.core import images as images
from engine.core.images import ImageRejected, IngestReport, ingest_dataset, load_image


def save(im: Image.Image, path: Path, fmt: str | None = None, **kw) -> Path:
    im.save(path, format=fmt, **kw)
    return path


def noise(w: int, h: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    return Image.fromarray(arr, "RGB").convert(mode)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header_only(w: int, h: int) -> bytes:
    """A PNG that *declares* w x h but holds only a few compressed rows: a decompression-bomb stand-in."""
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    rows = zlib.compress(b"\0" * (1 + 3 * min(w, 4096)) * 4, 9)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", rows) + _chunk(b"IEND", b"")


def rejected(path: Path, match: str, **kw) -> ImageRejected:
    with pytest.raises(ImageRejected, match=match) as exc:
        load_image(path, **kw)
    assert path.name in str(exc.value)  # the message always names the file ...
    assert exc.value.advice  # ... and says what to do
    return exc.value


# ---------------------------------------------------------------- IM-2: size limits before decoding

def test_20000_square_png_bomb_rejected_fast_and_small(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(png_header_only(20000, 20000))
    assert path.stat().st_size < 8192
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    start = time.perf_counter()
    err = rejected(path, "too large")
    assert time.perf_counter() - start < 1.0
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before < 100 * 1024  # decoding needs 1.2 GB
    assert "Resize it" in str(err)


@pytest.mark.parametrize("w,h", [(7000, 7000), (9000, 10)])  # over 40 MP (below Pillow's own limit); side > 8192
def test_app_limits_checked_from_header(tmp_path, w, h):
    path = tmp_path / "big.png"
    path.write_bytes(png_header_only(w, h))  # only the header is valid: load() would fail, so it must not run
    rejected(path, f"{w}x{h} pixels, too large")


def test_custom_limits(tmp_path):
    path = save(noise(64, 32), tmp_path / "a.png")
    rejected(path, "too large", max_pixels=1000)
    rejected(path, "too large", max_side=50)
    assert load_image(path, max_pixels=2048, max_side=64)[0].size == (64, 32)


# ---------------------------------------------------------------- IM-1: formats by content

@pytest.mark.parametrize("fmt,detected", [("TIFF", "TIFF"), ("GIF", "GIF"), ("BMP", "BMP")])
def test_other_formats_refused_even_named_png(tmp_path, fmt, detected):
    path = save(noise(8, 8), tmp_path / "photo.png", fmt)
    err = rejected(path, f"unsupported format \\({detected}")
    assert "PNG, JPEG or WEBP" in str(err)


@pytest.mark.parametrize("content", [b"<!DOCTYPE html><html><body>hi</body></html>",
                                     b'\xef\xbb\xbf<svg xmlns="http://www.w3.org/2000/svg"/>',
                                     b"%PDF-1.7\n", b"just some text"])
def test_markup_and_junk_refused(tmp_path, content):
    path = tmp_path / "image.png"
    path.write_bytes(content)
    rejected(path, "unsupported format")


def test_empty_and_missing(tmp_path):
    (tmp_path / "e.jpg").write_bytes(b"")
    rejected(tmp_path / "e.jpg", "empty")
    rejected(tmp_path / "nope.png", "cannot be read")


def test_invalid_animated_policy(tmp_path):
    with pytest.raises(ValueError, match="animated must be"):
        load_image(save(noise(4, 4), tmp_path / "a.png"), animated="sometimes")


# ---------------------------------------------------------------- IM-3: full decode, corrupt files

@pytest.mark.parametrize("lenient", [False, True])  # True: some trainer set Pillow's global lenient flag
def test_truncated_jpeg_rejected_with_name(tmp_path, monkeypatch, lenient):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", lenient)
    data = io.BytesIO()
    noise(256, 256).save(data, "JPEG", quality=95)
    path = tmp_path / "holiday.jpg"
    path.write_bytes(data.getvalue()[: len(data.getvalue()) // 2])
    err = rejected(path, "corrupt or truncated")
    assert str(err).startswith("holiday.jpg: ")


def test_truncated_and_bad_crc_png_rejected(tmp_path):
    data = io.BytesIO()
    noise(64, 64).save(data, "PNG")
    raw = data.getvalue()
    (tmp_path / "cut.png").write_bytes(raw[: len(raw) - 200])
    rejected(tmp_path / "cut.png", "corrupt or truncated")
    i = raw.index(b"IDAT") + 20
    (tmp_path / "crc.png").write_bytes(raw[:i] + bytes([raw[i] ^ 0xFF]) + raw[i + 1:])
    rejected(tmp_path / "crc.png", "corrupt")


def test_returned_image_is_loaded_rgb_without_metadata(tmp_path):
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "secret prompt")
    path = save(noise(16, 16), tmp_path / "m.png", pnginfo=info, dpi=(300, 300))
    img, warns = load_image(path)
    path.unlink()  # fully loaded: the file is no longer needed
    assert img.mode == "RGB" and img.info == {} and warns == []
    assert np.asarray(img).shape == (16, 16, 3)


# ---------------------------------------------------------------- IM-5: EXIF orientation

def test_exif_orientation_6_is_applied(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    src = Image.new("RGB", (40, 20), (200, 30, 30))
    src.paste((30, 30, 200), (0, 0, 10, 20))  # blue strip on the left edge
    path = save(src, tmp_path / "phone.jpg", "JPEG", exif=exif.tobytes(), quality=95)
    img, _ = load_image(path)
    assert img.size == (20, 40)
    assert img.getpixel((10, 2))[2] > 150  # left strip rotated clockwise ends up at the top
    report = ingest_dataset([path], tmp_path / "ds", resolution=32)
    stored = Image.open(report.kept[0])
    assert stored.size == (20, 40) and "exif" not in stored.info


# ---------------------------------------------------------------- IM-6: mode normalization table

def test_rgba_transparent_composited_to_white_not_black(tmp_path):
    path = save(Image.new("RGBA", (8, 8), (0, 0, 0, 0)), tmp_path / "t.png")
    assert load_image(path)[0].getpixel((0, 0)) == (255, 255, 255)
    assert load_image(path, background=(10, 20, 30))[0].getpixel((0, 0)) == (10, 20, 30)
    half = save(Image.new("RGBA", (8, 8), (0, 0, 0, 128)), tmp_path / "h.webp", lossless=True)
    assert abs(load_image(half)[0].getpixel((0, 0))[0] - 127) <= 2


@pytest.mark.parametrize("make", [
    lambda p: save(Image.new("LA", (8, 8), (0, 0)), p),
    lambda p: save(Image.new("P", (8, 8), 0), p, transparency=0),
    lambda p: save(Image.new("L", (8, 8), 0), p, transparency=0),
    lambda p: save(Image.new("RGB", (8, 8), (0, 0, 0)), p, transparency=(0, 0, 0)),
], ids=["LA", "P+tRNS", "L+tRNS", "RGB+tRNS"])
def test_other_transparency_composited(tmp_path, make):
    img, _ = load_image(make(tmp_path / "x.png"))
    assert img.mode == "RGB" and img.getpixel((3, 3)) == (255, 255, 255)


def test_i16_ramp_keeps_256_levels(tmp_path):
    ramp = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    path = save(Image.fromarray(ramp), tmp_path / "depth16.png")
    assert Image.open(path).mode.startswith("I;16")
    arr = np.asarray(load_image(path)[0])
    assert len(np.unique(arr[..., 0])) == 256 and arr.min() == 0 and arr.max() == 255
    assert (arr[..., 0] == arr[..., 1]).all() and (arr[0, :, 0] == 0).all()  # 256 px per level: row 0 = level 0


def test_int_and_float_modes_scaled():
    warns: list[str] = []
    i16 = Image.fromarray(np.array([[0, 32768, 65535]], dtype=np.int32), "I")
    assert list(np.asarray(images._normalize(i16, "x", (255,) * 3, warns))[0, :, 0]) == [0, 128, 255]
    i8 = Image.fromarray(np.array([[0, 100, 255]], dtype=np.int32), "I")
    assert list(np.asarray(images._normalize(i8, "x", (255,) * 3, warns))[0, :, 0]) == [0, 100, 255]
    f = Image.fromarray(np.array([[0.0, 0.5, 1.0, np.nan]], dtype=np.float32), "F")
    assert list(np.asarray(images._normalize(f, "x", (255,) * 3, warns))[0, :, 0]) == [0, 128, 255, 0]
    wide = Image.fromarray(np.array([[-5.0, 995.0]], dtype=np.float32), "F")
    assert list(np.asarray(images._normalize(wide, "x", (255,) * 3, warns))[0, :, 0]) == [0, 255]


@pytest.mark.parametrize("mode,fmt", [("L", "PNG"), ("L", "JPEG"), ("1", "PNG"), ("P", "PNG"), ("LA", "WEBP")])
def test_grayscale_and_palette_become_rgb(tmp_path, mode, fmt):
    img, _ = load_image(save(noise(16, 16, mode=mode), tmp_path / f"g.{fmt.lower()}", fmt))
    assert img.mode == "RGB" and img.size == (16, 16)


def test_cmyk_becomes_rgb(tmp_path):
    path = save(Image.new("CMYK", (8, 8), (255, 0, 0, 0)), tmp_path / "print.jpg", "JPEG", quality=100)
    img, warns = load_image(path)
    r, g, b = img.getpixel((4, 4))
    assert img.mode == "RGB" and r < 20 and g > 235 and b > 235 and warns == []  # pure cyan


def test_cmyk_uses_icc_profile_and_survives_a_broken_one(tmp_path, monkeypatch):
    path = save(Image.new("CMYK", (8, 8), (0, 255, 0, 0)), tmp_path / "icc.jpg", "JPEG", icc_profile=b"not icc")
    img, warns = load_image(path)  # a broken profile falls back to the plain conversion, with a warning
    assert img.mode == "RGB" and any("colour profile" in w for w in warns)
    calls = []
    monkeypatch.setattr(ImageCms, "ImageCmsProfile", lambda f: ("src", f.read()))

    def fake_transform(im, src, dst, outputMode):
        calls.append((src, outputMode))
        return Image.new("RGB", im.size, (1, 2, 3))

    monkeypatch.setattr(ImageCms, "profileToProfile", fake_transform)
    img, warns = load_image(path)
    assert calls == [(("src", b"not icc"), "RGB")] and img.getpixel((0, 0)) == (1, 2, 3) and warns == []


# ---------------------------------------------------------------- IM-7: animated images, both policies

@pytest.mark.parametrize("fmt,ext", [("WEBP", "webp"), ("PNG", "png")])  # animated WEBP and APNG
def test_animated_policy_both_ways(tmp_path, fmt, ext):
    frames = [Image.new("RGB", (16, 16), c) for c in ((250, 0, 0), (0, 0, 250), (0, 250, 0))]
    path = save(frames[0], tmp_path / f"anim.{ext}", fmt, save_all=True, append_images=frames[1:], duration=100,
                **({"lossless": True} if fmt == "WEBP" else {}))
    img, warns = load_image(path)
    assert img.getpixel((8, 8))[0] > 200  # frame 0
    assert len(warns) == 1 and "animated (3 frames)" in warns[0] and "first frame" in warns[0]
    rejected(path, "animated \\(3 frames\\)", animated="reject")


def test_mpo_phone_photo_is_not_animation(tmp_path):
    photo, depth = Image.new("RGB", (32, 32), (250, 0, 0)), Image.new("RGB", (16, 16), (0, 0, 250))
    path = save(photo, tmp_path / "IMG_0001.jpg", "MPO", save_all=True, append_images=[depth])
    img, warns = load_image(path, animated="reject")
    assert img.size == (32, 32) and img.getpixel((5, 5))[0] > 200 and warns == []


# ---------------------------------------------------------------- IM-8 / IM-3: dataset ingest

def test_ingest_keeps_good_skips_bad_dedupes_and_warns(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    a = save(noise(64, 64, 1), src / "a.png")
    a_again = save(noise(64, 64, 1), src / "a_copy.webp", lossless=True)  # same pixels, other container
    tiny = save(noise(20, 40, 2), src / "tiny.jpg", "JPEG")
    tif = save(noise(8, 8), src / "scan.png", "TIFF")
    (src / "cut.jpg").write_bytes(a.read_bytes()[:100])
    report = ingest_dataset([a, a_again, tiny, tif, src / "cut.jpg"], tmp_path / "ds", resolution=64)
    assert isinstance(report, IngestReport)
    assert len(report.kept) == 2 and all(p.parent == tmp_path / "ds" for p in report.kept)
    assert [n for n, _ in report.rejected] == ["scan.png", "cut.jpg"]
    assert "unsupported format" in report.rejected[0][1] and "PNG, JPEG or WEBP" in report.rejected[0][1]
    assert any("a_copy.webp is a duplicate of a.png" in n for n in report.notices)
    assert any("tiny.jpg is only 20x40" in n and "half the training resolution" in n for n in report.notices)
    for p in report.kept:
        data = p.read_bytes()
        assert p.name == hashlib.sha256(data).hexdigest() + ".png"
        assert not any(tag in data for tag in (b"eXIf", b"tEXt", b"iTXt", b"zTXt", b"iCCP", b"pHYs"))
    with pytest.raises(AttributeError):
        report.kept = []  # frozen


def test_ingest_strips_metadata(tmp_path):
    exif = Image.Exif()
    exif[0x8825] = {2: (51.0, 30.0, 0.0)}  # GPS position in the source photo
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", "home address")
    path = save(noise(32, 32), tmp_path / "gps.png", exif=exif.tobytes(), pnginfo=info)
    assert b"eXIf" in path.read_bytes()
    kept = ingest_dataset([path], tmp_path / "ds", resolution=32).kept[0]
    assert Image.open(kept).info == {} and b"home address" not in kept.read_bytes()


def test_ingest_limits(tmp_path):
    paths = [save(noise(16, 16, seed), tmp_path / f"{seed}.png") for seed in range(4)]
    report = ingest_dataset(paths, tmp_path / "ds", resolution=16, max_images=2)
    assert len(report.kept) == 2 and [n for n, _ in report.rejected] == ["2.png", "3.png"]
    assert "maximum of 2 images" in report.rejected[0][1]
    size = paths[0].stat().st_size
    report = ingest_dataset(paths, tmp_path / "ds2", resolution=16, max_total_bytes=2 * size + size // 2)
    assert len(report.kept) == 2 and "MiB" in report.rejected[0][1]


def test_ingest_with_nothing_usable_raises(tmp_path):
    bad = tmp_path / "notes.png"
    bad.write_bytes(b"<html></html>")
    with pytest.raises(ImageRejected, match="notes.png.*no usable images.*Add PNG, JPEG or WEBP"):
        ingest_dataset([bad], tmp_path / "ds", resolution=64)
    with pytest.raises(ImageRejected, match="no usable images"):
        ingest_dataset([], tmp_path / "ds", resolution=64)


def test_ingest_forwards_animated_policy(tmp_path):
    frames = [Image.new("RGB", (16, 16), c) for c in ((250, 0, 0), (0, 0, 250))]
    path = save(frames[0], tmp_path / "a.webp", "WEBP", save_all=True, append_images=frames[1:])
    ok = save(noise(16, 16), tmp_path / "ok.png")
    report = ingest_dataset([path, ok], tmp_path / "ds", resolution=16, animated="reject")
    assert [n for n, _ in report.rejected] == ["a.webp"]


# ---------------------------------------------------------------- IM-10: fuzzing

def _seed_images() -> list[bytes]:
    out = []
    for fmt, kw in (("PNG", {}), ("JPEG", {"quality": 80}), ("WEBP", {"quality": 80})):
        buf = io.BytesIO()
        noise(12, 10, mode="RGBA" if fmt != "JPEG" else "RGB").save(buf, fmt, **kw)
        out.append(buf.getvalue())
    return out


SEEDS = _seed_images()


def _clean_outcome(path: Path):
    try:
        img, warns = load_image(path)
    except ImageRejected as e:
        assert path.name in str(e)
        return
    assert img.mode == "RGB" and img.size[0] * img.size[1] <= 40_000_000 and isinstance(warns, list)
    img.tobytes()


@settings(max_examples=100, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(blob=st.binary(max_size=300))
def test_fuzz_random_bytes(tmp_path, blob):
    path = tmp_path / "fuzz.png"
    path.write_bytes(blob)
    _clean_outcome(path)


@settings(max_examples=150, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.sampled_from(range(len(SEEDS))),
       edits=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=6),
       cut=st.integers(0, 10_000) | st.none())
def test_fuzz_mutated_images(tmp_path, seed, edits, cut):
    data = bytearray(SEEDS[seed])
    for pos, value in edits:
        data[pos % len(data)] = value
    path = tmp_path / "mut.img"
    path.write_bytes(bytes(data if cut is None else data[: cut % len(data)]))
    _clean_outcome(path)
