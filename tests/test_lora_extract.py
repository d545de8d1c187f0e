"""Extracting a LoRA from a fine-tune and resizing a LoRA's rank (SVD), on the tiny SD1.5 model."""
import comfy.sd
import pytest
import test_lora_convert as shared
import torch
from test_lora_convert import CLIP_TARGETS, UNET_TARGETS, all_patched, assert_close, make_lora, save_lora, stock_load

fmt = shared.fmt  # the module's fixture, shared

PLANTED = [UNET_TARGETS[0], UNET_TARGETS[5], UNET_TARGETS[6], CLIP_TARGETS[0]]  # linear, 3x3 conv, 1x1 conv, text


def _relative_error(a, b):
    return float(torch.linalg.norm((a - b).flatten()) / torch.linalg.norm(b.flatten()))


def test_extract_node_recovers_a_planted_low_rank_delta(comfy_runtime, fmt, base, tiny_checkpoint):
    """tuned = base + a rank-3 LoRA (stock LoraLoader); extracting at rank 3 gives back that delta on exactly those
    layers (UNet linear and conv, text encoder), and the saved file re-applies it through stock LoraLoader."""
    model, clip, _ = base
    planted = make_lora(fmt, model, clip, rank=3, alpha=1.5, seed=60, targets=PLANTED)
    name = save_lora(comfy_runtime, fmt, planted)
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": tiny_checkpoint}},
        "2": {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1], "lora_name": name,
                                                     "strength_model": 1.0, "strength_clip": 1.0}},
        "3": {"class_type": "PersonalizeExtractLoRA", "inputs": {
            "base_model": ["1", 0], "tuned_model": ["2", 0], "base_clip": ["1", 1], "tuned_clip": ["2", 1],
            "rank_mode": "fixed", "rank": 3, "energy": 0.99, "layout": "kohya", "min_change": 0.0}},
        "4": {"class_type": "PersonalizeSaveLoRA", "inputs": {"lora": ["3", 0], "name": "extracted/planted",
                                                             "save_dtype": "fp32"}},
    }
    result = comfy_runtime.run_prompt(prompt)
    report = result["outputs"]["3"]["text"][0]
    assert report.startswith("extract: 4 layers") and report.count("rank full -> 3") == 4, report
    path = next((comfy_runtime.folder("loras") / "extracted").glob("planted*.safetensors"))
    extracted = fmt.convert.read_lora_file(path)
    keys = fmt.convert.KeySpace(model, clip)
    got = fmt.convert.resolve(extracted, keys).modules
    want = fmt.convert.resolve(planted, keys).modules
    assert sorted(got) == sorted(PLANTED) and extracted.metadata["ss_base_model_version"] == "sd_v1"
    for target in PLANTED:
        w = keys.weight(target)
        error = _relative_error(fmt.convert.full_delta(got[target], w), fmt.convert.full_delta(want[target], w))
        assert error < 1e-5, (target, error)
    relative = path.relative_to(comfy_runtime.folder("loras")).as_posix()
    assert_close(all_patched(*stock_load(comfy_runtime, model, clip, name), PLANTED),
                 all_patched(*stock_load(comfy_runtime, model, clip, relative), PLANTED), rtol=1e-5)


def test_extract_energy_mode_finds_the_planted_rank(fmt, base, tiny_checkpoint_path):
    """Energy mode picks the smallest rank that keeps the energy: the planted rank, under a far higher cap."""
    model, clip, _ = base
    planted = make_lora(fmt, model, clip, rank=2, seed=61, targets=PLANTED[:2])
    with torch.inference_mode():
        tuned, _ = stock_load_engine(model, clip, planted)
        before = all_patched(model, clip, PLANTED[:2])
        _, reports = fmt.svd.extract_lora(model, tuned, rank=64, rank_mode="energy", energy=0.999999)
    assert [r.new_rank for r in reports] == [2, 2] and all(r.kept_energy > 0.999999 for r in reports)
    assert_close(before, all_patched(model, clip, PLANTED[:2]), rtol=1e-7)  # the base is not changed
    # A separately loaded copy (no shared tensors): every layer is compared, only the planted ones differ.
    with torch.inference_mode():
        copy, _, _, _ = comfy.sd.load_checkpoint_guess_config(str(tiny_checkpoint_path), output_vae=False,
                                                              output_clip=False)
        tuned_copy, _ = stock_load_engine(copy, None, planted)
        _, reports = fmt.svd.extract_lora(model, tuned_copy, rank=8, rank_mode="energy", energy=0.999999)
    assert sorted(r.target for r in reports) == sorted(PLANTED[:2]) and [r.new_rank for r in reports] == [2, 2]
    with pytest.raises(ValueError, match="`rank`=4096 is above the size of every layer"):
        fmt.svd.extract_lora(model, tuned, rank=4096)
    with pytest.raises(ValueError, match="does not differ"):
        fmt.svd.extract_lora(model, model, rank=4)


def stock_load_engine(model, clip, lora, strength=1.0):
    return comfy.sd.load_lora_for_models(model, clip, dict(lora), strength, strength)


def test_resize_at_full_rank_reconstructs_the_delta(fmt, base):
    model, clip, _ = base
    keys = fmt.convert.KeySpace(model, clip)
    lora = make_lora(fmt, model, clip, rank=8, alpha=4.0, seed=70)
    resized, reports = fmt.svd.resize_lora(lora, keys, rank=8)
    assert {r.old_rank for r in reports} == {8} and all(r.kept_energy > 1 - 1e-9 for r in reports)
    before, after = fmt.convert.resolve(lora, keys).modules, fmt.convert.resolve(resized, keys).modules
    errors = [_relative_error(fmt.convert.full_delta(after[t], keys.weight(t)),
                              fmt.convert.full_delta(before[t], keys.weight(t))) for t in before]
    assert max(errors) < 1e-5, errors


def test_resize_node_lower_rank_and_loha(comfy_runtime, fmt, base, tiny_checkpoint):
    """Resize to rank 2 through the node: every layer's kept energy equals Σ s_i² (i<2) / Σ s_i² of its delta
    (LoHa included, which becomes a plain LoRA), and the file loads in stock LoraLoader."""
    model, clip, _ = base
    targets = UNET_TARGETS[:4] + UNET_TARGETS[5:6] + CLIP_TARGETS[:1]  # the big CLIP MLP only costs time here
    lora = make_lora(fmt, model, clip, rank=4, alpha=4.0, seed=71, loha_target=UNET_TARGETS[3], targets=targets)
    name = save_lora(comfy_runtime, fmt, lora)
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": tiny_checkpoint}},
        "2": {"class_type": "PersonalizeLoadLoRAFile", "inputs": {"lora_name": name}},
        "3": {"class_type": "PersonalizeResizeLoRA", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "lora": ["2", 0], "rank_mode": "fixed", "rank": 2, "energy": 0.9,
            "layout": "comfyui"}},
        "4": {"class_type": "PersonalizeSaveLoRA", "inputs": {"lora": ["3", 0], "name": "resized/r2", "save_dtype": "fp32"}},
    }
    result = comfy_runtime.run_prompt(prompt)
    report = result["outputs"]["3"]["text"][0]
    keys = fmt.convert.KeySpace(model, clip)
    for target, module in fmt.convert.resolve(lora, keys).modules.items():
        s = torch.linalg.svdvals(fmt.convert.full_delta(module, keys.weight(target)).flatten(1).double())
        kept = float((s[:2] ** 2).sum() / (s ** 2).sum())
        old = "full" if target == UNET_TARGETS[3] else "4"
        assert f"{target}: rank {old} -> 2, kept energy {100 * kept:.4f}%" in report, (target, report)
    path = next((comfy_runtime.folder("loras") / "resized").glob("r2*.safetensors"))
    resized = fmt.convert.read_lora_file(path)
    assert all(k.startswith(("diffusion_model.", "text_encoders.")) for k in resized)
    assert not any("hada" in k for k in resized)
    stock_load(comfy_runtime, model, clip, path.relative_to(comfy_runtime.folder("loras")).as_posix())


def test_resize_refuses_a_rank_above_every_layer(fmt, base):
    model, clip, _ = base
    lora = make_lora(fmt, model, clip, rank=2, seed=72)
    with pytest.raises(ValueError, match="`rank`=2000 is above the size of every layer .* at most 768"):
        fmt.svd.resize_lora(lora, fmt.convert.KeySpace(model, clip), rank=2000)
