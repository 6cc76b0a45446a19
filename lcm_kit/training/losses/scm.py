"""Continuous-time consistency models in TrigFlow time (sCM, Lu & Song 2025, Algorithm 1) as one callable: sCT
(consistency training, no teacher) and sCD (distillation of a diffusion teacher's velocity).

Per sample: ``t = arctan(e^tau / sigma_data)`` with ``tau ~ N(p_mean, p_std^2)``, ``x_t = cos(t) x0 + sin(t) z``
(``z ~ N(0, sigma_data^2)``) and the PF-ODE velocity ``dx_t/dt`` -- ``cos(t) z - sin(t) x0`` for sCT, the teacher's
for sCD. The tangent ``g = cos(t) df/dt`` of the stop-gradient model comes from one forward-mode JVP
(``torch.func.jvp``) through the backbone; after warm-up and normalisation the loss is
``e^w(t) / D ||F_theta - (F_theta- - g)||^2 - w(t)`` with the learned weighting ``w``. Its gradient is the
continuous-time consistency gradient, ``grad E[w' f^T df-/dt]`` (all the math: :mod:`lcm_kit.consistency`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from ...consistency import (
    SIGMA_DATA,
    append_dims,
    normalize_tangent,
    scm_tangent,
    sigma_from_trigflow_time,
    trigflow_time_from_alphas_cumprod,
    trigflow_time_from_sigma,
    trigflow_velocity_from_denoised,
    vp_timestep_from_sigma,
    vp_timestep_from_trigflow_time,
)
from .cm import get_rng_state, set_rng_state

SCM_MODES = ("sct", "scd")
# Lu & Song's CIFAR-10 settings: the time distribution, the tangent normalisation constant, the warm-up length.
SCM_P_MEAN, SCM_P_STD = -1.0, 1.4
TANGENT_NORMALIZATION_C = 0.1
TANGENT_WARMUP_STEPS = 10_000


@dataclass
class SCMLossOutput:
    """``loss`` per sample (with grad); the TrigFlow time of each sample; the tangent's norm before normalisation."""

    loss: torch.Tensor
    t: torch.Tensor
    tangent_norm: torch.Tensor


@contextlib.contextmanager
def forward_ad_compatible(module: nn.Module):
    """Run a diffusers network under forward-mode AD: SDPA's math kernel (torch's flash and memory-efficient CPU /
    CUDA kernels have no forward-AD formula) and contiguous GroupNorm inputs (torch 2.13's group_norm forward-AD
    rule views its input, which fails on the transposed output of diffusers' attention blocks)."""
    hooks = [m.register_forward_pre_hook(lambda _, args: (args[0].contiguous(), *args[1:]))
             for m in module.modules() if isinstance(m, nn.GroupNorm)]
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        for hook in hooks:
            hook.remove()


def scm_options_from_flags(warmup_steps, normalization_c, p_mean, p_std, max_train_steps) -> dict:
    """:class:`SCMLoss` keyword arguments from a trainer's flags, ``None`` taking sCM's defaults: the paper's
    10,000 warm-up steps at most a tenth of the run (so a short run finishes it), c 0.1, lognormal (-1.0, 1.4)."""
    if warmup_steps is None:
        warmup_steps = min(TANGENT_WARMUP_STEPS, (max_train_steps or 1) // 10)
    return dict(tangent_warmup_steps=warmup_steps,
                tangent_normalization_c=TANGENT_NORMALIZATION_C if normalization_c is None else normalization_c,
                p_mean=SCM_P_MEAN if p_mean is None else p_mean, p_std=SCM_P_STD if p_std is None else p_std)


def vp_teacher_at_levels(denoise: Callable, alphas_cumprod: torch.Tensor) -> Callable:
    """A VP teacher ``denoise(x_t, timestep) -> x0`` (long timesteps, e.g.
    :func:`~lcm_kit.training.losses.lcm.guided_teacher_denoiser`) as the ``teacher(x_sigma, sigma, _) -> x0`` that
    :class:`SCMLoss` queries, for sigmas at its own levels (what ``SCMLoss(alphas_cumprod=...)`` draws): the rounded
    fractional timestep is then exact."""

    def teacher(x_sigma, sigma, _):
        level = vp_timestep_from_sigma(sigma, alphas_cumprod).round().long()
        return denoise(x_sigma / append_dims((1 + sigma**2).sqrt(), x_sigma.ndim), level)

    return teacher


class SCMLoss:
    """The per-sample sCT / sCD loss of a :class:`~lcm_kit.precond.TrigFlowConsistencyModel`.

    Args:
        mode: ``"sct"`` (the single-sample velocity ``cos(t) z - sin(t) x0``) or ``"scd"`` (the teacher's).
        teacher: sCD only: a denoiser ``teacher(x_sigma, sigma, class_labels) -> x0``
            (:class:`~lcm_kit.precond.EDMDenoiser`, :class:`~lcm_kit.precond.VPDenoiser`), queried at
            ``x_sigma = x_t / cos(t)``, ``sigma = sigma_data tan t``; or passed per batch to :meth:`__call__` (a
            guided teacher whose guidance weights are drawn per batch).
        p_mean, p_std: the lognormal of ``sigma_data tan t`` (default -1.0, 1.4).
        tangent_warmup_steps: the warm-up ratio r grows linearly from 0 to 1 over these steps (0: r = 1 at once).
        tangent_normalization_c: c of ``g / (||g|| + c)`` (``None``: no normalisation).
        adaptive_weighting: use the model's learned ``w(t)`` (``loss_weighting``); otherwise the plain mean square.
        alphas_cumprod: a VP teacher's discrete schedule (``sigma_data = 1``): each drawn time is moved to the
            nearest of its levels (in log sigma), where the teacher was trained, which also keeps it in its range.
        jvp_autocast: run the tangent's JVP under the caller's autocast instead of in float32 (needed when the
            network's frozen weights are half precision, as a LoRA's base under mixed precision).
    """

    uses_target_network = False

    def __init__(
        self,
        mode: str = "sct",
        *,
        teacher: Callable | None = None,
        p_mean: float = SCM_P_MEAN,
        p_std: float = SCM_P_STD,
        sigma_data: float = SIGMA_DATA,
        tangent_warmup_steps: int = TANGENT_WARMUP_STEPS,
        tangent_normalization_c: float | None = TANGENT_NORMALIZATION_C,
        adaptive_weighting: bool = True,
        alphas_cumprod: torch.Tensor | None = None,
        jvp_autocast: bool = False,
    ):
        if mode not in SCM_MODES:
            raise ValueError(f"mode must be one of {SCM_MODES}, got {mode!r}.")
        if mode == "sct" and teacher is not None:
            raise ValueError(f"teacher is only used by mode='scd', got mode={mode!r}.")
        if alphas_cumprod is not None and sigma_data != 1.0:
            raise ValueError(f"alphas_cumprod (a VP schedule) needs sigma_data = 1, got {sigma_data}.")
        if not isinstance(tangent_warmup_steps, int) or tangent_warmup_steps < 0:
            raise ValueError(f"tangent_warmup_steps must be an int >= 0, got {tangent_warmup_steps!r}.")
        if tangent_normalization_c is not None and not tangent_normalization_c > 0:
            raise ValueError(f"tangent_normalization_c must be > 0 (or None: no normalisation), got "
                             f"{tangent_normalization_c!r}.")
        if not p_std > 0:
            raise ValueError(f"p_std must be > 0, got {p_std!r}.")
        self.mode, self.teacher = mode, teacher
        self.p_mean, self.p_std, self.sigma_data = p_mean, p_std, sigma_data
        self.tangent_warmup_steps = tangent_warmup_steps
        self.tangent_normalization_c = tangent_normalization_c
        self.adaptive_weighting = adaptive_weighting
        self.alphas_cumprod = None if alphas_cumprod is None else alphas_cumprod.detach().float()
        self.jvp_autocast = jvp_autocast

    def warmup_ratio(self, step: int) -> float:
        """r at optimisation step ``step``: ``min(1, step / tangent_warmup_steps)``."""
        return 1.0 if self.tangent_warmup_steps == 0 else min(1.0, step / self.tangent_warmup_steps)

    def logs(self, step: int) -> dict:
        return {"tangent_warmup": self.warmup_ratio(step)}

    def sample_time(self, batch_size: int, generator=None, device=None, dtype=torch.float32) -> torch.Tensor:
        """TrigFlow times ``arctan(e^tau / sigma_data)``, ``tau ~ N(p_mean, p_std^2)`` (drawn on ``device``)."""
        tau = self.p_mean + self.p_std * torch.randn(batch_size, generator=generator, device=device, dtype=dtype)
        t = trigflow_time_from_sigma(tau.exp(), self.sigma_data)
        if self.alphas_cumprod is None:
            return t
        if self.alphas_cumprod.device != t.device:  # once: indexing a host table with device timesteps is an error
            self.alphas_cumprod = self.alphas_cumprod.to(t.device)
        level = vp_timestep_from_trigflow_time(t.float(), self.alphas_cumprod).round().long()
        return trigflow_time_from_alphas_cumprod(self.alphas_cumprod[level]).to(dtype)

    @torch.no_grad()
    def velocity(self, clean, noise, sample, t, class_labels=None, teacher=None) -> torch.Tensor:
        """``dx_t/dt`` at ``x_t``: sCT ``cos(t) z - sin(t) x0``; sCD the teacher's PF-ODE velocity."""
        tb = append_dims(t, sample.ndim)
        if self.mode == "sct":
            return torch.cos(tb) * noise - torch.sin(tb) * clean
        teacher = self.teacher if teacher is None else teacher
        if teacher is None:
            raise ValueError("mode='scd' needs a teacher denoiser (teacher(x, sigma, class_labels) -> x0), at "
                             "construction or per call.")
        denoised = teacher(sample / torch.cos(tb), sigma_from_trigflow_time(t, self.sigma_data), class_labels)
        return trigflow_velocity_from_denoised(denoised.to(sample.dtype), sample, t)

    def tangent(self, tangent_model, sample, t, velocity, step: int, class_labels=None):
        """``(F-, g)``: the stop-gradient network output and the (warmed-up) tangent ``cos(t) df-/dt``, from one
        JVP in float32 (outside autocast: half-precision tangents lose the small terms)."""
        tb = append_dims(t, sample.ndim)
        scale = torch.cos(t) * torch.sin(t)

        def network(x, time):
            return tangent_model.network(x, time, class_labels)

        device_type = sample.device.type if sample.device.type in ("cuda", "cpu") else "cpu"
        precision = contextlib.nullcontext() if self.jvp_autocast else torch.autocast(device_type, enabled=False)
        with torch.no_grad(), precision, forward_ad_compatible(tangent_model):
            network_output, time_derivative = torch.func.jvp(
                network, (sample.float(), t.float()), ((append_dims(scale, sample.ndim) * velocity).float(),
                                                        scale.float()))
            network_output, time_derivative = network_output.float(), time_derivative.float()
        g = scm_tangent(network_output, time_derivative, sample.float(), velocity.float(), tb.float(),
                        self.sigma_data, self.warmup_ratio(step))
        return network_output, g

    def __call__(
        self,
        model: nn.Module,
        clean: torch.Tensor,
        step: int,
        target_model: nn.Module | None = None,
        class_labels: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        noise: torch.Tensor | None = None,
        tangent_model: nn.Module | None = None,
        teacher: Callable | None = None,
    ) -> SCMLossOutput:
        """The loss for a batch of clean samples. ``model`` is the (possibly DDP-wrapped) trained
        :class:`~lcm_kit.precond.TrigFlowConsistencyModel`, called as ``model(x_t, t, labels,
        return_network_output=True) -> (F, w)``; ``tangent_model`` the same network unwrapped for the JVP (default
        ``model``). ``noise``: standard normal (scaled by sigma_data here). ``teacher``: sCD's denoiser for this
        batch (default: the one given at construction)."""
        if target_model is not None:
            raise ValueError(f"mode={self.mode!r} has no target network: its target is the online model under "
                             "stop-gradient; do not pass target_model.")
        tangent_model = model if tangent_model is None else tangent_model
        batch = clean.shape[0]
        t = self.sample_time(batch, generator, clean.device, clean.dtype)
        if noise is None:
            noise = torch.randn(clean.shape, generator=generator, device=clean.device, dtype=clean.dtype)
        noise = noise * self.sigma_data
        tb = append_dims(t, clean.ndim)
        sample = torch.cos(tb) * clean + torch.sin(tb) * noise
        velocity = self.velocity(clean, noise, sample, t, class_labels, teacher)

        # The online and the JVP pass draw the same dropout masks.
        rng_state = get_rng_state(clean.device)
        network_output, log_weight = model(sample, t, class_labels, return_network_output=True)
        set_rng_state(clean.device, rng_state)
        target_output, g = self.tangent(tangent_model, sample, t, velocity, step, class_labels)
        tangent_norm = g.reshape(batch, -1).norm(dim=1)
        if self.tangent_normalization_c is not None:
            g = normalize_tangent(g, self.tangent_normalization_c)
        target = (target_output - g).detach()
        squared = (network_output.float() - target).pow(2).reshape(batch, -1).mean(dim=1)  # ||.||^2 / D
        if self.adaptive_weighting:
            log_weight = log_weight.float()
            per_sample = torch.exp(log_weight) * squared - log_weight
        else:
            per_sample = squared
        return SCMLossOutput(loss=per_sample, t=t, tangent_norm=tangent_norm.detach())
