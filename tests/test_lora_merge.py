"""Merging LoRAs (concat, svd, ties, dare) and baking them into a checkpoint, on the tiny SD1.5 model."""
import comfy.sd
import pytest
import test_lora_convert as shared
import torch
from test_lora_convert import CLIP_TARGETS, UNET_TARGETS, all_patched, assert_close, make_lora, save_lora, stock_load

fmt = shared.fmt  # the module's fixture, shared

TARGETS = UNET_TARGETS + CLIP_TARGETS


def test_concat_merge_equals_sequential_application(comfy_runtime, fmt, base, tiny_checkpoint):
    """Load two files -> list with weights -> concat merge -> save: stock LoraLoader of the merged file patches
    every weight exactly as loading A at 0.7 and then B at -0.4 (one LoHa layer included)."""
    model, clip, _ = base
    lora_a = make_lora(fmt, model, clip, rank=4, alpha=2.0, seed=10, loha_target=UNET_TARGETS[3])
    lora_b = make_lora(fmt, model, clip, rank=8, seed=11, targets=TARGETS[1:])
    name_a, name_b = save_lora(comfy_runtime, fmt, lora_a), save_lora(comfy_runtime, fmt, lora_b)
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": tiny_checkpoint}},
        "2": {"class_type": "PersonalizeLoadLoRAFile", "inputs": {"lora_name": name_a}},
        "3": {"class_type": "PersonalizeLoadLoRAFile", "inputs": {"lora_name": name_b}},
        "4": {"class_type": "PersonalizeLoRAList", "inputs": {"lora": ["2", 0], "weight": 0.7}},
        "5": {"class_type": "PersonalizeLoRAList", "inputs": {"lora": ["3", 0], "weight": -0.4, "loras": ["4", 0]}},
        "6": {"class_type": "PersonalizeMergeLoRAs", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "loras": ["5", 0], "method": "concat", "rank": 32, "density": 0.5,
            "majority_sign": "total", "seed": 0, "layout": "kohya"}},
        "7": {"class_type": "PersonalizeSaveLoRA", "inputs": {"lora": ["6", 0], "name": "merged/concat", "save_dtype": "fp32"}},
    }
    comfy_runtime.run_prompt(prompt)
    merged_path = next((comfy_runtime.folder("loras") / "merged").glob("concat*.safetensors"))
    merged = fmt.convert.read_lora_file(merged_path)
    loha_name = fmt.kohya.unet_lora_names(model.model)[UNET_TARGETS[3]]
    assert f"{loha_name}.diff" in merged  # a LoHa layer is kept as its exact delta
    q_name = fmt.kohya.unet_lora_names(model.model)[UNET_TARGETS[1]]
    assert merged[f"{q_name}.lora_down.weight"].shape[0] == 12  # ranks 4 + 8 side by side

    m_seq, c_seq = stock_load(comfy_runtime, model, clip, name_a, 0.7)
    m_seq, c_seq = stock_load(comfy_runtime, m_seq, c_seq, name_b, -0.4)
    sequential = all_patched(m_seq, c_seq, TARGETS)
    relative = merged_path.relative_to(comfy_runtime.folder("loras")).as_posix()
    one_file = all_patched(*stock_load(comfy_runtime, model, clip, relative), TARGETS)
    assert_close(sequential, one_file, rtol=1e-5)


def _delta(lora, name, shape, dtype=torch.float64):
    """scale·up·down of one kohya module, computed here from the raw tensors."""
    up, down = lora[f"{name}.lora_up.weight"].to(dtype), lora[f"{name}.lora_down.weight"].to(dtype)
    rank = down.shape[0]
    scale = float(lora[f"{name}.alpha"]) / rank if f"{name}.alpha" in lora else 1.0
    return (scale * (up.flatten(1) @ down.flatten(1))).reshape(shape)


def test_svd_merge_is_exact_at_full_rank_and_optimal_below(fmt, base):
    model, clip, _ = base
    keys = fmt.convert.KeySpace(model, clip)
    loras = [(make_lora(fmt, model, clip, rank=4, alpha=2.0, seed=20), 0.5),
             (make_lora(fmt, model, clip, rank=8, seed=21), 1.5)]
    names = keys.names("kohya")
    full, _ = fmt.merge.merge_loras(loras, keys, method="svd", rank=12)
    low, reports = fmt.merge.merge_loras(loras, keys, method="svd", rank=3)
    assert {r.new_rank for r in reports} == {3}
    for target in TARGETS:
        shape = keys.weight(target).shape
        want = sum(w * _delta(sd, names[target], shape) for sd, w in loras)
        torch.testing.assert_close(_delta(full, names[target], shape), want, rtol=1e-5, atol=1e-7)
        s = torch.linalg.svdvals(want.flatten(1))
        error = torch.linalg.norm((_delta(low, names[target], shape) - want).flatten())
        torch.testing.assert_close(error, torch.sqrt((s[3:] ** 2).sum()), rtol=1e-4, atol=1e-8)  # Eckart-Young


def _reference_merge(method, tasks, weights, density, seed):
    """TIES / DARE written out from the papers (Yadav et al. 2023, Yu et al. 2023), for comparison."""
    if method == "ties":
        trimmed = []
        for t in tasks:
            k = int(density * t.numel())
            keep = torch.zeros(t.numel(), dtype=torch.bool)
            keep[t.abs().flatten().argsort(descending=True)[:k]] = True
            trimmed.append(t * keep.reshape(t.shape))
        tasks = trimmed
    else:
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        tasks = [t * torch.bernoulli(torch.full_like(t, density)) / density for t in tasks]
        torch.random.set_rng_state(generator_state)
    if method == "dare_linear":
        return sum(w * t for w, t in zip(weights, tasks))
    elected = torch.where(sum(tasks) >= 0, 1.0, -1.0)
    agree = [torch.sign(t) == elected for t in tasks]
    total = sum(w * t * a for w, t, a in zip(weights, tasks, agree))
    count = sum(a.float() for a in agree).clamp(min=1.0)
    return total / count


@pytest.mark.parametrize("method", ["ties", "dare_linear", "dare_ties"])
def test_ties_and_dare_match_reference(comfy_runtime, fmt, base, method):
    """rank 0 keeps the merged full delta: it equals the reference computation on the same deltas and seed;
    at a rank the file loads in stock LoraLoader with no unloaded key."""
    model, clip, _ = base
    keys = fmt.convert.KeySpace(model, clip)
    targets = UNET_TARGETS[:3] + UNET_TARGETS[5:6] + CLIP_TARGETS[:1]  # linear, cross-attn, 3x3 conv, text encoder
    loras = [(make_lora(fmt, model, clip, rank=4, alpha=4.0, seed=30, targets=targets), 1.0),
             (make_lora(fmt, model, clip, rank=6, seed=31, targets=targets[1:]), 0.6),
             (make_lora(fmt, model, clip, rank=2, alpha=1.0, seed=32, targets=targets), -0.3)]
    weights = [w for _, w in loras]
    names = keys.names("kohya")
    merged, _ = fmt.merge.merge_loras(loras, keys, method=method, rank=0, density=0.4, seed=7)
    for target in targets:
        shape = keys.weight(target).shape
        # Same fp32 deltas as the inputs of the merge (TIES' top-k boundary is sensitive to rounding).
        tasks = [_delta(sd, names[target], shape, torch.float32) if f"{names[target]}.lora_up.weight" in sd
                 else torch.zeros(shape) for sd, _ in loras]
        want = _reference_merge(method, tasks, weights, 0.4, fmt.merge.layer_seed(7, target))
        torch.testing.assert_close(merged[f"{names[target]}.diff"], want, rtol=1e-5, atol=1e-7)
    again, _ = fmt.merge.merge_loras(loras, keys, method=method, rank=0, density=0.4, seed=7)
    assert all(torch.equal(again[k], merged[k]) for k in merged)
    low, reports = fmt.merge.merge_loras(loras, keys, method=method, rank=8, density=0.4, seed=7, layout="comfyui")
    assert len(reports) == len(targets) and all(0 < r.kept_energy <= 1 for r in reports)
    stock_load(comfy_runtime, model, clip, save_lora(comfy_runtime, fmt, low))


def test_merge_refuses_bad_inputs(fmt, base):
    model, clip, _ = base
    keys = fmt.convert.KeySpace(model, clip)
    sd1 = make_lora(fmt, model, clip, rank=2, seed=40)
    sdxl_tagged = make_lora(fmt, model, clip, rank=2, seed=41, base="sdxl_base_v1-0")
    with pytest.raises(ValueError, match="`loras` mixes base architectures"):
        fmt.merge.merge_loras([(sd1, 1.0), (sdxl_tagged, 1.0)], keys, method="concat")
    sdxl_keys = {"lora_unet_input_blocks_7_1_transformer_blocks_0_attn1_to_q.lora_up.weight": torch.zeros(640, 2),
                 "lora_unet_input_blocks_7_1_transformer_blocks_0_attn1_to_q.lora_down.weight": torch.zeros(2, 640)}
    with pytest.raises(ValueError, match="`loras #2` does not fit this model"):
        fmt.merge.merge_loras([(sd1, 1.0), (sdxl_keys, 1.0)], keys, method="svd", rank=4)
    with pytest.raises(ValueError, match="`rank`=5000 is above the size of every layer"):
        fmt.merge.merge_loras([(sd1, 1.0)], keys, method="svd", rank=5000)
    with pytest.raises(ValueError, match="`density`"):
        fmt.merge.merge_loras([(sd1, 1.0)], keys, method="ties", density=0.0)


def test_bake_saves_a_checkpoint_stock_loader_reads(comfy_runtime, fmt, base):
    """The checkpoint (ComfyUI's saver, never overwriting) holds base + LoRA weights; the inputs are unchanged."""
    model, clip, vae = base
    lora = make_lora(fmt, model, clip, rank=4, alpha=4.0, seed=50)
    name = save_lora(comfy_runtime, fmt, lora)
    before = all_patched(model, clip, TARGETS)
    folder = comfy_runtime.folder("checkpoints") / "baked"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "bake_test.safetensors").write_bytes(b"taken")
    with torch.inference_mode():
        path, _, _ = fmt.merge.bake_loras(model, clip, vae, [(lora, 0.8)], folder, "bake_test")
    assert path.name == "bake_test_00001.safetensors" and (folder / "bake_test.safetensors").read_bytes() == b"taken"
    with torch.inference_mode():
        b_model, b_clip, _, _ = comfy.sd.load_checkpoint_guess_config(str(path), output_vae=True, output_clip=True)
    want = all_patched(*stock_load(comfy_runtime, model, clip, name, 0.8), TARGETS)
    assert_close(want, all_patched(b_model, b_clip, TARGETS), rtol=2e-3)  # stored in the model's own dtype
    assert_close(before, all_patched(model, clip, TARGETS), rtol=1e-7)
    assert type(b_model.model.model_config).__name__ == "SD15"
    path.unlink()


def test_bake_applies_plain_peft_attention_names(comfy_runtime, fmt, base):
    """Modern peft names (`attn1.to_out.0.lora_A`) are read by our converter but not by the stock loader's key map:
    the bake still applies them (it used to pass the check and then save the checkpoint without them)."""
    model, clip, vae = base
    target = UNET_TARGETS[2]  # attn1.to_out.0
    gen = torch.Generator().manual_seed(7)
    name = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0"
    down, up = torch.randn(2, 320, generator=gen), torch.randn(320, 2, generator=gen) * 0.05
    folder = comfy_runtime.folder("checkpoints") / "baked_peft"
    folder.mkdir(parents=True, exist_ok=True)
    base_weight = all_patched(model, clip, [target])[target]  # the input's weight, whatever clone is loaded
    with torch.inference_mode():
        path, _, _ = fmt.merge.bake_loras(model, clip, vae, [({f"{name}.lora_A.weight": down,
                                                              f"{name}.lora_B.weight": up}, 0.5)], folder, "peft")
        baked, _, _, _ = comfy.sd.load_checkpoint_guess_config(str(path), output_vae=True, output_clip=True)
    want = base_weight + 0.5 * (up @ down)
    got = baked.model.state_dict()[target].float()
    assert float((got - base_weight).abs().max()) > 0.01
    assert_close({target: want}, {target: got}, rtol=2e-3)
    path.unlink()


def test_bake_node_refuses_a_lora_of_another_model(comfy_runtime, tiny_checkpoint):
    """The node checks every LoRA before anything is written."""
    from harness import PromptExecutionError
    folder = comfy_runtime.folder("checkpoints") / "baked_refused"
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": tiny_checkpoint}},
        "2": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "3": {"class_type": "PersonalizeBakeLoRAs", "inputs": {"model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2],
                                                               "loras": ["4", 0], "name": "baked_refused/x"}},
        "4": {"class_type": "PersonalizeLoRAList", "inputs": {"lora": ["5", 0], "weight": 1.0}},
        "5": {"class_type": "PersonalizeMergeLoRAs", "inputs": {
            "model": ["1", 0], "loras": ["6", 0], "method": "concat", "rank": 4, "density": 0.5,
            "majority_sign": "total", "seed": 0, "layout": "kohya"}},
        "6": {"class_type": "PersonalizeLoRAList", "inputs": {"lora": ["7", 0], "weight": 1.0}},
        "7": {"class_type": "PersonalizeLoadLoRAFile", "inputs": {"lora_name": "sdxl_only.safetensors"}},
    }
    sdxl = {"lora_unet_input_blocks_7_1_transformer_blocks_0_attn1_to_q.lora_up.weight": torch.zeros(640, 2),
            "lora_unet_input_blocks_7_1_transformer_blocks_0_attn1_to_q.lora_down.weight": torch.zeros(2, 640)}
    from safetensors.torch import save_file
    save_file(sdxl, str(comfy_runtime.folder("loras") / "sdxl_only.safetensors"))
    with pytest.raises(PromptExecutionError, match="`loras #1` does not fit this model"):
        comfy_runtime.run_prompt(prompt)
    assert not list(folder.glob("*"))
