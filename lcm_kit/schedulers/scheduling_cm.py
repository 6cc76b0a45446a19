"""`CMMultistepScheduler`: multistep consistency sampling in EDM sigma space over any sigma or timestep list.

A drop-in sibling of diffusers' ``CMStochasticIterativeScheduler`` (same config, same ``timesteps`` convention, same
model input ``250 log sigma``): for the same sigmas, inputs and generator its samples equal the stock scheduler's,
so the stock ``ConsistencyModelPipeline`` runs with either. What it adds:

* ``set_timesteps(sigmas=[...])``: any descending sigma list (e.g. iCT's two-step ``[80, 0.821]``), any length;
* every step re-noises with ``x = x0 + sqrt(sigma_next^2 - sigma_min^2) z`` and the last step returns ``x0`` itself
  (no noise is drawn for it);
* ``step`` also returns ``denoised`` (the x0 estimate);
* all math (boundary scalings with the sigma_min offset, c_in, 250 log sigma) comes from :mod:`lcm_kit.consistency`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from diffusers.schedulers.scheduling_consistency_models import CMStochasticIterativeScheduler
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from ..consistency import consistency_scalings, sigma_to_timestep
from ..utils import check_exactly_one


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

    _compatibles = [CMStochasticIterativeScheduler.__name__]

    def sigma_to_t(self, sigmas):
        """The model's time input for sigmas: `250 log(sigma)` (:func:`lcm_kit.consistency.sigma_to_timestep`)."""
        return sigma_to_timestep(sigmas if torch.is_tensor(sigmas) else np.asarray(sigmas, dtype=np.float64))

    def get_scalings_for_boundary_condition(self, sigma):
        """`(c_skip, c_out)` with the sigma_min offset, so `f(x, sigma_min) = x` exactly."""
        c_skip, c_out, _ = consistency_scalings(sigma, self.config.sigma_data, self.config.sigma_min)
        return c_skip, c_out

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        timesteps: Sequence[int] | None = None,
        sigmas: Sequence[float] | np.ndarray | torch.Tensor | None = None,
    ):
        """
        Set the sampling noise levels: exactly one of `num_inference_steps`, `timesteps` (descending indices into
        the `num_train_timesteps` Karras grid, as in diffusers) or `sigmas` (descending noise levels).
        """
        check_exactly_one(num_inference_steps=num_inference_steps, timesteps=timesteps, sigmas=sigmas)
        if sigmas is None:
            super().set_timesteps(num_inference_steps=num_inference_steps, device=device, timesteps=timesteps)
            return
        sigmas = np.asarray(sigmas.detach().cpu().double() if torch.is_tensor(sigmas) else sigmas, dtype=np.float64)
        sigmas = sigmas.reshape(-1)
        if sigmas.size == 0 or np.any(np.diff(sigmas) >= 0):
            raise ValueError(f"sigmas must be a non-empty, strictly descending list, got {sigmas.tolist()}.")
        lo, hi = self.config.sigma_min, self.config.sigma_max
        if sigmas[-1] < lo or sigmas[0] > hi * (1 + 1e-6):
            raise ValueError(f"sigmas must lie in [sigma_min={lo}, sigma_max={hi}], got {sigmas.tolist()}.")
        self.num_inference_steps = len(sigmas)
        self.custom_timesteps = True
        timesteps = self.sigma_to_t(sigmas)
        self.sigmas = torch.from_numpy(np.concatenate([sigmas, [lo]]).astype(np.float32))
        if str(device).startswith("mps"):
            self.timesteps = torch.from_numpy(timesteps).to(device, dtype=torch.float32)
        else:
            self.timesteps = torch.from_numpy(timesteps).to(device=device)
        self._step_index = None
        self._begin_index = None

    def scale_model_input(self, sample: torch.Tensor, timestep: float | torch.Tensor) -> torch.Tensor:
        """The model input `c_in(sigma) * sample`, `c_in = 1 / sqrt(sigma^2 + sigma_data^2)`."""
        if self.step_index is None:
            self._init_step_index(timestep)
        _, _, c_in = consistency_scalings(self.sigmas[self.step_index], self.config.sigma_data, self.config.sigma_min)
        self.is_scale_input_called = True
        return sample * c_in.to(sample.device, sample.dtype)

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
            return_dict (`bool`): return a [`CMMultistepSchedulerOutput`] (default) or a tuple `(prev_sample, denoised)`.
        """
        if isinstance(timestep, (int, torch.IntTensor, torch.LongTensor)):
            raise ValueError(
                f"timestep must be one of scheduler.timesteps (a float 250*log(sigma)), got the integer {timestep!r}."
            )
        if self.step_index is None:
            self._init_step_index(timestep)
        sigma, sigma_next = self.sigmas[self.step_index], self.sigmas[self.step_index + 1]
        c_skip, c_out = self.get_scalings_for_boundary_condition(sigma)
        denoised = c_out * model_output + c_skip * sample
        if self.config.clip_denoised:
            denoised = denoised.clamp(-1, 1)

        is_last = self.step_index + 1 >= len(self.timesteps)
        if is_last or len(self.timesteps) == 1:
            prev_sample = denoised
        else:
            noise = randn_tensor(model_output.shape, dtype=model_output.dtype, device=model_output.device,
                                 generator=generator)
            sigma_hat = sigma_next.clamp(min=self.config.sigma_min, max=self.config.sigma_max)
            prev_sample = denoised + noise * self.config.s_noise * (sigma_hat**2 - self.config.sigma_min**2) ** 0.5

        self._step_index += 1
        if not return_dict:
            return (prev_sample, denoised)
        return CMMultistepSchedulerOutput(prev_sample=prev_sample, denoised=denoised)
