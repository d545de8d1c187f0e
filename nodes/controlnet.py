"""ControlNet nodes: a dataset of (condition, target, caption) triples, training a ControlNet for the base
MODEL, saving it where stock `ControlNetLoader` finds it, condition makers, and training other methods
under a ControlNet (the training nodes' `control` input)."""
from __future__ import annotations

import torch

from ..trainers.data.build import DatasetSpec, build_training_data
from ..trainers.data.captions import CaptionOptions
from ..trainers.data.pairs import MAKERS, SOURCES, ConditionSpec, make_condition
from ..trainers.formats.controlnet import check_family, save_controlnet, unet_dims
from ..trainers.methods import create_method
from ..trainers.methods.controlnet import TrainingControl as TrainingControlValue
from ._api import io, ui
from ._outputs import output_target
from .dataset import Dataset, folder_fingerprint, resolve_dataset_folder
from .train import TrainingControl, job_from_inputs, run_training, training_inputs

_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
_LOW = "Canny low threshold (as the stock Canny node)."
_HIGH = "Canny high threshold (as the stock Canny node)."
_SILHOUETTE = "Silhouette: RGB distance (0..1) from the border's median colour above which a pixel is foreground."


class PersonalizeControlNetDataset(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PersonalizeControlNetDataset",
            display_name="Personalize ControlNet Dataset (pairs)",
            category="personalize/dataset",
            description="Targets with .txt captions plus a condition image each: same-name partners from a condition "
                        "folder, or made from the targets (canny, soft edges, silhouette; no downloaded weights). "
                        "Conditions are cropped and flipped exactly like their targets.",
            inputs=[
                io.String.Input("folder", default="", tooltip="Folder of target images with same-name .txt captions: absolute, or relative to ComfyUI's input folder."),
                io.Combo.Input("condition", options=list(SOURCES), default="folder", tooltip="Where conditions come from: 'folder' (same-name images in condition_folder), or made from each target by canny, edges or silhouette."),
                io.String.Input("condition_folder", default="", tooltip="With condition 'folder': the condition images, named like their targets and of the same size."),
                io.Vae.Input("vae", tooltip="The VAE that encodes the targets (the checkpoint's VAE)."),
                io.Clip.Input("clip", tooltip="The CLIP that encodes the captions (the checkpoint's CLIP)."),
                io.Int.Input("resolution", default=512, min=64, max=4096, step=8, tooltip="Training area as a square side: 512 for SD1.5, 1024 for SDXL."),
                io.Boolean.Input("buckets", default=True, tooltip="Aspect-ratio buckets (kohya); off = square crops."),
                io.Combo.Input("crop", options=["center", "random"], default="center", tooltip="Crop inside the bucket: center, or random (crop_variants crops per image)."),
                io.Int.Input("crop_variants", default=4, min=1, max=64, tooltip="With random crop: how many crops of each image are encoded."),
                io.Boolean.Input("flip", default=False, tooltip="Random horizontal flips, condition and target together. Off when left and right matter (e.g. poses)."),
                io.String.Input("instance_prompt", default="", tooltip="Caption of targets without a caption file."),
                io.Float.Input("caption_dropout", default=0.5, min=0.0, max=1.0, step=0.01, tooltip="Share of steps trained with an empty caption, so the control works without a prompt and with low cfg (ControlNet's paper: 0.5)."),
                io.Float.Input("low_threshold", default=0.4, min=0.01, max=0.99, step=0.01, tooltip=_LOW),
                io.Float.Input("high_threshold", default=0.8, min=0.01, max=0.99, step=0.01, tooltip=_HIGH),
                io.Float.Input("silhouette_threshold", default=0.15, min=0.01, max=1.0, step=0.01, tooltip=_SILHOUETTE),
                io.Int.Input("seed", default=0, min=0, max=2**63 - 1, control_after_generate=False, tooltip="Seed of random crops."),
                io.Boolean.Input("use_cache", default=True, tooltip="Cache latents and caption encodings on disk."),
            ],
            outputs=[Dataset.Output(display_name="dataset", tooltip="Triples for Personalize Train ControlNet, or for any training node's control.")],
        )

    @classmethod
    def fingerprint_inputs(cls, folder="", condition_folder="", **_) -> str:
        return folder_fingerprint(folder, condition_folder)

    @classmethod
    def execute(cls, folder, condition, condition_folder, vae, clip, resolution, buckets, crop, crop_variants, flip,
                instance_prompt, caption_dropout, low_threshold, high_threshold, silhouette_threshold, seed,
                use_cache) -> io.NodeOutput:
        condition_spec = ConditionSpec(
            source=condition, low_threshold=low_threshold, high_threshold=high_threshold, threshold=silhouette_threshold,
            folder=resolve_dataset_folder(condition_folder) if condition == "folder" and condition_folder.strip() else None)
        spec = DatasetSpec(folder=resolve_dataset_folder(folder), resolution=resolution, buckets=buckets, crop=crop,
                           crop_variants=crop_variants, flip=flip, instance_prompt=instance_prompt, seed=seed,
                           use_cache=use_cache, captions=CaptionOptions(caption_dropout=caption_dropout),
                           condition=condition_spec)
        data, _ = build_training_data(spec, vae, clip)
        return io.NodeOutput(data)


class PersonalizeTrainControlNet(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PersonalizeTrainControlNet",
            display_name="Personalize Train ControlNet",
            category="personalize/train",
            description="Train a ControlNet for the base MODEL: a copy of its encoder joined by zero convolutions, so "
                        "training starts from the unchanged model. Only the ControlNet trains; the MODEL stays frozen.",
            inputs=[
                io.Model.Input("model", tooltip="The base MODEL (SD1.x/SD2.x/SDXL); it is never modified."),
                io.Clip.Input("clip", tooltip="The base CLIP, for caption dropout's empty caption."),
                Dataset.Input("dataset", tooltip="From Personalize ControlNet Dataset (pairs)."),
                io.Int.Input("steps", default=5000, min=1, max=10_000_000, tooltip="Optimizer steps."),
                io.Float.Input("learning_rate", default=1e-5, min=1e-8, max=1.0, step=1e-6, round=False, tooltip="Learning rate (ControlNet and diffusers use 1e-5 for SD)."),
                io.ControlNet.Input("initial_controlnet", optional=True, tooltip="Continue training this ControlNet (from ControlNetLoader, same base family) instead of a fresh one."),
                *training_inputs("controlnet"),
            ],
            outputs=[
                io.ControlNet.Output(display_name="control_net", tooltip="The trained ControlNet, for ControlNetApplyAdvanced or Personalize Save ControlNet."),
                io.LossMap.Output(display_name="loss", tooltip="Loss per optimizer step."),
                io.String.Output(display_name="checkpoint", tooltip="Path of the final resumable checkpoint."),
            ],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, clip, dataset, steps, learning_rate, initial_controlnet=None, **common) -> io.NodeOutput:
        initial = None
        if initial_controlnet is not None:
            check_family(initial_controlnet, model, "initial_controlnet")
            initial = {k: v.detach().float() for k, v in initial_controlnet.control_model.state_dict().items()}
        job = job_from_inputs("controlnet", {}, steps=steps, learning_rate=learning_rate, **common)
        method = create_method("controlnet", {"initial_weights": initial})
        result = run_training(cls.hidden.unique_id, job, method, model, clip, dataset, common["resume"])
        return io.NodeOutput(method.export(), {"loss": list(result.loss_history)}, str(result.final_checkpoint))


class PersonalizeSaveControlNet(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PersonalizeSaveControlNet",
            display_name="Personalize Save ControlNet",
            category="personalize/io",
            description="Save a ControlNet as safetensors in the LDM control_model.* layout into the controlnet folder "
                        "(stock ControlNetLoader loads it); written atomically, never overwriting.",
            inputs=[
                io.ControlNet.Input("control_net", tooltip="From Personalize Train ControlNet."),
                io.String.Input("name", default="personalize/my_controlnet", tooltip="File name inside the controlnet folder (no '..')."),
                io.Combo.Input("precision", options=list(_DTYPES), default="fp16", tooltip="Stored dtype: fp16 (like released ControlNets, half the size) or fp32 (bit-exact)."),
            ],
            outputs=[io.String.Output(display_name="path", tooltip="Where the file was written.")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, control_net, name, precision) -> io.NodeOutput:
        control_model = getattr(control_net, "control_model", None)
        if control_model is None or not hasattr(control_model, "zero_convs"):
            raise ValueError("`control_net` is not a UNet ControlNet (LDM layout); only those can be saved here.")
        out = output_target("controlnet", name)
        dims = unet_dims(control_model.state_dict())
        path = save_controlnet(control_model, out.target.parent, out.target.name, dtype=_DTYPES[precision],
                               metadata={"personalize.dims": dims})
        return io.NodeOutput(str(path), ui=ui.PreviewText(f"saved {out.shown(path)}"))


class PersonalizeTrainingControl(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PersonalizeTrainingControl",
            display_name="Personalize Training Control",
            category="personalize/train",
            description="Train a LoRA, DreamBooth or any method with a stock ControlNet applied in every batch (e.g. a "
                        "subject learned in fixed poses). The trained result still works without the ControlNet.",
            inputs=[
                io.ControlNet.Input("control_net", tooltip="A ControlNet for the base model (stock ControlNetLoader); it stays frozen."),
                io.Float.Input("strength", default=1.0, min=0.0, max=10.0, step=0.01, tooltip="Control strength, as in ControlNetApplyAdvanced."),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.001, tooltip="Apply from this fraction of the noise schedule (0 = most noise), as in ControlNetApplyAdvanced."),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.001, tooltip="Apply up to this fraction of the schedule."),
                io.Image.Input("image", optional=True, tooltip="One condition image for every sample; leave empty to use each sample's own condition (Personalize ControlNet Dataset)."),
            ],
            outputs=[TrainingControl.Output(display_name="control", tooltip="For the control input of a Personalize training node.")],
        )

    @classmethod
    def execute(cls, control_net, strength, start_percent, end_percent, image=None) -> io.NodeOutput:
        if getattr(control_net, "control_model", None) is None:
            raise ValueError("`control_net` must be a ControlNet from ControlNetLoader (LDM or diffusers UNet ControlNet).")
        return io.NodeOutput(TrainingControlValue(control_net, strength, start_percent, end_percent, image))


class PersonalizeConditionImage(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PersonalizeConditionImage",
            display_name="Personalize Condition Image",
            category="personalize/conditioning",
            description="Make a condition image the way Personalize ControlNet Dataset makes training conditions "
                        "(canny, soft edges, silhouette), for ControlNetApplyAdvanced at inference.",
            inputs=[
                io.Image.Input("image", tooltip="The image(s) to make conditions from."),
                io.Combo.Input("condition", options=list(MAKERS), default="canny", tooltip="canny (as the stock Canny node), edges (Sobel magnitude), silhouette (foreground mask on a plain background)."),
                io.Float.Input("low_threshold", default=0.4, min=0.01, max=0.99, step=0.01, tooltip=_LOW),
                io.Float.Input("high_threshold", default=0.8, min=0.01, max=0.99, step=0.01, tooltip=_HIGH),
                io.Float.Input("silhouette_threshold", default=0.15, min=0.01, max=1.0, step=0.01, tooltip=_SILHOUETTE),
            ],
            outputs=[io.Image.Output(display_name="condition", tooltip="The condition image(s), same size as the input.")],
        )

    @classmethod
    def execute(cls, image, condition, low_threshold, high_threshold, silhouette_threshold) -> io.NodeOutput:
        ConditionSpec(source=condition, low_threshold=low_threshold, high_threshold=high_threshold)  # checks the inputs
        return io.NodeOutput(make_condition(image.cpu(), condition, low_threshold, high_threshold, silhouette_threshold))


NODES = [PersonalizeControlNetDataset, PersonalizeTrainControlNet, PersonalizeSaveControlNet, PersonalizeTrainingControl,
         PersonalizeConditionImage]
