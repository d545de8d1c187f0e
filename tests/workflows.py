"""The example workflows, and their API twin adapted to the tiny test model."""
from __future__ import annotations

import copy
import json
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "example_workflows"
LORA_API = EXAMPLES / "personalize_lora_api.json"
LORA_UI = EXAMPLES / "personalize_lora.json"


def lora_prompt(ckpt_name: str, folder, *, steps: int = 8, run_name: str = "test", save_name: str = "personalize/test",
                **train_overrides) -> dict:
    """The example LoRA graph (API format) at tiny-model sizes: 64 px, rank 4, a 4-step sampler."""
    prompt = copy.deepcopy(json.loads(LORA_API.read_text()))
    prompt["1"]["inputs"]["ckpt_name"] = ckpt_name
    prompt["2"]["inputs"].update(folder=str(folder), resolution=64, bucket_step=32)
    prompt["3"]["inputs"].update({"steps": steps, "rank": 4, "alpha": 4.0, "batch_size": 2, "learning_rate": 1e-3,
                                  "run_name": run_name, "checkpoint_every": 0, **train_overrides})
    prompt["4"]["inputs"]["name"] = save_name
    prompt["7"]["inputs"].update(width=64, height=64)
    prompt["8"]["inputs"].update(steps=4, cfg=1.0)
    prompt["10"]["inputs"]["filename_prefix"] = f"personalize/{run_name}"
    return prompt
