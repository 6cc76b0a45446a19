"""Latent consistency distillation (LCM paper, Algorithm 1) as one callable: the per-sample LCD loss, with the
time both sides of a pair are mapped to as a rule (``target_rule``): LCM's origin, PCM's phase edge or TCD's
random earlier time (:func:`lcm_kit.consistency.target_timesteps`).

Networks enter as plain callables, so the closed-form Gaussian tests drive exactly the code training runs:

* ``student(x, t, w)`` and ``target(x, t, w)`` return raw UNet outputs under the teacher's ``prediction_type``
  (``w`` is the guidance weight of each sample, for a student with a guidance embedding);
* ``teacher(x, t)`` returns ``(cond_output, uncond_output)`` (one batched forward in the trainer).

All math comes from :mod:`lcm_kit.consistency` (the scheduler's code): boundary scalings, x0 conversions for epsilon
and v-prediction teachers, the DDIM / Euler / Heun teacher step, LCM's CFG convention, the distance.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ...consistency import (
    LOSS_TYPES,
    PREDICTION_TYPES,
    SOLVERS,
    TARGET_RULES,
    append_dims,
    consistency_distance,
    ddim_timestep_grid,
    lcm_cfg,
    lcm_consistency_function,
    phase_edge_timesteps,
    predicted_original_sample,
    sample_uniform,
    target_timesteps,
    trajectory_map,
    vp_noise,
    vp_solver_step,
)

ModelFn = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class LCMDistillationConfig:
    """Hyper-parameters of one distillation step (defaults: diffusers' LCM scripts for SD 1.x)."""

    num_train_timesteps: int = 1000
    num_ddim_timesteps: int = 50
    solver: str = "ddim"
    w_min: float = 5.0
    w_max: float = 15.0
    timestep_scaling_factor: float = 10.0
    loss_type: str = "huber"
    huber_c: float = 0.001
    prediction_type: str = "epsilon"
    target_rule: str = "lcm"  # "lcm" (s = 0), "pcm" (s = the phase's lower edge) or "tcd" (s random in [0, t_n])
    num_phases: int = 4  # PCM's phases ("pcm" only)

    def __post_init__(self):
        if self.target_rule not in TARGET_RULES:
            raise ValueError(f"target_rule must be one of {TARGET_RULES}, got {self.target_rule!r}.")
        if self.solver not in SOLVERS:
            raise ValueError(f"solver must be one of {SOLVERS}, got {self.solver!r}.")
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {self.loss_type!r}.")
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(
                f"prediction_type of the teacher must be 'epsilon' or 'v_prediction', got {self.prediction_type!r} "
                f"(allowed in general: {PREDICTION_TYPES})."
            )
        if self.w_min > self.w_max:
            raise ValueError(f"w_min must be <= w_max, got w_min={self.w_min}, w_max={self.w_max}.")
        ddim_timestep_grid(self.num_train_timesteps, self.num_ddim_timesteps)  # validates the grid size
        if self.target_rule == "pcm":
            self.phase_edges  # validates num_phases against the grid

    @property
    def phase_edges(self) -> list[int]:
        """PCM's edges (:func:`lcm_kit.consistency.phase_edge_timesteps`); also the PCM sampler's timesteps."""
        return phase_edge_timesteps(self.num_phases, self.num_ddim_timesteps, self.num_train_timesteps)

    @property
    def skip(self) -> int:
        """k: how many training timesteps one teacher step spans."""
        return self.num_train_timesteps // self.num_ddim_timesteps


def sample_skip_timesteps(batch_size: int, config: LCMDistillationConfig, generator=None, device=None):
    """Start timesteps ``t_{n+k}`` drawn uniformly from the DDIM grid, and targets ``t_n = t_{n+k} - k`` (>= 0)."""
    index = torch.randint(0, config.num_ddim_timesteps, (batch_size,), generator=generator, device=device)
    # The grid point (i + 1) k - 1 of :func:`ddim_timestep_grid`, computed where the index is: copying the grid from
    # the host at every step would wait for the accelerator's queue.
    start = (index + 1) * config.skip - 1
    return start, (start - config.skip).clamp(min=0)


def guided_teacher_denoiser(teacher: Callable, w: torch.Tensor, alphas_cumprod, prediction_type: str) -> ModelFn:
    """``denoise(x, t) -> x0`` of the teacher under LCM's guidance ``x0 = c + w (c - u)``."""

    def denoise(x, t):
        cond_output, uncond_output = teacher(x, t)
        alpha_t = append_dims(alphas_cumprod[t], x.ndim)
        cond_x0 = predicted_original_sample(cond_output.float(), x, alpha_t, prediction_type)
        uncond_x0 = predicted_original_sample(uncond_output.float(), x, alpha_t, prediction_type)
        return lcm_cfg(cond_x0, uncond_x0, append_dims(w, x.ndim))

    return denoise


@dataclass
class LCMDistillationOutput:
    loss: torch.Tensor  # per sample, (B,)
    prediction: torch.Tensor  # f_theta(x_{t_{n+k}}, t_{n+k}) (with grad)
    target: torch.Tensor  # f_target(x_hat_{t_n}, t_n) (no grad)
    noisy_latents: torch.Tensor
    solver_latents: torch.Tensor  # x_hat_{t_n}: the teacher's ODE step
    w: torch.Tensor
    timesteps: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # (t_{n+k}, t_n, s) of each sample


class LCMDistillationLoss:
    """One LCD step: noise the latents to ``t_{n+k}``, take the guided teacher ODE step to ``t_n``, and compare the
    student's consistency function at ``t_{n+k}`` with the target network's at ``t_n`` (teacher and target under
    ``no_grad``), both mapped to the time ``s`` of ``config.target_rule``:

    * ``"lcm"``: ``s = 0`` through LCM's boundary scalings (:func:`~lcm_kit.consistency.lcm_consistency_function`);
    * ``"pcm"`` / ``"tcd"``: ``s`` = the phase's lower edge / a random earlier grid time, through the DDIM map
      :func:`~lcm_kit.consistency.trajectory_map`; where ``t_n = s`` the target is the teacher's ``x_hat_{t_n}``
      itself (the boundary condition ``f(x, s, s) = x``). PCM's teacher step stops at the edge.

    Draws, in this order and from ``generator``, the timesteps, the noise, the guidance weights
    ``w ~ U[w_min, w_max]`` and (TCD) ``s``; each can be passed instead (``timesteps=(start, prev)`` or
    ``(start, prev, s)``, ``noise``, ``w``).
    """

    def __init__(self, alphas_cumprod: torch.Tensor, config: LCMDistillationConfig):
        self.alphas_cumprod = alphas_cumprod
        self.config = config
        self.phase_edges = None
        if config.target_rule == "pcm":
            self.phase_edges = torch.tensor(config.phase_edges, dtype=torch.long, device=alphas_cumprod.device)

    def __call__(self, student: ModelFn, teacher: Callable, target: ModelFn, latents: torch.Tensor,
                 generator: torch.Generator | None = None, *, timesteps=None, noise=None, w=None
                 ) -> LCMDistillationOutput:
        config = self.config
        latents = latents.float()
        batch, device = latents.shape[0], latents.device
        if self.alphas_cumprod.device != device:  # once: indexing a host table with device timesteps is an error
            self.alphas_cumprod = self.alphas_cumprod.to(device)
        alphas = self.alphas_cumprod
        if timesteps is None:
            timesteps = sample_skip_timesteps(batch, config, generator, device)
        start, prev = timesteps[0], timesteps[1]
        if noise is None:
            noise = torch.randn(latents.shape, generator=generator, device=device)
        if w is None:
            w = sample_uniform(config.w_min, config.w_max, batch, generator=generator, device=device)
        if len(timesteps) == 3:
            s = timesteps[2]
        else:
            if self.phase_edges is not None and self.phase_edges.device != device:
                self.phase_edges = self.phase_edges.to(device)
            prev, s = target_timesteps(config.target_rule, start, prev, config.skip, self.phase_edges, generator)
        noisy = vp_noise(latents, noise.float(), append_dims(alphas[start], latents.ndim))
        student_output = student(noisy, start, w)
        if config.target_rule == "lcm":
            prediction = lcm_consistency_function(student_output, noisy, start, alphas, config.prediction_type,
                                                  config.timestep_scaling_factor)
        else:
            prediction = self._map(student_output, noisy, start, s)
        with torch.no_grad():
            denoise = guided_teacher_denoiser(teacher, w, alphas, config.prediction_type)
            x_prev = vp_solver_step(denoise, noisy, start, prev, alphas, config.solver).float()
            target_output = target(x_prev, prev, w)
            if config.target_rule == "lcm":
                target_value = lcm_consistency_function(target_output, x_prev, prev, alphas, config.prediction_type,
                                                        config.timestep_scaling_factor)
            else:
                at_s = append_dims(prev == s, x_prev.ndim)
                target_value = torch.where(at_s, x_prev, self._map(target_output, x_prev, prev, s))
        per_sample = consistency_distance(prediction, target_value, config.loss_type, config.huber_c, reduce=False)
        return LCMDistillationOutput(per_sample, prediction, target_value, noisy, x_prev, w, (start, prev, s))

    def _map(self, model_output, sample, timesteps, s):
        ndim = sample.ndim
        return trajectory_map(model_output.float(), sample, append_dims(self.alphas_cumprod[timesteps], ndim),
                              append_dims(self.alphas_cumprod[s], ndim), self.config.prediction_type)
