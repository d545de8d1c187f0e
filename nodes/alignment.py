"""Personalize Prompt Alignment: the prompts whose other words must keep working on the learned subject."""
from __future__ import annotations

from ..trainers.alignment import PromptAlignment
from ._api import io

PromptAlignmentType = io.Custom("PERSONALIZE_PROMPT_ALIGNMENT")


def _help(name: str) -> str:
    return PromptAlignment.__dataclass_fields__[name].metadata["help"]


class PersonalizePromptAlignment(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PersonalizePromptAlignment",
            display_name="Personalize Prompt Alignment",
            category="personalize/train",
            description="Keep prompts working on the subject ('a blue sks dog' draws it blue, not in the colours of "
                        "its photos): while training, each listed prompt learns to change the subject the way the base "
                        "model changes its class for the same words. Connect to the alignment input of a training node.",
            inputs=[
                io.String.Input("subject_prompt", default="a sks dog", tooltip=_help("subject_prompt")),
                io.String.Input("identifier", default="sks", tooltip=_help("identifier")),
                io.String.Input("prompts", multiline=True, default="a blue sks dog\na sks dog in the snow",
                                tooltip=_help("prompts") + " One per line."),
                io.Float.Input("guidance", default=3.0, min=0.0, max=30.0, step=0.1, tooltip=_help("guidance")),
                io.Float.Input("weight", default=1.0, min=0.01, max=100.0, step=0.01, tooltip=_help("weight")),
            ],
            outputs=[PromptAlignmentType.Output(display_name="alignment",
                                                tooltip="For the alignment input of a Personalize training node.")],
        )

    @classmethod
    def execute(cls, subject_prompt, identifier, prompts, guidance, weight) -> io.NodeOutput:
        alignment = PromptAlignment(subject_prompt=subject_prompt, identifier=identifier,
                                    prompts=tuple(prompts.splitlines()), guidance=guidance, weight=weight)
        return io.NodeOutput(alignment.to_dict())


NODES = [PersonalizePromptAlignment]
