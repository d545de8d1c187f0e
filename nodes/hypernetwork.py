"""Hypernetwork nodes: train one on a dataset, save it where stock `HypernetworkLoader` finds it."""
from __future__ import annotations

import hashlib

import torch

from ..trainers.checkpoint import load_state
from ..trainers.formats.files import atomic_output, write_new_file
from ..trainers.methods import create_method
from ..trainers.methods.hypernetwork import ACTIVATIONS, HypernetworkConfig
from ._api import io, ui
from ._outputs import output_target
from .dataset import Dataset
from .train import job_from_inputs, prior_inputs, run_training, training_inputs

Hypernetwork = io.Custom("PERSONALIZE_HYPERNETWORK")


def _help(name: str) -> str:
    return HypernetworkConfig.__dataclass_fields__[name].metadata["help"]


def _layer_structure(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.replace(" ", "").split(",") if x)
    except ValueError:
        raise ValueError(f"`layer_structure` {text!r} must be comma-separated numbers such as '1, 2, 1'.") from None


class PersonalizeTrainHypernetwork(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PersonalizeTrainHypernetwork",
            display_name="Personalize Train Hypernetwork",
            category="personalize/train",
            description="Train an AUTOMATIC1111-style hypernetwork (MLPs on attention K/V, base model frozen). Returns "
                        "the MODEL with it applied as stock HypernetworkLoader applies it.",
            inputs=[
                io.Model.Input("model", tooltip="The base MODEL; it is never modified."),
                io.Clip.Input("clip", tooltip="The base CLIP, used to encode captions."),
                Dataset.Input("dataset", tooltip="From Personalize Dataset (folder)."),
                io.Int.Input("steps", default=2000, min=1, max=1_000_000, tooltip="Optimizer steps."),
                io.Float.Input("learning_rate", default=1e-5, min=1e-8, max=1.0, step=1e-7, round=False, tooltip="Learning rate (A1111 default 5e-6 to 1e-5 for SD; higher on tiny models)."),
                io.String.Input("layer_structure", default="1, 2, 1", tooltip=_help("layer_structure")),
                io.Combo.Input("activation", options=list(ACTIVATIONS), default="linear", tooltip=_help("activation")),
                io.Boolean.Input("layer_norm", default=False, tooltip=_help("layer_norm")),
                io.Boolean.Input("dropout", default=False, tooltip=_help("dropout")),
                io.Boolean.Input("last_layer_dropout", default=False, tooltip=_help("last_layer_dropout")),
                io.Boolean.Input("activate_output", default=False, tooltip=_help("activate_output")),
                io.Combo.Input("weight_init", options=["normal", "xavier", "kaiming"], default="normal", tooltip=_help("weight_init")),
                *prior_inputs(),
                *training_inputs("hypernetwork"),
            ],
            outputs=[
                io.Model.Output(display_name="model", tooltip="The MODEL with the trained hypernetwork applied."),
                Hypernetwork.Output(display_name="hypernetwork", tooltip="The trained hypernetwork, for Personalize Save Hypernetwork."),
                io.LossMap.Output(display_name="loss", tooltip="Loss per optimizer step."),
                io.String.Output(display_name="checkpoint", tooltip="Path of the final resumable checkpoint."),
            ],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, clip, dataset, steps, learning_rate, layer_structure, activation, layer_norm, dropout,
                last_layer_dropout, activate_output, weight_init, **common) -> io.NodeOutput:
        options = {"layer_structure": list(_layer_structure(layer_structure)), "activation": activation,
                   "layer_norm": layer_norm, "dropout": dropout, "last_layer_dropout": last_layer_dropout,
                   "activate_output": activate_output, "weight_init": weight_init}
        job = job_from_inputs("hypernetwork", options, steps=steps, learning_rate=learning_rate, **common)
        method = create_method("hypernetwork", options)
        result = run_training(cls.hidden.unique_id, job, method, model, clip, dataset, common["resume"])
        artifact = method.export(name=job.run_name, step=result.global_step)
        return io.NodeOutput(result.attached.model, artifact, {"loss": list(result.loss_history)},
                             str(result.final_checkpoint))


class PersonalizeSaveHypernetwork(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PersonalizeSaveHypernetwork",
            display_name="Personalize Save Hypernetwork",
            category="personalize/io",
            description="Save a hypernetwork as an A1111 .pt (tensors and plain values only, readable by ComfyUI's "
                        "weights-only loader) into the hypernetworks folder; never overwrites.",
            inputs=[
                Hypernetwork.Input("hypernetwork", tooltip="From Personalize Train Hypernetwork."),
                io.String.Input("name", default="personalize/my_hypernetwork", tooltip="File name inside the hypernetworks folder (no '..')."),
                io.String.Input("checkpoint", default="", optional=True, tooltip="The training node's checkpoint output: also write the optimizer state as A1111's '<file>.optim' for resuming there."),
            ],
            outputs=[io.String.Output(display_name="path", tooltip="Where the file was written.")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, hypernetwork, name, checkpoint="") -> io.NodeOutput:
        out = output_target("hypernetworks", name)
        state = _optimizer_source(checkpoint)  # before anything is written: a bad path leaves no file behind
        path = write_new_file(out.target.parent, out.target.name, ".pt", lambda tmp: torch.save(hypernetwork, tmp))
        if state is not None:
            write_a1111_optimizer_state(path, state)
        return io.NodeOutput(str(path), ui=ui.PreviewText(f"saved {out.shown(path)}"))


def _optimizer_source(checkpoint: str | None) -> dict | None:
    if not checkpoint or not checkpoint.strip():
        return None
    try:
        return load_state(checkpoint.strip())
    except ValueError as exc:
        raise ValueError(f"`checkpoint`: {exc}") from exc


def write_a1111_optimizer_state(hypernetwork_path, state: dict) -> None:
    """A1111's resume sidecar `<file>.optim`: it reuses the state when `hash` matches the file's."""
    digest = hashlib.sha256(hypernetwork_path.read_bytes()).hexdigest()[:10]
    optim = {"hash": digest, "optimizer_name": "AdamW", "optimizer_state_dict": state["optimizer"]}
    with atomic_output(hypernetwork_path.with_name(hypernetwork_path.name + ".optim"), overwrite=True) as tmp:
        torch.save(optim, tmp)


NODES = [PersonalizeTrainHypernetwork, PersonalizeSaveHypernetwork]
