"""The inputs of lcm-kit's discrete-time schedulers, checked: config values, the beta schedule built from them,
custom timesteps, ``step``'s tensors, and the lookup of a timestep in a schedule without reading the device."""

from __future__ import annotations

import math
import numbers
from typing import Sequence

import numpy as np
import torch
from diffusers.schedulers.scheduling_lcm import betas_for_alpha_bar

from ..consistency import PREDICTION_TYPES

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")



def check_choice(name: str, value, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"`{name}` must be one of {list(allowed)}, got {value!r}.")


def check_bool(name: str, value) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"`{name}` must be a bool (True or False), got {value!r} of type {type(value).__name__}.")
    return bool(value)


def check_real(name: str, value, allowed: str, ok=lambda v: True) -> float:
    """A finite real number (not a bool) for which ``ok`` holds; ``allowed`` says which in the error message."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"`{name}` must be a finite number {allowed}, got {value!r} of type {type(value).__name__}.")
    if not math.isfinite(value) or not ok(float(value)):
        raise ValueError(f"`{name}` must be a finite number {allowed}, got {value!r}.")
    return float(value)


def check_gamma(gamma, name: str = "gamma") -> float:
    allowed = "a number in [0, 1] (0 = deterministic, 1 = fresh noise at every step)"
    if isinstance(gamma, (bool, np.bool_)) or not isinstance(gamma, numbers.Real):
        raise TypeError(f"`{name}` must be {allowed}, got {gamma!r} of type {type(gamma).__name__}.")
    if not 0.0 <= float(gamma) <= 1.0:  # NaN too
        raise ValueError(f"`{name}` must be {allowed}, got {gamma!r}.")
    return float(gamma)


def check_int(name: str, value, low: int, high: int) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"`{name}` must be an int in [{low}, {high}], got {value!r} of type {type(value).__name__}.")
    if not low <= value <= high:
        raise ValueError(f"`{name}` must be in [{low}, {high}], got {value}.")
    return int(value)


def check_device(device) -> None:
    """`device` as `set_timesteps` takes it: None, a `torch.device` or a device string / index."""
    if device is None or isinstance(device, torch.device):
        return
    try:
        torch.device(device)
    except (RuntimeError, TypeError, ValueError) as error:
        raise ValueError(f"`device` must be a torch device (e.g. 'cpu', 'cuda:0'), got {device!r}: {error}") from None


def check_step_inputs(model_output, sample, generator) -> None:
    """`step`'s tensors and generator, checked before any math: a shape mismatch would otherwise broadcast."""
    for name, value in (("model_output", model_output), ("sample", sample)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"`{name}` must be a torch.Tensor, got {type(value).__name__}.")
    if model_output.shape != sample.shape:
        raise ValueError(
            f"`model_output` has shape {tuple(model_output.shape)} but `sample` has shape {tuple(sample.shape)}; "
            "they must be equal."
        )
    generators = generator if isinstance(generator, list) else [generator]
    if generator is not None and not all(isinstance(g, torch.Generator) for g in generators):
        raise TypeError(
            f"`generator` must be None, a torch.Generator or a list of them (one per sample), got {generator!r}."
        )
    if isinstance(generator, list) and len(generator) != sample.shape[0]:
        raise ValueError(f"`generator` is a list of {len(generator)}, but the batch has {sample.shape[0]} samples.")


def schedule_index(timestep, timesteps: torch.Tensor, host_timesteps: Sequence) -> int:
    """The position of `timestep` in a schedule, found on the host.

    `host_timesteps` is the host copy of `timesteps` made by `set_timesteps`. An element of `timesteps` itself (what
    `for t in scheduler.timesteps` yields) is a view whose offset is its position, so its (device) value is never
    read. Python numbers and CPU tensors are compared on the host. Any other device tensor is read once, which
    waits for the device (diffusers' schedulers do that on every step); on `meta` there is no value to read.
    If the timestep occurs twice, the second occurrence counts (diffusers' convention for image-to-image).
    """
    if isinstance(timestep, torch.Tensor):
        if timestep.ndim == 0 and timestep._base is timesteps and timesteps.ndim == 1 and timesteps.stride(0) > 0:
            offset, stride = timestep.storage_offset() - timesteps.storage_offset(), timesteps.stride(0)
            if offset % stride == 0 and 0 <= offset // stride < len(host_timesteps):
                return offset // stride
        if timestep.numel() != 1:
            raise ValueError(f"`timestep` must be a single timestep, got a tensor of shape {tuple(timestep.shape)}.")
        if timestep.device.type == "meta":
            raise ValueError(
                "`timestep` is a meta tensor that is not an element of `scheduler.timesteps`, so its value cannot be "
                "read; pass an element of `scheduler.timesteps`, a Python number, or call `set_begin_index` first."
            )
        value = timestep.item()
    elif isinstance(timestep, numbers.Real) and not isinstance(timestep, (bool, np.bool_)):
        value = timestep
    else:
        raise TypeError(f"`timestep` must be a number or a tensor from `scheduler.timesteps`, got {timestep!r}.")
    matches = [i for i, t in enumerate(host_timesteps) if t == value]
    if not matches:
        raise ValueError(
            f"`timestep` {value} is not in the current schedule {list(host_timesteps)}; "
            "pass one of the timesteps set by `set_timesteps`."
        )
    return matches[1] if len(matches) > 1 else matches[0]


def check_lcm_config(num_train_timesteps, beta_start, beta_end, beta_schedule, original_inference_steps,
                     clip_sample, clip_sample_range, set_alpha_to_one, steps_offset, prediction_type, thresholding,
                     dynamic_thresholding_ratio, sample_max_value, timestep_spacing, timestep_scaling,
                     rescale_betas_zero_snr, gamma) -> None:
    """The config of a :class:`~lcm_kit.schedulers.ConsistencyScheduler`, checked: an error names the argument."""
    check_int("num_train_timesteps", num_train_timesteps, 1, 10**9)
    check_choice("beta_schedule", beta_schedule, BETA_SCHEDULES)
    check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
    check_choice("timestep_spacing", timestep_spacing, TIMESTEP_SPACINGS)
    check_int("original_inference_steps", original_inference_steps, 1, num_train_timesteps)
    check_gamma(gamma)
    check_real("beta_start", beta_start, ">= 0", lambda v: v >= 0)
    check_real("beta_end", beta_end, ">= 0", lambda v: v >= 0)
    check_real("clip_sample_range", clip_sample_range, "> 0", lambda v: v > 0)
    check_real("dynamic_thresholding_ratio", dynamic_thresholding_ratio, "in (0, 1]", lambda v: 0 < v <= 1)
    check_real("sample_max_value", sample_max_value, "> 0", lambda v: v > 0)
    check_real("timestep_scaling", timestep_scaling, "> 0", lambda v: v > 0)
    check_int("steps_offset", steps_offset, 0, num_train_timesteps)
    for name, flag in (("clip_sample", clip_sample), ("set_alpha_to_one", set_alpha_to_one),
                       ("thresholding", thresholding), ("rescale_betas_zero_snr", rescale_betas_zero_snr)):
        check_bool(name, flag)


def vp_betas(trained_betas, beta_schedule: str, beta_start: float, beta_end: float, num_train_timesteps: int):
    """The betas of a discrete VP schedule (diffusers' beta schedules), each checked to be a finite number in [0, 1]."""
    if trained_betas is not None:
        # Any length, as in LCMScheduler / TCDScheduler; `set_timesteps` checks that the schedule stays inside.
        values = np.asarray(trained_betas.detach().cpu() if torch.is_tensor(trained_betas) else trained_betas)
        if values.dtype.kind not in "iuf":
            raise TypeError(f"`trained_betas` must be a 1-D list or array of numbers, got {trained_betas!r}.")
        if values.ndim != 1 or values.size == 0:
            raise ValueError(f"`trained_betas` must be a non-empty 1-D list of betas, got shape {tuple(values.shape)}.")
        betas = torch.tensor(values, dtype=torch.float32)
    elif beta_schedule == "linear":
        betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
    elif beta_schedule == "scaled_linear":
        # Latent diffusion's schedule: linear in sqrt(beta).
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2
    else:  # squaredcos_cap_v2: the Glide cosine schedule
        betas = betas_for_alpha_bar(num_train_timesteps)
    # A beta outside [0, 1] makes alphas_cumprod negative (or above 1) and every square root of it NaN.
    if not bool(torch.isfinite(betas).all()) or bool((betas < 0).any()) or bool((betas > 1).any()):
        source = ("`trained_betas`" if trained_betas is not None
                  else f"`beta_start`={beta_start} and `beta_end`={beta_end} with beta_schedule={beta_schedule!r}")
        raise ValueError(
            f"{source} give betas outside [0, 1] (min {betas.min().item():.4g}, max "
            f"{betas.max().item():.4g}); every beta must be a finite number in [0, 1]."
        )
    return betas


def check_custom_timesteps(timesteps, num_train_timesteps: int) -> np.ndarray:
    """Custom timesteps as an int64 array, or a `ValueError` naming what is wrong."""
    if isinstance(timesteps, torch.Tensor):
        timesteps = timesteps.detach().cpu().numpy()
    values = np.asarray(timesteps)
    if values.dtype.kind not in "iuf":
        raise TypeError(f"`timesteps` must be a list of ints, got {timesteps!r} (dtype {values.dtype}).")
    if values.ndim != 1 or values.size == 0:
        raise ValueError(f"`timesteps` must be a non-empty 1-D list of ints, got {timesteps!r}.")
    whole = np.all(np.isfinite(values)) and np.all(np.mod(values, 1) == 0)
    if not (np.issubdtype(values.dtype, np.integer) or whole):
        raise ValueError(f"`timesteps` must be integers, got {values.tolist()}.")
    values = values.astype(np.int64)
    if np.any(np.diff(values) >= 0):
        raise ValueError(f"`timesteps` must be strictly descending, got {values.tolist()}.")
    if values[0] >= num_train_timesteps or values[-1] < 0:
        raise ValueError(
            f"`timesteps` must lie in [0, num_train_timesteps={num_train_timesteps}), got {values.tolist()}."
        )
    return values


def begin_step(scheduler, model_output, sample, timestep, generator) -> None:
    """What every ``step`` of lcm-kit's schedulers starts with: the inputs checked, the step index found on the first
    step, and an error (not an ``IndexError``) when the loop runs past the schedule."""
    check_step_inputs(model_output, sample, generator)
    if scheduler.step_index is None:
        scheduler._init_step_index(timestep)
    if scheduler.step_index >= len(scheduler._host_timesteps):
        raise ValueError(
            f"`step()` was called {scheduler.step_index + 1} times but the schedule has "
            f"{len(scheduler._host_timesteps)} timesteps; call `set_timesteps(...)` again to start a new sampling loop."
        )

