"""Save a trained LoRA where stock `LoraLoader` finds it."""
from __future__ import annotations

from ..trainers.formats.safetensors_io import SAVE_DTYPES, save_new_safetensors
from ._api import io, ui
from ._outputs import output_target


class PersonalizeSaveLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PersonalizeSaveLoRA",
            display_name="Personalize Save LoRA",
            category="personalize/io",
            description="Save a LoRA as kohya-format safetensors (ss_* and modelspec metadata) into the loras folder. "
                        "Never overwrites: an existing name gets a numbered suffix.",
            inputs=[
                io.LoraModel.Input("lora", tooltip="A LoRA from a Personalize training node."),
                io.String.Input("name", default="personalize/my_lora", tooltip="File name inside the loras folder (sub-folders allowed, no '..')."),
                io.Combo.Input("save_dtype", options=list(SAVE_DTYPES), default="fp16", tooltip="Precision of the saved weights (fp16 is kohya's default)."),
            ],
            outputs=[io.String.Output(display_name="path", tooltip="Where the file was written.")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, lora, name, save_dtype) -> io.NodeOutput:
        out = output_target("loras", name)
        if not lora:
            raise ValueError("`lora` is empty: connect the lora output of a training node.")
        metadata = dict(getattr(lora, "metadata", {}) or {})
        metadata.setdefault("ss_output_name", out.target.name)
        path = save_new_safetensors(out.target.parent, out.target.name, dict(lora), metadata, save_dtype)
        return io.NodeOutput(str(path), ui=ui.PreviewText(f"saved {out.shown(path)}"))


NODES = [PersonalizeSaveLoRA]
