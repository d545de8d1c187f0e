"""The dataset pipeline end to end: mixed-aspect buckets, caches (counted calls), caption variants,
masked loss, class images generated with stock sampling, and a LoRA trained on all of it."""
import copy
import time

import pytest
import torch
from PIL import Image



def _mixed_folder(folder, with_masks=False):
    """6 images of three aspect ratios with captions; optional masks."""
    folder.mkdir(parents=True, exist_ok=True)
    sizes = [(64, 64), (64, 64), (96, 48), (96, 48), (48, 96), (48, 96)]
    for i, (w, h) in enumerate(sizes):
        image = Image.new("RGB", (w, h), (230, 230, 210))
        for x in range(w // 3, 2 * w // 3):
            for y in range(h // 4, 3 * h // 4):
                image.putpixel((x, y), (140, 40, 170))
        image.save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(f"sks cross, purple, light background, view {i}")
        if with_masks:
            mask = Image.new("L", (w, h), 0)
            mask.paste(255, (0, 0, w // 2, h))
            mask.save(folder / f"img{i}_mask.png")
    return folder


class _Counting:
    """Counts calls of one method on one object (the real method still runs)."""

    def __init__(self, obj, name):
        self.count, self.obj, self.name = 0, obj, name
        self.original = getattr(obj, name)

    def __enter__(self):
        def wrapped(*args, **kwargs):
            self.count += 1
            return self.original(*args, **kwargs)
        setattr(self.obj, self.name, wrapped)
        return self

    def __exit__(self, *exc):
        delattr(self.obj, self.name)


def test_warm_caches_make_zero_encoder_calls(pack, base, tmp_path):
    _, clip, vae = base
    folder = _mixed_folder(tmp_path / "data")
    spec = pack.build.DatasetSpec(folder=str(folder), resolution=64, bucket_step=16, flip=True, cache_root=tmp_path / "cache")
    timings = []
    counts = []
    for _ in range(2):
        with _Counting(vae, "encode") as vae_calls, _Counting(clip, "encode_from_tokens_scheduled") as text_calls, \
                torch.inference_mode():
            started = time.perf_counter()
            data, stats = pack.build.build_training_data(spec, vae, clip)
            timings.append(time.perf_counter() - started)
        counts.append((vae_calls.count, text_calls.count))
    assert counts[0][0] > 0 and counts[0][1] == 6
    assert counts[1] == (0, 0), counts
    assert len(data.buckets()) == 3 and all(len(s.latents) == 2 for s in data.samples)
    print(f"\ndataset build cold {timings[0]:.2f}s ({counts[0][0]} VAE, {counts[0][1]} CLIP calls), "
          f"warm {timings[1]:.2f}s ({counts[1][0]} VAE, {counts[1][1]} CLIP calls)")

    # A changed setting (here the bucket step) or another VAE never reuses those latents.
    with _Counting(vae, "encode") as vae_calls, torch.inference_mode():
        pack.build.build_training_data(pack.build.DatasetSpec(**{**spec.__dict__, "bucket_step": 32}), vae, clip)
    assert vae_calls.count > 0


def test_caption_variants_are_cached_across_runs(pack, base, tmp_path):
    """With shuffle + dropout, a frozen text encoder is called once per new variant; a second run with
    the same seed (warm cache) makes no text-encoder call at all."""
    model, clip, vae = base
    folder = _mixed_folder(tmp_path / "data")
    options = pack.captions.CaptionOptions(shuffle_tags=True, keep_tokens=1, caption_dropout=0.2)
    spec = pack.build.DatasetSpec(folder=str(folder), resolution=64, bucket_step=16, captions=options,
                                  cache_root=tmp_path / "cache")
    cache_mod = pack.build.caches
    text_cache = cache_mod.TextEncodingCache(tmp_path / "cache")
    calls = []
    for run in range(2):
        with torch.inference_mode():
            data, _ = pack.build.build_training_data(spec, vae, clip)
        job = pack.job.TrainJob(steps=6, batch_size=2, learning_rate=1e-3, seed=0, method_options={"rank": 2, "alpha": 2.0})
        method = pack.methods.create_method("lora", job.method_options)
        with torch.inference_mode():
            result = pack.loop.train(job, method, model, clip, data, checkpoint_dir=tmp_path / f"run{run}",
                                     text_cache=text_cache, clip_fp=cache_mod.clip_fingerprint(clip))
        calls.append(result.summary["text_encode_calls"])
    assert calls[0] > 0 and calls[1] == 0, calls


def test_masked_loss_ignores_the_masked_out_half(pack, base, tmp_path):
    """With masks that zero the right half, changing only the right half of every image leaves the
    loss history unchanged."""
    model, clip, vae = base
    histories = []
    for variant in range(2):
        folder = _mixed_folder(tmp_path / f"data{variant}", with_masks=True)
        if variant:
            for path in folder.glob("img?.png"):
                image = Image.open(path)
                image.paste((0, 200, 0), (image.width // 2 + 8, 0, image.width, image.height))
                image.save(path)
        spec = pack.build.DatasetSpec(folder=str(folder), resolution=64, buckets=False, masked_loss=True, use_cache=False)
        with torch.inference_mode():
            data, _ = pack.build.build_training_data(spec, vae, clip)
        assert all(s.masks is not None for s in data.samples)
        job = pack.job.TrainJob(steps=3, batch_size=2, learning_rate=1e-3, seed=0, method_options={"rank": 2, "alpha": 2.0})
        method = pack.methods.create_method("lora", job.method_options)
        with torch.inference_mode():
            histories.append(pack.loop.train(job, method, model, clip, data, checkpoint_dir=tmp_path / f"m{variant}").loss_history)
    # The latent receptive field bleeds a few pixels over the edge; the loss is near-identical.
    assert histories[0] == pytest.approx(histories[1], rel=0.05)


def test_graph_trains_from_mixed_aspect_folder_with_class_images(comfy_runtime, tiny_checkpoint, tmp_path):
    folder = _mixed_folder(tmp_path / "instance")
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": tiny_checkpoint}},
        "2": {"class_type": "PersonalizeClassImages", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "class_prompt": "a photo of a cross\n\na photo of a square\n",
            "negative_prompt": "", "count": 3, "width": 64, "height": 64, "steps": 2, "cfg": 1.0,
            "sampler_name": "euler", "scheduler": "normal", "seed": 1}},
        "3": {"class_type": "PersonalizeDatasetFromFolder", "inputs": {
            "folder": str(folder), "vae": ["1", 2], "clip": ["1", 1], "resolution": 64, "buckets": True,
            "bucket_step": 16, "min_side": 0, "max_side": 0, "no_upscale": False, "crop": "random",
            "crop_variants": 2, "flip": True, "trigger_word": "sks", "instance_prompt": "", "shuffle_tags": True,
            "keep_tokens": 1, "tag_dropout": 0.1, "caption_dropout": 0.1, "masked_loss": False, "seed": 0,
            "use_cache": True, "class_images": ["2", 0]}},
        "4": {"class_type": "PersonalizeTrainLoRA", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "dataset": ["3", 0], "steps": 6, "learning_rate": 1e-3, "rank": 4,
            "alpha": 4.0, "targets": "attention_ff", "train_text_encoder": False, "text_encoder_lr": 5e-5,
            "dora": False, "batch_size": 2, "grad_accumulation": 1, "optimizer": "adamw", "lr_scheduler": "constant",
            "warmup_steps": 0, "loss_type": "mse", "min_snr_gamma": 5.0, "noise_offset": 0.0, "max_grad_norm": 1.0,
            "precision": "fp32", "gradient_checkpointing": False, "seed": 0, "checkpoint_every": 0,
            "run_name": "pipeline", "resume": "", "initial_lora": "[none]"}},
        "5": {"class_type": "PersonalizeSaveLoRA", "inputs": {"lora": ["4", 2], "name": "tests/pipeline", "save_dtype": "fp16"}},
        "6": {"class_type": "PersonalizeDatasetPreview", "inputs": {"dataset": ["3", 0], "vae": ["1", 2], "max_images": 9,
                                                                      "tile": 96, "epoch": 0, "seed": 0}},
    }
    result = comfy_runtime.run_prompt(prompt)
    starts = [e["data"] for e in result["events"] if e["type"] == "personalize.start"]
    assert starts and starts[0]["class_samples"] == 3 and starts[0]["buckets"] == 3
    steps = [e["data"]["loss"] for e in result["events"] if e["type"] == "personalize.step"]
    assert len(steps) == 6 and all(torch.isfinite(torch.tensor(steps)))
    preview = comfy_runtime.image_paths(result, "6")
    assert preview and Image.open(preview[0]).size[0] >= 3 * 96
    # One prompt per line: the class images cycle through them, each captioned with its own.
    cache = comfy_runtime.pack_import("trainers.data.cache").default_cache_root() / "class_images"
    folders = [p.parent for p in cache.glob("*/00001.txt") if p.read_text() == "a photo of a square"]
    assert len(folders) == 1
    assert [p.read_text() for p in sorted(folders[0].glob("*.txt"))] == [
        "a photo of a cross", "a photo of a square", "a photo of a cross"]


def test_a_caption_edited_on_disk_is_read_again(comfy_runtime, tiny_checkpoint, tmp_path):
    """ComfyUI reuses a node's output while its inputs are the same: the dataset node fingerprints its folder, so a
    file edited there makes it run again (it kept serving the first build), and an untouched folder stays cached."""
    folder = _mixed_folder(tmp_path / "data")
    inputs = {"folder": str(folder), "vae": ["1", 2], "clip": ["1", 1], "resolution": 64, "buckets": True,
              "bucket_step": 16, "min_side": 0, "max_side": 0, "no_upscale": False, "crop": "center", "crop_variants": 1,
              "flip": False, "trigger_word": "", "instance_prompt": "", "shuffle_tags": False, "keep_tokens": 0,
              "tag_dropout": 0.0, "caption_dropout": 0.0, "masked_loss": False, "seed": 0, "use_cache": True}
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": tiny_checkpoint}},
        "3": {"class_type": "PersonalizeDatasetFromFolder", "inputs": inputs},
        "6": {"class_type": "PersonalizeDatasetPreview", "inputs": {"dataset": ["3", 0], "vae": ["1", 2], "max_images": 4,
                                                                      "tile": 64, "epoch": 0, "seed": 0}},
    }

    def dataset_ran() -> bool:
        events = comfy_runtime.run_prompt(copy.deepcopy(prompt))["events"]  # as queued: the executor marks the dict
        cached = {n for e in events if e["type"] == "execution_cached" for n in e["data"]["nodes"]}
        return "3" not in cached

    runs = [dataset_ran(), dataset_ran()]
    (folder / "img0.txt").write_text("a completely new caption")
    runs.append(dataset_ran())
    assert runs == [True, False, True]


def test_a_textual_inversion_clip_never_shares_encodes_with_another(comfy_runtime, pack, base, tmp_path):
    """A CLIP that reads a trained word as vectors has the weights and patches of the CLIP it came from: its encodes
    must not be served from (or to) theirs, neither from the disk cache nor as the loop's dataset conditionings."""
    ti = comfy_runtime.pack_import("trainers.methods.textual_inversion")
    _, clip, vae = base
    folder = _mixed_folder(tmp_path / "data")
    for i in range(6):
        (folder / f"img{i}.txt").write_text("a photo of <c> cross")
    generator = torch.Generator().manual_seed(0)
    clips = [clip] + [ti.with_words(clip, {"<c>": {"clip_l": torch.randn(2, 768, generator=generator)}})
                      for _ in range(2)]
    spec = pack.build.DatasetSpec(folder=str(folder), resolution=64, bucket_step=16, use_cache=True,
                                  cache_root=tmp_path / "cache")
    conds, keys = [], []
    with torch.inference_mode():
        for each in clips:
            data, stats = pack.build.build_training_data(spec, vae, each)
            conds.append(data.samples[0].conditioning[0][0])
            keys.append(data.clip_key)
            assert stats.text_cache_hits == 0
    assert not torch.equal(conds[0], conds[1]) and not torch.equal(conds[1], conds[2])
    assert len(set(keys)) == 3  # the loop reuses a dataset's conditionings only for an equal key


def test_class_images_follow_the_model_and_the_count(comfy_runtime, pack, base, tmp_path):
    """Generated class images are reused only for the same MODEL/CLIP/VAE as sampled (a v-prediction patch, an object
    patch, reused the eps model's images before), and a dataset takes the `count` it was given, not every image an
    earlier, larger count left in the folder."""
    import comfy_extras.nodes_model_advanced as advanced
    node = comfy_runtime.pack_import("nodes.dataset").PersonalizeClassImages
    model, clip, vae = base
    settings = {"clip": clip, "vae": vae, "class_prompt": "a photo of a cross", "negative_prompt": "", "width": 64,
                "height": 64, "steps": 1, "cfg": 1.0, "sampler_name": "euler", "scheduler": "normal", "seed": 0}
    with torch.inference_mode():
        v_model = advanced.ModelSamplingDiscrete().patch(model, "v_prediction", False)[0]
        eps = node.execute(model=model, count=3, **settings).result[0]
        v_pred = node.execute(model=v_model, count=3, **settings).result[0]
        fewer = node.execute(model=model, count=2, **settings).result[0]
    assert eps["folder"] != v_pred["folder"] and fewer["folder"] == eps["folder"]
    dataset_node = comfy_runtime.pack_import("nodes.dataset").PersonalizeDatasetFromFolder
    with torch.inference_mode():  # through the dataset node, as the class_images link carries the count
        data = dataset_node.execute(
            folder=str(_mixed_folder(tmp_path / "data")), vae=vae, clip=clip, resolution=64, buckets=True, bucket_step=16,
            min_side=0, max_side=0, no_upscale=False, crop="center", crop_variants=1, flip=False, trigger_word="",
            instance_prompt="", shuffle_tags=False, keep_tokens=0, tag_dropout=0.0, caption_dropout=0.0,
            masked_loss=False, seed=0, use_cache=False, class_images=fewer).result[0]
    assert len(data.class_samples) == 2


def test_masked_loss_without_any_mask_is_refused(pack, base, tmp_path):
    """It would train unmasked without a word: no image has a _mask file or transparency."""
    _, clip, vae = base
    spec = pack.build.DatasetSpec(folder=str(_mixed_folder(tmp_path / "data")), resolution=64, buckets=False,
                                  masked_loss=True, use_cache=False)
    with pytest.raises(ValueError, match="`masked_loss` is on but no image"):
        pack.build.build_training_data(spec, vae, clip)


def test_keep_pixels_gives_each_variant_its_cropped_image(pack, base, tmp_path):
    """Methods that need the image itself (IP-Adapter references, ControlNet) get every variant's
    pixels, flipped like its latent; without the option nothing extra is kept."""
    _, clip, vae = base
    folder = _mixed_folder(tmp_path / "data")
    spec = pack.build.DatasetSpec(folder=str(folder), resolution=64, bucket_step=16, flip=True, use_cache=False,
                                  keep_pixels=True)
    with torch.inference_mode():
        data, _ = pack.build.build_training_data(spec, vae, clip)
        plain, _ = pack.build.build_training_data(pack.build.DatasetSpec(**{**spec.__dict__, "keep_pixels": False}), vae, clip)
    for sample in data.samples:
        pixels = sample.extras["pixels"]
        assert len(pixels) == len(sample.latents) == 2
        h, w = sample.bucket[-2:]
        assert pixels[0].shape == (h * 8, w * 8, 3) and 0.0 <= float(pixels[0].min()) <= float(pixels[0].max()) <= 1.0
        torch.testing.assert_close(pixels[1], pixels[0].flip(1))
    assert all(s.extras == {} for s in plain.samples)


def test_caption_choices_train_on_one_line_at_a_time(pack, base, tmp_path):
    """A caption file of several lines (and {a|b} groups): the dataset does not encode it as written, the
    trigger word reaches every line, and training encodes exactly the single-line variants."""
    model, clip, vae = base
    folder = _mixed_folder(tmp_path / "data")
    for i in range(6):
        (folder / f"img{i}.txt").write_text("a sks cross\n\na purple cross\n{big|small} sks cross\n")
    spec = pack.build.DatasetSpec(folder=str(folder), resolution=64, bucket_step=16, trigger_word="sks",
                                  use_cache=False)
    tokenizer = clip.tokenizer  # shared by the clones the loop makes
    seen = []
    original = tokenizer.tokenize_with_weights

    def recording(text, *args, **kwargs):
        seen.append(text)
        return original(text, *args, **kwargs)

    tokenizer.tokenize_with_weights = recording
    try:
        with torch.inference_mode():
            data, _ = pack.build.build_training_data(spec, vae, clip)
        assert seen == []  # nothing encoded as written
        assert data.samples[0].caption == "a sks cross\nsks, a purple cross\n{big|small} sks cross"
        job = pack.job.TrainJob(steps=20, batch_size=2, learning_rate=1e-3, seed=0, method_options={"rank": 2, "alpha": 2.0})
        method = pack.methods.create_method("lora", job.method_options)
        with torch.inference_mode():
            pack.loop.train(job, method, model, clip, data, checkpoint_dir=tmp_path / "run")
    finally:
        del tokenizer.tokenize_with_weights
    assert set(seen) == {"a sks cross", "sks, a purple cross", "big sks cross", "small sks cross"}
