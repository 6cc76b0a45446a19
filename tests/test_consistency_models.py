"""CD / CT / iCT objectives, the consistency-model wrapper and the sigma-space sampler, against closed forms and
diffusers' consistency-model scheduler and pipeline."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from diffusers import CMStochasticIterativeScheduler, ConsistencyModelPipeline, DDPMScheduler, UNet2DModel

from lcm_kit import consistency as cm
from lcm_kit.precond import ConsistencyModel, EDMDenoiser, VPDenoiser
from lcm_kit.sampling import consistency_sample, edm_sample
from lcm_kit.schedulers.scheduling_cm import CMMultistepScheduler
from lcm_kit.testing import (
    HostTraffic,
    ToyMLP,
    gaussian_mixture_2d,
    sliced_wasserstein,
    train_toy_consistency,
    train_toy_diffusion,
)
from lcm_kit.training.cm_objective import save_consistency_pipeline
from lcm_kit.training.losses import ConsistencyLoss
from lcm_kit.utils import ema_update_

MU, S = 0.3, 0.5  # 1-D / 2-D Gaussian data N(MU, S^2 I)


def gaussian_denoiser(x, sigma, class_labels=None):
    """Exact E[x0 | x0 + sigma z = x] for x0 ~ N(MU, S^2)."""
    sigma = cm.append_dims(torch.as_tensor(sigma, dtype=x.dtype).reshape(-1), x.ndim)
    return MU + S**2 / (S**2 + sigma**2) * (x - MU)


def gaussian_consistency(x, sigma):
    """Exact f(x, sigma): follow the PF-ODE x(sigma) = MU + (x - MU) sqrt(S^2 + sigma^2) down to sigma_min."""
    sigma = cm.append_dims(torch.as_tensor(sigma, dtype=x.dtype).reshape(-1), x.ndim)
    return MU + (x - MU) * math.sqrt(S**2 + cm.SIGMA_MIN**2) / torch.sqrt(S**2 + sigma**2)


class GaussianConsistencyBackbone(torch.nn.Module):
    """A backbone F whose preconditioned output is exactly the Gaussian consistency function.

    It only sees what a UNet sees (c_in x and 250 log sigma), recovers x and sigma, and returns
    F = (f - c_skip x) / c_out: the wrapper and the sampler reproduce f only if they precondition correctly.
    """

    def forward(self, model_input, timestep, class_labels=None):
        timestep = torch.as_tensor(timestep, dtype=torch.float64).reshape(-1)
        sigma = cm.append_dims(torch.exp(timestep / 250.0).to(model_input.dtype), model_input.ndim)
        c_skip, c_out, c_in = cm.consistency_scalings(sigma)
        x = model_input / c_in
        target = gaussian_consistency(x, sigma.reshape(-1))
        return torch.where(c_out > 0, (target - c_skip * x) / c_out.clamp(min=1e-30), torch.zeros_like(x))


def tiny_unet(num_class_embeds=None, channels=3, size=8):
    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=size,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        norm_num_groups=8,
        num_class_embeds=num_class_embeds,
    )


# ------------------------------------------------------------------------------------------------------------
# Parameterisation
# ------------------------------------------------------------------------------------------------------------


def test_scalings_match_diffusers_and_boundary_is_exact():
    stock = CMStochasticIterativeScheduler()
    sigmas = torch.cat([torch.tensor([cm.SIGMA_MIN]), cm.karras_sigmas(40).float(), torch.tensor([3.0, 80.0])])
    c_skip, c_out, c_in = cm.consistency_scalings(sigmas)
    ref_skip, ref_out = stock.get_scalings_for_boundary_condition(sigmas)
    torch.testing.assert_close(c_skip, ref_skip, rtol=0, atol=0)
    torch.testing.assert_close(c_out, ref_out, rtol=0, atol=0)
    # c_in has the square root: the stock scheduler divides by sqrt(sigma^2 + sigma_data^2).
    x = torch.randn(1, 3, 4, 4)
    stock.set_timesteps(timesteps=[10, 0])
    torch.testing.assert_close(stock.scale_model_input(x, stock.timesteps[0]), x * c_in.new_tensor(1 / math.sqrt(80.0**2 + 0.25)))
    assert c_in[-1].item() == pytest.approx(1 / math.sqrt(80.0**2 + 0.25))
    np.testing.assert_allclose(cm.sigma_to_timestep(sigmas.double().numpy()), stock.sigma_to_t(sigmas.double().numpy()))

    # f(x, sigma_min) = x exactly, through a real (random) UNet, conditional or not.
    for num_class_embeds in (None, 10):
        model = ConsistencyModel(tiny_unet(num_class_embeds))
        labels = None if num_class_embeds is None else torch.tensor([1, 7])
        x = torch.randn(2, 3, 8, 8)
        with torch.no_grad():
            assert torch.equal(model(x, cm.SIGMA_MIN, labels), x)
            assert not torch.allclose(model(x, 0.5, labels), x)  # the backbone matters above sigma_min


def test_wrapper_and_scheduler_reproduce_the_gaussian_consistency_function():
    model = ConsistencyModel(GaussianConsistencyBackbone())
    x = torch.linspace(-60, 60, 11, dtype=torch.float64).reshape(11, 1)
    sigma = torch.logspace(math.log10(0.002), math.log10(80), 11, dtype=torch.float64)
    torch.testing.assert_close(model(x, sigma), gaussian_consistency(x, sigma))
    # The sampler's step with the same backbone output gives the same x0 (training and sampling agree).
    scheduler = CMMultistepScheduler(clip_denoised=False)
    scheduler.set_timesteps(sigmas=[7.0])
    t = scheduler.timesteps[0]
    out = scheduler.step(GaussianConsistencyBackbone()(scheduler.scale_model_input(x, t), t), t, x)
    torch.testing.assert_close(out.denoised, gaussian_consistency(x, torch.tensor(7.0, dtype=torch.float64)))
    torch.testing.assert_close(out.prev_sample, out.denoised)  # one step: no re-noising


def test_vp_denoiser_queries_a_ddpm_model_at_any_sigma():
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    alphas = scheduler.alphas_cumprod
    log_sigmas = torch.log(cm.vp_sigma(alphas.double()))
    # Discrete levels map to their own timestep; out-of-range sigmas clamp.
    ts = torch.tensor([0, 1, 500, 999])
    torch.testing.assert_close(cm.vp_timestep_from_sigma(log_sigmas[ts].exp(), alphas), ts.double())
    assert cm.vp_timestep_from_sigma(torch.tensor([1e-4, 1e4]), alphas).tolist() == [0.0, 999.0]

    class ExactEpsilon(torch.nn.Module):  # Gaussian data: eps = (x_t - sqrt(a) E[x0|x_t]) / sqrt(1 - a)
        def forward(self, x_t, t):
            t = torch.as_tensor(t, dtype=torch.float64)
            low = t.floor().long().clamp(max=998)
            sigma = torch.exp(log_sigmas[low] + (t - low) * (log_sigmas[low + 1] - log_sigmas[low]))
            a = cm.append_dims(1 / (1 + sigma**2), x_t.ndim)
            x0 = gaussian_denoiser(x_t / a.sqrt(), sigma)
            return (x_t - a.sqrt() * x0) / (1 - a).sqrt()

    denoiser = VPDenoiser.from_scheduler(ExactEpsilon(), scheduler)
    x = torch.linspace(-3, 3, 7, dtype=torch.float64).reshape(7, 1)
    sigma = torch.tensor([0.05, 0.3, 1.0, 2.0, 5.0, 9.0, 14.0], dtype=torch.float64)
    # VPDenoiser computes its timestep and alpha in float32.
    torch.testing.assert_close(denoiser(x, sigma), gaussian_denoiser(x, sigma), rtol=1e-5, atol=1e-5)
    with pytest.raises(TypeError, match="scheduler"):
        VPDenoiser.from_scheduler(ExactEpsilon(), CMStochasticIterativeScheduler())


# ------------------------------------------------------------------------------------------------------------
# Objectives on Gaussian data (closed form)
# ------------------------------------------------------------------------------------------------------------


def _exact_ode(x, sigma, sigma_to):
    return MU + (x - MU) * torch.sqrt(S**2 + sigma_to**2) / torch.sqrt(S**2 + sigma**2)


def test_cd_teacher_step_follows_the_exact_ode_and_exact_f_has_near_zero_loss():
    clean = MU + S * torch.randn(4096, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    noise = torch.randn(4096, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    sigmas = cm.karras_sigmas(18)
    index = torch.arange(4096) % 17
    sigma, sigma_next = sigmas[index], sigmas[index + 1]
    errors, losses = {}, {}
    for solver in ("euler", "heun"):
        objective = ConsistencyLoss("cd", 100, teacher=gaussian_denoiser, solver=solver)
        x_prev = objective.previous_point(clean, noise, sigma, sigma_next)
        x_next = clean + sigma_next[:, None] * noise
        exact = _exact_ode(x_next, sigma_next[:, None], sigma[:, None])
        errors[solver] = ((x_prev - exact).abs() / (exact - x_next).abs()).max().item()  # relative to the move
        model = ConsistencyModel(GaussianConsistencyBackbone())
        losses[solver] = objective(model, clean, 0, target_model=model, generator=torch.Generator().manual_seed(2)).loss.mean().item()
    assert errors["heun"] < errors["euler"] / 5 and errors["heun"] < 0.06
    # The exact consistency function is (nearly) a fixed point of CD; a wrong f is not.
    objective = ConsistencyLoss("cd", 100, teacher=gaussian_denoiser)
    wrong = ConsistencyModel(GaussianConsistencyBackbone())
    wrong.sigma_data = 0.7  # mis-preconditioned: f is no longer the ODE's origin
    wrong_loss = objective(wrong, clean, 0, target_model=wrong, generator=torch.Generator().manual_seed(2)).loss.mean().item()
    assert losses["heun"] < 1e-4 < wrong_loss
    assert losses["heun"] < losses["euler"]


def test_ct_target_is_the_same_noise_one_level_down_and_an_unbiased_euler_cd_target():
    clean = torch.randn(3, 2, dtype=torch.float64)
    noise = torch.randn(3, 2, dtype=torch.float64)
    sigma, sigma_next = torch.tensor([0.1, 1.0, 10.0], dtype=torch.float64), torch.tensor([0.2, 1.5, 20.0], dtype=torch.float64)
    objective = ConsistencyLoss("ct", 100)
    x_prev = objective.previous_point(clean, noise, sigma, sigma_next)
    torch.testing.assert_close(x_prev, clean + sigma[:, None] * noise)
    # = an Euler step of the ODE with the clean sample standing in for the teacher's denoiser.
    euler = cm.edm_solver_step(lambda x, s: clean, clean + sigma_next[:, None] * noise, sigma_next, sigma, "euler")
    torch.testing.assert_close(x_prev, euler)

    # Averaged over the posterior of x0 given x_{i+1}, the CT point is the CD (Euler, exact teacher) point.
    generator = torch.Generator().manual_seed(0)
    x_next, s, s_next = torch.tensor([[0.9]], dtype=torch.float64), torch.tensor([0.6], dtype=torch.float64), torch.tensor([1.2], dtype=torch.float64)
    post_mean = gaussian_denoiser(x_next, s_next)
    post_std = S * s_next / torch.sqrt(S**2 + s_next**2)
    x0 = post_mean + post_std * torch.randn(200_000, 1, generator=generator, dtype=torch.float64)
    z = (x_next - x0) / s_next
    ct_points = objective.previous_point(x0, z, s.expand(200_000), s_next.expand(200_000))
    cd_point = ConsistencyLoss("cd", 100, teacher=gaussian_denoiser, solver="euler").previous_point(
        post_mean, (x_next - post_mean) / s_next, s, s_next)
    assert ct_points.mean().item() == pytest.approx(cd_point.item(), abs=3e-3)


def test_ict_loss_of_the_exact_f_matches_its_closed_form():
    """With f known in closed form, every per-sample iCT loss is known: this pins the pair (x0 + sigma_{i+1} z vs.
    x0 + sigma_i z, same z), the pseudo-Huber distance, its c = 0.00054 sqrt(d) and the weight 1 / (sigma_{i+1} - sigma_i)."""
    clean = MU + S * torch.randn(2048, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    noise = torch.randn(2048, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    objective = ConsistencyLoss("ict", 1000)
    exact = ConsistencyModel(GaussianConsistencyBackbone())
    out = objective(exact, clean, 999, generator=torch.Generator().manual_seed(2), noise=noise)
    assert objective.num_scales(999) == 1281 and objective.target_ema_decay(999) == 0.0
    sigma, sigma_next = out.sigma[:, None], out.sigma_next[:, None]
    online = gaussian_consistency(clean + sigma_next * noise, out.sigma_next)
    target = gaussian_consistency(clean + sigma * noise, out.sigma)
    diff = (online.float() - target.float()).double()  # consistency_distance works in float32
    c = 0.00054 * math.sqrt(2)
    expected = (torch.sqrt(diff.pow(2).sum(1) + c**2) - c) / (out.sigma_next - out.sigma)
    # float32 differences of outputs up to |x| ~ 80: a wrong pair, distance or weight would be off by O(1).
    torch.testing.assert_close(out.loss.detach(), expected.to(out.loss.dtype), rtol=1e-3, atol=1e-6)
    with pytest.raises(ValueError, match="target_model"):
        objective(exact, clean, 0, target_model=exact)
    with pytest.raises(ValueError, match="target_model"):
        ConsistencyLoss("ct", 10)(exact, clean, 0)


def test_sampler_with_exact_f_gives_the_data_distribution_at_any_step_count():
    model = GaussianConsistencyBackbone()
    scheduler = CMMultistepScheduler(clip_denoised=False)
    noise = torch.randn(100_000, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for kwargs in ({"num_inference_steps": 1}, {"sigmas": [80.0, 0.821]}, {"sigmas": [80.0, 5.0, 0.5, 0.05]},
                   {"timesteps": [30, 10, 0]}):
        x = consistency_sample(model, scheduler, noise, generator=torch.Generator().manual_seed(1), **kwargs)
        assert x.mean().item() == pytest.approx(MU, abs=0.01), kwargs
        assert x.std().item() == pytest.approx(math.sqrt(S**2 + cm.SIGMA_MIN**2), rel=0.01), kwargs


# ------------------------------------------------------------------------------------------------------------
# Objective mechanics
# ------------------------------------------------------------------------------------------------------------


def test_curricula_weights_and_index_sampling_per_mode():
    ct = ConsistencyLoss("ct", 1000)
    assert [ct.num_scales(k) for k in (0, 500, 1000)] == [cm.ct_num_scales(k, 1000) for k in (0, 500, 1000)]
    assert ct.target_ema_decay(0) == pytest.approx(0.9) and ct.target_ema_decay(1000) == pytest.approx(cm.ct_target_ema(1000, 1000))
    cd = ConsistencyLoss("cd", 1000, teacher=gaussian_denoiser)
    assert cd.num_scales(123) == 18 and cd.target_ema_decay(5) == 0.95 and cd.solver == "heun"
    ict = ConsistencyLoss("ict", 8000)
    assert ict.loss_type == "pseudo_huber" and ict.num_scales(2500) == 41
    sigma, sigma_next = torch.tensor([1.0]), torch.tensor([1.25])
    assert ict.loss_weight(sigma, sigma_next).item() == pytest.approx(4.0)
    assert ct.loss_weight(sigma, sigma_next).item() == 1.0

    # Lognormal index sampling follows iCT's probabilities (21 levels, 40k draws).
    sigma_i, _ = ict.sample_sigma_pairs(1000, 40_000, torch.Generator().manual_seed(0))
    levels = ict.sigmas(1000)
    counts = torch.bincount(torch.searchsorted(levels, sigma_i), minlength=20).double() / 40_000
    torch.testing.assert_close(counts[:20], ict.index_probabilities(levels), atol=0.01, rtol=0)
    # CT pairs are uniform over the grid and adjacent.
    sigma_i, sigma_n = ct.sample_sigma_pairs(1000, 1000, torch.Generator().manual_seed(0))
    grid = ct.sigmas(1000)
    assert torch.equal(grid[torch.searchsorted(grid, sigma_i) + 1], sigma_n)


def test_invalid_options_are_named():
    with pytest.raises(ValueError, match="mode"):
        ConsistencyLoss("dm", 10)
    with pytest.raises(ValueError, match="teacher"):
        ConsistencyLoss("cd", 10)
    with pytest.raises(ValueError, match="teacher=.*not used by mode='ct'"):
        ConsistencyLoss("ct", 10, teacher=gaussian_denoiser)
    with pytest.raises(ValueError, match="mu0"):
        ConsistencyLoss("ict", 10, mu0=0.9)
    with pytest.raises(ValueError, match="loss_type"):
        ConsistencyLoss("ict", 10, loss_type="huber")
    with pytest.raises(ValueError, match="huber_c"):
        ConsistencyLoss("ct", 10, huber_c=0.1)
    with pytest.raises(ValueError, match="solver"):
        ConsistencyLoss("cd", 10, teacher=gaussian_denoiser, solver="ddim")


def test_lpips_is_optional_with_a_clear_message():
    try:
        import lpips  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pip install lpips.*pseudo_huber"):
            ConsistencyLoss("ct", 10, loss_type="lpips")
    else:
        pytest.skip("lpips is installed; its weights may still be missing offline")


@pytest.mark.parametrize("mode", ["ict", "ct"])
def test_the_consistency_target_carries_no_gradient(mode):
    """Only the online pass is differentiated (stop-gradient target): the gradient equals that of the same distance
    to the target pass's output detached. An iCT target computed with gradients (its target is the online network
    itself) adds the target branch's derivative and fails this."""
    torch.manual_seed(0)
    model = ConsistencyModel(ToyMLP(hidden_dim=32))
    clean, _ = gaussian_mixture_2d(64, torch.Generator().manual_seed(0))
    loss = ConsistencyLoss(mode, 100)
    target_model = copy.deepcopy(model).requires_grad_(False) if loss.uses_target_network else None
    outputs = []
    model.register_forward_hook(lambda module, args, output: outputs.append(output))
    if target_model is not None:
        target_model.register_forward_hook(lambda module, args, output: outputs.append(output))
    out = loss(model, clean, 50, target_model=target_model, generator=torch.Generator().manual_seed(1))
    online, target = outputs
    assert online.requires_grad and not target.requires_grad
    weight = loss.loss_weight(out.sigma, out.sigma_next).float()
    reference = (loss.distance(online, target.detach()) * weight).mean()
    params = [p for p in model.parameters()]
    expected = torch.autograd.grad(reference, params, retain_graph=True)
    got = torch.autograd.grad(out.loss.mean(), params)
    assert max(e.abs().max() for e in expected) > 0
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, atol=1e-7, rtol=1e-6)


def test_online_and_target_passes_share_dropout_masks():
    torch.manual_seed(0)
    backbone = ToyMLP(hidden_dim=64, dropout=0.5)
    masks = []
    for module in backbone.modules():
        if isinstance(module, torch.nn.Dropout):
            module.register_forward_hook(lambda m, inp, out: masks.append(out == 0))
    model = ConsistencyModel(backbone).train()
    clean, _ = gaussian_mixture_2d(64, torch.Generator().manual_seed(0))
    objective = ConsistencyLoss("ict", 100)
    objective(model, clean, 50, generator=torch.Generator().manual_seed(0))
    assert len(masks) == 6  # 3 dropout layers, online pass then target pass
    online, target = masks[:3], masks[3:]
    for a, b in zip(online, target):
        assert torch.equal(a, b) and 0.3 < a.float().mean() < 0.7
    # The masks really are random: the next call draws different ones.
    masks.clear()
    objective(model, clean, 50, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(masks[0], online[0])


def test_ema_update():
    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    expected = [0.9 * p.detach() + 0.1 * q.detach() for p, q in zip(a.parameters(), b.parameters())]
    ema_update_(a, b, 0.9)
    for p, e in zip(a.parameters(), expected):
        torch.testing.assert_close(p.detach(), e)
    with pytest.raises(ValueError, match="decay"):
        ema_update_(a, b, 1.5)


# ------------------------------------------------------------------------------------------------------------
# Sampler parity and diffusers folders
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs", [{"num_inference_steps": 1}, {"num_inference_steps": 3}, {"timesteps": [22, 0]}])
def test_scheduler_matches_cmstochasticiterative_in_the_stock_pipeline(kwargs):
    unet = tiny_unet(num_class_embeds=10)
    images = []
    for scheduler in (CMStochasticIterativeScheduler(), CMMultistepScheduler()):
        pipe = ConsistencyModelPipeline(unet=unet, scheduler=scheduler)
        pipe.set_progress_bar_config(disable=True)
        out = pipe(batch_size=2, class_labels=[3, 4], generator=torch.Generator().manual_seed(0), output_type="pt", **kwargs)
        images.append(out.images)
    torch.testing.assert_close(images[0], images[1], atol=1e-5, rtol=0)
    assert images[0].std() > 0.01


@pytest.mark.parametrize("kwargs", [{"num_inference_steps": 3}, {"timesteps": [22, 0]}, {"num_inference_steps": 1}])
def test_scheduler_draws_the_stock_random_numbers_so_a_reused_generator_gives_the_stock_images(kwargs):
    """Two sampling loops with one generator: the second loop starts where the stock scheduler's generator is."""
    unet = tiny_unet(num_class_embeds=10)
    results = []
    for scheduler in (CMStochasticIterativeScheduler(), CMMultistepScheduler()):
        pipe = ConsistencyModelPipeline(unet=unet, scheduler=scheduler)
        pipe.set_progress_bar_config(disable=True)
        generator = torch.Generator().manual_seed(0)
        images = [pipe(batch_size=2, class_labels=[3, 4], generator=generator, output_type="pt", **kwargs).images
                  for _ in range(2)]
        results.append((images, generator.get_state()))
    (stock_images, stock_state), (our_images, our_state) = results
    assert torch.equal(our_state, stock_state)
    for ours, stock in zip(our_images, stock_images):
        # The stock last step adds z * sqrt(sigma_min^2 - sigma_min^2), float32 rounding (~7e-7 z); ours returns x0.
        torch.testing.assert_close(ours, stock, atol=1e-5, rtol=0)
    assert (our_images[0] - our_images[1]).abs().max() > 0.01  # the second loop really drew other noise


@pytest.mark.parametrize("kwargs", [{"num_inference_steps": 3}, {"timesteps": [22, 0]}, {"sigmas": [80.0, 0.821]}])
def test_scheduler_runs_on_a_non_cpu_device_without_host_syncs(kwargs):
    scheduler = CMMultistepScheduler()
    scheduler.set_timesteps(device="meta", **kwargs)
    assert scheduler.timesteps.device.type == "meta" and scheduler.sigmas.device.type == "cpu"
    sample = torch.empty(2, 3, 8, 8, device="meta")
    for t in scheduler.timesteps:
        with HostTraffic() as traffic:
            model_input = scheduler.scale_model_input(sample, t)
            out = scheduler.step(torch.empty_like(model_input), t, sample)
        assert traffic.violations == [], traffic.violations
        assert out.prev_sample.device.type == out.denoised.device.type == "meta"
        sample = out.prev_sample
    assert scheduler.step_index == len(scheduler.timesteps)


def test_scheduler_sigma_lists_equal_the_stock_timestep_lists_and_any_length():
    stock = CMStochasticIterativeScheduler()
    stock.set_timesteps(timesteps=[30, 12, 0])
    ours = CMMultistepScheduler()
    ours.set_timesteps(sigmas=stock.sigmas[:-1].double())
    torch.testing.assert_close(ours.timesteps, stock.timesteps)
    torch.testing.assert_close(ours.sigmas, stock.sigmas)
    # More sigmas than num_train_timesteps: every one is visited, the chain ends at x0.
    short = CMMultistepScheduler(num_train_timesteps=2, clip_denoised=False)
    x = consistency_sample(GaussianConsistencyBackbone(), short, torch.randn(5000, 1, dtype=torch.float64),
                           sigmas=[80.0, 10.0, 1.0, 0.1], generator=torch.Generator().manual_seed(0))
    assert short.step_index == 4 and x.std().item() == pytest.approx(S, rel=0.05)
    for bad in ([1.0, 2.0], [100.0, 1.0], [1.0, 0.001]):
        with pytest.raises(ValueError, match="sigmas"):
            ours.set_timesteps(sigmas=bad)
    with pytest.raises(ValueError, match="exactly one"):
        ours.set_timesteps(2, sigmas=[80.0, 1.0])


@pytest.mark.parametrize("num_class_embeds", [None, 10])
def test_trained_model_saves_as_a_stock_consistency_pipeline(tmp_path, num_class_embeds):
    unet = tiny_unet(num_class_embeds)
    model = ConsistencyModel(unet)
    objective = ConsistencyLoss("ict", 10)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    before = copy.deepcopy(unet.state_dict())
    for step in range(2):
        clean = torch.rand(4, 3, 8, 8, generator=generator) * 2 - 1
        labels = None if num_class_embeds is None else torch.randint(0, 10, (4,), generator=generator)
        loss = objective(model, clean, step, class_labels=labels, generator=generator).loss.mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert any(not torch.equal(before[k], v) for k, v in unet.state_dict().items())

    save_consistency_pipeline(unet, str(tmp_path / "cm"))
    assert (tmp_path / "cm" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    pipe = ConsistencyModelPipeline.from_pretrained(str(tmp_path / "cm"))
    assert isinstance(pipe.scheduler, CMStochasticIterativeScheduler)
    pipe.set_progress_bar_config(disable=True)
    labels = None if num_class_embeds is None else [2, 9]
    for steps, kwargs in ((1, {"num_inference_steps": 1}), (2, {"timesteps": [20, 0]})):
        stock = pipe(batch_size=2, class_labels=labels, generator=torch.Generator().manual_seed(0), output_type="pt",
                     **kwargs).images
        noise = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
        generator = torch.Generator().manual_seed(0)
        generator.set_state(torch.Generator().manual_seed(0).get_state())
        torch.randn(2, 3, 8, 8, generator=generator)  # the pipeline drew its latents first from the same generator
        ours = consistency_sample(unet, CMMultistepScheduler.from_config(pipe.scheduler.config), noise,
                                  class_labels=None if labels is None else torch.tensor(labels), generator=generator,
                                  **kwargs)
        torch.testing.assert_close(stock, (ours / 2 + 0.5).clamp(0, 1), atol=1e-5, rtol=0)
    # The saved weights are the trained ones.
    reloaded = UNet2DModel.from_pretrained(str(tmp_path / "cm"), subfolder="unet")
    for k, v in unet.state_dict().items():
        assert torch.equal(reloaded.state_dict()[k], v)


# ------------------------------------------------------------------------------------------------------------
# 2-D Gaussian-mixture toy
# ------------------------------------------------------------------------------------------------------------

TOY_DIFFUSION_STEPS, TOY_CONSISTENCY_STEPS = 600, 600
# Sliced W2 of 2,000 samples to 2,000 data points; two data draws: ~0.02, the diffusion model at 1 step: ~0.45,
# at 25 Heun steps: ~0.04. Measured at these budgets: iCT 1-step ~0.15, CD 1-step ~0.06.
TOY_ONE_STEP_THRESHOLD = {"ict": 0.25, "cd": 0.15}


@pytest.mark.parametrize("mode", ["ict", "cd"])
def test_toy_one_step_beats_threshold_and_the_diffusion_model(mode):
    def data(n, generator):
        return gaussian_mixture_2d(n, generator)

    torch.manual_seed(0)
    reference, _ = gaussian_mixture_2d(2000, torch.Generator().manual_seed(10_000))
    noise = torch.randn(2000, 2, generator=torch.Generator().manual_seed(30_000))

    def score(samples):
        return sliced_wasserstein(samples, reference, generator=torch.Generator().manual_seed(1))

    diffusion = EDMDenoiser(ToyMLP())
    train_toy_diffusion(diffusion, data, TOY_DIFFUSION_STEPS)
    diffusion_one_step = score(edm_sample(diffusion, noise, 1))
    diffusion_many = score(edm_sample(diffusion, noise, 25, "heun"))
    assert diffusion_many < 0.1  # the starting point is a working diffusion model

    model = ConsistencyModel(copy.deepcopy(diffusion.backbone))  # starts from the diffusion model's weights
    kwargs = {"teacher": diffusion} if mode == "cd" else {}
    train_toy_consistency(ConsistencyLoss(mode, TOY_CONSISTENCY_STEPS, **kwargs), model, data)
    scheduler = CMMultistepScheduler(clip_denoised=False)
    one_step = score(consistency_sample(model.backbone, scheduler, noise))
    two_step = score(consistency_sample(model.backbone, scheduler, noise, sigmas=[80.0, 0.821],
                                        generator=torch.Generator().manual_seed(0)))
    assert one_step < TOY_ONE_STEP_THRESHOLD[mode] and one_step < diffusion_one_step / 2, (one_step, diffusion_one_step)
    assert two_step < diffusion_one_step / 2


def test_cm_pipeline_matches_the_stock_pipeline_and_adds_sigmas_labels_and_a_vae(tmp_path):
    from lcm_kit.pipelines.pipeline_cm import CMPipeline
    from lcm_kit.testing import tiny_sd_components

    unet = tiny_unet(num_class_embeds=10)
    save_consistency_pipeline(unet, str(tmp_path / "cm"))
    stock = ConsistencyModelPipeline.from_pretrained(str(tmp_path / "cm"))
    ours = CMPipeline.from_pretrained(str(tmp_path / "cm"))
    assert ours.vae is None and isinstance(ours.scheduler, CMStochasticIterativeScheduler)
    for pipe in (stock, ours):
        pipe.set_progress_bar_config(disable=True)
    for kwargs in ({"num_inference_steps": 1}, {"timesteps": [22, 0]}):
        images = [p(batch_size=2, class_labels=[1, 5], generator=torch.Generator().manual_seed(0), output_type="pt",
                    **kwargs).images for p in (stock, ours)]
        torch.testing.assert_close(images[0], images[1], atol=1e-5, rtol=0)
    # Sigma lists; labels drawn from the generator are reproducible.
    a = ours(batch_size=3, sigmas=[80.0, 0.821], generator=torch.Generator().manual_seed(1), output_type="pt").images
    b = ours(batch_size=3, sigmas=[80.0, 0.821], generator=torch.Generator().manual_seed(1), output_type="pt").images
    assert torch.equal(a, b) and a.shape == (3, 3, 8, 8)
    with pytest.raises(ValueError, match="class_labels"):
        ours(batch_size=2, class_labels=[1, 10])
    with pytest.raises(ValueError, match="exactly one"):
        ours(num_inference_steps=2, sigmas=[80.0, 1.0])

    # Latent space: 4-channel latents decoded by the VAE (scale factor 2).
    vae = tiny_sd_components("sd1", seed=0)["vae"]
    latent_unet = tiny_unet(channels=vae.config.latent_channels, size=8)
    pipe = CMPipeline(unet=latent_unet, scheduler=CMMultistepScheduler(clip_denoised=False), vae=vae)
    pipe.set_progress_bar_config(disable=True)
    latents = pipe(batch_size=2, output_type="latent", generator=torch.Generator().manual_seed(0)).images
    images = pipe(batch_size=2, output_type="pt", generator=torch.Generator().manual_seed(0)).images
    assert latents.shape == (2, 4, 8, 8) and images.shape == (2, 3, 16, 16)
    expected = (vae.decode(latents / vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
    torch.testing.assert_close(images, expected)
    with pytest.raises(ValueError, match="unconditional"):
        pipe(batch_size=1, class_labels=[0])
