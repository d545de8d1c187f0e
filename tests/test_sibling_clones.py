"""A run attaches to the input MODEL as it is, whatever sibling clone of the same checkpoint is loaded at the time."""
import pytest
import torch
from training import dataset_with_class_images, denoise_x0


@pytest.fixture(scope="module")
def data(pack, base, tmp_path_factory):
    return dataset_with_class_images(pack, base, tmp_path_factory.mktemp("sibling-data"))


def _train(pack, base, data, folder, options, steps=3, learning_rate=1e-3):
    model, clip, _ = base
    job = pack.job.TrainJob(method="lora", steps=steps, batch_size=2, learning_rate=learning_rate, seed=4,
                            method_options=options, min_snr_gamma=0.0, prior_loss_weight=0.0)
    with torch.inference_mode():
        return pack.loop.train(job, pack.methods.create_method("lora", options), model, clip, data,
                               checkpoint_dir=folder, reporter=None)


@pytest.mark.parametrize("options", [{"rank": 4, "alpha": 4.0}, {"rank": 4, "alpha": 4.0, "train_text_encoder": True}],
                         ids=["unet", "text_encoder"])
def test_training_after_a_trained_model_was_sampled_is_the_same_training(pack, base, data, tmp_path, options):
    """An earlier run's training clone, sampled and so left loaded (its LoRA forwards patched into the shared
    modules), used to be wrapped by the next run's LoRA: that run trained on top of the other LoRA (other losses,
    another file). Now the later run loses and learns exactly what the first run of the process did."""
    fresh = _train(pack, base, data, tmp_path / "fresh", options)
    earlier = _train(pack, base, data, tmp_path / "earlier", {"rank": 4, "alpha": 4.0}, steps=2, learning_rate=1e-2)
    sample = data.class_samples[0]
    denoise_x0(earlier.attached.model, sample.conditioning, sample.latent[None])  # loads it, as a KSampler would
    later = _train(pack, base, data, tmp_path / "later", options)
    assert later.loss_history == pytest.approx(fresh.loss_history, abs=1e-6)
    fresh_lora, later_lora = fresh.method.export(), later.method.export()
    assert fresh_lora.keys() == later_lora.keys()
    for key in fresh_lora:
        torch.testing.assert_close(later_lora[key], fresh_lora[key], rtol=0, atol=1e-6)


def test_training_after_a_stock_lora_was_sampled_on_a_fresh_checkpoint(pack, base, data, tmp_path, tiny_checkpoint_path):
    """A stock LoRA's clone, sampled before the first training of a freshly loaded checkpoint, holds the module's own
    (inference-mode) weights as its backups: unloading it before attach puts them back, and they must still be made
    safe for autograd (the run used to fail with "Inference tensors cannot be saved for backward")."""
    import comfy.sd

    options = {"rank": 4, "alpha": 4.0}
    fresh = _train(pack, base, data, tmp_path / "fresh", options)
    with torch.inference_mode():
        model, clip, _, _ = comfy.sd.load_checkpoint_guess_config(str(tiny_checkpoint_path), output_vae=True,
                                                                  output_clip=True)
        stock_model, _ = comfy.sd.load_lora_for_models(model, clip, fresh.method.export(), 1.0, 1.0)
    sample = data.class_samples[0]
    denoise_x0(stock_model, sample.conditioning, sample.latent[None])  # loaded with its weight patches, as sampled
    later = _train(pack, (model, clip, None), data, tmp_path / "later", options)
    assert later.loss_history == pytest.approx(fresh.loss_history, abs=1e-6)
