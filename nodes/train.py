"""Training nodes: translate inputs into a TrainJob + method, run the engine, return results."""
from __future__ import annotations

import os
from pathlib import Path

import comfy.model_management
import comfy.sd
import comfy.utils
import folder_paths

from ..trainers import loop
from ..trainers.data.cache import TextEncodingCache, clip_fingerprint, default_cache_root
from ..trainers.data.captions import is_identity
from ..trainers.formats.files import safe_stem, unique_path
from ..trainers.formats.kohya_lora import LoraStateDict, base_model_family, kohya_metadata
from ..trainers.job import TrainJob, help_text
from ..trainers.methods import create_method
from ..trainers.methods.lora import TARGET_PRESETS, LoraConfig
from ..trainers.progress import Reporter
from ._api import io
from ._events import websocket_sender
from .dataset import Dataset
from .previews import PreviewReporter, Previews

NO_LORA = "[none]"
TrainingControl = io.Custom("PERSONALIZE_TRAINING_CONTROL")  # made by Personalize Training Control (nodes/controlnet.py)


def _lora_help(name: str) -> str:
    return LoraConfig.__dataclass_fields__[name].metadata["help"]


def checkpoints_root() -> Path:
    return Path(folder_paths.get_output_directory()) / "personalize" / "checkpoints"


def resolve_resume(resume: str) -> Path | None:
    """'' = fresh run; 'latest' = newest checkpoint of any run; else a path (or one under checkpoints/)."""
    resume = resume.strip()
    if not resume:
        return None
    root = checkpoints_root()
    if resume == "latest":
        found = sorted(root.glob("*/*.pt"), key=lambda p: p.stat().st_mtime)
        if not found:
            raise ValueError(f"`resume`='latest' but there is no checkpoint under {root}.")
        return found[-1]
    path = Path(os.path.expanduser(resume))
    if not path.is_absolute():
        path = root / path
    if not path.is_file():
        raise ValueError(f"`resume` {resume!r}: no such checkpoint ({path}). Use the path that the cancelled run "
                         "reported, 'latest', or leave it empty for a new run.")
    return path


def run_folder(run_name: str, resume_path: Path | None) -> Path:
    """Checkpoints of a resumed run stay with it; a new run gets a fresh, never reused folder."""
    if resume_path is not None:
        return resume_path.parent
    root = checkpoints_root()
    root.mkdir(parents=True, exist_ok=True)
    folder = unique_path(root, safe_stem(run_name, input_name="run_name").replace("/", "_"), "")
    folder.mkdir(parents=True)
    return folder


def _initial_lora(name: str) -> dict | None:
    if name in ("", NO_LORA, None):
        return None
    path = folder_paths.get_full_path("loras", name)
    if path is None:
        raise ValueError(f"`initial_lora` {name!r} is not in the loras folder.")
    return comfy.utils.load_torch_file(path, safe_load=True)


def _captions(dataset):
    return [s.caption for s in [*getattr(dataset, "samples", ()), *(getattr(dataset, "class_samples", None) or ())]]


def _caption_variant_cache(dataset, clip, train_text_encoder: bool):
    """The on-disk text cache for per-step caption variants (shuffle/dropout), when they occur."""
    options = getattr(dataset, "caption_options", None)
    if clip is None or train_text_encoder or options is None or is_identity(options, _captions(dataset)):
        return None, None
    try:
        return TextEncodingCache(default_cache_root()), clip_fingerprint(clip)
    except ValueError:  # e.g. a CLIP with hooks cannot be fingerprinted: encode without the disk cache
        return None, None


_COMMON_HELP = {name: help_text(name) for name in (
    "steps", "learning_rate", "text_encoder_lr", "batch_size", "grad_accumulation", "optimizer", "lr_scheduler",
    "warmup_steps", "loss_type", "min_snr_gamma", "noise_offset", "max_grad_norm", "precision",
    "gradient_checkpointing", "seed", "checkpoint_every", "run_name")}


def training_inputs(run_name: str = "lora") -> list:
    """The loop's settings as node inputs, shared by every training node (same order everywhere)."""
    h = _COMMON_HELP
    return [
        io.Int.Input("batch_size", default=1, min=1, max=512, tooltip=h["batch_size"]),
        io.Int.Input("grad_accumulation", default=1, min=1, max=1024, tooltip=h["grad_accumulation"]),
        io.Combo.Input("optimizer", options=["adamw", "adamw8bit", "prodigy", "adafactor", "sgd"], default="adamw", tooltip=h["optimizer"]),
        io.Combo.Input("lr_scheduler", options=["constant", "cosine", "linear"], default="constant", tooltip=h["lr_scheduler"]),
        io.Int.Input("warmup_steps", default=0, min=0, max=1_000_000, tooltip=h["warmup_steps"]),
        io.Combo.Input("loss_type", options=["mse", "huber"], default="mse", tooltip=h["loss_type"]),
        io.Float.Input("min_snr_gamma", default=5.0, min=0.0, max=100.0, step=0.1, tooltip=h["min_snr_gamma"]),
        io.Float.Input("noise_offset", default=0.0, min=0.0, max=1.0, step=0.005, tooltip=h["noise_offset"]),
        io.Float.Input("max_grad_norm", default=1.0, min=0.0, max=1000.0, step=0.1, tooltip=h["max_grad_norm"]),
        io.Combo.Input("precision", options=["bf16", "fp16", "fp32"], default="bf16", tooltip=h["precision"]),
        io.Boolean.Input("gradient_checkpointing", default=False, tooltip=h["gradient_checkpointing"]),
        io.Int.Input("seed", default=0, min=0, max=2**63 - 1, control_after_generate=False, tooltip=h["seed"]),
        io.Int.Input("checkpoint_every", default=0, min=0, max=1_000_000, tooltip=h["checkpoint_every"]),
        io.String.Input("run_name", default=run_name, tooltip=h["run_name"]),
        io.String.Input("resume", default="", tooltip="Continue a cancelled or finished run: a checkpoint path as reported on cancel, 'latest', or empty for a new run."),
        TrainingControl.Input("control", optional=True, tooltip="Train under a ControlNet (from Personalize Training Control): every batch runs with it applied, the result works without it."),
        Previews.Input("previews", optional=True, tooltip="Validation images every N steps in the node's live view (from Personalize Training Previews)."),
    ]


def prior_inputs(weight: bool = True) -> list:
    """How the dataset's class images (prior preservation / regularization) are weighed, for nodes that train the UNet.
    Optional, so API-format graphs saved before these inputs existed still validate (the job's defaults apply)."""
    weight_input = [io.Float.Input("prior_loss_weight", default=1.0, min=0.0, max=10.0, step=0.05, optional=True,
                                   tooltip=help_text("prior_loss_weight"))] if weight else []
    return [*weight_input,
            io.Combo.Input("prior_target", options=["images", "base_model"], default="images", optional=True,
                           tooltip=help_text("prior_target"))]


def run_training(node_id, job: TrainJob, method, model, clip, dataset, resume: str, train_text_encoder: bool = False,
                 control=None, previews=None):
    """Resolve the resume point and run folder, train, and return the loop's result.

    `control` (the optional `control` input): a frozen ControlNet applied to every batch; `method` itself is
    trained and exported as usual."""
    control = control if control is not None else getattr(job, "control", None)
    previews = previews if previews is not None else getattr(job, "previews", None)
    if control is not None:
        method = control.wrap(method, dataset)
    send = websocket_sender(node_id)
    reporter = (PreviewReporter(job.steps, send, previews, job.run_name) if previews is not None and previews.every_n_steps
                else Reporter(job.steps, send))
    try:
        resume_path = resolve_resume(resume)
        folder = run_folder(job.run_name, resume_path)
        text_cache, clip_fp = _caption_variant_cache(dataset, clip, train_text_encoder)
        return loop.train(job, method, model, clip, dataset, checkpoint_dir=folder, resume_from=resume_path,
                          reporter=reporter, text_cache=text_cache, clip_fp=clip_fp)
    except comfy.model_management.InterruptProcessingException:
        raise  # a cancel: the loop already reported the resumable checkpoint
    except Exception as exc:
        send("personalize.error", {"message": str(exc)})  # shown on the node by the live view
        raise


def job_from_inputs(method: str, method_options: dict, **inputs) -> TrainJob:
    """A TrainJob from a training node's common inputs (`resume` is not part of the job; the optional `control`
    rides along as an attribute, outside the saved settings, so that every node's run_training applies it)."""
    inputs.pop("resume", None)
    control = inputs.pop("control", None)
    previews = inputs.pop("previews", None)
    inputs["run_name"] = safe_stem(inputs["run_name"], input_name="run_name")
    job = TrainJob(method=method, method_options=method_options, **inputs)
    job.control = control
    job.previews = previews  # the optional `previews` input, like `control` outside the saved settings
    return job


class PersonalizeTrainLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        h = _COMMON_HELP
        return io.Schema(
            node_id="PersonalizeTrainLoRA",
            display_name="Personalize Train LoRA",
            category="personalize/train",
            description="Train a LoRA (or DoRA) on a dataset. Returns the MODEL/CLIP with it applied, the LoRA for "
                        "Personalize Save LoRA, and the loss. Cancel keeps a resumable checkpoint.",
            inputs=[
                io.Model.Input("model", tooltip="The base MODEL (from CheckpointLoaderSimple); it is never modified."),
                io.Clip.Input("clip", tooltip="The base CLIP; trained only with train_text_encoder, else used to encode captions."),
                Dataset.Input("dataset", tooltip="From Personalize Dataset (folder)."),
                io.Int.Input("steps", default=500, min=1, max=1_000_000, tooltip=h["steps"]),
                io.Float.Input("learning_rate", default=1e-4, min=1e-7, max=10.0, step=1e-6, round=False, tooltip=h["learning_rate"]),
                io.Int.Input("rank", default=16, min=1, max=1024, tooltip=_lora_help("rank")),
                io.Float.Input("alpha", default=16.0, min=0.01, max=4096.0, step=0.01, tooltip=_lora_help("alpha")),
                io.Combo.Input("targets", options=list(TARGET_PRESETS), default="attention_ff", tooltip=_lora_help("targets")),
                io.Boolean.Input("train_text_encoder", default=False, tooltip=_lora_help("train_text_encoder")),
                io.Float.Input("text_encoder_lr", default=5e-5, min=0.0, max=10.0, step=1e-6, round=False, tooltip=h["text_encoder_lr"]),
                io.Boolean.Input("dora", default=False, tooltip=_lora_help("dora")),
                *prior_inputs(),
                *training_inputs(),
                io.Combo.Input("initial_lora", options=[NO_LORA] + folder_paths.get_filename_list("loras"), default=NO_LORA, tooltip="Start from an existing LoRA file of the loras folder (same rank and targets) instead of from zero."),
            ],
            outputs=[
                io.Model.Output(display_name="model", tooltip="The MODEL with the trained LoRA applied (as stock LoraLoader applies it)."),
                io.Clip.Output(display_name="clip", tooltip="The CLIP with the trained text-encoder LoRA applied (unchanged without train_text_encoder)."),
                io.LoraModel.Output(display_name="lora", tooltip="The trained LoRA in kohya format, for Personalize Save LoRA (or core's Save LoRA / Load LoRA Model)."),
                io.LossMap.Output(display_name="loss", tooltip="Loss per optimizer step (core's Loss Graph node plots it)."),
                io.String.Output(display_name="checkpoint", tooltip="Path of the final resumable checkpoint."),
            ],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, clip, dataset, steps, learning_rate, rank, alpha, targets, train_text_encoder, text_encoder_lr,
                dora, initial_lora, **common) -> io.NodeOutput:
        method_options = {"rank": rank, "alpha": alpha, "targets": targets, "train_text_encoder": train_text_encoder, "dora": dora}
        job = job_from_inputs("lora", method_options, steps=steps, learning_rate=learning_rate,
                              text_encoder_lr=text_encoder_lr, **common)
        method = create_method("lora", {**method_options, "initial_weights": _initial_lora(initial_lora)})
        result = run_training(cls.hidden.unique_id, job, method, model, clip, dataset, common["resume"], train_text_encoder)
        tensors = method.export()
        metadata = kohya_metadata(rank=rank, alpha=alpha, base_model=base_model_family(model), resolution=dataset.resolution,
                                  steps=result.global_step, job=job.to_dict(), dataset_tags=dataset.tag_frequency(),
                                  name=job.run_name, train_text_encoder=train_text_encoder)
        lora = LoraStateDict(tensors, metadata)
        model_out, clip_out = comfy.sd.load_lora_for_models(model, clip, lora, 1.0, 1.0)
        return io.NodeOutput(model_out, clip_out if clip_out is not None else clip, lora,
                             {"loss": list(result.loss_history)}, str(result.final_checkpoint))


NODES = [PersonalizeTrainLoRA]
