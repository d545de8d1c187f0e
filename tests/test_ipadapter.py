"""IP-Adapter: official-layout files (detect, round trip, refuse foreign/unsafe), decoupled cross-attention on a
MODEL clone (zero K/V = no change, weight 0 = no change, siblings untouched), base-model and CLIP-Vision checks,
training on the one engine (exact resume, saved file reloads and computes what training ended with), and one graph
with our LoRA and a stock ControlNet."""
import json
import pickle

import pytest
import torch


@pytest.fixture(scope="module")
def ipa(comfy_runtime):
    class Modules:
        adapter = comfy_runtime.pack_import("trainers.ipadapter.adapter")
        patch = comfy_runtime.pack_import("trainers.ipadapter.patch")
        apply = comfy_runtime.pack_import("trainers.ipadapter.apply")
        fmt = comfy_runtime.pack_import("trainers.formats.ipadapter")
        method = comfy_runtime.pack_import("trainers.methods.ip_adapter")
        nodes = comfy_runtime.pack_import("nodes.ipadapter")
    return Modules


def tiny_clip_vision(tmp_path, hidden=32, projection=24, seed=0):
    """A small comfy.clip_vision.ClipVisionModel from a config made here, with seeded random weights."""
    import comfy.clip_vision
    config = {"attention_dropout": 0.0, "dropout": 0.0, "hidden_act": "quick_gelu", "hidden_size": hidden,
              "image_size": 56, "initializer_factor": 1.0, "initializer_range": 0.02, "intermediate_size": hidden * 2,
              "layer_norm_eps": 1e-5, "model_type": "clip_vision_model", "num_attention_heads": 2, "num_channels": 3,
              "num_hidden_layers": 3, "patch_size": 14, "projection_dim": projection, "torch_dtype": "float32"}
    path = tmp_path / f"clip_vision_{hidden}_{projection}.json"
    path.write_text(json.dumps(config))
    clip_vision = comfy.clip_vision.ClipVisionModel(str(path))
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, value in clip_vision.get_sd().items():
        if "norm" in key or "layrnorm" in key:
            state[key] = torch.ones_like(value) if key.endswith("weight") else torch.zeros_like(value)
        else:
            state[key] = torch.randn(value.shape, generator=generator, dtype=torch.float32).to(value.dtype) * 0.1
    clip_vision.load_sd(state)
    return clip_vision


@pytest.fixture(scope="module")
def clip_vision(tmp_path_factory):
    return tiny_clip_vision(tmp_path_factory.mktemp("clipvision"))


def sd_adapter(ipa, model, variant="base", embed_dim=24, seed=0, tokens=None):
    """A random adapter shaped for `model`'s cross-attentions (non-zero K/V)."""
    sites = ipa.patch.cross_attention_sites(model.model.diffusion_model)
    inner = tuple(s.attn.to_k.out_features for s in sites)
    cross = sites[0].attn.to_k.in_features
    if variant == "base":
        spec = ipa.adapter.AdapterSpec("base", embed_dim, cross, tokens or 4, inner)
    else:
        spec = ipa.adapter.AdapterSpec("plus", embed_dim, cross, tokens or 16, inner, resampler_dim=128, depth=2, heads=2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        adapter = ipa.adapter.IPAdapterModel(spec)
        with torch.no_grad():
            for p in adapter.parameters():
                p.normal_(0.0, 0.2)
    return adapter


def denoise(model, clip, seed=0, latent_size=8):
    """x0 prediction of one latent through calc_cond_batch with CFG-style cond + uncond chunks."""
    import comfy.model_management
    import comfy.sampler_helpers
    import comfy.samplers
    latent = torch.zeros(1, 4, latent_size, latent_size)
    with torch.inference_mode():
        conds = []
        for text in ("a sks cross", ""):
            c = clip.encode_from_tokens_scheduled(clip.tokenize(text))
            conds.append(comfy.samplers.encode_model_conds(model.model.extra_conds, comfy.sampler_helpers.convert_cond(c),
                                                           latent, latent.device, "positive"))
        comfy.model_management.load_models_gpu([model])
        model.model_patches_to(model.load_device)
        model.pre_run()
        x = torch.randn(latent.shape, generator=torch.Generator().manual_seed(seed)) * 2.0
        out = comfy.samplers.calc_cond_batch(model.model, conds, x, torch.tensor([2.0]), model.model_options)
        return torch.cat(out)


def test_detects_variants_and_round_trips_official_layout(ipa, base, tmp_path):
    """Base and plus adapters save as flat `image_proj.*` / `ip_adapter.N.to_k_ip` keys and reload exactly."""
    model = base[0]
    for variant in ("base", "plus"):
        adapter = sd_adapter(ipa, model, variant)
        state = adapter.state_dict()
        assert any(k.startswith("ip_adapter.1.to_k_ip") for k in state) and any(k.startswith("image_proj.") for k in state)
        numbers = sorted({int(k.split(".")[1]) for k in state if k.startswith("ip_adapter.")})
        assert numbers == list(range(1, 2 * len(numbers), 2))
        meta = ipa.fmt.ipadapter_metadata(adapter.spec, steps=3)
        path = ipa.fmt.save_ipadapter(tmp_path, f"ipa_{variant}", state, meta, dtype="fp32")
        loaded, metadata, spec = ipa.fmt.load_ipadapter_file(path)
        assert spec == adapter.spec
        assert metadata["ipadapter.variant"] == variant and metadata["steps"] == "3"
        assert all(torch.equal(loaded[k], state[k]) for k in state)
        again = ipa.fmt.save_ipadapter(tmp_path, f"ipa_{variant}", state, meta)
        assert again != path  # never overwritten


def test_original_bin_layout_loads_weights_only_and_pickles_are_refused(ipa, base, tmp_path):
    adapter = sd_adapter(ipa, base[0])
    state = adapter.state_dict()
    nested = {"image_proj": {k[len("image_proj."):]: v for k, v in state.items() if k.startswith("image_proj.")},
              "ip_adapter": {k[len("ip_adapter."):]: v for k, v in state.items() if k.startswith("ip_adapter.")}}
    torch.save(nested, tmp_path / "ip-adapter_sd15.bin")
    loaded, _, spec = ipa.fmt.load_ipadapter_file(tmp_path / "ip-adapter_sd15.bin")
    assert spec == adapter.spec and all(torch.equal(loaded[k], state[k]) for k in state)

    class Payload:
        def __reduce__(self):
            return (print, ("unpickled!",))
    with open(tmp_path / "evil.bin", "wb") as f:
        pickle.dump({"image_proj": Payload()}, f)
    with pytest.raises(ValueError, match=r"`ipadapter` evil.bin cannot be read safely"):
        ipa.fmt.load_ipadapter_file(tmp_path / "evil.bin")

    from safetensors.torch import save_file
    save_file({"lora_unet_down.lora_up.weight": torch.zeros(4, 4)}, str(tmp_path / "a_lora.safetensors"))
    with pytest.raises(ValueError, match=r"`ipadapter` a_lora.safetensors: this file is not an IP-Adapter"):
        ipa.fmt.load_ipadapter_file(tmp_path / "a_lora.safetensors")


def test_zero_kv_no_change_nonzero_changes_weight_zero_restores(ipa, base, clip_vision):
    model, clip, _ = base
    reference = denoise(model, clip)
    adapter = sd_adapter(ipa, model)
    image = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(3))
    features = ipa.apply.image_features(clip_vision, image, adapter)
    negative = ipa.apply.uncond_features(clip_vision, adapter)

    applied = ipa.apply.apply_ipadapter(model, adapter, features, negative, weight=1.0)
    changed = denoise(applied, clip)
    assert (changed - reference).abs().max() > 1e-3
    assert "patches_replace" not in model.model_options.get("transformer_options", {})  # the input MODEL is untouched
    assert torch.equal(denoise(model, clip), reference)

    weight_zero = ipa.apply.apply_ipadapter(model, adapter, features, negative, weight=0.0)
    assert torch.equal(denoise(weight_zero, clip), reference)

    zero_kv = sd_adapter(ipa, model)
    with torch.no_grad():
        for layer in zero_kv.layers():
            layer.to_k_ip.weight.zero_()
            layer.to_v_ip.weight.zero_()
    assert torch.allclose(denoise(ipa.apply.apply_ipadapter(model, zero_kv, features, negative), clip), reference, atol=1e-6)

    # Outside start/end the adapter does nothing (sigma 2.0 is early in sampling: percent ~0.1 or less).
    late = ipa.apply.apply_ipadapter(model, adapter, features, negative, start_percent=0.9, end_percent=1.0)
    assert torch.equal(denoise(late, clip), reference)


def test_plus_variant_several_images_and_negative(ipa, base, clip_vision):
    model, clip, _ = base
    adapter = sd_adapter(ipa, model, "plus", embed_dim=32)
    images = torch.rand(2, 64, 64, 3, generator=torch.Generator().manual_seed(4))
    features = ipa.apply.image_features(clip_vision, images, adapter)
    assert features.shape[0] == 2 and features.ndim == 3
    negative = ipa.apply.uncond_features(clip_vision, adapter)
    averaged = denoise(ipa.apply.apply_ipadapter(model, adapter, features, negative, combine="average"), clip)
    concat = denoise(ipa.apply.apply_ipadapter(model, adapter, features, negative, combine="concat"), clip)
    own_negative = ipa.apply.image_features(clip_vision, images[:1], adapter)
    steered = denoise(ipa.apply.apply_ipadapter(model, adapter, features, own_negative, combine="average"), clip)
    assert not torch.allclose(averaged, concat) and not torch.allclose(averaged[1], steered[1])
    assert torch.allclose(averaged[0], steered[0])  # the negative image only changes the unconditional side


def test_mismatches_get_clear_errors(ipa, base, clip_vision):
    model = base[0]
    adapter = sd_adapter(ipa, model, embed_dim=1024)  # expects a ViT-H pooled embedding
    with pytest.raises(ValueError, match=r"`clip_vision` gives image_embeds of width 24 but `ipadapter` \(base\) expects 1024"):
        ipa.apply.image_features(clip_vision, torch.rand(1, 64, 64, 3), adapter)

    # An SD1.x adapter on an SDXL-shaped UNet (context width 2048), and an SDXL adapter on our SD1.5 model.
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    import comfy.ops
    sdxl_like = UNetModel(image_size=32, in_channels=4, model_channels=64, out_channels=4, num_res_blocks=1,
                          channel_mult=(1, 2), num_head_channels=64, transformer_depth=[0, 2], transformer_depth_output=[0, 0, 2, 2],
                          context_dim=2048, use_linear_in_transformer=True, use_spatial_transformer=True, transformer_depth_middle=2,
                          operations=comfy.ops.disable_weight_init, device="meta")
    sd1 = sd_adapter(ipa, model)
    with pytest.raises(ValueError, match=r"`ipadapter` was made for SD1.x .* but `model` is SDXL"):
        ipa.patch.check_compatible(sd1, ipa.patch.cross_attention_sites(sdxl_like))
    sites = ipa.patch.cross_attention_sites(sdxl_like)
    sdxl_adapter = ipa.adapter.IPAdapterModel(ipa.adapter.AdapterSpec(
        "base", 1280, 2048, 4, tuple(s.attn.to_k.out_features for s in sites)))
    with pytest.raises(ValueError, match=r"`ipadapter` was made for SDXL .* but `model` is SD1.x"):
        ipa.apply.apply_ipadapter(model, sdxl_adapter, torch.zeros(1, 1280), torch.zeros(1, 1280))


@pytest.fixture(scope="module")
def pixel_data(pack, base, tmp_path_factory):
    from harness import make_sample_dataset
    folder = tmp_path_factory.mktemp("ipa-data")
    make_sample_dataset(folder, n=4, size=64, seed=5, subject="sks")
    _, clip, vae = base
    with torch.inference_mode():
        spec = pack.build.DatasetSpec(folder=str(folder), resolution=64, buckets=False, use_cache=False, flip=True,
                                      keep_pixels=True)
        return pack.build.build_training_data(spec, vae, clip)[0]


def _train(pack, ipa, base, data, clip_vision, tmp_path, steps=4, resume=None, variant="base", checkpoint_every=0,
           **options):
    model, clip, _ = base
    options = {"variant": variant, "text_drop": 0.25, "image_drop": 0.25, "both_drop": 0.25, **options}
    if variant == "plus":
        options.setdefault("resampler_depth", 1)
    with torch.inference_mode():
        uncond = ipa.nodes.prepare_features(data, clip_vision, variant, True)
    job = pack.job.TrainJob(method="ip_adapter", steps=steps, batch_size=2, learning_rate=1e-3, seed=3,
                            method_options=options, checkpoint_every=checkpoint_every)
    method = pack.methods.create_method("ip_adapter", {**options, "uncond_features": uncond})
    with torch.inference_mode():
        result = pack.loop.train(job, method, model, clip, data, checkpoint_dir=tmp_path, resume_from=resume)
    return result, method


def test_trained_adapter_saves_reloads_and_computes_the_same(pack, ipa, base, pixel_data, clip_vision, tmp_path):
    model, clip, _ = base
    before = {k: v.clone() for k, v in model.model.diffusion_model.state_dict().items()}
    reference = denoise(model, clip)
    image = pixel_data.samples[0].extras["pixels"][0][None]

    result, method = _train(pack, ipa, base, pixel_data, clip_vision, tmp_path / "run", steps=4)
    assert len(result.loss_history) == 4 and all(torch.isfinite(torch.tensor(result.loss_history)))
    state = method.export()
    assert set(state) == set(ipa.adapter.IPAdapterModel(method.adapter.spec).state_dict())
    assert all(torch.equal(before[k], v) for k, v in model.model.diffusion_model.state_dict().items())  # base frozen

    path = ipa.fmt.save_ipadapter(tmp_path, "trained", state, ipa.fmt.ipadapter_metadata(method.adapter.spec), dtype="fp32")
    loaded = ipa.adapter.IPAdapterModel.from_state_dict(ipa.fmt.load_ipadapter_file(path)[0])
    features = ipa.apply.image_features(clip_vision, image, loaded)
    negative = ipa.apply.uncond_features(clip_vision, loaded)
    from_file = denoise(ipa.apply.apply_ipadapter(model, loaded, features, negative), clip)
    in_memory = denoise(ipa.apply.apply_ipadapter(model, method.adapter, features, negative), clip)
    assert torch.equal(from_file, in_memory)
    assert (from_file - reference).abs().max() > 1e-4


def test_initial_adapter_changes_the_model_little(pack, ipa, base, pixel_data, clip_vision):
    """K/V start as the text K/V and the projection's output gain is small: the first step barely moves."""
    model, clip, _ = base
    with torch.inference_mode():
        uncond = ipa.nodes.prepare_features(pixel_data, clip_vision, "base", True)
    method = pack.methods.create_method("ip_adapter", {"uncond_features": uncond})
    with torch.inference_mode(False):
        method.attach(model, clip, torch.Generator().manual_seed(0))
    initial = ipa.adapter.IPAdapterModel.from_state_dict(method.export())
    site = ipa.patch.cross_attention_sites(model.model.diffusion_model)[0]
    assert torch.equal(initial.layers()[0].to_k_ip.weight, site.attn.to_k.weight.float())
    features = ipa.apply.image_features(clip_vision, torch.rand(1, 64, 64, 3), initial)
    reference = denoise(model, clip)
    small = (denoise(ipa.apply.apply_ipadapter(model, initial, features, uncond), clip) - reference).abs().mean()
    random = sd_adapter(ipa, model)
    large = (denoise(ipa.apply.apply_ipadapter(model, random, features, uncond), clip) - reference).abs().mean()
    assert small < 0.05 * large


def test_resume_is_exact_and_drops_change_the_loss(pack, ipa, base, pixel_data, clip_vision, tmp_path):
    full, full_method = _train(pack, ipa, base, pixel_data, clip_vision, tmp_path / "full", steps=4, checkpoint_every=2)
    resumed, resumed_method = _train(pack, ipa, base, pixel_data, clip_vision, tmp_path / "resumed", steps=4,
                                     resume=tmp_path / "full" / "step_0000002.pt")
    assert resumed.loss_history == full.loss_history
    a, b = full_method.export(), resumed_method.export()
    assert all(torch.equal(a[k], b[k]) for k in a)

    kept, _ = _train(pack, ipa, base, pixel_data, clip_vision, tmp_path / "k", steps=1, text_drop=0, image_drop=0, both_drop=0)
    no_text, _ = _train(pack, ipa, base, pixel_data, clip_vision, tmp_path / "t", steps=1, text_drop=1, image_drop=0, both_drop=0)
    no_image, _ = _train(pack, ipa, base, pixel_data, clip_vision, tmp_path / "i", steps=1, text_drop=0, image_drop=1, both_drop=0)
    losses = {kept.loss_history[0], no_text.loss_history[0], no_image.loss_history[0]}
    assert len(losses) == 3


def test_plus_variant_trains(pack, ipa, base, pixel_data, clip_vision, tmp_path):
    result, method = _train(pack, ipa, base, pixel_data, clip_vision, tmp_path, steps=2, variant="plus")
    spec = ipa.adapter.spec_from_state_dict(method.export())
    assert spec.variant == "plus" and spec.tokens == 16 and spec.embed_dim == 32 and spec.depth == 1
    assert all(torch.isfinite(torch.tensor(result.loss_history)))


def test_nodes_are_registered_with_tooltips_and_the_ipadapter_folder(ipa, comfy_runtime):
    import folder_paths
    assert "ipadapter" in folder_paths.folder_names_and_paths
    assert ".safetensors" in folder_paths.folder_names_and_paths["ipadapter"][1]
    for node in ipa.nodes.NODES:
        node.GET_SCHEMA()
        schema = node.define_schema()
        assert schema.node_id.startswith("Personalize") and schema.category.startswith("personalize/")
        assert all(i.tooltip for i in schema.inputs) and all(o.tooltip for o in schema.outputs), schema.node_id
        assert schema.node_id in comfy_runtime.pack_node_ids()
