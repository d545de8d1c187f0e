"""The harness itself, with stock ComfyUI nodes only: tiny checkpoints, sample data, the in-process
runtime and the HTTP server (queue, /ws events, /history, interrupt, errors, log)."""
from __future__ import annotations

import time

import pytest
from PIL import Image

from harness import (
    PACK_DIR_NAME,
    PromptExecutionError,
    PromptInterrupted,
    PromptValidationError,
    cached_tiny_checkpoint,
    make_sample_dataset,
    txt2img_graph,
)


def _event_types(events):
    return [e["type"] for e in events]


def _assert_png(path, size=(64, 64)):
    assert path.is_file(), path
    with Image.open(path) as im:
        assert im.format == "PNG"
        assert im.size == size


def _bogus_lora(path):
    """A kohya-named LoRA whose keys match no module: stock LoraLoader logs 'lora key not loaded'."""
    import torch
    from safetensors.torch import save_file

    save_file({
        "lora_unet_no_such_module.lora_down.weight": torch.zeros(4, 320),
        "lora_unet_no_such_module.lora_up.weight": torch.zeros(320, 4),
        "lora_unet_no_such_module.alpha": torch.tensor(4.0),
    }, str(path))


# -- scripts ------------------------------------------------------------------------------------

def test_sample_dataset_is_deterministic(tmp_path):
    a = make_sample_dataset(tmp_path / "a", n=4, size=64, seed=3)
    b = make_sample_dataset(tmp_path / "b", n=4, size=64, seed=3)
    c = make_sample_dataset(tmp_path / "c", n=4, size=64, seed=4)
    assert [p.name for p in a] == ["000.png", "001.png", "002.png", "003.png"]
    for pa, pb in zip(a, b):
        assert pa.read_bytes() == pb.read_bytes()
        assert pa.with_suffix(".txt").read_text() == pb.with_suffix(".txt").read_text()
        _assert_png(pa)
    assert [p.read_bytes() for p in a] != [p.read_bytes() for p in c]
    caption = a[0].with_suffix(".txt").read_text()
    assert caption.startswith("a photo of sks cross, on a ") and caption.rstrip().endswith("background")


def test_sample_dataset_fixture(sample_dataset):
    images = sorted(sample_dataset.glob("*.png"))
    assert len(images) == 6
    assert all(p.with_suffix(".txt").is_file() for p in images)


def test_tiny_checkpoint_is_cached_and_deterministic(tiny_checkpoint_path, comfy_runtime):
    from safetensors import safe_open

    import tiny_model

    assert cached_tiny_checkpoint("taesd") == tiny_checkpoint_path  # built once, then reused
    assert tiny_model.TINY_VERSION in tiny_checkpoint_path.name
    rebuilt = tiny_model.tiny_sd15_state_dict("taesd", seed=0)
    with safe_open(str(tiny_checkpoint_path), "pt") as f:
        keys = set(f.keys())
        assert keys == set(rebuilt)
        for k in ("model.diffusion_model.input_blocks.0.0.weight",
                  "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc2.weight",
                  "first_stage_model.taesd_decoder.1.weight"):
            assert f.get_tensor(k).equal(rebuilt[k]), k
        assert f.metadata()["personalize.tiny_version"] == tiny_model.TINY_VERSION


@pytest.mark.parametrize("vae, vae_class", [("taesd", "TAESD"), ("full", "AutoencoderKL")])
def test_tiny_checkpoint_loads_as_sd15_with_every_key(comfy_runtime, vae, vae_class):
    import comfy.sd
    import comfy.supported_models
    import comfy.utils
    import torch

    sd = comfy.utils.load_torch_file(str(cached_tiny_checkpoint(vae)))
    file_keys = set(sd)
    mark = comfy_runtime.log_mark()
    model, clip, vae_obj, _ = comfy.sd.load_state_dict_guess_config(sd)
    log = comfy_runtime.log_since(mark)
    assert not sd, f"left over keys: {sorted(sd)[:5]}"  # the loaders pop every key they use
    for complaint in ("unet missing", "unet unexpected", "clip missing", "Missing VAE keys"):
        assert complaint not in log, log

    assert type(model.model.model_config) is comfy.supported_models.SD15
    cfg = model.model.model_config.unet_config
    shape = (cfg["model_channels"], cfg["context_dim"], cfg["channel_mult"], cfg["transformer_depth_middle"])
    assert shape == (320, 768, [1], -2)

    def under(prefix):
        return {k[len(prefix):] for k in file_keys if k.startswith(prefix)}

    assert set(model.model.diffusion_model.state_dict()) == under("model.diffusion_model.")
    assert set(vae_obj.first_stage_model.state_dict()) == under("first_stage_model.")
    clip_keys = {k for k in clip.cond_stage_model.state_dict()
                 if k not in ("clip_l.logit_scale", "clip_l.transformer.text_projection.weight")}
    assert clip_keys == {"clip_l.transformer." + k for k in under("cond_stage_model.transformer.")}

    assert type(vae_obj.first_stage_model).__name__ == vae_class
    assert vae_obj.downscale_ratio == 8
    unet_params = sum(p.numel() for p in model.model.diffusion_model.parameters())
    assert 18e6 < unet_params < 19e6
    cond = clip.encode_from_tokens(clip.tokenize("a photo of sks cross"))
    assert cond.shape == (1, 77, 768) and torch.isfinite(cond).all()


# -- in-process runtime -------------------------------------------------------------------------

def test_pack_loads_in_process(comfy_runtime):
    comfy_runtime.assert_pack_loaded()
    assert comfy_runtime.nodes.LOADED_MODULE_DIRS[PACK_DIR_NAME] == str(comfy_runtime.pack_dir)
    assert comfy_runtime.pack_module is not None
    assert comfy_runtime.pack_import("nodes").__file__ == str(comfy_runtime.pack_dir / "nodes" / "__init__.py")
    assert f"IMPORT FAILED): {comfy_runtime.pack_dir}" not in comfy_runtime.init_log
    assert "CheckpointLoaderSimple" in comfy_runtime.nodes.NODE_CLASS_MAPPINGS


def test_runtime_folders_are_private(comfy_runtime):
    base = comfy_runtime.base_dir
    for kind in ("checkpoints", "loras", "embeddings", "hypernetworks"):
        assert comfy_runtime.folder(kind) == base / "models" / kind
    for kind in ("input", "output", "temp"):
        assert comfy_runtime.folder(kind) == base / kind
    assert comfy_runtime.folder_paths.get_folder_paths("custom_nodes") == [str(base / "custom_nodes")]


def test_txt2img_in_process(comfy_runtime, tiny_checkpoint):
    result = comfy_runtime.run_prompt(txt2img_graph(tiny_checkpoint, prefix="inproc"))
    assert result["status"]["status_str"] == "success"
    (png,) = comfy_runtime.image_paths(result)
    assert png.parent == comfy_runtime.folder("output")
    _assert_png(png)
    types = _event_types(result["events"])
    assert types[0] == "execution_start" and "execution_success" in types
    executing = [e["data"]["node"] for e in result["events"] if e["type"] == "executing"]
    assert {"5", "7"} <= set(executing) and executing[-1] is None  # "1" may be cached by earlier tests
    progress = [e["data"] for e in result["events"] if e["type"] == "progress"]
    assert [(p["value"], p["max"], p["node"]) for p in progress] == [(1, 2, "5"), (2, 2, "5")]
    executed = [e["data"] for e in result["events"] if e["type"] == "executed"]
    assert executed and executed[-1]["node"] == "7"

    # The same graph again: everything is cached, nothing re-runs (as in the server).
    again = comfy_runtime.run_prompt(txt2img_graph(tiny_checkpoint, prefix="inproc"))
    cached = [e for e in again["events"] if e["type"] == "execution_cached"][0]["data"]["nodes"]
    assert set(cached) == {str(i) for i in range(1, 8)}


def test_txt2img_full_vae_in_process(comfy_runtime, tiny_checkpoint_full_vae):
    result = comfy_runtime.run_prompt(txt2img_graph(tiny_checkpoint_full_vae, prefix="inproc_fullvae"))
    (png,) = comfy_runtime.image_paths(result)
    _assert_png(png)


def test_validation_error_in_process(comfy_runtime, tiny_checkpoint):
    with pytest.raises(PromptValidationError) as err:
        comfy_runtime.run_prompt(txt2img_graph("no-such-model.safetensors"))
    assert "no-such-model.safetensors" in str(err.value)
    assert "1" in err.value.details["node_errors"]


def test_execution_error_in_process(comfy_runtime):
    bad = comfy_runtime.folder("checkpoints") / "corrupt.safetensors"
    bad.write_bytes(b"this is not a safetensors file")
    with pytest.raises(PromptExecutionError) as err:
        comfy_runtime.run_prompt(txt2img_graph("corrupt.safetensors"))
    assert err.value.node_id == "1"
    assert err.value.details["node_type"] == "CheckpointLoaderSimple"
    assert err.value.exception_message  # safetensors' own words ("Error while deserializing header...")
    assert "load_checkpoint" in str(err.value)  # the node's traceback is in the message


def test_interrupt_in_process(comfy_runtime, tiny_checkpoint):
    first = len(comfy_runtime.events)
    future = comfy_runtime.submit(txt2img_graph(tiny_checkpoint, steps=500, seed=1, prefix="interrupted"))
    deadline = time.monotonic() + 60
    while not any(e["type"] == "progress" for e in comfy_runtime.events[first:]):
        assert time.monotonic() < deadline and not future.done(), "no progress event"
        time.sleep(0.01)
    comfy_runtime.interrupt()
    with pytest.raises(PromptInterrupted):
        future.result(timeout=60)
    steps = [e["data"]["value"] for e in comfy_runtime.events[first:] if e["type"] == "progress"]
    assert max(steps) < 500


def test_log_capture_in_process(comfy_runtime, tiny_checkpoint):
    _bogus_lora(comfy_runtime.folder("loras") / "bogus.safetensors")
    graph = txt2img_graph(tiny_checkpoint, prefix="bogus_lora")
    graph["8"] = {"class_type": "LoraLoader", "inputs": {
        "model": ["1", 0], "clip": ["1", 1], "lora_name": "bogus.safetensors",
        "strength_model": 1.0, "strength_clip": 1.0}}
    graph["5"]["inputs"]["model"] = ["8", 0]
    mark = comfy_runtime.log_mark()
    comfy_runtime.run_prompt(graph)
    assert "lora key not loaded: lora_unet_no_such_module" in comfy_runtime.log_since(mark)


# -- HTTP server --------------------------------------------------------------------------------

@pytest.mark.server
def test_pack_loads_in_server(comfy_server):
    line = comfy_server.pack_import_line()
    assert line, comfy_server.log_tail()
    assert "IMPORT FAILED" not in line, comfy_server.log_text()
    assert "CheckpointLoaderSimple" in comfy_server.object_info()
    assert (comfy_server.base_dir / "custom_nodes" / PACK_DIR_NAME).resolve().is_dir()


@pytest.mark.server
def test_txt2img_over_http(comfy_server, tiny_checkpoint):
    prompt_id = comfy_server.queue(txt2img_graph(tiny_checkpoint, prefix="http"))
    entry = comfy_server.wait(prompt_id, timeout=120)
    assert entry["status"]["status_str"] == "success" and entry["status"]["completed"]
    (png,) = comfy_server.image_paths(entry)
    assert png.parent == comfy_server.base_dir / "output"
    _assert_png(png)

    events = comfy_server.events_for(prompt_id)
    types = _event_types(events)
    assert "execution_start" in types and "execution_success" in types
    executing = [e["data"]["node"] for e in events if e["type"] == "executing"]
    assert {"5", "7"} <= set(executing) and executing[-1] is None  # "1" may be cached by earlier tests
    progress = [e["data"] for e in events if e["type"] == "progress"]
    assert [(p["value"], p["max"], p["node"]) for p in progress] == [(1, 2, "5"), (2, 2, "5")]
    executed = [e["data"] for e in events if e["type"] == "executed"]
    assert executed[-1]["node"] == "7" and executed[-1]["output"]["images"][0]["filename"] == png.name

    history = comfy_server.history()
    assert prompt_id in history and history[prompt_id]["outputs"] == entry["outputs"]


@pytest.mark.server
def test_txt2img_full_vae_over_http(comfy_server, tiny_checkpoint_full_vae):
    entry = comfy_server.run(txt2img_graph(tiny_checkpoint_full_vae, prefix="http_fullvae"))
    (png,) = comfy_server.image_paths(entry)
    _assert_png(png)


@pytest.mark.server
def test_errors_over_http(comfy_server, tiny_checkpoint):
    with pytest.raises(PromptValidationError) as err:
        comfy_server.queue(txt2img_graph("no-such-model.safetensors"))
    assert "1" in err.value.details["node_errors"]

    (comfy_server.base_dir / "models" / "checkpoints" / "corrupt.safetensors").write_bytes(b"not a model")
    prompt_id = comfy_server.queue(txt2img_graph("corrupt.safetensors"))
    entry = comfy_server.wait(prompt_id, check=False)
    assert entry["status"]["status_str"] == "error"
    assert [e for e in comfy_server.events_for(prompt_id) if e["type"] == "execution_error"]
    with pytest.raises(PromptExecutionError) as err:
        comfy_server.check(entry, prompt_id)
    assert err.value.node_id == "1"


@pytest.mark.server
def test_interrupt_over_http(comfy_server, tiny_checkpoint):
    prompt_id = comfy_server.queue(txt2img_graph(tiny_checkpoint, steps=500, seed=2, prefix="http_interrupted"))
    comfy_server.wait_for_event(lambda e: e["type"] == "progress" and e["data"].get("prompt_id") == prompt_id,
                                timeout=60)
    comfy_server.interrupt()
    entry = comfy_server.wait(prompt_id, timeout=60, check=False)
    assert [m for m, _ in entry["status"]["messages"]][-1] == "execution_interrupted"
    with pytest.raises(PromptInterrupted):
        comfy_server.check(entry, prompt_id)
    assert not comfy_server.image_paths(entry)


@pytest.mark.server
def test_log_capture_over_http(comfy_server, tiny_checkpoint):
    _bogus_lora(comfy_server.base_dir / "models" / "loras" / "bogus.safetensors")
    graph = txt2img_graph(tiny_checkpoint, prefix="http_bogus_lora")
    graph["8"] = {"class_type": "LoraLoader", "inputs": {
        "model": ["1", 0], "clip": ["1", 1], "lora_name": "bogus.safetensors",
        "strength_model": 1.0, "strength_clip": 1.0}}
    graph["5"]["inputs"]["model"] = ["8", 0]
    mark = comfy_server.log_mark()
    comfy_server.run(graph)
    assert "lora key not loaded: lora_unet_no_such_module" in comfy_server.log_since(mark)
