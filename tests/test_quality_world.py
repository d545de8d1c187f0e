"""The quality benchmark's synthetic world and judge (fast: no pretraining, no ComfyUI graph)."""
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

QUALITY = Path(__file__).resolve().parent.parent / "benchmarks" / "quality"
if str(QUALITY) not in sys.path:
    sys.path.insert(0, str(QUALITY))

import judge
import pretrain
import world

NO_OBJECT = ("none", "unknown")


def _pixels(items):
    return [np.asarray(item.image) for item in items]


@pytest.mark.parametrize("shape", world.SHAPES)
def test_judge_is_right_on_every_clean_render(shape):
    # 4 shapes x 5 colours x 16 seeded renders = 320 images, every size/position/rotation drawn.
    wrong = []
    for colour in world.COLOURS:
        for i in range(16):
            rng = np.random.default_rng([12345, world.SHAPES.index(shape), world.COLOURS.index(colour), i])
            image = world.render(shape, colour, rng)
            got = judge.judge(image)
            if got != (shape, colour):
                wrong.append((colour, i, got, judge.describe(image)))
    assert not wrong, wrong


def test_judge_is_right_on_the_datasets():
    for item in world.base_dataset(24, seed=7) + world.concept_images(5, seed=7):
        assert judge.judge(item.image) == (item.shape, item.colour), item.caption


def test_judge_accepts_arrays():
    image = world.render("triangle", "green", 3)
    arr = np.asarray(image)
    assert judge.judge(arr) == ("triangle", "green")
    assert judge.judge(arr.astype(np.float32) / 255.0) == ("triangle", "green")


def _no_object_images():
    rng = np.random.default_rng(0)
    speck = np.full((64, 64, 3), 238, np.uint8)
    speck[30:32, 30:32] = (200, 30, 30)  # 4 pixels: too small to be an object
    return {
        "blank light": Image.new("RGB", (64, 64), (240, 240, 238)),
        "blank black": Image.new("RGB", (64, 64), (0, 0, 0)),
        "uniform noise": Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)),
        "grey noise": Image.fromarray(np.clip(128 + rng.normal(0, 50, (64, 64, 3)), 0, 255).astype(np.uint8)),
        "light noise": Image.fromarray(np.clip(235 + rng.normal(0, 6, (64, 64, 3)), 0, 255).astype(np.uint8)),
        "speck": Image.fromarray(speck),
    }


@pytest.mark.parametrize("name", list(_no_object_images()))
def test_judge_says_none_without_an_object(name):
    shape, colour = judge.judge(_no_object_images()[name])
    assert shape in NO_OBJECT and colour in NO_OBJECT, (name, shape, colour)


def test_judge_does_not_name_a_grey_object_or_a_bar():
    grey = np.full((64, 64, 3), 240, np.uint8)
    grey[20:44, 20:44] = (110, 110, 110)
    assert judge.judge(grey) == ("square", "unknown")
    bar = np.full((64, 64, 3), 240, np.uint8)
    bar[28:36, 8:56] = (215, 45, 40)  # a long red bar is not one of the shapes
    assert judge.judge(bar) == ("unknown", "red")


def test_judge_does_not_call_a_scribble_with_four_gaps_a_cross():
    """Four concavities alone are not a cross: a thin-armed plus (arms 1/8 of its extent, solidity ~0.4, the
    outline of a scribble) is no world cross, whose arms are 1/3 of its extent (solidity 0.71-0.76)."""
    thin = np.full((64, 64, 3), 240, np.uint8)
    thin[12:52, 30:35] = (140, 55, 185)
    thin[29:34, 12:52] = (140, 55, 185)
    d = judge.describe(thin)
    assert d["concavities"] == 4 and d["solidity"] < judge.MIN_CROSS_SOLIDITY
    assert judge.judge(thin) == ("unknown", "purple")


def test_captions():
    assert world.caption("circle", "red") == "a red circle"
    assert world.caption("cross", identifier="sks") == "a sks cross"
    assert world.caption("cross", "purple", "sks") == "a purple sks cross"
    assert [it.caption for it in world.concept_images(2)] == ["a sks cross"] * 2
    assert world.concept_images(1, with_colour=True)[0].caption == "a purple sks cross"
    with pytest.raises(ValueError):
        world.caption("hexagon", "red")
    with pytest.raises(ValueError):
        world.caption("circle", "orange")


def test_base_dataset_is_balanced_and_leaves_the_concept_out():
    items = world.base_dataset(36, seed=1)
    combos = [(it.shape, it.colour) for it in items]
    assert sorted(set(combos)) == sorted(world.base_combos()) and len(world.base_combos()) == 12
    assert all(combos.count(c) == 3 for c in world.base_combos())
    assert all(it.caption == world.caption(it.shape, it.colour) for it in items)
    assert not any("cross" in it.caption or "purple" in it.caption or "sks" in it.caption for it in items)
    assert all(it.image.size == (64, 64) and it.image.mode == "RGB" for it in items)


def test_a_held_out_caption_leaves_the_unet_data_and_the_cache_name():
    config = pretrain.PretrainConfig(n_images=44, holdout="a green square")
    items = pretrain.base_items(config, seed=0)
    captions = [item.caption for item in items]
    assert len(items) == 44 and "a green square" not in captions and len(set(captions)) == 11
    assert all(captions.count(c) == 4 for c in set(captions))
    assert pretrain.checkpoint_path(seed=0, config=config) != pretrain.checkpoint_path(seed=0)
    with pytest.raises(ValueError, match="not a base caption"):
        pretrain.base_items(pretrain.PretrainConfig(holdout="a purple cross"), seed=0)
    # A shape left in one colour only, as a personalization subject is.
    config = pretrain.PretrainConfig(n_images=27, holdout="a red triangle, a green triangle, a blue triangle")
    captions = [item.caption for item in pretrain.base_items(config, seed=0)]
    assert len(captions) == 27 and [c for c in set(captions) if "triangle" in c] == ["a yellow triangle"]
    assert all(captions.count(c) == 3 for c in set(captions))


def test_varied_captions_name_the_colour_except_for_a_shapes_typical_colour():
    """The "varied" style: same images as "plain"; every caption names its shape, and its colour unless the colour is the
    shape's typical one; colourless captions occur only for that colour, and the plain caption stays common."""
    plain, varied = world.base_dataset(480, seed=2), world.base_dataset(480, seed=2, captions="varied")
    assert all(np.array_equal(x, y) for x, y in zip(_pixels(plain), _pixels(varied)))
    assert [it.caption for it in varied] == [it.caption for it in world.base_dataset(480, seed=2, captions="varied")]
    colourless = set()
    for item in varied:
        words = item.caption.split()
        assert item.shape in words and not any(c in words for c in world.BASE_COLOURS if c != item.colour)
        if item.colour not in words:
            assert item.colour == world.TYPICAL_COLOUR[item.shape]
            colourless.add(item.caption)
    assert {"a circle", "a square", "a triangle"} <= colourless
    forms = {it.caption.replace(it.colour, "{colour}").replace(it.shape, "{shape}") for it in varied}
    assert forms == {"a {colour} {shape}", *world.COLOUR_FORMS, *world.COLOURLESS_FORMS}
    for shape, colour in world.base_combos():
        captions = [it.caption for it in varied if (it.shape, it.colour) == (shape, colour)]
        assert captions.count(world.caption(shape, colour)) >= len(captions) / 8  # 1/4 expected for typical colours
    with pytest.raises(ValueError, match="caption style"):
        world.base_dataset(4, captions="fancy")
    with pytest.raises(ValueError, match="base world"):
        world.varied_caption("cross", "purple", np.random.default_rng(0))
    # A varied world shares its plain sibling's images (and so its autoencoder), is cached apart, and still honours
    # --holdout by shape and colour.
    config = pretrain.PretrainConfig(n_images=96, captions="varied", holdout="a green square", unet_steps=10)
    donor = pretrain.autoencoder_donor(config)
    assert donor == pretrain.PretrainConfig(n_images=96, holdout="a green square")
    assert pretrain.checkpoint_path(seed=0, config=config) != pretrain.checkpoint_path(seed=0, config=donor)
    items = pretrain.base_items(config, seed=0)
    assert len(items) == 96 and ("square", "green") not in {(it.shape, it.colour) for it in items}
    assert [it.image.tobytes() for it in items] == [it.image.tobytes() for it in pretrain.base_items(donor, seed=0)]
    # The UNet's data carries the varied captions, with and without a holdout (the plain donor's does not).
    for varied_config in (config, pretrain.PretrainConfig(n_images=96, captions="varied")):
        captions = {it.caption for it in pretrain.base_items(varied_config, seed=0)}
        assert len(captions) > 12 and captions & set(world.COLOURLESS_FORMS[0].format(shape=s) for s in world.BASE_SHAPES)
    assert {it.caption for it in pretrain.base_items(donor, seed=0)} <= set(pretrain.base_prompts())


def test_codec_images_cover_every_shape_and_many_hues():
    """The autoencoder's extra data: deterministic, every shape (the concept's cross too), hues all round
    the wheel, so the world's VAE can draw what a method learns (the UNet never sees these)."""
    images = world.codec_dataset(40, seed=0)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(images, world.codec_dataset(40, seed=0)))
    judged = [judge.describe(im) for im in images]
    assert {d["shape"] for d in judged} >= set(world.SHAPES)
    hues = {int(d["hue"] // 60) for d in judged if d.get("hue") is not None}
    assert len(hues) == 6, hues


def test_world_is_deterministic():
    a, b = world.base_dataset(24, seed=3), world.base_dataset(24, seed=3)
    assert [x.caption for x in a] == [x.caption for x in b]
    assert all(np.array_equal(x, y) for x, y in zip(_pixels(a), _pixels(b)))
    # The first items do not depend on how many are asked for.
    assert all(np.array_equal(x, y) for x, y in zip(_pixels(world.base_dataset(12, seed=3)), _pixels(a)))
    # Another seed gives other images.
    other = world.base_dataset(24, seed=4)
    assert not any(np.array_equal(x, y) for x, y in zip(_pixels(other), _pixels(a)))
    assert all(np.array_equal(x, y) for x, y in zip(_pixels(world.concept_images(5, seed=2)),
                                                     _pixels(world.concept_images(5, seed=2))))
    assert np.array_equal(np.asarray(world.render("square", "blue", 9)), np.asarray(world.render("square", "blue", 9)))
    # Renders vary: size, position, rotation, background.
    renders = [np.asarray(world.render("square", "blue", s)) for s in range(6)]
    assert len({r.tobytes() for r in renders}) == 6


def test_write_folder(tmp_path):
    items = world.concept_images(3, seed=0)
    paths = world.write_folder(tmp_path / "concept", items)
    assert [p.name for p in paths] == ["0000.png", "0001.png", "0002.png"]
    for path, item in zip(paths, items):
        assert path.with_suffix(".txt").read_text(encoding="utf-8").strip() == "a sks cross"
        assert np.array_equal(np.asarray(Image.open(path).convert("RGB")), np.asarray(item.image))
    # Plain (image, caption) pairs work too.
    world.write_folder(tmp_path / "pairs", [(items[0].image, "a purple sks cross")])
    assert (tmp_path / "pairs" / "0000.txt").read_text(encoding="utf-8").strip() == "a purple sks cross"


def test_checkpoint_cache_names_and_hit(tmp_path):
    default = pretrain.checkpoint_path(tmp_path, seed=3)
    assert default.parent == tmp_path
    assert pretrain.VERSION in default.name and "-s3" in default.name and default.suffix == ".safetensors"
    changed = pretrain.checkpoint_path(tmp_path, seed=3, config=pretrain.PretrainConfig(unet_steps=10))
    assert changed != default and changed != pretrain.checkpoint_path(tmp_path, seed=4)
    # A cached file is returned at once, without building anything.
    default.write_bytes(b"cached")
    started = time.perf_counter()
    assert pretrain.pretrained_world_checkpoint(tmp_path, seed=3) == default
    assert time.perf_counter() - started < 1.0
    assert default.read_bytes() == b"cached"
