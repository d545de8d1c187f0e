"""A deterministic judge for images of the synthetic world: which shape, which colour.

No learned parts, so it cannot drift or be fooled the way a classifier can:

1. Background: the per-channel median of the 2-pixel border (every world image has a margin of
   plain background around its shape). A border that is not plain (noise, a shape touching the
   border) means there is no clear background: ("none", "none").
2. Foreground: pixels farther than ``FOREGROUND_DISTANCE`` (RGB Euclidean) from the background;
   the largest 8-connected component is the object. Too small, too large, or mostly scattered
   foreground means there is no clear object: ("none", "none").
3. Colour: the hue of the median colour of the object's core pixels (those well away from the
   background, so anti-aliased edges do not count), in fixed hue bands; a grey object is "unknown".
4. Shape, from the object's geometry (pixel centres; convex hull grown by half a pixel), using
   measures of the hull where possible, so that wobbly or slightly concave edges of generated
   shapes do not change the answer:
   - cross: four separate concavities (the corners between its arms) and low solidity
     (object area / hull area: ~0.71 for the world's cross, > 0.9 for the convex shapes), but not
     so low that the object is a scribble rather than a cross;
   - triangle: the hull fills about half of its minimum-area (rotation-aware) rectangle
     (circle pi/4, square 1);
   - circle vs square: the hull's isoperimetric quotient 4 pi A / P^2 (circle 1, square pi/4);
   - very elongated or very non-convex objects are "unknown".

``judge(image) -> (shape, colour)``; shape in ``SHAPES`` or "unknown"/"none", colour in ``COLOURS``
or "unknown"/"none". ``describe(image)`` returns the measurements as well.
"""
from __future__ import annotations

import colorsys
import math

import numpy as np

SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = ("red", "green", "blue", "yellow", "purple")
NONE = "none"  # no clear object in the image
UNKNOWN = "unknown"  # an object, but not one of the world's shapes / colours

BORDER = 2
BORDER_MAX_SPREAD = 20.0  # median distance of border pixels from the background colour
FOREGROUND_DISTANCE = 70.0
MIN_OBJECT_FRACTION = 0.01  # of the image area
MAX_FOREGROUND_FRACTION = 0.6
MIN_LARGEST_SHARE = 0.7  # of all foreground pixels, in the largest component
CORE_FRACTION = 0.6  # core pixels: distance >= this x the object's 90th-percentile distance
MIN_SATURATION = 0.25
# Hue bands in degrees, [start, end); red wraps around 0.
HUE_BANDS = (("red", 330, 360), ("red", 0, 30), ("yellow", 30, 90), ("green", 90, 180),
             ("blue", 180, 255), ("purple", 255, 330))
CROSS_SOLIDITY = 0.81  # a cross (with 4 concavities) is below: 5/9 of its hull's 7/9, ~0.71
# ... and above this: clean crosses measure 0.71-0.76; a scribble with four gaps in its outline measures less
# (checked: textual-inversion samples of solidity 0.5-0.6 that a bare "4 concavities" rule called crosses).
MIN_CROSS_SOLIDITY = 0.62
MIN_CONCAVITY_SHARE = 0.015  # of the hull area, for a concavity to count
MIN_SOLIDITY = 0.7  # anything less convex (and not a cross) is no world shape
MAX_ASPECT = 2.0  # of the minimum-area rectangle
# The convex hull's fill of its minimum-area rectangle: triangle 0.5, circle pi/4, square 1.
TRIANGLE_HULL_FILL = 0.7  # below: triangle
# The convex hull's isoperimetric quotient 4 pi A / P^2: circle 1, square pi/4 ~ 0.785.
CIRCLE_HULL_ISO = 0.91  # at or above: circle, else square
MIN_TRIANGLE_FILL = 0.38  # the object's own fill of the rectangle, for a triangle


def _rgb_array(image) -> np.ndarray:
    if isinstance(image, np.ndarray):
        arr = image.astype(np.float64)
        if arr.ndim == 2:
            arr = np.repeat(arr[..., None], 3, axis=2)
        if arr.max() <= 1.0 and arr.dtype != np.uint8 and image.dtype.kind == "f":
            arr = arr * 255.0
        return arr[..., :3]
    return np.asarray(image.convert("RGB"), dtype=np.float64)


def _components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """8-connected component labels (0 = background, 1..n) of a boolean mask, by label propagation."""
    h, w = mask.shape
    labels = np.where(mask, np.arange(1, h * w + 1).reshape(h, w), 0)
    while True:
        padded = np.pad(labels, 1)
        best = labels.copy()
        for dy in (0, 1, 2):
            for dx in (0, 1, 2):
                best = np.maximum(best, padded[dy:dy + h, dx:dx + w])
        best = np.where(mask, best, 0)
        if np.array_equal(best, labels):
            break
        labels = best
    uniques = np.unique(labels[labels > 0])
    remap = np.zeros(h * w + 1, dtype=np.int64)
    remap[uniques] = np.arange(1, len(uniques) + 1)
    return remap[labels], len(uniques)


def _convex_hull(points: np.ndarray) -> np.ndarray:
    """Counter-clockwise convex hull (monotone chain) of integer points [n, 2] as (x, y)."""
    pts = sorted(set(map(tuple, points.tolist())))
    if len(pts) <= 2:
        return np.asarray(pts, dtype=np.float64)

    def cross(o, a, b):
        return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])

    lower, upper = [], []
    for p in pts:
        while len(lower) >= 2 and cross(lower[-2], lower[-1], p) <= 0:
            lower.pop()
        lower.append(p)
    for p in reversed(pts):
        while len(upper) >= 2 and cross(upper[-2], upper[-1], p) <= 0:
            upper.pop()
        upper.append(p)
    return np.asarray(lower[:-1] + upper[:-1], dtype=np.float64)


def _polygon_area_perimeter(hull: np.ndarray) -> tuple[float, float]:
    if len(hull) < 3:
        return 0.0, 2.0 * float(np.linalg.norm(hull[-1] - hull[0])) if len(hull) == 2 else 0.0
    x, y = hull[:, 0], hull[:, 1]
    area = 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))
    perimeter = float(np.linalg.norm(hull - np.roll(hull, -1, axis=0), axis=1).sum())
    return area, perimeter


def _min_area_rect(hull: np.ndarray) -> tuple[float, float]:
    """Sides (long, short) of the minimum-area rectangle around a convex polygon (one side of the
    optimal rectangle lies along a hull edge)."""
    best = None
    for i in range(len(hull)):
        edge = hull[(i + 1) % len(hull)] - hull[i]
        norm = math.hypot(*edge)
        if norm == 0:
            continue
        u = edge / norm
        v = np.array([-u[1], u[0]])
        a, b = hull @ u, hull @ v
        w, h = a.max() - a.min(), b.max() - b.min()
        if best is None or w * h < best[0] * best[1]:
            best = (w, h)
    if best is None:
        return 0.0, 0.0
    return max(best), min(best)


def _inside_hull(hull: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Pixels whose centres lie inside (or on) the counter-clockwise convex polygon ``hull``."""
    h, w = shape
    ys, xs = np.mgrid[0:h, 0:w]
    inside = np.ones(shape, dtype=bool)
    for i in range(len(hull)):
        (x0, y0), (x1, y1) = hull[i], hull[(i + 1) % len(hull)]
        inside &= (x1 - x0) * (ys - y0) - (y1 - y0) * (xs - x0) >= -1e-9
    return inside


def _hue_name(rgb: np.ndarray) -> tuple[str, float, float]:
    hue, sat, _ = colorsys.rgb_to_hsv(*(np.clip(rgb, 0, 255) / 255.0))
    degrees = hue * 360.0
    if sat < MIN_SATURATION:
        return UNKNOWN, degrees, sat
    for name, lo, hi in HUE_BANDS:
        if lo <= degrees < hi:
            return name, degrees, sat
    return UNKNOWN, degrees, sat


def describe(image) -> dict:
    """The judgement and every measurement behind it (for debugging and reports)."""
    arr = _rgb_array(image)
    h, w, _ = arr.shape
    border = np.concatenate([arr[:BORDER].reshape(-1, 3), arr[-BORDER:].reshape(-1, 3),
                             arr[:, :BORDER].reshape(-1, 3), arr[:, -BORDER:].reshape(-1, 3)])
    background = np.median(border, axis=0)
    out = {"shape": NONE, "colour": NONE, "background": background.tolist()}
    spread = float(np.median(np.linalg.norm(border - background, axis=1)))
    out["border_spread"] = spread
    if spread > BORDER_MAX_SPREAD:
        out["reason"] = "no plain background"
        return out
    distance = np.linalg.norm(arr - background, axis=2)
    foreground = distance > FOREGROUND_DISTANCE
    total = int(foreground.sum())
    out["foreground_fraction"] = total / (h * w)
    if total < MIN_OBJECT_FRACTION * h * w or total > MAX_FOREGROUND_FRACTION * h * w:
        out["reason"] = "no clear foreground"
        return out
    labels, _ = _components(foreground)
    sizes = np.bincount(labels.ravel())[1:]
    largest = int(np.argmax(sizes)) + 1
    obj = labels == largest
    area = int(sizes[largest - 1])
    out["largest_share"] = area / total
    if area < MIN_OBJECT_FRACTION * h * w or area < MIN_LARGEST_SHARE * total:
        out["reason"] = "scattered foreground"
        return out

    # Colour: median of the core pixels.
    d = distance[obj]
    core = obj & (distance >= CORE_FRACTION * np.percentile(d, 90))
    rgb = np.median(arr[core], axis=0)
    out["colour"], out["hue"], out["saturation"] = _hue_name(rgb)
    out["object_rgb"] = rgb.tolist()

    # Shape: geometry of the object's pixel centres.
    ys, xs = np.nonzero(obj)
    hull = _convex_hull(np.stack([xs, ys], axis=1))
    hull_area, hull_perimeter = _polygon_area_perimeter(hull)
    grown_hull_area = hull_area + 0.5 * hull_perimeter + math.pi / 4  # Steiner: grown by half a pixel
    solidity = area / grown_hull_area
    long_side, short_side = _min_area_rect(hull)
    rect_area = (long_side + 1.0) * (short_side + 1.0)
    fill = area / rect_area
    aspect = (long_side + 1.0) / (short_side + 1.0)
    concavity = _inside_hull(hull, obj.shape) & ~obj if len(hull) >= 3 else np.zeros_like(obj)
    c_labels, c_n = _components(concavity)
    c_sizes = np.bincount(c_labels.ravel())[1:] if c_n else np.zeros(0, dtype=np.int64)
    concavities = int((c_sizes >= max(3.0, MIN_CONCAVITY_SHARE * grown_hull_area)).sum())
    hull_fill = grown_hull_area / rect_area
    hull_iso = 4 * math.pi * grown_hull_area / (hull_perimeter + math.pi) ** 2  # grown hull's perimeter
    out.update(area=area, solidity=solidity, rect_fill=fill, hull_fill=hull_fill, hull_iso=hull_iso,
               aspect=aspect, concavities=concavities)
    if concavities == 4 and MIN_CROSS_SOLIDITY <= solidity < CROSS_SOLIDITY and aspect <= MAX_ASPECT:
        out["shape"] = "cross"
    elif solidity < MIN_SOLIDITY or aspect > MAX_ASPECT:
        out["shape"] = UNKNOWN
    elif hull_fill < TRIANGLE_HULL_FILL:
        out["shape"] = "triangle" if fill >= MIN_TRIANGLE_FILL else UNKNOWN
    elif hull_iso >= CIRCLE_HULL_ISO:
        out["shape"] = "circle"
    else:
        out["shape"] = "square"
    return out


def judge(image) -> tuple[str, str]:
    """(shape, colour) of a world image (PIL image or HxWx3 array); "none" when there is no clear
    object, "unknown" when the object is not one of the world's shapes or colours."""
    d = describe(image)
    return d["shape"], d["colour"]


__all__ = ["COLOURS", "NONE", "SHAPES", "UNKNOWN", "describe", "judge"]
