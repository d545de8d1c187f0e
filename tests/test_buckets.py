"""Aspect-ratio buckets (kohya semantics): bucket lists, bucket choice, no_upscale, resize + crop.

Expected values are worked out by hand from kohya's rules (``make_bucket_resolutions`` and
``BucketManager.select_bucket`` in kohya-ss/sd-scripts), not produced by our own code.
"""
import random

import pytest
from PIL import Image

SD15_AREA = 512 * 512
SDXL_AREA = 1024 * 1024

# SD1.5: max area 512x512, sides 256..1024, step 64. Per width w: h = min(1024, (262144 // w) // 64 * 64)
# 256->1024, 320->768, 384->640, 448->576, 512->512, 576->448, 640->384, 704->320, 768->320, 832..960->256,
# 1024->256, in both orientations.
SD15_BUCKETS = [
    (256, 832), (256, 896), (256, 960), (256, 1024), (320, 704), (320, 768), (384, 640), (448, 576),
    (512, 512),
    (576, 448), (640, 384), (704, 320), (768, 320), (832, 256), (896, 256), (960, 256), (1024, 256),
]

# SDXL: max area 1024x1024, sides 512..2048, step 64. Widths 512..960 give 2048, 1792, 1600, 1472, 1344,
# 1216, 1152, 1088; 1088..2048 give 960, 896, 832, 768, 768, 704, 704, 640, 640, 576, 576, 576, 512 x4.
SDXL_BUCKETS = [
    (512, 1856), (512, 1920), (512, 1984), (512, 2048), (576, 1664), (576, 1728), (576, 1792),
    (640, 1536), (640, 1600), (704, 1408), (704, 1472), (768, 1280), (768, 1344), (832, 1216),
    (896, 1152), (960, 1088),
    (1024, 1024),
    (1088, 960), (1152, 896), (1216, 832), (1280, 768), (1344, 768), (1408, 704), (1472, 704),
    (1536, 640), (1600, 640), (1664, 576), (1728, 576), (1792, 576), (1856, 512), (1920, 512),
    (1984, 512), (2048, 512),
]

# (image size, bucket): nearest aspect ratio w/h; an image whose size is a bucket keeps it.
SD15_ASSIGNMENTS = [
    ((512, 768), (384, 640)),    # 0.667: 384x640 = 0.600 (err .067) beats 448x576 = 0.778 (err .111)
    ((768, 512), (640, 384)),    # 1.5: 1.667 (err .167) beats 1.286 (err .214)
    ((512, 512), (512, 512)),
    ((1000, 1000), (512, 512)),
    ((1920, 1080), (640, 384)),  # 1.778: 1.667 (err .111) beats 2.2 (err .422)
    ((1080, 1920), (384, 640)),  # 0.5625: 0.6 (err .0375) beats 0.4545 (err .108)
    ((600, 800), (448, 576)),    # 0.75: 0.778
    ((1200, 900), (576, 448)),   # 1.333: 1.286 (err .048) beats 1.667
    ((4000, 3000), (576, 448)),
    ((3000, 1000), (832, 256)),  # 3.0: 3.25 (err .25) beats 2.4 (err .6)
    ((2000, 1000), (704, 320)),  # 2.0: 2.2 (err .2) beats 1.667 (err .333)
    ((100, 50), (704, 320)),     # small images are upscaled to a bucket
    ((1536, 640), (768, 320)),   # 2.4 exactly
    ((4000, 1000), (1024, 256)),
    ((832, 1216), (384, 640)),   # the SDXL portrait size: 0.684 -> 0.6 (err .084) beats 0.778 (err .094)
]

SDXL_ASSIGNMENTS = [
    ((1024, 1024), (1024, 1024)),
    ((512, 512), (1024, 1024)),
    ((832, 1216), (832, 1216)),
    ((512, 768), (832, 1216)),   # 0.667: 0.684 (err .018) beats 0.6 (err .067)
    ((768, 512), (1216, 832)),
    ((1920, 1080), (1344, 768)), # 1.778: 1.75 (err .028) beats 1.667 (err .111)
    ((1080, 1920), (768, 1344)),
    ((1500, 1000), (1216, 832)), # 1.5: 1.4615 (err .038) beats 1.667
    ((4000, 3000), (1152, 896)), # 1.333: 1.286 (err .048) beats 1.4615 (err .128)
    ((3000, 4000), (896, 1152)), # 0.75: 0.778 (err .028) beats 0.684 (err .066)
    ((2000, 1000), (1408, 704)), # 2.0 exactly
    ((3000, 1000), (1728, 576)), # 3.0 exactly
    ((768, 320), (1536, 640)),   # 2.4 exactly
    ((4000, 1000), (2048, 512)),
]

# bucket_no_upscale, max area 512x512, step 64: (image, bucket, resized size before the crop).
SD15_NO_UPSCALE = [
    ((300, 200), (256, 192), (300, 200)),     # fits the area: not resized, cropped to multiples of 64
    ((500, 300), (448, 256), (500, 300)),
    ((1000, 1000), (512, 512), (512, 512)),   # too large: scaled down to the area
    # 1.5: sqrt(262144*1.5)=627.07 -> 576, height 576/1.5=384 -> 384 (ar 1.5); the height route also
    # gives 384 -> 576 (ar 1.5); tie -> height route: (int(384*1.5+.5), 384).
    ((1200, 800), (576, 384), (576, 384)),
    # 2.0: width route 724.1 -> 704, 352 -> 320 (ar 2.2); height route 362.0 -> 320, 640 (ar 2.0) wins.
    ((2000, 1000), (640, 320), (640, 320)),
    # 1.4286: width route 612 -> 576, 403.2 -> 384 (ar 1.5, err .071); height route 428 -> 384,
    # 548.6 -> 512 (ar 1.333, err .095): width route wins, resized (576, int(403.2+.5)) = (576, 403).
    ((1000, 700), (576, 384), (576, 403)),
    ((640, 480), (512, 384), (512, 384)),     # 1.333: height route exact
]


@pytest.fixture(scope="module")
def buckets(comfy_runtime):
    return comfy_runtime.pack_import("trainers.data.buckets")


def _noise_gray(size, seed=0):
    """A grayscale noise image as RGB (all bands equal) plus the same pixels as an L mask."""
    rng = random.Random(seed)
    mask = Image.new("L", size)
    mask.putdata([rng.randrange(256) for _ in range(size[0] * size[1])])
    return mask.convert("RGB"), mask


# --- bucket lists ------------------------------------------------------------------------------

def test_sd15_bucket_list(buckets):
    result = buckets.make_buckets((512, 512), 256, 1024, 64)
    assert result == SD15_BUCKETS
    assert buckets.make_buckets((512, 512)) == SD15_BUCKETS  # the defaults are SD1.x's
    for known in [(512, 512), (384, 640), (640, 384), (256, 1024), (1024, 256), (448, 576), (576, 448)]:
        assert known in result
    assert all(w * h <= SD15_AREA and w % 64 == 0 and h % 64 == 0 for w, h in result)
    assert all(256 <= side <= 1024 for bucket in result for side in bucket)


def test_sdxl_bucket_list(buckets):
    result = buckets.make_buckets((1024, 1024), 512, 2048, 64)
    assert result == SDXL_BUCKETS
    assert all(w * h <= SDXL_AREA for w, h in result)
    assert result == sorted(set(result))


def test_tiny_model_buckets(buckets):
    # 64x64, sides 32..128, step 32: square 64; 32 -> 128, 64 -> 64, 96 -> 32, 128 -> 32.
    assert buckets.make_buckets((64, 64), 32, 128, 32) == [(32, 96), (32, 128), (64, 64), (96, 32), (128, 32)]
    # step 64: min_side 32 is raised to 64 (kohya would round it down to 0); 128 -> 0 is too small.
    assert buckets.make_buckets((64, 64), 32, 128, 64) == [(64, 64)]
    assert buckets.make_buckets((64, 64), 64, 128, 64) == [(64, 64)]
    tiny = buckets.make_buckets((64, 64), 32, 128, 32)
    assert buckets.assign_bucket((64, 64), tiny, max_area=64 * 64, step=32) == (64, 64)
    assert buckets.assign_bucket((300, 100), tiny, max_area=64 * 64, step=32) == (96, 32)
    assert buckets.assign_bucket((100, 400), tiny, max_area=64 * 64, step=32) == (32, 128)
    assert buckets.assign_bucket((80, 48), tiny, max_area=64 * 64, step=32, no_upscale=True) == (64, 32)
    image, offset = buckets.resize_and_crop(Image.new("RGB", (80, 48)), (64, 64))
    assert image.size == (64, 64) and offset == (21, 0)  # cover: 107x64, centre overhang 43 // 2


def test_non_square_max_resolution(buckets):
    # 768x512 (area 393216): square floor(sqrt(393216) / 64) * 64 = 576.
    result = buckets.make_buckets((768, 512), 256, 1024, 64)
    assert (576, 576) in result and (768, 512) in result and (512, 768) in result
    assert all(w * h <= 768 * 512 for w, h in result)


def test_min_and_max_side_rounded_to_step(buckets):
    # kohya rounds min down and max up to the step: 300 -> 256, 1000 -> 1024.
    assert buckets.make_buckets((512, 512), 300, 1000, 64) == SD15_BUCKETS


# --- choosing a bucket -------------------------------------------------------------------------

@pytest.mark.parametrize("image_size,expected", SD15_ASSIGNMENTS)
def test_assign_bucket_sd15(buckets, image_size, expected):
    assert buckets.assign_bucket(image_size, SD15_BUCKETS, max_area=SD15_AREA) == expected


@pytest.mark.parametrize("image_size,expected", SDXL_ASSIGNMENTS)
def test_assign_bucket_sdxl(buckets, image_size, expected):
    assert buckets.assign_bucket(image_size, SDXL_BUCKETS, max_area=SDXL_AREA) == expected


def test_select_bucket_resize_target_covers_the_bucket(buckets):
    # 512x768 (0.667) is wider than its bucket 384x640 (0.6): scale to the bucket's height,
    # 640/768 * 512 = 426.67 -> 427 wide (kohya rounds half up), then crop the width.
    bucket, resized = buckets.select_bucket((512, 768), SD15_BUCKETS, max_area=SD15_AREA)
    assert bucket == (384, 640) and resized == (427, 640)
    # 1920x1080 (1.778) is wider than 640x384 (1.667): 384/1080 * 1920 = 682.67 -> 683.
    bucket, resized = buckets.select_bucket((1920, 1080), SD15_BUCKETS, max_area=SD15_AREA)
    assert bucket == (640, 384) and resized == (683, 384)
    assert buckets.cover_size((600, 800), (448, 576)) == (448, 597)  # narrower: scale to the width


@pytest.mark.parametrize("image_size,bucket,resized", SD15_NO_UPSCALE)
def test_no_upscale(buckets, image_size, bucket, resized):
    assert buckets.select_bucket(image_size, SD15_BUCKETS, max_area=SD15_AREA, no_upscale=True) == (bucket, resized)
    assert buckets.assign_bucket(image_size, None, max_area=SD15_AREA, no_upscale=True) == bucket
    assert bucket[0] <= image_size[0] and bucket[1] <= image_size[1]  # never enlarged
    assert bucket[0] * bucket[1] <= SD15_AREA


def test_no_upscale_image_smaller_than_step(buckets):
    with pytest.raises(ValueError, match="`image_size`"):
        buckets.assign_bucket((50, 40), None, max_area=SD15_AREA, no_upscale=True)


def test_no_upscale_resize_and_crop_keeps_scale(buckets):
    """A small image is cropped at its own scale (kohya), not shrunk to cover the bucket."""
    image, mask = _noise_gray((500, 300))
    bucket, resized = buckets.select_bucket(image.size, None, max_area=SD15_AREA, no_upscale=True)
    crop, offset = buckets.resize_and_crop(image, bucket, resized_size=resized)
    assert crop.size == (448, 256) and offset == (26, 22)
    assert crop.tobytes() == image.crop((26, 22, 474, 278)).tobytes()
    mask_crop = buckets.resize_mask_like(mask, image.size, bucket, offset, resized_size=resized)
    assert mask_crop.tobytes() == crop.getchannel("R").tobytes()


# --- resize and crop ---------------------------------------------------------------------------

def test_center_crop(buckets):
    image = Image.new("RGB", (600, 800), (0, 0, 255))
    out, offset = buckets.resize_and_crop(image, (448, 576))
    # cover: 448/600 -> 448x597, overhang 21 rows, centre top = 10
    assert out.size == (448, 576) and offset == (0, 10)
    assert out.getpixel((224, 288)) == (0, 0, 255)


def test_center_crop_removes_the_sides(buckets):
    image = Image.new("RGB", (1200, 400), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 150, 400))  # red band on the left
    out, offset = buckets.resize_and_crop(image, (704, 320))
    # 3.0 is wider than 2.2: scale 320/400 = 0.8 -> 960x320; overhang 256 -> left 128; the red band
    # ends at 120 (plus a few pixels of LANCZOS ringing), so the crop is all blue.
    assert out.size == (704, 320) and offset == (128, 0)
    assert out.getchannel("R").getextrema() == (0, 0)
    assert out.getchannel("B").getextrema() == (255, 255)


def test_exact_size_is_untouched(buckets):
    image, _ = _noise_gray((384, 640))
    out, offset = buckets.resize_and_crop(image, (384, 640))
    assert offset == (0, 0) and out.tobytes() == image.tobytes()


def test_random_crop_seeded(buckets):
    image, _ = _noise_gray((300, 100), seed=1)
    bucket = (64, 64)
    results = []
    for seed in range(20):
        out, offset = buckets.resize_and_crop(image, bucket, crop="random", rng=random.Random(seed))
        again, offset_again = buckets.resize_and_crop(image, bucket, crop="random", rng=random.Random(seed))
        assert out.size == bucket and offset == offset_again and out.tobytes() == again.tobytes()
        assert offset[1] == 0 and 0 <= offset[0] <= 192 - 64  # cover: 192x64
        results.append(offset)
    assert len(set(results)) > 10


def test_random_crop_draws_only_for_overhanging_axes(buckets):
    rng, reference = random.Random(5), random.Random(5)
    _, offset = buckets.resize_and_crop(Image.new("RGB", (300, 100)), (64, 64), crop="random", rng=rng)
    assert offset == (reference.randint(0, 128), 0)
    assert rng.getstate() == reference.getstate()


@pytest.mark.parametrize("crop,seed", [("center", None), ("random", 0), ("random", 1), ("random", 2)])
@pytest.mark.parametrize("image_size,bucket", [((300, 170), (128, 64)), ((97, 211), (64, 128)), ((50, 50), (64, 64))])
def test_mask_stays_aligned(buckets, crop, seed, image_size, bucket):
    """The mask is the image's own pixels: after both crops it must equal the image channel."""
    image, mask = _noise_gray(image_size, seed=3)
    rng = random.Random(seed) if seed is not None else None
    out, offset = buckets.resize_and_crop(image, bucket, crop=crop, rng=rng)
    mask_out = buckets.resize_mask_like(mask, image.size, bucket, offset)
    assert mask_out.size == bucket and mask_out.mode == "L"
    assert mask_out.tobytes() == out.getchannel("R").tobytes()


def test_binary_mask(buckets):
    mask = Image.new("1", (200, 100), 0)
    mask.paste(1, (100, 0, 200, 100))
    out = buckets.resize_mask_like(mask, (200, 100), (128, 64), (0, 0))
    assert out.mode == "L" and out.size == (128, 64)
    assert out.getpixel((10, 32)) == 0 and out.getpixel((120, 32)) == 255


# --- bad arguments -----------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,name", [
    ({"max_resolution": (512, 512), "step": 60}, "step"),
    ({"max_resolution": (512, 512), "step": 0}, "step"),
    ({"max_resolution": (512, 512), "step": -64}, "step"),
    ({"max_resolution": (512, 512), "min_side": 1024, "max_side": 512}, "min_side"),
    ({"max_resolution": (512, 512), "min_side": 0}, "min_side"),
    ({"max_resolution": (512, 512), "max_side": -1}, "max_side"),
    ({"max_resolution": (128, 128), "min_side": 256}, "max_resolution"),
    ({"max_resolution": (2048, 512), "max_side": 1024}, "max_resolution"),
    ({"max_resolution": (512,)}, "max_resolution"),
    ({"max_resolution": (512, 0)}, "max_resolution"),
    ({"max_resolution": "512"}, "max_resolution"),
])
def test_make_buckets_bad_arguments(buckets, kwargs, name):
    with pytest.raises(ValueError, match=f"`{name}`"):
        buckets.make_buckets(**kwargs)


@pytest.mark.parametrize("call,name", [
    (lambda b: b.assign_bucket((0, 10), SD15_BUCKETS, max_area=SD15_AREA), "image_size"),
    (lambda b: b.assign_bucket((10, 10), [], max_area=SD15_AREA), "buckets"),
    (lambda b: b.assign_bucket((10, 10), [(64, 0)], max_area=SD15_AREA), "buckets"),
    (lambda b: b.assign_bucket((10, 10), SD15_BUCKETS, max_area=0), "max_area"),
    (lambda b: b.assign_bucket((10, 10), SD15_BUCKETS, max_area=SD15_AREA, step=12), "step"),
    (lambda b: b.resize_and_crop(Image.new("RGB", (10, 10)), (8, 8), crop="top"), "crop"),
    (lambda b: b.resize_and_crop(Image.new("RGB", (10, 10)), (8, 8), crop="random"), "rng"),
    (lambda b: b.resize_and_crop(Image.new("RGB", (10, 10)), (8, -8)), "bucket"),
    (lambda b: b.resize_and_crop(Image.new("RGB", (10, 10)), (8, 8), resized_size=(8, 4)), "resized_size"),
    (lambda b: b.resize_and_crop("image.png", (8, 8)), "image"),
    (lambda b: b.resize_mask_like(Image.new("RGB", (10, 10)), (10, 10), (8, 8), (0, 0)), "mask"),
    (lambda b: b.resize_mask_like(Image.new("L", (10, 12)), (10, 10), (8, 8), (0, 0)), "mask"),
    (lambda b: b.resize_mask_like(Image.new("L", (20, 10)), (20, 10), (8, 8), (9, 0)), "offset"),
])
def test_bad_arguments_name_the_argument(buckets, call, name):
    with pytest.raises(ValueError, match=f"`{name}`"):
        call(buckets)


def test_batch_sampler_epochs_and_short_batches(comfy_runtime):
    """Each epoch uses every image once, in batches of one bucket; a bucket whose epoch ends with a batch under half
    the batch size is reported (5 images at batch 4: every other step would train on one image)."""
    dataset = comfy_runtime.pack_import("trainers.data.dataset")
    sampler = dataset.BatchSampler([(64, 64)] * 5 + [(96, 48)] * 3, batch_size=4, seed=1)
    assert sampler.batches_per_epoch == 3
    for epoch in range(3):
        batches = [sampler.indices(epoch * 3 + i) for i in range(3)]
        assert sorted(i for batch in batches for i in batch) == list(range(8))
        assert all(len({(i < 5) for i in batch}) == 1 for batch in batches)  # one bucket per batch
    assert sampler.short_batches() == [(5, 1)]
    assert dataset.BatchSampler([(64, 64)] * 10, batch_size=4, seed=0).short_batches() == []  # last batch 2: half
    assert dataset.BatchSampler([(64, 64)] * 20, batch_size=4, seed=0).short_batches() == []


def test_the_largest_seeds_draw_batches(comfy_runtime):
    """The seed widgets go up to 2**63 - 1 (and the class stream uses seed + 1): torch refused the mixed seed."""
    dataset = comfy_runtime.pack_import("trainers.data.dataset")
    for seed in (2**63 - 1, 2**63):
        sampler = dataset.BatchSampler([(64, 64)] * 5, batch_size=2, seed=seed)
        assert sorted(i for step in range(3) for i in sampler.indices(step)) == list(range(5))
