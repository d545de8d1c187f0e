"""Folder datasets: captions, instance-prompt fallback, trigger word, kohya repeats, bad files."""
import pytest
import torch
from PIL import Image


@pytest.fixture(scope="module")
def folder_mod(comfy_runtime):
    return comfy_runtime.pack_import("trainers.data.folder")


def _image(path, size=(80, 48), color=(200, 30, 30)):
    Image.new("RGB", size, color).save(path)


def test_captions_fallback_trigger_and_repeats(folder_mod, tmp_path):
    _image(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("a red square\n")
    _image(tmp_path / "b.jpg")  # no caption: instance prompt
    repeated = tmp_path / "3_subject"
    repeated.mkdir()
    _image(repeated / "c.png")
    (repeated / "c.caption").write_text("close-up")
    (tmp_path / "notes.md").write_text("not an image")
    entries = folder_mod.scan_folder(tmp_path, trigger_word="sks", instance_prompt="a photo of sks thing")
    by_name = {e.path.name: e for e in entries}
    assert set(by_name) == {"a.png", "b.jpg", "c.png"}
    assert by_name["a.png"].caption == "sks, a red square" and by_name["a.png"].repeats == 1
    assert by_name["b.jpg"].caption == "a photo of sks thing"
    assert by_name["c.png"].caption == "sks, close-up" and by_name["c.png"].repeats == 3


def test_a_kohya_folder_name_captions_its_uncaptioned_images(folder_mod, tmp_path, caplog):
    """kohya's class tokens: `10_ohwx man/x.png` without a caption file trains on "ohwx man" (it trained on the
    empty caption); an explicit instance prompt still wins, and images left without any caption are reported."""
    repeated = tmp_path / "10_ohwx man"
    repeated.mkdir()
    _image(repeated / "x.png")
    _image(tmp_path / "y.png")
    by_name = {e.path.name: e for e in folder_mod.scan_folder(tmp_path)}
    assert by_name["x.png"].caption == "ohwx man" and by_name["x.png"].repeats == 10
    assert by_name["y.png"].caption == "" and "y.png" in caplog.text and "empty caption" in caplog.text
    assert {e.caption for e in folder_mod.scan_folder(tmp_path, instance_prompt="a photo")} == {"a photo"}


def test_trigger_word_reaches_every_alternative_caption_line(folder_mod, tmp_path):
    """Lines of a caption file are alternatives (caption choices on): each gets the trigger word; with choices off
    the file is one caption and gets it once."""
    _image(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("a red square\n\nsks on grass\n")
    [entry] = folder_mod.scan_dataset(tmp_path, trigger_word="sks").entries
    assert entry.caption == "sks, a red square\nsks on grass"
    [entry] = folder_mod.scan_dataset(tmp_path, trigger_word="sks", caption_choices=False).entries
    assert entry.caption == "a red square\n\nsks on grass"
    (tmp_path / "a.txt").write_text("a red square\nclose-up\n")
    [entry] = folder_mod.scan_dataset(tmp_path, trigger_word="sks", caption_choices=False).entries
    assert entry.caption == "sks, a red square\nclose-up"


def test_resize_and_center_crop(folder_mod, tmp_path):
    image = Image.new("RGB", (120, 60), (0, 0, 255))
    for x in range(30):  # red band on the left, cropped away by a centre crop to a square
        for y in range(60):
            image.putpixel((x, y), (255, 0, 0))
    image.save(tmp_path / "wide.png")
    import numpy as np
    from harness.runtime import boot
    buckets = boot().pack_import("trainers.data.buckets")
    images = boot().pack_import("trainers.data.images")
    rgb, _ = images.open_rgb(tmp_path / "wide.png")
    crop, _ = buckets.resize_and_crop(rgb, (64, 64), crop="center")
    pixels = torch.from_numpy(np.asarray(crop, dtype=np.float32) / 255.0)
    assert pixels.shape == (64, 64, 3) and pixels.dtype == torch.float32
    assert pixels[:, :, 2].mean() > 0.95 and pixels[:, :, 0].mean() < 0.05


@pytest.mark.parametrize("setup,needle", [
    (lambda p: None, "has no images"),
    (lambda p: (p / "x.png").write_bytes(b"garbage"), "cannot read image x.png"),
])
def test_bad_folders(folder_mod, tmp_path, setup, needle):
    setup(tmp_path)
    with pytest.raises(ValueError, match=needle):
        folder_mod.scan_folder(tmp_path)


def test_missing_folder_names_the_input(folder_mod, tmp_path):
    with pytest.raises(ValueError, match="`folder`.*does not exist"):
        folder_mod.scan_folder(tmp_path / "nope")


def test_save_lora_never_overwrites(comfy_runtime):
    save = comfy_runtime.pack_import("nodes.lora_io").PersonalizeSaveLoRA
    lora = {"lora_unet_x.lora_down.weight": torch.ones(2, 3), "lora_unet_x.lora_up.weight": torch.ones(3, 2)}
    first = save.execute(lora, "tests/never_overwrite", "fp16").result[0]
    second = save.execute(lora, "tests/never_overwrite", "fp32").result[0]
    assert first != second and first.endswith("never_overwrite.safetensors") and second.endswith("_00001.safetensors")
    loras = comfy_runtime.folder("loras")
    assert str(loras) in first


def test_a_sliver_under_no_upscale_names_the_image_and_the_inputs(pack, base, tmp_path):
    """A 4x600 sliver fits no bucket without upscaling: the error says which file and which node inputs to change."""
    _, clip, vae = base
    _image(tmp_path / "sliver.png", size=(4, 600))
    spec = pack.build.DatasetSpec(folder=str(tmp_path), resolution=64, bucket_step=16, no_upscale=True, use_cache=False)
    with pytest.raises(ValueError, match="sliver.png.*`no_upscale`.*`bucket_step`"):
        pack.build.build_training_data(spec, vae, clip)
