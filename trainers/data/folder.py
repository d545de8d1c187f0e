"""A folder of images with same-name captions, kohya-style (`N_name` sub-folders repeat N times).

Layout of a dataset folder (and of each ``N_name`` sub-folder, whose images count N times):

- ``name.png`` / ``.jpg`` / ``.jpeg`` / ``.webp`` / ``.bmp`` / ``.tif`` / ``.tiff``: training images
  (``.avif``/``.heic``/``.heif`` too when Pillow has a reader for them);
- ``name.txt`` (or ``name.caption``): its caption, UTF-8 (other encodings are read with a fallback
  and a warning); no caption means the instance prompt;
- ``name_mask.png`` (any image extension): an optional loss mask for ``name.*``, same size, white =
  learn, black = ignore. Mask files are not training images.

``scan_dataset`` opens and decodes every candidate once. Files that cannot be used (corrupt,
truncated, not an image, unsupported format, too large) are skipped and reported together in one
warning; problems that need a decision from the user (two images with the same name) raise.
No ComfyUI imports here.
"""
from __future__ import annotations

import logging
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from .captions import caption_lines
from .images import UnreadableImage, inspect_image, load_mask

log = logging.getLogger("comfyui-personalize")

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}
OPTIONAL_IMAGE_EXTENSIONS = {".avif", ".heic", ".heif"}  # used when a Pillow plugin reads them
UNSUPPORTED_EXTENSIONS = {
    ".gif", ".psd", ".psb", ".xcf", ".kra", ".svg", ".jxl", ".exr", ".hdr", ".ico", ".tga",
    ".dng", ".cr2", ".cr3", ".nef", ".arw", ".raf", ".orf", ".rw2",
} | OPTIONAL_IMAGE_EXTENSIONS
CAPTION_EXTENSIONS = (".txt", ".caption")
MASK_SUFFIX = "_mask"
CAPTION_FALLBACK_ENCODINGS = ("cp1252", "latin-1")
_REPEAT_FOLDER = re.compile(r"^(\d+)_(.+)$")


@dataclass
class ImageEntry:
    """One training image. `size` is (width, height) after EXIF orientation; `has_alpha` says the
    image has real transparency (usable as a loss mask); `mask_path` is its ``name_mask.*`` file."""
    path: Path
    caption: str
    repeats: int
    mask_path: Path | None = None
    size: tuple[int, int] = (0, 0)
    has_alpha: bool = False


@dataclass
class ScanResult:
    """The usable images, the files skipped with the reason for each, and every warning issued."""
    entries: list[ImageEntry]
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def with_trigger(caption: str, trigger_word: str, per_line: bool = False) -> str:
    """Prepend the trigger word unless the caption already names it; with ``per_line``, to each line of a caption
    of several lines (they are alternatives: see ``captions.CaptionOptions.caption_choices``)."""
    trigger = trigger_word.strip()
    lines = caption_lines(caption)
    if per_line and len(lines) > 1:
        return "\n".join(with_trigger(line, trigger) for line in lines)
    if not trigger or re.search(rf"(?<!\w){re.escape(trigger)}(?!\w)", caption):
        return caption
    return f"{trigger}, {caption}" if caption else trigger


def image_extensions() -> set[str]:
    """The extensions used as training images: the standard set plus AVIF/HEIC/HEIF when a Pillow
    plugin (e.g. pillow-heif) registered a reader."""
    return IMAGE_EXTENSIONS | (OPTIONAL_IMAGE_EXTENSIONS & set(Image.registered_extensions()))


def read_caption_file(path: Path) -> tuple[str, str | None]:
    """The stripped text of a caption file and, when it was not UTF-8 (or UTF-16 with a BOM),
    the fallback encoding used to read it."""
    raw = path.read_bytes()
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        return raw.decode("utf-16").strip(), None
    try:
        return raw.decode("utf-8-sig").strip(), None
    except UnicodeDecodeError:
        pass
    for encoding in CAPTION_FALLBACK_ENCODINGS:
        try:
            return raw.decode(encoding).strip(), encoding
        except UnicodeDecodeError:
            continue
    raise AssertionError("latin-1 decodes any bytes")  # pragma: no cover


def _check_root(folder: str | Path) -> Path:
    if not str(folder).strip():
        raise ValueError("`folder` is empty: give the path of a folder of training images.")
    root = Path(folder).expanduser()
    if not root.exists():
        raise ValueError(f"`folder` {str(root)!r} does not exist. Give the path of a folder of training images "
                         "(absolute, or relative to ComfyUI's input folder).")
    if not root.is_dir():
        raise ValueError(f"`folder` {str(root)!r} is a file, not a folder of images.")
    return root


def _listing(directory: Path) -> list[Path]:
    try:
        return sorted(p for p in directory.iterdir() if not p.name.startswith("."))  # no .DS_Store, ._x.png
    except OSError as exc:
        raise ValueError(f"`folder` {str(directory)!r} cannot be listed ({exc}).") from exc


def _groups(root: Path, image_exts: set[str], notes: list[str]) -> list[tuple[Path, int]]:
    """The root (repeats 1) and its kohya ``N_name`` sub-folders; other sub-folders holding
    images are reported, since their images are not used."""
    groups = [(root, 1)]
    for sub in _listing(root):
        if not sub.is_dir():
            continue
        match = _REPEAT_FOLDER.match(sub.name)
        if match and int(match.group(1)) > 0:
            groups.append((sub, int(match.group(1))))
        elif _has_images(sub, image_exts):
            why = "a repeat count of 0 means no use" if match else "only kohya 'N_name' sub-folders are read"
            notes.append(f"sub-folder {sub} is ignored ({why}); name it like '3_{sub.name}' to train on its "
                         "images 3 times per epoch.")
    return groups


def _has_images(directory: Path, image_exts: set[str]) -> bool:
    try:
        return any(p.suffix.lower() in image_exts for p in _listing(directory))
    except ValueError:  # unreadable sub-folder: it is not used anyway
        return False


def _paths(paths: list[Path], root: Path) -> str:
    return ", ".join(str(p.relative_to(root)) for p in paths)


def scan_dataset(folder: str | Path, *, trigger_word: str = "", instance_prompt: str = "",
                 caption_choices: bool = True) -> ScanResult:
    """Find, verify and caption the images of a dataset folder (see the module docstring).

    Raises ValueError naming `folder` when it is missing, empty or has no usable image (listing
    what was skipped), and when two images in one folder share a name (``a.png`` and ``a.jpg``).
    Everything else is logged as warnings (one per kind, each listing its files) and returned."""
    root = _check_root(folder)
    image_exts = image_extensions()
    notes: list[str] = []
    groups = _groups(root, image_exts, notes)
    entries: list[ImageEntry] = []
    skipped: list[tuple[Path, str]] = []
    orphan_captions: list[Path] = []
    orphan_masks: list[Path] = []
    recoded: list[str] = []
    ignored_captions: list[Path] = []
    bad_masks: list[str] = []
    duplicates: list[list[Path]] = []

    uncaptioned: list[Path] = []
    for group, repeats in groups:
        # kohya: an image without a caption file in `N_name` is captioned with the name (its class tokens).
        folder_caption = _REPEAT_FOLDER.match(group.name).group(2).strip() if group != root else ""
        images: dict[str, list[Path]] = defaultdict(list)
        masks: dict[str, list[Path]] = defaultdict(list)
        captions: dict[str, list[Path]] = defaultdict(list)
        other_stems: set[str] = set()
        for path in _listing(group):
            if not path.is_file():
                continue
            ext = path.suffix.lower()
            if ext in image_exts:
                if path.stem.lower().endswith(MASK_SUFFIX) and len(path.stem) > len(MASK_SUFFIX):
                    masks[path.stem[:-len(MASK_SUFFIX)]].append(path)
                else:
                    images[path.stem].append(path)
            elif ext in UNSUPPORTED_EXTENSIONS:
                other_stems.add(path.stem)
                skipped.append((path, f"unsupported format {ext}: {path} (convert it to PNG or JPEG to use it)"))
            elif ext in CAPTION_EXTENSIONS:
                captions[path.stem].append(path)

        duplicates += [paths for paths in images.values() if len(paths) > 1]
        duplicates += [paths for paths in masks.values() if len(paths) > 1]
        for stem, paths in masks.items():
            if stem not in images and stem not in other_stems:
                orphan_masks.extend(paths)
        for stem, paths in captions.items():
            if stem not in images and stem not in other_stems:
                orphan_captions.extend(paths)
        if duplicates:
            continue  # raised below, after every folder was looked at

        for stem, (path,) in images.items():
            try:
                info = inspect_image(path)
            except UnreadableImage as exc:
                skipped.append((path, str(exc)))
                continue
            mask_path = masks[stem][0] if stem in masks else None
            if mask_path is not None:
                try:
                    load_mask(mask_path, info.size, image_path=path)
                except ValueError as exc:  # unreadable or the wrong size: kept, so masked training stops on it
                    bad_masks.append(str(exc))
            caption = ""
            files = sorted(captions.get(stem, []), key=lambda p: CAPTION_EXTENSIONS.index(p.suffix.lower()))
            if files:
                caption, encoding = read_caption_file(files[0])
                if encoding:
                    recoded.append(f"{files[0].relative_to(root)} (read as {encoding})")
                ignored_captions.extend(files[1:])
            caption = caption or instance_prompt.strip() or folder_caption
            if not caption:
                uncaptioned.append(path)
            caption = with_trigger(caption, trigger_word, per_line=caption_choices)
            entries.append(ImageEntry(path, caption, repeats, mask_path=mask_path, size=info.size,
                                      has_alpha=info.has_alpha))

    if duplicates:
        pairs = "; ".join(" and ".join(str(p.relative_to(root)) for p in paths) for paths in duplicates)
        raise ValueError(f"`folder` {str(root)!r} has images that share a name: {pairs}. Captions and masks are "
                         "matched by name, so keep only one file per name (delete or rename the others).")

    skipped_lines = "\n".join(f"  - {reason}" for _, reason in skipped)
    if not entries:
        if skipped:
            raise ValueError(f"`folder` {str(root)!r} has no images that can be used; every candidate was "
                             f"skipped:\n{skipped_lines}")
        raise ValueError(f"`folder` {str(root)!r} has no images ({', '.join(sorted(image_exts))}), "
                         "neither directly nor in kohya 'N_name' sub-folders. Add training images.")

    warnings: list[str] = []
    if skipped:
        warnings.append(f"dataset {root}: skipped {len(skipped)} file(s) that cannot be used for training:\n"
                        f"{skipped_lines}")
    if recoded:
        warnings.append(f"dataset {root}: caption file(s) not in UTF-8, read with a fallback encoding (check "
                        f"the text, or save them as UTF-8): {', '.join(recoded)}")
    if orphan_captions:
        warnings.append(f"dataset {root}: caption file(s) without an image, not used: "
                        f"{_paths(orphan_captions, root)}")
    if ignored_captions:
        warnings.append(f"dataset {root}: caption file(s) ignored because a .txt caption with the same name "
                        f"exists: {_paths(ignored_captions, root)}")
    if uncaptioned:
        warnings.append(f"dataset {root}: image(s) without a caption file, and no `instance_prompt` (or kohya "
                        f"'N_name' folder name) to caption them: they train on "
                        f"{'the trigger word alone' if trigger_word.strip() else 'the empty caption'}: "
                        f"{_paths(uncaptioned, root)}")
    if orphan_masks:
        warnings.append(f"dataset {root}: mask file(s) without an image, not used (an image whose name ends in "
                        f"'{MASK_SUFFIX}' is read as a mask; rename it to train on it): {_paths(orphan_masks, root)}")
    if bad_masks:
        warnings.append(f"dataset {root}: mask problem(s); training with masked loss stops on them:\n"
                        + "\n".join(f"  - {text}" for text in bad_masks))
    warnings += [f"dataset {root}: {note}" for note in notes]
    for text in warnings:
        log.warning("%s", text)
    return ScanResult(entries, skipped, warnings)


def scan_folder(folder: str | Path, *, trigger_word: str = "", instance_prompt: str = "") -> list[ImageEntry]:
    """List images with their caption and repeat count; raise ValueError naming what is wrong."""
    return scan_dataset(folder, trigger_word=trigger_word, instance_prompt=instance_prompt).entries
