"""Dataset nodes: a folder of images + captions (buckets, caption processing, masks, caches),
class images for prior preservation, and a preview of what the trainer will see."""
from __future__ import annotations

import hashlib
import os
import textwrap
import uuid

import folder_paths
import numpy as np
import torch
from PIL import Image, ImageDraw

from ..trainers.data.build import DatasetSpec, build_training_data
from ..trainers.data.cache import default_cache_root, sampling_fingerprint
from ..trainers.data.captions import CaptionOptions, caption_rng, process_caption
from ..trainers.data.class_images import class_image_key, class_prompts, generate_class_images
from ._api import io, ui

Dataset = io.Custom("PERSONALIZE_DATASET")
ClassImages = io.Custom("PERSONALIZE_CLASS_IMAGES")


def _caption_help(name: str) -> str:
    return CaptionOptions.__dataclass_fields__[name].metadata.get("help", name)


def folder_fingerprint(*folders: str | None) -> str:
    """What ComfyUI compares to decide whether a dataset node runs again (its `fingerprint_inputs`): the files of its
    folders by name, size and modification time. Without it an image or caption edited on disk was never read
    again: ComfyUI reused the node's cached dataset, since none of its inputs had changed."""
    digest = hashlib.sha256()
    for folder in folders:
        if not folder or not folder.strip():
            continue
        root = resolve_dataset_folder(folder)
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for name in sorted(filenames):
                path = os.path.join(dirpath, name)
                try:
                    stat = os.stat(path)
                except OSError:
                    continue
                digest.update(f"{os.path.relpath(path, root)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def resolve_dataset_folder(folder: str) -> str:
    """Absolute paths as given; relative ones inside ComfyUI's input folder."""
    folder = folder.strip()
    if folder and not os.path.isabs(os.path.expanduser(folder)):
        return os.path.join(folder_paths.get_input_directory(), folder)
    return os.path.expanduser(folder)


class PersonalizeDatasetFromFolder(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PersonalizeDatasetFromFolder",
            display_name="Personalize Dataset (folder)",
            category="personalize/dataset",
            description="Images with same-name .txt captions (kohya 'N_name' sub-folders repeat N times) in aspect-ratio "
                        "buckets, encoded with the connected VAE and CLIP; latents and caption encodings are cached on disk.",
            inputs=[
                io.String.Input("folder", default="", tooltip="Folder of training images: absolute, or relative to ComfyUI's input folder. Captions: same-name .txt/.caption files; masks: name_mask.png."),
                io.Vae.Input("vae", tooltip="The VAE that encodes the images into latents (the checkpoint's VAE)."),
                io.Clip.Input("clip", tooltip="The CLIP that encodes the captions (the checkpoint's CLIP)."),
                io.Int.Input("resolution", default=512, min=64, max=4096, step=8, tooltip="Training area as a square side: 512 for SD1.5, 1024 for SDXL. Buckets keep about this many pixels."),
                io.Boolean.Input("buckets", default=True, tooltip="Aspect-ratio buckets (kohya): each image goes to the bucket of the nearest aspect ratio; off = square crops."),
                io.Int.Input("bucket_step", default=64, min=8, max=256, step=8, tooltip="Bucket sides are multiples of this (64 for SD; smaller for tiny models)."),
                io.Int.Input("min_side", default=0, min=0, max=8192, step=8, tooltip="Smallest bucket side; 0 = resolution/2."),
                io.Int.Input("max_side", default=0, min=0, max=8192, step=8, tooltip="Largest bucket side; 0 = resolution*2."),
                io.Boolean.Input("no_upscale", default=False, tooltip="Never enlarge small images: they get a bucket of their own size (kohya's bucket_no_upscale)."),
                io.Combo.Input("crop", options=["center", "random"], default="center", tooltip="Crop inside the bucket: center, or random (crop_variants crops per image are encoded and drawn from)."),
                io.Int.Input("crop_variants", default=4, min=1, max=64, tooltip="With random crop: how many crops of each image are encoded (and cached)."),
                io.Boolean.Input("flip", default=False, tooltip="Random horizontal flips (both versions are encoded once). Off for asymmetric subjects such as text."),
                io.String.Input("trigger_word", default="", tooltip="Prepended to every caption that lacks it (e.g. 'sks')."),
                io.String.Input("instance_prompt", default="", tooltip="Caption for images without a caption file (e.g. 'a photo of sks dog'); if empty, a kohya 'N_name' folder's name captions its images."),
                io.Boolean.Input("shuffle_tags", default=False, tooltip=_caption_help("shuffle_tags")),
                io.Int.Input("keep_tokens", default=0, min=0, max=255, tooltip=_caption_help("keep_tokens")),
                io.Float.Input("tag_dropout", default=0.0, min=0.0, max=1.0, step=0.01, tooltip=_caption_help("tag_dropout")),
                io.Float.Input("caption_dropout", default=0.0, min=0.0, max=1.0, step=0.01, tooltip=_caption_help("caption_dropout")),
                io.Boolean.Input("masked_loss", default=False, tooltip="Weight the loss by each image's mask: name_mask.png next to the image, else its alpha channel."),
                io.Int.Input("seed", default=0, min=0, max=2**63 - 1, control_after_generate=False, tooltip="Seed of random crops (and of the preview's caption variants)."),
                io.Boolean.Input("use_cache", default=True, tooltip="Cache latents and caption encodings on disk (reused while image, model and settings match)."),
                ClassImages.Input("class_images", optional=True, tooltip="Class images for prior preservation, from Personalize Class Images."),
                io.String.Input("class_folder", default="", optional=True, tooltip="Or a folder of existing class images (captions: .txt files, else class_prompt)."),
                io.String.Input("class_prompt", default="", optional=True, tooltip="Caption of class images without a caption file (e.g. 'a photo of a dog')."),
                io.Boolean.Input("caption_choices", default=True, optional=True, tooltip=_caption_help("caption_choices")),
            ],
            outputs=[Dataset.Output(display_name="dataset", tooltip="The encoded training set, for a Personalize training node.")],
        )

    @classmethod
    def fingerprint_inputs(cls, folder="", class_folder="", **_) -> str:
        return folder_fingerprint(folder, class_folder)

    @classmethod
    def execute(cls, folder, vae, clip, resolution, buckets, bucket_step, min_side, max_side, no_upscale, crop,
                crop_variants, flip, trigger_word, instance_prompt, shuffle_tags, keep_tokens, tag_dropout,
                caption_dropout, masked_loss, seed, use_cache, class_images=None, class_folder="",
                class_prompt="", caption_choices=True) -> io.NodeOutput:
        class_count = None
        if class_images is not None:
            class_folder, class_prompt = class_images["folder"], class_images["prompt"]
            class_count = class_images["count"]
        spec = DatasetSpec(
            folder=resolve_dataset_folder(folder), resolution=resolution, buckets=buckets, bucket_step=bucket_step,
            min_side=min_side or None, max_side=max_side or None, no_upscale=no_upscale, crop=crop,
            crop_variants=crop_variants, flip=flip, trigger_word=trigger_word, instance_prompt=instance_prompt,
            masked_loss=masked_loss, seed=seed, use_cache=use_cache,
            captions=CaptionOptions(shuffle_tags=shuffle_tags, keep_tokens=keep_tokens, tag_dropout=tag_dropout,
                                    caption_dropout=caption_dropout, caption_choices=caption_choices),
            class_folder=resolve_dataset_folder(class_folder) if class_folder and class_folder.strip() else None,
            class_prompt=class_prompt, class_count=class_count)
        data, _ = build_training_data(spec, vae, clip)
        return io.NodeOutput(data)


class PersonalizeClassImages(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PersonalizeClassImages",
            display_name="Personalize Class Images",
            category="personalize/dataset",
            description="Generate class images (prior preservation, DreamBooth) with the base model and stock sampling; "
                        "cached on disk per model and setting, so later runs reuse them.",
            inputs=[
                io.Model.Input("model", tooltip="The base MODEL (before training)."),
                io.Clip.Input("clip", tooltip="The base CLIP."),
                io.Vae.Input("vae", tooltip="The VAE that decodes the generated latents."),
                io.String.Input("class_prompt", default="a photo of a dog", multiline=True,
                                tooltip="The class without the identifier, e.g. 'a photo of a dog'. Several prompts, one per line: "
                                        "the images cycle through them (a regularization set of what the model should keep drawing)."),
                io.String.Input("negative_prompt", default="", tooltip="Negative prompt for generation."),
                io.Int.Input("count", default=100, min=1, max=10000, tooltip="How many class images (DreamBooth: ~100-200)."),
                io.Int.Input("width", default=512, min=64, max=4096, step=8, tooltip="Image width in pixels."),
                io.Int.Input("height", default=512, min=64, max=4096, step=8, tooltip="Image height in pixels."),
                io.Int.Input("steps", default=25, min=1, max=200, tooltip="Sampling steps."),
                io.Float.Input("cfg", default=7.0, min=0.0, max=30.0, step=0.1, tooltip="Classifier-free guidance scale."),
                io.Combo.Input("sampler_name", options=_sampler_names(), default="euler", tooltip="Sampler."),
                io.Combo.Input("scheduler", options=_scheduler_names(), default="normal", tooltip="Scheduler."),
                io.Int.Input("seed", default=0, min=0, max=2**63 - 1, control_after_generate=False, tooltip="Image i uses seed + i."),
            ],
            outputs=[ClassImages.Output(display_name="class_images", tooltip="For the class_images input of Personalize Dataset."),
                     io.Image.Output(display_name="images", tooltip="The first images, for a look.")],
        )

    @classmethod
    def execute(cls, model, clip, vae, class_prompt, negative_prompt, count, width, height, steps, cfg, sampler_name,
                scheduler, seed) -> io.NodeOutput:
        prompts = class_prompts(class_prompt)
        if not prompts:
            raise ValueError("`class_prompt` is empty: describe the class, e.g. 'a photo of a dog'.")
        settings = {"prompt": "\n".join(prompts), "negative": negative_prompt, "width": width, "height": height,
                    "steps": steps, "cfg": cfg, "sampler": sampler_name, "scheduler": scheduler, "seed": seed}
        try:
            fingerprint = sampling_fingerprint(model, clip, vae)
        except ValueError:  # something without a stable description: generate afresh rather than reuse wrongly
            fingerprint = uuid.uuid4().hex
        folder = default_cache_root() / "class_images" / class_image_key(fingerprint, settings)
        import comfy.utils
        bar = comfy.utils.ProgressBar(count)
        paths = generate_class_images(model, clip, vae, folder, prompts=prompts, negative=negative_prompt, count=count,
                                      width=width, height=height, steps=steps, cfg=cfg, sampler_name=sampler_name,
                                      scheduler=scheduler, seed=seed, progress=lambda i, n: bar.update_absolute(i, n))
        preview = torch.stack([torch.from_numpy(np.asarray(Image.open(p).convert("RGB"), dtype=np.float32) / 255.0)
                               for p in paths[:8]])
        # Every generated image has its caption file; "prompt" only captions class images that lack one.
        return io.NodeOutput({"folder": str(folder), "prompt": prompts[0], "count": count}, preview)


class PersonalizeDatasetPreview(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PersonalizeDatasetPreview",
            display_name="Personalize Dataset Preview",
            category="personalize/dataset",
            description="A grid of what the trainer will see: each bucketed crop (decoded from its latent) with its final caption.",
            inputs=[
                Dataset.Input("dataset", tooltip="From Personalize Dataset (folder)."),
                io.Vae.Input("vae", tooltip="The VAE that decodes the latents (the dataset's VAE)."),
                io.Int.Input("max_images", default=16, min=1, max=256, tooltip="How many samples to show."),
                io.Int.Input("tile", default=256, min=64, max=1024, step=8, tooltip="Tile size of the grid in pixels."),
                io.Int.Input("epoch", default=0, min=0, max=100000, tooltip="Show the caption variants of this epoch (shuffle/dropout)."),
                io.Int.Input("seed", default=0, min=0, max=2**63 - 1, control_after_generate=False, tooltip="The training node's seed (caption variants depend on it)."),
            ],
            outputs=[io.Image.Output(display_name="grid", tooltip="The preview grid.")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, dataset, vae, max_images, tile, epoch, seed) -> io.NodeOutput:
        grid = preview_grid(dataset, vae, max_images, tile, epoch, seed)
        return io.NodeOutput(grid, ui=ui.PreviewImage(grid, cls=cls))


def preview_grid(dataset, vae, max_images: int, tile: int, epoch: int, seed: int) -> torch.Tensor:
    """IMAGE [1, H, W, 3]: decoded crops (letterboxed into tiles) with their captions under them."""
    samples = (dataset.samples + dataset.class_samples)[:max_images]
    columns = min(4, len(samples))
    rows = -(-len(samples) // columns)
    caption_h = 48
    canvas = Image.new("RGB", (columns * tile, rows * (tile + caption_h)), (24, 24, 24))
    draw = ImageDraw.Draw(canvas)
    for index, sample in enumerate(samples):
        pixels = vae.decode(sample.latent[None].float())[0].clamp(0, 1)
        image = Image.fromarray((pixels.cpu().numpy() * 255).astype(np.uint8))
        bucket = image.size
        image.thumbnail((tile, tile))
        x, y = (index % columns) * tile, (index // columns) * (tile + caption_h)
        canvas.paste(image, (x + (tile - image.width) // 2, y + (tile - image.height) // 2))
        caption, options = sample.caption, dataset.caption_options
        if options is not None and index < len(dataset.samples):
            caption = process_caption(caption, options, caption_rng(seed, epoch, index)) or "(empty: caption dropout)"
        elif options is not None:  # class images: caption choices only, drawn like the training loop's class stream
            caption = process_caption(caption, CaptionOptions(caption_choices=options.caption_choices),
                                      caption_rng(seed + 1, epoch, index - len(dataset.samples)))
        label = f"{bucket[0]}x{bucket[1]}: {caption}"
        for line_no, line in enumerate(textwrap.wrap(label, width=max(8, tile // 7))[:3]):
            draw.text((x + 4, y + tile + 2 + 15 * line_no), line, fill=(230, 230, 230))
    return torch.from_numpy(np.asarray(canvas, dtype=np.float32) / 255.0)[None]


def _sampler_names() -> list[str]:
    import comfy.samplers
    return list(comfy.samplers.KSampler.SAMPLERS)


def _scheduler_names() -> list[str]:
    import comfy.samplers
    return list(comfy.samplers.KSampler.SCHEDULERS)


NODES = [PersonalizeDatasetFromFolder, PersonalizeClassImages, PersonalizeDatasetPreview]
