"""Safe output files: names that cannot escape their folder, never overwritten, written atomically."""
from __future__ import annotations

import os
import re
import secrets
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

_UNSAFE_CHARS = re.compile(r"[^A-Za-z0-9._\- ]+")


def safe_stem(name: str, *, input_name: str = "name") -> str:
    """Return `name` as a plain file stem, or raise ValueError naming `input_name`.

    Sub-folders (`a/b`) are allowed as in ComfyUI's own save nodes, but never `..`, absolute
    paths or characters that are unsafe in a file name.
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"`{input_name}` is empty: give the output a name such as 'my_subject'.")
    parts = name.replace("\\", "/").strip().strip("/").split("/")
    if name.strip().startswith(("/", "\\")) or any(p in ("", ".", "..") for p in parts):
        raise ValueError(
            f"`{input_name}`={name!r} must stay inside the output folder: no '..', no absolute "
            "path. Use a plain name such as 'my_subject' or 'project/my_subject'."
        )
    cleaned = [_UNSAFE_CHARS.sub("_", p) for p in parts]
    return "/".join(cleaned)


def unique_path(folder: str | os.PathLike, stem: str, suffix: str) -> Path:
    """A path `folder/stem<suffix>` that does not exist yet (`stem_00001<suffix>`, ... otherwise)."""
    folder = Path(folder)
    candidate = folder / f"{stem}{suffix}"
    counter = 1
    while candidate.exists():
        candidate = folder / f"{stem}_{counter:05d}{suffix}"
        counter += 1
    return candidate


def resolve_inside(folder: str | os.PathLike, relative: str) -> Path:
    """Join and check that the result stays inside `folder` (also through symlinks)."""
    base = Path(folder).resolve()
    target = (base / relative).resolve()
    if base != target and base not in target.parents:
        raise ValueError(f"{relative!r} points outside {base}")
    return target


@contextmanager
def atomic_output(final_path: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path in the target folder; on success rename it to `final_path`.

    On any error the temporary file is removed, so no half-written file is ever visible.
    Without `overwrite` an existing `final_path` is never replaced (the link fails instead).
    """
    final_path = Path(final_path)
    final_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_temporary(final_path)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        if overwrite:
            os.replace(tmp, final_path)
        else:
            _publish_new(tmp, final_path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _new_temporary(final_path: Path) -> Path:
    """An empty hidden file beside `final_path`, with the permissions a plain open() gives (mkstemp's are 0600:
    a model saved by a server running as root would be unreadable to the user)."""
    for _ in range(100):
        tmp = final_path.parent / f".{final_path.name}.{secrets.token_hex(4)}.partial"
        try:
            os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
            return tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a temporary file beside {final_path}")


def _publish_new(tmp: Path, final_path: Path) -> None:
    """Give `tmp` the name `final_path`, never replacing a file that exists (FileExistsError instead)."""
    try:
        os.link(tmp, final_path)  # refuses an existing target: a name taken meanwhile is never clobbered
    except FileExistsError:
        raise
    except OSError:
        # No hard links here (FAT/exFAT, many FUSE and SMB mounts): reserve the name exclusively, then rename over
        # the reservation, which is ours.
        os.close(os.open(final_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
        os.replace(tmp, final_path)
        return
    tmp.unlink()


def write_new_file(folder: str | os.PathLike, stem: str, suffix: str, writer: Callable[[Path], None]) -> Path:
    """Write through `writer(tmp_path)` to a fresh, never-overwritten file; return its path."""
    for _ in range(100):
        path = unique_path(folder, stem, suffix)
        try:
            with atomic_output(path) as tmp:
                writer(tmp)
            return path
        except FileExistsError:
            continue  # another writer took the name between the check and the link
    raise FileExistsError(f"could not find a free file name for {stem}{suffix} in {folder}")
