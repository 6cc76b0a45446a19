"""What lcm-kit's discrete VP schedulers share with diffusers' schedulers: the step-index contract (``step_index``,
``begin_index``, ``index_for_timestep``) and the training helpers ``add_noise`` / ``get_velocity``."""

from __future__ import annotations

import torch

from ..consistency import append_dims, vp_noise, vp_velocity
from .scheduler_args import schedule_index


class StepIndexMixin:
    """diffusers' step-index bookkeeping over ``self.timesteps`` and its host copy ``self._host_timesteps``."""

    @property
    def step_index(self) -> int | None:
        """
        The index counter for the current timestep. It increases by 1 after each scheduler step.

        Returns:
            `int` or `None`: The current step index, or `None` before the first `step`.
        """
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        """
        The index of the first timestep. Pipelines may set it with `set_begin_index`.

        Returns:
            `int` or `None`: The begin index, or `None` if not set.
        """
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        """
        Sets the begin index for the scheduler. This function should be run from the pipeline before inference.

        Args:
            begin_index (`int`, defaults to `0`):
                The index in `timesteps` at which the first `step` starts.
        """
        self._begin_index = begin_index

    def index_for_timestep(self, timestep: int | torch.Tensor, schedule_timesteps: torch.Tensor | None = None) -> int:
        """
        Finds the index of `timestep` in the timestep schedule.

        Args:
            timestep (`int` or `torch.Tensor`):
                The timestep to look up.
            schedule_timesteps (`torch.Tensor`, *optional*):
                The schedule to search; defaults to `self.timesteps`.

        Returns:
            `int`: The index. If the timestep occurs twice, the second occurrence (diffusers' convention, so an
            image-to-image schedule starting mid-way does not skip a step).

        Raises:
            `ValueError`: if `timestep` is not in the schedule.
        """
        if schedule_timesteps is None:
            return schedule_index(timestep, self.timesteps, self._host_timesteps)
        if isinstance(timestep, torch.Tensor):
            timestep = timestep.to(schedule_timesteps.device)
        indices = (schedule_timesteps == timestep).nonzero()
        if len(indices) == 0:
            raise ValueError(
                f"`timestep` {timestep} is not in the schedule {schedule_timesteps.tolist()}; "
                "pass one of the timesteps set by `set_timesteps`."
            )
        return indices[1 if len(indices) > 1 else 0].item()

    def _init_step_index(self, timestep: int | torch.Tensor) -> None:
        if self.begin_index is None:
            self._step_index = self.index_for_timestep(timestep)
        else:
            self._step_index = self._begin_index


class VPTrainingMixin:
    """``add_noise`` and ``get_velocity`` of a discrete VP schedule (``self.alphas_cumprod``)."""

    def _alphas_at(self, timesteps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """`alphas_cumprod[timesteps]` on `like`'s device and dtype, shaped to broadcast against it."""
        alphas_cumprod = self.alphas_cumprod.to(device=like.device, dtype=like.dtype)
        if not isinstance(timesteps, torch.Tensor):
            timesteps = torch.as_tensor(timesteps)
        return append_dims(alphas_cumprod[timesteps.to(like.device)].flatten(), like.ndim)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.IntTensor) -> torch.Tensor:
        """
        Adds noise to the original samples at the noise level of each timestep (the forward diffusion process):
        `sqrt(a_t) x0 + sqrt(1 - a_t) noise`.

        Args:
            original_samples (`torch.Tensor`):
                The clean samples `x0`.
            noise (`torch.Tensor`):
                The noise to add, shaped like `original_samples`.
            timesteps (`torch.IntTensor`):
                One timestep per sample (or a single one for all).

        Returns:
            `torch.Tensor`: The noisy samples.
        """
        return vp_noise(original_samples, noise, self._alphas_at(timesteps, original_samples))

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps: torch.IntTensor) -> torch.Tensor:
        """
        The v-prediction target `sqrt(a_t) noise - sqrt(1 - a_t) sample` (Imagen Video, section 2.4).

        Args:
            sample (`torch.Tensor`):
                The clean samples `x0`.
            noise (`torch.Tensor`):
                The noise, shaped like `sample`.
            timesteps (`torch.IntTensor`):
                One timestep per sample (or a single one for all).

        Returns:
            `torch.Tensor`: The velocity.
        """
        return vp_velocity(sample, noise, self._alphas_at(timesteps, sample))
