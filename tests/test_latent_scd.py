"""sCD for latent (VP) Stable Diffusion teachers: the UNet as a TrigFlow consistency model, closed-form checks of its
parameterisation, tangent and loss, and short --method scd runs (LoRA and full weights) that load in stock diffusers.

Closed form: for data x0 ~ N(mu, s^2) per element the probability-flow ODE is known, so the exact consistency
function (the ODE map to t = 0) and the exact denoiser (the teacher) are written out here, independently of
lcm_kit.consistency. sCD's tangent df/dt along the teacher's ODE vanishes for the exact consistency function: its
loss is zero there and positive elsewhere.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from safetensors.torch import load_file
from torch import nn

from lcm_kit.consistency import trigflow_consistency_function, trigflow_output_from_vp_prediction
from lcm_kit.precond import VPTrigFlowConsistencyModel
from lcm_kit.training.losses.lcm import guided_teacher_denoiser
from lcm_kit.training.losses.scm import SCMLoss, forward_ad_compatible, vp_teacher_at_levels

MU, S = 0.3, 0.6
ALPHAS = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).alphas_cumprod.double()
LOG_SIGMAS = 0.5 * torch.log((1 - ALPHAS) / ALPHAS)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_the_trigflow_output_of_a_vp_prediction_gives_its_x0_and_minus_the_velocity(prediction_type):
    """x_t = cos t x0 + sin t eps: from the exact eps / v / x0 output, f(x_t, t) = x0 and F = -(cos t eps - sin t x0),
    the negated PF-ODE velocity, whatever the parameterisation."""
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 4, 2, 2, generator=g, dtype=torch.float64), torch.randn(3, 4, 2, 2, generator=g,
                                                                                     dtype=torch.float64)
    t = torch.tensor([0.05, 0.7, 1.45], dtype=torch.float64)
    cos, sin = torch.cos(t).reshape(-1, 1, 1, 1), torch.sin(t).reshape(-1, 1, 1, 1)
    x = cos * x0 + sin * eps
    output = {"epsilon": eps, "v_prediction": cos * eps - sin * x0, "sample": x0}[prediction_type]
    network_output = trigflow_output_from_vp_prediction(output, x, t, prediction_type)
    torch.testing.assert_close(network_output, -(cos * eps - sin * x0))
    torch.testing.assert_close(trigflow_consistency_function(network_output, x, t, sigma_data=1.0), x0)


def _interpolated_log_sigma(timestep):
    """log sigma at a fractional timestep, linear between the discrete levels (what vp_timestep_from_sigma inverts)."""
    timestep = timestep.double().clamp(0, len(ALPHAS) - 1)
    low = timestep.floor().long().clamp(max=len(ALPHAS) - 2)
    frac = timestep - low
    return LOG_SIGMAS[low] + frac * (LOG_SIGMAS[low + 1] - LOG_SIGMAS[low])


class GaussianUNet(nn.Module):
    """An epsilon "UNet" of the Gaussian data at a fractional timestep. ``consistency=True``: its x0 is the exact ODE
    map to 0, x0 = mu + (x~ - mu) s / sqrt(s^2 + sigma^2), x~ = x / sqrt(a); otherwise the exact denoiser (the
    diffusion model: right at every point, but not constant along the ODE's trajectories)."""

    def __init__(self, consistency=True):
        super().__init__()
        self.consistency = consistency

    def forward(self, sample, timestep, **_):
        sigma = _interpolated_log_sigma(timestep).exp().reshape(-1, 1, 1, 1)
        a = 1 / (1 + sigma**2)
        x = sample.double()
        if self.consistency:
            x0 = MU + (x / a.sqrt() - MU) * S / (S**2 + sigma**2).sqrt()
        else:
            x0 = MU + a.sqrt() * S**2 / (a * S**2 + 1 - a) * (x - a.sqrt() * MU)
        return ((x - a.sqrt() * x0) / (1 - a).sqrt()).to(sample.dtype)


def exact_teacher(x, t):
    """The exact denoiser (posterior mean) as an epsilon output, for the conditional and unconditional branch."""
    a = ALPHAS[t].reshape(-1, 1, 1, 1)
    xd = x.double()
    x0 = MU + a.sqrt() * S**2 / (a * S**2 + 1 - a) * (xd - a.sqrt() * MU)
    out = ((xd - a.sqrt() * x0) / (1 - a).sqrt()).float()
    return out, out


def _scd_loss(consistency, normalization_c, batch=256):
    loss = SCMLoss("scd", sigma_data=1.0, alphas_cumprod=ALPHAS.float(), tangent_warmup_steps=0,
                   tangent_normalization_c=normalization_c, adaptive_weighting=False)
    g = torch.Generator().manual_seed(0)
    clean = (MU + S * torch.randn(batch, 4, 2, 2, generator=g, dtype=torch.float64)).float()
    teacher = vp_teacher_at_levels(guided_teacher_denoiser(exact_teacher, torch.zeros(batch), ALPHAS.float(),
                                                           "epsilon"), ALPHAS.float())
    model = VPTrigFlowConsistencyModel(GaussianUNet(consistency), ALPHAS.float(), "epsilon")
    return loss(model, clean, 0, generator=g, teacher=teacher)


@pytest.mark.parametrize("normalization_c", [None, 0.1])
def test_the_scd_loss_vanishes_at_the_exact_consistency_function_only(normalization_c):
    """The full latent sCD path (times at the teacher's levels, the teacher queried through the EDM interface, the
    eps output turned into F, the JVP through the fractional timestep, at the first and last level too): zero
    tangent, zero loss for the exact consistency function; the exact diffusion model is far from zero."""
    exact = _scd_loss(True, normalization_c)
    wrong = _scd_loss(False, normalization_c)
    assert exact.t.min() > 0 and exact.t.max() < torch.pi / 2
    levels = torch.atan(LOG_SIGMAS.exp()).float()
    nearest = (exact.t[:, None] - levels[None, :]).abs().min(dim=1).values
    assert nearest.max() < 1e-6  # every drawn time is one of the teacher's levels
    assert exact.loss.max() < wrong.loss.min()  # every sample, the first and last level included
    assert wrong.loss.mean() > 300 * exact.loss.mean()  # float32 rounding is what is left of the exact one
    assert exact.tangent_norm.mean() < 1e-2 * wrong.tangent_norm.mean()


def test_the_jvp_through_an_sd_unet_is_the_finite_difference():
    """JVP of F through a tiny SD UNet (cross-attention under SDPA's math kernel, GroupNorm, epsilon output) at the
    fractional timestep of t equals the central finite difference. (The Gaussian test above is the one that sees a
    time input that is not differentiable in t.)"""
    from lcm_kit.testing import tiny_sd_components

    unet = tiny_sd_components("sd1")["unet"].double().eval()
    model = VPTrigFlowConsistencyModel(unet, ALPHAS, "epsilon")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)
    hidden = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g, dtype=torch.float64)
    t = torch.tensor([0.4, 1.1], dtype=torch.float64)
    dx, dt = torch.randn(x.shape, generator=g, dtype=torch.float64), torch.ones(2, dtype=torch.float64)

    def network(a, b):
        return model.network(a, b, {"encoder_hidden_states": hidden})

    with torch.no_grad(), forward_ad_compatible(model):
        _, tangent = torch.func.jvp(network, (x, t), (dx, dt))
        h = 1e-4
        fd = (network(x + h * dx, t + h * dt) - network(x - h * dx, t - h * dt)) / (2 * h)
        time_only = (network(x, t + h) - network(x, t - h)) / (2 * h)
    assert time_only.abs().mean() > 1e-2 * fd.abs().mean()  # the time direction is a real part of the tangent
    torch.testing.assert_close(tangent, fd, rtol=1e-2, atol=1e-2 * fd.abs().mean().item())


# ----------------------------------------------------------------------------------------------------------------
# The trainers
# ----------------------------------------------------------------------------------------------------------------


def _scd_argv(train_argv, out, steps=4, extra=()):
    return train_argv(out, steps=steps) + ["--lora_rank", "4", "--learning_rate", "1e-3", "--method", "scd",
                                           "--num_ddim_timesteps", "10", "--tangent_warmup_steps", "2", *extra]


def _images(pipe, steps, **kwargs):
    return pipe(["a red square", "a blue circle"], num_inference_steps=steps, height=32, width=32,
                generator=torch.Generator().manual_seed(0), output_type="np", **kwargs).images


def test_an_scd_lora_samples_the_same_in_stock_lcm_scheduler(kit, tmp_path, train_argv, reset_accelerate):
    """--method scd (LoRA): the loss is finite, the objective samples with LCM's scheduler, and the adapter gives the
    same images in stock StableDiffusionPipeline + LCMScheduler as in LCMPipeline; it changed the model."""
    from diffusers import LCMScheduler, StableDiffusionPipeline

    from lcm_kit.pipelines import LCMPipeline
    from lcm_kit.schedulers import ConsistencyScheduler
    from lcm_kit.training.train_lcm_lora import main as train_lcm_lora

    out = tmp_path / "scd"
    result = train_lcm_lora(_scd_argv(train_argv, out))
    assert np.isfinite(result.last_loss)
    scheduler = result.objective.inference_scheduler()
    assert type(scheduler) is ConsistencyScheduler

    stock = StableDiffusionPipeline.from_pretrained(kit["sd1"], safety_checker=None, requires_safety_checker=False)
    stock.scheduler = LCMScheduler.from_config(stock.scheduler.config, original_inference_steps=10)
    stock.set_progress_bar_config(disable=True)
    without = _images(stock, 2, guidance_scale=1.0)
    stock.load_lora_weights(out, weight_name="pytorch_lora_weights.safetensors")
    stock_images = _images(stock, 2, guidance_scale=1.0)
    ours = LCMPipeline.from_pretrained(kit["sd1"], safety_checker=None, requires_safety_checker=False)
    ours.scheduler = scheduler
    ours.set_progress_bar_config(disable=True)
    ours.load_lora_weights(out / "pytorch_lora_weights.safetensors")
    np.testing.assert_allclose(_images(ours, 2, guidance_scale=1.0), stock_images, atol=1e-5)
    assert np.abs(stock_images - without).max() > 1e-3


def test_a_full_weight_scd_folder_loads_in_stock_diffusers(kit, tmp_path, train_argv, reset_accelerate):
    """--method scd with full weights (w-embedding student, EMA for sampling): the folder is an LCM folder that stock
    DiffusionPipeline loads and samples as LCMPipeline does."""
    from diffusers import DiffusionPipeline, LatentConsistencyModelPipeline, LCMScheduler

    from lcm_kit.pipelines import LCMPipeline
    from lcm_kit.training.train_lcm import main as train_lcm

    out = tmp_path / "full-scd"
    argv = train_argv(out, steps=2)[:-1] + ["--validation_prompts", "--learning_rate", "1e-4", "--ema_decay", "0.5",
                                            "--unet_time_cond_proj_dim", "32", "--num_ddim_timesteps", "10",
                                            "--method", "scd"]
    train_lcm(argv)
    stock = DiffusionPipeline.from_pretrained(out, safety_checker=None, requires_safety_checker=False)
    assert type(stock) is LatentConsistencyModelPipeline and type(stock.scheduler) is LCMScheduler
    stock.set_progress_bar_config(disable=True)
    ours = LCMPipeline.from_pretrained(out, safety_checker=None, requires_safety_checker=False)
    ours.set_progress_bar_config(disable=True)
    np.testing.assert_allclose(_images(ours, 2, guidance_scale=3.0), _images(stock, 2, guidance_scale=3.0),
                               atol=1e-5)


def test_scd_resume_is_bit_exact(tmp_path, train_argv, reset_accelerate):
    """4 steps straight vs 2 steps + resume from checkpoint-2 (inside the tangent warm-up): the same adapter."""
    from lcm_kit.training.train_lcm_lora import main

    reference = tmp_path / "reference"
    main(_scd_argv(train_argv, reference, extra=["--checkpointing_steps", "2", "--tangent_warmup_steps", "3"]))
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(reference / "checkpoint-2", resumed / "checkpoint-2")
    reset_accelerate()
    main(_scd_argv(train_argv, resumed, extra=["--checkpointing_steps", "2", "--tangent_warmup_steps", "3",
                                               "--resume_from_checkpoint", "latest"]))
    a = load_file(reference / "pytorch_lora_weights.safetensors")
    b = load_file(resumed / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and a and all(torch.equal(a[k], b[k]) for k in a)


def test_the_objective_reports_the_tangent_and_its_warmup(lcm_objective, lcm_batch):
    objective, _ = lcm_objective("lora", method="scd", tangent_warmup_steps=4)
    loss, logs = objective.compute_loss(objective.trainable_model(), lcm_batch(), 1, torch.Generator().manual_seed(0))
    assert torch.isfinite(loss) and loss > 0
    assert logs["tangent_warmup"] == 0.25 and torch.isfinite(logs["tangent_norm"]) and logs["tangent_norm"] > 0


def test_scd_under_bf16_mixed_precision_runs_the_jvp_under_autocast(lcm_objective, lcm_batch):
    """A LoRA's frozen base in bf16 (CPU autocast): the JVP runs under autocast (float32 inputs would not meet the
    bf16 weights); a finite fp32 loss and finite fp32 adapter gradients."""
    objective, _ = lcm_objective("lora", mixed_precision="bf16", method="scd")
    assert objective.scd_loss.jvp_autocast
    model = objective.trainable_model()
    loss, _ = objective.compute_loss(model, lcm_batch(), 0, torch.Generator().manual_seed(0))
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("extra, message", [
    (["--tangent_warmup_steps", "3"], "--tangent_warmup_steps only applies to --method scd"),
    (["--scd_p_mean", "-1"], "--scd_p_mean only applies to --method scd"),
    (["--method", "tcd", "--tangent_normalization_c", "0.1"], "--tangent_normalization_c only applies"),
    (["--method", "scd", "--num_phases", "2"], "--num_phases only applies to --method pcm"),
    (["--method", "scd", "--adversarial_weight", "0.1"], "--adversarial_weight only applies to --method pcm"),
])
def test_bad_scd_flags_are_refused(train_argv, tmp_path, extra, message):
    from lcm_kit.training.train_lcm_lora import main as train_lcm_lora

    with pytest.raises(ValueError, match=message):
        train_lcm_lora(train_argv(tmp_path / "x") + extra)


def test_the_card_of_an_scd_lora_shows_the_lcm_scheduler():
    from lcm_kit.training.hub import render_model_card

    card = render_model_card("someone/base", "someone/adapter", True, ["train_lcm_lora.py", "--method", "scd"],
                             method="scd")
    assert "LCMScheduler" in card and "TCDScheduler" not in card
    assert "- scm" in card and "sCD-LoRA" in card and "continuous-time consistency distillation" in card
