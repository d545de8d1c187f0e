"""Output files never escape their folder, never overwrite, and are never half-written."""
import pytest


@pytest.fixture
def files(comfy_runtime):
    return comfy_runtime.pack_import("trainers.formats.files")


@pytest.mark.parametrize("bad", ["../evil", "a/../../b", "/etc/passwd", "", "  ", "..", "a//b"])
def test_names_cannot_escape(files, bad):
    with pytest.raises(ValueError, match="`name`"):
        files.safe_stem(bad)


def test_sub_folders_and_odd_characters(files):
    assert files.safe_stem("proj/my lora") == "proj/my lora"
    assert files.safe_stem("a:b*c") == "a_b_c"


def test_existing_names_get_a_numbered_suffix(files, tmp_path):
    first = files.write_new_file(tmp_path, "x", ".bin", lambda p: p.write_bytes(b"1"))
    second = files.write_new_file(tmp_path, "x", ".bin", lambda p: p.write_bytes(b"2"))
    assert first.name == "x.bin" and second.name == "x_00001.bin"
    assert first.read_bytes() == b"1" and second.read_bytes() == b"2"


def test_a_failed_write_leaves_nothing(files, tmp_path):
    def broken(path):
        path.write_bytes(b"partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        files.write_new_file(tmp_path, "x", ".bin", broken)
    assert list(tmp_path.iterdir()) == []


def test_saved_files_get_the_permissions_of_a_plain_open(files, tmp_path):
    """Not mkstemp's 0600: a model saved by a server running as another user must stay readable."""
    import os
    import stat
    umask = os.umask(0o022)
    os.umask(umask)
    path = files.write_new_file(tmp_path, "x", ".bin", lambda p: p.write_bytes(b"1"))
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask


def test_a_folder_without_hard_links_still_never_overwrites(files, tmp_path, monkeypatch):
    """FAT/exFAT and many network mounts refuse link(): the name is reserved exclusively instead."""
    import errno
    import os

    def no_links(src, dst):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    first = files.write_new_file(tmp_path, "x", ".bin", lambda p: p.write_bytes(b"1"))
    second = files.write_new_file(tmp_path, "x", ".bin", lambda p: p.write_bytes(b"2"))
    assert (first.name, first.read_bytes()) == ("x.bin", b"1") and (second.name, second.read_bytes()) == ("x_00001.bin", b"2")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.bin", "x_00001.bin"]


def test_names_under_a_symlinked_model_folder_stay_relative(comfy_runtime, tmp_path, monkeypatch):
    """Stock loaders list files relative to the model folder; a symlinked folder (docker volumes, other disks)
    made the returned names absolute paths that LoraLoader and embedding:name cannot use."""
    import folder_paths
    outputs = comfy_runtime.pack_import("nodes._outputs")
    real = tmp_path / "disk" / "loras"
    real.mkdir(parents=True)
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "loras").symlink_to(real)
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "loras",
                        ([str(tmp_path / "models" / "loras")], folder_paths.supported_pt_extensions))
    out = outputs.output_target("loras", "proj/subject")
    assert out.shown(out.target.with_suffix(".safetensors")) == "proj/subject.safetensors"
