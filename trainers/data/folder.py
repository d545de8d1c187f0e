"""A folder of images with same-name captions, kohya-style (`N_name` sub-folders repeat N times)."""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}
CAPTION_EXTENSIONS = (".txt", ".caption")
_REPEAT_FOLDER = re.compile(r"^(\d+)_(.+)$")


@dataclass
class ImageEntry:
    path: Path
    caption: str
    repeats: int


def _read_caption(image: Path) -> str | None:
    for ext in CAPTION_EXTENSIONS:
        candidate = image.with_suffix(ext)
        if candidate.is_file():
            return candidate.read_text(encoding="utf-8", errors="replace").strip()
    return None


def with_trigger(caption: str, trigger_word: str) -> str:
    """Prepend the trigger word unless the caption already names it."""
    trigger = trigger_word.strip()
    if not trigger or re.search(rf"(?<!\w){re.escape(trigger)}(?!\w)", caption):
        return caption
    return f"{trigger}, {caption}" if caption else trigger


def scan_folder(folder: str | Path, *, trigger_word: str = "", instance_prompt: str = "") -> list[ImageEntry]:
    """List images with their caption and repeat count; raise ValueError naming what is wrong."""
    root = Path(folder).expanduser()
    if not str(folder).strip():
        raise ValueError("`folder` is empty: give the path of a folder of training images.")
    if not root.exists():
        raise ValueError(f"`folder` {str(root)!r} does not exist. Give the path of a folder of training images "
                         "(absolute, or relative to ComfyUI's input folder).")
    if not root.is_dir():
        raise ValueError(f"`folder` {str(root)!r} is a file, not a folder of images.")
    groups: list[tuple[Path, int]] = []
    sub_repeat = [(p, int(m.group(1))) for p in sorted(root.iterdir()) if p.is_dir() and (m := _REPEAT_FOLDER.match(p.name))]
    groups.append((root, 1))
    groups.extend(sub_repeat)
    entries = []
    for group, repeats in groups:
        for path in sorted(group.iterdir()):
            if path.suffix.lower() not in IMAGE_EXTENSIONS or not path.is_file():
                continue
            caption = _read_caption(path)
            if caption is None or not caption:
                caption = instance_prompt.strip()
            caption = with_trigger(caption, trigger_word)
            entries.append(ImageEntry(path, caption, repeats))
    if not entries:
        raise ValueError(f"`folder` {str(root)!r} has no images ({', '.join(sorted(IMAGE_EXTENSIONS))}), "
                         "neither directly nor in kohya 'N_name' sub-folders. Add training images.")
    return entries


def load_image(path: Path, resolution: tuple[int, int]) -> torch.Tensor:
    """RGB image resized to cover `resolution` (w, h) and center-cropped: [H, W, 3] floats in 0..1."""
    try:
        with Image.open(path) as img:
            img = ImageOps.exif_transpose(img)
            if img.mode == "I":
                img = img.point(lambda v: v * (1 / 255))
            img = img.convert("RGB")
            img.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ValueError(f"cannot read image {path.name} in the dataset folder ({exc}). Remove or replace the file.") from exc
    width, height = resolution
    scale = max(width / img.width, height / img.height)
    resized = img.resize((max(width, round(img.width * scale)), max(height, round(img.height * scale))), Image.Resampling.LANCZOS)
    left = (resized.width - width) // 2
    top = (resized.height - height) // 2
    cropped = resized.crop((left, top, left + width, top + height))
    return torch.from_numpy(np.asarray(cropped, dtype=np.float32) / 255.0)
