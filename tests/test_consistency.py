"""lcm_kit.consistency: the one copy of the math, checked against closed forms and diffusers."""

import math

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, LCMScheduler
from diffusers.pipelines.latent_consistency_models.pipeline_latent_consistency_text2img import (
    LatentConsistencyModelPipeline,
)

from lcm_kit import consistency as cm


def test_lcm_boundary_scalings_match_lcmscheduler_and_identity_at_zero():
    sched = LCMScheduler(timestep_scaling=10.0)
    for t in [0, 1, 19, 259, 999]:
        ours = cm.lcm_boundary_scalings(torch.tensor(t), timestep_scaling=10.0)
        ref = sched.get_scalings_for_boundary_condition_discrete(torch.tensor(t))
        assert float(ours[0]) == pytest.approx(float(ref[0]), abs=1e-7)
        assert float(ours[1]) == pytest.approx(float(ref[1]), abs=1e-7)
    c_skip, c_out = cm.lcm_boundary_scalings(0)
    assert (c_skip, c_out) == (1.0, 0.0)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_model_output_conversions_recover_x0_and_eps(prediction_type):
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 4, 5, 5, generator=g), torch.randn(3, 4, 5, 5, generator=g)
    alpha = cm.append_dims(torch.tensor([0.9, 0.5, 0.05]), 4)
    x_t = cm.vp_noise(x0, eps, alpha)
    output = {"epsilon": eps, "v_prediction": cm.vp_velocity(x0, eps, alpha), "sample": x0}[prediction_type]
    torch.testing.assert_close(cm.predicted_original_sample(output, x_t, alpha, prediction_type), x0, atol=1e-5, rtol=0)
    torch.testing.assert_close(cm.predicted_epsilon(output, x_t, alpha, prediction_type), eps, atol=1e-4, rtol=0)


def test_vp_noise_and_velocity_match_diffusers():
    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(2, 4, 4, 4, generator=g), torch.randn(2, 4, 4, 4, generator=g)
    t = torch.tensor([10, 700])
    alpha = cm.append_dims(sched.alphas_cumprod[t], 4)
    torch.testing.assert_close(cm.vp_noise(x0, eps, alpha), sched.add_noise(x0, eps, t))
    torch.testing.assert_close(cm.vp_velocity(x0, eps, alpha), sched.get_velocity(x0, eps, t))


def test_bad_prediction_type_is_named():
    with pytest.raises(ValueError, match="prediction_type"):
        cm.predicted_original_sample(torch.zeros(1), torch.zeros(1), torch.ones(1), "flow")


def test_ddim_timestep_grid_is_lcm_skip_grid():
    grid = cm.ddim_timestep_grid(1000, 50)
    assert grid[0] == 19 and grid[-1] == 999 and len(grid) == 50 and np.all(np.diff(grid) == 20)
    with pytest.raises(ValueError, match="num_ddim_timesteps"):
        cm.ddim_timestep_grid(1000, 0)


def _gaussian_teacher(mu, s, alphas_cumprod):
    """Exact x0-prediction for data N(mu, s^2): D(x~, sigma) = mu + s^2 / (s^2 + sigma^2) (x~ - mu)."""

    def denoise(x, t):
        a = cm.append_dims(alphas_cumprod[t], x.ndim)
        sigma2 = (1 - a) / a
        return mu + s**2 / (s**2 + sigma2) * (x / a.sqrt() - mu)

    return denoise


def _exact_ode(x, t, t_prev, mu, s, alphas_cumprod):
    """Closed-form PF-ODE solution: x~ - mu scales with sqrt(s^2 + sigma^2)."""
    a, a_prev = alphas_cumprod[t], alphas_cumprod[t_prev]
    sig, sig_prev = cm.vp_sigma(a), cm.vp_sigma(a_prev)
    x_scaled = x / a.sqrt()
    return (mu + (x_scaled - mu) * torch.sqrt(s**2 + sig_prev**2) / torch.sqrt(s**2 + sig**2)) * a_prev.sqrt()


def test_vp_solvers_on_gaussian_data_follow_the_exact_ode():
    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    ac = sched.alphas_cumprod.double()
    mu, s = 0.3, 0.7
    denoise = _gaussian_teacher(mu, s, ac)
    x = torch.linspace(-3, 3, 7, dtype=torch.float64)

    def errors(skip):
        t, t_prev = torch.full((7,), 619), torch.full((7,), 619 - skip)
        exact = _exact_ode(x, t, t_prev, mu, s, ac)
        ddim = cm.vp_solver_step(denoise, x, t, t_prev, ac, "ddim")
        euler = cm.vp_solver_step(denoise, x, t, t_prev, ac, "euler")
        heun = cm.vp_solver_step(denoise, x, t, t_prev, ac, "heun")
        torch.testing.assert_close(ddim, euler, atol=1e-10, rtol=0)  # the same move for VP models
        return (euler - exact).abs().max().item(), (heun - exact).abs().max().item()

    (euler_big, heun_big), (euler_small, heun_small) = errors(80), errors(40)
    assert euler_big < 2e-2 and heun_big < euler_big / 3
    # Local error orders: Euler O(h^2), Heun O(h^3) -> halving the step divides them by ~4 and ~8.
    assert 3.0 < euler_big / euler_small < 5.0
    assert heun_big / heun_small > 6.0
    with pytest.raises(ValueError, match="solver"):
        cm.vp_solver_step(denoise, x, torch.full((7,), 619), torch.full((7,), 599), ac, "dpm")


def test_guidance_embedding_matches_diffusers_lcm_pipeline():
    w = torch.tensor([0.0, 3.5, 7.5])
    ref = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, w, embedding_dim=33)
    torch.testing.assert_close(cm.guidance_scale_embedding(w, 33), ref, atol=0, rtol=0)


def test_lcm_cfg_convention():
    cond, uncond = torch.tensor([2.0]), torch.tensor([1.0])
    assert cm.lcm_cfg(cond, uncond, 0.0).item() == 2.0  # w = 0: the conditional prediction
    assert cm.lcm_cfg(cond, uncond, 7.0).item() == 9.0


def test_karras_sigmas_and_consistency_boundary_condition():
    sigmas = cm.karras_sigmas(18)
    assert sigmas[0].item() == pytest.approx(cm.SIGMA_MIN) and sigmas[-1].item() == pytest.approx(cm.SIGMA_MAX)
    assert torch.all(torch.diff(sigmas) > 0)
    c_skip, c_out, c_in = cm.consistency_scalings(torch.tensor(cm.SIGMA_MIN, dtype=torch.float64))
    assert c_skip.item() == 1.0 and c_out.item() == 0.0
    assert c_in.item() == pytest.approx(1 / math.sqrt(cm.SIGMA_MIN**2 + 0.25))
    # Without the offset, f(x, sigma_min) is not exactly x: the offset is what makes the boundary exact.
    assert cm.edm_scalings(torch.tensor(cm.SIGMA_MIN, dtype=torch.float64))[1].item() > 0


def test_edm_solvers_on_gaussian_data_have_the_right_order():
    mu, s = -0.2, 0.5

    def denoise(x, sigma):
        return mu + s**2 / (s**2 + sigma**2) * (x - mu)

    x = torch.linspace(-4, 4, 5, dtype=torch.float64)

    def errors(h):
        sigma, sigma_next = torch.full((5,), 2.0, dtype=torch.float64), torch.full((5,), 2.0 - h, dtype=torch.float64)
        exact = mu + (x - mu) * math.sqrt(s**2 + (2.0 - h) ** 2) / math.sqrt(s**2 + 2.0**2)
        euler = cm.edm_solver_step(denoise, x, sigma, sigma_next, "euler")
        heun = cm.edm_solver_step(denoise, x, sigma, sigma_next, "heun")
        return (euler - exact).abs().max().item(), (heun - exact).abs().max().item()

    (euler_big, heun_big), (euler_small, heun_small) = errors(0.4), errors(0.2)
    assert heun_big < euler_big / 2
    assert 3.0 < euler_big / euler_small < 5.0 and heun_big / heun_small > 6.0


def test_curricula():
    assert cm.ct_num_scales(0, 1000) == 2 and cm.ct_num_scales(1000, 1000) == 151
    assert cm.ct_target_ema(0, 1000) == pytest.approx(0.9**1)  # mu(0) = exp(s0 log mu0 / 2) = mu0
    K = 8000  # K' = floor(K / (log2(1280 / 10) + 1)) = 1000
    assert [cm.ict_num_scales(k, K) for k in (0, 999, 1000, 2500, 7999)] == [11, 11, 21, 41, 1281]
    probs = cm.ict_index_probabilities(cm.karras_sigmas(11))
    assert probs.shape == (10,) and probs.sum().item() == pytest.approx(1.0) and torch.all(probs > 0)
    assert cm.pseudo_huber_c(3 * 32 * 32) == pytest.approx(0.00054 * math.sqrt(3072))


def test_distances():
    a = torch.zeros(2, 3, 4, 4)
    b = torch.full((2, 3, 4, 4), 0.5)
    assert cm.consistency_distance(a, b, "l2").item() == pytest.approx(0.25)
    assert cm.consistency_distance(a, b, "l1").item() == pytest.approx(0.5)
    assert cm.consistency_distance(a, b, "huber", huber_c=0.001).item() == pytest.approx(
        math.sqrt(0.25 + 1e-6) - 0.001
    )
    d = 48
    c = cm.pseudo_huber_c(d)
    assert cm.consistency_distance(a, b, "pseudo_huber").item() == pytest.approx(math.sqrt(0.25 * d + c**2) - c)
    assert cm.consistency_distance(a, b, "l2", reduce=False).shape == (2,)
    with pytest.raises(ValueError, match="loss_type"):
        cm.consistency_distance(a, b, "lpips")
