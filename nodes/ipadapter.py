"""IP-Adapter nodes: load (official layout, `ipadapter` model folder), apply on a MODEL clone, train, save."""
from __future__ import annotations

import dataclasses
import os

import folder_paths
import torch

from ..trainers.data.build import build_training_data
from ..trainers.formats.ipadapter import ipadapter_metadata, load_ipadapter_file, save_ipadapter
from ..trainers.ipadapter.adapter import IPAdapterModel
from ..trainers.ipadapter.apply import apply_ipadapter, image_features, uncond_features
from ..trainers.methods import create_method
from ..trainers.methods.ip_adapter import IPAdapterConfig, add_image_features
from ._api import io, ui
from ._outputs import output_target
from .dataset import Dataset
from .train import job_from_inputs, run_training, training_inputs

FOLDER = "ipadapter"


def register_folder() -> None:
    """The `models/ipadapter` folder IPAdapter_plus users already have (kept if another pack registered it)."""
    if FOLDER not in folder_paths.folder_names_and_paths:
        folder_paths.add_model_folder_path(FOLDER, os.path.join(folder_paths.models_dir, FOLDER))
    paths, extensions = folder_paths.folder_names_and_paths[FOLDER]
    folder_paths.folder_names_and_paths[FOLDER] = (paths, set(extensions) | set(folder_paths.supported_pt_extensions))


register_folder()

IPAdapter = io.Custom("PERSONALIZE_IPADAPTER")


def _help(name: str) -> str:
    return IPAdapterConfig.__dataclass_fields__[name].metadata["help"]


def adapter_from(value) -> IPAdapterModel:
    """Our IPADAPTER value is an IPAdapterModel (from the loader or the training node)."""
    if not isinstance(value, IPAdapterModel):
        raise ValueError("`ipadapter` must come from Personalize Load IP-Adapter or Personalize Train IP-Adapter.")
    return value


class PersonalizeLoadIPAdapter(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PersonalizeLoadIPAdapter",
            display_name="Personalize Load IP-Adapter",
            category="personalize/ipadapter",
            description="Load an IP-Adapter in the official layout (image_proj + ip_adapter.N.to_k_ip/to_v_ip; "
                        ".safetensors, or the original .bin read weights-only) from models/ipadapter. Base and plus "
                        "(Resampler) variants, SD1.x and SDXL, detected from the file.",
            inputs=[io.Combo.Input("ipadapter_file", options=folder_paths.get_filename_list(FOLDER),
                                   tooltip="A file of the ipadapter model folder.")],
            outputs=[IPAdapter.Output(display_name="ipadapter", tooltip="The adapter, for Personalize Apply IP-Adapter."),
                     io.String.Output(display_name="info", tooltip="Detected variant, base model and CLIP-Vision width.")],
        )

    @classmethod
    def execute(cls, ipadapter_file) -> io.NodeOutput:
        path = folder_paths.get_full_path(FOLDER, ipadapter_file)
        if path is None:
            raise ValueError(f"`ipadapter_file` {ipadapter_file!r} is not in the ipadapter model folder.")
        state, _, spec = load_ipadapter_file(path)
        adapter = IPAdapterModel.from_state_dict(state)
        info = (f"{spec.variant} IP-Adapter for {spec.family}: {spec.tokens} image tokens, {len(spec.inner_dims)} "
                f"cross-attention layers, reads CLIP-Vision {spec.clip_vision_output} of width {spec.embed_dim}")
        return io.NodeOutput(adapter, info)


class PersonalizeApplyIPAdapter(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PersonalizeApplyIPAdapter",
            display_name="Personalize Apply IP-Adapter",
            category="personalize/ipadapter",
            description="Steer a MODEL with reference images: every cross-attention also attends to the images' "
                        "tokens (decoupled cross-attention), through attention-replace patches on a clone.",
            inputs=[
                io.Model.Input("model", tooltip="The MODEL to steer; it is never modified (a clone is patched)."),
                IPAdapter.Input("ipadapter", tooltip="From Personalize Load IP-Adapter or Personalize Train IP-Adapter."),
                io.ClipVision.Input("clip_vision", tooltip="From stock Load CLIP Vision: the image encoder the adapter was trained with."),
                io.Image.Input("image", tooltip="Reference image(s); a batch is averaged or concatenated (see combine)."),
                io.Float.Input("weight", default=1.0, min=-1.0, max=5.0, step=0.05, tooltip="Strength of the image tokens; 0 leaves the model unchanged."),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.001, tooltip="Sampling progress at which the adapter starts acting."),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.001, tooltip="Sampling progress at which it stops."),
                io.Combo.Input("combine", options=["average", "concat"], default="average", tooltip="Several reference images: average their features (one token set) or concatenate their tokens."),
                io.Combo.Input("crop", options=["center", "none"], default="center", tooltip="As stock CLIPVisionEncode: center-crop to a square, or squash the whole image."),
                io.Image.Input("negative_image", optional=True, tooltip="Optional image whose tokens steer away (the unconditional side of CFG); default: no image."),
            ],
            outputs=[io.Model.Output(display_name="model", tooltip="A clone of the MODEL with the IP-Adapter applied.")],
        )

    @classmethod
    def execute(cls, model, ipadapter, clip_vision, image, weight, start_percent, end_percent, combine, crop,
                negative_image=None) -> io.NodeOutput:
        adapter = adapter_from(ipadapter)
        features = image_features(clip_vision, image, adapter, crop=crop == "center")
        negative = (uncond_features(clip_vision, adapter) if negative_image is None else
                    image_features(clip_vision, negative_image, adapter, crop=crop == "center", input_name="negative_image"))
        return io.NodeOutput(apply_ipadapter(model, adapter, features, negative, weight=weight,
                                             start_percent=start_percent, end_percent=end_percent, combine=combine))


class PersonalizeTrainIPAdapter(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PersonalizeTrainIPAdapter",
            display_name="Personalize Train IP-Adapter",
            category="personalize/train",
            description="Train an IP-Adapter (paper recipe): the base model frozen, the image projection and new K/V "
                        "learn from image-caption pairs whose image is also the reference; text/image/both dropped "
                        "for classifier-free guidance. Cancel keeps a resumable checkpoint.",
            inputs=[
                io.Model.Input("model", tooltip="The base MODEL; it is never modified."),
                io.Clip.Input("clip", tooltip="The base CLIP, used to encode captions (and the empty caption for text drop)."),
                io.Vae.Input("vae", tooltip="The VAE the dataset was encoded with (its cached latents are reused)."),
                io.ClipVision.Input("clip_vision", tooltip="From stock Load CLIP Vision: the image encoder the adapter will read."),
                Dataset.Input("dataset", tooltip="From Personalize Dataset (folder): images with captions."),
                io.Int.Input("steps", default=2000, min=1, max=1_000_000, tooltip="Optimizer steps."),
                io.Float.Input("learning_rate", default=1e-4, min=1e-8, max=1.0, step=1e-6, round=False, tooltip="Learning rate (paper: 1e-4, weight decay 1e-2)."),
                io.Combo.Input("variant", options=["base", "plus"], default="base", tooltip=_help("variant")),
                io.Int.Input("tokens", default=0, min=0, max=256, tooltip=_help("tokens")),
                io.Int.Input("resampler_depth", default=4, min=1, max=16, tooltip=_help("resampler_depth")),
                io.Float.Input("text_drop", default=0.05, min=0.0, max=1.0, step=0.01, tooltip=_help("text_drop")),
                io.Float.Input("image_drop", default=0.05, min=0.0, max=1.0, step=0.01, tooltip=_help("image_drop")),
                io.Float.Input("both_drop", default=0.05, min=0.0, max=1.0, step=0.01, tooltip=_help("both_drop")),
                io.Combo.Input("crop", options=["center", "none"], default="center", tooltip="How training images reach the image encoder (as stock CLIPVisionEncode)."),
                *training_inputs("ip_adapter"),
            ],
            outputs=[
                IPAdapter.Output(display_name="ipadapter", tooltip="The trained adapter, for Personalize Apply IP-Adapter or Personalize Save IP-Adapter."),
                io.LossMap.Output(display_name="loss", tooltip="Loss per optimizer step."),
                io.String.Output(display_name="checkpoint", tooltip="Path of the final resumable checkpoint."),
            ],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, clip, vae, clip_vision, dataset, steps, learning_rate, variant, tokens, resampler_depth,
                text_drop, image_drop, both_drop, crop, **common) -> io.NodeOutput:
        options = {"variant": variant, "tokens": tokens, "resampler_depth": resampler_depth, "text_drop": text_drop,
                   "image_drop": image_drop, "both_drop": both_drop}
        data = pixel_dataset(dataset, vae, clip)
        uncond = prepare_features(data, clip_vision, variant, crop == "center")
        job = job_from_inputs("ip_adapter", {**options, "crop": crop}, steps=steps, learning_rate=learning_rate, **common)
        method = create_method("ip_adapter", {**options, "uncond_features": uncond})
        result = run_training(cls.hidden.unique_id, job, method, model, clip, data, common["resume"])
        adapter = IPAdapterModel.from_state_dict(method.export())
        adapter.training_metadata = {"steps": result.global_step, "run_name": job.run_name, "job": job.to_dict()}
        return io.NodeOutput(adapter, {"loss": list(result.loss_history)}, str(result.final_checkpoint))


def pixel_dataset(dataset, vae, clip):
    """The dataset rebuilt with each variant's pixels kept (latents and captions come from the caches)."""
    if getattr(dataset, "spec", None) is None:
        raise ValueError("`dataset` does not record how it was built: connect Personalize Dataset (folder).")
    if dataset.spec.keep_pixels:
        return dataset
    data, _ = build_training_data(dataclasses.replace(dataset.spec, keep_pixels=True), vae, clip)
    return data


def prepare_features(data, clip_vision, variant: str, crop: bool) -> torch.Tensor:
    """CLIP-Vision features of every training image (in `sample.extras`) and of "no image"."""
    field = "image_embeds" if variant == "base" else "penultimate_hidden_states"

    def encode(pixels):
        return clip_vision.encode_image(pixels, crop=crop)[field].float().cpu()

    add_image_features(data, encode)
    if variant == "base":
        width = data.samples[0].extras["ip_features"][0].shape[-1]
        return torch.zeros(1, width)
    size = getattr(clip_vision, "image_size", 224)
    return encode(torch.zeros(1, size, size, 3))


class PersonalizeSaveIPAdapter(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PersonalizeSaveIPAdapter",
            display_name="Personalize Save IP-Adapter",
            category="personalize/io",
            description="Save an IP-Adapter as .safetensors in the official layout (loads in Personalize Load "
                        "IP-Adapter, IPAdapter_plus and diffusers) into models/ipadapter; never overwrites.",
            inputs=[
                IPAdapter.Input("ipadapter", tooltip="From Personalize Train IP-Adapter (or a loaded one)."),
                io.String.Input("name", default="personalize/my_ipadapter", tooltip="File name inside the ipadapter folder (no '..')."),
                io.Combo.Input("save_dtype", options=["fp16", "bf16", "fp32"], default="fp16", tooltip="Precision of the saved tensors (the official files are fp16)."),
            ],
            outputs=[io.String.Output(display_name="path", tooltip="Where the file was written.")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, ipadapter, name, save_dtype) -> io.NodeOutput:
        adapter = adapter_from(ipadapter)
        out = output_target(FOLDER, name)
        meta = ipadapter_metadata(adapter.spec, **getattr(adapter, "training_metadata", {}))
        state = {k: v.detach().cpu() for k, v in adapter.state_dict().items()}
        path = save_ipadapter(out.target.parent, out.target.name, state, meta, dtype=save_dtype)
        return io.NodeOutput(str(path), ui=ui.PreviewText(f"saved {out.shown(path)}"))


NODES = [PersonalizeLoadIPAdapter, PersonalizeApplyIPAdapter, PersonalizeTrainIPAdapter, PersonalizeSaveIPAdapter]
