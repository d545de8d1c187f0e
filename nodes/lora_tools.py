"""LoRA tool nodes: extract from a fine-tune, resize a rank, convert key layouts, inspect."""
from __future__ import annotations

from ..trainers.formats.lora_convert import KeySpace, convert
from ..trainers.formats.lora_inspect import inspect_lora
from ..trainers.formats.lora_svd import RANK_MODES, extract_lora, report_text, resize_lora
from ._api import io, ui
from .merge import layout_input

RANK_MODE_TOOLTIP = ("fixed: every layer gets `rank` (or its own size if smaller). energy: per layer the smallest rank "
                     "that keeps `energy` of the delta's squared Frobenius norm, at most `rank`.")


def rank_inputs(default_rank: int):
    return [
        io.Combo.Input("rank_mode", options=list(RANK_MODES), default="fixed", tooltip=RANK_MODE_TOOLTIP),
        io.Int.Input("rank", default=default_rank, min=1, max=4096, tooltip="Rank per layer (the cap in energy mode)."),
        io.Float.Input("energy", default=0.99, min=0.01, max=1.0, step=0.001, round=False,
                       tooltip="energy mode: fraction of the squared singular values to keep per layer."),
    ]


def _report_outputs():
    return [
        io.LoraModel.Output(display_name="lora", tooltip="The resulting LoRA (save it with Personalize Save LoRA)."),
        io.String.Output(display_name="report", tooltip="Per layer: old and new rank and the kept energy."),
    ]


class PersonalizeExtractLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PersonalizeExtractLoRA",
            display_name="Personalize Extract LoRA",
            category="personalize/lora",
            description="Extract a LoRA (SVD of tuned - base, per layer) from a fine-tuned model and its base: UNet "
                        "linear and conv layers, and the text encoder when both CLIPs are connected.",
            inputs=[
                io.Model.Input("base_model", tooltip="The original MODEL."),
                io.Model.Input("tuned_model", tooltip="The fine-tuned MODEL (same architecture)."),
                *rank_inputs(32),
                layout_input(),
                io.Float.Input("min_change", default=0.0, min=0.0, max=1.0, step=1e-6, round=False,
                               tooltip="Skip layers whose largest change is at most this fraction of their largest weight (0: skip only unchanged layers)."),
                io.Clip.Input("base_clip", optional=True, tooltip="The original CLIP (with tuned_clip: also extract the text encoder)."),
                io.Clip.Input("tuned_clip", optional=True, tooltip="The fine-tuned CLIP."),
            ],
            outputs=_report_outputs(),
        )

    @classmethod
    def execute(cls, base_model, tuned_model, rank_mode, rank, energy, layout, min_change, base_clip=None,
                tuned_clip=None) -> io.NodeOutput:
        lora, reports = extract_lora(base_model, tuned_model, base_clip, tuned_clip, rank=rank, rank_mode=rank_mode,
                                     energy=energy, layout=layout, min_change=min_change)
        text = report_text("extract", reports)
        return io.NodeOutput(lora, text, ui=ui.PreviewText(text))


class PersonalizeResizeLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PersonalizeResizeLoRA",
            display_name="Personalize Resize LoRA",
            category="personalize/lora",
            description="Change a LoRA's rank by SVD of each layer's delta (LoHa/LoKr become plain LoRA); reports the "
                        "kept energy per layer.",
            inputs=[
                io.Model.Input("model", tooltip="The base MODEL the LoRA is for (not changed)."),
                io.LoraModel.Input("lora", tooltip="The LoRA to resize."),
                *rank_inputs(16),
                layout_input(),
                io.Clip.Input("clip", optional=True, tooltip="The base CLIP: needed when the LoRA patches the text encoder."),
            ],
            outputs=_report_outputs(),
        )

    @classmethod
    def execute(cls, model, lora, rank_mode, rank, energy, layout, clip=None) -> io.NodeOutput:
        resized, reports = resize_lora(lora, KeySpace(model, clip), rank=rank, rank_mode=rank_mode, energy=energy,
                                       layout=layout)
        text = report_text("resize", reports)
        return io.NodeOutput(resized, text, ui=ui.PreviewText(text))


class PersonalizeConvertLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PersonalizeConvertLoRA",
            display_name="Personalize Convert LoRA",
            category="personalize/lora",
            description="Rename a LoRA's keys to the kohya, comfyui or diffusers/peft layout (SD1.x, SD2.x, SDXL), "
                        "using the base model's own key maps.",
            inputs=[
                io.Model.Input("model", tooltip="The base MODEL the LoRA is for (not changed)."),
                io.LoraModel.Input("lora", tooltip="The LoRA to convert (any layout ComfyUI reads)."),
                layout_input(),
                io.Clip.Input("clip", optional=True, tooltip="The base CLIP: needed when the LoRA patches the text encoder."),
            ],
            outputs=[io.LoraModel.Output(display_name="lora", tooltip="The same LoRA in the chosen layout.")],
        )

    @classmethod
    def execute(cls, model, lora, layout, clip=None) -> io.NodeOutput:
        return io.NodeOutput(convert(lora, KeySpace(model, clip), layout))


class PersonalizeInspectLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PersonalizeInspectLoRA",
            display_name="Personalize Inspect LoRA",
            category="personalize/lora",
            description="Show a LoRA's metadata, base model, layout, rank/alpha and norm per module and trigger words.",
            inputs=[
                io.LoraModel.Input("lora", tooltip="The LoRA to inspect (e.g. from Personalize Load LoRA File)."),
                io.Model.Input("model", optional=True, tooltip="Optional MODEL: also check that the LoRA fits it."),
                io.Clip.Input("clip", optional=True, tooltip="Optional CLIP for the same check on the text encoder."),
            ],
            outputs=[io.String.Output(display_name="text", tooltip="The summary shown on the node.")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, lora, model=None, clip=None) -> io.NodeOutput:
        text = inspect_lora(lora, model=model, clip=clip)
        return io.NodeOutput(text, ui=ui.PreviewText(text))


NODES = [PersonalizeExtractLoRA, PersonalizeResizeLoRA, PersonalizeConvertLoRA, PersonalizeInspectLoRA]
