"""Captions to model conds during training (trainers.conditioning): what the memos may and may not reuse."""
import pytest
import torch
from training import dataset_with_class_images, tiny_sdxl

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def mods(comfy_runtime):
    class Mods:
        conditioning = comfy_runtime.pack_import("trainers.conditioning")
        dataset = comfy_runtime.pack_import("trainers.data.dataset")
        runtime = comfy_runtime.pack_import("trainers.model_runtime")
    return Mods


def test_one_caption_in_two_buckets_keeps_each_size_conditioning(mods):
    """SDXL conditions on the image size: a caption shared by a square and a wide image (DreamBooth's one instance
    prompt) gives each bucket its own `y`, as the sampler would build it, not the first bucket's for both."""
    sdxl = tiny_sdxl()
    caption = "a photo of sks dog"
    conditioning = [[torch.randn(1, 77, 2048, generator=torch.Generator().manual_seed(0)),
                     {"pooled_output": torch.randn(1, 1280, generator=torch.Generator().manual_seed(1))}]]
    square, wide = torch.zeros(4, 8, 8), torch.zeros(4, 8, 12)
    samples = [mods.dataset.TrainSample(latents=[latent], caption=caption, source=f"{i}.png", conditioning=conditioning)
               for i, latent in enumerate((square, wide))]
    conditioner = mods.conditioning.CaptionConditioner(sdxl, None, CPU, trains_text_encoder=False)
    with torch.inference_mode():
        got = [conditioner.batch([caption], [s], s.latent)["y"].cond for s in samples]
        expected = [mods.runtime.encode_sample_conds(sdxl, conditioning, s.latent, CPU)["y"].cond for s in samples]
    assert not torch.equal(expected[0], expected[1]), "the two sizes should condition differently"
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=0, atol=0)


def test_the_base_encodes_stay_the_base_once_the_text_encoder_trained(pack, base, mods, tmp_path):
    """The teacher of prior_target="base_model" encodes class captions as the untrained CLIP does, also after the
    trained path has memoized the same caption (DreamBooth's text_encoder_fraction stops the text encoder midway,
    after which both paths memoize)."""
    model, clip, _ = base
    data = dataset_with_class_images(pack, base, tmp_path / "data")
    options = {"rank": 4, "alpha": 4.0, "train_text_encoder": True}
    job = pack.job.TrainJob(method="lora", steps=3, batch_size=2, learning_rate=1e-2, text_encoder_lr=1e-2, seed=4,
                            method_options=options, prior_target="base_model", prior_loss_weight=1.0)
    method = pack.methods.create_method("lora", options)
    with torch.inference_mode():
        result = pack.loop.train(job, method, model, clip, data, checkpoint_dir=tmp_path / "ckpt", reporter=None)
    # In the loop too: each step encodes its instance and class captions on the trained path, and the teacher
    # each distinct class caption once per run.
    distinct_class_captions = len({s.caption for s in data.class_samples})
    assert result.summary["text_encode_calls"] == job.steps * 2 * job.batch_size + distinct_class_captions
    sample = data.class_samples[0]
    patcher, trained_clip = result.attached.model, result.attached.clip
    conditioner = mods.conditioning.CaptionConditioner(patcher, trained_clip, CPU, trains_text_encoder=True)
    conditioner.stop_text_encoder_training()
    with torch.inference_mode():
        expected = mods.runtime.encode_sample_conds(
            patcher, mods.dataset.encode_captions(clip, [sample.caption])[0], sample.latent, CPU)["c_crossattn"].cond
        trained = conditioner.batch([sample.caption], [sample], sample.latent)["c_crossattn"].cond
        with method.base_behaviour():
            taught = conditioner.base_batch([sample.caption], [sample], sample.latent)["c_crossattn"].cond
            again = conditioner.base_batch([sample.caption], [sample], sample.latent)["c_crossattn"].cond
    assert not torch.allclose(trained, expected, atol=1e-5), "the text-encoder LoRA did not train"
    torch.testing.assert_close(taught, expected, rtol=0, atol=1e-6)
    assert again is taught or torch.equal(again, taught)
    calls = conditioner.encode_calls
    with torch.inference_mode(), method.base_behaviour():
        conditioner.base_batch([sample.caption] * 2, [sample] * 2, sample.latent)
    assert conditioner.encode_calls == calls, "a base encode ran again: it never changes, so it is memoized"


def test_the_memo_keeps_only_the_most_recent_captions(pack, base, mods):
    """Caption shuffle/dropout makes a new variant nearly every step: the memo keeps `memo_entries` of them (the
    most recently used), so a long run does not fill the device with conds, and an evicted caption encodes again
    to the same conds."""
    model, clip, _ = base
    latent = torch.zeros(4, 8, 8)
    captions = [f"a photo of sks, tag{i}" for i in range(5)]
    samples = [mods.dataset.TrainSample(latents=[latent], caption=c, source=f"{i}.png") for i, c in enumerate(captions)]
    conditioner = mods.conditioning.CaptionConditioner(model, clip, CPU, trains_text_encoder=False)
    conditioner.memo_entries = 3
    with torch.inference_mode():
        first = conditioner.batch(captions[:1], samples[:1], latent)["c_crossattn"].cond
        for caption, sample in zip(captions[1:], samples[1:]):
            conditioner.batch([caption], [sample], latent)
            conditioner.batch(captions[:1], samples[:1], latent)  # used every step: stays
        assert len(conditioner._memo) == 3
        calls = conditioner.encode_calls
        assert torch.equal(conditioner.batch(captions[:1], samples[:1], latent)["c_crossattn"].cond, first)
        assert conditioner.encode_calls == calls, "the most recently used caption was evicted"
        again = conditioner.batch(captions[1:2], samples[1:2], latent)["c_crossattn"].cond  # evicted: encodes again
    assert conditioner.encode_calls == calls + 1
    with torch.inference_mode():
        expected = mods.runtime.encode_sample_conds(model, mods.dataset.encode_captions(clip, captions[1:2])[0], latent,
                                                    CPU)["c_crossattn"].cond
    torch.testing.assert_close(again, expected, rtol=0, atol=0)


def test_a_textual_inversion_clip_reuses_the_dataset_encodes_only_without_its_words(comfy_runtime, base, mods):
    """Dataset built with the checkpoint's CLIP, LoRA trained with a textual-inversion CLIP (its source's weights and
    patches, plus a word): a caption with the word is encoded by that CLIP (the dataset's encode read the word as
    plain text), a caption without it keeps the dataset's encode, which that CLIP would reproduce exactly."""
    ti = comfy_runtime.pack_import("trainers.methods.textual_inversion")
    model, clip, _ = base
    word_clip = ti.with_words(clip, {"<c>": {"clip_l": torch.randn(2, 768, generator=torch.Generator().manual_seed(0))}})
    latent = torch.zeros(4, 8, 8)
    with torch.inference_mode():
        samples = [mods.dataset.TrainSample(latents=[latent], caption=c, source=f"{i}.png",
                                            conditioning=mods.dataset.encode_captions(clip, [c])[0])
                   for i, c in enumerate(("a photo of <c> cross", "a photo of a cross"))]
        conditioner = mods.conditioning.CaptionConditioner(model, word_clip, CPU, trains_text_encoder=False,
                                                           dataset_clip_key=mods.dataset.clip_identity(clip))
        got = [conditioner.batch([s.caption], [s], latent)["c_crossattn"].cond for s in samples]
        with_word = mods.dataset.encode_captions(word_clip, [samples[0].caption])[0][0][0]
    torch.testing.assert_close(got[0], with_word, rtol=0, atol=0)
    torch.testing.assert_close(got[1], samples[1].conditioning[0][0], rtol=0, atol=0)
    assert not torch.equal(with_word, samples[0].conditioning[0][0])
