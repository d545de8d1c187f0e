"""Where save nodes write: inside one of ComfyUI's model folders, under a name that cannot leave it."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import folder_paths

from ..trainers.formats.files import resolve_inside, safe_stem


@dataclass(frozen=True)
class OutputTarget:
    root: Path    # the first folder ComfyUI registers for the kind ("loras", "embeddings", ...)
    target: Path  # root / name, without extension; the writer picks a free numbered name beside it

    def shown(self, path: Path) -> str:
        """`path` as stock loaders list it: relative to the model folder, with forward slashes."""
        path = Path(path)
        return path.relative_to(self.root).as_posix() if path.is_relative_to(self.root) else str(path)


def output_target(kind: str, name: str, input_name: str = "name") -> OutputTarget:
    """The save location of `name` (may hold sub-folders) in ComfyUI's `kind` model folder."""
    # Resolved as the target is: under a symlinked model folder, names would otherwise come back as absolute paths.
    root = Path(folder_paths.get_folder_paths(kind)[0]).resolve()
    return OutputTarget(root, resolve_inside(root, safe_stem(name, input_name=input_name)))
