"""Hypernetwork training: the saved A1111 file loads in stock HypernetworkLoader and computes what the
model computed at the end of training; the base stays untouched; resume is exact; pickles are refused."""
import pickle

import pytest
import torch
from training import cancel_then_resume



@pytest.fixture(scope="module")
def data(pack, base, tmp_path_factory):
    from harness import make_sample_dataset
    folder = tmp_path_factory.mktemp("hn-data")
    make_sample_dataset(folder, n=4, size=64, seed=2, subject="sks")
    _, clip, vae = base
    with torch.inference_mode():
        spec = pack.build.DatasetSpec(folder=str(folder), resolution=64, buckets=False, use_cache=False)
        return pack.build.build_training_data(spec, vae, clip)[0]


def _train(pack, base, data, tmp_path, steps=4, resume=None, reporter=None, **options):
    model, clip, _ = base
    options = {"layer_structure": [1, 2, 1], "activation": "relu", "layer_norm": True, "dropout": True, **options}
    job = pack.job.TrainJob(method="hypernetwork", steps=steps, batch_size=2, learning_rate=1e-3, seed=1,
                            method_options=options)
    method = pack.methods.create_method("hypernetwork", options)
    with torch.inference_mode():
        result = pack.loop.train(job, method, model, clip, data, checkpoint_dir=tmp_path, resume_from=resume, reporter=reporter)
    return result, method


def _denoise(model, data, clip):
    import comfy.model_management
    import comfy.samplers
    import comfy.sampler_helpers
    latent = data.samples[0].latent[None]
    with torch.inference_mode():
        cond = clip.encode_from_tokens_scheduled(clip.tokenize(data.samples[0].caption))
        comfy.model_management.load_models_gpu([model])
        model.model_patches_to(model.load_device)
        conds = comfy.samplers.encode_model_conds(model.model.extra_conds, comfy.sampler_helpers.convert_cond(cond),
                                                  latent, latent.device, "positive")
        x = model.model.process_latent_in(latent) + 2.0 * torch.randn(latent.shape, generator=torch.Generator().manual_seed(0))
        model.pre_run()
        return comfy.samplers.calc_cond_batch(model.model, [conds], x, torch.tensor([2.0]), model.model_options)[0]


def test_saved_file_loads_in_stock_loader_and_matches_training(pack, base, data, tmp_path, comfy_runtime):
    from comfy_extras.nodes_hypernetwork import HypernetworkLoader
    model, clip, _ = base
    before = {k: v.clone() for k, v in model.model.state_dict().items()}
    result, method = _train(pack, base, data, tmp_path, steps=6)
    artifact = method.export(name="test", step=result.global_step)
    folder = comfy_runtime.folder("hypernetworks")
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(artifact, folder / "test_hn.pt")
    stock = HypernetworkLoader().load_hypernetwork(model, "test_hn.pt", 1.0)[0]
    trained_out = _denoise(result.attached.model, data, clip)
    stock_out = _denoise(stock, data, clip)
    base_out = _denoise(model, data, clip)
    assert not torch.allclose(trained_out, base_out, atol=1e-5), "the hypernetwork changed nothing"
    torch.testing.assert_close(stock_out, trained_out, rtol=1e-4, atol=1e-5)
    after = model.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "base weights changed"
    loaded = torch.load(folder / "test_hn.pt", weights_only=True)
    assert loaded["layer_structure"] == [1.0, 2.0, 1.0] and 768 in loaded and 320 in loaded


def _a1111_module(dim, structure, activation, layer_norm, activate_output):
    """A1111's HypernetworkModule layer list for a file with use_dropout False (modules/hypernetworks/hypernetwork.py:
    Linear, activation unless it is the last layer without activate_output, LayerNorm), under its `linear` name."""
    layers = []
    for i in range(len(structure) - 1):
        layers.append(torch.nn.Linear(int(dim * structure[i]), int(dim * structure[i + 1])))
        if activation != "linear" and (i < len(structure) - 2 or activate_output):
            layers.append(torch.nn.ReLU())
        if layer_norm:
            layers.append(torch.nn.LayerNorm(int(dim * structure[i + 1])))
    holder = torch.nn.Module()
    holder.linear = torch.nn.Sequential(*layers)
    return holder


@pytest.mark.parametrize("layer_norm", [False, True])
def test_the_saved_layers_load_strictly_in_a1111s_module(pack, base, data, tmp_path, layer_norm):
    """A1111 loads each width's state dict strictly into `linear.<index>`: bare Sequential indices ("0.weight")
    were refused. Without layer norm A1111 computes what was trained (with it, A1111 and ComfyUI place the last
    activation differently: the names still load)."""
    result, method = _train(pack, base, data, tmp_path, steps=2, layer_norm=layer_norm)
    artifact = method.export(name="a1111", step=result.global_step)
    x = torch.randn(3, 768, generator=torch.Generator().manual_seed(0))
    for index in range(2):
        a1111 = _a1111_module(768, [1, 2, 1], "relu", layer_norm, False)
        a1111.load_state_dict(artifact[768][index], strict=True)
        if not layer_norm:
            with torch.no_grad():
                torch.testing.assert_close(a1111.linear(x), method.modules[768][index].eval()(x))


def test_loss_falls(pack, base, data, tmp_path):
    result, _ = _train(pack, base, data, tmp_path, steps=40, dropout=False)
    history = torch.tensor(result.loss_history)
    assert history[-10:].mean() < 0.9 * history[:10].mean(), history


def test_resume_with_dropout_is_exact(pack, base, data, tmp_path):
    (_, whole), (_, resumed) = cancel_then_resume(
        pack.progress, lambda folder, **kw: _train(pack, base, data, folder, **kw), tmp_path, total=4)
    a, b = whole.trainable_state_dict(), resumed.trainable_state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


class _Payload:
    def __reduce__(self):
        import os
        return (os.system, ("touch /tmp/personalize-pwned",))


def test_the_loaders_dtype_move_leaves_the_trained_weights_in_fp32(pack, base):
    """ComfyUI's loader moves model patches to the UNet's device and then to its dtype (fp16 on a GPU): the
    hypernetwork being trained must keep its fp32 weights (they became fp16, optimizer state included)."""
    import torch
    model, clip, _ = base
    method = pack.methods.create_method("hypernetwork", {})
    with torch.inference_mode(False):
        attached = method.attach(model, clip, torch.Generator().manual_seed(0))
    attached.model.model_patches_to(torch.device("cpu"))
    attached.model.model_patches_to(torch.float16)
    params = [p for g in attached.groups for p in g.params]
    assert params and all(p.dtype == torch.float32 for p in params)


def test_a_pickle_that_runs_code_is_refused(pack, tmp_path):
    import os
    evil = tmp_path / "evil.pt"
    with open(evil, "wb") as f:
        pickle.dump({"format": "comfyui-personalize.resume/1", "x": _Payload()}, f)
    checkpoint = pack.loop.ckpt
    with pytest.raises(ValueError, match="not a readable training checkpoint"):
        checkpoint.load_state(evil)
    assert not os.path.exists("/tmp/personalize-pwned")


def test_bad_options_name_the_field(pack):
    with pytest.raises(ValueError, match="`layer_structure`"):
        pack.methods.create_method("hypernetwork", {"layer_structure": [2, 1]})
    with pytest.raises(ValueError, match="`activation`"):
        pack.methods.create_method("hypernetwork", {"activation": "gelu2"})


def test_nodes_train_save_and_stock_loader_in_graphs(comfy_runtime, tiny_checkpoint, tmp_path):
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
        "3": {"class_type": "PersonalizeTrainHypernetwork", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "dataset": ["2", 0], "steps": 2, "learning_rate": 1e-3,
            "layer_structure": "1, 2, 1", "activation": "relu", "layer_norm": False, "dropout": False,
            "last_layer_dropout": False, "activate_output": False, "weight_init": "normal", "batch_size": 2,
            "grad_accumulation": 1, "optimizer": "adamw", "lr_scheduler": "constant", "warmup_steps": 0, "loss_type": "mse",
            "min_snr_gamma": 5.0, "noise_offset": 0.0, "max_grad_norm": 1.0, "precision": "fp32",
            "gradient_checkpointing": False, "seed": 0, "checkpoint_every": 0, "run_name": "hn", "resume": ""}},
        "4": {"class_type": "PersonalizeSaveHypernetwork", "inputs": {"hypernetwork": ["3", 1], "name": "tests/hn",
                                                                       "checkpoint": ["3", 3]}},
    }
    result = comfy_runtime.run_prompt(graph)
    saved = result["outputs"]["4"]["text"][0].removeprefix("saved ")
    optim = torch.load(comfy_runtime.folder("hypernetworks") / (saved + ".optim"), weights_only=True)
    import hashlib
    assert optim["hash"] == hashlib.sha256((comfy_runtime.folder("hypernetworks") / saved).read_bytes()).hexdigest()[:10]
    assert optim["optimizer_state_dict"]["state"]
    stock = txt2img_graph(tiny_checkpoint, steps=2, prefix="hn_stock")
    stock["8"] = {"class_type": "HypernetworkLoader", "inputs": {"model": ["1", 0], "hypernetwork_name": saved, "strength": 1.0}}
    stock["5"]["inputs"]["model"] = ["8", 0]
    mark = comfy_runtime.log_mark()
    comfy_runtime.run_prompt(stock)
    assert "Unsupported Hypernetwork" not in comfy_runtime.log_since(mark)
    graph["4"]["inputs"].update(name="tests/hn_bad", checkpoint=str(tmp_path / "missing.pt"))
    with pytest.raises(Exception, match="`checkpoint`"):
        comfy_runtime.run_prompt(graph)
    assert not list((comfy_runtime.folder("hypernetworks") / "tests").glob("hn_bad*"))  # checked before writing
