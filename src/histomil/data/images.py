"""Reading tile images as 8-bit RGB arrays, refusing anything that would be silently wrong.

Formats are recognised by content (magic bytes), not by extension. JPEG goes through
simplejpeg (libjpeg-turbo, fast) with a Pillow fallback for what simplejpeg cannot handle;
PNG and TIFF go through Pillow. Every problem is a one-line :class:`BadTileError` naming the
file: missing, empty, truncated or corrupt, not an image, or a pixel format that has no safe
8-bit RGB reading (transparency, 16-bit, floating point).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import simplejpeg
from PIL import Image, ImageFile

from histomil.errors import BadTileError, HistomilError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".tif", ".tiff")

_JPEG_MAGIC = b"\xff\xd8\xff"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_TIFF_MAGICS = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # classic and BigTIFF
_OTHER_MAGICS = ((b"GIF8", "GIF"), (b"BM", "BMP"), (b"\x00\x00\x00\x0cjP  ", "JPEG 2000"), (b"%PDF", "PDF"))

# libjpeg warnings that mean the compressed data is damaged: never fall back to a lenient decoder.
_JPEG_CORRUPTION = ("corrupt jpeg data", "premature end", "bogus", "invalid sos", "inconsistent progression",
                    "huffman", "arithmetic code", "invalid jpeg", "not a jpeg")

# Pillow modes that hold more than 8 bits per channel or floating-point values.
_DEEP_MODES = {"I", "F", "I;16", "I;16B", "I;16L", "I;16S", "I;16N", "I;16BS", "I;16LS", "I;32", "I;32B",
               "I;32L", "I;32S", "I;32BS", "I;32LS", "F;16", "F;32"}
_OPAQUE_MODES = {"1", "L", "P", "RGB", "RGBX", "CMYK", "YCbCr"}  # convert to RGB without loss of meaning
_ALPHA_MODES = {"LA", "PA", "RGBA"}

_CONVERT_HINT = "convert the tiles to 8-bit RGB first"
_flag_lock = threading.Lock()


def sniff_format(data: bytes) -> str | None:
    """'JPEG', 'PNG' or 'TIFF' from the first bytes of a file; None for anything else."""
    if data.startswith(_JPEG_MAGIC):
        return "JPEG"
    if data.startswith(_PNG_MAGIC):
        return "PNG"
    if data[:4] in _TIFF_MAGICS:
        return "TIFF"
    return None


def read_rgb(path: str | Path) -> np.ndarray:
    """Decode a JPEG, PNG or TIFF tile to a (H, W, 3) uint8 RGB array, or raise BadTileError."""
    path = Path(path)
    data = _read_bytes(path)
    fmt = sniff_format(data)
    if fmt is None:
        raise BadTileError(path, _not_an_image(data))
    if fmt == "JPEG":
        return _decode_jpeg(path, data)
    return _decode_pillow(path, data, fmt)


def file_digest(path: str | Path) -> str:
    """Content hash of a file (BLAKE2b, 16 bytes, 32 hex characters), read in chunks."""
    path = Path(path)
    digest = hashlib.blake2b(digest_size=16)
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    except FileNotFoundError:
        raise HistomilError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise HistomilError(f"{path}: is a folder, not a file") from None
    except OSError as e:
        raise HistomilError(f"{path}: cannot read ({e.strerror or e})") from None
    return digest.hexdigest()


def _read_bytes(path: Path) -> bytes:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise BadTileError(path, "file not found") from None
    except IsADirectoryError:
        raise BadTileError(path, "is a folder, not an image file") from None
    except OSError as e:
        raise BadTileError(path, f"cannot read ({e.strerror or e})") from None
    if not data:
        raise BadTileError(path, "empty file (0 bytes)")
    return data


def _not_an_image(data: bytes) -> str:
    for magic, name in _OTHER_MAGICS:
        if data.startswith(magic):
            return f"is a {name} file; tiles must be JPEG, PNG or TIFF images"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "is a WebP file; tiles must be JPEG, PNG or TIFF images"
    return "not an image (the content is not JPEG, PNG or TIFF, whatever the extension says)"


def _decode_jpeg(path: Path, data: bytes) -> np.ndarray:
    try:
        return simplejpeg.decode_jpeg(data, colorspace="RGB", strict=True)
    except Exception as e:  # noqa: BLE001  simplejpeg raises ValueError; anything else also means 'refused'
        message = str(e)
        if any(key in message.lower() for key in _JPEG_CORRUPTION):
            raise BadTileError(path, f"corrupt or truncated JPEG ({message})") from None
    # Formats simplejpeg refuses (unusual headers, colour spaces): Pillow, which still detects truncation.
    return _decode_pillow(path, data, "JPEG")


@contextlib.contextmanager
def _strict_pillow() -> Iterator[None]:
    """Make sure Pillow raises on truncated files even if someone set LOAD_TRUNCATED_IMAGES."""
    if not ImageFile.LOAD_TRUNCATED_IMAGES:
        yield
        return
    with _flag_lock:
        saved = ImageFile.LOAD_TRUNCATED_IMAGES
        ImageFile.LOAD_TRUNCATED_IMAGES = False
        try:
            yield
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES = saved


def _decode_pillow(path: Path, data: bytes, fmt: str) -> np.ndarray:
    if fmt == "PNG":
        _check_png_header(path, data)
    try:
        with _strict_pillow(), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # e.g. "Corrupt EXIF data": metadata only
            with Image.open(io.BytesIO(data), formats=(fmt,)) as im:
                frames = getattr(im, "n_frames", 1)
                if frames > 1:
                    raise BadTileError(path, f"{fmt} with {frames} pages/frames; a tile must be a single image")
                _check_depth(path, im, fmt)
                im.load()
                return _to_rgb(path, im)
    except BadTileError:
        raise
    except Image.DecompressionBombError as e:
        raise BadTileError(path, f"image too large to be a tile ({e})") from None
    except Image.UnidentifiedImageError:
        raise BadTileError(path, f"looks like {fmt} but cannot be decoded (corrupt header)") from None
    except Exception as e:  # noqa: BLE001  Pillow raises OSError, SyntaxError, ValueError, EOFError, ...
        raise BadTileError(path, f"corrupt or truncated {fmt} ({e})") from None


def _check_png_header(path: Path, data: bytes) -> None:
    """Refuse 16-bit PNGs from the IHDR chunk: Pillow reads 48/64-bit PNGs as 8-bit RGB(A) silently."""
    if len(data) < 33 or data[12:16] != b"IHDR":
        raise BadTileError(path, "truncated or corrupt PNG (no IHDR header)")
    bit_depth = data[24]
    if bit_depth > 8:
        raise BadTileError(path, f"{bit_depth}-bit PNG; {_CONVERT_HINT} "
                                 "(reading it as 8-bit would lose precision silently)")


def _check_depth(path: Path, im: Image.Image, fmt: str) -> None:
    """Refuse images with more than 8 bits per channel or floating-point samples."""
    if im.mode in _DEEP_MODES:
        kind = "floating-point" if im.mode.startswith("F") else "16-bit" if "16" in im.mode else "32-bit integer"
        raise BadTileError(path, f"{kind} image (Pillow mode {im.mode}); {_CONVERT_HINT}")
    if fmt == "TIFF":
        tags = getattr(im, "tag_v2", {})
        bits = tags.get(258, (8,))
        bits = bits if isinstance(bits, tuple) else (bits,)
        if any(int(b) > 8 for b in bits):
            raise BadTileError(path, f"{max(int(b) for b in bits)}-bit TIFF; {_CONVERT_HINT} "
                                     "(reading it as 8-bit would lose precision silently)")
        sample_format = tags.get(339, (1,))
        sample_format = sample_format if isinstance(sample_format, tuple) else (sample_format,)
        if 3 in sample_format:
            raise BadTileError(path, f"floating-point TIFF; {_CONVERT_HINT}")


def _to_rgb(path: Path, im: Image.Image) -> np.ndarray:
    mode = im.mode
    if mode in _OPAQUE_MODES and "transparency" not in im.info:
        rgb = im if mode == "RGB" else im.convert("RGB")
        return np.ascontiguousarray(np.asarray(rgb, dtype=np.uint8))
    if mode in _ALPHA_MODES or (mode in _OPAQUE_MODES and "transparency" in im.info):
        rgba = np.asarray(im.convert("RGBA"), dtype=np.uint8)
        transparent = int(np.count_nonzero(rgba[..., 3] != 255))
        if transparent:
            raise BadTileError(path, f"{transparent} of {rgba.shape[0] * rgba.shape[1]} pixels are (partly) "
                                     "transparent and the background colour is unknown; flatten the tiles "
                                     "onto their background first")
        return np.ascontiguousarray(rgba[..., :3])
    raise BadTileError(path, f"unsupported pixel format (Pillow mode {mode}); {_CONVERT_HINT}")
