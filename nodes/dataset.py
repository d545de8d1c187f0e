"""Dataset nodes: a folder of images + captions, encoded with the connected VAE and CLIP."""
from __future__ import annotations

import os

import torch
from typing_extensions import override  # noqa: F401

import comfy.utils
import folder_paths

from ..trainers.data.dataset import TrainingData, TrainSample, clip_identity, encode_captions
from ..trainers.data.folder import load_image, scan_folder
from ._api import io

Dataset = io.Custom("PERSONALIZE_DATASET")
_ENCODE_CHUNK = 8


def resolve_dataset_folder(folder: str) -> str:
    """Absolute paths as given; relative ones inside ComfyUI's input folder."""
    folder = folder.strip()
    if folder and not os.path.isabs(os.path.expanduser(folder)):
        return os.path.join(folder_paths.get_input_directory(), folder)
    return os.path.expanduser(folder)


def build_training_data(folder: str, vae, clip, resolution: int, trigger_word: str, instance_prompt: str,
                        flip: bool) -> TrainingData:
    entries = scan_folder(resolve_dataset_folder(folder), trigger_word=trigger_word, instance_prompt=instance_prompt)
    size = (resolution, resolution)
    images = [load_image(e.path, size) for e in entries]
    latents, flipped = [], []
    bar = comfy.utils.ProgressBar(len(images))
    for start in range(0, len(images), _ENCODE_CHUNK):
        chunk = torch.stack(images[start:start + _ENCODE_CHUNK])
        latents.extend(vae.encode(chunk).cpu())
        if flip:
            flipped.extend(vae.encode(torch.flip(chunk, dims=[2])).cpu())
        bar.update_absolute(min(len(images), start + _ENCODE_CHUNK), len(images))
    conditionings = encode_captions(clip, [e.caption for e in entries]) if clip is not None else [None] * len(entries)
    samples = []
    for i, entry in enumerate(entries):
        for _ in range(entry.repeats):
            samples.append(TrainSample(latent=latents[i], caption=entry.caption, source=str(entry.path),
                                       latent_flipped=flipped[i] if flip else None, conditioning=conditionings[i]))
    return TrainingData(samples=samples, resolution=size, clip_key=clip_identity(clip) if clip is not None else None,
                        settings={"folder": folder, "resolution": resolution, "trigger_word": trigger_word,
                                  "instance_prompt": instance_prompt, "flip": flip, "images": len(entries)})


class PersonalizeDatasetFromFolder(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PersonalizeDatasetFromFolder",
            display_name="Personalize Dataset (folder)",
            category="personalize/dataset",
            description="Images with same-name .txt captions (kohya 'N_name' sub-folders repeat N times), resized, "
                        "center-cropped and encoded once with the connected VAE and CLIP.",
            inputs=[
                io.String.Input("folder", default="", tooltip="Folder of training images: absolute, or relative to ComfyUI's input folder. Captions: same-name .txt/.caption files."),
                io.Vae.Input("vae", tooltip="The VAE that encodes the images into latents (the checkpoint's VAE)."),
                io.Clip.Input("clip", tooltip="The CLIP that encodes the captions (the checkpoint's CLIP)."),
                io.Int.Input("resolution", default=512, min=64, max=4096, step=64, tooltip="Training resolution in pixels (square): 512 for SD1.5, 1024 for SDXL."),
                io.String.Input("trigger_word", default="", tooltip="Prepended to every caption (e.g. 'sks'); leave empty to use captions as they are."),
                io.String.Input("instance_prompt", default="", tooltip="Caption for images without a caption file (e.g. 'a photo of sks dog')."),
                io.Boolean.Input("flip", default=False, tooltip="Random horizontal flips (both versions are encoded once). Off for asymmetric subjects such as text."),
            ],
            outputs=[Dataset.Output(display_name="dataset", tooltip="The encoded training set, for a Personalize training node.")],
        )

    @classmethod
    def execute(cls, folder, vae, clip, resolution, trigger_word, instance_prompt, flip) -> io.NodeOutput:
        return io.NodeOutput(build_training_data(folder, vae, clip, resolution, trigger_word, instance_prompt, flip))


NODES = [PersonalizeDatasetFromFolder]
