"""ControlNet training and training under control, on the real runtime: zero-convolution start, stock
ControlNetLoader + ControlNetApplyAdvanced reproduce the trained ControlNet, exact resume, conditions cropped
like their targets, a LoRA trained under a ControlNet works without it, and every bad input is named."""
import shutil

import pytest
import torch
from PIL import Image
from training import cancel_then_resume


@pytest.fixture(scope="module")
def cn(comfy_runtime):
    class CN:
        method = comfy_runtime.pack_import("trainers.methods.controlnet")
        formats = comfy_runtime.pack_import("trainers.formats.controlnet")
        pairs = comfy_runtime.pack_import("trainers.data.pairs")
    return CN


def _build(pack, base, folder, **spec):
    _, clip, vae = base
    with torch.inference_mode():
        spec = pack.build.DatasetSpec(folder=str(folder), resolution=64, buckets=False, use_cache=False, **spec)
        return pack.build.build_training_data(spec, vae, clip)[0]


@pytest.fixture(scope="module")
def data(pack, base, cn, tmp_path_factory):
    from harness import make_sample_dataset
    folder = tmp_path_factory.mktemp("cn-data")
    make_sample_dataset(folder, n=4, size=64, seed=3, subject="sks")
    return _build(pack, base, folder, condition=cn.pairs.ConditionSpec(source="silhouette"))


def _train(pack, base, data, tmp_path, method="controlnet", steps=4, resume=None, reporter=None, options=None,
           control=None, lr=1e-3):
    model, clip, _ = base
    options = options or {}
    job = pack.job.TrainJob(method=method, steps=steps, batch_size=2, learning_rate=lr, seed=1, method_options=options)
    trained = pack.methods.create_method(method, options)
    run = control.wrap(trained, data) if control is not None else trained
    with torch.inference_mode():
        result = pack.loop.train(job, run, model, clip, data, checkpoint_dir=tmp_path, resume_from=resume, reporter=reporter)
    return result, trained


def _inputs(model, data, clip):
    """(noisy latent, sigma, positive CONDITIONING) of the first sample, fixed noise."""
    latent = data.samples[0].latent[None]
    with torch.inference_mode():
        cond = clip.encode_from_tokens_scheduled(clip.tokenize(data.samples[0].caption))
    x = model.model.process_latent_in(latent) + 3.0 * torch.randn(latent.shape, generator=torch.Generator().manual_seed(0))
    return x, torch.tensor([3.0]), cond


def _stock_denoise(model, positive, x, sigma):
    """The samplers' own path: convert_cond, encode_model_conds, pre_run_control, calc_cond_batch."""
    import comfy.model_management
    import comfy.sampler_helpers
    import comfy.samplers
    with torch.inference_mode():
        comfy.model_management.load_models_gpu([model])
        model.pre_run()
        conds = comfy.samplers.encode_model_conds(model.model.extra_conds, comfy.sampler_helpers.convert_cond(positive),
                                                  x, x.device, "positive")
        comfy.samplers.pre_run_control(model.model, conds)
        return comfy.samplers.calc_cond_batch(model.model, [conds], x, sigma, model.model_options)[0]


def _apply(control_net, positive, hint):
    from nodes import ControlNetApplyAdvanced
    return ControlNetApplyAdvanced().apply_controlnet(positive, positive, control_net, hint, 1.0, 0.0, 1.0)[0]


def _hint(data):
    return data.samples[0].extras["condition"][0][None]


def test_fresh_controlnet_changes_nothing_and_training_does(pack, base, data, cn, tmp_path):
    """Zero convolutions: at step 0 the denoiser output is bit-identical; after training it is not. The base
    weights stay untouched and the ControlNet's encoder is a new module."""
    model, clip, _ = base
    before = {k: v.clone() for k, v in model.model.state_dict().items()}
    x, sigma, positive = _inputs(model, data, clip)
    fresh = cn.method.ControlNetMethod()
    with torch.inference_mode(False), torch.no_grad():
        attached = fresh.attach(model, clip, torch.Generator().manual_seed(0))
    assert all(p.data_ptr() != q.data_ptr() for p in fresh.control_model.parameters() for q in model.model.parameters())
    plain = _stock_denoise(model, positive, x, sigma)
    with_fresh = _stock_denoise(attached.model, _apply(fresh.export(), positive, _hint(data)), x, sigma)
    assert torch.equal(plain, with_fresh)

    result, trained = _train(pack, base, data, tmp_path, steps=6)
    with_trained = _stock_denoise(model, _apply(trained.export(), positive, _hint(data)), x, sigma)
    assert (with_trained - plain).abs().max() > 1e-4
    assert torch.equal(_stock_denoise(model, positive, x, sigma), plain), "the input MODEL changed"
    after = model.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "base weights changed"
    assert result.summary["trainable_params"] == sum(p.numel() for p in trained.control_model.parameters())


def test_saved_file_loads_in_stock_loader_and_matches_training(pack, base, data, cn, tmp_path, comfy_runtime):
    """The LDM file: stock ControlNetLoader + ControlNetApplyAdvanced give the trained ControlNet's output (fp32 file:
    equal to the in-memory one; fp16: close), and the training denoiser computed the same thing."""
    from safetensors import safe_open

    from nodes import ControlNetLoader
    model, clip, _ = base
    result, trained = _train(pack, base, data, tmp_path, steps=3)
    folder = comfy_runtime.folder("controlnet")
    path32 = cn.formats.save_controlnet(trained.control_model, folder / "tests", "cn32", dtype=torch.float32)
    path16 = cn.formats.save_controlnet(trained.control_model, folder / "tests", "cn16")
    again = cn.formats.save_controlnet(trained.control_model, folder / "tests", "cn32", dtype=torch.float32)
    assert again != path32 and path32.exists() and path16.stat().st_size < path32.stat().st_size, "a file was overwritten"
    with safe_open(str(path32), "pt") as f:
        keys = set(f.keys())
    assert "control_model.zero_convs.0.0.weight" in keys and "control_model.middle_block_out.0.weight" in keys
    assert "control_model.input_hint_block.0.weight" in keys and all(k.startswith("control_model.") for k in keys)

    x, sigma, positive = _inputs(model, data, clip)
    in_memory = _stock_denoise(model, _apply(trained.export(), positive, _hint(data)), x, sigma)
    stock32 = ControlNetLoader().load_controlnet("tests/cn32.safetensors")[0]
    stock16 = ControlNetLoader().load_controlnet("tests/cn16.safetensors")[0]
    torch.testing.assert_close(_stock_denoise(model, _apply(stock32, positive, _hint(data)), x, sigma), in_memory,
                               rtol=0, atol=1e-6)
    torch.testing.assert_close(_stock_denoise(model, _apply(stock16, positive, _hint(data)), x, sigma), in_memory,
                               rtol=1e-2, atol=2e-3)
    runtime = pack.model_runtime
    model_conds = runtime.encode_sample_conds(result.attached.model, positive, x, x.device)
    with torch.inference_mode():
        training = runtime.Denoiser(result.attached.model)(x, sigma, model_conds,
                                                           trained.batch_extra([data.samples[0]], [0], None))
    torch.testing.assert_close(training, in_memory, rtol=1e-4, atol=1e-4)


def test_conditions_are_cropped_and_flipped_like_their_targets(pack, base, cn, tmp_path):
    """Condition = a copy of the target: after random crops and flips, each variant's condition equals its pixels."""
    from harness import make_sample_dataset
    targets, conditions = tmp_path / "t", tmp_path / "c"
    make_sample_dataset(targets, n=2, size=64, seed=5, subject="sks")
    conditions.mkdir()
    for png in targets.glob("*.png"):
        Image.open(png).resize((96, 64)).save(png)
        shutil.copy(png, conditions / png.name)
    data = _build(pack, base, targets, crop="random", crop_variants=2, flip=True, keep_pixels=True,
                  condition=cn.pairs.ConditionSpec(folder=str(conditions)))
    sample = data.samples[0]
    assert len(sample.extras["condition"]) == len(sample.extras["pixels"]) == 4
    for condition, pixels in zip(sample.extras["condition"], sample.extras["pixels"]):
        assert torch.equal(condition, pixels)
    assert not torch.equal(sample.extras["pixels"][0], sample.extras["pixels"][1])


def test_resume_is_exact(pack, base, data, tmp_path):
    (_, whole), (_, resumed) = cancel_then_resume(
        pack.progress, lambda folder, **kw: _train(pack, base, data, folder, **kw), tmp_path, total=4)
    a, b = whole.trainable_state_dict(), resumed.trainable_state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def _active_controlnet(cn, model):
    """A ControlNet whose zero convolutions are not zero, so that it changes the output."""
    import comfy.controlnet
    with torch.inference_mode(False), torch.no_grad():
        module = cn.formats.build_controlnet(model, torch.Generator().manual_seed(7))
        for name, p in module.named_parameters():
            if name.startswith(("zero_convs.", "middle_block_out.")):
                p.normal_(0.0, 0.05, generator=torch.Generator().manual_seed(len(name)))
        module.requires_grad_(False)
    return comfy.controlnet.ControlNet(module, load_device=model.load_device)


def test_lora_under_control_trains_with_it_and_works_without_it(pack, base, data, cn, tmp_path):
    import comfy.sd
    model, clip, _ = base
    control = cn.method.TrainingControl(_active_controlnet(cn, model), strength=1.0)
    lora = {"rank": 4, "alpha": 4.0}
    controlled, lora_c = _train(pack, base, data, tmp_path / "c", method="lora", steps=3, options=lora, control=control)
    plain, lora_plain = _train(pack, base, data, tmp_path / "p", method="lora", steps=3, options=lora)
    assert controlled.loss_history != plain.loss_history
    exported = lora_c.export()
    assert exported.keys() == lora_plain.export().keys()
    assert any(not torch.equal(exported[k], lora_plain.export()[k]) for k in exported), "the control had no effect"
    x, sigma, positive = _inputs(model, data, clip)
    with torch.inference_mode():
        patched, _ = comfy.sd.load_lora_for_models(model, clip, exported, 1.0, 1.0)
    assert (_stock_denoise(patched, positive, x, sigma) - _stock_denoise(model, positive, x, sigma)).abs().max() > 1e-5


def test_bad_inputs_are_named(pack, base, cn, tmp_path):
    import comfy.cldm.cldm
    import comfy.controlnet
    from harness import make_sample_dataset
    model, _, _ = base
    targets, conditions = tmp_path / "t", tmp_path / "c"
    make_sample_dataset(targets, n=3, size=64, seed=6, subject="sks")
    conditions.mkdir()
    pngs = sorted(targets.glob("*.png"))
    for png in pngs[:2]:
        shutil.copy(png, conditions / png.name)
    spec = cn.pairs.ConditionSpec(folder=str(conditions))
    with pytest.raises(ValueError, match=rf"`condition_folder`.*no condition image for 1 of 3 targets: {pngs[2].name}"):
        _build(pack, base, targets, condition=spec)
    Image.new("RGB", (32, 64)).save(conditions / pngs[2].name)
    with pytest.raises(ValueError, match=r"`condition_folder`: condition and target sizes differ .*32x64"):
        _build(pack, base, targets, condition=spec)
    Image.new("RGB", (64, 64)).save(conditions / pngs[2].name)
    Image.new("RGB", (64, 64)).save(conditions / "extra.png")
    with pytest.raises(ValueError, match=r"`condition_folder` has 1 condition image\(s\) without a target.*extra"):
        _build(pack, base, targets, condition=spec)
    with pytest.raises(ValueError, match="`condition_folder` is empty"):
        cn.pairs.ConditionSpec(source="folder")
    with pytest.raises(ValueError, match="`condition`"):
        cn.pairs.ConditionSpec(source="depth")

    config = cn.formats.controlnet_config(model)
    config["context_dim"] = 1024  # an SD2-style ControlNet
    with torch.inference_mode(False):
        other = comfy.controlnet.ControlNet(comfy.cldm.cldm.ControlNet(**config))
    control = cn.method.TrainingControl(other)
    data = _build(pack, base, targets, condition=cn.pairs.ConditionSpec(source="canny"))
    with pytest.raises(ValueError, match=r"`control` was trained for another model family .*context_dim 1024 \(model: 768\)"):
        _train(pack, base, data, tmp_path / "x", method="lora", steps=1, options={"rank": 2}, control=control)
    plain = _build(pack, base, targets)
    with pytest.raises(ValueError, match="`control` has no `image` and the `dataset` has no condition images"):
        control.wrap(pack.methods.create_method("lora", {}), plain)
    with pytest.raises(ValueError, match="`image` holds 2 images"):
        cn.method.TrainingControl(other, image=torch.zeros(2, 64, 64, 3))
    with pytest.raises(ValueError, match="`dataset` has no condition image"):
        _train(pack, base, plain, tmp_path / "y", steps=1)


def test_condition_makers(cn):
    image = torch.full((1, 32, 32, 3), 0.9)
    image[:, 8:24, 10:20] = torch.tensor([0.5, 0.1, 0.7])
    mask = cn.pairs.make_condition(image, "silhouette")
    assert mask.shape == image.shape and mask[0, 16, 15, 0] == 1 and mask[0, 2, 2, 0] == 0
    assert mask[..., 0].sum() == 16 * 10
    for maker in ("canny", "edges"):
        edges = cn.pairs.make_condition(image, maker)
        assert edges.shape == image.shape and edges[0, 16, 15].max() < 0.01 and edges.max() > 0.5


_COMMON = {"batch_size": 2, "grad_accumulation": 1, "optimizer": "adamw", "lr_scheduler": "constant", "warmup_steps": 0,
           "loss_type": "mse", "min_snr_gamma": 0.0, "noise_offset": 0.0, "max_grad_norm": 1.0, "precision": "fp32",
           "gradient_checkpointing": False, "seed": 0, "checkpoint_every": 0, "resume": ""}


def test_nodes_train_save_and_stock_nodes_in_graphs(comfy_runtime, tiny_checkpoint, tmp_path):
    """Pairs dataset -> Train ControlNet -> Save; the same ControlNet as a LoRA node's training control; then
    stock ControlNetLoader + ControlNetApplyAdvanced + KSampler with a hint from Personalize Condition Image."""
    from harness import make_sample_dataset, txt2img_graph
    folder = tmp_path / "data"
    make_sample_dataset(folder, n=2, size=64, seed=4, subject="sks")
    graph = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": tiny_checkpoint}},
        "2": {"class_type": "PersonalizeControlNetDataset", "inputs": {
            "folder": str(folder), "condition": "silhouette", "condition_folder": "", "vae": ["1", 2], "clip": ["1", 1],
            "resolution": 64, "buckets": False, "crop": "center", "crop_variants": 1, "flip": True, "instance_prompt": "",
            "caption_dropout": 0.5, "low_threshold": 0.4, "high_threshold": 0.8, "silhouette_threshold": 0.15, "seed": 0,
            "use_cache": False}},
        "3": {"class_type": "PersonalizeTrainControlNet", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "dataset": ["2", 0], "steps": 2, "learning_rate": 1e-4,
            "run_name": "cn", **_COMMON}},
        "4": {"class_type": "PersonalizeSaveControlNet", "inputs": {"control_net": ["3", 0], "name": "tests/graph_cn",
                                                                    "precision": "fp16"}},
        "5": {"class_type": "PersonalizeTrainingControl", "inputs": {"control_net": ["3", 0], "strength": 1.0,
                                                                     "start_percent": 0.0, "end_percent": 1.0}},
        "6": {"class_type": "PersonalizeTrainLoRA", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "dataset": ["2", 0], "steps": 1, "learning_rate": 1e-4, "rank": 2,
            "alpha": 2.0, "targets": "attention", "train_text_encoder": False, "text_encoder_lr": 0.0, "dora": False,
            "initial_lora": "[none]", "run_name": "lora_cn", "control": ["5", 0], **_COMMON}},
        "7": {"class_type": "PreviewAny", "inputs": {"source": ["6", 4]}},
    }
    result = comfy_runtime.run_prompt(graph)
    saved = result["outputs"]["4"]["text"][0].removeprefix("saved ")
    assert (comfy_runtime.folder("controlnet") / saved).is_file()
    stock = txt2img_graph(tiny_checkpoint, steps=2, prefix="cn_stock")
    stock.update({
        "8": {"class_type": "ControlNetLoader", "inputs": {"control_net_name": saved}},
        "9": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 0xFFFFFF}},
        "10": {"class_type": "PersonalizeConditionImage", "inputs": {
            "image": ["9", 0], "condition": "silhouette", "low_threshold": 0.4, "high_threshold": 0.8,
            "silhouette_threshold": 0.15}},
        "11": {"class_type": "ControlNetApplyAdvanced", "inputs": {
            "positive": ["2", 0], "negative": ["3", 0], "control_net": ["8", 0], "image": ["10", 0], "strength": 1.0,
            "start_percent": 0.0, "end_percent": 1.0}},
    })
    stock["5"]["inputs"].update(positive=["11", 0], negative=["11", 1])
    mark = comfy_runtime.log_mark()
    assert comfy_runtime.image_paths(comfy_runtime.run_prompt(stock))
    assert "missing controlnet keys" not in comfy_runtime.log_since(mark)
