"""`prior_target`="base_model": the class-image loss pulls towards the base model's own prediction on the same
noisy input (output preservation), computed by bypassing the trained weights of the method being trained."""
import pytest
import torch
from training import dataset_with_class_images, denoise_x0


@pytest.fixture(scope="module")
def data(pack, base, tmp_path_factory):
    """Two 'sks' instance images and four class images of another subject."""
    return dataset_with_class_images(pack, base, tmp_path_factory.mktemp("prior-data"))


METHODS = {
    "lora": {"rank": 4, "alpha": 4.0},
    "dreambooth": {"train_text_encoder": False},
    "hypernetwork": {"layer_structure": [1, 2, 1]},
}


def _train(pack, base, data, tmp_path, method_name, *, steps=1, lr=1e-3, **job):
    model, clip, _ = base
    options = METHODS[method_name]
    job = pack.job.TrainJob(method=method_name, steps=steps, batch_size=2, learning_rate=lr, seed=4,
                            method_options=options, min_snr_gamma=0.0, **job)
    method = pack.methods.create_method(method_name, options)
    with torch.inference_mode():
        result = pack.loop.train(job, method, model, clip, data, checkpoint_dir=tmp_path, reporter=None)
    return result, method


def _denoise(model, latent, cond, load=True):
    return denoise_x0(model, cond, latent, sigma=2.0, load=load)


@pytest.mark.parametrize("method_name", ["lora", "dreambooth"])
def test_the_class_loss_starts_at_zero(pack, base, data, tmp_path, method_name):
    """At step 1 the trained weights still equal the base (LoRA up = 0, DreamBooth copies), so the base-model
    target adds nothing to the loss, at any weight; with the image target the class loss is clearly there."""
    only_instance, _ = _train(pack, base, data, tmp_path / "w0", method_name, prior_loss_weight=0.0)
    to_base, _ = _train(pack, base, data, tmp_path / "base", method_name, prior_loss_weight=3.0,
                        prior_target="base_model")
    to_images, _ = _train(pack, base, data, tmp_path / "images", method_name, prior_loss_weight=3.0)
    assert to_base.loss_history[0] == pytest.approx(only_instance.loss_history[0], abs=1e-6)
    assert to_images.loss_history[0] > only_instance.loss_history[0] + 1e-3


@pytest.mark.parametrize("method_name", ["lora", "hypernetwork", "dreambooth"])
def test_base_behaviour_computes_the_input_model(pack, base, data, tmp_path, method_name):
    """After training, the trained clone under `base_behaviour()` denoises exactly as the input MODEL does
    (the teacher is the base), and outside it differently (it did train); the input MODEL is untouched."""
    model, _, _ = base
    latent, cond = data.class_samples[0].latent[None], data.class_samples[0].conditioning
    expected = _denoise(model, latent, cond)
    result, method = _train(pack, base, data, tmp_path, method_name, steps=4, lr=1e-2, prior_target="base_model")
    trained = _denoise(result.attached.model, latent, cond)  # loads the trained clone (DreamBooth swaps weights in)
    with method.base_behaviour():
        bypassed = _denoise(result.attached.model, latent, cond, load=False)
    assert not torch.allclose(trained, expected, atol=1e-5), "training changed nothing"
    torch.testing.assert_close(bypassed, expected, rtol=0, atol=1e-6)
    # The bypass is undone on leaving the context.
    torch.testing.assert_close(_denoise(result.attached.model, latent, cond), trained, rtol=0, atol=1e-6)
    assert torch.equal(_denoise(model, latent, cond), expected), "the input MODEL changed"


def test_a_method_that_cannot_bypass_its_weights_is_refused(pack, base, data, tmp_path):
    """Textual inversion has no weights to switch off in the UNet: the base-model target is refused before step 1,
    naming the setting."""
    model, clip, _ = base
    options = {"token": "<prior-tok>", "vectors": 1, "init_word": "shape"}
    job = pack.job.TrainJob(method="textual_inversion", steps=2, batch_size=1, learning_rate=1e-3, seed=0,
                            method_options=options, prior_target="base_model")
    method = pack.methods.create_method("textual_inversion", options)
    with torch.inference_mode(), pytest.raises(ValueError, match="prior_target"):
        pack.loop.train(job, method, model, clip, data, checkpoint_dir=tmp_path)


def test_unknown_prior_target_is_refused(pack):
    with pytest.raises(ValueError, match="`prior_target`"):
        pack.job.TrainJob(prior_target="teacher")


def test_a_method_under_training_control_keeps_its_base_behaviour(pack, comfy_runtime, base, data, tmp_path):
    """Trained under a ControlNet (Personalize Training Control), the method is wrapped; the wrapper hands the base
    behaviour through, so the base-model prior target works under control too (it used to raise)."""
    under_control = comfy_runtime.pack_import("trainers.methods.controlnet").UnderControl
    model, _, _ = base
    latent, cond = data.class_samples[0].latent[None], data.class_samples[0].conditioning
    expected = _denoise(model, latent, cond)
    result, method = _train(pack, base, data, tmp_path, "lora", steps=2, lr=1e-2, prior_target="base_model")
    trained = _denoise(result.attached.model, latent, cond)
    with under_control(method, None).base_behaviour():
        bypassed = _denoise(result.attached.model, latent, cond, load=False)
    assert not torch.allclose(trained, expected, atol=1e-5), "training changed nothing"
    torch.testing.assert_close(bypassed, expected, rtol=0, atol=1e-6)


def test_the_class_loss_starts_at_zero_with_the_text_encoder_trained_under_autocast(pack, base, data, tmp_path):
    """A text-encoder LoRA in bf16 autocast: the teacher's class captions are encoded as the student's are (outside
    autocast), so at step 1, when the weights still equal the base, the base-model target adds nothing."""
    model, clip, _ = base
    options = {"rank": 4, "alpha": 4.0, "train_text_encoder": True}
    losses = []
    for name, weight in (("w0", 0.0), ("base", 3.0)):
        job = pack.job.TrainJob(method="lora", steps=1, batch_size=2, learning_rate=1e-3, seed=4, method_options=options,
                                min_snr_gamma=0.0, precision="bf16", prior_loss_weight=weight, prior_target="base_model")
        with torch.inference_mode():
            result = pack.loop.train(job, pack.methods.create_method("lora", options), model, clip, data,
                                     checkpoint_dir=tmp_path / name, reporter=None)
        losses.append(result.loss_history[0])
    assert losses[1] == pytest.approx(losses[0], abs=1e-6)
