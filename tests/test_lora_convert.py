"""LoRA layouts (kohya / comfyui / diffusers), file safety and Inspect, checked through stock LoraLoader.

The helpers here (random LoRAs, stock loading with the loader's warnings captured, patched weights) are
shared by test_lora_merge.py and test_lora_extract.py.
"""
import json
import pickle
import uuid

import comfy.lora
import comfy.sd1_clip
import comfy.sdxl_clip
import comfy.supported_models as sm
import pytest
import torch

UNET_TARGETS = [
    "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight",    # linear 320x320
    "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",    # linear 320x768
    "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_out.0.weight",
    "diffusion_model.output_blocks.0.1.transformer_blocks.0.ff.net.2.weight",     # linear 320x1280
    "diffusion_model.input_blocks.1.1.proj_in.weight",                            # conv 1x1
    "diffusion_model.input_blocks.1.0.in_layers.2.weight",                        # conv 3x3
    "diffusion_model.output_blocks.0.0.skip_connection.weight",                   # conv 1x1 320x640
]
CLIP_TARGETS = [
    "clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight",
    "clip_l.transformer.text_model.encoder.layers.11.mlp.fc1.weight",
]
LOADER_WARNINGS = ("lora key not loaded", "NOT LOADED", "WEIGHT NOT MERGED", "Calculate Weight Failed")


@pytest.fixture(scope="module")
def fmt(comfy_runtime):
    class Formats:
        convert = comfy_runtime.pack_import("trainers.formats.lora_convert")
        kohya = comfy_runtime.pack_import("trainers.formats.kohya_lora")
        svd = comfy_runtime.pack_import("trainers.formats.lora_svd")
        merge = comfy_runtime.pack_import("trainers.formats.lora_merge")
        inspect = comfy_runtime.pack_import("trainers.formats.lora_inspect")
        io = comfy_runtime.pack_import("trainers.formats.safetensors_io")
    return Formats


def weight_of(model, clip, target):
    sd = model.model.state_dict() if target.startswith("diffusion_model.") else clip.cond_stage_model.state_dict()
    return sd[target]


def make_lora(fmt, model, clip, *, rank, seed, alpha=None, targets=None, base="sd_v1", loha_target=None, tags=None):
    """A random kohya LoRA on `targets` (conv factors in kohya's conv shapes), optionally one LoHa module."""
    gen = torch.Generator().manual_seed(seed)
    names = {}
    if model is not None:
        names.update(fmt.kohya.unet_lora_names(model.model))
    if clip is not None:
        names.update(fmt.kohya.clip_lora_names(clip.cond_stage_model))
    tensors = {}
    for target in targets or (UNET_TARGETS + CLIP_TARGETS):
        shape = weight_of(model, clip, target).shape
        name = names[target]
        if target == loha_target:
            for half in ("1", "2"):
                tensors[f"{name}.hada_w{half}_a"] = torch.randn(shape[0], rank, generator=gen) * 0.1
                tensors[f"{name}.hada_w{half}_b"] = torch.randn(rank, shape[1:].numel(), generator=gen) * 0.1
            tensors[f"{name}.alpha"] = torch.tensor(float(rank))
            continue
        tensors[f"{name}.lora_up.weight"] = torch.randn(shape[0], rank, *([1] * (len(shape) - 2)), generator=gen) * 0.05
        tensors[f"{name}.lora_down.weight"] = torch.randn(rank, *shape[1:], generator=gen) * 0.05
        if alpha is not None:
            tensors[f"{name}.alpha"] = torch.tensor(float(alpha))
    meta = {"ss_base_model_version": base, "ss_output_name": f"random_{seed}",
            "ss_tag_frequency": json.dumps({"set": tags or {"sks": 4, "dog": 2}})}
    return fmt.kohya.LoraStateDict(tensors, meta)


def save_lora(comfy_runtime, fmt, lora, stem=None) -> str:
    folder = comfy_runtime.folder("loras")
    path = fmt.io.save_new_safetensors(folder, stem or f"t_{uuid.uuid4().hex[:8]}", dict(lora),
                                       dict(getattr(lora, "metadata", {})), "fp32")
    return path.relative_to(folder).as_posix()


def stock_load(comfy_runtime, model, clip, lora_name, strength=1.0):
    """Stock LoraLoader on a file of the loras folder; fails on any warning about keys it did not apply."""
    mark = comfy_runtime.log_mark()
    with torch.inference_mode():
        out = comfy_runtime.nodes.LoraLoader().load_lora(model, clip, lora_name, strength, strength)
    log = comfy_runtime.log_since(mark)
    assert not [line for line in log.splitlines() if any(w in line for w in LOADER_WARNINGS)], log
    return out


def patched(patcher, keys):
    """Weights of a ModelPatcher with its patches applied, as ComfyUI computes them (fp32)."""
    key_patches = patcher.get_key_patches()
    out = {}
    with torch.no_grad():
        for key in keys:
            (weight, convert), *patches = key_patches[key]
            out[key] = comfy.lora.calculate_weight(patches, convert(weight.float().clone(), inplace=True), key)
    return out


def all_patched(model, clip, targets):
    unet = [t for t in targets if t.startswith("diffusion_model.")]
    text = [t for t in targets if not t.startswith("diffusion_model.")]
    return {**patched(model, unet), **patched(clip.patcher, text)}


def assert_close(a, b, rtol=1e-5):
    for key in a:
        scale = max(float(a[key].abs().max()), 1e-12)
        err = float((a[key] - b[key]).abs().max()) / scale
        assert err < rtol, f"{key}: relative error {err}"


def test_saved_loras_carry_the_hashes_model_sites_index_them_by(comfy_runtime, fmt, base, tmp_path):
    """kohya's sshs_model_hash is sha256 of the file's tensor data as written (fp16 here), which A1111's
    additional-networks and model sites recompute from the file; sshs_legacy_hash reads 64 KiB at 1 MiB of the file
    written with the ss_ metadata alone. The old hash covered the fp32 tensors and key names: it matched nothing."""
    import hashlib

    from safetensors import safe_open
    from safetensors.torch import save_file
    model, clip, _ = base
    lora = make_lora(fmt, model, clip, rank=64, seed=40)
    meta = {"ss_network_dim": "64", "ss_output_name": "hashed", "modelspec.title": "hashed"}
    path = fmt.io.save_new_safetensors(tmp_path, "hashed", dict(lora), meta, "fp16")
    data = path.read_bytes()
    with safe_open(str(path), "pt") as f:
        saved = f.metadata()
    assert saved["sshs_model_hash"] == hashlib.sha256(data[8 + int.from_bytes(data[:8], "little"):]).hexdigest()
    save_file({k: v.half() for k, v in lora.items()}, str(tmp_path / "ss_only.safetensors"),
              metadata={k: v for k, v in meta.items() if k.startswith("ss_")})
    legacy = (tmp_path / "ss_only.safetensors").read_bytes()[0x100000:0x110000]
    assert len(legacy) == 0x10000 and saved["sshs_legacy_hash"] == hashlib.sha256(legacy).hexdigest()[:8]


# -- conversions on the tiny model, through stock LoraLoader ------------------------------------------
@pytest.mark.parametrize("layout", ["kohya", "comfyui", "diffusers"])
def test_convert_applies_identically(comfy_runtime, fmt, base, layout):
    """Each layout loads in stock LoraLoader with no unloaded key and patches the same weights by the same amount."""
    model, clip, _ = base
    lora = make_lora(fmt, model, clip, rank=4, alpha=2.0, seed=1)
    converted = fmt.convert.convert(lora, fmt.convert.KeySpace(model, clip), layout)
    prefixes = {"kohya": ("lora_unet_", "lora_te_"), "comfyui": ("diffusion_model.", "text_encoders."),
                "diffusers": ("unet.", "text_encoder.")}[layout]
    assert all(k.startswith(prefixes) for k in converted), sorted(converted)[:3]
    targets = UNET_TARGETS + CLIP_TARGETS
    want = all_patched(*stock_load(comfy_runtime, model, clip, save_lora(comfy_runtime, fmt, lora)), targets)
    got = all_patched(*stock_load(comfy_runtime, model, clip, save_lora(comfy_runtime, fmt, converted)), targets)
    base_w = all_patched(model, clip, targets)
    assert all(float((want[k] - base_w[k]).abs().max()) > 1e-4 for k in targets)  # the LoRA does change them
    assert_close(want, got)


def test_convert_round_trip_is_lossless(fmt, base):
    """kohya -> diffusers -> comfyui -> kohya gives back the same delta on every module."""
    model, clip, _ = base
    keys = fmt.convert.KeySpace(model, clip)
    lora = make_lora(fmt, model, clip, rank=3, alpha=1.5, seed=2)
    out = lora
    for layout in ("diffusers", "comfyui", "kohya"):
        out = fmt.convert.convert(out, keys, layout)
    first = fmt.convert.resolve(lora, keys).modules
    last = fmt.convert.resolve(out, keys).modules
    assert first.keys() == last.keys() and len(first) == len(UNET_TARGETS + CLIP_TARGETS)
    for target in first:
        w = keys.weight(target)
        torch.testing.assert_close(fmt.convert.full_delta(first[target], w), fmt.convert.full_delta(last[target], w),
                                   rtol=1e-5, atol=1e-7)


def test_convert_reads_plain_peft_attention_names(fmt, base):
    """Modern peft names (`attn1.to_q.lora_A`) are read and written as the processor names ComfyUI resolves."""
    model, clip, _ = base
    keys = fmt.convert.KeySpace(model, clip)
    target = UNET_TARGETS[2]  # attn1.to_out.0
    peft = {"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0.lora_A.weight": torch.randn(2, 320),
            "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0.lora_B.weight": torch.randn(320, 2)}
    modules = fmt.convert.resolve(peft, keys).modules
    assert list(modules) == [target]
    written = fmt.convert.convert(peft, keys, "diffusers")
    loaded = comfy.lora.load_lora(written, keys.key_map, log_missing=False)
    assert list(loaded) == [target]


# -- SD1.x / SD2.x / SDXL key layouts on ComfyUI's own full-size classes (meta device) ------------------
COMMON = {"in_channels": 4, "out_channels": 4, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
          "use_temporal_attention": False, "model_channels": 320, "num_res_blocks": [2, 2, 2, 2],
          "channel_mult": [1, 2, 4, 4], "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "transformer_depth_middle": 1,
          "transformer_depth_output": [0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1], "adm_in_channels": None}
ARCHS = {
    "sd1": (sm.SD15, {**COMMON, "use_linear_in_transformer": False, "context_dim": 768, "num_heads": 8,
                      "num_head_channels": -1}, comfy.sd1_clip.SD1ClipModel),
    "sd2": (sm.SD20, {**COMMON, "use_linear_in_transformer": True, "context_dim": 1024, "num_heads": -1,
                      "num_head_channels": 64}, None),
    "sdxl": (sm.SDXL, {**COMMON, "use_linear_in_transformer": True, "context_dim": 2048, "adm_in_channels": 2816,
                       "num_heads": -1, "num_head_channels": 64, "num_res_blocks": [2, 2, 2], "channel_mult": [1, 2, 4],
                       "transformer_depth": [0, 0, 2, 2, 10, 10], "transformer_depth_middle": 10,
                       "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10]}, comfy.sdxl_clip.SDXLClipModel),
}


class _Holder:
    """Carries a real ComfyUI model object where the code reads `.model` / `.cond_stage_model`."""

    def __init__(self, model=None, clip=None):
        self.model, self.cond_stage_model = model, clip


@pytest.mark.parametrize("arch", list(ARCHS))
def test_layouts_for_each_architecture(fmt, arch):
    """A LoRA on attention, conv and text-encoder layers converts to every layout; ComfyUI's own loader maps each
    key of each layout to the same weight, with no key left over."""
    from comfy.text_encoders.sd2_clip import SD2ClipModel
    config_cls, unet_config, clip_cls = ARCHS[arch]
    with torch.device("meta"):
        model = config_cls(unet_config).get_model({}, device="meta")
        clip = (clip_cls or SD2ClipModel)(device="meta")
    keys = fmt.convert.KeySpace(_Holder(model), _Holder(clip=clip))
    unet_sd, clip_sd = model.state_dict(), clip.state_dict()
    targets = sorted(k for k in unet_sd if k.endswith(("attn2.to_k.weight", "attn1.to_out.0.weight", "in_layers.2.weight")))[:6]
    targets += sorted(k for k in clip_sd if k.endswith(("layers.1.self_attn.v_proj.weight", "layers.2.mlp.fc2.weight")))
    names = keys.names("kohya")
    gen = torch.Generator().manual_seed(0)
    lora = {}
    for target in targets:
        shape = keys.weight(target).shape
        lora[f"{names[target]}.lora_up.weight"] = torch.randn(shape[0], 2, *([1] * (len(shape) - 2)), generator=gen)
        lora[f"{names[target]}.lora_down.weight"] = torch.randn(2, *shape[1:], generator=gen)
        lora[f"{names[target]}.alpha"] = torch.tensor(1.0)
    if arch == "sdxl":
        assert any(n.startswith("lora_te2_") for n in lora) and any(n.startswith("lora_te1_") for n in lora)
    for layout in fmt.convert.LAYOUTS:
        out = fmt.convert.convert(lora, keys, layout)
        patches = comfy.lora.load_lora(out, keys.key_map, log_missing=False)
        assert sorted(patches) == sorted(targets), layout
        for key in out:  # every key is one ComfyUI consumed
            assert any(key.startswith(n) for n in keys.key_map if keys.key_map[n] in targets), key


# -- files: corrupt, pickled, wrong architecture --------------------------------------------------
class _Boom:
    def __reduce__(self):
        return (open, (str(_Boom.marker), "w"))


def test_pickle_is_refused_never_unpickled(comfy_runtime, fmt, tmp_path):
    _Boom.marker = tmp_path / "unpickled.txt"
    for name in ("evil.pt", "evil.safetensors"):
        path = tmp_path / name
        path.write_bytes(pickle.dumps({"lora_unet_x.lora_up.weight": _Boom()}))
        with pytest.raises(ValueError, match="`lora_name`.*not a safetensors file.*never unpickled"):
            fmt.convert.read_lora_file(path)
    torch.save({"a": torch.zeros(1)}, tmp_path / "zip.ckpt")
    with pytest.raises(ValueError, match="never unpickled"):
        fmt.convert.read_lora_file(tmp_path / "zip.ckpt")
    assert not _Boom.marker.exists()


def test_corrupt_file_is_refused(comfy_runtime, fmt, base, tmp_path):
    model, clip, _ = base
    name = save_lora(comfy_runtime, fmt, make_lora(fmt, model, clip, rank=2, seed=3))
    data = (comfy_runtime.folder("loras") / name).read_bytes()
    for cut in (4, len(data) // 2):
        broken = tmp_path / f"broken_{cut}.safetensors"
        broken.write_bytes(data[:cut])
        with pytest.raises(ValueError, match="`lora_name`.*corrupt"):
            fmt.convert.read_lora_file(broken)
    ok = fmt.convert.read_lora_file(comfy_runtime.folder("loras") / name)
    assert ok.metadata["ss_base_model_version"] == "sd_v1" and len(ok) == 9 * 2


def test_lora_for_another_architecture_is_refused(fmt, base):
    """An SDXL-named LoRA (lora_te2_, input_blocks_7) and an SD2-width LoRA do not fit the SD1 model."""
    model, clip, _ = base
    keys = fmt.convert.KeySpace(model, clip)
    sdxl = {"lora_unet_input_blocks_7_1_transformer_blocks_0_attn1_to_q.lora_up.weight": torch.zeros(640, 2),
            "lora_unet_input_blocks_7_1_transformer_blocks_0_attn1_to_q.lora_down.weight": torch.zeros(2, 640)}
    with pytest.raises(ValueError, match="`lora` does not fit this model.*different base architecture"):
        fmt.convert.convert(sdxl, keys, "kohya")
    name = fmt.kohya.unet_lora_names(model.model)[UNET_TARGETS[1]]
    sd2 = {f"{name}.lora_up.weight": torch.zeros(320, 2), f"{name}.lora_down.weight": torch.zeros(2, 1024)}
    with pytest.raises(ValueError, match="different base architecture"):
        fmt.convert.convert(sd2, keys, "kohya")
    incomplete = {f"{name}.lora_up.weight": torch.zeros(320, 2), f"{name}.alpha": torch.tensor(1.0)}
    with pytest.raises(ValueError, match="`lora` has an incomplete module"):
        fmt.convert.convert(incomplete, keys, "kohya")
    text_only = make_lora(fmt, model, clip, rank=2, seed=4, targets=CLIP_TARGETS)
    with pytest.raises(ValueError, match="connect `clip`"):
        fmt.convert.convert(text_only, fmt.convert.KeySpace(model, None), "kohya")


# -- nodes: load a file, convert, inspect -------------------------------------------------------------
def test_nodes_load_convert_inspect(comfy_runtime, fmt, base, tiny_checkpoint):
    model, clip, _ = base
    lora = make_lora(fmt, model, clip, rank=4, alpha=4.0, seed=5, tags={"zwx": 6, "portrait": 3})
    name = save_lora(comfy_runtime, fmt, lora)
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": tiny_checkpoint}},
        "2": {"class_type": "PersonalizeLoadLoRAFile", "inputs": {"lora_name": name}},
        "3": {"class_type": "PersonalizeConvertLoRA", "inputs": {"model": ["1", 0], "clip": ["1", 1], "lora": ["2", 0],
                                                                "layout": "diffusers"}},
        "4": {"class_type": "PersonalizeInspectLoRA", "inputs": {"lora": ["3", 0], "model": ["1", 0], "clip": ["1", 1]}},
        "5": {"class_type": "PersonalizeSaveLoRA", "inputs": {"lora": ["3", 0], "name": "converted/diffusers",
                                                             "save_dtype": "fp32"}},
        "6": {"class_type": "PersonalizeInspectLoRA", "inputs": {"lora": ["2", 0]}},
    }
    result = comfy_runtime.run_prompt(prompt)
    text = result["outputs"]["4"]["text"][0]
    assert "layout: diffusers" in text and "fits the connected model: yes (9 layers patched)" in text
    assert "trigger words: zwx, portrait" in text
    original = result["outputs"]["6"]["text"][0]
    assert "layout: kohya" in original and "base model: sd_v1" in original and "ranks: 4 x9" in original
    assert "rank 4 alpha 4 out 320 in 2880" in original  # the 3x3 conv module
    saved = next((comfy_runtime.folder("loras") / "converted").glob("diffusers*.safetensors"))
    targets = UNET_TARGETS + CLIP_TARGETS
    got = all_patched(*stock_load(comfy_runtime, model, clip, saved.relative_to(comfy_runtime.folder("loras")).as_posix()),
                      targets)
    want = all_patched(*stock_load(comfy_runtime, model, clip, name), targets)
    assert_close(want, got)
