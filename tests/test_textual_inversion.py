"""Textual inversion: the saved file, read by stock ComfyUI for `embedding:name`, gives exactly the trained
vectors; only the token vectors train; templates and resume are deterministic; bad inputs are named."""
import pytest
import torch

import comfy.model_management
from training import cancel_then_resume, dataset_with_class_images

TOKEN = "<sks-cross>"


@pytest.fixture(scope="module")
def ti(comfy_runtime):
    return comfy_runtime.pack_import("trainers.methods.textual_inversion")


@pytest.fixture(scope="module")
def emb_format(comfy_runtime):
    return comfy_runtime.pack_import("trainers.formats.embedding")


@pytest.fixture(scope="module")
def data(pack, base, tmp_path_factory):
    from harness import make_sample_dataset
    folder = tmp_path_factory.mktemp("ti-data")
    make_sample_dataset(folder, n=4, size=64, seed=3, subject="sks")
    _, clip, vae = base
    with torch.inference_mode():
        spec = pack.build.DatasetSpec(folder=str(folder), resolution=64, buckets=False, use_cache=False)
        return pack.build.build_training_data(spec, vae, clip)[0]


def _train(pack, base, data, tmp_path, steps=4, resume=None, reporter=None, lr=5e-2, **options):
    model, clip, _ = base
    options = {"token": TOKEN, "vectors": 2, "init_word": "cross", "captions": "object", **options}
    job = pack.job.TrainJob(method="textual_inversion", steps=steps, batch_size=2, learning_rate=lr, seed=1,
                            method_options=options)
    method = pack.methods.create_method("textual_inversion", options)
    with torch.inference_mode():
        result = pack.loop.train(job, method, model, clip, data, checkpoint_dir=tmp_path, resume_from=resume,
                                 reporter=reporter)
    return result, method


def _encode(clip, text):
    with torch.inference_mode():
        return clip.encode_from_tokens_scheduled(clip.tokenize(text))[0][0]


def _table(clip):
    return clip.cond_stage_model.clip_l.transformer.get_input_embeddings().weight


@pytest.fixture(scope="module")
def trained(pack, base, data, tmp_path_factory):
    """One run shared by the tests below (8 steps, captions mode): base state before, the run, the method."""
    model, clip, _ = base
    # The session's base module is shared: a clone with weight patches that another test left loaded patches it in
    # place. Unload everything so that "before" holds the unpatched weights.
    comfy.model_management.unload_all_models()
    before = {"model": {k: v.clone() for k, v in model.model.state_dict().items()},
              "clip": {k: v.clone() for k, v in clip.cond_stage_model.state_dict().items()},
              "plain": _encode(clip, f"a photo of {TOKEN}")}
    result, method = _train(pack, base, data, tmp_path_factory.mktemp("ti-run"), steps=8, captions="captions",
                            trigger="sks", lr=0.1)
    return before, result, method


def test_stock_clip_text_encode_reads_the_saved_vectors(base, trained, comfy_runtime, ti, emb_format, tiny_checkpoint):
    """SD1 end to end: stock CheckpointLoaderSimple's CLIP + CLIPTextEncode with embedding:name."""
    model, clip, _ = base
    before, _, method = trained
    vectors = method.export()
    assert set(vectors) == {"clip_l"} and vectors["clip_l"].shape == (2, 768)
    init = ti.initial_vectors(_table(clip), ti.word_ids(clip.tokenizer.clip_l, "cross"), 2, torch.Generator())
    assert not torch.equal(vectors["clip_l"], init), "the vectors did not train"

    folder = comfy_runtime.folder("embeddings") / "tests"
    emb_format.write_embedding(folder / "ti_e2e.safetensors", vectors, "safetensors", name="ti_e2e", step=3, metadata={})
    from safetensors.torch import load_file
    assert set(load_file(folder / "ti_e2e.safetensors")) == {"emb_params"}
    nodes = comfy_runtime.nodes
    with torch.inference_mode():
        stock_clip = nodes.CheckpointLoaderSimple().load_checkpoint(tiny_checkpoint)[1]
        stock_cond = nodes.CLIPTextEncode().encode(stock_clip, "a photo of embedding:tests/ti_e2e, cross")[0][0][0]
        tokens = stock_clip.tokenize("a photo of embedding:tests/ti_e2e, cross")["l"][0]
        embeds = stock_clip.cond_stage_model.clip_l.process_tokens([[t for t, _ in tokens]], "cpu")[0]
    # <start> a photo of <v0> <v1> , cross: the vectors sit exactly at positions 4 and 5.
    assert torch.equal(embeds[0, 4:6], vectors["clip_l"])
    ours = _encode(method.trained_clip(clip), f"a photo of {TOKEN}, cross")
    torch.testing.assert_close(ours, stock_cond, rtol=0, atol=1e-6)
    # Only the new rows trained: every weight of the model and the text encoder is bit-identical.
    assert all(torch.equal(before["model"][k], v) for k, v in model.model.state_dict().items())
    assert all(torch.equal(before["clip"][k], v) for k, v in clip.cond_stage_model.state_dict().items())
    # The input CLIP (a sibling branch) still reads the token as plain text.
    assert torch.equal(_encode(clip, f"a photo of {TOKEN}"), before["plain"])


def _fixed_loss(model, clip, data, text):
    """Denoising MSE on fixed noise at three noise levels: the same draw before and after training."""
    import comfy.model_management
    import comfy.sampler_helpers
    import comfy.samplers
    latents = torch.stack([s.latent for s in data.samples])
    generator, total = torch.Generator().manual_seed(0), 0.0
    with torch.inference_mode():
        cond = clip.encode_from_tokens_scheduled(clip.tokenize(text))
        comfy.model_management.load_models_gpu([model])
        conds = comfy.samplers.encode_model_conds(model.model.extra_conds, comfy.sampler_helpers.convert_cond(cond),
                                                  latents, latents.device, "positive")
        x0 = model.model.process_latent_in(latents)
        for sigma in (0.5, 1.5, 4.0):
            noisy = x0 + sigma * torch.randn(x0.shape, generator=generator)
            sigmas = torch.full((len(x0),), sigma)
            denoised = comfy.samplers.calc_cond_batch(model.model, [conds], noisy, sigmas, model.model_options)[0]
            total += torch.nn.functional.mse_loss(denoised, x0).item()
    return total


def test_loss_falls(base, data, trained, ti):
    model, clip, _ = base
    _, _, method = trained
    init = ti.initial_vectors(_table(clip), ti.word_ids(clip.tokenizer.clip_l, "cross"), 2, torch.Generator())
    prompt = data.samples[0].caption.replace("sks", TOKEN)
    before = _fixed_loss(model, ti.with_words(clip, {TOKEN: {"clip_l": init}}), data, prompt)
    after = _fixed_loss(model, method.trained_clip(clip), data, prompt)
    assert after < 0.95 * before, (before, after)


def test_resume_is_exact_with_templates(pack, base, data, tmp_path):
    (whole_result, whole), (resumed_result, resumed) = cancel_then_resume(
        pack.progress, lambda folder, **kw: _train(pack, base, data, folder, steps=3, **kw), tmp_path, total=3)
    assert torch.equal(whole.export()["clip_l"], resumed.export()["clip_l"])
    assert whole_result.loss_history == resumed_result.loss_history


def test_captions_and_templates(ti):
    captions = ti.TextualInversionMethod(token=TOKEN, captions="captions", trigger="sks")
    assert captions.training_captions(["a photo of sks cross", "a red ball", ""]) == [
        f"a photo of {TOKEN} cross", f"{TOKEN}, a red ball", ""]
    style = ti.TextualInversionMethod(token=TOKEN, captions="style")
    torch.manual_seed(0)
    drawn = style.training_captions(["x"] * 8)
    assert all(TOKEN in c and "style of" in c for c in drawn) and len(set(drawn)) > 1


def test_init_word_of_several_tokens_is_spread_over_the_vectors(base, ti):
    _, clip, _ = base
    table = _table(clip)
    ids = ti.word_ids(clip.tokenizer.clip_l, "red cross ball")
    assert len(ids) == 3
    rows = table[ids].float()
    one = ti.initial_vectors(table, ids, 1, torch.Generator())
    torch.testing.assert_close(one[0], rows.mean(0))  # fewer vectors: each the mean of its share
    six = ti.initial_vectors(table, ids, 6, torch.Generator())
    assert all(torch.equal(six[i], rows[i // 2]) for i in range(6))  # more vectors: tokens repeat in order
    random = ti.initial_vectors(table, [], 2, torch.Generator().manual_seed(0))
    assert random.shape == (2, 768) and 0.2 < random.std() / table.float().std() < 5


def test_bad_inputs_name_the_input(pack, base, ti):
    _, clip, _ = base
    with pytest.raises(ValueError, match="`token`.*already exists in the CLIP vocabulary"):
        pack.methods.create_method("textual_inversion", {"token": "cat"}).attach(base[0], clip, torch.Generator())
    with pytest.raises(ValueError, match="`vectors`"):
        pack.methods.create_method("textual_inversion", {"vectors": 0})
    with pytest.raises(ValueError, match="`token`"):
        pack.methods.create_method("textual_inversion", {"token": "two words"})
    with pytest.raises(ValueError, match="`token`.*not ending in '.'"):  # a prompt's full stop: never looked up
        pack.methods.create_method("textual_inversion", {"token": "v2."})
    with pytest.raises(ValueError, match="`captions`"):
        pack.methods.create_method("textual_inversion", {"captions": "poem"})
    with pytest.raises(ValueError, match="`embedding_fraction`"):
        pack.methods.create_method("pivotal", {"embedding_fraction": 0})


def _small_sdxl_clip():
    """SDXL's real CLIP classes (clip_l + clip_g, SDXLTokenizer) with 3 layers each and random weights."""
    import comfy.sd
    import comfy.sdxl_clip
    import comfy.supported_models_base
    target = comfy.supported_models_base.ClipTarget(comfy.sdxl_clip.SDXLTokenizer, comfy.sdxl_clip.SDXLClipModel)
    small = {"num_hidden_layers": 3}
    clip = comfy.sd.CLIP(target, model_options={"dtype": torch.float32, "clip_l_model_config": small,
                                                "clip_g_model_config": small})
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in clip.cond_stage_model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
    return clip


def test_sdxl_layout_reads_back_through_comfyui_sdxl_tokenizer(comfy_runtime, base, ti, emb_format, tmp_path):
    """SDXL: one vector set per encoder, saved as clip_l/clip_g, read by SDXLTokenizer's embedding path."""
    import comfy.sdxl_clip
    clip = _small_sdxl_clip()
    method = ti.TextualInversionMethod(token=TOKEN, vectors=2, init_word="cross")
    attached = method.attach(base[0], clip, torch.Generator())  # attach only clones the MODEL
    assert {k: tuple(v.shape) for k, v in method.vectors.items()} == {"clip_l": (2, 768), "clip_g": (2, 1280)}
    runtime = comfy_runtime.pack_import("trainers.model_runtime")
    with runtime.trainable_text_encoder(attached.clip.cond_stage_model, True):
        cond, extra = attached.clip.encode_from_tokens_scheduled(attached.clip.tokenize(f"a photo of {TOKEN}"))[0]
        (cond.sum() + extra["pooled_output"].sum()).backward()
    assert all(v.grad is not None and v.grad.abs().sum() > 0 for v in method.vectors.values()), "no gradient reaches a vector"
    with torch.no_grad():
        for v in method.vectors.values():
            v.add_(0.01)
    vectors = method.export()
    emb_format.write_embedding(tmp_path / "sdxl_ti.safetensors", vectors, "safetensors", name="sdxl_ti", step=1, metadata={})
    from safetensors.torch import load_file
    assert set(load_file(tmp_path / "sdxl_ti.safetensors")) == {"clip_l", "clip_g"}
    stock = clip.clone()
    stock.tokenizer = comfy.sdxl_clip.SDXLTokenizer(embedding_directory=str(tmp_path))
    tokens = stock.tokenize("a photo of embedding:sdxl_ti cross")
    for key, encoder in (("l", "clip_l"), ("g", "clip_g")):
        spliced = [t for t, _ in tokens[key][0] if torch.is_tensor(t)]
        assert len(spliced) == 2 and all(torch.equal(s, v) for s, v in zip(spliced, vectors[encoder]))
    with torch.inference_mode():
        ours = method.trained_clip(clip).encode_from_tokens_scheduled(method.trained_clip(clip).tokenize(f"a photo of {TOKEN} cross"))[0]
        theirs = stock.encode_from_tokens_scheduled(tokens)[0]
    torch.testing.assert_close(ours[0], theirs[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(ours[1]["pooled_output"], theirs[1]["pooled_output"], rtol=0, atol=1e-6)


def test_pivotal_trains_the_token_for_its_fraction_only(pack, base, data, tmp_path):
    model, clip, _ = base
    options = {"lora": {"rank": 2, "alpha": 2.0, "targets": "attention"},
               "embedding": {"token": TOKEN, "vectors": 2, "init_word": "cross", "trigger": "sks"},
               "embedding_lr": 5e-2, "embedding_fraction": 0.5}
    job = pack.job.TrainJob(method="pivotal", steps=4, batch_size=2, learning_rate=1e-3, seed=1, method_options=options,
                            checkpoint_every=2)
    method = pack.methods.create_method("pivotal", options)
    with torch.inference_mode():
        result = pack.loop.train(job, method, model, clip, data, checkpoint_dir=tmp_path)
    halfway = pack.loop.ckpt.load_state(tmp_path / "step_0000002.pt")["method_state"]
    final = method.trainable_state_dict()
    assert torch.equal(halfway["embedding.clip_l"], final["embedding.clip_l"]), "the token trained past its fraction"
    # Past the fraction the text encoder runs without gradients, once per distinct caption.
    assert all(p.grad is None for g in result.attached.groups if g.name == "embedding" for p in g.params)
    assert result.summary["text_encode_calls"] <= 2 * job.batch_size + len(data)
    lora_keys = [k for k in final if k.startswith("lora.") and k.endswith("lora_up.weight")]
    assert lora_keys and any(not torch.equal(halfway[k], final[k]) for k in lora_keys), "the LoRA stopped training"
    exported = method.export()
    assert set(exported) == {"lora", "embedding"} and exported["embedding"]["clip_l"].shape == (2, 768)


def _dataset_node(folder):
    return {"class_type": "PersonalizeDatasetFromFolder", "inputs": {
        "folder": str(folder), "vae": ["1", 2], "clip": ["1", 1], "resolution": 64, "buckets": False, "bucket_step": 64,
        "min_side": 0, "max_side": 0, "no_upscale": False, "crop": "center", "crop_variants": 1, "flip": False,
        "trigger_word": "sks", "instance_prompt": "", "shuffle_tags": False, "keep_tokens": 0, "tag_dropout": 0.0,
        "caption_dropout": 0.0, "masked_loss": False, "seed": 0, "use_cache": False}}


_COMMON = {"batch_size": 2, "grad_accumulation": 1, "optimizer": "adamw", "lr_scheduler": "constant", "warmup_steps": 0,
           "loss_type": "mse", "min_snr_gamma": 5.0, "noise_offset": 0.0, "max_grad_norm": 1.0, "precision": "fp32",
           "gradient_checkpointing": False, "seed": 0, "checkpoint_every": 0, "resume": ""}
_TOKEN_INPUTS = {"token": TOKEN, "vectors": 2, "init_word": "cross", "trigger_word": ""}


def test_nodes_train_save_and_stock_clip_text_encode_in_a_graph(comfy_runtime, tiny_checkpoint, tmp_path):
    from harness import make_sample_dataset, txt2img_graph
    folder = tmp_path / "data"
    make_sample_dataset(folder, n=2, size=64, seed=4, subject="sks")
    graph = txt2img_graph(tiny_checkpoint, positive=f"a photo of {TOKEN} cross", steps=2, prefix="ti_trained")
    graph.update({
        "20": _dataset_node(folder),
        "21": {"class_type": "PersonalizeTrainTextualInversion", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "dataset": ["20", 0], "steps": 2, "learning_rate": 5e-3,
            "captions": "captions", "run_name": "ti_node", **_TOKEN_INPUTS, **_COMMON}},
        "22": {"class_type": "PersonalizeSaveEmbedding", "inputs": {"embedding": ["21", 1], "name": "tests/ti_node",
                                                                    "format": "safetensors"}},
        "23": {"class_type": "PersonalizeSaveEmbedding", "inputs": {"embedding": ["21", 1], "name": "tests/ti_node_a1111",
                                                                    "format": "a1111_pt"}},
        "24": {"class_type": "PersonalizeSaveEmbedding", "inputs": {"embedding": ["21", 1], "name": "tests/ti_clash",
                                                                    "format": "safetensors"}},
    })
    graph["2"]["inputs"]["clip"] = ["21", 0]  # the returned CLIP knows the token
    embeddings = comfy_runtime.folder("embeddings") / "tests"
    embeddings.mkdir(parents=True, exist_ok=True)
    (embeddings / "ti_clash.pt").write_bytes(b"an older embedding")  # embedding:tests/ti_clash would load it
    result = comfy_runtime.run_prompt(graph)
    saved = result["outputs"]["22"]["text"][0]
    assert "embedding:tests/ti_node" in saved
    clash = result["outputs"]["24"]["text"][0]
    assert "embedding:tests/ti_clash_00001" in clash and (embeddings / "ti_clash_00001.safetensors").is_file()
    assert (embeddings / "ti_clash.pt").read_bytes() == b"an older embedding"
    a1111 = torch.load(next(embeddings.glob("ti_node_a1111*.pt")), weights_only=True)
    assert a1111["string_to_param"]["*"].shape == (2, 768)
    stock = txt2img_graph(tiny_checkpoint, positive="a photo of embedding:tests/ti_node cross", steps=2, prefix="ti_stock")
    mark = comfy_runtime.log_mark()
    comfy_runtime.run_prompt(stock)
    assert "does not exist" not in comfy_runtime.log_since(mark)
    with pytest.raises(Exception, match="`name`"):
        graph["22"]["inputs"]["name"] = "../escape"
        comfy_runtime.run_prompt(graph)


def test_pivotal_example_trains_saves_and_loads_with_stock_nodes(comfy_runtime, tiny_checkpoint, tmp_path):
    """The example workflows at tiny sizes: train + save under one name, then stock LoraLoader + embedding:name."""
    import copy
    import json

    from harness import make_sample_dataset
    from workflows import EXAMPLES
    folder = tmp_path / "data"
    make_sample_dataset(folder, n=2, size=64, seed=5, subject="sks")
    train = json.loads((EXAMPLES / "personalize_pivotal_api.json").read_text())
    train["1"]["inputs"]["ckpt_name"] = tiny_checkpoint
    train["2"]["inputs"].update(folder=str(folder), resolution=64, bucket_step=32, crop_variants=1, use_cache=False)
    train["3"]["inputs"].update(steps=2, rank=2, alpha=2.0, batch_size=2, embedding_lr=5e-3, learning_rate=1e-3,
                                checkpoint_every=0, precision="fp32", run_name="pivotal_example")
    train["4"]["inputs"]["name"] = "tests/pivotal"
    train["7"]["inputs"].update(width=64, height=64)
    train["8"]["inputs"].update(steps=2, cfg=1.0)
    text = comfy_runtime.run_prompt(train)["outputs"]["4"]["text"][0]
    lora_file = max((comfy_runtime.folder("loras") / "tests").glob("pivotal*.safetensors"), key=lambda p: p.stat().st_mtime)
    assert (comfy_runtime.folder("embeddings") / "tests" / lora_file.name).is_file() and lora_file.stem in text
    load = copy.deepcopy(json.loads((EXAMPLES / "personalize_pivotal_load_api.json").read_text()))
    load["1"]["inputs"]["ckpt_name"] = tiny_checkpoint
    load["2"]["inputs"]["lora_name"] = f"tests/{lora_file.name}"
    load["3"]["inputs"]["text"] = f"a photo of embedding:tests/{lora_file.stem}, in blue"
    load["5"]["inputs"].update(width=64, height=64)
    load["6"]["inputs"].update(steps=2, cfg=1.0)
    mark = comfy_runtime.log_mark()
    comfy_runtime.run_prompt(load)
    log = comfy_runtime.log_since(mark)
    assert "does not exist" not in log and "lora key not loaded" not in log


@pytest.mark.server
def test_pivotal_ui_workflows_are_their_api_twins(comfy_server):
    import json

    from test_example_workflows import ui_to_api
    from workflows import EXAMPLES
    for stem in ("personalize_pivotal", "personalize_pivotal_load"):
        ui = json.loads((EXAMPLES / f"{stem}.json").read_text())
        assert ui_to_api(ui, comfy_server.object_info()) == json.loads((EXAMPLES / f"{stem}_api.json").read_text())


def test_token_free_captions_take_the_frozen_path_once(pack, base, tmp_path):
    """Pivotal tuning with class images: class captions keep their class prompt (the token rewrite is for instance
    captions only) and, not using the token, encode once each, without gradients (as the frozen CLIP encodes them),
    while every instance caption goes through the trained token each step. Before, the token was put into every class
    caption too, which trained it on the class images and re-encoded them with gradients on every step."""
    model, clip, _ = base
    data = dataset_with_class_images(pack, base, tmp_path / "data", seed=3)
    assert all(TOKEN not in s.caption for s in data.class_samples)
    options = {"lora": {"rank": 2, "alpha": 2.0, "targets": "attention"},
               "embedding": {"token": TOKEN, "vectors": 2, "init_word": "cross", "trigger": "sks"},
               "embedding_lr": 5e-2, "embedding_fraction": 1.0}
    steps = 3
    job = pack.job.TrainJob(method="pivotal", steps=steps, batch_size=2, learning_rate=1e-3, seed=1, method_options=options,
                            prior_target="base_model")
    method = pack.methods.create_method("pivotal", options)
    with torch.inference_mode():
        result = pack.loop.train(job, method, model, clip, data, checkpoint_dir=tmp_path / "run")
    distinct_class_captions = len({s.caption for s in data.class_samples})
    calls = result.summary["text_encode_calls"]
    assert steps * job.batch_size <= calls <= steps * job.batch_size + distinct_class_captions, calls
    assert result.attached.trained_words == (TOKEN,)
