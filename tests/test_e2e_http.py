"""The example LoRA workflow queued over ComfyUI's HTTP API on a real `main.py --cpu` server."""
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors import safe_open

from harness import PromptExecutionError, PromptInterrupted, PromptValidationError, txt2img_graph
from workflows import lora_prompt

pytestmark = [pytest.mark.server, pytest.mark.slow]


def _pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


@pytest.fixture(scope="module")
def trained(comfy_server, tiny_checkpoint, tmp_path_factory):
    """Run the example graph once; return (history entry, prompt id, saved LoRA path, events)."""
    from harness import make_sample_dataset
    folder = tmp_path_factory.mktemp("http-data")
    make_sample_dataset(folder, n=4, size=64, seed=0, subject="sks")
    prompt_id = comfy_server.queue(lora_prompt(tiny_checkpoint, folder, steps=8, run_name="e2e", save_name="personalize/e2e"))
    entry = comfy_server.wait(prompt_id, timeout=300)
    saved = Path(entry["outputs"]["4"]["text"][0].removeprefix("saved "))
    lora_path = comfy_server.base_dir / "models" / "loras" / saved
    return entry, prompt_id, lora_path, folder


def test_progress_and_loss_events_reach_the_client(comfy_server, trained):
    _, prompt_id, _, _ = trained
    steps = [e["data"] for e in comfy_server.events_for(prompt_id, "personalize.step")]
    assert [s["step"] for s in steps] == list(range(1, 9))
    assert all(np.isfinite(s["loss"]) and s["total"] == 8 for s in steps)
    progress = [e["data"] for e in comfy_server.events_for(prompt_id, "progress") if e["data"].get("node") == "3"]
    assert [p["value"] for p in progress][-8:] == list(range(1, 9))
    assert comfy_server.events_for(prompt_id, "personalize.end")


def test_lora_file_is_kohya_with_metadata(trained):
    _, _, lora_path, _ = trained
    assert lora_path.is_file() and lora_path.parent.name == "personalize"
    with safe_open(str(lora_path), "pt") as f:
        meta = f.metadata()
        keys = list(f.keys())
    assert meta["ss_network_dim"] == "4" and meta["ss_base_model_version"] == "sd_v1"
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert json.loads(meta["personalize.job"])["steps"] == 8
    assert all(k.startswith("lora_unet_") for k in keys) and any(k.endswith(".alpha") for k in keys)
    assert not list(lora_path.parent.glob("*.partial"))


def test_stock_lora_loader_applies_every_key_and_changes_the_image(comfy_server, tiny_checkpoint, trained):
    _, _, lora_path, _ = trained
    lora_name = lora_path.relative_to(comfy_server.base_dir / "models" / "loras").as_posix()
    plain = txt2img_graph(tiny_checkpoint, steps=4, cfg=1.0, seed=5, prefix="plain")
    with_lora = txt2img_graph(tiny_checkpoint, steps=4, cfg=1.0, seed=5, prefix="with_lora")
    with_lora["8"] = {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1], "lora_name": lora_name,
                                                              "strength_model": 1.0, "strength_clip": 1.0}}
    with_lora["5"]["inputs"]["model"] = ["8", 0]
    with_lora["2"]["inputs"]["clip"] = ["8", 1]
    mark = comfy_server.log_mark()
    plain_image = comfy_server.image_paths(comfy_server.run(plain))[0]
    lora_image = comfy_server.image_paths(comfy_server.run(with_lora))[0]
    log = comfy_server.log_since(mark)
    assert "lora key not loaded" not in log and "NOT LOADED" not in log
    difference = np.abs(_pixels(plain_image) - _pixels(lora_image)).mean()
    assert difference > 0.5, difference


def test_trained_model_output_is_sampled_in_the_same_graph(comfy_server, trained):
    entry, _, _, _ = trained
    images = comfy_server.image_paths(entry, "10")
    assert len(images) == 1 and images[0].is_file()


def test_interrupt_leaves_a_checkpoint_that_resumes(comfy_server, tiny_checkpoint, trained):
    _, _, _, folder = trained
    prompt = lora_prompt(tiny_checkpoint, folder, steps=30, run_name="cancel_me", save_name="personalize/cancel_me")
    start = len(comfy_server.events)
    prompt_id = comfy_server.queue(prompt)
    comfy_server.wait_for_event(lambda e: e["type"] == "personalize.step" and e["data"].get("prompt_id") == prompt_id,
                                timeout=300, start=start)
    comfy_server.interrupt()
    with pytest.raises(PromptInterrupted):
        comfy_server.wait(prompt_id, timeout=120)
    checkpoints = [e["data"] for e in comfy_server.events_for(prompt_id, "personalize.checkpoint")]
    assert checkpoints and checkpoints[-1]["reason"] == "cancel"
    saved = Path(checkpoints[-1]["path"])
    assert saved.is_file() and 1 <= checkpoints[-1]["step"] < 30
    steps_before = len(comfy_server.events_for(prompt_id, "personalize.step"))
    assert steps_before <= checkpoints[-1]["step"] + 1, "training went on after the cancel"

    prompt["3"]["inputs"]["resume"] = str(saved)
    resumed_id = comfy_server.queue(prompt)
    comfy_server.wait(resumed_id, timeout=300)
    resumed_steps = [e["data"]["step"] for e in comfy_server.events_for(resumed_id, "personalize.step")]
    assert resumed_steps == list(range(checkpoints[-1]["step"] + 1, 31))


def _expect_node_error(server, prompt, node_id, *needles):
    with pytest.raises(PromptExecutionError) as caught:
        server.run(prompt, timeout=300)
    message = str(caught.value)
    for needle in needles:
        assert needle in message, message
    assert caught.value.node_id == node_id, message
    assert server.alive


@pytest.fixture
def broken_folders(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    return {"empty": empty, "corrupt": corrupt, "missing": tmp_path / "does-not-exist"}


@pytest.mark.parametrize("case,needle", [("empty", "has no images"), ("corrupt", "broken.png"),
                                         ("missing", "does not exist")])
def test_bad_dataset_folders_are_clear_node_errors(comfy_server, tiny_checkpoint, broken_folders, case, needle):
    prompt = lora_prompt(tiny_checkpoint, broken_folders[case], steps=2, run_name=f"bad_{case}")
    _expect_node_error(comfy_server, prompt, "2", needle, "`folder`")


def test_a_corrupt_image_among_good_ones_is_skipped_with_a_warning(comfy_server, tiny_checkpoint, trained, tmp_path):
    import shutil
    folder = tmp_path / "mixed"
    shutil.copytree(trained[3], folder)
    (folder / "zz_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    mark = comfy_server.log_mark()
    comfy_server.run(lora_prompt(tiny_checkpoint, folder, steps=2, run_name="skip_corrupt"), timeout=300)
    assert "zz_broken.png" in comfy_server.log_since(mark)


def test_rank_zero_is_refused_before_running(comfy_server, tiny_checkpoint, trained):
    prompt = lora_prompt(tiny_checkpoint, trained[3], steps=2, rank=0)
    prompt["3"]["inputs"]["rank"] = 0
    with pytest.raises(PromptValidationError, match="rank"):
        comfy_server.queue(prompt)


def test_escaping_lora_name_is_refused_and_nothing_is_written(comfy_server, tiny_checkpoint, trained):
    prompt = lora_prompt(tiny_checkpoint, trained[3], steps=2, run_name="escape", save_name="../../escaped")
    _expect_node_error(comfy_server, prompt, "4", "must stay inside")
    assert not list(comfy_server.base_dir.rglob("escaped*"))


def test_lora_of_another_architecture_is_refused(comfy_server, tiny_checkpoint, trained):
    import torch
    from safetensors.torch import save_file
    loras = comfy_server.base_dir / "models" / "loras"
    save_file({"lora_unet_down_blocks_3_attentions_1_proj_in.lora_down.weight": torch.zeros(4, 1280),
               "lora_unet_down_blocks_3_attentions_1_proj_in.lora_up.weight": torch.zeros(1280, 4)},
              str(loras / "alien_sdxl.safetensors"))
    comfy_server.post("/free", json={"unload_models": False})  # refresh the loras list
    prompt = lora_prompt(tiny_checkpoint, trained[3], steps=2, run_name="alien", initial_lora="alien_sdxl.safetensors")
    _expect_node_error(comfy_server, prompt, "3", "different base architecture")


def test_resume_from_a_file_that_is_not_a_checkpoint(comfy_server, tiny_checkpoint, trained):
    _, _, lora_path, folder = trained
    prompt = lora_prompt(tiny_checkpoint, folder, steps=2, run_name="bad_resume", resume=str(lora_path))
    _expect_node_error(comfy_server, prompt, "3", "not a ComfyUI-Personalize training checkpoint")
