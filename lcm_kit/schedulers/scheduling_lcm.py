"""`ConsistencyScheduler`: diffusers' LCM multistep sampling, exact.

With ``gamma=1`` (the default) every timestep, ``prev_sample`` and ``denoised`` equal diffusers' ``LCMScheduler`` for
the same config, inputs and generator. ``gamma < 1`` moves part (``gamma=0``: all) of each step deterministically
along the predicted DDIM trajectory instead of re-noising from scratch, with LCM's boundary conditions and the clean
sample as the trajectory's end. (diffusers' ``TCDScheduler``, exactly: :mod:`.scheduling_tcd`.)

It keeps the schedule on the host as well as on ``device``: a step reads only host numbers, so with every tensor on
an accelerator it never waits for the device. All math (boundary scalings, x0 / eps conversions, noising, the DDIM
move, thresholding) comes from :mod:`lcm_kit.consistency`.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_lcm import rescale_zero_terminal_snr
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerMixin
from diffusers.utils import BaseOutput, logging
from diffusers.utils.torch_utils import randn_tensor

from ..consistency import (
    ddim_step,
    ddim_timestep_grid,
    dynamic_threshold,
    lcm_boundary_scalings,
    predicted_epsilon,
    predicted_original_sample,
    vp_noise,
)
from ..utils import check_exactly_one
from .scheduler_args import (
    begin_step,
    check_custom_timesteps,
    check_device,
    check_gamma,
    check_int,
    check_lcm_config,
    vp_betas,
)
from .scheduler_mixins import StepIndexMixin, VPTrainingMixin

logger = logging.get_logger(__name__)  # pylint: disable=invalid-name


@dataclass
class ConsistencySchedulerOutput(BaseOutput):
    """
    Output class for the scheduler's `step` function (the same fields as diffusers' `LCMSchedulerOutput`).

    Args:
        prev_sample (`torch.Tensor` of shape `(batch_size, num_channels, height, width)` for images):
            Computed sample `(x_{t-1})` of the previous timestep. `prev_sample` should be used as the next model
            input in the denoising loop. On the last step of the schedule it equals `denoised`.
        denoised (`torch.Tensor` of shape `(batch_size, num_channels, height, width)` for images):
            The consistency model's clean-sample estimate `(x_0)` at the current timestep (boundary conditions
            applied). Pipelines decode the last step's `denoised`; earlier ones can preview progress.
    """

    prev_sample: torch.Tensor
    denoised: torch.Tensor | None = None


class ConsistencyScheduler(StepIndexMixin, VPTrainingMixin, SchedulerMixin, ConfigMixin):
    """
    `ConsistencyScheduler` samples latent consistency models (LCM, LCM-LoRA) in a few steps: at each timestep the
    model's output becomes a clean estimate `denoised` through LCM's boundary conditions, and the next input is that
    estimate carried to the next (smaller) timestep. With `gamma=1` the carry is LCM's fresh-noise multistep
    sampling and the scheduler reproduces diffusers' [`LCMScheduler`] exactly; with `gamma=0` it is a deterministic
    DDIM move along the predicted trajectory; values in between mix the two as in TCD.

    Two modes, two classes (like diffusers' `LCMScheduler` and `TCDScheduler`):

    * **LCM** (this class, `gamma=1`, the default): exactly `LCMScheduler`, for LCM and LCM-LoRA models. With
      `gamma < 1` it mixes in the deterministic trajectory with LCM's boundary conditions and ends at the clean
      estimate (`s = 0` counts as `alphas_cumprod = 1`); that is not `TCDScheduler`.
    * **TCD** ([`TrajectoryConsistencyScheduler`], a subclass): exactly `TCDScheduler(eta=gamma)` for TCD models and
      TCD-LoRAs (no boundary conditions, the trajectory ends at timestep 0 with `alphas_cumprod[0]`), with
      `TCDScheduler.step`'s signature.

    Both read the schedule from a host copy made by `set_timesteps`, so a step with every tensor on an accelerator
    never waits for it (elements of `scheduler.timesteps` are located from their view offset, not their value).

    This model inherits from [`SchedulerMixin`] and [`ConfigMixin`]. [`~ConfigMixin`] takes care of storing all
    config attributes that are passed in the scheduler's `__init__` function, such as `num_train_timesteps`. They
    can be accessed via `scheduler.config.num_train_timesteps`. [`SchedulerMixin`] provides general loading and
    saving functionality via the [`SchedulerMixin.save_pretrained`] and [`~SchedulerMixin.from_pretrained`]
    functions. The config keys are a superset of `LCMScheduler`'s, so `ConsistencyScheduler.from_config(
    pipe.scheduler.config)` works for any Stable Diffusion scheduler config and `LCMScheduler.from_config(
    consistency_scheduler.config)` works back (it ignores `gamma`).

    Args:
        num_train_timesteps (`int`, defaults to `1000`):
            The number of diffusion steps used to train the model.
        beta_start (`float`, defaults to `0.00085`):
            The starting `beta` value of inference.
        beta_end (`float`, defaults to `0.012`):
            The final `beta` value.
        beta_schedule (`str`, defaults to `"scaled_linear"`):
            The beta schedule, a mapping from a beta range to a sequence of betas for stepping the model. Choose
            from `linear`, `scaled_linear`, or `squaredcos_cap_v2`.
        trained_betas (`np.ndarray` or `list[float]`, *optional*):
            Pass an array of betas directly to the constructor to bypass `beta_start`, `beta_end` and
            `beta_schedule`. Each in `[0, 1]`; any length, as in `LCMScheduler` (`set_timesteps` then requires every
            timestep of the schedule to be below the number of betas).
        original_inference_steps (`int`, defaults to `50`):
            The size N of the skipping-step grid `[k - 1, 2k - 1, ..., N k - 1]` (k = `num_train_timesteps // N`)
            the model was distilled on; inference timesteps are `num_inference_steps` evenly spaced entries of it.
        clip_sample (`bool`, defaults to `False`):
            Clip the predicted sample for numerical stability.
        clip_sample_range (`float`, defaults to `1.0`):
            The maximum magnitude for sample clipping. Valid only when `clip_sample=True`.
        set_alpha_to_one (`bool`, defaults to `True`):
            Kept for config compatibility with `LCMScheduler`/`DDIMScheduler`. The previous-alpha of the last step
            is never used here (like in `LCMScheduler`): the last step returns `denoised` itself.
        steps_offset (`int`, defaults to `0`):
            Kept for config compatibility. As in `LCMScheduler`, the consistency schedule always lies on the
            skipping-step grid, so the offset does not move the timesteps.
        prediction_type (`str`, defaults to `"epsilon"`):
            Prediction type of the model; can be `epsilon` (predicts the noise of the diffusion process), `sample`
            (directly predicts the clean sample) or `v_prediction` (see section 2.4 of [Imagen
            Video](https://huggingface.co/papers/2210.02303) paper).
        thresholding (`bool`, defaults to `False`):
            Whether to use the "dynamic thresholding" method. This is unsuitable for latent-space diffusion models
            such as Stable Diffusion.
        dynamic_thresholding_ratio (`float`, defaults to `0.995`):
            The ratio for the dynamic thresholding method. Valid only when `thresholding=True`.
        sample_max_value (`float`, defaults to `1.0`):
            The threshold value for dynamic thresholding. Valid only when `thresholding=True`.
        timestep_spacing (`str`, defaults to `"leading"`):
            One of `leading`, `trailing` or `linspace`; kept (and validated) for config compatibility with the
            Stable Diffusion schedulers. As in `LCMScheduler`, the consistency schedule is always evenly spaced
            on the skipping-step grid and does not depend on it.
        timestep_scaling (`float`, defaults to `10.0`):
            The factor the timesteps are multiplied by when computing the boundary-condition scalings `c_skip` and
            `c_out` (see [`~lcm_kit.consistency.lcm_boundary_scalings`]).
        rescale_betas_zero_snr (`bool`, defaults to `False`):
            Whether to rescale the betas to have zero terminal SNR (https://huggingface.co/papers/2305.08891). Pair
            it with `prediction_type="v_prediction"`: an epsilon model cannot predict x0 at zero SNR.
        gamma (`float`, defaults to `1.0`):
            Trajectory stochasticity in `[0, 1]`. `1` re-noises each clean estimate with fresh noise (LCM);
            `0` moves deterministically along the predicted trajectory (DDIM, no randomness after the initial
            latents); in between, a step first moves deterministically to `s = floor((1 - gamma) * t_prev)` and
            then adds fresh noise from `s` to `t_prev` (TCD's gamma). Can be overridden per call in
            [`~ConsistencyScheduler.step`].
    """

    _compatibles = [e.name for e in KarrasDiffusionSchedulers] + ["LCMScheduler", "TCDScheduler"]
    order = 1

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
        gamma: float = 1.0,
    ):
        check_lcm_config(
            num_train_timesteps, beta_start, beta_end, beta_schedule, original_inference_steps, clip_sample,
            clip_sample_range, set_alpha_to_one, steps_offset, prediction_type, thresholding,
            dynamic_thresholding_ratio, sample_max_value, timestep_spacing, timestep_scaling, rescale_betas_zero_snr,
            gamma,
        )
        self.betas = vp_betas(trained_betas, beta_schedule, beta_start, beta_end, num_train_timesteps)

        if rescale_betas_zero_snr:
            self.betas = rescale_zero_terminal_snr(self.betas)

        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        # Kept for DDIM/LCM attribute compatibility; see `set_alpha_to_one` in the class docstring.
        self.final_alpha_cumprod = torch.tensor(1.0) if set_alpha_to_one else self.alphas_cumprod[0]
        self.sigma_data = 0.5  # LCM's boundary-condition sigma_data

        # Standard deviation of the initial noise distribution.
        self.init_noise_sigma = 1.0

        # Settable values.
        self.num_inference_steps = None
        self.timesteps = torch.from_numpy(np.arange(0, num_train_timesteps)[::-1].copy().astype(np.int64))
        # The schedule as Python ints: a step indexes `alphas_cumprod` with these, never with a device tensor.
        self._host_timesteps = self.timesteps.tolist()
        self.custom_timesteps = False
        self._step_index = None
        self._begin_index = None

    # ----------------------------------------------------------------------------------------------------------
    # Schedule
    # ----------------------------------------------------------------------------------------------------------

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        original_inference_steps: int | None = None,
        timesteps: Sequence[int] | np.ndarray | torch.Tensor | None = None,
        strength: float = 1.0,
    ) -> None:
        """
        Sets the discrete timesteps used for the diffusion chain (to be run before inference).

        The schedule takes `num_inference_steps` evenly spaced (by index) timesteps, largest first, from the
        skipping-step grid `[k - 1, 2k - 1, ..., N k - 1]` with `N = original_inference_steps` and
        `k = num_train_timesteps // N` (the grid LCM distillation trains on). With `strength < 1` only the first
        `int(N * strength)` grid points are used (image-to-image). The result equals `LCMScheduler.set_timesteps`.

        Args:
            num_inference_steps (`int`, *optional*):
                The number of sampling steps, in `[1, original_inference_steps]`. Exactly one of
                `num_inference_steps` and `timesteps` must be given.
            device (`str` or `torch.device`, *optional*):
                The device to which the timesteps should be moved. If `None`, the timesteps are not moved.
            original_inference_steps (`int`, *optional*):
                Overrides the config's `original_inference_steps` (the grid size N) for this schedule; in
                `[1, num_train_timesteps]`.
            timesteps (`list[int]`, *optional*):
                A custom schedule: strictly descending integers in `[0, num_train_timesteps)`. Timesteps off the
                skipping-step grid, a first timestep other than `num_train_timesteps - 1` (at `strength=1`) or more
                than N timesteps are allowed but logged as warnings, like `LCMScheduler` does.
            strength (`float`, defaults to `1.0`):
                In `(0, 1]`: the fraction of the schedule to run, as used by image-to-image pipelines. With
                `num_inference_steps` it shortens the grid to `int(N * strength)` points (which must be at least
                `num_inference_steps`); with `timesteps` it keeps the last `int(len(timesteps) * strength)` of them
                (at least one).

        Raises:
            `ValueError`: for a missing or doubled schedule argument, or any value outside the ranges above.
        """
        # 0. Check inputs.
        check_exactly_one(num_inference_steps=num_inference_steps, timesteps=timesteps)
        check_device(device)
        if isinstance(strength, bool) or not isinstance(strength, numbers.Real) or not 0.0 < strength <= 1.0:
            raise ValueError(f"`strength` must be in (0, 1], got {strength!r}.")
        num_train_timesteps = self.config.num_train_timesteps
        original_steps = (
            original_inference_steps if original_inference_steps is not None else self.config.original_inference_steps
        )
        original_steps = check_int("original_inference_steps", original_steps, 1, num_train_timesteps)

        # 1. The grid the timesteps are picked from (ascending), shortened by strength.
        grid, grid_size, grid_text = self._timestep_grid(original_steps, strength, original_inference_steps is not None)

        if timesteps is not None:
            # 2.1 A custom schedule.
            timesteps = check_custom_timesteps(timesteps, self.config.num_train_timesteps)
            self._warn_unusual_custom_timesteps(timesteps, grid, original_steps, strength)
            self.num_inference_steps = len(timesteps)
            self.custom_timesteps = True
            # Strength keeps the tail of the schedule (StableDiffusionImg2ImgPipeline.get_timesteps' rule).
            kept = min(int(self.num_inference_steps * strength), self.num_inference_steps)
            if kept == 0:
                raise ValueError(
                    f"`strength`={strength} keeps int({len(timesteps)} * {strength}) = 0 of the {len(timesteps)} "
                    f"custom timesteps; use strength >= {1 / len(timesteps):.4g} (allowed range (0, 1])."
                )
            timesteps = timesteps[self.num_inference_steps - kept :]
        else:
            # 2.2 Evenly spaced (by index) points of the grid, largest timestep first.
            num_inference_steps = check_int("num_inference_steps", num_inference_steps, 1, original_steps)
            if len(grid) < num_inference_steps:
                raise ValueError(
                    f"`strength`={strength} leaves int({grid_size} * {strength}) = {len(grid)} timesteps of the "
                    f"{grid_text}, fewer than num_inference_steps={num_inference_steps}; use strength >= "
                    f"{num_inference_steps / grid_size:.4g} or at most {len(grid)} steps."
                )
            self.num_inference_steps = num_inference_steps
            self.custom_timesteps = False
            descending = grid[::-1].copy()
            indices = np.floor(np.linspace(0, len(descending), num=num_inference_steps, endpoint=False))
            timesteps = descending[indices.astype(np.int64)]

        if timesteps.max() >= len(self.alphas_cumprod):
            raise ValueError(
                f"`trained_betas` holds {len(self.alphas_cumprod)} betas, but the schedule {timesteps.tolist()} needs "
                f"timesteps up to {timesteps.max()}; pass at least {timesteps.max() + 1} betas or a smaller "
                "num_train_timesteps."
            )
        self.timesteps = torch.from_numpy(timesteps).to(device=device, dtype=torch.long)
        # The same schedule as Python ints, made here so that `step` never reads a device tensor.
        self._host_timesteps = timesteps.tolist()
        self._step_index = None
        self._begin_index = None

    def _timestep_grid(self, original_steps: int, strength: float, original_inference_steps_given: bool):
        """`(grid, size, description)`: the ascending timesteps a schedule is picked from, kept by strength (the
        first `int(size * strength)` of the full grid of `size`): LCM's skipping-step grid `[k-1, 2k-1, ...]`."""
        grid = ddim_timestep_grid(self.config.num_train_timesteps, original_steps)
        return grid[: int(original_steps * strength)], original_steps, f"original_inference_steps={original_steps} grid"

    def _warn_unusual_custom_timesteps(self, timesteps, grid, original_steps, strength) -> None:
        """The warnings `LCMScheduler` gives for legal but unusual custom schedules."""
        last = self.config.num_train_timesteps - 1
        if strength == 1.0 and timesteps[0] != last:
            logger.warning(
                f"The custom schedule starts at timestep {timesteps[0]}, not num_train_timesteps - 1 = {last}; "
                "a consistency model starts from pure noise there, so results may be unexpected."
            )
        off_grid = sorted(set(timesteps[1:].tolist()) - set(grid.tolist()), reverse=True)
        if off_grid:
            logger.warning(
                f"The custom schedule contains timesteps {off_grid} that are not on the original_inference_steps="
                f"{original_steps} distillation grid; results may be unexpected."
            )
        if len(timesteps) > original_steps:
            logger.warning(
                f"The custom schedule has {len(timesteps)} timesteps, more than original_inference_steps="
                f"{original_steps}; results may be unexpected."
            )

    def previous_timestep(self, timestep: int | torch.Tensor) -> int | torch.Tensor:
        """
        The timestep after `timestep` in the schedule (`-1` after the last one).

        Args:
            timestep (`int` or `torch.Tensor`):
                The current timestep.

        Returns:
            `int` or `torch.Tensor`: The next, smaller timestep; `timestep - 1` before `set_timesteps`.
        """
        if self.custom_timesteps or self.num_inference_steps:
            index = self.index_for_timestep(timestep)
            if index == self.timesteps.shape[0] - 1:
                return torch.tensor(-1)
            return self.timesteps[index + 1]
        return timestep - 1

    def __len__(self) -> int:
        """
        Returns:
            `int`: The number of diffusion steps used to train the model (`num_train_timesteps`).
        """
        return self.config.num_train_timesteps

    # ----------------------------------------------------------------------------------------------------------
    # Model input / output
    # ----------------------------------------------------------------------------------------------------------

    def scale_model_input(self, sample: torch.Tensor, timestep: int | torch.Tensor | None = None) -> torch.Tensor:
        """
        Ensures interchangeability with schedulers that scale the denoising model input: this one does not.

        Args:
            sample (`torch.Tensor`):
                The input sample.
            timestep (`int` or `torch.Tensor`, *optional*):
                The current timestep in the diffusion chain (unused).

        Returns:
            `torch.Tensor`: `sample`, unchanged.
        """
        return sample

    def get_scalings_for_boundary_condition_discrete(self, timestep: int | torch.Tensor):
        """
        The boundary-condition scalings `(c_skip, c_out)` of LCM at a discrete timestep, so that
        `denoised = c_skip * sample + c_out * x0_pred` and `denoised = sample` at timestep 0.

        Args:
            timestep (`int` or `torch.Tensor`):
                The discrete timestep (any shape for tensors).

        Returns:
            `tuple`: `(c_skip, c_out)`, numbers or tensors like `timestep`. Computed by
            [`~lcm_kit.consistency.lcm_boundary_scalings`] with the config's `timestep_scaling`.
        """
        return lcm_boundary_scalings(timestep, self.config.timestep_scaling, self.sigma_data)

    def _clip_or_threshold(self, pred_x0: torch.Tensor) -> torch.Tensor:
        if self.config.thresholding:
            return dynamic_threshold(pred_x0, self.config.dynamic_thresholding_ratio, self.config.sample_max_value)
        if self.config.clip_sample:
            return pred_x0.clamp(-self.config.clip_sample_range, self.config.clip_sample_range)
        return pred_x0

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
        gamma: float | None = None,
    ) -> ConsistencySchedulerOutput | tuple:
        """
        One consistency sampling step: the clean estimate at `timestep`, carried to the next timestep.

        1. `x0_pred` from `model_output` per `prediction_type`, then clipped / thresholded if configured;
        2. `denoised = c_skip * sample + c_out * x0_pred` (LCM's boundary conditions);
        3. on the last timestep `prev_sample = denoised`; otherwise, with `t_prev` the next timestep:
           * `gamma = 1`: `prev_sample = sqrt(a_prev) denoised + sqrt(1 - a_prev) z` with fresh noise z (LCM);
           * `gamma < 1`: with `eps = (sample - sqrt(a_t) denoised) / sqrt(1 - a_t)` (the noise that puts
             `denoised` on the DDIM trajectory through `sample`), move deterministically to
             `s = floor((1 - gamma) t_prev)`: `x_s = sqrt(a_s) denoised + sqrt(1 - a_s) eps`, then re-noise from
             `s` to `t_prev`: `prev_sample = sqrt(a_prev / a_s) x_s + sqrt(1 - a_prev / a_s) z`. `gamma = 0` gives
             `s = t_prev`: a pure DDIM move that draws no noise. `s = 0` counts as the clean sample (`a_s = 1`),
             where LCM's boundary condition puts it, so the mix is continuous up to `gamma = 1`.

        Args:
            model_output (`torch.Tensor`):
                The direct output of the consistency model (noise, sample or v per `prediction_type`).
            timestep (`int` or `torch.Tensor`):
                The current discrete timestep, one of `self.timesteps`.
            sample (`torch.Tensor`):
                The current noisy sample `x_t`.
            generator (`torch.Generator`, *optional*):
                A random number generator for the fresh noise (unused when `gamma = 0`).
            return_dict (`bool`, defaults to `True`):
                Whether to return a [`ConsistencySchedulerOutput`] or a tuple `(prev_sample, denoised)`.
            gamma (`float`, *optional*):
                Overrides the config's `gamma` for this step; in `[0, 1]`.

        Returns:
            [`ConsistencySchedulerOutput`] or `tuple`: `prev_sample` and `denoised`.

        Raises:
            `ValueError`: before `set_timesteps`, for a timestep not in the schedule, past the end of the schedule,
            for `gamma` outside `[0, 1]`, or for `model_output` and `sample` of different shapes.
            `TypeError`: for a `gamma`, `timestep`, tensor or `generator` of the wrong type.
        """
        gamma = self.config.gamma if gamma is None else check_gamma(gamma)
        self._start_step(model_output, timestep, sample, generator)

        # 1. Noise levels, from the host copy of the schedule (see `set_timesteps`).
        alpha_prod_t = self.alphas_cumprod[self._host_timesteps[self.step_index]]
        prev_step_index = self.step_index + 1
        is_last_step = prev_step_index >= len(self._host_timesteps)

        # 2. The consistency model's clean estimate with LCM's boundary conditions (at the timestep passed, as
        # LCMScheduler computes them: on its device and in its precision).
        c_skip, c_out = self.get_scalings_for_boundary_condition_discrete(timestep)
        pred_x0 = predicted_original_sample(model_output, sample, alpha_prod_t, self.config.prediction_type)
        pred_x0 = self._clip_or_threshold(pred_x0)
        denoised = c_out * pred_x0 + c_skip * sample

        # 3. Carry the estimate to the next timestep. No noise on the last step (nor for one-step sampling).
        if is_last_step:
            prev_sample = denoised
        else:
            prev_timestep = self._host_timesteps[prev_step_index]
            alpha_prod_t_prev = self.alphas_cumprod[prev_timestep]
            prev_sample = self._carry(denoised, sample, alpha_prod_t, alpha_prod_t_prev, prev_timestep, gamma, generator)

        self._step_index += 1
        if not return_dict:
            return (prev_sample, denoised)
        return ConsistencySchedulerOutput(prev_sample=prev_sample, denoised=denoised)

    def _start_step(self, model_output, timestep, sample, generator) -> None:
        """The checks every step starts with, then the step index (found on the host, see `schedule_index`)."""
        if self.num_inference_steps is None:
            raise ValueError("`step()` was called before `set_timesteps()`; call `set_timesteps(...)` first.")
        begin_step(self, model_output, sample, timestep, generator)

    def _carry(self, denoised, sample, alpha_prod_t, alpha_prod_t_prev, prev_timestep, gamma, generator):
        """Moves `denoised` to the noise level of `prev_timestep` (see `step`)."""
        if gamma == 1.0:
            noisy_from, alpha_prod_s = denoised, None  # LCM: re-noise the clean estimate from scratch
        else:
            pred_eps = predicted_epsilon(denoised, sample, alpha_prod_t, "sample")
            timestep_s = math.floor((1.0 - gamma) * prev_timestep)
            if timestep_s >= prev_timestep:  # gamma = 0 (or s rounds up to t_prev): all deterministic
                return ddim_step(denoised, pred_eps, alpha_prod_t_prev)
            if timestep_s == 0:
                noisy_from, alpha_prod_s = denoised, None
            else:
                alpha_prod_s = self.alphas_cumprod[timestep_s]
                noisy_from = ddim_step(denoised, pred_eps, alpha_prod_s)
        noise = randn_tensor(denoised.shape, generator=generator, device=denoised.device, dtype=denoised.dtype)
        # Re-noise x_s from level s to t_prev: the forward process has alpha(t_prev | s) = a_prev / a_s.
        alpha_ratio = alpha_prod_t_prev if alpha_prod_s is None else alpha_prod_t_prev / alpha_prod_s
        return vp_noise(noisy_from, noise, alpha_ratio)
