"""Aspect-ratio buckets with kohya-ss/sd-scripts semantics.

Images of any shape are trained at a resolution ("bucket") close to the model's native pixel
area and to the image's own aspect ratio, instead of being squashed or cropped to a square.

The rules follow kohya's ``make_bucket_resolutions`` (``library/model_util.py``) and
``BucketManager.select_bucket`` / ``trim_and_resize_if_required`` (``library/train_util.py``):

* ``make_buckets``: the square bucket of the maximum area, plus, for every width from ``min_side``
  to ``max_side`` in ``step`` increments, the tallest height (a multiple of ``step``, at most
  ``max_side``) whose area still fits, in both orientations.
* ``select_bucket``/``assign_bucket``: the bucket with the nearest aspect ratio (an image whose
  size already is a bucket keeps it); with ``no_upscale`` the bucket comes from the image's own
  size instead, rounded down to ``step``, after scaling too-large images down to the area.
* ``resize_and_crop``: scale so the image covers the bucket, then crop the overhang (centre or
  random), and ``resize_mask_like`` applies the same to a mask.

Pure Python + PIL; no ComfyUI imports.
"""
from __future__ import annotations

import math
import random
from collections.abc import Sequence

from PIL import Image

__all__ = [
    "assign_bucket",
    "cover_size",
    "make_buckets",
    "resize_and_crop",
    "resize_mask_like",
    "select_bucket",
]

Size = tuple[int, int]

CROP_MODES = ("center", "random")


# --- argument checks -------------------------------------------------------------------------

def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"`{name}` must be a positive integer, got {value!r}")
    return value


def _size(value, name: str) -> Size:
    try:
        width, height = value
    except (TypeError, ValueError):
        raise ValueError(f"`{name}` must be a (width, height) pair, got {value!r}") from None
    for side in (width, height):
        if isinstance(side, bool) or not isinstance(side, int) or side <= 0:
            raise ValueError(f"`{name}` must be a (width, height) pair of positive integers, got {value!r}")
    return width, height


def _step(value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0 or value % 8:
        raise ValueError(f"`step` must be a positive multiple of 8, got {value!r}")
    return value


# --- bucket lists ----------------------------------------------------------------------------

def make_buckets(max_resolution: tuple[int, int], min_side: int = 256, max_side: int = 1024,
                 step: int = 64) -> list[Size]:
    """All bucket resolutions ``(width, height)`` for a model trained at ``max_resolution``.

    kohya's ``make_bucket_resolutions``: the square bucket ``floor(sqrt(area) / step) * step``,
    then for each ``width`` in ``min_side, min_side + step, ..., max_side`` the height
    ``min(max_side, floor(area / width / step) * step)`` (kept when ``>= min_side``) in both
    orientations; sorted and without duplicates. No bucket exceeds the area of ``max_resolution``.

    Like kohya's dataset setup, ``min_side`` is rounded down and ``max_side`` up to a multiple of
    ``step`` (``min_side`` to at least ``step``, so ``min_side=32, step=64`` works for tiny
    models), and ``max_resolution`` must lie between them.
    """
    max_width, max_height = _size(max_resolution, "max_resolution")
    step = _step(step)
    min_side = _positive_int(min_side, "min_side")
    max_side = _positive_int(max_side, "max_side")
    if min_side > max_side:
        raise ValueError(f"`min_side` ({min_side}) must not exceed `max_side` ({max_side})")
    min_side = max(step, min_side - min_side % step)
    if max_side % step:
        max_side += step - max_side % step
    if min(max_width, max_height) < min_side:
        raise ValueError(
            f"`max_resolution` {max_width}x{max_height} has a side smaller than `min_side` ({min_side}"
            f" after rounding to `step` {step})")
    if max(max_width, max_height) > max_side:
        raise ValueError(
            f"`max_resolution` {max_width}x{max_height} has a side larger than `max_side` ({max_side})")

    max_area = max_width * max_height
    square = math.isqrt(max_area) // step * step
    buckets = {(square, square)}
    for width in range(min_side, max_side + 1, step):
        height = min(max_side, max_area // width // step * step)
        if height >= min_side:
            buckets.add((width, height))
            buckets.add((height, width))
    return sorted(buckets)


# --- choosing a bucket -----------------------------------------------------------------------

def cover_size(image_size: tuple[int, int], bucket: tuple[int, int]) -> Size:
    """The size to resize ``image_size`` to so that it just covers ``bucket`` (aspect kept).

    kohya: a wider-than-bucket image is scaled to the bucket's height, otherwise to its width;
    sides rounded half up. The result is at least the bucket in both dimensions.
    """
    width, height = _size(image_size, "image_size")
    bucket_width, bucket_height = _size(bucket, "bucket")
    if width / height > bucket_width / bucket_height:
        scale = bucket_height / height
    else:
        scale = bucket_width / width
    resized = (int(width * scale + 0.5), int(height * scale + 0.5))
    return max(resized[0], bucket_width), max(resized[1], bucket_height)


def _round_to_step(x: float, step: int) -> int:
    rounded = int(x + 0.5)
    return rounded - rounded % step


def _no_upscale_size(width: int, height: int, max_area: int, step: int) -> Size:
    """kohya's ``bucket_no_upscale`` resize target: the image itself when it fits ``max_area``,
    otherwise scaled down to that area, with the side that keeps the aspect ratio best on the
    ``step`` grid."""
    if width * height <= max_area:
        return width, height
    aspect = width / height
    scaled_width = math.sqrt(max_area * aspect)
    scaled_height = max_area / scaled_width
    # Candidate 1: round the width to the grid, derive the height.
    width_a = _round_to_step(scaled_width, step)
    height_a = _round_to_step(width_a / aspect, step)
    # Candidate 2: round the height to the grid, derive the width.
    height_b = _round_to_step(scaled_height, step)
    width_b = _round_to_step(height_b * aspect, step)
    error_a = abs(width_a / height_a - aspect) if height_a else math.inf
    error_b = abs(width_b / height_b - aspect) if height_b else math.inf
    if error_a < error_b:
        return width_a, int(width_a / aspect + 0.5)
    return int(height_b * aspect + 0.5), height_b


def select_bucket(image_size: tuple[int, int], buckets: Sequence[tuple[int, int]] | None, *,
                  max_area: int, step: int = 64, no_upscale: bool = False) -> tuple[Size, Size]:
    """``(bucket, resized_size)`` for an image: the bucket it trains at and the size it is resized
    to before cropping to that bucket (kohya's ``BucketManager.select_bucket``).

    Default: an image whose size is itself a bucket keeps it; otherwise the bucket whose aspect
    ratio ``w / h`` is nearest (the first in ``buckets`` order on a tie), and the image is scaled
    to cover it (``cover_size``).

    ``no_upscale``: ``buckets`` is ignored. An image within ``max_area`` is not resized; a larger
    one is scaled down to ``max_area``. The bucket is that size rounded down to ``step``, so the
    image is only ever cropped, never enlarged.
    """
    width, height = _size(image_size, "image_size")
    max_area = _positive_int(max_area, "max_area")
    step = _step(step)
    if no_upscale:
        resized = _no_upscale_size(width, height, max_area, step)
        bucket = (resized[0] - resized[0] % step, resized[1] - resized[1] % step)
        if min(bucket) <= 0:
            raise ValueError(
                f"`image_size` {width}x{height} has a side smaller than `step` ({step}) after scaling"
                f" to `max_area`; it fits no bucket without upscaling")
        return bucket, resized

    if not buckets:
        raise ValueError("`buckets` must be a non-empty list of (width, height) pairs")
    candidates = [_size(b, "buckets") for b in buckets]
    if (width, height) in candidates:
        bucket = (width, height)
    else:
        aspect = width / height
        bucket = min(candidates, key=lambda b: abs(b[0] / b[1] - aspect))  # first on ties
    return bucket, cover_size((width, height), bucket)


def assign_bucket(image_size: tuple[int, int], buckets: Sequence[tuple[int, int]] | None, *,
                  max_area: int, step: int = 64, no_upscale: bool = False) -> Size:
    """The bucket ``(width, height)`` kohya's ``BucketManager`` picks for ``image_size``
    (see ``select_bucket``, which also returns the resize target)."""
    return select_bucket(image_size, buckets, max_area=max_area, step=step, no_upscale=no_upscale)[0]


# --- resizing and cropping -------------------------------------------------------------------

def _check_resized(resized_size, image_size: Size, bucket: Size) -> Size:
    if resized_size is None:
        return cover_size(image_size, bucket)
    resized = _size(resized_size, "resized_size")
    if resized[0] < bucket[0] or resized[1] < bucket[1]:
        raise ValueError(f"`resized_size` {resized} must cover `bucket` {bucket}")
    return resized


def resize_and_crop(image: Image.Image, bucket: tuple[int, int], *, crop: str = "center",
                    rng: random.Random | None = None,
                    resized_size: tuple[int, int] | None = None) -> tuple[Image.Image, Size]:
    """Resize ``image`` (LANCZOS) to cover ``bucket``, then crop it to exactly the bucket size.

    ``crop``: ``"center"`` (kohya's default, the overhang split evenly, the extra pixel on the
    right/bottom) or ``"random"`` (a uniform offset per axis from ``rng``: x first, then y, a draw
    only for an axis with overhang). ``resized_size`` overrides the resize target (e.g. the one
    ``select_bucket`` returns for ``no_upscale``); default ``cover_size(image.size, bucket)``.

    Returns the crop and its ``(left, top)`` offset in the resized image; pass both to
    ``resize_mask_like`` to crop a mask the same way.
    """
    if not isinstance(image, Image.Image):
        raise ValueError(f"`image` must be a PIL image, got {type(image).__name__}")
    bucket = _size(bucket, "bucket")
    if crop not in CROP_MODES:
        raise ValueError(f"`crop` must be one of {CROP_MODES}, got {crop!r}")
    if crop == "random" and rng is None:
        raise ValueError("`rng` (a random.Random) is required for `crop`='random'")
    resized = _check_resized(resized_size, image.size, bucket)

    if image.size != resized:
        image = image.resize(resized, Image.Resampling.LANCZOS)
    overhang_x, overhang_y = resized[0] - bucket[0], resized[1] - bucket[1]
    if crop == "random":
        left = rng.randint(0, overhang_x) if overhang_x > 0 else 0
        top = rng.randint(0, overhang_y) if overhang_y > 0 else 0
    else:
        left, top = overhang_x // 2, overhang_y // 2
    if (overhang_x, overhang_y) != (0, 0):
        image = image.crop((left, top, left + bucket[0], top + bucket[1]))
    return image, (left, top)


def resize_mask_like(mask: Image.Image, image_size: tuple[int, int], bucket: tuple[int, int],
                     offset: tuple[int, int], *,
                     resized_size: tuple[int, int] | None = None) -> Image.Image:
    """Apply to a single-channel ``mask`` (same size as the original image) the resize and crop
    that ``resize_and_crop`` applied to an image of ``image_size`` for ``bucket`` with the
    returned ``offset`` (and the same ``resized_size``), so mask and image stay pixel-aligned.
    A mode ``"1"`` mask comes back as ``"L"`` (0/255)."""
    if not isinstance(mask, Image.Image):
        raise ValueError(f"`mask` must be a PIL image, got {type(mask).__name__}")
    if len(mask.getbands()) != 1:
        raise ValueError(f"`mask` must have a single channel, got mode {mask.mode!r}")
    image_size = _size(image_size, "image_size")
    if mask.size != image_size:
        raise ValueError(f"`mask` size {mask.size} differs from `image_size` {image_size}")
    bucket = _size(bucket, "bucket")
    resized = _check_resized(resized_size, image_size, bucket)
    try:
        left, top = (int(v) for v in offset)
    except (TypeError, ValueError):
        raise ValueError(f"`offset` must be a (left, top) pair, got {offset!r}") from None
    if not (0 <= left <= resized[0] - bucket[0] and 0 <= top <= resized[1] - bucket[1]):
        raise ValueError(f"`offset` {offset} lies outside the resized size {resized} for `bucket` {bucket}")

    if mask.mode in ("1", "P"):
        mask = mask.convert("L")
    if mask.size != resized:
        mask = mask.resize(resized, Image.Resampling.LANCZOS)
    if mask.size != bucket:
        mask = mask.crop((left, top, left + bucket[0], top + bucket[1]))
    return mask
