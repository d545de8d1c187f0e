"""Full-bf16 updates (stochastic rounding, Kahan), the fused backward pass and the EMA, on small tensors."""
import pytest
import torch


@pytest.fixture(scope="module")
def precision(comfy_runtime):
    return comfy_runtime.pack_import("trainers.precision")


@pytest.fixture(scope="module")
def ema_mod(comfy_runtime):
    return comfy_runtime.pack_import("trainers.ema")


def test_stochastic_rounding_is_unbiased(precision):
    """bf16 has 8 mantissa bits: 1 + 2**-10 is not representable. Rounded stochastically many times, the
    mean comes back to it (round-to-nearest would always give 1.0)."""
    value = torch.full((200_000,), 1.0 + 2 ** -10)
    rounded = precision.stochastic_round_(torch.empty_like(value, dtype=torch.bfloat16), value, torch.Generator().manual_seed(0))
    assert set(rounded.float().unique().tolist()) == {1.0, 1.0 + 2 ** -7}
    assert rounded.double().mean().item() == pytest.approx(1.0 + 2 ** -10, abs=2e-5)
    assert value.to(torch.bfloat16).float().mean().item() == 1.0
    negative = precision.stochastic_round_(torch.empty_like(value, dtype=torch.bfloat16), -value, torch.Generator().manual_seed(1))
    assert negative.double().mean().item() == pytest.approx(-(1.0 + 2 ** -10), abs=2e-5)


def test_kahan_keeps_updates_smaller_than_bf16_resolution(precision):
    """1000 updates of 1e-4 to 1.0 (each below bf16's step of 2**-7 near 1): nearest loses all of them,
    with Kahan compensation the weight ends at the bf16 value nearest to the exact sum 1.1."""
    nearest = torch.ones(4, dtype=torch.bfloat16)
    kahan, compensation = torch.ones(4, dtype=torch.bfloat16), torch.zeros(4, dtype=torch.bfloat16)
    update = torch.full((4,), 1e-4)
    for _ in range(1000):
        nearest.copy_(nearest.float() + update)
        precision.kahan_update_(kahan, update, compensation)
    assert torch.all(nearest.float() == 1.0)
    assert torch.all(kahan == torch.tensor(1.1).to(torch.bfloat16))


def _toy(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4)).to(dtype)
    x, y = torch.randn(64, 16, generator=torch.Generator().manual_seed(1)), torch.randn(64, 4, generator=torch.Generator().manual_seed(2))
    return net, x, y


def _run(precision, *, fused, dtype=torch.float32, rounding="stochastic", steps=20, lr=1e-2):
    net, x, y = _toy(dtype=dtype)
    params = list(net.parameters())
    opt = precision.ParamwiseOptimizer(lambda groups: torch.optim.AdamW(groups, weight_decay=0.0), [{"params": params, "lr": lr}],
                                       rounding=rounding, fused=fused, seed=3)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.mse_loss(net(x.to(dtype)).float(), y).backward()
        opt.step()
    opt.remove_hooks()
    return net, opt


def test_fused_backward_equals_the_ordinary_step_and_frees_gradients(precision):
    """Stepping each weight from its post-accumulate-grad hook gives the same weights as AdamW over all
    weights after backward, and leaves no gradient behind."""
    fused, _ = _run(precision, fused=True)
    plain, _ = _run(precision, fused=False)
    net, x, y = _toy()
    reference = torch.optim.AdamW(net.parameters(), lr=1e-2, weight_decay=0.0)
    for _ in range(20):
        reference.zero_grad()
        torch.nn.functional.mse_loss(net(x), y).backward()
        reference.step()
    for a, b, c in zip(fused.parameters(), plain.parameters(), net.parameters()):
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(b, c, rtol=1e-5, atol=1e-6)
        assert a.grad is None


def test_bf16_rounding_tracks_fp32_better_than_nearest(precision):
    """Many small AdamW steps with bf16 weights: stochastic rounding and Kahan stay near the fp32 run;
    round-to-nearest drifts further (its small updates vanish). Optimizer state is kept in bf16."""
    kwargs = dict(fused=False, steps=200, lr=1e-4)
    fp32, _ = _run(precision, **kwargs)
    errors = {}
    for rounding in ("nearest", "stochastic", "kahan"):
        net, opt = _run(precision, dtype=torch.bfloat16, rounding=rounding, **kwargs)
        assert all(p.dtype == torch.bfloat16 for p in net.parameters())
        assert opt.inner[0].state[opt.params[0]]["exp_avg"].dtype == torch.bfloat16
        errors[rounding] = sum((a.float() - b).abs().sum().item() for a, b in zip(net.parameters(), fp32.parameters()))
    assert errors["stochastic"] < 0.7 * errors["nearest"], errors
    assert errors["kahan"] < 0.5 * errors["nearest"], errors


def test_paramwise_state_round_trips(precision):
    """state_dict/load_state_dict restore the per-weight optimizers, counters and Kahan buffers exactly."""
    _, opt = _run(precision, fused=False, dtype=torch.bfloat16, rounding="kahan", steps=3)
    net, _, _ = _toy(dtype=torch.bfloat16)
    other = precision.ParamwiseOptimizer(lambda g: torch.optim.AdamW(g), [{"params": list(net.parameters()), "lr": 1.0}],
                                         rounding="kahan")
    other.load_state_dict(opt.state_dict())
    assert other.counts == opt.counts and other.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    assert all(torch.equal(other.compensation[i], opt.compensation[i]) for i in opt.compensation)
    scheduler = torch.optim.lr_scheduler.LambdaLR(other, lambda step: 0.5)
    assert all(g["lr"] == 0.5 * g["initial_lr"] for g in other.param_groups)
    assert other.inner[0].param_groups[0]["lr"] == other.param_groups[0]["lr"], "the scheduler must reach the inner optimizers"
    del scheduler


def test_ema_warmup_and_average(ema_mod):
    weight = torch.nn.Parameter(torch.zeros(3))
    ema = ema_mod.EMA([weight], decay=0.5, warmup_steps=2, on_cpu=True)
    assert ema.decay_at(1) == 0.25 and ema.decay_at(2) == 0.5 and ema.decay_at(10) == 0.5
    with torch.no_grad():
        weight.fill_(4.0)
    ema.update(1)  # 0.25 * 0 + 0.75 * 4
    assert torch.allclose(ema.shadow[0], torch.full((3,), 3.0))
    ema.update(2)  # 0.5 * 3 + 0.5 * 4
    assert torch.allclose(ema.shadow[0], torch.full((3,), 3.5))
    assert ema.named({"w": weight.detach()})["w"] is ema.shadow[0]
    with pytest.raises(ValueError, match="`ema_decay`"):
        ema_mod.EMA([weight], decay=1.0)
