"""Loop options: gradient checkpointing, mixed precision, accumulation, schedules, bad settings."""
import math

import pytest
import torch

import comfy.sd


@pytest.fixture(scope="module")
def setup(pack, tiny_checkpoint_path, tmp_path_factory):
    from harness import make_sample_dataset
    folder = tmp_path_factory.mktemp("options-data")
    make_sample_dataset(folder, n=4, size=64, seed=1, subject="sks")
    with torch.inference_mode():
        model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(tiny_checkpoint_path), output_vae=True, output_clip=True)
        spec = pack.build.DatasetSpec(folder=str(folder), resolution=64, bucket_step=32, trigger_word="sks", flip=True,
                                      use_cache=False)
        data = pack.build.build_training_data(spec, vae, clip)[0]
    return model, clip, data


def _run(pack, setup, tmp_path, steps=3, **job_options):
    model, clip, data = setup
    options = {"rank": 4, "alpha": 4.0}
    job = pack.job.TrainJob(steps=steps, batch_size=2, learning_rate=1e-3, seed=0, method_options=options, **job_options)
    method = pack.methods.create_method("lora", options)
    with torch.inference_mode():
        result = pack.loop.train(job, method, model, clip, data, checkpoint_dir=tmp_path)
    return result, method.export()


def test_gradient_checkpointing_gives_the_same_training(pack, setup, tmp_path, monkeypatch):
    plain, plain_lora = _run(pack, setup, tmp_path / "a")
    calls = []
    original = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda fn, *a, **k: calls.append(fn) or original(fn, *a, **k))
    ckpt, ckpt_lora = _run(pack, setup, tmp_path / "b", gradient_checkpointing=True)
    monkeypatch.undo()
    # ComfyUI's UNet calls the layers of each block, not the block: the layers must really be checkpointed.
    layers = {type(fn.__self__).__name__ for fn in calls}
    assert {"ResBlock", "SpatialTransformer"} <= layers, layers
    assert plain.loss_history == pytest.approx(ckpt.loss_history, rel=1e-5)
    for key in plain_lora:
        torch.testing.assert_close(plain_lora[key], ckpt_lora[key], rtol=1e-4, atol=1e-6)
    model = setup[0].model.diffusion_model
    units = [m for m in model.modules() if type(m).__name__ in ("ResBlock", "SpatialTransformer")]
    assert units and all("forward" not in m.__dict__ for m in units), "checkpointing was not undone"


def test_bf16_autocast_trains_with_fp32_weights(pack, setup, tmp_path):
    result, lora = _run(pack, setup, tmp_path, precision="bf16")
    assert all(math.isfinite(x) for x in result.loss_history)
    assert all(t.dtype == torch.float32 for t in lora.values())


def test_accumulation_and_huber_and_offset(pack, setup, tmp_path):
    result, _ = _run(pack, setup, tmp_path, grad_accumulation=2, loss_type="huber", noise_offset=0.05,
                     lr_scheduler="cosine", warmup_steps=1)
    assert len(result.loss_history) == 3 and all(math.isfinite(x) for x in result.loss_history)


def test_schedules(pack):
    job = pack.job.TrainJob(steps=10, warmup_steps=2, lr_scheduler="cosine")
    factors = [pack.optim.lr_factor(job, s) for s in range(10)]
    assert factors[0] < factors[1] < factors[2] == 1.0
    assert factors[-1] < 0.05
    linear = pack.job.TrainJob(steps=4, lr_scheduler="linear")
    assert [pack.optim.lr_factor(linear, s) for s in range(4)] == [1.0, 0.75, 0.5, 0.25]


@pytest.mark.parametrize("field,value,needle", [
    ("steps", 0, "`steps`"), ("batch_size", 0, "`batch_size`"), ("learning_rate", 0.0, "`learning_rate`"),
    ("timestep_range", (0.5, 0.2), "`timestep_range`"), ("optimizer", "lion", "`optimizer`"),
])
def test_bad_settings_name_the_field(pack, field, value, needle):
    with pytest.raises(ValueError, match=needle):
        pack.job.TrainJob(**{field: value})


@pytest.mark.parametrize("options,needle", [({"rank": 0}, "`rank`"), ({"alpha": 0}, "`alpha`"),
                                             ({"targets": "everything"}, "`targets`")])
def test_bad_lora_options_name_the_field(pack, options, needle):
    with pytest.raises(ValueError, match=needle):
        pack.methods.create_method("lora", options)


def test_eight_bit_adam_without_a_gpu_says_what_to_do(pack, setup, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(ValueError, match="adamw8bit needs"):
        _run(pack, setup, tmp_path, optimizer="adamw8bit")


def test_job_round_trips_through_json(pack):
    job = pack.job.TrainJob(steps=7, method_options={"rank": 8}, timestep_range=(0.1, 0.9))
    assert pack.job.TrainJob.from_dict(__import__("json").loads(job.to_json())) == job
    with pytest.raises(ValueError, match="unknown training settings"):
        pack.job.TrainJob.from_dict({"stepz": 3})


def test_a_group_with_a_train_fraction_stops_after_it(pack):
    job = pack.job.TrainJob(steps=10, learning_rate=1e-3, lr_scheduler="linear")
    early, always = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    groups = [pack.methods.ParamGroup([always], name="lora"),
              pack.methods.ParamGroup([early], name="embeddings", lr=5e-3, train_fraction=0.3)]
    optimizer = pack.optim.build_optimizer(job, groups)
    scheduler = pack.optim.build_scheduler(job, optimizer)
    lrs = []
    for _ in range(10):
        lrs.append([g["lr"] for g in optimizer.param_groups])
        for p in (early, always):
            p.grad = torch.ones_like(p)
        optimizer.step()
        scheduler.step()
    assert lrs[0] == pytest.approx([1e-3, 5e-3])
    assert [lr[1] > 0 for lr in lrs] == [True] * 3 + [False] * 7
    assert all(lr[0] > 0 for lr in lrs)
    frozen_at = early.detach().clone()
    optimizer.step()
    assert torch.equal(early.detach(), frozen_at), "a finished group must not move (not even by weight decay)"
    with pytest.raises(ValueError, match="training fraction"):
        pack.optim.build_optimizer(job, [pack.methods.ParamGroup([always], train_fraction=0.0)])
