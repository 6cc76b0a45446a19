"""`TrajectoryConsistencyScheduler`: exactly diffusers' ``TCDScheduler(eta=gamma)`` (Trajectory Consistency
Distillation, Zheng et al. 2024, https://huggingface.co/papers/2402.19159): same timesteps, ``prev_sample`` and
``pred_noised_sample``, the same random draws, and ``TCDScheduler.step``'s signature (``eta``)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from diffusers.configuration_utils import register_to_config
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from ..consistency import trajectory_map, vp_noise
from .scheduler_args import check_gamma
from .scheduling_lcm import ConsistencyScheduler


@dataclass
class TrajectoryConsistencySchedulerOutput(BaseOutput):
    """
    Output class for [`TrajectoryConsistencyScheduler.step`] (the fields of diffusers' `TCDSchedulerOutput`).

    Args:
        prev_sample (`torch.Tensor` of shape `(batch_size, num_channels, height, width)` for images):
            Computed sample `(x_{t-1})` of the previous timestep, the next model input. On the last step of the
            schedule it equals `pred_noised_sample`, the sampler's result.
        pred_noised_sample (`torch.Tensor` of shape `(batch_size, num_channels, height, width)` for images):
            The trajectory consistency function's estimate `x_s` at `s = floor((1 - gamma) * t_prev)` (the DDIM
            move of the predicted clean sample to `s`). Also readable as `denoised`, the name
            [`ConsistencySchedulerOutput`] uses for the same place in the tuple.
    """

    prev_sample: torch.Tensor
    pred_noised_sample: torch.Tensor | None = None

    @property
    def denoised(self) -> torch.Tensor | None:
        return self.pred_noised_sample


class TrajectoryConsistencyScheduler(ConsistencyScheduler):
    """
    `TrajectoryConsistencyScheduler` is exactly diffusers' [`TCDScheduler`] for TCD models and TCD-LoRAs (Trajectory
    Consistency Distillation, https://huggingface.co/papers/2402.19159): for the same config, inputs and generator
    its timesteps, `prev_sample` and `pred_noised_sample` equal `TCDScheduler.step(..., eta=gamma)`'s, and it draws
    the same random numbers, so a pipeline keeps its images when one replaces the other
    (`TrajectoryConsistencyScheduler.from_config(pipe.scheduler.config)` and back with `TCDScheduler.from_config`).
    `step` has `TCDScheduler.step`'s signature: `step(model_output, timestep, sample, eta, generator, return_dict)`,
    so pipelines that pass `eta=` (Stable Diffusion / SDXL pipelines, default `eta=0.0`) set it the same way.

    A step from `t` to the next timestep `t_prev` (0 after the last):

    1. `x0` and `eps` from `model_output` per `prediction_type` (no boundary scalings: TCD has none);
    2. `pred_noised_sample = sqrt(a_s) x0 + sqrt(1 - a_s) eps`, the DDIM move to `s = floor((1 - gamma) t_prev)`
       with `a_s = alphas_cumprod[s]` (at `s = 0` too: the sampler ends at timestep 0, not at the clean `x0`);
    3. `gamma > 0` and not the last step: `prev_sample = sqrt(a_prev / a_s) x_s + sqrt(1 - a_prev / a_s) z` with
       fresh noise `z`; otherwise `prev_sample = pred_noised_sample`.

    `gamma=0` is deterministic DDIM along the predicted trajectory; `gamma=1` re-noises from `a_0` at every step.
    The schedule is [`ConsistencyScheduler.set_timesteps`]' (LCM's skipping-step grid); as in `TCDScheduler`, a
    `set_timesteps(..., original_inference_steps=N)` argument (not the config value) picks the timesteps from all
    of `0 .. num_train_timesteps - 1` instead, `N` only bounding `num_inference_steps`.

    Differences from `TCDScheduler`, on purpose: `clip_sample` and `thresholding` act on `x0` (`TCDScheduler`
    accepts and ignores them; the defaults are off, so configs that keep them off sample identically), and bad
    values (`eta` outside `[0, 1]` or NaN, timesteps outside the schedule, a beta schedule outside `[0, 1]`) raise
    a `ValueError` naming the argument instead of an `AssertionError` or an `IndexError` part-way.

    Args:
        gamma (`float`, defaults to `0.3`):
            TCD's stochasticity (`eta` of `TCDScheduler.step`, `gamma` in the paper) in `[0, 1]`, used when `step`
            gets no `eta`; `0.3` is `TCDScheduler.step`'s default. Every other argument is
            [`ConsistencyScheduler`]'s (the config keys are `TCDScheduler`'s plus `gamma`).
    """

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        beta_schedule: str = "scaled_linear",
        trained_betas: np.ndarray | list[float] | None = None,
        original_inference_steps: int = 50,
        clip_sample: bool = False,
        clip_sample_range: float = 1.0,
        set_alpha_to_one: bool = True,
        steps_offset: int = 0,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        sample_max_value: float = 1.0,
        timestep_spacing: str = "leading",
        timestep_scaling: float = 10.0,
        rescale_betas_zero_snr: bool = False,
        gamma: float = 0.3,
    ):
        # Every argument is passed on by name, so the parent's config registration records the same values.
        super().__init__(
            num_train_timesteps=num_train_timesteps, beta_start=beta_start, beta_end=beta_end,
            beta_schedule=beta_schedule, trained_betas=trained_betas, original_inference_steps=original_inference_steps,
            clip_sample=clip_sample, clip_sample_range=clip_sample_range, set_alpha_to_one=set_alpha_to_one,
            steps_offset=steps_offset, prediction_type=prediction_type, thresholding=thresholding,
            dynamic_thresholding_ratio=dynamic_thresholding_ratio, sample_max_value=sample_max_value,
            timestep_spacing=timestep_spacing, timestep_scaling=timestep_scaling,
            rescale_betas_zero_snr=rescale_betas_zero_snr, gamma=gamma,
        )

    def _timestep_grid(self, original_steps: int, strength: float, original_inference_steps_given: bool):
        if not original_inference_steps_given:
            return super()._timestep_grid(original_steps, strength, False)
        # TCDScheduler's rule for an explicit `original_inference_steps` argument: every training timestep.
        size = self.config.num_train_timesteps
        return np.arange(int(size * strength), dtype=np.int64), size, f"num_train_timesteps={size} grid"

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        eta: float | None = None,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
        gamma: float | None = None,
    ) -> TrajectoryConsistencySchedulerOutput | tuple:
        """
        One TCD step (see the class docstring): `TCDScheduler.step` with `eta`.

        Args:
            model_output (`torch.Tensor`):
                The direct output of the model (noise, sample or v per `prediction_type`).
            timestep (`int` or `torch.Tensor`):
                The current discrete timestep, one of `self.timesteps`.
            sample (`torch.Tensor`):
                The current noisy sample `x_t`.
            eta (`float`, *optional*):
                The stochasticity of this step in `[0, 1]` (`TCDScheduler.step`'s name); defaults to the config's
                `gamma`.
            generator (`torch.Generator`, *optional*):
                A random number generator for the fresh noise.
            return_dict (`bool`, defaults to `True`):
                Whether to return a [`TrajectoryConsistencySchedulerOutput`] or a tuple
                `(prev_sample, pred_noised_sample)`.
            gamma (`float`, *optional*):
                The same as `eta`, under lcm-kit's name (what [`LCMPipeline`] passes); give at most one of the two.

        Returns:
            [`TrajectoryConsistencySchedulerOutput`] or `tuple`: `prev_sample` and `pred_noised_sample`.

        Raises:
            `ValueError`: before `set_timesteps`, for a timestep not in the schedule, past the end of the schedule,
            or for `eta` / `gamma` outside `[0, 1]`.
        """
        if eta is not None and gamma is not None:
            raise ValueError(f"Pass `eta` or `gamma` (the same thing), not both; got eta={eta!r}, gamma={gamma!r}.")
        if eta is not None:
            eta = check_gamma(eta, "eta")
        elif gamma is not None:
            eta = check_gamma(gamma)
        else:
            eta = self.config.gamma
        self._start_step(model_output, timestep, sample, generator)

        # 1. Noise levels at t, t_prev (0 after the last step) and s, all host numbers. s is floored from the same
        # float32 product TCDScheduler computes (`(1 - eta) * prev_timestep` on a long tensor), so it is the same int.
        prev_step_index = self.step_index + 1
        prev_timestep = self._host_timesteps[prev_step_index] if prev_step_index < len(self._host_timesteps) else 0
        timestep_s = int(np.floor(np.float32(1.0 - eta) * np.float32(prev_timestep)))
        alpha_prod_t = self.alphas_cumprod[self._host_timesteps[self.step_index]]
        alpha_prod_t_prev = self.alphas_cumprod[prev_timestep]
        alpha_prod_s = self.alphas_cumprod[timestep_s]

        # 2. The trajectory consistency function's x_s: x0 (clipped / thresholded if configured) and eps moved to s.
        pred_noised_sample = trajectory_map(model_output, sample, alpha_prod_t, alpha_prod_s,
                                            self.config.prediction_type, x0_transform=self._clip_or_threshold)

        # 3. Strategic stochastic sampling: re-noise x_s to t_prev, drawing noise exactly when TCDScheduler does
        # (which is also on the last kept step of a custom schedule shortened by strength: a_prev / a_s = 1 there).
        if eta > 0 and self.step_index != self.num_inference_steps - 1:
            noise = randn_tensor(model_output.shape, generator=generator, device=model_output.device,
                                 dtype=pred_noised_sample.dtype)
            prev_sample = vp_noise(pred_noised_sample, noise, alpha_prod_t_prev / alpha_prod_s)
        else:
            prev_sample = pred_noised_sample

        self._step_index += 1
        if not return_dict:
            return (prev_sample, pred_noised_sample)
        return TrajectoryConsistencySchedulerOutput(prev_sample=prev_sample, pred_noised_sample=pred_noised_sample)
