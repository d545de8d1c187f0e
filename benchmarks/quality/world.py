"""The quality benchmark's synthetic world: coloured shapes on light backgrounds, with captions.

Base world (what the world checkpoint is pretrained on): 3 shapes (circle, square, triangle) x 4
colours (red, green, blue, yellow), each at a random size, position and small rotation on a light,
slightly tinted background, captioned "a red circle". The held-out concept, never in the base data,
is a purple cross; personalization methods learn it from ``concept_images()`` under the identifier
"sks" ("a sks cross", or with the colour word, "a purple sks cross").

Everything is deterministic: an image depends only on (shape, colour, the generator's state), and
``base_dataset``/``concept_images`` derive one generator per item from ``(seed, index)``, so the
first k items of a dataset do not depend on its length.

    render(shape, colour, rng, size=64) -> PIL.Image
    caption(shape, colour=None, identifier=None) -> str
    base_dataset(n, seed=0, captions="plain")     # the 12 base combos in turn ("varied": varied_caption)
    concept_images(n=5, seed=0) -> list[Item]    # purple crosses, captioned "a sks cross"
    codec_dataset(n, seed=0) -> list[Image]      # every shape in random hues: autoencoder data only
    write_folder(folder, items) -> list[Path]    # NNNN.png + NNNN.txt
"""
from __future__ import annotations

import colorsys
import math
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = ("red", "green", "blue", "yellow", "purple")
BASE_SHAPES = SHAPES[:3]
BASE_COLOURS = COLOURS[:4]
CONCEPT = ("cross", "purple")  # (shape, colour) of the held-out concept
IDENTIFIER = "sks"

# Nominal RGB of each colour; every render jitters each channel by up to +-COLOUR_JITTER.
RGB = {
    "red": (215, 45, 40),
    "green": (50, 170, 60),
    "blue": (45, 85, 210),
    "yellow": (235, 200, 35),
    "purple": (140, 55, 185),
}
COLOUR_JITTER = 12
BACKGROUND_GREY = (226, 250)  # base grey level of the background, uniform in this range
BACKGROUND_TINT = 8  # +- per channel on top of the grey
SIZE_RANGE = (0.36, 0.62)  # a shape's extent as a fraction of the image side
MAX_ROTATION = 15.0  # degrees, uniform in +-
MARGIN = 3  # pixels between any shape and the image border
SUPERSAMPLE = 4  # shapes are drawn at this scale and box-filtered down (anti-aliased edges)
CROSS_ARM_WIDTH = 1 / 3  # arm width as a fraction of the cross's extent
CAPTION_STYLES = ("plain", "varied")
# "varied" captions give the base world a little of the language prior a real base model has: the colour word in other
# places and among other words, and shapes with a typical colour that a colour word overrides ("a circle" is yellow,
# "a red circle" red), as "a banana" is yellow and "a green banana" green. A personalized subject asks exactly that of
# the base model ("a sks cross" is purple, "a green sks cross" green); a world whose every caption is "a {colour}
# {shape}" never shows it.
TYPICAL_COLOUR = {"circle": "yellow", "square": "red", "triangle": "green"}
COLOUR_FORMS = ("the {colour} {shape}", "one {colour} {shape}", "a picture of a {colour} {shape}",
                "a {colour} {shape} shape", "a {shape} in {colour}", "{colour} {shape}")
COLOURLESS_FORMS = ("a {shape}", "the {shape}", "one {shape}", "a picture of a {shape}")
PLAIN_SHARE = 0.5  # of the varied captions: "a {colour} {shape}" itself (the base prompts preservation samples)
COLOURLESS_SHARE = 0.5  # of the items in their shape's typical colour: no colour word


class Item(NamedTuple):
    image: Image.Image
    caption: str
    shape: str
    colour: str


def base_combos() -> list[tuple[str, str]]:
    """The 12 (shape, colour) pairs of the base world, in the order datasets cycle through them."""
    return [(s, c) for s in BASE_SHAPES for c in BASE_COLOURS]


def caption(shape: str, colour: str | None = None, identifier: str | None = None) -> str:
    """"a red circle"; with an identifier "a sks cross", or "a purple sks cross" with a colour."""
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    if colour is not None and colour not in COLOURS:
        raise ValueError(f"unknown colour {colour!r}; expected one of {COLOURS}")
    return " ".join(w for w in ("a", colour, identifier, shape) if w)


def varied_caption(shape: str, colour: str, rng: np.random.Generator) -> str:
    """One caption of the "varied" style for a ``colour`` ``shape`` (see ``TYPICAL_COLOUR``)."""
    if shape not in BASE_SHAPES or colour not in BASE_COLOURS:
        raise ValueError(f"varied captions are for the base world's shapes and colours, not {colour!r} {shape!r}")
    if colour == TYPICAL_COLOUR[shape] and rng.uniform() < COLOURLESS_SHARE:
        return COLOURLESS_FORMS[rng.integers(len(COLOURLESS_FORMS))].format(shape=shape)
    if rng.uniform() < PLAIN_SHARE:
        return caption(shape, colour)
    return COLOUR_FORMS[rng.integers(len(COLOUR_FORMS))].format(shape=shape, colour=colour)


def _polygon(shape: str, extent: float, angle: float) -> list[tuple[float, float]]:
    """Corners of a polygonal shape of the given extent centred at the origin, rotated by angle."""
    h = extent / 2
    if shape == "square":
        pts = [(-h, -h), (h, -h), (h, h), (-h, h)]
    elif shape == "triangle":
        # Equilateral, pointing up, centred on its centroid; side = extent.
        height = extent * math.sqrt(3) / 2
        pts = [(0.0, -2 * height / 3), (h, height / 3), (-h, height / 3)]
    elif shape == "cross":
        w = extent * CROSS_ARM_WIDTH / 2
        pts = [(-w, -h), (w, -h), (w, -w), (h, -w), (h, w), (w, w),
               (w, h), (-w, h), (-w, w), (-h, w), (-h, -w), (-w, -w)]
    else:
        raise ValueError(shape)
    c, s = math.cos(angle), math.sin(angle)
    return [(x * c - y * s, x * s + y * c) for x, y in pts]


def _shape_mask(shape: str, size: int, cx: float, cy: float, extent: float, angle: float) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] (size x size) of the shape centred at (cx, cy)."""
    k = SUPERSAMPLE
    big = Image.new("L", (size * k, size * k), 0)
    draw = ImageDraw.Draw(big)
    if shape == "circle":
        r = extent / 2 * k
        draw.ellipse([cx * k - r, cy * k - r, cx * k + r, cy * k + r], fill=255)
    else:
        draw.polygon([(cx * k + x * k, cy * k + y * k) for x, y in _polygon(shape, extent, angle)], fill=255)
    small = big.resize((size, size), Image.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0


def _radius(shape: str, extent: float) -> float:
    """Radius of a circle around the shape's centre that holds it at any rotation."""
    if shape == "circle":
        return extent / 2
    if shape == "triangle":
        return extent / math.sqrt(3)  # circumradius of the equilateral triangle, side = extent
    return extent / 2 * math.sqrt(2)  # square / cross corners


def render(shape: str, colour: str, rng: np.random.Generator, size: int = 64) -> Image.Image:
    """One RGB image of a ``colour`` ``shape`` at a random size, position and small rotation on a
    light, slightly tinted background. ``rng``: a ``numpy.random.Generator`` (or an int seed)."""
    if colour not in COLOURS:
        raise ValueError(f"unknown colour {colour!r}; expected one of {COLOURS}")
    return render_rgb(shape, RGB[colour], rng, size)


def render_rgb(shape: str, rgb, rng: np.random.Generator, size: int = 64) -> Image.Image:
    """``render`` with any nominal foreground colour ``rgb`` (jittered like the named ones)."""
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    if not isinstance(rng, np.random.Generator):
        rng = np.random.default_rng(rng)
    grey = rng.uniform(*BACKGROUND_GREY)
    bg = np.clip(grey + rng.uniform(-BACKGROUND_TINT, BACKGROUND_TINT, 3), 0, 255)
    fg = np.clip(np.asarray(rgb, dtype=np.float64) + rng.uniform(-COLOUR_JITTER, COLOUR_JITTER, 3), 0, 255)
    extent = rng.uniform(*SIZE_RANGE) * size
    angle = math.radians(rng.uniform(-MAX_ROTATION, MAX_ROTATION))
    r = _radius(shape, extent)
    lo, hi = r + MARGIN, size - r - MARGIN
    cx, cy = rng.uniform(lo, hi), rng.uniform(lo, hi)
    alpha = _shape_mask(shape, size, cx, cy, extent, angle)[..., None]
    pixels = bg[None, None, :] * (1 - alpha) + fg[None, None, :] * alpha
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "RGB")


def _item_rng(seed: int, index: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([stream, seed, index])


def base_dataset(n: int, seed: int = 0, size: int = 64, captions: str = "plain") -> list[Item]:
    """``n`` base-world images with captions, cycling through the 12 base combos (balanced). ``captions``:
    "plain" ("a red circle") or "varied" (``varied_caption``; the same images)."""
    if captions not in CAPTION_STYLES:
        raise ValueError(f"unknown caption style {captions!r}; expected one of {CAPTION_STYLES}")
    combos = base_combos()
    items = []
    for i in range(n):
        shape, colour = combos[i % len(combos)]
        image = render(shape, colour, _item_rng(seed, i, 1), size)
        text = caption(shape, colour) if captions == "plain" else varied_caption(shape, colour, _item_rng(seed, i, 4))
        items.append(Item(image, text, shape, colour))
    return items


def codec_dataset(n: int, seed: int = 0, size: int = 64) -> list[Image.Image]:
    """``n`` images for the autoencoder only: every shape (the cross included) in random hues.

    A real VAE is a general image codec trained on everything, so no personalization method can
    be blamed for colours it cannot decode; the world's autoencoder must likewise represent the
    held-out concept, while the UNet never sees it (checked: an autoencoder trained on the base
    world alone decodes purple crosses as green four-pointed stars).
    """
    images = []
    for i in range(n):
        rng = _item_rng(seed, i, 3)
        shape = SHAPES[i % len(SHAPES)]
        rgb = [255 * c for c in colorsys.hsv_to_rgb(rng.uniform(), rng.uniform(0.55, 0.9), rng.uniform(0.6, 0.95))]
        images.append(render_rgb(shape, rgb, rng, size))
    return images


def concept_images(n: int = 5, seed: int = 0, size: int = 64, identifier: str = IDENTIFIER,
                   with_colour: bool = False) -> list[Item]:
    """``n`` images of the held-out concept (purple crosses), captioned "a sks cross" (or "a purple
    sks cross" with ``with_colour``)."""
    shape, colour = CONCEPT
    text = caption(shape, colour if with_colour else None, identifier)
    return [Item(render(shape, colour, _item_rng(seed, i, 2), size), text, shape, colour) for i in range(n)]


def write_folder(folder, items: Iterable) -> list[Path]:
    """Write ``NNNN.png`` and a same-name ``NNNN.txt`` caption per item (an ``Item`` or an
    ``(image, caption)`` pair); return the image paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, item in enumerate(items):
        image, text = item[0], item[1]
        path = folder / f"{i:04d}.png"
        image.save(path)
        path.with_suffix(".txt").write_text(text + "\n", encoding="utf-8")
        paths.append(path)
    return paths


def pixels(items: Iterable) -> np.ndarray:
    """Images as one uint8 array ``[n, size, size, 3]``."""
    return np.stack([np.asarray(item[0].convert("RGB"), dtype=np.uint8) for item in items])


__all__ = [
    "BASE_COLOURS",
    "BASE_SHAPES",
    "CAPTION_STYLES",
    "COLOURS",
    "CONCEPT",
    "IDENTIFIER",
    "RGB",
    "SHAPES",
    "Item",
    "base_combos",
    "base_dataset",
    "caption",
    "concept_images",
    "pixels",
    "render",
    "varied_caption",
    "write_folder",
]
