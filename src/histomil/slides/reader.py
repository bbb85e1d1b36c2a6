"""Whole-slide image reading through OpenSlide, with the resolution made explicit.

:class:`Slide` wraps ``openslide.OpenSlide`` (Aperio .svs, Hamamatsu .ndpi/.vms, MIRAX .mrxs,
Leica .scn, Philips/Ventana/generic pyramidal TIFF, ...) and returns plain RGB ``uint8`` numpy
arrays, with transparent areas composited on white. The physical resolution (micrometres per pixel
at level 0) comes from the header or from the user's override; it is ``None`` when neither gives
it, and code that needs it must say so instead of guessing.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from typing_extensions import Self

from histomil.errors import HistomilError

#: Relative slack when comparing pyramid downsample factors: scanners store levels whose factor is
#: slightly off the nominal one (4443 / 2221 = 2.0005), which must still count as "2".
DOWNSAMPLE_TOLERANCE = 0.01


def _openslide() -> Any:
    """Import openslide lazily, so the rest of histomil works without it."""
    try:
        import openslide
    except (ImportError, OSError) as err:  # OSError: python package present, C library missing
        raise HistomilError(
            f"reading whole-slide images needs OpenSlide: pip install openslide-python openslide-bin ({err})"
        ) from None
    return openslide


def _positive_float(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if np.isfinite(number) and number > 0 else None


def rgba_to_rgb(rgba: np.ndarray) -> np.ndarray:
    """Composite a non-premultiplied RGBA ``uint8`` array on white (OpenSlide marks empty areas transparent)."""
    rgb = rgba[..., :3]
    alpha = rgba[..., 3:4]
    if alpha.min() == 255:
        return np.ascontiguousarray(rgb)
    a = alpha.astype(np.uint32)
    out = (rgb.astype(np.uint32) * a + 255 * (255 - a) + 127) // 255
    return out.astype(np.uint8)


class Slide:
    """An open whole-slide image: pyramid geometry, resolution and RGB region reads.

    Use :func:`open_slide` to create one; close it (or use it as a context manager) when done.
    """

    def __init__(self, path: Path, handle: Any, mpp_override: float | None = None) -> None:
        openslide = _openslide()
        self.path = path
        self._osr = handle
        props = handle.properties
        self.properties: dict[str, str] = dict(props)
        self.vendor: str | None = props.get(openslide.PROPERTY_NAME_VENDOR)
        mpp_x = _positive_float(props.get(openslide.PROPERTY_NAME_MPP_X))
        mpp_y = _positive_float(props.get(openslide.PROPERTY_NAME_MPP_Y))
        header = [m for m in (mpp_x, mpp_y) if m is not None]
        #: level-0 micrometres per pixel as the header states it (mean of x and y), or None.
        self.header_mpp: float | None = float(np.mean(header)) if header else None
        if mpp_override is not None and _positive_float(mpp_override) is None:
            raise HistomilError(f"{path}: the slide resolution override must be a positive number, got {mpp_override!r}")
        #: level-0 micrometres per pixel used for tiling: the override if given, else the header's.
        self.mpp: float | None = float(mpp_override) if mpp_override is not None else self.header_mpp
        self.objective_power: float | None = _positive_float(props.get(openslide.PROPERTY_NAME_OBJECTIVE_POWER))
        self.dimensions: tuple[int, int] = tuple(int(v) for v in handle.dimensions)  # type: ignore[assignment]
        self.level_count: int = int(handle.level_count)
        self.level_dimensions: tuple[tuple[int, int], ...] = tuple(
            (int(w), int(h)) for w, h in handle.level_dimensions
        )
        self.level_downsamples: tuple[float, ...] = tuple(float(d) for d in handle.level_downsamples)

    @property
    def name(self) -> str:
        return self.path.stem

    def level_mpp(self, level: int) -> float | None:
        """Micrometres per pixel at ``level`` (None when the slide resolution is unknown)."""
        return None if self.mpp is None else self.mpp * self.level_downsamples[level]

    def best_level_for_downsample(self, downsample: float, tolerance: float = DOWNSAMPLE_TOLERANCE) -> int:
        """The coarsest level whose downsample does not exceed ``downsample`` (within ``tolerance``).

        Reading from it and shrinking to the target never upsamples (beyond the tolerance).
        Level 0 when ``downsample`` is below every level's factor.
        """
        limit = float(downsample) * (1.0 + tolerance)
        best = 0
        for level, factor in enumerate(self.level_downsamples):
            if factor <= limit and factor >= self.level_downsamples[best]:
                best = level
        return best

    def read_region(self, level0_xy: tuple[int, int], level: int, size: tuple[int, int] | int) -> np.ndarray:
        """RGB ``uint8`` array (h, w, 3) of ``size`` pixels at ``level``, top-left at level-0 ``level0_xy``."""
        openslide = _openslide()
        if isinstance(size, (int, np.integer)):
            size = (int(size), int(size))
        if not 0 <= level < self.level_count:
            raise HistomilError(f"{self.path}: level {level} does not exist (the slide has {self.level_count})")
        x, y = (int(v) for v in level0_xy)
        w, h = (int(v) for v in size)
        try:
            region = self._osr.read_region((x, y), level, (w, h))
        except openslide.OpenSlideError as err:
            raise HistomilError(f"{self.path}: cannot read the region at ({x}, {y}) level {level}: {err}") from None
        return rgba_to_rgb(np.asarray(region))

    def thumbnail(self, max_size: int) -> np.ndarray:
        """RGB ``uint8`` overview whose longer side is at most ``max_size`` pixels (aspect ratio kept)."""
        openslide = _openslide()
        try:
            image = self._osr.get_thumbnail((int(max_size), int(max_size)))
        except (openslide.OpenSlideError, OSError, ValueError) as err:
            raise HistomilError(f"{self.path}: cannot read a thumbnail: {err}") from None
        return np.asarray(image.convert("RGB"))

    def close(self) -> None:
        self._osr.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"Slide({str(self.path)!r}, dims={self.dimensions}, levels={self.level_count}, "
            f"mpp={self.mpp}, objective={self.objective_power})"
        )


def open_slide(path: str | Path, mpp: float | None = None) -> Slide:
    """Open a whole-slide image; ``mpp`` overrides the level-0 micrometres per pixel of the header.

    Raises :class:`HistomilError` (one line naming the file) for a missing, corrupt or unsupported file.
    """
    openslide = _openslide()
    path = Path(path)
    if not path.exists():
        raise HistomilError(f"{path}: no such slide file")
    if path.is_dir():
        raise HistomilError(f"{path}: is a folder, not a slide file")
    try:
        handle = openslide.OpenSlide(str(path))
    except openslide.OpenSlideUnsupportedFormatError:
        raise HistomilError(
            f"{path}: OpenSlide cannot read it: corrupt, truncated or not a supported whole-slide format "
            "(.svs .ndpi .mrxs .scn .vms .bif, tiled pyramidal .tif ...)"
        ) from None
    except (openslide.OpenSlideError, OSError, ValueError) as err:
        raise HistomilError(f"{path}: corrupt or unreadable slide: {err}") from None
    try:
        return Slide(path, handle, mpp)
    except BaseException:
        handle.close()
        raise
