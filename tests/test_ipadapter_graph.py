"""IP-Adapter end to end in ComfyUI graphs: a random ViT-L/14-shaped CLIP-Vision file through stock CLIPVisionLoader,
train -> save -> load -> apply, composed in one graph with our trained LoRA and a stock ControlNet."""
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytestmark = pytest.mark.slow

VIT_L = Path(os.path.expanduser("~/.cache/comfyui-personalize/tests/random-vit-l-14-s0.safetensors"))


def random_vit_l14(target: Path = VIT_L) -> Path:
    """A ViT-L/14 CLIP-Vision file (ComfyUI's own key layout, random fp16 weights, ~0.6 GB), built once, atomically."""
    if target.is_file():
        return target
    import comfy.clip_vision
    from safetensors.torch import save_file
    config = Path(comfy.clip_vision.__file__).parent / "clip_vision_config_vitl.json"
    shapes = {k: v.shape for k, v in comfy.clip_vision.ClipVisionModel(str(config)).get_sd().items()}
    generator = torch.Generator().manual_seed(0)
    state = {}
    for key, shape in shapes.items():
        if "norm" in key or "layrnorm" in key:
            state[key] = (torch.ones if key.endswith("weight") else torch.zeros)(shape, dtype=torch.float16)
        else:
            state[key] = (torch.randn(shape, generator=generator) * 0.02).to(torch.float16)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=target.name + ".", suffix=".partial", dir=target.parent)
    os.close(fd)
    try:
        save_file(state, tmp)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def stock_controlnet_file(model, path: Path) -> Path:
    """A ControlNet (LDM `control_model.*` layout, ComfyUI's own cldm class) with small random weights for `model`."""
    import comfy.cldm.cldm
    import comfy.ops
    from safetensors.torch import save_file
    config = dict(model.model.model_config.unet_config)
    config.pop("out_channels", None)
    config.update(hint_channels=3, dtype=torch.float32, device=None, operations=comfy.ops.disable_weight_init)
    control = comfy.cldm.cldm.ControlNet(**config)
    generator = torch.Generator().manual_seed(1)
    state = {f"control_model.{k}": (torch.randn(v.shape, generator=generator) * 0.05).to(torch.float16)
             for k, v in control.state_dict().items()}
    save_file(state, str(path))
    return path


@pytest.fixture(scope="module")
def installed(comfy_runtime, tiny_checkpoint, base, tmp_path_factory):
    from harness import make_sample_dataset
    clip_vision = comfy_runtime.install_model("clip_vision", random_vit_l14(), "random-vit-l-14.safetensors")
    folder = tmp_path_factory.mktemp("ipa-graph")
    controlnet = comfy_runtime.install_model("controlnet", stock_controlnet_file(base[0], folder / "cn.safetensors"),
                                             "tiny-cn.safetensors")
    dataset = folder / "data"
    make_sample_dataset(dataset, n=4, size=64, seed=7, subject="sks")
    reference = comfy_runtime.folder("input") / "ipa_reference.png"
    Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype("uint8")).save(reference)
    return {"ckpt": tiny_checkpoint, "clip_vision": clip_vision, "controlnet": controlnet, "dataset": str(dataset),
            "reference": reference.name}


def _common(steps, run_name):
    return {"steps": steps, "batch_size": 2, "grad_accumulation": 1, "optimizer": "adamw", "lr_scheduler": "constant",
            "warmup_steps": 0, "loss_type": "mse", "min_snr_gamma": 0.0, "noise_offset": 0.0, "max_grad_norm": 1.0,
            "precision": "fp32", "gradient_checkpointing": False, "seed": 0, "checkpoint_every": 0,
            "run_name": run_name, "resume": ""}


def _dataset(folder):
    return {"class_type": "PersonalizeDatasetFromFolder", "inputs": {
        "folder": folder, "vae": ["1", 2], "clip": ["1", 1], "resolution": 64, "buckets": False, "bucket_step": 64,
        "min_side": 0, "max_side": 0, "no_upscale": False, "crop": "center", "crop_variants": 1, "flip": False,
        "trigger_word": "", "instance_prompt": "", "shuffle_tags": False, "keep_tokens": 0, "tag_dropout": 0.0,
        "caption_dropout": 0.0, "masked_loss": False, "seed": 0, "use_cache": True}}


def test_train_save_load_apply_with_lora_and_controlnet(comfy_runtime, installed):
    train = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": installed["ckpt"]}},
        "2": {"class_type": "CLIPVisionLoader", "inputs": {"clip_name": installed["clip_vision"]}},
        "3": _dataset(installed["dataset"]),
        "4": {"class_type": "PersonalizeTrainIPAdapter", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "clip_vision": ["2", 0], "dataset": ["3", 0],
            "learning_rate": 1e-3, "variant": "base", "tokens": 0, "resampler_depth": 4, "text_drop": 0.05,
            "image_drop": 0.05, "both_drop": 0.05, "crop": "center", **_common(2, "ipa_graph")}},
        "5": {"class_type": "PersonalizeSaveIPAdapter", "inputs": {"ipadapter": ["4", 0], "name": "graph/ipa",
                                                                    "save_dtype": "fp16"}},
    }
    result = comfy_runtime.run_prompt(train)
    shown = result["outputs"]["5"]["text"][0].removeprefix("saved ")  # as the loader lists it
    saved = comfy_runtime.folder("ipadapter") / shown
    assert shown.startswith("graph/") and saved.is_file()

    def apply_graph(weight, prefix):
        return {
            "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": installed["ckpt"]}},
            "2": {"class_type": "CLIPVisionLoader", "inputs": {"clip_name": installed["clip_vision"]}},
            "3": _dataset(installed["dataset"]),
            "4": {"class_type": "PersonalizeTrainLoRA", "inputs": {
                "model": ["1", 0], "clip": ["1", 1], "dataset": ["3", 0], "learning_rate": 1e-3, "rank": 2, "alpha": 2.0,
                "targets": "attention", "train_text_encoder": False, "text_encoder_lr": 0.0, "dora": False,
                "initial_lora": "[none]", **_common(1, "ipa_lora")}},
            "5": {"class_type": "PersonalizeLoadIPAdapter", "inputs": {"ipadapter_file": "graph/" + saved.name}},
            "6": {"class_type": "LoadImage", "inputs": {"image": installed["reference"]}},
            "7": {"class_type": "PersonalizeApplyIPAdapter", "inputs": {
                "model": ["4", 0], "ipadapter": ["5", 0], "clip_vision": ["2", 0], "image": ["6", 0], "weight": weight,
                "start_percent": 0.0, "end_percent": 1.0, "combine": "average", "crop": "center"}},
            "8": {"class_type": "CLIPTextEncode", "inputs": {"text": "a sks cross", "clip": ["4", 1]}},
            "9": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["4", 1]}},
            "10": {"class_type": "ControlNetLoader", "inputs": {"control_net_name": installed["controlnet"]}},
            "11": {"class_type": "ControlNetApplyAdvanced", "inputs": {
                "positive": ["8", 0], "negative": ["9", 0], "control_net": ["10", 0], "image": ["6", 0],
                "strength": 1.0, "start_percent": 0.0, "end_percent": 1.0}},
            "12": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
            "13": {"class_type": "KSampler", "inputs": {
                "model": ["7", 0], "positive": ["11", 0], "negative": ["11", 1], "latent_image": ["12", 0], "seed": 0,
                "steps": 2, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
            "14": {"class_type": "VAEDecode", "inputs": {"samples": ["13", 0], "vae": ["1", 2]}},
            "15": {"class_type": "SaveImage", "inputs": {"images": ["14", 0], "filename_prefix": prefix}},
        }

    images = {}
    for weight in (1.0, 0.0):
        run = comfy_runtime.run_prompt(apply_graph(weight, f"ipa_w{weight}"))
        images[weight] = np.asarray(Image.open(comfy_runtime.image_paths(run, "15")[0]), dtype=np.float32)
    assert np.abs(images[1.0] - images[0.0]).mean() > 0.5  # the adapter steers the composed graph
