"""Data-parallel training: an exported job run by `scripts/train_job.py` under torchrun (gloo, CPU).

Two processes with a global batch of 4 (2 each) must train the same LoRA as one process with the
batch of 4, and a checkpoint of the 2-process run must resume in one process to the same weights.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from harness import REPO_ROOT, make_sample_dataset

pytestmark = pytest.mark.slow

STEPS = 4
TRAIN = {"method": "lora", "method_options": {"rank": 4, "alpha": 4.0, "targets": "attention"}, "steps": STEPS,
         "batch_size": 4, "learning_rate": 1e-3, "precision": "fp32", "min_snr_gamma": 0.0, "seed": 3,
         "checkpoint_every": 2, "keep_checkpoints": 2, "run_name": "ddp"}


@pytest.fixture(scope="module")
def distributed(comfy_runtime):
    return comfy_runtime.pack_import("trainers.distributed")


def _defaults(comfy_runtime, node_type: str) -> dict:
    """Every widget input of a node at its default value (from its schema)."""
    spec = comfy_runtime.nodes.NODE_CLASS_MAPPINGS[node_type].INPUT_TYPES()
    out = {}
    for group in ("required", "optional"):
        for name, item in spec.get(group, {}).items():
            options = item[1] if len(item) > 1 else {}
            if "default" in options:
                out[name] = options["default"]
            elif isinstance(item[0], list) and item[0]:
                out[name] = item[0][0]
    return out


@pytest.fixture(scope="module")
def launched(tmp_path_factory, comfy_runtime, tiny_checkpoint):
    """Export the job with Personalize Export Training Job and run it on 2 CPU processes with Personalize
    Launch Training, in one graph on the in-process runtime; return (job file, the run's events)."""
    root = tmp_path_factory.mktemp("ddp")
    make_sample_dataset(root / "data", n=6, size=64, seed=0, subject="sks")
    options = TRAIN["method_options"]
    export = {**_defaults(comfy_runtime, "PersonalizeExportTrainingJob"),
              **{k: v for k, v in TRAIN.items() if k not in ("method_options", "batch_size")},
              "ckpt_name": tiny_checkpoint, "dataset": ["2", 0], "method_options": json.dumps(options),
              "batch_size": TRAIN["batch_size"] // 2, "processes": 2, "artifact_name": "ddp", "save_dtype": "fp32"}
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": tiny_checkpoint}},
        "2": {"class_type": "PersonalizeDatasetFromFolder", "inputs": {
            **_defaults(comfy_runtime, "PersonalizeDatasetFromFolder"), "folder": str(root / "data"), "resolution": 64,
            "bucket_step": 32, "vae": ["1", 2], "clip": ["1", 1]}},
        "3": {"class_type": "PersonalizeExportTrainingJob", "inputs": export},
        "4": {"class_type": "PersonalizeLaunchTraining", "inputs": {"job": ["3", 0], "processes": 2, "device": "cpu",
                                                                    "resume": ""}},
    }
    result = comfy_runtime.run_prompt(prompt)
    job = Path(result["outputs"]["3"]["text"][0].split("\n")[0].removeprefix("job: "))
    events = [e for e in result["events"] if str(e["type"]).startswith("personalize.")]
    return job, events


@pytest.fixture(scope="module")
def job_file(launched):
    return launched[0]


def run_job(job: Path, processes: int, *extra: str, timeout: float = 300,
            device: str = "cpu") -> tuple[subprocess.CompletedProcess, list[dict]]:
    """`torchrun --standalone --nproc-per-node N scripts/train_job.py JOB --events` (CPU and gloo by default)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
           str(REPO_ROOT / "scripts" / "train_job.py"), str(job), "--events", "--device", device, *extra]
    done = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    events = [json.loads(line.split("PERSONALIZE_EVENT ", 1)[1]) for line in done.stdout.splitlines()
              if "PERSONALIZE_EVENT " in line]
    return done, events


def _artifact(events) -> dict:
    found = [e["data"] for e in events if e["type"] == "personalize.artifact"]
    assert len(found) == 1, events
    return found[0]


@pytest.fixture(scope="module")
def runs(launched, job_file):
    """(2 processes launched by the node, 1 process, 1 process resumed from the 2-process step-2 checkpoint)."""
    results = {"two": launched[1]}
    done, events = run_job(job_file, 1)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    results["one"] = events
    checkpoint = Path(_artifact(results["two"])["checkpoint"]).parent / "step_0000002.pt"
    done, events = run_job(job_file, 1, "--resume", str(checkpoint))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    results["resumed"] = events
    return results


def test_shards_cover_each_batch_once(distributed):
    for count in range(0, 9):
        for world in (1, 2, 3, 4):
            parts = [list(range(count))[distributed.shard(count, distributed.DistContext(r, world))] for r in range(world)]
            assert sum(parts, []) == list(range(count))
            assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_two_processes_train_what_one_does_with_the_doubled_batch(runs):
    two, one = load_file(_artifact(runs["two"])["path"]), load_file(_artifact(runs["one"])["path"])
    assert two.keys() == one.keys() and len(two) > 0
    ups = [k for k in two if k.endswith("lora_up.weight")]
    assert all(two[k].abs().max() > 0 for k in ups), "the LoRA did not train"
    # AdamW divides by sqrt(v): float noise in near-zero gradients moves a weight by a small fraction
    # of one learning-rate step, hence the absolute tolerance of 5% of the learning rate.
    for key in two:
        torch.testing.assert_close(two[key], one[key], rtol=1e-3, atol=0.05 * TRAIN["learning_rate"], msg=key)
    losses = {name: [e["data"]["loss"] for e in runs[name] if e["type"] == "personalize.step"] for name in ("two", "one")}
    assert len(losses["two"]) == STEPS, "only rank 0 reports"
    torch.testing.assert_close(torch.tensor(losses["two"]), torch.tensor(losses["one"]), rtol=1e-4, atol=1e-7)


def test_rank_zero_alone_writes(runs):
    artifact = Path(_artifact(runs["two"])["path"])
    assert artifact.name == "ddp.safetensors"
    folder = Path(_artifact(runs["two"])["checkpoint"]).parent
    assert sorted(p.name for p in folder.iterdir()) == ["final.pt", "step_0000002.pt"]
    assert not list(artifact.parent.glob("*.partial")) and not list(folder.glob("*.partial"))
    assert _artifact(runs["two"])["world_size"] == 2
    with safe_open(str(artifact), "pt") as f:
        meta = f.metadata()
    assert meta["ss_batch_size_per_device"] == "2" and meta["personalize.global_batch_size"] == "4"
    assert meta["personalize.world_size"] == "2" and meta["ss_network_dim"] == "4"


def test_the_launch_node_relays_progress_to_the_ui(runs, job_file):
    steps = [e["data"] for e in runs["two"] if e["type"] == "personalize.step"]
    assert [s["step"] for s in steps] == list(range(1, STEPS + 1)) and all(s["node"] == "4" for s in steps)
    document = json.loads(job_file.read_text())
    assert document["train"]["batch_size"] == TRAIN["batch_size"]  # 2 per process x 2 processes
    assert Path(document["checkpoint"]).is_file() and document["dataset"]["resolution"] == 64


def test_a_two_process_checkpoint_resumes_in_one_process(runs):
    steps = [e["data"]["step"] for e in runs["resumed"] if e["type"] == "personalize.step"]
    assert steps == [3, 4]
    resumed, two = load_file(_artifact(runs["resumed"])["path"]), load_file(_artifact(runs["two"])["path"])
    assert Path(_artifact(runs["resumed"])["path"]).name == "ddp_00002.safetensors"  # never overwrites
    for key in two:
        torch.testing.assert_close(resumed[key], two[key], rtol=1e-3, atol=0.05 * TRAIN["learning_rate"], msg=key)


def test_stock_loader_applies_the_ddp_lora(runs, base):
    import comfy.sd
    model, clip, _ = base
    lora = load_file(_artifact(runs["two"])["path"])
    patched, _ = comfy.sd.load_lora_for_models(model, clip, lora, 1.0, 0.0)
    names = {k.rsplit(".lora_", 1)[0] for k in lora if ".lora_" in k}
    assert len(patched.patches) == len(names) > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run it where one is lent)")
def test_a_lora_job_trains_on_cuda(job_file):
    """The LoRA's branch deltas compute where the model is loaded (they stayed on the CPU and the first forward on
    CUDA failed); the artifact is written from CPU tensors."""
    done, events = run_job(job_file, 1, device="cuda")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    losses = [e["data"]["loss"] for e in events if e["type"] == "personalize.step"]
    assert len(losses) == STEPS and all(torch.isfinite(torch.tensor(losses)))
    with safe_open(_artifact(events)["path"], "pt") as f:
        assert any(k.endswith(".lora_up.weight") for k in f.keys())
        assert all(f.get_tensor(k).isfinite().all() for k in f.keys())


def test_event_lines_stay_whole_while_another_rank_logs_to_the_same_pipe():
    """Ranks share torchrun's output pipe and the launcher runs them unbuffered: rank 0's event lines must reach the
    reader whole while another rank writes its log lines (a log line glued into an event broke the relay's JSON)."""
    emit = ("import sys; sys.path.insert(0, sys.argv[1]); import train_job\n"
            "for step in range(3000):\n"
            "    train_job.write_event_line('personalize.step', {'step': step, 'loss': 0.25, 'note': 'x' * 200})\n")
    log = ("import sys, time\nend = time.time() + 60\n"
           "while time.time() < end:\n    sys.stderr.write('rank 1: ' + 'y' * 80 + '\\n')\n")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    read_end, write_end = os.pipe()
    logger = subprocess.Popen([sys.executable, "-c", log], stdout=write_end, stderr=write_end, env=env)
    emitter = subprocess.Popen([sys.executable, "-c", emit, str(REPO_ROOT / "scripts")], stdout=write_end,
                               stderr=write_end, env=env)
    os.close(write_end)
    steps, broken = [], []
    with os.fdopen(read_end, encoding="utf-8", errors="replace") as pipe:
        for line in pipe:
            if line.startswith("PERSONALIZE_EVENT "):
                try:
                    steps.append(json.loads(line.split(" ", 1)[1])["data"]["step"])
                except json.JSONDecodeError:
                    broken.append(line[:120])
            if emitter.poll() is not None and logger.poll() is None:
                logger.kill()
    assert emitter.wait(60) == 0
    assert not broken and steps == list(range(3000))


def test_the_relay_finds_an_event_behind_another_ranks_unfinished_line(comfy_runtime, tmp_path):
    """A progress bar ends its output with "\\r", not a newline: the next event line arrives glued behind it."""
    relay = comfy_runtime.pack_import("nodes.distributed")._run_and_relay
    script = ("import json, sys\n"
              "def event(kind, data): print('PERSONALIZE_EVENT ' + json.dumps({'type': kind, 'data': data}))\n"
              "sys.stdout.write('\\rloading  50%|#####     |'); event('personalize.step', {'step': 1, 'loss': 0.5})\n"
              "event('personalize.artifact', {'path': 'a.safetensors', 'checkpoint': 'c.pt'})\n")
    sent = []
    result = relay([sys.executable, "-c", script], 1, tmp_path / "stop", lambda kind, data: sent.append(kind))
    assert sent == ["personalize.step", "personalize.artifact"]
    assert result == {"path": "a.safetensors", "checkpoint": "c.pt", "losses": [0.5]}


def test_a_bad_job_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "job.json"
    bad.write_text(json.dumps({"format": "something else"}))
    done = subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "train_job.py"), str(bad)], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "not a ComfyUI-Personalize job file" in done.stderr


def test_a_stop_request_stops_every_rank_with_a_resumable_checkpoint(job_file, tmp_path):
    stop = tmp_path / "stop"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           str(REPO_ROOT / "scripts" / "train_job.py"), str(job_file), "--events", "--device", "cpu",
           "--stop-file", str(stop)]
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    events = []
    try:
        for line in proc.stdout:
            if "PERSONALIZE_EVENT " in line:
                events.append(json.loads(line.split("PERSONALIZE_EVENT ", 1)[1]))
                if events[-1]["type"] == "personalize.step":
                    stop.touch()  # as Personalize Launch Training does on Cancel
        proc.wait(120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    # A periodic checkpoint may come first when the stop is seen after its step; exactly one cancel one.
    saved = [e["data"] for e in events if e["type"] == "personalize.checkpoint" and e["data"]["reason"] != "periodic"]
    assert len(saved) == 1 and saved[0]["reason"] == "cancel" and 1 <= saved[0]["step"] < STEPS
    assert Path(saved[0]["path"]).is_file()
    assert any(e["type"] == "personalize.cancelled" for e in events)
    assert not any(e["type"] == "personalize.artifact" for e in events)


def test_fused_backward_is_refused_across_processes(job_file, tmp_path):
    """Fused backward steps each weight before the gradient all-reduce: two processes would drift apart."""
    document = json.loads(job_file.read_text())
    document["train"]["fused_backward"] = True
    fused = tmp_path / "fused.json"
    fused.write_text(json.dumps(document))
    done, events = run_job(fused, 2, timeout=180)
    assert done.returncode != 0
    assert "`fused_backward`" in done.stdout + done.stderr and "multi-process" in done.stdout + done.stderr
    assert not [e for e in events if e["type"] == "personalize.artifact"]
