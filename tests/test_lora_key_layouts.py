"""kohya key names for SD1.x, SD2.x and SDXL, checked on ComfyUI's own model classes (built on the
meta device, so full-size architectures cost no memory) against ComfyUI's own LoRA key maps."""
import pytest
import torch

import comfy.lora
import comfy.sd1_clip
import comfy.sdxl_clip
import comfy.supported_models as sm
from comfy.text_encoders.sd2_clip import SD2ClipModel

COMMON = {"in_channels": 4, "out_channels": 4, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
          "use_temporal_attention": False, "model_channels": 320}
CONFIGS = {
    "sd1": (sm.SD15, {**COMMON, "use_linear_in_transformer": False, "context_dim": 768, "num_heads": 8,
                      "num_head_channels": -1, "num_res_blocks": [2, 2, 2, 2], "channel_mult": [1, 2, 4, 4],
                      "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "transformer_depth_middle": 1,
                      "transformer_depth_output": [0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1], "adm_in_channels": None},
            comfy.sd1_clip.SD1ClipModel),
    "sd2": (sm.SD20, {**COMMON, "use_linear_in_transformer": True, "context_dim": 1024, "num_heads": -1,
                      "num_head_channels": 64, "num_res_blocks": [2, 2, 2, 2], "channel_mult": [1, 2, 4, 4],
                      "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "transformer_depth_middle": 1,
                      "transformer_depth_output": [0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1], "adm_in_channels": None},
            SD2ClipModel),
    "sdxl": (sm.SDXL, {**COMMON, "use_linear_in_transformer": True, "context_dim": 2048, "adm_in_channels": 2816,
                       "num_heads": -1, "num_head_channels": 64, "num_res_blocks": [2, 2, 2], "channel_mult": [1, 2, 4],
                       "transformer_depth": [0, 0, 2, 2, 10, 10], "transformer_depth_middle": 10,
                       "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10]},
             comfy.sdxl_clip.SDXLClipModel),
}


class _Patcher:
    def __init__(self, model):
        self.model = model


@pytest.fixture(scope="module")
def kohya(comfy_runtime):
    return comfy_runtime.pack_import("trainers.formats.kohya_lora")


@pytest.fixture(scope="module", params=list(CONFIGS))
def meta_model(request):
    config_cls, unet_config, clip_cls = CONFIGS[request.param]
    with torch.device("meta"):
        model = config_cls(unet_config).get_model({}, device="meta")
        clip = clip_cls(device="meta")
    return request.param, model, clip


def test_family_is_detected(kohya, meta_model):
    family, model, _ = meta_model
    assert kohya.base_model_family(_Patcher(model)) == family


def test_unet_names_are_kohyas_and_resolve_in_comfyui(kohya, meta_model):
    family, model, _ = meta_model
    names = kohya.unet_lora_names(model)
    key_map = comfy.lora.model_lora_keys_unet(model, {})
    attn = [w for w in names if w.endswith("transformer_blocks.0.attn1.to_q.weight")]
    assert attn, "no attention layer named"
    assert all(key_map[names[w]] == w for w in names), "a chosen name resolves to another weight in ComfyUI"
    first = names[sorted(attn)[0]]
    if family == "sdxl":
        assert first.startswith("lora_unet_input_blocks_"), first
    else:
        assert first.startswith(("lora_unet_down_blocks_", "lora_unet_up_blocks_", "lora_unet_mid_block_")), first


def test_text_encoder_names(kohya, meta_model):
    family, _, clip = meta_model
    names = kohya.clip_lora_names(clip)
    key_map = comfy.lora.model_lora_keys_clip(clip, {})
    assert all(key_map[names[w]] == w for w in names)
    prefixes = {n.split("_text_")[0] for n in names.values()}
    assert prefixes == ({"lora_te1", "lora_te2"} if family == "sdxl" else {"lora_te"})
