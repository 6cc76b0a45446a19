"""Samplers as plain functions over ``(model, noise, noise levels)``: multistep consistency sampling and the
deterministic ODE sampler of a diffusion denoiser (the 1-step baseline and the CD teacher's solver)."""

from __future__ import annotations

from typing import Callable

import torch

from .consistency import RHO, SIGMA_MAX, SIGMA_MIN, edm_solver_step, karras_sigmas
from .precond import backbone_output, class_label_kwargs


@torch.no_grad()
def consistency_sample(
    backbone: Callable,
    scheduler,
    noise: torch.Tensor,
    num_inference_steps: int | None = None,
    sigmas=None,
    timesteps=None,
    class_labels=None,
    generator: torch.Generator | None = None,
    conditioning: Callable = class_label_kwargs,
) -> torch.Tensor:
    """Multistep consistency sampling (Song et al. 2023, Alg. 1) of any backbone through a CM scheduler.

    ``noise`` is standard normal; the chain starts at ``sigmas[0] * noise`` and alternates ``x0 = f(x, sigma)`` and
    ``x = x0 + sqrt(sigma_next^2 - sigma_min^2) z`` (fresh z from ``generator``). Give at most one of
    ``num_inference_steps`` (default 1), a descending ``sigmas`` list, or descending ``timesteps`` indices
    (diffusers' convention), as the scheduler (:class:`~lcm_kit.schedulers.scheduling_cm.CMMultistepScheduler`)
    accepts them. The loop is the stock ``ConsistencyModelPipeline``'s, so a ``UNet2DModel`` gives the pipeline's
    samples.
    """
    if num_inference_steps is None and sigmas is None and timesteps is None:
        num_inference_steps = 1
    scheduler.set_timesteps(num_inference_steps=num_inference_steps, timesteps=timesteps, sigmas=sigmas,
                            device=noise.device)
    sample = noise * scheduler.sigmas[0].to(noise.dtype)  # a 0-dim host scalar: nothing is copied to the device
    extra = conditioning(class_labels)
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(sample, t)
        model_output = backbone_output(backbone, model_input, t, extra)
        sample = scheduler.step(model_output, t, sample, generator=generator).prev_sample
    return sample


@torch.no_grad()
def edm_sample(
    denoiser: Callable,
    noise: torch.Tensor,
    num_steps: int,
    solver: str = "heun",
    class_labels=None,
    sigma_min: float = SIGMA_MIN,
    sigma_max: float = SIGMA_MAX,
    rho: float = RHO,
) -> torch.Tensor:
    """Deterministic ODE sampling of a diffusion denoiser over ``num_steps`` Karras levels then to sigma = 0.

    The grid is ``sigma_max, ..., sigma_min, 0`` (``num_steps`` steps; 1 step jumps from sigma_max to D(x)); the
    last step into 0 is Euler (D itself), the others use ``solver`` (Heun: 2 evaluations per step, EDM's sampler).
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}.")
    # The grid is computed in float64 on the host (MPS has no float64) and copied once per call, not per step.
    if num_steps == 1:
        grid = torch.tensor([sigma_max], dtype=torch.float64)
    else:
        grid = karras_sigmas(num_steps, sigma_min, sigma_max, rho).flip(0)
    grid = torch.cat([grid, grid.new_zeros(1)]).to(noise.device, noise.dtype)
    x = noise * grid[0]

    def denoise(sample, sigma):
        return denoiser(sample, sigma, class_labels)

    for index in range(num_steps):
        sigma, sigma_next = grid[index].expand(x.shape[0]), grid[index + 1].expand(x.shape[0])
        if index == num_steps - 1:  # the last level is sigma = 0: the denoiser's output itself
            x = denoise(x, sigma)
        else:
            x = edm_solver_step(denoise, x, sigma, sigma_next, solver)
    return x
