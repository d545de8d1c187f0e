"""Odd and broken dataset images: every file is generated here (PIL, or a hand-written PNG where
PIL cannot write the format) and must either come out as correct 8-bit RGB or be reported by name."""
import json
import logging
import struct
import subprocess
import sys
import textwrap
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile, ImageOps


@pytest.fixture(scope="module")
def images(comfy_runtime):
    return comfy_runtime.pack_import("trainers.data.images")


@pytest.fixture(scope="module")
def folder_mod(comfy_runtime):
    return comfy_runtime.pack_import("trainers.data.folder")


def _training_pixels(comfy_runtime, path, size):
    """What the dataset builder feeds the VAE: open_rgb, then cover-resize and center crop."""
    images = comfy_runtime.pack_import("trainers.data.images")
    buckets = comfy_runtime.pack_import("trainers.data.buckets")
    crop, _ = buckets.resize_and_crop(images.open_rgb(path)[0], size, crop="center")
    return np.asarray(crop, dtype=np.float32) / 255.0


def _png(path, width, height, color_type, bit_depth, rows):
    """Write a PNG by hand (filter 0 on every row): `rows` yields each row's raw bytes. Streams
    through zlib, so a huge, mostly uniform image costs almost no memory."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    packer = zlib.compressobj(9)
    idat = b"".join(packer.compress(b"\x00" + row) for row in rows) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def _pixels(image):
    return np.asarray(image).astype(int)


# --- open_rgb: colour modes ----------------------------------------------------------------------

def test_cmyk_jpeg(images, tmp_path):
    cmyk = Image.new("CMYK", (32, 32), (0, 255, 255, 0))  # red
    cmyk.paste((255, 0, 0, 0), (16, 0, 32, 32))  # cyan on the right
    cmyk.save(tmp_path / "cmyk.jpg", quality=95)
    assert Image.open(tmp_path / "cmyk.jpg").mode == "CMYK"
    rgb, alpha = images.open_rgb(tmp_path / "cmyk.jpg")
    assert rgb.mode == "RGB" and rgb.size == (32, 32) and alpha is None
    px = _pixels(rgb)
    assert np.abs(px[16, 4] - (255, 0, 0)).max() < 12
    assert np.abs(px[16, 28] - (0, 255, 255)).max() < 12


def test_16bit_gray_png_gradient_scaled_not_clipped(images, tmp_path):
    gradient = np.tile((np.arange(256, dtype=np.uint32) * 257).astype(np.uint16), (8, 1))  # 0..65535
    Image.fromarray(gradient).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode == "I;16"
    assert _pixels(Image.open(tmp_path / "g16.png").convert("L"))[0, 128] == 255  # Pillow clips
    rgb, alpha = images.open_rgb(tmp_path / "g16.png")
    px = _pixels(rgb)
    assert rgb.mode == "RGB" and alpha is None
    assert (px[:, :, 0] == np.arange(256)).all() and (px[:, :, 0] == px[:, :, 2]).all()


def test_32bit_int_tiff_holding_16bit_values(images, tmp_path):
    values = np.tile(np.arange(0, 65536, 257, dtype=np.int32), (4, 1))
    Image.fromarray(values, "I").save(tmp_path / "i32.tif")
    assert Image.open(tmp_path / "i32.tif").mode == "I"
    px = _pixels(images.open_rgb(tmp_path / "i32.tif")[0])
    assert (px[0, :, 1] == np.arange(256)).all()


def test_16bit_rgb_and_rgba_png(images, tmp_path):
    rgb16 = np.zeros((2, 4, 3), dtype=">u2")
    rgb16[..., 0], rgb16[..., 1], rgb16[..., 2] = 0xFFFF, 0x8000, 0x0000
    _png(tmp_path / "rgb16.png", 4, 2, 2, 16, (row.tobytes() for row in rgb16))
    rgb, alpha = images.open_rgb(tmp_path / "rgb16.png")
    assert alpha is None and tuple(_pixels(rgb)[1, 3]) == (255, 128, 0)

    rgba16 = np.zeros((2, 4, 4), dtype=">u2")
    rgba16[..., 0], rgba16[..., 3] = 0xFFFF, 0xFFFF
    rgba16[0, 0, 3] = 0  # one fully transparent pixel
    _png(tmp_path / "rgba16.png", 4, 2, 6, 16, (row.tobytes() for row in rgba16))
    rgb, alpha = images.open_rgb(tmp_path / "rgba16.png")
    assert tuple(_pixels(rgb)[0, 0]) == (255, 255, 255) and tuple(_pixels(rgb)[1, 1]) == (255, 0, 0)
    assert alpha is not None and _pixels(alpha)[0, 0] == 0 and _pixels(alpha)[1, 1] == 255


def test_palette_png_with_and_without_transparency(images, tmp_path):
    pal = Image.new("P", (8, 4), 1)
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    pal.paste(0, (0, 0, 4, 4))  # left half: index 0
    pal.save(tmp_path / "opaque.png")
    pal.save(tmp_path / "transparent.png", transparency=0)
    rgb, alpha = images.open_rgb(tmp_path / "opaque.png")
    assert alpha is None and tuple(_pixels(rgb)[0, 0]) == (0, 0, 0) and tuple(_pixels(rgb)[0, 7]) == (255, 0, 0)
    rgb, alpha = images.open_rgb(tmp_path / "transparent.png")
    assert tuple(_pixels(rgb)[0, 0]) == (255, 255, 255)  # transparent -> white
    assert tuple(_pixels(rgb)[0, 7]) == (255, 0, 0)
    assert alpha.mode == "L" and _pixels(alpha)[0, 0] == 0 and _pixels(alpha)[0, 7] == 255
    assert images.inspect_image(tmp_path / "transparent.png").has_alpha
    assert not images.inspect_image(tmp_path / "opaque.png").has_alpha


def test_rgba_and_la_composited_on_white(images, tmp_path):
    rgba = Image.new("RGBA", (4, 4), (0, 0, 255, 255))
    rgba.putpixel((0, 0), (0, 0, 0, 128))
    rgba.putpixel((1, 0), (0, 0, 0, 0))
    rgba.save(tmp_path / "rgba.png")
    rgb, alpha = images.open_rgb(tmp_path / "rgba.png")
    px = _pixels(rgb)
    assert abs(px[0, 0] - 127).max() <= 1 and tuple(px[0, 1]) == (255, 255, 255) and tuple(px[2, 2]) == (0, 0, 255)
    assert tuple(_pixels(alpha)[0, :3]) == (128, 0, 255)

    Image.new("RGBA", (4, 4), (9, 9, 9, 255)).save(tmp_path / "opaque_rgba.png")
    rgb, alpha = images.open_rgb(tmp_path / "opaque_rgba.png")
    assert alpha is None and tuple(_pixels(rgb)[0, 0]) == (9, 9, 9)

    la = Image.new("LA", (4, 4), (0, 255))
    la.putpixel((3, 3), (0, 0))
    la.save(tmp_path / "la.png")
    rgb, alpha = images.open_rgb(tmp_path / "la.png")
    assert tuple(_pixels(rgb)[3, 3]) == (255, 255, 255) and tuple(_pixels(rgb)[0, 0]) == (0, 0, 0)
    assert _pixels(alpha)[3, 3] == 0


@pytest.mark.parametrize("mode,value,expected", [("L", 77, 77), ("1", 1, 255)])
def test_grayscale_and_bilevel(images, tmp_path, mode, value, expected):
    Image.new(mode, (5, 3), value).save(tmp_path / "gray.png")
    rgb, alpha = images.open_rgb(tmp_path / "gray.png")
    assert rgb.mode == "RGB" and alpha is None and (_pixels(rgb) == expected).all()


def test_exif_orientation_6_rotates(images, folder_mod, comfy_runtime, tmp_path):
    stored = Image.new("RGB", (60, 40), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 20, 40))  # left third red in the stored pixels
    exif = Image.Exif()
    exif[0x0112] = 6  # display = stored rotated 90 degrees clockwise
    stored.save(tmp_path / "rot.jpg", exif=exif, quality=95)
    assert Image.open(tmp_path / "rot.jpg").size == (60, 40)
    rgb, _ = images.open_rgb(tmp_path / "rot.jpg")
    assert rgb.size == (40, 60)
    px = _pixels(rgb)
    assert px[:15, :, 0].mean() > 230 and px[:15, :, 2].mean() < 30  # the red stripe is now on top
    assert px[30:, :, 2].mean() > 230 and px[30:, :, 0].mean() < 30
    assert images.inspect_image(tmp_path / "rot.jpg").size == (40, 60)
    (entry,) = folder_mod.scan_folder(tmp_path)
    assert entry.size == (40, 60) and not entry.has_alpha
    tensor = _training_pixels(comfy_runtime, tmp_path / "rot.jpg", (32, 48))
    assert tensor.shape == (48, 32, 3) and tensor[:8, :, 0].mean() > 0.9


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_matches_pillow(images, tmp_path, orientation):
    stored = Image.fromarray(np.random.default_rng(orientation).integers(0, 256, (30, 50, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = orientation
    stored.save(tmp_path / "o.png", exif=exif)  # PNG eXIf chunk: lossless, so pixels compare exactly
    expected = ImageOps.exif_transpose(Image.open(tmp_path / "o.png")).convert("RGB")
    rgb, _ = images.open_rgb(tmp_path / "o.png")
    assert rgb.size == expected.size and (_pixels(rgb) == _pixels(expected)).all()
    assert images.inspect_image(tmp_path / "o.png").size == expected.size


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")
def test_broken_exif_does_not_make_the_image_unreadable(images, tmp_path):
    Image.new("RGB", (8, 6), (1, 2, 3)).save(tmp_path / "bad_exif.jpg", exif=b"Exif\x00\x00MM\x00*garbage")
    rgb, _ = images.open_rgb(tmp_path / "bad_exif.jpg")
    assert rgb.size == (8, 6)


# --- size limits ---------------------------------------------------------------------------------

def test_huge_png_above_pil_limit_opens_with_bounded_memory(images, tmp_path):
    """14000x14000 = 196 megapixels: Pillow's own Image.open refuses it (above 2 x MAX_IMAGE_PIXELS).
    A 1-bit PNG that is black but for a white square compresses to a few kB. Measured in a child
    process so that the peak RSS belongs to this read alone."""
    side, square = 14000, (6000, 8000)
    dark, lit = bytes(side // 8), bytearray(side // 8)
    lit[square[0] // 8:square[1] // 8] = b"\xff" * ((square[1] - square[0]) // 8)
    lit = bytes(lit)
    path = tmp_path / "huge.png"
    _png(path, side, side, 0, 1, (lit if square[0] <= y < square[1] else dark for y in range(side)))
    assert path.stat().st_size < 200_000
    with pytest.raises(Image.DecompressionBombError):
        Image.open(path)
    child = textwrap.dedent(f"""
        import importlib.util, json, sys, time
        spec = importlib.util.spec_from_file_location("robust_images", {images.__file__!r})
        images = sys.modules[spec.name] = importlib.util.module_from_spec(spec); spec.loader.exec_module(images)
        from PIL import Image
        def peak_mb():  # VmHWM: this process's own peak (ru_maxrss would include the parent's after fork)
            try:
                status = open("/proc/self/status").read()
            except OSError:  # not Linux: no measurement
                return 0.0
            return int(status.split("VmHWM:")[1].split()[0]) / 1024
        base = peak_mb()
        start = time.perf_counter()
        info = images.inspect_image({str(path)!r})
        rgb, alpha = images.open_rgb({str(path)!r}, target=(512, 512))
        centre = rgb.getpixel((rgb.width // 2, rgb.height // 2)); corner = rgb.getpixel((0, 0))
        print(json.dumps(dict(size=info.size, reduced=rgb.size, centre=centre, corner=corner, alpha=alpha is None,
                              seconds=time.perf_counter() - start, limit=Image.MAX_IMAGE_PIXELS,
                              peak_mb=peak_mb() - base)))
    """)
    run = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["size"] == [side, side] and result["alpha"]
    assert 1024 <= min(result["reduced"]) < 2048  # reduced while decoding: at least 2x the 512 target
    assert result["centre"] == [255, 255, 255] and result["corner"] == [0, 0, 0]
    assert result["limit"] == Image.MAX_IMAGE_PIXELS  # Pillow's global limit is restored
    # the decoded bilevel image is 196 MB and its 8-bit copy another 196 MB; RGB would be 784 MB more
    assert result["peak_mb"] < 500, result
    assert result["seconds"] < 30, result


def test_above_our_cap_raises_naming_the_file(images, tmp_path, monkeypatch):
    Image.new("L", (200, 100)).save(tmp_path / "big.png")
    monkeypatch.setattr(images, "MAX_PIXELS", 100 * 100)
    with pytest.raises(ValueError, match=r"big\.png.*200x100.*100x100") as info:
        images.open_rgb(tmp_path / "big.png")
    assert isinstance(info.value, images.ImageTooLarge)


def test_large_jpeg_is_decoded_at_reduced_scale(images, tmp_path):
    Image.new("RGB", (4000, 3000), (10, 200, 30)).save(tmp_path / "large.jpg")
    full, _ = images.open_rgb(tmp_path / "large.jpg")
    small, _ = images.open_rgb(tmp_path / "large.jpg", target=(256, 256))
    assert full.size == (4000, 3000)
    assert small.size[1] >= 2 * 256 and small.size[0] < 4000 // 2
    assert np.abs(_pixels(small)[100, 100] - (10, 200, 30)).max() < 6


# --- broken files --------------------------------------------------------------------------------

def _noise(size=(96, 64)):
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


@pytest.mark.parametrize("name", ["cut.png", "cut.jpg"])
def test_truncated_files_raise_naming_the_file(images, tmp_path, monkeypatch, name):
    path = tmp_path / name
    _noise().save(path)
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    for load_truncated in (False, True):  # also when other code switched Pillow's leniency on
        monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", load_truncated)
        with pytest.raises(images.UnreadableImage, match=rf"{name}.*truncated") as info:
            images.open_rgb(path)
        assert info.value.path == path and str(path) in str(info.value)
        with pytest.raises(ValueError, match=name):
            images.inspect_image(path)
        assert ImageFile.LOAD_TRUNCATED_IMAGES is load_truncated


def test_non_image_bytes_with_png_extension(images, tmp_path):
    (tmp_path / "fake.png").write_bytes(b"this is not a PNG at all\n" * 10)
    with pytest.raises(images.UnreadableImage, match=r"fake\.png.*not an image"):
        images.open_rgb(tmp_path / "fake.png")


# --- masks ---------------------------------------------------------------------------------------

def test_mask_of_the_wrong_size(images, folder_mod, tmp_path, caplog):
    Image.new("RGB", (64, 48)).save(tmp_path / "cat.png")
    Image.new("L", (32, 32), 255).save(tmp_path / "cat_mask.png")
    with pytest.raises(ValueError, match=r"cat_mask\.png is 32x32 but its image cat\.png is 64x48"):
        images.load_mask(tmp_path / "cat_mask.png", (64, 48), image_path=tmp_path / "cat.png")
    with caplog.at_level(logging.WARNING, logger="comfyui-personalize"):
        result = folder_mod.scan_dataset(tmp_path)
    assert [e.path.name for e in result.entries] == ["cat.png"]
    assert "cat_mask.png is 32x32" in caplog.text and "cat.png" in caplog.text


def test_correct_mask_is_attached_and_not_a_training_image(images, folder_mod, tmp_path):
    Image.new("RGB", (40, 30), (5, 5, 5)).save(tmp_path / "dog.jpg")
    mask = Image.new("L", (40, 30), 0)
    mask.paste(255, (0, 0, 20, 30))
    mask.save(tmp_path / "dog_mask.png")
    painted = Image.new("RGBA", (40, 30), (0, 0, 0, 0))  # white painted on transparency
    painted.paste((255, 255, 255, 255), (20, 0, 40, 30))
    (tmp_path / "3_more").mkdir()
    Image.new("RGB", (40, 30)).save(tmp_path / "3_more" / "fox.png")
    painted.save(tmp_path / "3_more" / "fox_mask.png")
    entries = {e.path.name: e for e in folder_mod.scan_folder(tmp_path)}
    assert set(entries) == {"dog.jpg", "fox.png"}
    assert entries["dog.jpg"].mask_path == tmp_path / "dog_mask.png" and entries["dog.jpg"].size == (40, 30)
    assert entries["fox.png"].mask_path == tmp_path / "3_more" / "fox_mask.png" and entries["fox.png"].repeats == 3
    loaded = images.load_mask(entries["dog.jpg"].mask_path, entries["dog.jpg"].size)
    assert loaded.mode == "L" and loaded.size == (40, 30)
    assert _pixels(loaded)[0, 0] == 255 and _pixels(loaded)[0, 39] == 0
    loaded = images.load_mask(entries["fox.png"].mask_path, (40, 30))
    assert _pixels(loaded)[0, 0] == 0 and _pixels(loaded)[0, 39] == 255


# --- folder scan ---------------------------------------------------------------------------------

def test_one_warning_lists_every_skipped_file(folder_mod, tmp_path, caplog):
    Image.new("RGB", (16, 16)).save(tmp_path / "good.png")
    (tmp_path / "garbage.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    _noise().save(tmp_path / "cut.jpg")
    (tmp_path / "cut.jpg").write_bytes((tmp_path / "cut.jpg").read_bytes()[:300])
    Image.new("RGB", (16, 16)).save(tmp_path / "anim.gif")
    (tmp_path / "layers.psd").write_bytes(b"8BPS fake")
    (tmp_path / "notes.md").write_text("not a dataset file")  # silently ignored
    with caplog.at_level(logging.WARNING, logger="comfyui-personalize"):
        result = folder_mod.scan_dataset(tmp_path)
    assert [e.path.name for e in result.entries] == ["good.png"]
    assert sorted(p.name for p, _ in result.skipped) == ["anim.gif", "cut.jpg", "garbage.png", "layers.psd"]
    skipped_records = [r for r in caplog.records if "skipped" in r.getMessage()]
    assert len(skipped_records) == 1 and skipped_records[0].levelno == logging.WARNING
    message = skipped_records[0].getMessage()
    for name in ("anim.gif", "cut.jpg", "garbage.png", "layers.psd"):
        assert name in message
    assert "notes.md" not in caplog.text and "good.png" not in message
    assert message in result.warnings


def test_nothing_usable_lists_the_skipped_files(folder_mod, tmp_path):
    (tmp_path / "a.png").write_bytes(b"nope")
    (tmp_path / "b.psd").write_bytes(b"8BPS")
    with pytest.raises(ValueError, match=r"has no images") as info:
        folder_mod.scan_dataset(tmp_path)
    assert "cannot read image a.png" in str(info.value) and "b.psd" in str(info.value)


def test_non_utf8_caption_is_decoded_with_a_warning(folder_mod, tmp_path, caplog):
    Image.new("RGB", (16, 16)).save(tmp_path / "cafe.png")
    (tmp_path / "cafe.txt").write_bytes("a café “quoted”".encode("cp1252"))
    with caplog.at_level(logging.WARNING, logger="comfyui-personalize"):
        (entry,) = folder_mod.scan_folder(tmp_path, trigger_word="sks")
    assert entry.caption == "sks, a café “quoted”"
    assert "cafe.txt" in caplog.text and "cp1252" in caplog.text


def test_utf8_with_bom_and_utf16_captions_need_no_warning(folder_mod, tmp_path, caplog):
    Image.new("RGB", (16, 16)).save(tmp_path / "a.png")
    Image.new("RGB", (16, 16)).save(tmp_path / "b.png")
    (tmp_path / "a.txt").write_bytes("\ufeffnaïve".encode("utf-8"))
    (tmp_path / "b.txt").write_text("ünïcode", encoding="utf-16")
    with caplog.at_level(logging.WARNING, logger="comfyui-personalize"):
        result = folder_mod.scan_dataset(tmp_path)
    assert [e.caption for e in result.entries] == ["naïve", "ünïcode"] and not result.warnings


def test_txt_caption_wins_over_caption_file(folder_mod, tmp_path):
    Image.new("RGB", (16, 16)).save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("from txt")
    (tmp_path / "a.caption").write_text("from caption")
    result = folder_mod.scan_dataset(tmp_path)
    assert result.entries[0].caption == "from txt" and any("a.caption" in w for w in result.warnings)


def test_caption_without_image_is_reported(folder_mod, tmp_path, caplog):
    Image.new("RGB", (16, 16)).save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("fine")
    (tmp_path / "lonely.txt").write_text("no image for me")
    with caplog.at_level(logging.WARNING, logger="comfyui-personalize"):
        result = folder_mod.scan_dataset(tmp_path)
    assert [e.caption for e in result.entries] == ["fine"]
    assert "lonely.txt" in caplog.text and any("lonely.txt" in w for w in result.warnings)


def test_duplicate_stems_raise_naming_both(folder_mod, tmp_path):
    Image.new("RGB", (16, 16)).save(tmp_path / "a.png")
    Image.new("RGB", (16, 16)).save(tmp_path / "a.jpg")
    (tmp_path / "a.txt").write_text("which one?")
    with pytest.raises(ValueError, match=r"a\.jpg and a\.png") as info:
        folder_mod.scan_folder(tmp_path)
    assert "rename" in str(info.value) and str(tmp_path) in str(info.value)


def test_same_stem_in_different_folders_is_fine(folder_mod, tmp_path):
    Image.new("RGB", (16, 16)).save(tmp_path / "a.png")
    (tmp_path / "2_x").mkdir()
    Image.new("RGB", (16, 16)).save(tmp_path / "2_x" / "a.jpg")
    assert len(folder_mod.scan_folder(tmp_path)) == 2


def test_scan_records_size_alpha_and_ignores_hidden_files(folder_mod, tmp_path):
    rgba = Image.new("RGBA", (20, 10), (0, 0, 0, 255))
    rgba.putpixel((0, 0), (0, 0, 0, 0))
    rgba.save(tmp_path / "cut_out.png")
    (tmp_path / "._cut_out.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")  # macOS metadata
    result = folder_mod.scan_dataset(tmp_path)
    (entry,) = result.entries
    assert entry.size == (20, 10) and entry.has_alpha and not result.skipped


def test_training_pixels_composite_alpha_on_white(comfy_runtime, tmp_path):
    Image.new("RGBA", (32, 32), (255, 0, 0, 0)).save(tmp_path / "clear.png")
    pixels = _training_pixels(comfy_runtime, tmp_path / "clear.png", (16, 16))
    assert pixels.shape == (16, 16, 3) and float(pixels.min()) == 1.0
