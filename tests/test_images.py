"""read_rgb and file_digest on real tiles and on images made here for every pixel format and failure."""

from __future__ import annotations

import hashlib
import io
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from histomil.data.images import file_digest, read_rgb, sniff_format
from histomil.errors import BadTileError, HistomilError


@pytest.fixture(scope="module")
def jpeg_path(shared_data: Path) -> Path:
    return shared_data / "ebhi" / "tiles" / "Normal" / "GT2000000-1-400-001.jpg"


@pytest.fixture(scope="module")
def rgb(jpeg_path: Path) -> np.ndarray:
    return np.asarray(Image.open(jpeg_path).convert("RGB"))


def _bad(path: Path, *words: str) -> str:
    with pytest.raises(BadTileError) as info:
        read_rgb(path)
    message = str(info.value)
    assert str(path) in message and "\n" not in message
    for word in words:
        assert word in message.lower(), message
    return message


def _png_bytes(arr: np.ndarray, bit_depth: int, colour_type: int) -> bytes:
    """A PNG written by hand (Pillow cannot write 48-bit RGB)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    h, w = arr.shape[:2]
    raw = b"".join(b"\0" + arr[i].astype(">u2" if bit_depth == 16 else np.uint8).tobytes() for i in range(h))
    header = struct.pack(">IIBBBBB", w, h, bit_depth, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def _tiff48_bytes(arr: np.ndarray) -> bytes:
    """A minimal uncompressed 16-bit-per-channel RGB TIFF written by hand."""
    h, w, _ = arr.shape
    pixels = arr.astype("<u2").tobytes()
    n = 10
    ifd = 8
    bps = ifd + 2 + n * 12 + 4
    data = bps + 6
    entries = [(256, 3, 1, w), (257, 3, 1, h), (258, 3, 3, bps), (259, 3, 1, 1), (262, 3, 1, 2), (273, 4, 1, data),
               (277, 3, 1, 3), (278, 3, 1, h), (279, 4, 1, len(pixels)), (284, 3, 1, 1)]
    out = b"II*\0" + struct.pack("<IH", ifd, n)
    for tag, kind, count, value in entries:
        packed = struct.pack("<HH", value, 0) if kind == 3 and count == 1 else struct.pack("<I", value)
        out += struct.pack("<HHI", tag, kind, count) + packed
    return out + struct.pack("<I", 0) + struct.pack("<HHH", 16, 16, 16) + pixels


# ------------------------------------------------------------------------------------------- good


def test_real_jpeg_decodes_like_pillow(jpeg_path, rgb):
    out = read_rgb(jpeg_path)
    assert out.shape == (224, 224, 3) and out.dtype == np.uint8
    assert np.array_equal(out, rgb)


def test_png_and_tiff_roundtrip_exactly(tmp_path, rgb):
    Image.fromarray(rgb).save(tmp_path / "a.png")
    Image.fromarray(rgb).save(tmp_path / "a.TIF")  # upper-case extension, LZW-free default
    Image.fromarray(rgb).save(tmp_path / "b.tiff", compression="tiff_lzw")
    for name in ("a.png", "a.TIF", "b.tiff"):
        assert np.array_equal(read_rgb(tmp_path / name), rgb), name


def test_content_wins_over_extension(tmp_path, rgb, jpeg_path):
    Image.fromarray(rgb).save(tmp_path / "x.png")
    shutil.copy(tmp_path / "x.png", tmp_path / "png_named.jpg")
    shutil.copy(jpeg_path, tmp_path / "jpeg_named.png")
    assert np.array_equal(read_rgb(tmp_path / "png_named.jpg"), rgb)
    assert np.array_equal(read_rgb(tmp_path / "jpeg_named.png"), rgb)
    assert sniff_format((tmp_path / "png_named.jpg").read_bytes()) == "PNG"


def test_grayscale_palette_and_bilevel_become_rgb(tmp_path, rgb):
    gray = Image.fromarray(rgb).convert("L")
    gray.save(tmp_path / "g.png")
    gray.save(tmp_path / "g.jpg", quality=100)
    out = read_rgb(tmp_path / "g.png")
    assert out.shape == (224, 224, 3)
    assert np.array_equal(out[..., 0], np.asarray(gray)) and np.array_equal(out[..., 0], out[..., 2])
    out_jpg = read_rgb(tmp_path / "g.jpg")
    assert np.abs(out_jpg[..., 1].astype(int) - np.asarray(gray)).mean() < 1.0
    pal = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=32)
    pal.save(tmp_path / "p.png")
    assert np.array_equal(read_rgb(tmp_path / "p.png"), np.asarray(pal.convert("RGB")))
    bits = Image.fromarray((np.arange(64).reshape(8, 8) % 2 * 255).astype(np.uint8)).convert("1")
    bits.save(tmp_path / "b.png")
    out = read_rgb(tmp_path / "b.png")
    assert set(np.unique(out)) == {0, 255} and out[0, 1, 0] == 255 and out[0, 0, 0] == 0


def test_opaque_alpha_is_dropped(tmp_path, rgb):
    Image.fromarray(rgb).convert("RGBA").save(tmp_path / "rgba.png")
    assert np.array_equal(read_rgb(tmp_path / "rgba.png"), rgb)
    gray = Image.fromarray(rgb).convert("L")
    gray.convert("LA").save(tmp_path / "la.png")
    assert np.array_equal(read_rgb(tmp_path / "la.png")[..., 1], np.asarray(gray))
    # palette with a transparent index that no pixel uses: still fully opaque
    pal = Image.fromarray(np.full((4, 4), 1, np.uint8), mode="L").convert("P")
    pal.save(tmp_path / "pt.png", transparency=0)
    assert Image.open(tmp_path / "pt.png").info.get("transparency") == 0
    assert np.array_equal(read_rgb(tmp_path / "pt.png"), np.full((4, 4, 3), 1, np.uint8))


def test_cmyk_jpeg_and_tiff(tmp_path, rgb):
    cmyk = Image.fromarray(rgb).convert("CMYK")
    cmyk.save(tmp_path / "c.jpg", quality=95)
    cmyk.save(tmp_path / "c.tif")
    assert np.array_equal(read_rgb(tmp_path / "c.tif"), np.asarray(cmyk.convert("RGB")))
    out = read_rgb(tmp_path / "c.jpg")
    assert out.shape == (224, 224, 3) and np.abs(out.astype(int) - rgb).mean() < 3.0


# -------------------------------------------------------------------------------------------- bad


def test_missing_empty_and_not_an_image(tmp_path):
    _bad(tmp_path / "nope.jpg", "not found")
    (tmp_path / "empty.jpg").write_bytes(b"")
    _bad(tmp_path / "empty.jpg", "empty", "0 bytes")
    (tmp_path / "text.jpg").write_text("hello, this is not a picture\n")
    _bad(tmp_path / "text.jpg", "not an image")
    Image.new("RGB", (4, 4)).save(tmp_path / "g.gif")
    shutil.copy(tmp_path / "g.gif", tmp_path / "gif_named.png")
    _bad(tmp_path / "gif_named.png", "gif")
    (tmp_path / "folder.png").mkdir()
    _bad(tmp_path / "folder.png", "folder")


def test_truncated_jpeg_and_png(tmp_path, jpeg_path, rgb):
    data = jpeg_path.read_bytes()
    (tmp_path / "half.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "no_eoi.jpg").write_bytes(data[:-2])
    (tmp_path / "header_only.jpg").write_bytes(data[:300])
    _bad(tmp_path / "half.jpg", "truncated")
    _bad(tmp_path / "no_eoi.jpg", "truncated")
    _bad(tmp_path / "header_only.jpg", "jpeg")
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "PNG")
    png = buf.getvalue()
    (tmp_path / "half.png").write_bytes(png[: len(png) // 2])
    (tmp_path / "tiny.png").write_bytes(png[:20])
    _bad(tmp_path / "half.png", "truncated")
    _bad(tmp_path / "tiny.png", "png")


def test_truncation_detected_even_if_pillow_is_lenient(tmp_path, rgb, monkeypatch):
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "PNG")
    png = buf.getvalue()
    (tmp_path / "half.png").write_bytes(png[: len(png) // 2])
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    _bad(tmp_path / "half.png", "truncated")
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # the caller's setting is restored


def test_corrupt_jpeg_data_is_not_hidden_by_fallback(tmp_path, jpeg_path):
    data = bytearray(jpeg_path.read_bytes())
    mid = len(data) // 2
    for i in range(mid, mid + 200):
        data[i] = (data[i] * 7 + 3) % 256
    (tmp_path / "corrupt.jpg").write_bytes(bytes(data))
    _bad(tmp_path / "corrupt.jpg", "corrupt")


def test_transparency_is_refused(tmp_path, rgb):
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])
    rgba[10, 10, 3] = 0
    rgba[11, 10, 3] = 128
    Image.fromarray(rgba).save(tmp_path / "t.png")
    assert "2 of 50176 pixels" in _bad(tmp_path / "t.png", "transparent")
    la = np.dstack([rgb[..., 0], np.full(rgb.shape[:2], 255, np.uint8)])
    la[0, 0, 1] = 0
    Image.fromarray(la, mode="LA").save(tmp_path / "la.png")
    _bad(tmp_path / "la.png", "transparent")
    pal = Image.fromarray(np.array([[0, 1], [1, 1]], np.uint8), mode="L").convert("P")
    pal.save(tmp_path / "pt.png", transparency=0)  # index 0 is used by one pixel
    _bad(tmp_path / "pt.png", "1 of 4 pixels", "transparent")


def test_sixteen_bit_and_float_are_refused(tmp_path):
    gray16 = (np.arange(32 * 32).reshape(32, 32) * 50).astype(np.uint16)
    Image.fromarray(gray16).save(tmp_path / "g16.png")
    Image.fromarray(gray16).save(tmp_path / "g16.tif")
    rgb16 = (np.arange(6 * 5 * 3).reshape(6, 5, 3) * 1000).astype(np.uint16)
    (tmp_path / "rgb48.png").write_bytes(_png_bytes(rgb16, 16, 2))
    rgba16 = np.concatenate([rgb16, np.full((6, 5, 1), 65535, np.uint16)], axis=2)
    (tmp_path / "rgba64.png").write_bytes(_png_bytes(rgba16, 16, 6))
    (tmp_path / "rgb48.tif").write_bytes(_tiff48_bytes(rgb16))
    # Pillow on its own reads these two as 8-bit RGB without a word: that is what must not happen
    assert Image.open(tmp_path / "rgb48.png").mode == "RGB"
    assert Image.open(tmp_path / "rgb48.tif").mode == "RGB"
    for name in ("g16.png", "g16.tif", "rgb48.png", "rgba64.png", "rgb48.tif"):
        _bad(tmp_path / name, "16", "8-bit rgb")
    Image.fromarray(np.random.default_rng(0).random((8, 8)).astype(np.float32)).save(tmp_path / "f.tif")
    _bad(tmp_path / "f.tif", "floating-point", "8-bit rgb")
    Image.fromarray(np.arange(16, dtype=np.int32).reshape(4, 4)).save(tmp_path / "i32.tif")
    _bad(tmp_path / "i32.tif", "8-bit rgb")


def test_eight_bit_png_header_passes(tmp_path):
    arr = (np.arange(6 * 5 * 3).reshape(6, 5, 3) * 3).astype(np.uint8)
    (tmp_path / "rgb24.png").write_bytes(_png_bytes(arr, 8, 2))
    assert np.array_equal(read_rgb(tmp_path / "rgb24.png"), arr)


def test_multipage_tiff_is_refused(tmp_path, rgb):
    pages = [Image.fromarray(rgb), Image.fromarray(rgb[::-1])]
    pages[0].save(tmp_path / "m.tif", save_all=True, append_images=pages[1:])
    _bad(tmp_path / "m.tif", "2 pages")


def test_file_digest(tmp_path, jpeg_path):
    shutil.copy(jpeg_path, tmp_path / "a.jpg")
    shutil.copy(jpeg_path, tmp_path / "b.jpg")
    digest = file_digest(tmp_path / "a.jpg")
    assert len(digest) == 32 and int(digest, 16) >= 0
    assert digest == file_digest(tmp_path / "b.jpg")
    assert digest == hashlib.blake2b(jpeg_path.read_bytes(), digest_size=16).hexdigest()
    with open(tmp_path / "b.jpg", "ab") as f:
        f.write(b"\0")
    assert file_digest(tmp_path / "b.jpg") != digest
    with pytest.raises(HistomilError, match="missing.jpg: file not found"):
        file_digest(tmp_path / "missing.jpg")
