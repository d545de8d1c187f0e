"""DreamBooth node: full fine-tune with prior preservation, saved as a checkpoint stock ComfyUI loads."""
from __future__ import annotations

import dataclasses

import folder_paths
import torch

from ..trainers.formats.checkpoint_file import modelspec_metadata, save_full_checkpoint
from ..trainers.formats.files import safe_stem
from ..trainers.job import help_text
from ..trainers.methods import create_method
from ..trainers.methods.dreambooth import DreamBoothConfig, check_dataset_fits
from ._api import io
from .dataset import Dataset
from .train import job_from_inputs, prior_inputs, run_training, training_inputs

SAVE_DTYPES = {"model": None, "fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def _help(name: str) -> str:
    return DreamBoothConfig.__dataclass_fields__[name].metadata["help"]


def dreambooth_data(dataset, prior_preservation: bool, instance_prompt: str):
    """The dataset as DreamBooth trains on it: checked class images, optionally one instance prompt for all."""
    if prior_preservation:
        if not dataset.class_samples:
            raise ValueError("`prior_preservation` is on but the dataset has no class images: connect Personalize Class "
                             "Images to the dataset's `class_images` (count >= 1), or give it a `class_folder` with images.")
        if any(not s.caption.strip() for s in dataset.class_samples):
            raise ValueError("`prior_preservation` is on but class images have no caption: set the dataset's "
                             "`class_prompt` (e.g. 'a photo of a dog') or put .txt captions next to the class images.")
    if instance_prompt.strip():
        samples = [dataclasses.replace(s, caption=instance_prompt.strip(), conditioning=None) for s in dataset.samples]
        dataset = dataclasses.replace(dataset, samples=samples, caption_options=None)
    return dataset


class PersonalizeTrainDreamBooth(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        h = {name: help_text(name) for name in ("prior_loss_weight", "weight_dtype", "weight_rounding", "fused_backward",
                                               "ema_decay", "ema_warmup_steps", "ema_on_cpu", "text_encoder_lr")}
        return io.Schema(
            node_id="PersonalizeTrainDreamBooth",
            display_name="Personalize Train DreamBooth",
            category="personalize/train",
            description="DreamBooth: fine-tune the whole UNet (optionally the text encoder) on a few images of a subject, "
                        "with prior preservation on class images. Returns the trained MODEL/CLIP (inputs untouched) and "
                        "can save a full checkpoint that stock CheckpointLoaderSimple loads.",
            inputs=[
                io.Model.Input("model", tooltip="The base MODEL (from CheckpointLoaderSimple); it is never modified."),
                io.Clip.Input("clip", tooltip="The base CLIP; fine-tuned only with train_text_encoder, else used to encode captions."),
                Dataset.Input("dataset", tooltip="From Personalize Dataset (folder); for prior preservation give it class images."),
                io.Int.Input("steps", default=800, min=1, max=1_000_000, tooltip="Optimizer steps (DreamBooth: ~100-200 per instance image)."),
                io.Float.Input("learning_rate", default=2e-6, min=1e-9, max=1.0, step=1e-7, round=False, tooltip="UNet learning rate (DreamBooth on SD: 1e-6 to 5e-6)."),
                io.String.Input("instance_prompt", default="", tooltip="If set, the caption of every instance image, e.g. 'a photo of sks dog' (identifier + class); empty = the dataset's captions."),
                io.Boolean.Input("prior_preservation", default=True, tooltip="Add the class images' loss (prior preservation) so the class keeps its look; needs class images in the dataset."),
                io.Float.Input("prior_loss_weight", default=1.0, min=0.0, max=10.0, step=0.05, tooltip=h["prior_loss_weight"]),
                *prior_inputs(weight=False),
                io.Boolean.Input("train_text_encoder", default=False, tooltip=_help("train_text_encoder")),
                io.Float.Input("text_encoder_lr", default=1e-6, min=0.0, max=1.0, step=1e-7, round=False, tooltip=h["text_encoder_lr"]),
                io.Float.Input("text_encoder_fraction", default=0.5, min=0.01, max=1.0, step=0.01, tooltip=_help("text_encoder_fraction")),
                io.Combo.Input("weight_dtype", options=["fp32", "bf16"], default="fp32", tooltip=h["weight_dtype"]),
                io.Combo.Input("weight_rounding", options=["stochastic", "kahan", "nearest"], default="stochastic", tooltip=h["weight_rounding"]),
                io.Boolean.Input("fused_backward", default=False, tooltip=h["fused_backward"]),
                io.Float.Input("ema_decay", default=0.0, min=0.0, max=0.99999, step=0.0001, round=False, tooltip=h["ema_decay"]),
                io.Int.Input("ema_warmup_steps", default=100, min=0, max=1_000_000, tooltip=h["ema_warmup_steps"]),
                io.Boolean.Input("ema_on_cpu", default=False, tooltip=h["ema_on_cpu"]),
                io.Boolean.Input("use_ema", default=True, tooltip="With an EMA: the returned and saved model carries the EMA weights; off = the raw trained weights."),
                io.String.Input("save_name", default="", tooltip="Save a full checkpoint under this name in the checkpoints folder (never overwrites; a number is added); empty = don't save."),
                io.Combo.Input("save_dtype", options=list(SAVE_DTYPES), default="model", tooltip="Dtype of the returned and saved weights: model = the base model's own (e.g. fp16), or fp16/bf16/fp32."),
                *training_inputs("dreambooth"),
                io.Vae.Input("vae", optional=True, tooltip="The checkpoint's VAE: stored in the saved checkpoint (needed when save_name is set)."),
            ],
            outputs=[
                io.Model.Output(display_name="model", tooltip="The fine-tuned MODEL, for sampling in this graph."),
                io.Clip.Output(display_name="clip", tooltip="The CLIP (fine-tuned with train_text_encoder, else the input's)."),
                io.LossMap.Output(display_name="loss", tooltip="Loss per optimizer step (instance + weighted class loss)."),
                io.String.Output(display_name="checkpoint", tooltip="Path of the final resumable training checkpoint."),
                io.String.Output(display_name="saved", tooltip="Path of the saved full checkpoint ('' when save_name is empty)."),
            ],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, clip, dataset, steps, learning_rate, instance_prompt, prior_preservation, prior_loss_weight,
                train_text_encoder, text_encoder_lr, text_encoder_fraction, weight_dtype, weight_rounding, fused_backward,
                ema_decay, ema_warmup_steps, ema_on_cpu, use_ema, save_name, save_dtype, vae=None, **common) -> io.NodeOutput:
        if save_name.strip() and vae is None:
            raise ValueError("`save_name` is set but `vae` is not connected: a full checkpoint stores the VAE, so connect "
                             "the checkpoint's VAE (or leave save_name empty).")
        if use_ema and ema_decay <= 0:
            use_ema = False  # no EMA kept: the raw weights are the result
        stem = safe_stem(save_name, input_name="save_name") if save_name.strip() else ""
        check_dataset_fits(model, dataset)
        data = dreambooth_data(dataset, prior_preservation, instance_prompt)
        options = {"train_text_encoder": train_text_encoder, "text_encoder_fraction": text_encoder_fraction,
                   "weight_dtype": weight_dtype}
        job = job_from_inputs("dreambooth", options, steps=steps, learning_rate=learning_rate, text_encoder_lr=text_encoder_lr,
                              prior_loss_weight=prior_loss_weight if prior_preservation else 0.0, weight_dtype=weight_dtype,
                              weight_rounding=weight_rounding, fused_backward=fused_backward, ema_decay=ema_decay,
                              ema_warmup_steps=ema_warmup_steps, ema_on_cpu=ema_on_cpu, **common)
        method = create_method("dreambooth", options)
        result = run_training(cls.hidden.unique_id, job, method, model, clip, data, common["resume"], train_text_encoder)
        weights = result.ema.named(method.trainable_state_dict()) if use_ema and result.ema is not None else None
        model_out, clip_out = method.trained_outputs(weights, SAVE_DTYPES[save_dtype])
        saved = ""
        if stem:
            save_model, save_clip = method.saving_outputs(weights, SAVE_DTYPES[save_dtype])
            metadata = modelspec_metadata(save_model, title=stem, resolution=data.resolution,
                                          description=f"DreamBooth, {result.global_step} steps",
                                          extra={"personalize.job": job.to_dict(), "personalize.ema": weights is not None})
            saved = str(save_full_checkpoint(folder_paths.get_folder_paths("checkpoints")[0], stem, save_model,
                                             save_clip if save_clip is not None else clip, vae, metadata))
        return io.NodeOutput(model_out, clip_out if clip_out is not None else clip, {"loss": list(result.loss_history)},
                             str(result.final_checkpoint), saved)


NODES = [PersonalizeTrainDreamBooth]
