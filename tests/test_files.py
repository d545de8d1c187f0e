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
