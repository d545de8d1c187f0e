"""A small synthetic personalization dataset: a distinctive subject with captions.

The subject is a purple cross with a yellow dot in its centre, drawn with PIL at varying positions,
sizes and rotations on light backgrounds of varying tints, with a few distractor shapes. Each image
``NNN.png`` has a caption ``NNN.txt`` ("a photo of sks cross, on a light blue background").
Deterministic for given arguments.

Usage: ``python scripts/sample_images.py FOLDER [-n 6] [--size 64] [--seed 0] [--subject sks]``
"""
from __future__ import annotations

import argparse
import math
import random
import sys
from pathlib import Path

from PIL import Image, ImageDraw

SUBJECT_COLOR = (128, 40, 170)
CENTRE_COLOR = (250, 215, 40)
BACKGROUNDS = [
    ("white", (245, 245, 245)),
    ("light blue", (205, 225, 250)),
    ("light green", (210, 240, 210)),
    ("light yellow", (250, 245, 200)),
    ("light pink", (250, 215, 225)),
    ("light grey", (215, 215, 215)),
]
DISTRACTOR_COLORS = [(90, 160, 200), (200, 120, 80), (120, 170, 100), (170, 170, 170)]


def _cross_polygon(cx: float, cy: float, arm: float, width: float, angle: float):
    """The 12 corners of a plus-shaped cross centred at (cx, cy), rotated by angle (radians)."""
    a, w = arm, width / 2
    pts = [(-w, -a), (w, -a), (w, -w), (a, -w), (a, w), (w, w),
           (w, a), (-w, a), (-w, w), (-a, w), (-a, -w), (-w, -w)]
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in pts]


def draw_sample(size: int, rng: random.Random) -> tuple[Image.Image, str]:
    """One image of the subject and the name of its background."""
    bg_name, bg = BACKGROUNDS[rng.randrange(len(BACKGROUNDS))]
    jitter = tuple(max(0, min(255, c + rng.randint(-8, 8))) for c in bg)
    img = Image.new("RGB", (size, size), jitter)
    draw = ImageDraw.Draw(img)
    # A distractor or two, behind the subject.
    for _ in range(rng.randint(0, 2)):
        r = size * rng.uniform(0.06, 0.12)
        x, y = rng.uniform(r, size - r), rng.uniform(r, size - r)
        color = DISTRACTOR_COLORS[rng.randrange(len(DISTRACTOR_COLORS))]
        if rng.random() < 0.5:
            draw.ellipse([x - r, y - r, x + r, y + r], fill=color)
        else:
            draw.rectangle([x - r, y - r, x + r, y + r], fill=color)
    # The subject: a purple cross with a yellow centre.
    arm = size * rng.uniform(0.22, 0.32)
    width = arm * 0.55
    margin = arm * 1.1
    cx = rng.uniform(margin, size - margin)
    cy = rng.uniform(margin, size - margin)
    angle = math.radians(rng.uniform(-25, 25))
    draw.polygon(_cross_polygon(cx, cy, arm, width, angle), fill=SUBJECT_COLOR)
    dot = width * 0.3
    draw.ellipse([cx - dot, cy - dot, cx + dot, cy + dot], fill=CENTRE_COLOR)
    return img, bg_name


def make_sample_dataset(folder, n: int = 6, size: int = 64, seed: int = 0, subject: str = "sks") -> list[Path]:
    """Write ``n`` PNG images of the subject with same-name ``.txt`` captions into ``folder``.

    Returns the image paths in order. The same arguments always give the same bytes.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"personalize-samples-{seed}-{size}")
    paths = []
    for i in range(n):
        img, bg_name = draw_sample(size, rng)
        path = folder / f"{i:03d}.png"
        img.save(path, format="PNG", optimize=False)
        caption = f"a photo of {subject} cross, on a {bg_name} background\n"
        path.with_suffix(".txt").write_text(caption, encoding="utf-8")
        paths.append(path)
    return paths


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder")
    parser.add_argument("-n", type=int, default=6)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--subject", default="sks")
    a = parser.parse_args(argv)
    paths = make_sample_dataset(a.folder, n=a.n, size=a.size, seed=a.seed, subject=a.subject)
    print(f"wrote {len(paths)} images to {a.folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
