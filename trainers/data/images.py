"""Robust image reading for datasets: any common file becomes 8-bit RGB (plus its alpha as a mask).

Handled: EXIF/XMP orientation, CMYK (through the embedded ICC profile when there is one), embedded
non-sRGB RGB profiles, 16-bit grayscale (``I;16``/``I``: 0..65535 scaled to 0..255, not clipped),
16-bit RGB(A) PNGs (Pillow keeps the high byte), palette images with or without transparency,
``1``/``L``/``LA``/``RGBA``, and big images.

Big images: Pillow refuses (or warns about) images above ``Image.MAX_IMAGE_PIXELS`` (about 89.5
megapixels) as possible decompression bombs. Our own reads accept up to ``MAX_PIXELS``
(16384 x 16384 = 268 megapixels) and raise ``ImageTooLarge`` above it. Given a ``target`` size,
JPEGs are decoded at a reduced DCT scale (``Image.draft``) and other images are reduced by an
integer factor (``Image.reduce``) right after decoding, keeping at least twice the pixels the
target needs.

Broken files raise ``UnreadableImage`` (a ``ValueError``) naming the file and the reason. Every
read forces the decoder to finish (``load()``) with ``ImageFile.LOAD_TRUNCATED_IMAGES`` off, even
when other code switched it on (ComfyUI's ``node_helpers.pillow`` does so temporarily, some
custom nodes globally), so truncated files are reported instead of padded with grey.

No ComfyUI imports here: stdlib, PIL and numpy only.
"""
from __future__ import annotations

import io
import logging
import math
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

log = logging.getLogger("comfyui-personalize")

MAX_PIXELS = 16384 * 16384
"""Largest image (width x height, as stored in the file) our reads accept."""

WHITE = (255, 255, 255)

_ORIENTATION_TAG = 0x0112
_TRANSPOSE = {  # EXIF orientation -> the operation that shows the image upright
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_ALPHA_MODES = {"LA", "La", "RGBA", "RGBa", "PA"}
_SIXTEEN_BIT_GRAY = {"I;16", "I;16L", "I;16B", "I;16N"}
_UNSUPPORTED_MODES = {"LAB", "HSV"}  # Pillow's convert("RGB") from these is not a colour conversion
_READ_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, KeyError, TypeError,
                Image.DecompressionBombError, Image.DecompressionBombWarning)
_PIL_SETTINGS_LOCK = threading.RLock()


class UnreadableImage(ValueError):
    """An image file that cannot be used: corrupt, truncated, not an image, or unsupported."""

    def __init__(self, path: str | Path, reason: str):
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"cannot read image {self.path.name} ({reason}). Remove or replace {self.path}.")


class ImageTooLarge(UnreadableImage):
    """An image above ``MAX_PIXELS``."""


@dataclass(frozen=True)
class ImageInfo:
    """What ``inspect_image`` learned: ``size`` is (width, height) after EXIF orientation."""
    path: Path
    size: tuple[int, int]
    has_alpha: bool
    mode: str
    format: str | None


@contextmanager
def _reading_settings() -> Iterator[None]:
    """Our limits while we read: MAX_PIXELS instead of Pillow's bomb limit (we check it exactly
    ourselves) and truncated files as errors. Pillow reads both as module globals at call time, so
    they are set for the duration of the read, under a lock, and restored afterwards."""
    with _PIL_SETTINGS_LOCK:
        saved = Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES
        limit = saved[0]
        Image.MAX_IMAGE_PIXELS = None if limit is None else max(limit, MAX_PIXELS)
        ImageFile.LOAD_TRUNCATED_IMAGES = False
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = saved


def _reason(exc: BaseException) -> str:
    if isinstance(exc, UnidentifiedImageError):
        return "not an image file, or a format Pillow cannot read"
    if isinstance(exc, FileNotFoundError):
        return "file not found"
    if isinstance(exc, PermissionError):
        return "permission denied"
    text = str(exc).strip()
    if "truncated" in text:
        return f"truncated or incomplete file: {text}"
    return f"corrupt or unsupported file: {type(exc).__name__}: {text}" if text else type(exc).__name__


@contextmanager
def _open(path: Path) -> Iterator[Image.Image]:
    """Open (header only) with our limits in force; errors become UnreadableImage."""
    with _reading_settings():
        try:
            image = Image.open(path)
        except _READ_ERRORS as exc:
            if isinstance(exc, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
                raise ImageTooLarge(path, f"larger than the {_cap_text()} limit") from exc
            raise UnreadableImage(path, _reason(exc)) from exc
        with image:
            width, height = image.size
            if width < 1 or height < 1:
                raise UnreadableImage(path, f"empty image ({width}x{height})")
            if width * height > MAX_PIXELS:
                raise ImageTooLarge(path, f"{width}x{height} is {width * height / 1e6:.0f} megapixels, above the "
                                          f"{_cap_text()} limit; downscale it first")
            try:
                yield image
            except UnreadableImage:
                raise
            except _READ_ERRORS as exc:
                raise UnreadableImage(path, _reason(exc)) from exc


def _cap_text() -> str:
    side = math.isqrt(MAX_PIXELS)
    return f"{side}x{side}" if side * side == MAX_PIXELS else f"{MAX_PIXELS} pixel"


def _orientation(image: Image.Image) -> int:
    """EXIF (or XMP) orientation 1..8; 1 when absent or unreadable (broken EXIF is common)."""
    try:
        value = image.getexif().get(_ORIENTATION_TAG, 1)
        return value if value in _TRANSPOSE else 1
    except Exception:  # noqa: BLE001 - a broken EXIF block must not make the image unreadable
        return 1


def _displayed(size: tuple[int, int], orientation: int) -> tuple[int, int]:
    return (size[1], size[0]) if orientation in (5, 6, 7, 8) else size


def _reduction(size: tuple[int, int], target: tuple[int, int] | None) -> int:
    """Largest integer factor that still leaves twice the pixels needed to cover `target` (both
    orientations, so it is safe before the EXIF orientation is known)."""
    if not target:
        return 1
    width, height = size
    tw, th = max(1, target[0]), max(1, target[1])
    scale = max(tw / width, th / height, tw / height, th / width)
    return max(1, int(1 / (2 * scale)))


def _gray16_to_l(image: Image.Image, is_png: bool) -> Image.Image:
    """Scale 16-bit (``I;16*``, or ``I`` holding 16-bit values) grayscale to 8 bits by value/257
    (rounded), in row chunks to bound memory. Pillow's own convert("L") clips at 255."""
    values = np.asarray(image)
    if image.mode == "I" and not is_png and values.size and 0 <= values.min() and values.max() <= 255:
        return Image.fromarray(values.astype(np.uint8), "L")  # an 8-bit image stored as 32-bit ints
    out = np.empty(values.shape, dtype=np.uint8)
    rows = max(1, (1 << 22) // max(1, values.shape[1]))
    for start in range(0, values.shape[0], rows):
        chunk = np.clip(values[start:start + rows].astype(np.int64), 0, 65535)
        out[start:start + rows] = (chunk * 255 + 32767) // 65535
    return Image.fromarray(out, "L")


def _float_to_l(image: Image.Image) -> Image.Image:
    values = np.asarray(image, dtype=np.float32)
    finite = values[np.isfinite(values)]
    peak = float(finite.max()) if finite.size else 0.0
    scale = 255.0 if peak <= 1.0 else 1.0  # 0..1 floats (e.g. HDR-ish TIFFs) or already 0..255
    return Image.fromarray(np.clip(np.nan_to_num(values) * scale + 0.5, 0, 255).astype(np.uint8), "L")


def _to_srgb(image: Image.Image) -> Image.Image:
    """RGB/RGBA/CMYK with an embedded ICC profile -> sRGB through littlecms; without a profile
    (or if littlecms fails) Pillow's plain conversion."""
    icc = image.info.get("icc_profile")
    out_mode = "RGBA" if image.mode == "RGBA" else "RGB"
    if icc:
        try:
            from PIL import ImageCms

            source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            description = ImageCms.getProfileDescription(source) or ""
            if image.mode == "CMYK" or "srgb" not in description.lower():
                converted = ImageCms.profileToProfile(image, source, ImageCms.createProfile("sRGB"),
                                                      outputMode=out_mode)
                if converted is not None:
                    return converted
        except Exception as exc:  # noqa: BLE001 - a bad profile falls back to the plain conversion
            log.debug("ICC conversion of %s failed (%s); using the plain conversion", image.mode, exc)
    return image if image.mode == out_mode else image.convert(out_mode)


def _normalized(image: Image.Image, is_png: bool) -> Image.Image:
    """Any Pillow mode -> L, LA, RGB or RGBA (8 bits per channel)."""
    mode = image.mode
    transparency = image.info.get("transparency") is not None
    if mode in _UNSUPPORTED_MODES:
        raise ValueError(f"unsupported colour mode {mode}")
    if mode == "1":
        return image.convert("LA" if transparency else "L")
    if mode in _SIXTEEN_BIT_GRAY or mode == "I":
        return _gray16_to_l(image, is_png)
    if mode == "F":
        return _float_to_l(image)
    if mode in ("P", "PA"):
        return image.convert("RGBA" if transparency or mode == "PA" else "RGB")
    if mode == "L":
        return image.convert("LA") if transparency else image
    if mode in ("LA", "La"):
        return image if mode == "LA" else image.convert("LA")
    if mode in ("RGB", "RGBA", "CMYK"):
        if mode == "RGB" and transparency:
            return _to_srgb(image.convert("RGBA"))
        return _to_srgb(image)
    return image.convert("RGBA" if mode in _ALPHA_MODES else "RGB")  # RGBa, RGBX, YCbCr, ...


def _split_alpha(image: Image.Image) -> tuple[Image.Image, Image.Image | None]:
    """(colour without alpha, alpha as "L" or None when every pixel is opaque)."""
    if image.mode not in ("LA", "RGBA"):
        return image, None
    alpha = image.getchannel("A")
    color = image.convert(image.mode[:-1])
    return color, (alpha if alpha.getextrema()[0] < 255 else None)


def _decode(path: Path, target: tuple[int, int] | None) -> Image.Image:
    """Decode, shrink early for `target`, orient, normalize: an L/LA/RGB/RGBA image."""
    with _open(path) as image:
        is_png = image.format == "PNG"
        factor = _reduction(image.size, target)
        if factor > 1 and image.format in ("JPEG", "MPO"):
            # DCT scaling: 1/2, 1/4 or 1/8, never smaller than requested
            image.draft(image.mode, (max(1, image.width // factor), max(1, image.height // factor)))
        image.load()
        orientation = _orientation(image)
        image = _normalized(image, is_png)
        factor = _reduction(image.size, target)
        if factor > 1:
            image = image.reduce(factor)
        if orientation != 1:
            image = image.transpose(_TRANSPOSE[orientation])
        image.load()
        return image


def open_rgb(path: str | Path, *, target: tuple[int, int] | None = None
             ) -> tuple[Image.Image, Image.Image | None]:
    """The image as 8-bit "RGB" (upright, sRGB, transparent pixels composited on white) and its
    alpha channel as an "L" mask when it has real transparency (else None).

    `target` (width, height): the caller will resize the image to cover this size; the image may
    then come back smaller than the file (never below twice what covering needs), which makes huge
    JPEGs cheap. Without it, the full resolution. Raises UnreadableImage / ImageTooLarge."""
    path = Path(path)
    color, alpha = _split_alpha(_decode(path, target))
    rgb = color.convert("RGB") if color.mode != "RGB" else color
    if alpha is not None:
        background = Image.new("RGB", rgb.size, WHITE)
        background.paste(rgb, mask=alpha)
        rgb = background
    return rgb, alpha


def inspect_image(path: str | Path) -> ImageInfo:
    """Open and fully decode (JPEGs at 1/8 scale: every byte is still read and checked) to prove
    the file is usable; return its upright size and whether it has real transparency."""
    path = Path(path)
    with _open(path) as image:
        size, mode, fmt = image.size, image.mode, image.format
        if fmt in ("JPEG", "MPO"):
            image.draft(image.mode, (max(1, image.width // 8), max(1, image.height // 8)))
        image.load()
        orientation = _orientation(image)
        if mode in _UNSUPPORTED_MODES:
            raise UnreadableImage(path, f"unsupported colour mode {mode}")
        has_alpha = _has_transparency(image)
    return ImageInfo(path=path, size=_displayed(size, orientation), has_alpha=has_alpha, mode=mode, format=fmt)


def _has_transparency(image: Image.Image) -> bool:
    mode, transparency = image.mode, image.info.get("transparency")
    if mode in _ALPHA_MODES:
        return image.getchannel(len(image.getbands()) - 1).getextrema()[0] < 255
    if transparency is None:
        return False
    if mode == "P":  # transparency: one palette index, or alpha per index; only used indices count
        used = [index for index, count in enumerate(image.histogram()) if count]
        if isinstance(transparency, (bytes, bytearray)):
            return any(index < len(transparency) and transparency[index] < 255 for index in used)
        return transparency in used
    try:
        return image.convert("RGBA").getchannel("A").getextrema()[0] < 255
    except ValueError:
        return False


def load_mask(mask_path: str | Path, expected_size: tuple[int, int], *,
              image_path: str | Path | None = None) -> Image.Image:
    """A loss mask as "L" (white = learn, black = ignore), upright, the size of its image.

    Grayscale/RGB masks use their luminance; masks with transparency count transparent as black
    (painted-on-transparent masks work). ValueError naming both files and sizes when the mask's
    upright size is not `expected_size` (its image's upright size)."""
    mask_path = Path(mask_path)
    color, alpha = _split_alpha(_decode(mask_path, None))
    mask = color.convert("L") if color.mode != "L" else color
    if alpha is not None:
        black = Image.new("L", mask.size, 0)
        black.paste(mask, mask=alpha)
        mask = black
    expected = tuple(expected_size)
    if mask.size != expected:
        image_text = f"its image {Path(image_path).name}" if image_path else "its image"
        raise ValueError(f"mask {mask_path.name} is {mask.size[0]}x{mask.size[1]} but {image_text} is "
                         f"{expected[0]}x{expected[1]} (after EXIF rotation): a mask must have its image's size. "
                         f"Resize or re-export {mask_path}.")
    return mask

