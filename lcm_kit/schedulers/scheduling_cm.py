"""`CMMultistepScheduler`: multistep consistency sampling in EDM sigma space over any sigma or timestep list.

A drop-in sibling of diffusers' ``CMStochasticIterativeScheduler`` (same config, same ``timesteps`` convention, same
model input ``250 log sigma``): for the same sigmas, inputs and generator its samples equal the stock scheduler's,
so the stock ``ConsistencyModelPipeline`` runs with either. What it adds:

* ``set_timesteps(sigmas=[...])``: any descending sigma list (e.g. iCT's two-step ``[80, 0.821]``), any length;
* every step re-noises with ``x = x0 + sqrt(sigma_next^2 - sigma_min^2) z`` and the last step returns ``x0`` itself;
  the random draws are the stock scheduler's (a draw on every step, the last included, unless the schedule has one
  step), so a generator reused for several sampling loops gives the stock scheduler's images;
* bad configs and arguments raise a ``ValueError`` / ``TypeError`` naming them, and the schedule is kept on the host
  too, so ``step`` never reads a device tensor (it also runs with every tensor on ``meta``);
* ``step`` also returns ``denoised`` (the x0 estimate);
* ``parameterization="trigflow"`` samples a TrigFlow consistency model (sCT / sCD): the backbone's time input is
  ``t = arctan(sigma / sigma_data)`` and the boundary scalings have no offset (``f(x, 0) = x``); the default
  ``"edm"`` is the stock scheduler's;
* all math (boundary scalings with the sigma_min offset, c_in, 250 log sigma) comes from :mod:`lcm_kit.consistency`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from diffusers.configuration_utils import register_to_config
from diffusers.schedulers.scheduling_consistency_models import CMStochasticIterativeScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin  # noqa: F401 (see below)
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from ..consistency import consistency_scalings, sigma_to_timestep, trigflow_time_from_sigma
from ..utils import check_exactly_one
from .scheduler_args import begin_step, check_bool, check_device, check_int, check_real, schedule_index


@dataclass
class CMMultistepSchedulerOutput(BaseOutput):
    """
    Output of `CMMultistepScheduler.step`.

    Args:
        prev_sample (`torch.Tensor`):
            The sample at the next noise level, `x0 + sqrt(sigma_next**2 - sigma_min**2) * z` (on the last step: `x0`).
        denoised (`torch.Tensor`):
            The consistency function's output `x0 = f(x, sigma)` (clipped to [-1, 1] when `clip_denoised`).
    """

    prev_sample: torch.Tensor
    denoised: torch.Tensor | None = None


class CMMultistepScheduler(CMStochasticIterativeScheduler):
    """
    Multistep consistency-model sampling (Song et al. 2023, Algorithm 1) over user sigma or timestep lists.

    Takes the configuration of diffusers' [`CMStochasticIterativeScheduler`] (`num_train_timesteps`, `sigma_min`,
    `sigma_max`, `sigma_data`, `s_noise`, `rho`, `clip_denoised`) and loads from its saved configs.
    `set_timesteps(num_inference_steps)` and `set_timesteps(timesteps=...)` give the stock scheduler's sigmas;
    `set_timesteps(sigmas=...)` takes any descending list in `[sigma_min, sigma_max]`. The chain starts at
    `scheduler.sigmas[0] * z` (`init_noise_sigma` stays `sigma_max`, as the stock pipeline expects).
    """

    # A saved folder names this module as the scheduler's library; diffusers' loader then looks the loadable base
    # class (SchedulerMixin) up in this module, which is why it is imported here.
    _compatibles = [CMStochasticIterativeScheduler.__name__]
    PARAMETERIZATIONS = ("edm", "trigflow")

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 40,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        sigma_data: float = 0.5,
        s_noise: float = 1.0,
        rho: float = 7.0,
        clip_denoised: bool = True,
        parameterization: str = "edm",
    ):
        if parameterization not in self.PARAMETERIZATIONS:
            raise ValueError(f"parameterization must be one of {self.PARAMETERIZATIONS}, got {parameterization!r}.")
        # The stock scheduler divides by num_train_timesteps - 1 and takes roots of sigma: check before it does.
        check_int("num_train_timesteps", num_train_timesteps, 2, 10**9)
        sigma_min = check_real("sigma_min", sigma_min, "> 0", lambda v: v > 0)
        check_real("sigma_max", sigma_max, f"> sigma_min={sigma_min}", lambda v: v > sigma_min)
        check_real("sigma_data", sigma_data, "> 0", lambda v: v > 0)
        check_real("s_noise", s_noise, ">= 0", lambda v: v >= 0)
        check_real("rho", rho, "> 0", lambda v: v > 0)
        check_bool("clip_denoised", clip_denoised)
        # Every argument is passed on by name, so the stock config registration records the same values.
        super().__init__(num_train_timesteps=num_train_timesteps, sigma_min=sigma_min, sigma_max=sigma_max,
                         sigma_data=sigma_data, s_noise=s_noise, rho=rho, clip_denoised=clip_denoised)
        self._host_timesteps = self.timesteps.tolist()

    @property
    def _boundary_offset(self) -> float:
        return self.config.sigma_min if self.config.get("parameterization", "edm") == "edm" else 0.0

    def sigma_to_t(self, sigmas):
        """The model's time input for sigmas: `250 log(sigma)` (:func:`lcm_kit.consistency.sigma_to_timestep`), or
        the TrigFlow time `arctan(sigma / sigma_data)` with `parameterization="trigflow"`."""
        sigmas = sigmas if torch.is_tensor(sigmas) else np.asarray(sigmas, dtype=np.float64)
        if self.config.get("parameterization", "edm") == "trigflow":
            if torch.is_tensor(sigmas):
                return trigflow_time_from_sigma(sigmas, self.config.sigma_data)
            return np.arctan(sigmas / self.config.sigma_data)
        return sigma_to_timestep(sigmas)

    def get_scalings_for_boundary_condition(self, sigma):
        """`(c_skip, c_out)` with the sigma_min offset, so `f(x, sigma_min) = x` exactly (no offset for
        `parameterization="trigflow"`: `f(x, 0) = x`)."""
        c_skip, c_out, _ = consistency_scalings(sigma, self.config.sigma_data, self._boundary_offset)
        return c_skip, c_out

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        timesteps: Sequence[int] | None = None,
        sigmas: Sequence[float] | np.ndarray | torch.Tensor | None = None,
    ):
        """
        Set the sampling noise levels: exactly one of `num_inference_steps` (in `[1, num_train_timesteps]`),
        `timesteps` (strictly descending ints in `[0, num_train_timesteps)`, indices into the Karras grid, as in
        diffusers) or `sigmas` (strictly descending finite noise levels in `[sigma_min, sigma_max]`). The sigmas stay
        on the host and `timesteps` go to `device`, as in the stock scheduler.
        """
        check_exactly_one(num_inference_steps=num_inference_steps, timesteps=timesteps, sigmas=sigmas)
        check_device(device)
        num_train_timesteps = self.config.num_train_timesteps
        if sigmas is not None:
            sigmas = self._check_sigmas(sigmas)
            self.custom_timesteps = True
        else:
            # The stock scheduler's schedule (its code moves the sigmas to `device` and back, which `meta` cannot do).
            if timesteps is not None:
                indices = self._check_timestep_indices(timesteps)
                self.custom_timesteps = True
            else:
                num_inference_steps = check_int("num_inference_steps", num_inference_steps, 1, num_train_timesteps)
                step_ratio = num_train_timesteps // num_inference_steps
                indices = (np.arange(0, num_inference_steps) * step_ratio).round()[::-1].copy().astype(np.int64)
                self.custom_timesteps = False
            sigmas = self._convert_to_karras(indices[::-1].copy() / (num_train_timesteps - 1))
        self.num_inference_steps = len(sigmas)
        timesteps = self.sigma_to_t(sigmas)
        self.sigmas = torch.from_numpy(np.concatenate([sigmas, [self.config.sigma_min]]).astype(np.float32))
        if str(device).startswith("mps"):
            self.timesteps = torch.from_numpy(timesteps).to(device, dtype=torch.float32)
        else:
            self.timesteps = torch.from_numpy(timesteps).to(device=device)
        # Host copy of the schedule (float64, like the stock timesteps): `step` finds its place without the device.
        self._host_timesteps = (timesteps.astype(np.float32) if str(device).startswith("mps") else timesteps).tolist()
        self._step_index = None
        self._begin_index = None

    def _check_timestep_indices(self, timesteps) -> np.ndarray:
        values = np.asarray(timesteps.detach().cpu() if torch.is_tensor(timesteps) else timesteps)
        if values.dtype.kind not in "iuf":
            raise TypeError(f"`timesteps` must be a list of ints, got {timesteps!r} (dtype {values.dtype}).")
        if values.ndim != 1 or values.size == 0:
            raise ValueError(f"`timesteps` must be a non-empty 1-D list of ints, got {timesteps!r}.")
        if not np.all(np.isfinite(values)) or np.any(np.mod(values, 1) != 0):
            raise ValueError(f"`timesteps` must be integers, got {values.tolist()}.")
        values = values.astype(np.int64)
        if np.any(np.diff(values) >= 0):
            raise ValueError(f"`timesteps` must be in strictly descending order, got {values.tolist()}.")
        high = self.config.num_train_timesteps
        if values[0] >= high or values[-1] < 0:
            raise ValueError(f"`timesteps` must lie in [0, num_train_timesteps={high}), got {values.tolist()}.")
        return values

    def _check_sigmas(self, sigmas) -> np.ndarray:
        if torch.is_tensor(sigmas):
            sigmas = sigmas.detach().cpu().double().numpy()
        values = np.asarray(sigmas)
        if values.dtype.kind not in "iuf":
            raise TypeError(f"`sigmas` must be a list of numbers, got {sigmas!r} (dtype {values.dtype}).")
        values = values.astype(np.float64).reshape(-1)
        if values.size == 0 or not np.all(np.isfinite(values)) or np.any(np.diff(values) >= 0):
            raise ValueError(f"`sigmas` must be a non-empty, strictly descending list of finite numbers, got "
                             f"{values.tolist()}.")
        lo, hi = self.config.sigma_min, self.config.sigma_max
        if values[-1] < lo or values[0] > hi * (1 + 1e-6):
            raise ValueError(f"`sigmas` must lie in [sigma_min={lo}, sigma_max={hi}], got {values.tolist()}.")
        return values

    def index_for_timestep(self, timestep, schedule_timesteps: torch.Tensor | None = None) -> int:
        """The index of `timestep` in the schedule, found on the host (see
        :func:`~lcm_kit.schedulers.scheduling_lcm.schedule_index`); with `schedule_timesteps`, the stock search."""
        if schedule_timesteps is not None:
            return super().index_for_timestep(timestep, schedule_timesteps)
        return schedule_index(timestep, self.timesteps, self._host_timesteps)

    def _init_step_index(self, timestep) -> None:
        self._step_index = self.index_for_timestep(timestep) if self.begin_index is None else self._begin_index

    def scale_model_input(self, sample: torch.Tensor, timestep: float | torch.Tensor) -> torch.Tensor:
        """The model input `c_in(sigma) * sample`, `c_in = 1 / sqrt(sigma^2 + sigma_data^2)` (a host scalar)."""
        if self.step_index is None:
            self._init_step_index(timestep)
        _, _, c_in = consistency_scalings(self.sigmas[self.step_index], self.config.sigma_data, self.config.sigma_min)
        self.is_scale_input_called = True
        return sample * c_in.to(sample.dtype)

    def step(
        self,
        model_output: torch.Tensor,
        timestep: float | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
    ) -> CMMultistepSchedulerOutput | tuple:
        """
        One consistency step: `x0 = c_skip * sample + c_out * model_output`, then re-noise to the next sigma.

        Args:
            model_output (`torch.Tensor`): the backbone's raw output at `scale_model_input(sample, timestep)`.
            timestep (`float` or `torch.Tensor`): one of `scheduler.timesteps`.
            sample (`torch.Tensor`): the current noisy sample.
            generator (`torch.Generator`, *optional*): for the re-noising draw.
            return_dict (`bool`): return a [`CMMultistepSchedulerOutput`] (default) or a tuple
                `(prev_sample, denoised)`.
        """
        if isinstance(timestep, (int, np.integer, torch.IntTensor, torch.LongTensor)) or (
            torch.is_tensor(timestep) and not timestep.is_floating_point()
        ):
            raise ValueError(
                f"`timestep` must be one of scheduler.timesteps (a float 250*log(sigma)), got the integer {timestep!r}."
            )
        begin_step(self, model_output, sample, timestep, generator)
        # Host scalars from the host sigmas (the stock scheduler keeps them on the CPU for the same reason).
        sigma = self.sigmas[self.step_index]
        sigma_next = self.sigmas[min(self.step_index + 1, len(self.sigmas) - 1)]
        c_skip, c_out = self.get_scalings_for_boundary_condition(sigma)
        denoised = c_out * model_output + c_skip * sample
        if self.config.clip_denoised:
            denoised = denoised.clamp(-1, 1)

        # The stock scheduler draws noise on every step of a multistep schedule, the last one included (where it
        # adds z * sqrt(sigma_min^2 - sigma_min^2), zero up to float32 rounding): draw it too, so the generator
        # leaves every loop in the stock state, and return x0 itself.
        noise = None
        if len(self._host_timesteps) > 1:
            noise = randn_tensor(model_output.shape, dtype=model_output.dtype, device=model_output.device,
                                 generator=generator)
        if noise is None or self.step_index + 1 >= len(self._host_timesteps):
            prev_sample = denoised
        else:
            sigma_hat = sigma_next.clamp(min=self.config.sigma_min, max=self.config.sigma_max)
            prev_sample = denoised + noise * self.config.s_noise * (sigma_hat**2 - self.config.sigma_min**2) ** 0.5

        self._step_index += 1
        if not return_dict:
            return (prev_sample, denoised)
        return CMMultistepSchedulerOutput(prev_sample=prev_sample, denoised=denoised)
