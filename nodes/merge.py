"""LoRA merging nodes: load a LoRA file, list LoRAs with weights, merge them, bake them into a checkpoint."""
from __future__ import annotations

import folder_paths

from ..trainers.formats.lora_convert import LAYOUTS, KeySpace, read_lora_file
from ..trainers.formats.lora_merge import MERGE_METHODS, SIGN_METHODS, bake_loras, merge_loras
from ..trainers.formats.lora_svd import report_text
from ._api import io, ui
from ._outputs import output_target

LoraList = io.Custom("PERSONALIZE_LORA_LIST")

LAYOUT_TOOLTIP = ("Key layout of the result: kohya (lora_unet_*, what A1111/kohya tools expect), comfyui "
                  "(diffusion_model.*), diffusers (unet.* with peft lora_A/lora_B). All load in stock LoraLoader.")


def layout_input():
    return io.Combo.Input("layout", options=list(LAYOUTS), default="kohya", tooltip=LAYOUT_TOOLTIP)


def lora_list_items(loras) -> list[tuple[dict, float]]:
    if not loras:
        raise ValueError("`loras` is empty: connect a Personalize LoRA List.")
    return list(loras)


class PersonalizeLoadLoRAFile(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PersonalizeLoadLoRAFile",
            display_name="Personalize Load LoRA File",
            category="personalize/lora",
            description="Read a LoRA safetensors file from the loras folder (with its metadata) as a LORA_MODEL. "
                        "Pickled .pt/.ckpt files are refused, never unpickled.",
            inputs=[io.Combo.Input("lora_name", options=folder_paths.get_filename_list("loras"),
                                   tooltip="A file in the loras folder (.safetensors).")],
            outputs=[io.LoraModel.Output(display_name="lora", tooltip="The LoRA's tensors and metadata, in the file's own layout.")],
        )

    @classmethod
    def execute(cls, lora_name) -> io.NodeOutput:
        path = folder_paths.get_full_path("loras", lora_name)
        if path is None:
            raise ValueError(f"`lora_name`={lora_name!r} is not in the loras folder.")
        return io.NodeOutput(read_lora_file(path, input_name="lora_name"))


class PersonalizeLoRAList(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PersonalizeLoRAList",
            display_name="Personalize LoRA List",
            category="personalize/lora",
            description="Add a LoRA with a weight to a list (chain several of these) for Merge or Bake.",
            inputs=[
                io.LoraModel.Input("lora", tooltip="A LoRA (Personalize Load LoRA File, a training node, Merge, ...)."),
                io.Float.Input("weight", default=1.0, min=-10.0, max=10.0, step=0.01, tooltip="Its weight (strength) in the merge."),
                LoraList.Input("loras", optional=True, tooltip="The list so far (another Personalize LoRA List); empty starts a new list."),
            ],
            outputs=[LoraList.Output(display_name="loras", tooltip="The list with this LoRA appended.")],
        )

    @classmethod
    def execute(cls, lora, weight, loras=None) -> io.NodeOutput:
        if not lora:
            raise ValueError("`lora` is empty: connect a LoRA.")
        return io.NodeOutput((*(loras or ()), (lora, float(weight))))


class PersonalizeMergeLoRAs(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PersonalizeMergeLoRAs",
            display_name="Personalize Merge LoRAs",
            category="personalize/lora",
            description="Merge LoRAs into one: concat (exact), svd (to a rank), ties, dare_linear, dare_ties "
                        "(peft's merge math on full per-layer deltas, then SVD).",
            inputs=[
                io.Model.Input("model", tooltip="The base MODEL the LoRAs are for (names and shapes come from it; it is not changed)."),
                LoraList.Input("loras", tooltip="From Personalize LoRA List: LoRAs with their weights."),
                io.Combo.Input("method", options=list(MERGE_METHODS), default="concat",
                               tooltip="concat: exact sum, rank adds up. svd: exact sum re-factored at `rank`. ties/dare_*: "
                                       "interference-reducing merges (trim/drop by `density`, sign election)."),
                io.Int.Input("rank", default=32, min=0, max=4096, tooltip="Rank of the result for svd/ties/dare (capped per layer at its size); 0 keeps ties/dare full-rank deltas."),
                io.Float.Input("density", default=0.5, min=0.01, max=1.0, step=0.01, tooltip="ties/dare: fraction of each delta's entries kept."),
                io.Combo.Input("majority_sign", options=list(SIGN_METHODS), default="total", tooltip="ties/dare_ties: elect each entry's sign by summed value (total) or by count (frequency)."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, control_after_generate=False, tooltip="dare: seed of the random drop masks (per layer)."),
                layout_input(),
                io.Clip.Input("clip", optional=True, tooltip="The base CLIP: needed when the LoRAs patch the text encoder."),
            ],
            outputs=[
                io.LoraModel.Output(display_name="lora", tooltip="The merged LoRA (save it with Personalize Save LoRA)."),
                io.String.Output(display_name="report", tooltip="Rank and kept energy per layer (svd/ties/dare)."),
            ],
        )

    @classmethod
    def execute(cls, model, loras, method, rank, density, majority_sign, seed, layout, clip=None) -> io.NodeOutput:
        merged, reports = merge_loras(lora_list_items(loras), KeySpace(model, clip), method=method, rank=rank,
                                      density=density, sign_method=majority_sign, seed=seed, layout=layout)
        text = report_text(f"merge ({method})", reports) if reports else f"merge ({method}): {len(merged)} tensors"
        return io.NodeOutput(merged, text, ui=ui.PreviewText(text.split("\n")[0]))


class PersonalizeBakeLoRAs(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PersonalizeBakeLoRAs",
            display_name="Personalize Bake LoRAs into Checkpoint",
            category="personalize/lora",
            description="Apply LoRAs to MODEL and CLIP with ComfyUI's own loader and save the result as a checkpoint "
                        "(ComfyUI's saver) in the checkpoints folder; never overwrites.",
            inputs=[
                io.Model.Input("model", tooltip="The base MODEL (not changed)."),
                io.Clip.Input("clip", tooltip="The base CLIP (not changed)."),
                io.Vae.Input("vae", tooltip="The VAE to store in the checkpoint."),
                LoraList.Input("loras", tooltip="From Personalize LoRA List; each weight is used for MODEL and CLIP."),
                io.String.Input("name", default="personalize/baked", tooltip="File name inside the checkpoints folder (no '..')."),
            ],
            outputs=[
                io.Model.Output(display_name="model", tooltip="The MODEL with the LoRAs applied."),
                io.Clip.Output(display_name="clip", tooltip="The CLIP with the LoRAs applied."),
                io.String.Output(display_name="path", tooltip="Where the checkpoint was written."),
            ],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model, clip, vae, loras, name) -> io.NodeOutput:
        out = output_target("checkpoints", name)
        path, baked_model, baked_clip = bake_loras(model, clip, vae, lora_list_items(loras), out.target.parent,
                                                   out.target.name)
        return io.NodeOutput(baked_model, baked_clip, str(path), ui=ui.PreviewText(f"saved {out.shown(path)}"))


NODES = [PersonalizeLoadLoRAFile, PersonalizeLoRAList, PersonalizeMergeLoRAs, PersonalizeBakeLoRAs]
