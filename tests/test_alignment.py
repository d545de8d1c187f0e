"""Prompt alignment: an alignment prompt ("a green sks thing") learns to predict the trained subject plus the base
model's direction for its other words, on the real engine and through the node in a real graph."""
import pytest
import torch
from training import cancel_then_resume, denoise_x0

ALIGNMENT = {"subject_prompt": "a photo of sks", "identifier": "sks",
             "prompts": ["a green photo of sks", "a photo of sks in the snow"], "guidance": 3.0, "weight": 1.0}


@pytest.fixture(scope="module")
def data(pack, base, tmp_path_factory):
    from harness import make_sample_dataset
    folder = tmp_path_factory.mktemp("alignment-data")
    make_sample_dataset(folder, n=2, size=64, seed=2, subject="sks")
    _, clip, vae = base
    with torch.inference_mode():
        spec = pack.build.DatasetSpec(folder=str(folder), resolution=64, buckets=False, use_cache=False)
        return pack.build.build_training_data(spec, vae, clip)[0]


@pytest.fixture(scope="module")
def alignment_mod(comfy_runtime):
    return comfy_runtime.pack_import("trainers.alignment")


def _train(pack, base, data, folder, method_name="lora", options=None, *, steps=12, lr=1e-2, alignment=ALIGNMENT,
           reporter=None, resume=None):
    model, clip, _ = base
    options = options or {"rank": 4, "alpha": 4.0}
    job = pack.job.TrainJob(method=method_name, steps=steps, batch_size=2, learning_rate=lr, seed=7,
                            method_options=options, min_snr_gamma=0.0, prompt_alignment=alignment)
    method = pack.methods.create_method(method_name, options)
    with torch.inference_mode():
        result = pack.loop.train(job, method, model, clip, data, checkpoint_dir=folder, reporter=reporter,
                                 resume_from=resume)
    return result, method


def _encode(clip, text):
    with torch.inference_mode():
        return clip.encode_from_tokens_scheduled(clip.tokenize(text))


def _distance_to_composed_target(base, trained_model, latent, prompt, base_prompt):
    """|trained(P) - (trained(S) + 3 * (base(P_b) - base(C)))| at a few noise levels, relative to |trained(P)|."""
    model, clip, _ = base
    errors, norms = [], []
    for sigma in (1.0, 3.0, 8.0):
        pred = denoise_x0(trained_model, _encode(clip, prompt), latent, sigma)
        target = (denoise_x0(trained_model, _encode(clip, ALIGNMENT["subject_prompt"]), latent, sigma)
                  + 3.0 * (denoise_x0(model, _encode(clip, base_prompt), latent, sigma)
                           - denoise_x0(model, _encode(clip, "a photo of"), latent, sigma)))
        errors.append((pred - target).norm())
        norms.append(pred.norm())
    return float(sum(errors) / sum(norms))


def test_alignment_prompts_learn_the_composed_target(pack, base, data, tmp_path):
    """LoRA with and without alignment, same seed and steps: with it, the trained model's prediction for an
    alignment prompt is much closer to 'its own subject prediction + 3 x the base model's direction for the other
    words'; the subject is still learned (the instance loss falls as it does without)."""
    latent = data.samples[0].latent[None]
    plain, _ = _train(pack, base, data, tmp_path / "plain", steps=40, alignment=None)
    aligned, _ = _train(pack, base, data, tmp_path / "aligned", steps=40)
    for prompt, base_prompt in (("a green photo of sks", "a green photo of"),
                                ("a photo of sks in the snow", "a photo of in the snow")):
        without = _distance_to_composed_target(base, plain.attached.model, latent, prompt, base_prompt)
        with_it = _distance_to_composed_target(base, aligned.attached.model, latent, prompt, base_prompt)
        assert with_it < 0.7 * without, (prompt, with_it, without)
    assert aligned.loss_history[-1] < aligned.loss_history[0]


def test_textual_inversion_aligns_through_its_token(pack, base, data, tmp_path):
    """Textual inversion leaves the UNet alone, so the model itself is the base for prompts without the token: the
    alignment term trains the token (the vectors differ from a run without it), written as the token in prompts."""
    options = {"token": "<align-tok>", "vectors": 1, "init_word": "photo", "trigger": "sks"}
    token_alignment = {**ALIGNMENT, "identifier": "<align-tok>", "subject_prompt": "a photo of <align-tok>",
                       "prompts": ["a green photo of <align-tok>"]}
    _, plain = _train(pack, base, data, tmp_path / "plain", "textual_inversion", options, steps=3, lr=1e-2,
                      alignment=None)
    _, aligned = _train(pack, base, data, tmp_path / "aligned", "textual_inversion", options, steps=3, lr=1e-2,
                        alignment=token_alignment)
    assert not torch.allclose(plain.export()["clip_l"], aligned.export()["clip_l"], atol=1e-6)


def test_cancel_then_resume_with_alignment_equals_one_run(pack, base, data, tmp_path):
    """The alignment draws (images, prompts, noise) depend only on (seed, step): a resumed run is bit-identical."""
    (_, whole), (result, resumed) = cancel_then_resume(
        pack.progress, lambda folder, **kw: _train(pack, base, data, folder, steps=4, **kw), tmp_path, total=4)
    assert result.global_step == 4
    expected, got = whole.export(), resumed.export()
    assert all(torch.equal(expected[k], got[k]) for k in expected)


def test_a_method_without_base_predictions_is_refused(pack, alignment_mod, base):
    """A ControlNet run cannot switch its weights off to give base predictions: the error names alignment."""
    method = pack.methods.create_method("controlnet", {})
    attached = pack.methods.Attached(model=base[0], clip=None, groups=[])
    with pytest.raises(ValueError, match="prompt alignment needs the base model"):
        alignment_mod.teacher(method, attached)


@pytest.mark.parametrize("change, needle", [
    ({"identifier": ""}, "`identifier`"),
    ({"identifier": "two words"}, "`identifier`"),
    ({"subject_prompt": "a photo of a dog"}, "`subject_prompt`"),
    ({"prompts": []}, "`prompts` is empty"),
    ({"prompts": ["a green dog"]}, "'a green dog' does not contain the identifier"),
    ({"guidance": -1.0}, "`guidance`"),
    ({"weight": 0.0}, "`weight`"),
])
def test_bad_alignment_settings_name_the_input(pack, change, needle):
    with pytest.raises(ValueError, match=needle):
        pack.job.TrainJob(prompt_alignment={**ALIGNMENT, **change})


def test_base_prompts_drop_the_identifier_word_only(alignment_mod):
    alignment = alignment_mod.PromptAlignment(subject_prompt="a sks dog", identifier="sks",
                                              prompts=("a blue sks dog, sksx style",))
    assert alignment.class_prompt == "a dog"
    assert alignment.base_prompt("a blue sks dog, sksx style") == "a blue dog, sksx style"


def test_the_node_feeds_a_training_node_in_a_graph(comfy_runtime, tiny_checkpoint, tmp_path):
    """Personalize Prompt Alignment -> Personalize Train LoRA in a real graph: the run's checkpoint records the
    alignment; a prompt without the identifier fails the node with the reason."""
    from harness import make_sample_dataset
    folder = tmp_path / "data"
    make_sample_dataset(folder, n=2, size=64, seed=4, subject="sks")
    common = {"batch_size": 2, "grad_accumulation": 1, "optimizer": "adamw", "lr_scheduler": "constant",
              "warmup_steps": 0, "loss_type": "mse", "min_snr_gamma": 0.0, "noise_offset": 0.0, "max_grad_norm": 1.0,
              "precision": "fp32", "gradient_checkpointing": False, "seed": 0, "checkpoint_every": 0, "resume": ""}

    def graph(prompts):
        return {
            "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": tiny_checkpoint}},
            "2": {"class_type": "PersonalizeDatasetFromFolder", "inputs": {
                "folder": str(folder), "vae": ["1", 2], "clip": ["1", 1], "resolution": 64, "buckets": False,
                "bucket_step": 64, "min_side": 0, "max_side": 0, "no_upscale": False, "crop": "center",
                "crop_variants": 1, "flip": False, "trigger_word": "", "instance_prompt": "", "shuffle_tags": False,
                "keep_tokens": 0, "tag_dropout": 0.0, "caption_dropout": 0.0, "masked_loss": False, "seed": 0,
                "use_cache": False}},
            "3": {"class_type": "PersonalizePromptAlignment", "inputs": {
                "subject_prompt": "a photo of sks", "identifier": "sks", "prompts": prompts, "guidance": 3.0,
                "weight": 1.0}},
            "4": {"class_type": "PersonalizeTrainLoRA", "inputs": {
                "model": ["1", 0], "clip": ["1", 1], "dataset": ["2", 0], "steps": 2, "learning_rate": 1e-4, "rank": 2,
                "alpha": 2.0, "targets": "attention", "train_text_encoder": False, "text_encoder_lr": 0.0,
                "dora": False, "initial_lora": "[none]", "run_name": "aligned", "alignment": ["3", 0], **common}},
            "5": {"class_type": "PreviewAny", "inputs": {"source": ["4", 4]}},
        }

    result = comfy_runtime.run_prompt(graph("a green photo of sks\n\na photo of sks in the snow\n"))
    checkpoint = result["outputs"]["5"]["text"][0]
    state = comfy_runtime.pack_import("trainers.checkpoint").load_state(checkpoint)
    assert state["job"]["prompt_alignment"]["prompts"] == ["a green photo of sks", "a photo of sks in the snow"]
    failed = comfy_runtime.run_prompt(graph("a green photo of a dog"), check=False)
    assert failed["status"]["status_str"] == "error" and "does not contain the identifier" in str(failed["status"])
