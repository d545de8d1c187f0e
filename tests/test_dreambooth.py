"""DreamBooth on the tiny real-format SD1.5 model: a full fine-tune that never touches the input MODEL/CLIP,
saved through comfy.sd.save_checkpoint and reloaded by stock CheckpointLoaderSimple, with prior
preservation, EMA, exact resume, the memory options, clear errors, and memorization of one image."""
import json

import pytest
import torch

import comfy.sample
from training import cancel_then_resume, denoise_x0, tiny_sdxl


@pytest.fixture(scope="module")
def db(comfy_runtime):
    class DB:
        method = comfy_runtime.pack_import("trainers.methods.dreambooth")
        ckpt_file = comfy_runtime.pack_import("trainers.formats.checkpoint_file")
        node = comfy_runtime.pack_import("nodes.dreambooth")
    return DB


def _build(pack, base, folder, class_folder=None, class_prompt=""):
    _, clip, vae = base
    with torch.inference_mode():
        spec = pack.build.DatasetSpec(folder=str(folder), resolution=64, buckets=False, use_cache=False,
                                      class_folder=str(class_folder) if class_folder else None, class_prompt=class_prompt)
        return pack.build.build_training_data(spec, vae, clip)[0]


@pytest.fixture(scope="module")
def data(pack, base, tmp_path_factory):
    """Two 'sks cross' instance images and four class images of another subject (prior preservation)."""
    from harness import make_sample_dataset
    folder, class_folder = tmp_path_factory.mktemp("db-data"), tmp_path_factory.mktemp("db-class")
    make_sample_dataset(folder, n=2, size=64, seed=5, subject="sks")
    make_sample_dataset(class_folder, n=4, size=64, seed=6, subject="a")
    return _build(pack, base, folder, class_folder)


def _train(pack, base, data, tmp_path, *, steps=4, reporter=None, resume=None, options=None, **job):
    model, clip, _ = base
    options = {"train_text_encoder": False, **(options or {})}
    job = pack.job.TrainJob(method="dreambooth", steps=steps, batch_size=1, learning_rate=job.pop("learning_rate", 1e-4),
                            seed=2, method_options=options, min_snr_gamma=0.0, **job)
    method = pack.methods.create_method("dreambooth", options)
    with torch.inference_mode():
        result = pack.loop.train(job, method, model, clip, data, checkpoint_dir=tmp_path, resume_from=resume, reporter=reporter)
    return result, method


def _denoise(model, clip, latent, prompt, sigma=3.0):
    """x0 prediction through the samplers' own path (what KSampler calls)."""
    with torch.inference_mode():
        cond = clip.encode_from_tokens_scheduled(clip.tokenize(prompt))
    return denoise_x0(model, cond, latent, sigma)


def test_checkpoint_reloads_in_stock_loader_and_inputs_are_untouched(pack, base, data, db, tmp_path, comfy_runtime):
    """The saved file loads with CheckpointLoaderSimple and denoises like the in-memory trained MODEL;
    a sibling branch on the input MODEL gives the same output before and after training."""
    import nodes as comfy_nodes
    import safetensors
    model, clip, vae = base
    latent, prompt = data.samples[0].latent[None], data.samples[0].caption
    before = _denoise(model, clip, latent, prompt)
    result, method = _train(pack, base, data, tmp_path, steps=3, learning_rate=1e-3)
    trained_model, trained_clip = method.trained_outputs()
    trained = _denoise(trained_model, trained_clip, latent, prompt)
    assert not torch.allclose(trained, before, atol=1e-4), "training changed nothing"
    assert torch.equal(_denoise(model, clip, latent, prompt), before), "the input MODEL changed"

    save_model, save_clip = method.saving_outputs()
    meta = db.ckpt_file.modelspec_metadata(save_model, title="db test", resolution=(64, 64), extra={"personalize.job": {"a": 1}})
    folder = comfy_runtime.folder("checkpoints")
    path = db.ckpt_file.save_full_checkpoint(folder, "tests/db_model", save_model, save_clip, vae, meta)
    second = db.ckpt_file.save_full_checkpoint(folder, "tests/db_model", trained_model, trained_clip, vae, meta)
    assert second != path and path.is_file() and second.is_file(), "an existing checkpoint was overwritten"
    assert not list(path.parent.glob("*.partial"))
    with safetensors.safe_open(str(path), "pt") as f:
        saved_meta = f.metadata()
    assert saved_meta["modelspec.architecture"] == "stable-diffusion-v1" and saved_meta["modelspec.predict_key"] == "epsilon"
    with torch.inference_mode():
        reloaded_model, reloaded_clip, _ = comfy_nodes.CheckpointLoaderSimple().load_checkpoint(
            path.relative_to(folder).as_posix())
    reloaded = _denoise(reloaded_model, reloaded_clip, latent, prompt)
    torch.testing.assert_close(reloaded, trained, rtol=1e-3, atol=1e-3)  # fp16 tolerance
    assert torch.equal(_denoise(model, clip, latent, prompt), before), "saving changed the input MODEL"
    # The returned MODEL carries weight patches, so core-style readers (get_key_patches) see the fine-tune:
    # the difference extracts as a LoRA for users who can't store full checkpoints.
    lora_svd = comfy_runtime.pack_import("trainers.formats.lora_svd")
    lora, reports = lora_svd.extract_lora(model, trained_model, rank=4)
    assert any(k.startswith("lora_unet_") for k in lora) and reports


def test_prior_preservation_adds_the_weighted_class_loss(pack, base, data, tmp_path):
    """At step 1 (same weights, same instance noise) the loss is L_instance + w * L_class: linear in w."""
    losses = {}
    for weight in (0.0, 1.0, 2.0):
        result, _ = _train(pack, base, data, tmp_path / str(weight), steps=1, prior_loss_weight=weight)
        losses[weight] = result.loss_history[0]
        assert result.summary["class_samples"] == 4
    class_loss = losses[1.0] - losses[0.0]
    assert class_loss > 1e-4
    assert losses[2.0] - losses[0.0] == pytest.approx(2 * class_loss, rel=1e-3)


def test_resume_with_ema_is_exact(pack, base, data, tmp_path):
    """Cancel at step 2 of 4 and resume: weights and EMA equal the uninterrupted run's bit for bit."""
    ema = {"ema_decay": 0.9, "ema_warmup_steps": 2}
    (whole, whole_method), (resumed, resumed_method) = cancel_then_resume(
        pack.progress, lambda folder, **kw: _train(pack, base, data, folder, **kw, **ema), tmp_path, total=4)
    a, b = whole_method.trainable_state_dict(), resumed_method.trainable_state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    ema_a, ema_b = whole.ema.named(a), resumed.ema.named(b)
    assert all(torch.equal(ema_a[k], ema_b[k]) for k in a)
    key = next(k for k in a if k.endswith("out.2.weight"))
    assert not torch.equal(ema_a[key], a[key]), "the EMA equals the raw weights"


FC1 = "clip_l.transformer.text_model.encoder.layers.0.mlp.fc1.weight"


def test_text_encoder_trains_only_for_its_fraction_and_clip_is_untouched(pack, base, data, tmp_path):
    model, clip, _ = base
    seen = []

    class Snapshot(pack.progress.Reporter):
        def step(self, step, loss, lr):
            seen.append({k: v.detach().clone() for k, v in method_ref[0].text_encoder.items() if "layers.0.mlp.fc1" in k})
            super().step(step, loss, lr)

    method_ref = []
    options = {"train_text_encoder": True, "text_encoder_fraction": 0.5}
    job = pack.job.TrainJob(method="dreambooth", steps=2, learning_rate=1e-4, text_encoder_lr=1e-3, seed=2,
                            method_options=options, optimizer="sgd", prior_loss_weight=0.0)
    method = pack.methods.create_method("dreambooth", options)
    method_ref.append(method)
    with torch.inference_mode():
        before = clip.encode_from_tokens_scheduled(clip.tokenize("a photo of sks cross"))[0][0].clone()
        initial = clip.get_sd()[FC1].clone()
        pack.loop.train(job, method, model, clip, data, checkpoint_dir=tmp_path, reporter=Snapshot(2))
    assert not torch.equal(seen[0][FC1], initial.float()), "the text encoder did not train"
    assert torch.equal(seen[0][FC1], seen[1][FC1]), "the text encoder trained past its fraction (1 of 2 steps)"
    _, trained_clip = method.trained_outputs()
    with torch.inference_mode():
        after = clip.encode_from_tokens_scheduled(clip.tokenize("a photo of sks cross"))[0][0]
        trained = trained_clip.encode_from_tokens_scheduled(trained_clip.tokenize("a photo of sks cross"))[0][0]
    assert torch.equal(before, after), "the input CLIP changed"
    assert not torch.allclose(trained, before, atol=1e-5)


@pytest.mark.parametrize("memory", [
    {"gradient_checkpointing": True, "precision": "bf16"},
    {"weight_dtype": "bf16", "weight_rounding": "stochastic", "precision": "bf16"},
    {"weight_dtype": "bf16", "weight_rounding": "kahan", "fused_backward": True, "optimizer": "adafactor"},
    {"fused_backward": True, "ema_decay": 0.99, "ema_on_cpu": True},
], ids=["checkpointing-bf16", "full-bf16-sr", "bf16-kahan-fused-adafactor", "fused-ema-cpu"])
def test_memory_options_train(pack, base, data, tmp_path, memory):
    """Each memory option trains: finite falling-or-moving loss, weights change in their storage dtype."""
    options = {"weight_dtype": memory.get("weight_dtype", "fp32")}
    result, method = _train(pack, base, data, tmp_path, steps=3, learning_rate=1e-3, options=options, **memory)
    assert all(torch.isfinite(torch.tensor(result.loss_history)))
    weights = method.trainable_state_dict()
    key = next(k for k in weights if k.endswith("out.2.weight"))
    model, _, _ = base
    original = model.model.state_dict()[key.removeprefix("unet.")]
    assert weights[key].dtype == (torch.bfloat16 if options["weight_dtype"] == "bf16" else torch.float32)
    assert not torch.equal(weights[key].float(), original.float()), "no update reached the weights"


def test_bf16_weights_with_the_base_model_as_the_prior_target(pack, base, data, tmp_path):
    """The teacher computes with the base weights in their own dtype and on their copies' device: the bf16 copies
    set the UNet's dtype, and the base weights (fp32 here) then met bf16 inputs."""
    result, _ = _train(pack, base, data, tmp_path, steps=2, learning_rate=1e-3, options={"weight_dtype": "bf16"},
                       weight_dtype="bf16", prior_target="base_model", prior_loss_weight=1.0)
    assert len(result.loss_history) == 2 and all(torch.isfinite(torch.tensor(result.loss_history)))


def test_bad_inputs_get_clear_errors(pack, base, data, db, tmp_path):
    from harness import make_sample_dataset
    model, _, _ = base
    make_sample_dataset(tmp_path / "inst", n=1, seed=1)
    no_class = _build(pack, base, tmp_path / "inst")
    with pytest.raises(ValueError, match="`prior_preservation`.*class images"):
        db.node.dreambooth_data(no_class, True, "")
    class_folder = tmp_path / "cls"
    make_sample_dataset(class_folder, n=1, seed=2)
    for txt in class_folder.glob("*.txt"):
        txt.unlink()
    no_prompt = _build(pack, base, tmp_path / "inst", class_folder)
    with pytest.raises(ValueError, match="`class_prompt`"):
        db.node.dreambooth_data(no_prompt, True, "")
    with pytest.raises(ValueError, match="`grad_accumulation`"):
        pack.job.TrainJob(method="dreambooth", fused_backward=True, grad_accumulation=2)
    with pytest.raises(ValueError, match="`text_encoder_fraction`"):
        pack.methods.create_method("dreambooth", {"text_encoder_fraction": 0.0})
    replaced = db.node.dreambooth_data(data, True, "a photo of sks dog")
    assert {s.caption for s in replaced.samples} == {"a photo of sks dog"} and len(data.class_samples) == 4


def test_sdxl_model_with_sd1_dataset_is_refused(pack, data, db):
    """An SDXL MODEL (tiny, built by ComfyUI's own SDXL config) with a dataset encoded for SD1."""
    sdxl = tiny_sdxl()
    with pytest.raises(ValueError, match="`dataset`.*SDXL"):
        db.method.check_dataset_fits(sdxl, data)


def test_memorizes_one_image(pack, base, db, tmp_path):
    """After DreamBooth on one image the loss has fallen and sampling the instance prompt lands much closer to that image's latent
    than the base model does (memorization is what this method does with one image)."""
    from harness import make_sample_dataset
    model, clip, _ = base
    make_sample_dataset(tmp_path / "one", n=1, size=64, seed=9, subject="sks")
    one = _build(pack, base, tmp_path / "one")
    result, method = _train(pack, base, one, tmp_path / "ckpt", steps=25, learning_rate=1e-3, prior_loss_weight=0.0)
    history = torch.tensor(result.loss_history)
    assert history[-6:].mean() < 0.7 * history[:6].mean(), history  # the loss falls
    trained_model, trained_clip = method.trained_outputs()
    target = one.samples[0].latent[None].float()

    def sample(m, c):
        with torch.inference_mode():
            positive = c.encode_from_tokens_scheduled(c.tokenize(one.samples[0].caption))
            empty = torch.zeros_like(target)
            noise = comfy.sample.prepare_noise(empty, 0)
            return comfy.sample.sample(m, noise, 12, 1.0, "euler", "normal", positive, positive, empty, seed=0,
                                       disable_pbar=True).float()

    base_distance = (sample(model, clip) - target).pow(2).mean().item()
    trained_distance = (sample(trained_model, trained_clip) - target).pow(2).mean().item()
    assert trained_distance < 0.3 * base_distance, (trained_distance, base_distance)


def test_node_trains_saves_and_stock_loader_samples(comfy_runtime, tiny_checkpoint, tmp_path):
    from harness import make_sample_dataset, txt2img_graph
    folder = tmp_path / "data"
    make_sample_dataset(folder, n=2, size=64, seed=4, subject="sks")
    graph = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": tiny_checkpoint}},
        "2": {"class_type": "PersonalizeDatasetFromFolder", "inputs": {
            "folder": str(folder), "vae": ["1", 2], "clip": ["1", 1], "resolution": 64, "buckets": False, "bucket_step": 64,
            "min_side": 0, "max_side": 0, "no_upscale": False, "crop": "center", "crop_variants": 1, "flip": False,
            "trigger_word": "", "instance_prompt": "", "shuffle_tags": False, "keep_tokens": 0, "tag_dropout": 0.0,
            "caption_dropout": 0.0, "masked_loss": False, "seed": 0, "use_cache": False}},
        "3": {"class_type": "PersonalizeTrainDreamBooth", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "dataset": ["2", 0], "steps": 2, "learning_rate": 1e-4,
            "instance_prompt": "a photo of sks cross", "prior_preservation": False, "prior_loss_weight": 1.0,
            "train_text_encoder": False, "text_encoder_lr": 1e-6, "text_encoder_fraction": 0.5, "weight_dtype": "fp32",
            "weight_rounding": "stochastic", "fused_backward": False, "ema_decay": 0.9, "ema_warmup_steps": 0,
            "ema_on_cpu": False, "use_ema": True, "save_name": "tests/db_node", "save_dtype": "fp16", "batch_size": 1,
            "grad_accumulation": 1, "optimizer": "adamw", "lr_scheduler": "constant", "warmup_steps": 0, "loss_type": "mse",
            "min_snr_gamma": 5.0, "noise_offset": 0.0, "max_grad_norm": 1.0, "precision": "fp32",
            "gradient_checkpointing": False, "seed": 0, "checkpoint_every": 0, "run_name": "db", "resume": ""}},
        "4": {"class_type": "PreviewAny", "inputs": {"source": ["3", 4]}},
    }
    result = comfy_runtime.run_prompt(graph)
    saved = next(iter(result["outputs"]["4"].values()))[0]
    folder = comfy_runtime.folder("checkpoints")
    import safetensors
    with safetensors.safe_open(saved, "pt") as f:
        assert json.loads(f.metadata()["personalize.ema"]) is True
        assert f.get_tensor(next(k for k in f.keys() if k.startswith("model.diffusion_model."))).dtype == torch.float16
    stock = txt2img_graph(str(__import__("pathlib").Path(saved).relative_to(folder)), steps=2, prefix="db_stock")
    comfy_runtime.run_prompt(stock)
