"""Textual inversion and pivotal tuning nodes: train a new token (and a LoRA), save files that stock
ComfyUI loads with `embedding:name` in a prompt and with `LoraLoader`."""
from __future__ import annotations

import json
from pathlib import Path

import comfy.sd

from ..trainers.formats.embedding import FORMATS, PROMPT_SUFFIXES, TrainedEmbedding, free_stem, suffix_of, write_embedding
from ..trainers.formats.kohya_lora import LoraStateDict, base_model_family, kohya_metadata
from ..trainers.formats.safetensors_io import SAVE_DTYPES, save_new_safetensors
from ..trainers.methods import create_method
from ..trainers.methods.lora import TARGET_PRESETS, LoraConfig
from ..trainers.methods.textual_inversion import MAX_VECTORS, TextualInversionConfig
from ._api import io, ui
from ._outputs import OutputTarget, output_target
from .dataset import Dataset
from .train import job_from_inputs, prior_inputs, run_training, training_inputs

Embedding = io.Custom("PERSONALIZE_EMBEDDING")
_ARCH = {"sd1": "stable-diffusion-v1", "sd2": "stable-diffusion-v2-512", "sdxl": "stable-diffusion-xl-v1-base"}


def _ti_help(name: str) -> str:
    return TextualInversionConfig.__dataclass_fields__[name].metadata["help"]


def _lora_help(name: str) -> str:
    return LoraConfig.__dataclass_fields__[name].metadata["help"]


def _token_inputs(vectors: int, captions: str) -> list:
    return [
        io.String.Input("token", default="<concept>", tooltip=_ti_help("token")),
        io.Int.Input("vectors", default=vectors, min=1, max=MAX_VECTORS, tooltip=_ti_help("vectors")),
        io.String.Input("init_word", default="*", tooltip=_ti_help("init_word")),
        io.Combo.Input("captions", options=["object", "style", "captions"], default=captions, tooltip=_ti_help("captions")),
        io.String.Input("trigger_word", default="", tooltip="Word of the dataset captions that the token replaces in captions mode; empty = the dataset's trigger word."),
    ]


def _token_options(dataset, token, vectors, init_word, captions, trigger_word) -> dict:
    trigger = trigger_word.strip() or getattr(getattr(dataset, "spec", None), "trigger_word", "") or ""
    return {"token": token, "vectors": vectors, "init_word": init_word, "captions": captions, "trigger": trigger}


def _embedding(method, model, job, step: int) -> TrainedEmbedding:
    family = base_model_family(model)
    cfg = method.config
    metadata = {"personalize.token": cfg.token, "personalize.vectors": str(cfg.vectors), "personalize.init_word": cfg.init_word,
                "personalize.step": str(step), "personalize.base_model": family,
                "personalize.job": json.dumps(job.to_dict(), sort_keys=True),
                "modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": f"{_ARCH.get(family, family)}/textual-inversion",
                "modelspec.title": job.run_name}
    return TrainedEmbedding(method.export(), cfg.token, step, metadata)


def _common_outputs() -> list:
    return [
        io.LossMap.Output(display_name="loss", tooltip="Loss per optimizer step (core's Loss Graph node plots it)."),
        io.String.Output(display_name="checkpoint", tooltip="Path of the final resumable checkpoint."),
    ]


class PersonalizeTrainTextualInversion(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PersonalizeTrainTextualInversion",
            display_name="Personalize Train Textual Inversion",
            category="personalize/train",
            description="Learn a new token (N vectors per text encoder; SD1.x, SD2.x, SDXL) on a dataset with every model "
                        "and text-encoder weight frozen. Returns a CLIP that knows the token and the embedding for "
                        "Personalize Save Embedding (loads in stock ComfyUI as embedding:name).",
            inputs=[
                io.Model.Input("model", tooltip="The base MODEL; it stays frozen and is never modified."),
                io.Clip.Input("clip", tooltip="The base CLIP; the token is learned in its input-embedding space, its weights stay frozen."),
                Dataset.Input("dataset", tooltip="From Personalize Dataset (folder)."),
                io.Int.Input("steps", default=2000, min=1, max=1_000_000, tooltip="Optimizer steps (diffusers' recipe: 3000 at batch 4 for SD1.5)."),
                io.Float.Input("learning_rate", default=5e-3, min=1e-7, max=10.0, step=1e-5, round=False, tooltip="Learning rate of the token vectors (A1111: 0.005; diffusers: 5e-4 x batch size)."),
                *_token_inputs(vectors=4, captions="object"),
                *training_inputs("embedding"),
            ],
            outputs=[
                io.Clip.Output(display_name="clip", tooltip="The CLIP that knows the token: write it (or embedding:<token>) in a prompt."),
                Embedding.Output(display_name="embedding", tooltip="The trained vectors, for Personalize Save Embedding."),
                *_common_outputs(),
            ],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, clip, dataset, steps, learning_rate, token, vectors, init_word, captions, trigger_word,
                **common) -> io.NodeOutput:
        options = _token_options(dataset, token, vectors, init_word, captions, trigger_word)
        job = job_from_inputs("textual_inversion", options, steps=steps, learning_rate=learning_rate, **common)
        method = create_method("textual_inversion", options)
        result = run_training(cls.hidden.unique_id, job, method, model, clip, dataset, common.get("resume", ""), True)
        return io.NodeOutput(method.trained_clip(clip), _embedding(method, model, job, result.global_step),
                             {"loss": list(result.loss_history)}, str(result.final_checkpoint))


def _prompt_word(out: OutputTarget, path) -> str:
    return "embedding:" + out.shown(Path(path).with_suffix(""))


class PersonalizeSaveEmbedding(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PersonalizeSaveEmbedding",
            display_name="Personalize Save Embedding",
            category="personalize/io",
            description="Save a trained token into the embeddings folder in the layout stock ComfyUI reads for "
                        "embedding:name (SD1/SD2: emb_params; SDXL: clip_l + clip_g), or as an A1111 .pt. Never overwrites.",
            inputs=[
                Embedding.Input("embedding", tooltip="From Personalize Train Textual Inversion (or Pivotal)."),
                io.String.Input("name", default="personalize/my_embedding", tooltip="File name inside the embeddings folder (sub-folders allowed, no '..'); prompts then say embedding:<name>."),
                io.Combo.Input("format", options=list(FORMATS), default="safetensors", tooltip="safetensors (ComfyUI, A1111, Forge; SDXL needs it) or a1111_pt (AUTOMATIC1111's .pt dict, SD1/SD2 only)."),
            ],
            outputs=[
                io.String.Output(display_name="path", tooltip="Where the file was written."),
                io.String.Output(display_name="prompt_word", tooltip="What to write in a prompt to use it, e.g. embedding:personalize/my_embedding."),
            ],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, embedding, name, format) -> io.NodeOutput:
        if not isinstance(embedding, TrainedEmbedding):
            raise ValueError("`embedding` must come from a Personalize textual-inversion or pivotal training node.")  # noqa: TRY004 (house rule: ValueError names the input)
        out = output_target("embeddings", name)
        target, suffix = out.target, suffix_of(format)
        path = target.parent / (free_stem([(target.parent, s) for s in PROMPT_SUFFIXES], target.name) + suffix)
        write_embedding(path, embedding.vectors, format, name=target.name, step=embedding.step, metadata=embedding.metadata)
        word = _prompt_word(out, path)
        return io.NodeOutput(str(path), word, ui=ui.PreviewText(f"saved {path.name}: write {word} in a prompt"))


class PersonalizeTrainPivotal(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PersonalizeTrainPivotal",
            display_name="Personalize Train Pivotal (LoRA + token)",
            category="personalize/train",
            description="Pivotal tuning: a new token and a LoRA trained together (diffusers' advanced DreamBooth-LoRA "
                        "recipe). The token trains for the first embedding_fraction of the steps at embedding_lr, the "
                        "LoRA throughout. Save both with Personalize Save Pivotal.",
            inputs=[
                io.Model.Input("model", tooltip="The base MODEL; it is never modified."),
                io.Clip.Input("clip", tooltip="The base CLIP; the token is learned in its embedding space."),
                Dataset.Input("dataset", tooltip="From Personalize Dataset (folder)."),
                io.Int.Input("steps", default=1000, min=1, max=1_000_000, tooltip="Optimizer steps."),
                io.Float.Input("learning_rate", default=1e-4, min=1e-7, max=10.0, step=1e-6, round=False, tooltip="Learning rate of the UNet LoRA."),
                io.Float.Input("embedding_lr", default=5e-4, min=1e-7, max=10.0, step=1e-6, round=False, tooltip="Learning rate of the token vectors."),
                io.Float.Input("embedding_fraction", default=0.5, min=0.01, max=1.0, step=0.01, tooltip="Train the token for this first fraction of the steps, then only the LoRA (diffusers' train_text_encoder_ti_frac, 0.5)."),
                io.Int.Input("rank", default=16, min=1, max=1024, tooltip=_lora_help("rank")),
                io.Float.Input("alpha", default=16.0, min=0.01, max=4096.0, step=0.01, tooltip=_lora_help("alpha")),
                io.Combo.Input("targets", options=list(TARGET_PRESETS), default="attention_ff", tooltip=_lora_help("targets")),
                io.Boolean.Input("train_text_encoder", default=False, tooltip=_lora_help("train_text_encoder")),
                io.Float.Input("text_encoder_lr", default=5e-5, min=0.0, max=10.0, step=1e-6, round=False, tooltip="Learning rate of the text-encoder LoRA (with train_text_encoder)."),
                *_token_inputs(vectors=2, captions="captions"),
                *prior_inputs(),
                *training_inputs("pivotal"),
            ],
            outputs=[
                io.Model.Output(display_name="model", tooltip="The MODEL with the trained LoRA applied (as stock LoraLoader applies it)."),
                io.Clip.Output(display_name="clip", tooltip="The CLIP with the text-encoder LoRA (if trained) that knows the token."),
                io.LoraModel.Output(display_name="lora", tooltip="The trained LoRA in kohya format."),
                Embedding.Output(display_name="embedding", tooltip="The trained token vectors."),
                *_common_outputs(),
            ],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, clip, dataset, steps, learning_rate, embedding_lr, embedding_fraction, rank, alpha, targets,
                train_text_encoder, text_encoder_lr, token, vectors, init_word, captions, trigger_word, **common) -> io.NodeOutput:
        lora_options = {"rank": rank, "alpha": alpha, "targets": targets, "train_text_encoder": train_text_encoder}
        options = {"lora": lora_options, "embedding": _token_options(dataset, token, vectors, init_word, captions, trigger_word),
                   "embedding_lr": embedding_lr, "embedding_fraction": embedding_fraction}
        job = job_from_inputs("pivotal", options, steps=steps, learning_rate=learning_rate, text_encoder_lr=text_encoder_lr,
                              **common)
        method = create_method("pivotal", options)
        result = run_training(cls.hidden.unique_id, job, method, model, clip, dataset, common.get("resume", ""), True)
        tensors = method.lora.export()
        metadata = kohya_metadata(rank=rank, alpha=alpha, base_model=base_model_family(model), resolution=dataset.resolution,
                                  steps=result.global_step, job=job.to_dict(), dataset_tags=dataset.tag_frequency(),
                                  name=job.run_name, train_text_encoder=train_text_encoder,
                                  extra={"personalize.pivotal_token": method.embedding.config.token})
        lora = LoraStateDict(tensors, metadata)
        model_out, clip_out = comfy.sd.load_lora_for_models(model, clip, lora, 1.0, 1.0)
        clip_out = method.embedding.trained_clip(clip_out if clip_out is not None else clip)
        embedding = _embedding(method.embedding, model, job, result.global_step)
        return io.NodeOutput(model_out, clip_out, lora, embedding, {"loss": list(result.loss_history)},
                             str(result.final_checkpoint))


class PersonalizeSavePivotal(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PersonalizeSavePivotal",
            display_name="Personalize Save Pivotal (LoRA + embedding)",
            category="personalize/io",
            description="Save a pivotal-tuning result under one name: the kohya LoRA in loras/ (stock LoraLoader) and the "
                        "token in embeddings/ (embedding:name in a prompt). Never overwrites: both get the same free name.",
            inputs=[
                io.LoraModel.Input("lora", tooltip="The lora output of Personalize Train Pivotal."),
                Embedding.Input("embedding", tooltip="The embedding output of Personalize Train Pivotal."),
                io.String.Input("name", default="personalize/my_subject", tooltip="File name for both files (sub-folders allowed, no '..')."),
                io.Combo.Input("save_dtype", options=list(SAVE_DTYPES), default="fp16", tooltip="Precision of the saved LoRA weights (the embedding is saved in fp32)."),
            ],
            outputs=[
                io.String.Output(display_name="lora_name", tooltip="The LoRA's name for stock LoraLoader (relative to the loras folder)."),
                io.String.Output(display_name="prompt_word", tooltip="What to write in a prompt to use the token, e.g. embedding:personalize/my_subject."),
            ],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, lora, embedding, name, save_dtype) -> io.NodeOutput:
        if not lora or not isinstance(embedding, TrainedEmbedding):
            raise ValueError("`lora` and `embedding` must come from Personalize Train Pivotal.")
        lora_out, emb_out = output_target("loras", name), output_target("embeddings", name)
        free = free_stem([(lora_out.target.parent, ".safetensors"), *((emb_out.target.parent, s) for s in PROMPT_SUFFIXES)],
                         lora_out.target.name)
        metadata = {**dict(getattr(lora, "metadata", {}) or {}), "ss_output_name": free}
        lora_path = save_new_safetensors(lora_out.target.parent, free, dict(lora), metadata, save_dtype)
        emb_path = emb_out.target.parent / f"{lora_path.stem}.safetensors"
        try:
            write_embedding(emb_path, embedding.vectors, "safetensors", name=lora_path.stem, step=embedding.step,
                            metadata={**embedding.metadata, "personalize.lora": lora_path.name})
        except BaseException:
            lora_path.unlink(missing_ok=True)  # the pair or nothing: this LoRA was written by this call
            raise
        lora_name = lora_out.shown(lora_path)
        word = _prompt_word(emb_out, emb_path)
        return io.NodeOutput(lora_name, word, ui=ui.PreviewText(f"saved {lora_name} + {emb_path.name}: LoraLoader {lora_name}, prompt {word}"))


NODES = [PersonalizeTrainTextualInversion, PersonalizeSaveEmbedding, PersonalizeTrainPivotal, PersonalizeSavePivotal]
