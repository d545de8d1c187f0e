"""Condition images for ControlNet training: partners matched by name in a condition folder, or made
from each target by a detector that needs no downloaded weights (canny, soft edges, silhouette).

The dataset builder crops and flips each condition exactly like its target (`sample.extras["condition"]`,
one [H, W, 3] 0..1 tensor per variant). The makers work on IMAGE tensors too, so the same maker makes
the hint at inference (Personalize Condition Image).
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .folder import image_extensions
from .images import UnreadableImage, inspect_image, open_rgb

MAKERS = ("canny", "edges", "silhouette")
SOURCES = ("folder",) + MAKERS


def canny(images: torch.Tensor, low: float = 0.4, high: float = 0.8) -> torch.Tensor:
    """Canny edges of IMAGE [B, H, W, 3] (kornia, as the stock Canny node computes them), white on black."""
    from kornia.filters import canny as kornia_canny
    edges = kornia_canny(images.movedim(-1, 1).float(), low, high)[1]
    return edges.repeat(1, 3, 1, 1).movedim(1, -1).clamp(0, 1)


def soft_edges(images: torch.Tensor) -> torch.Tensor:
    """Sobel gradient magnitude of the grey image, scaled to 0..1 per image (a weight-free soft-edge map)."""
    from kornia.filters import sobel
    grey = images.float().mean(-1, keepdim=True).movedim(-1, 1)
    magnitude = sobel(grey)
    peak = magnitude.amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-6)
    return (magnitude / peak).repeat(1, 3, 1, 1).movedim(1, -1)


def silhouette(images: torch.Tensor, threshold: float = 0.15) -> torch.Tensor:
    """White where a pixel differs from the background (the median colour of the 2-pixel border) by more than
    `threshold` (RGB distance, 0..1), black elsewhere: the shape's mask, for plain backgrounds."""
    images = images.float()
    border = torch.cat([images[:, :2].flatten(1, 2), images[:, -2:].flatten(1, 2),
                        images[:, :, :2].flatten(1, 2), images[:, :, -2:].flatten(1, 2)], dim=1)
    background = border.median(dim=1).values[:, None, None, :]
    mask = ((images - background).norm(dim=-1, keepdim=True) > threshold).float()
    return mask.expand(-1, -1, -1, 3).contiguous()


def make_condition(images: torch.Tensor, maker: str, low: float = 0.4, high: float = 0.8,
                   threshold: float = 0.15) -> torch.Tensor:
    """IMAGE [B, H, W, 3] -> condition IMAGE of the same size, by `maker` (one of MAKERS)."""
    if maker == "canny":
        return canny(images, low, high)
    if maker == "edges":
        return soft_edges(images)
    if maker == "silhouette":
        return silhouette(images, threshold)
    raise ValueError(f"`condition` must be one of {SOURCES}, got {maker!r}.")


@dataclass
class ConditionSpec:
    """Where each target's condition image comes from."""

    source: str = "folder"  # "folder" (same-name partners in `folder`) or a maker: canny, edges, silhouette
    folder: str | None = None
    low_threshold: float = 0.4  # canny
    high_threshold: float = 0.8  # canny
    threshold: float = 0.15  # silhouette

    def __post_init__(self):
        if self.source not in SOURCES:
            raise ValueError(f"`condition` must be one of {SOURCES}, got {self.source!r}.")
        if self.source == "folder" and not (self.folder and str(self.folder).strip()):
            raise ValueError("`condition_folder` is empty: give the folder of condition images (same names as the "
                             "targets), or pick a condition maker (canny, edges, silhouette).")
        if not 0.0 < self.low_threshold < self.high_threshold < 1.0:
            raise ValueError(f"`low_threshold` and `high_threshold` must satisfy 0 < low < high < 1, got "
                             f"{self.low_threshold}, {self.high_threshold}.")


def _pil(tensor: torch.Tensor) -> Image.Image:
    return Image.fromarray((tensor.clamp(0, 1).numpy() * 255).round().astype(np.uint8))


class ConditionSource:
    """The condition image of each dataset entry (checked for every entry up front)."""

    def __init__(self, spec: ConditionSpec, dataset_root: str | Path, entries: list):
        self.spec = spec
        self.partners = match_partners(dataset_root, spec.folder, entries) if spec.source == "folder" else {}

    def image_for(self, entry, target: Image.Image) -> Image.Image:
        """The condition of `entry` as an RGB image of the target's size (before any crop)."""
        if self.spec.source == "folder":
            return open_rgb(self.partners[entry.path])[0]
        pixels = torch.from_numpy(np.asarray(target.convert("RGB"), dtype=np.float32) / 255.0)[None]
        s = self.spec
        return _pil(make_condition(pixels, s.source, s.low_threshold, s.high_threshold, s.threshold)[0])


def match_partners(dataset_root: str | Path, condition_folder: str | Path, entries: list) -> dict[Path, Path]:
    """Target path -> condition path, matched by name (same sub-folder, or the condition folder's top level).

    Raises ValueError naming `condition_folder` for a missing or unreadable folder, targets without a partner,
    conditions without a target, two conditions of one name, and a condition of another size than its target."""
    root, folder = Path(dataset_root).expanduser(), Path(condition_folder).expanduser()
    if not folder.is_dir():
        raise ValueError(f"`condition_folder` {str(folder)!r} is not a folder. Give the folder of condition images.")
    if folder.resolve() == root.resolve():
        raise ValueError("`condition_folder` is the dataset folder itself: keep condition images in a folder of their own, "
                         "named like their targets.")
    exts = image_extensions()
    by_name: dict[tuple[str, str], list[Path]] = defaultdict(list)
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.suffix.lower() in exts and not path.name.startswith("."):
            by_name[(path.parent.relative_to(folder).as_posix(), path.stem)].append(path)
    doubles = [paths for paths in by_name.values() if len(paths) > 1]
    if doubles:
        raise ValueError(f"`condition_folder` has several condition images of one name: "
                         f"{', '.join(p.name for p in doubles[0])}. Keep one per target.")
    partners, used, missing, wrong_size = {}, set(), [], []
    for entry in entries:
        rel = entry.path.relative_to(root)
        key = next((k for k in ((rel.parent.as_posix(), rel.stem), (".", rel.stem)) if k in by_name), None)
        if key is None:
            missing.append(rel.as_posix())
            continue
        path = by_name[key][0]
        used.add(key)
        try:
            size = inspect_image(path).size
        except UnreadableImage as exc:
            raise ValueError(f"`condition_folder`: the condition of {rel.as_posix()} cannot be read ({exc}).") from exc
        if size != tuple(entry.size):
            wrong_size.append(f"{path.name} is {size[0]}x{size[1]}, its target {rel.as_posix()} {entry.size[0]}x{entry.size[1]}")
        partners[entry.path] = path
    if missing:
        raise ValueError(f"`condition_folder` {str(folder)!r} has no condition image for {len(missing)} of {len(entries)} "
                         f"targets: {', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''}. Give every target a "
                         "condition image of the same name (any image extension).")
    orphans = sorted(f"{k[0]}/{k[1]}".removeprefix("./") for k in by_name if k not in used)
    if orphans:
        raise ValueError(f"`condition_folder` has {len(orphans)} condition image(s) without a target (the counts differ): "
                         f"{', '.join(orphans[:10])}. Remove them or add their targets to the dataset folder.")
    if wrong_size:
        raise ValueError(f"`condition_folder`: condition and target sizes differ ({'; '.join(wrong_size[:5])}). "
                         "A condition image must have its target's exact size.")
    return partners
