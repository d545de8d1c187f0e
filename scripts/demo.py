"""The main job: the example LoRA workflow, run headless over ComfyUI's HTTP API.

It makes a tiny real-format SD1.5 checkpoint and a small image set of a new subject ("sks cross"),
starts `main.py --cpu` with this pack in `custom_nodes/`, queues the API twin of
`example_workflows/personalize_lora.json` at tiny-model sizes, shows the live loss from `/ws`,
and prints where the LoRA and a sample image were written. Run it through `scripts/demo.sh`.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# The server client and tiny-model builders are shared with the test harness.
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "scripts"))

from harness import install_model, make_base_dir  # noqa: E402
from harness.server import ComfyServer  # noqa: E402
from sample_images import make_sample_dataset  # noqa: E402
from tiny_model import cached_tiny_checkpoint  # noqa: E402
from workflows import lora_prompt  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60, help="training steps (default 60)")
    parser.add_argument("--workdir", type=Path, default=Path(os.environ.get("PERSONALIZE_CACHE", Path.home() / ".cache/comfyui-personalize")) / "demo",
                        help="ComfyUI base directory of the demo (models/, input/, output/)")
    args = parser.parse_args(argv)

    base = make_base_dir(args.workdir.resolve())
    print(f"[1/4] tiny SD1.5 checkpoint and 6 images of 'sks cross' in {base}")
    ckpt = install_model(base, "checkpoints", cached_tiny_checkpoint("taesd"), "tiny-sd15-taesd.safetensors")
    dataset = base / "input" / "personalize_demo"
    make_sample_dataset(dataset, n=6, size=64, seed=0, subject="sks")

    print("[2/4] starting ComfyUI (python main.py --cpu) with the pack in custom_nodes/")
    server = ComfyServer.start(base)
    try:
        prompt = lora_prompt(ckpt, "personalize_demo", steps=args.steps, run_name="demo", save_name="personalize/demo_sks_cross")
        prompt["3"]["inputs"]["learning_rate"] = 2e-3
        print(f"[3/4] queueing the example LoRA workflow ({args.steps} steps) at {server.url}")
        prompt_id = server.queue(prompt)
        seen = 0
        while True:
            event = server.wait_for_event(
                lambda e: e["data"].get("prompt_id") == prompt_id if isinstance(e.get("data"), dict) else False,
                timeout=900, start=seen)
            seen = server.events.index(event) + 1
            if event["type"] == "personalize.step" and (event["data"]["step"] % 10 == 0 or event["data"]["step"] == 1):
                d = event["data"]
                print(f"      step {d['step']:>4}/{d['total']}  loss {d['loss']:.4f}  {d['it_per_s']:.1f} it/s")
            if event["type"] in ("execution_success", "execution_error", "execution_interrupted"):
                break
        entry = server.wait(prompt_id, timeout=120)
        lora = base / "models" / "loras" / entry["outputs"]["4"]["text"][0].removeprefix("saved ")
        image = server.image_paths(entry, "10")[0]
        print("[4/4] done")
        print(f"LoRA:   {lora}")
        print(f"sample: {image}")
        print(f"log:    {server.log_path}")
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
