"""Targets, SNR and min-SNR weights come from the model's own model_sampling (eps, v, flow)."""
import pytest
import torch

import comfy.model_sampling as ms


def _sampling(kind):
    base = {"eps": ms.EPS, "v": ms.V_PREDICTION, "flow": ms.CONST}[kind]
    discrete = ms.ModelSamplingDiscreteFlow if kind == "flow" else ms.ModelSamplingDiscrete

    class Sampling(discrete, base):
        pass

    return Sampling()


@pytest.fixture
def objectives(comfy_runtime):
    return comfy_runtime.pack_import("trainers.objectives")


@pytest.mark.parametrize("kind", ["eps", "v", "flow"])
def test_target_is_the_models_own_prediction(objectives, kind):
    """The target equals eps (eps models), v (v-prediction) or noise - x0 (flow), analytically."""
    sampling = _sampling(kind)
    gen = torch.Generator().manual_seed(0)
    clean = torch.randn(3, 4, 8, 8, generator=gen)
    noised = objectives.add_noise(sampling, clean, gen)
    s = noised.sigmas.reshape(-1, 1, 1, 1)
    _, target = objectives.prediction_space(sampling, clean, clean, noised.noisy, noised.sigmas)
    if kind == "eps":
        expected = noised.noise
    elif kind == "v":  # v = alpha*eps - sigma_vp*x0 with alpha = 1/sqrt(1+s^2), sigma_vp = s/sqrt(1+s^2)
        expected = (noised.noise - s * clean) / torch.sqrt(1 + s**2)
    else:
        expected = noised.noise - clean
    torch.testing.assert_close(target, expected, rtol=1e-4, atol=1e-4)


def test_perfect_denoiser_has_zero_loss(objectives):
    sampling = _sampling("eps")
    gen = torch.Generator().manual_seed(1)
    clean = torch.randn(2, 4, 8, 8, generator=gen)
    noised = objectives.add_noise(sampling, clean, gen)
    pred, target = objectives.prediction_space(sampling, clean, clean, noised.noisy, noised.sigmas)
    assert objectives.per_sample_loss(pred, target, "mse", 0.1).abs().max() < 1e-8


@pytest.mark.parametrize("kind,formula", [
    ("eps", lambda snr, g: torch.minimum(snr, torch.full_like(snr, g)) / snr),
    ("v", lambda snr, g: torch.minimum(snr, torch.full_like(snr, g)) / (snr + 1)),
])
def test_min_snr_weights_match_the_paper(objectives, kind, formula):
    sampling = _sampling(kind)
    sigmas = sampling.sigmas[::97].float()
    snr = 1.0 / sigmas**2
    torch.testing.assert_close(objectives.min_snr_weights(sampling, sigmas, 5.0), formula(snr, 5.0), rtol=1e-4, atol=1e-6)


def test_timestep_range_limits_the_noise(objectives):
    sampling = _sampling("eps")
    gen = torch.Generator().manual_seed(2)
    sigmas = objectives.sample_sigmas(sampling, 500, gen, (0.0, 0.25))
    assert sigmas.max() <= sampling.sigmas[250] + 1e-6
    assert sigmas.min() >= sampling.sigmas[0] - 1e-6
