"""The engine on the tiny real-format SD1.5 model, loaded by ComfyUI's own checkpoint loader.

Models are loaded under `torch.inference_mode()` as the executor does, so these runs see the same
inference-mode tensors a node does.
"""
import logging

import pytest
import torch

import comfy.lora
import comfy.sd
import comfy.samplers
from training import cancel_then_resume

STEPS = 6


@pytest.fixture(scope="module")
def data(pack, base, tmp_path_factory):
    from harness import make_sample_dataset
    folder = tmp_path_factory.mktemp("engine-data")
    make_sample_dataset(folder, n=4, size=64, seed=0, subject="sks")
    _, clip, vae = base
    with torch.inference_mode():
        spec = pack.build.DatasetSpec(folder=str(folder), resolution=64, bucket_step=32, use_cache=False)
        return pack.build.build_training_data(spec, vae, clip)[0]


def _train(pack, base, data, tmp_path, *, steps=STEPS, reporter=None, resume=None, lr=1e-3, job_fields=None, **method):
    model, clip, _ = base
    options = {"rank": 4, "alpha": 4.0, **method}
    job_options = {k: v for k, v in options.items() if k != "initial_weights"}  # as the node: tensors stay out of the job
    job = pack.job.TrainJob(steps=steps, batch_size=2, learning_rate=lr, seed=3, method_options=job_options,
                            min_snr_gamma=5.0, **(job_fields or {}))
    lora = pack.methods.create_method("lora", options)
    with torch.inference_mode():
        result = pack.loop.train(job, lora, model, clip, data, checkpoint_dir=tmp_path, resume_from=resume,
                                 reporter=reporter)
    return result, lora.export()


def _denoise(model, latent, sigma, cond):
    """x0 prediction of a MODEL through the samplers' own path (what KSampler calls)."""
    with torch.inference_mode():
        import comfy.model_management
        comfy.model_management.load_models_gpu([model])
        conds = comfy.sampler_helpers.convert_cond(cond)
        conds = comfy.samplers.encode_model_conds(model.model.extra_conds, conds, latent, latent.device, "positive")
        x = model.model.process_latent_in(latent) + sigma * torch.randn(latent.shape, generator=torch.Generator().manual_seed(0))
        model.pre_run()
        return comfy.samplers.calc_cond_batch(model.model, [conds], x, torch.tensor([sigma]), model.model_options)[0]


def test_loss_falls(pack, base, data, tmp_path):
    """Training on the same 4 images: the mean loss of the last steps is clearly below the first."""
    result, _ = _train(pack, base, data, tmp_path, steps=40, lr=3e-3)
    history = torch.tensor(result.loss_history)
    assert history[-10:].mean() < 0.85 * history[:10].mean(), history


def test_same_seed_same_weights(pack, base, data, tmp_path):
    _, first = _train(pack, base, data, tmp_path / "a")
    _, second = _train(pack, base, data, tmp_path / "b")
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert any(first[k].abs().sum() > 0 for k in first if k.endswith("lora_up.weight"))


def test_cancel_then_resume_equals_one_run(pack, base, data, tmp_path):
    """Cancelled at step 2 (checkpoint written), resumed to the end: bit-identical to one run."""
    (_, uninterrupted), (result, resumed) = cancel_then_resume(
        pack.progress, lambda folder, **kw: _train(pack, base, data, folder, **kw), tmp_path, total=STEPS)
    assert result.global_step == STEPS
    assert all(torch.equal(uninterrupted[k], resumed[k]) for k in uninterrupted)


def test_a_finished_run_resumed_into_more_steps_follows_the_longer_schedule(pack, base, data, tmp_path):
    """final.pt of a 4-step linear run (lr ends at 0) resumed into 8 steps: step 5 uses the 8-step schedule's lr."""
    model, clip, _ = base
    options = {"rank": 4, "alpha": 4.0}
    lrs = {}

    class Recorder(pack.progress.Reporter):
        def step(self, step, loss, lr):
            lrs[step] = lr
            super().step(step, loss, lr)

    for steps, resume in ((4, None), (8, tmp_path / "final.pt")):
        job = pack.job.TrainJob(steps=steps, batch_size=2, learning_rate=1e-3, seed=3, method_options=options,
                                lr_scheduler="linear")
        with torch.inference_mode():
            pack.loop.train(job, pack.methods.create_method("lora", options), model, clip, data,
                            checkpoint_dir=tmp_path, resume_from=resume, reporter=Recorder(steps))
    assert lrs[4] == pytest.approx(1e-3 * 0.25)
    assert lrs[5] == pytest.approx(1e-3 * (1 - 4 / 8))
    assert lrs[8] == pytest.approx(1e-3 * (1 - 7 / 8))


def test_input_model_is_untouched(pack, base, data, tmp_path):
    """A sibling branch using the input MODEL gives the same output before and after training."""
    model, clip, _ = base
    latent = data.samples[0].latent[None]
    with torch.inference_mode():
        cond = clip.encode_from_tokens_scheduled(clip.tokenize("a photo"))
    before = _denoise(model, latent, 3.0, cond)
    _train(pack, base, data, tmp_path)
    after = _denoise(model, latent, 3.0, cond)
    assert torch.equal(before, after)


@pytest.mark.parametrize("method", [{}, {"dora": True}, {"targets": "all"}, {"train_text_encoder": True},
                                    {"targets": "cross_attention_kv"}],
                         ids=["lora", "dora", "all-layers", "text-encoder", "cross-attention-kv"])
def test_stock_loader_applies_every_key_and_matches_training(pack, base, data, tmp_path, caplog, method):
    """The exported kohya LoRA loads with ComfyUI's stock loader with no key left over, and the
    loaded model computes what the model computed at the end of training."""
    model, clip, _ = base
    result, lora = _train(pack, base, data, tmp_path, lr=1e-2, **method)
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    key_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, key_map)
    with caplog.at_level(logging.WARNING):
        loaded = comfy.lora.load_lora(lora, key_map)
        new_model, new_clip = comfy.sd.load_lora_for_models(model, clip, lora, 1.0, 1.0)
    assert "lora key not loaded" not in caplog.text and "NOT LOADED" not in caplog.text
    assert len(loaded) == len({k.rsplit(".", 2)[0] if k.endswith("weight") else k.rsplit(".", 1)[0] for k in lora})
    if method.get("train_text_encoder"):
        assert any(k.startswith("lora_te_") for k in lora)
    if method.get("targets") == "cross_attention_kv":
        assert lora and all(k.split(".")[0].endswith(("_attn2_to_k", "_attn2_to_v")) for k in lora)

    latent = data.samples[0].latent[None]
    with torch.inference_mode():
        cond = new_clip.encode_from_tokens_scheduled(new_clip.tokenize(data.samples[0].caption))
    stock = _denoise(new_model, latent, 3.0, cond)
    base_out = _denoise(model, latent, 3.0, cond)
    # The same function as during training: weight wrappers of the method on a clone.
    trained = result.attached.model
    for delta in result.method.deltas.values():
        delta.requires_grad_(False)
    with torch.inference_mode():
        trained_cond = result.attached.clip.encode_from_tokens_scheduled(result.attached.clip.tokenize(data.samples[0].caption))
    in_training = _denoise(trained, latent, 3.0, trained_cond)
    pack.model_runtime.release_training_model([trained])
    assert not torch.allclose(stock, base_out, atol=1e-4), "the LoRA changed nothing"
    # CLIP weights are stored in fp16 on this machine, so a patched text encoder rounds its merged
    # weights: compare the LoRA's effect rather than raw values there.
    effect_error = (stock - in_training).norm() / (stock - base_out).norm()
    assert effect_error < (0.05 if method.get("train_text_encoder") else 2e-3), effect_error


def test_v_prediction_trains_on_v(pack, base, data, tmp_path, comfy_runtime):
    """Through the stock ModelSamplingDiscrete node the loop sees a v-prediction model and trains."""
    import comfy_extras.nodes_model_advanced as adv
    model, clip, vae = base
    with torch.inference_mode():
        v_model = adv.ModelSamplingDiscrete().patch(model, "v_prediction", False)[0]
    sampling = v_model.get_model_object("model_sampling")
    assert "V_PREDICTION" in [c.__name__ for c in type(sampling).__mro__]
    result, lora = _train(pack, (v_model, clip, vae), data, tmp_path, steps=3)
    assert len(result.loss_history) == 3 and all(torch.isfinite(torch.tensor(result.loss_history)))


def test_a_text_encoder_at_learning_rate_0_leaves_the_unet_training_as_it_is(pack, base, data, tmp_path):
    """`train_text_encoder` with `text_encoder_lr` 0 trains the UNet LoRA exactly as without it: the text encoder's
    gradients used to pile up outside the optimizer and take over the clipping norm of every step."""
    clipped = {"max_grad_norm": 1e-3}
    alone, alone_lora = _train(pack, base, data, tmp_path / "alone", steps=3, job_fields=clipped)
    frozen, frozen_lora = _train(pack, base, data, tmp_path / "te0", steps=3, train_text_encoder=True,
                                 job_fields={**clipped, "text_encoder_lr": 0.0})
    assert frozen.loss_history == pytest.approx(alone.loss_history, abs=1e-6)
    for key, value in alone_lora.items():
        torch.testing.assert_close(frozen_lora[key], value, rtol=0, atol=1e-6)
    assert all(not v.any() for k, v in frozen_lora.items() if k.startswith("lora_te") and "lora_up" in k)


def test_an_ema_turned_on_at_resume_starts_from_the_resumed_weights(pack, base, data, tmp_path):
    """final.pt of a run without EMA, resumed into one more step with `ema_decay` 0.9: the average is
    0.9 x the resumed weights + 0.1 x the new ones (it averaged in the run's initial weights instead)."""
    first, _ = _train(pack, base, data, tmp_path / "first", steps=2, lr=1e-2)
    resumed_weights = [p.detach().clone() for g in first.attached.groups for p in g.params]
    result, _ = _train(pack, base, data, tmp_path / "second", steps=3, lr=1e-2, resume=first.final_checkpoint,
                       job_fields={"ema_decay": 0.9, "ema_warmup_steps": 0})
    assert len(result.ema.shadow) == len(resumed_weights)
    for shadow, param, before in zip(result.ema.shadow, result.ema.params, resumed_weights):
        torch.testing.assert_close(shadow, 0.9 * before + 0.1 * param.detach(), rtol=1e-5, atol=1e-7)


def test_a_training_model_unloaded_mid_run_is_loaded_again(pack, base, data, tmp_path):
    """ComfyUI may unload the training clone between steps to make room for another model (a preview's VAE decode,
    a text encode under memory pressure): an unloaded clone computes without its LoRA branches, so the run went on
    training nothing. It is loaded again before the next forward: the run is the uninterrupted one."""
    import comfy.model_management

    class Evicting(pack.progress.Reporter):
        def step(self, step, loss, lr):
            super().step(step, loss, lr)
            if step == 2:
                comfy.model_management.unload_all_models()

    plain, plain_lora = _train(pack, base, data, tmp_path / "plain", steps=4)
    evicted, evicted_lora = _train(pack, base, data, tmp_path / "evicted", steps=4, reporter=Evicting(4))
    assert evicted.loss_history == pytest.approx(plain.loss_history, abs=1e-6)
    for key, value in plain_lora.items():
        torch.testing.assert_close(evicted_lora[key], value, rtol=0, atol=1e-6)


def _deltas(lora: dict) -> dict:
    """module -> the delta ComfyUI applies (up @ down * alpha/rank; no alpha: 1), for kohya names."""
    out = {}
    for key, down in lora.items():
        if key.endswith(".lora_down.weight"):
            name = key[: -len(".lora_down.weight")]
            alpha = lora.get(f"{name}.alpha")
            scale = float(alpha) / down.shape[0] if alpha is not None else 1.0
            out[name] = lora[f"{name}.lora_up.weight"].float().flatten(1) @ down.float().flatten(1) * scale
    return out


def test_an_initial_lora_starts_at_its_own_delta_whatever_its_alpha_and_layout(pack, base, data, tmp_path, comfy_runtime):
    """kohya's alpha 1 at rank 16 is 16x weaker than alpha 16: the run (alpha 4 here) must start where the file's
    delta is, as stock LoraLoader applies it, and so must a peft-named file (the layout OneTrainer and diffusers write)."""
    convert = comfy_runtime.pack_import("trainers.formats.lora_convert")
    model, clip, _ = base
    _, trained = _train(pack, base, data, tmp_path / "first", steps=2, lr=1e-2)
    half = {k: (torch.tensor(2.0) if k.endswith(".alpha") else v) for k, v in trained.items()}
    with torch.inference_mode():
        peft = dict(convert.convert(trained, convert.KeySpace(model, clip), "diffusers"))
    assert not any(k.startswith("lora_unet") for k in peft)
    for name, initial, want in (("half", half, _deltas(half)), ("peft", peft, _deltas(trained))):
        _, continued = _train(pack, base, data, tmp_path / name, steps=1, lr=1e-9, initial_weights=initial)
        got = _deltas(continued)
        assert got.keys() == want.keys()
        for module in want:
            torch.testing.assert_close(got[module], want[module], rtol=1e-4, atol=1e-7)


def test_an_initial_lora_the_run_cannot_continue_is_refused(pack, base, data, tmp_path):
    _, trained = _train(pack, base, data, tmp_path / "first", steps=1)
    dora = dict(trained)
    name = next(k for k in trained if k.endswith(".lora_down.weight"))[: -len(".lora_down.weight")]
    dora[f"{name}.dora_scale"] = torch.ones(1, trained[f"{name}.lora_down.weight"].shape[1])
    with pytest.raises(ValueError, match="`initial_lora` is a DoRA"):
        _train(pack, base, data, tmp_path, initial_weights=dora)
    with pytest.raises(ValueError, match="modules this run does not train .*set `targets`"):
        _train(pack, base, data, tmp_path, initial_weights=trained, targets="cross_attention_kv")
    with pytest.raises(ValueError, match="`initial_lora` has rank 4 but `rank` is 8"):
        _train(pack, base, data, tmp_path, initial_weights=trained, rank=8)


def test_wrong_architecture_lora_is_refused(pack, base, data, tmp_path):
    model, clip, _ = base
    alien = {"lora_unet_down_blocks_3_attentions_9_proj_in.lora_down.weight": torch.zeros(4, 1280),
             "lora_unet_down_blocks_3_attentions_9_proj_in.lora_up.weight": torch.zeros(1280, 4)}
    with pytest.raises(ValueError, match="different base architecture"):
        _train(pack, base, data, tmp_path, initial_weights=alien)
