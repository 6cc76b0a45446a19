"""Preconditioning wrappers: a backbone ``F(x, t, ...)`` seen as ``(x, sigma) -> x0`` in EDM sigma space.

* :class:`ConsistencyModel`: the consistency function ``f(x, sigma) = c_skip x + c_out F(c_in x, 250 log sigma)``
  with the sigma_min offset, so ``f(x, sigma_min) = x`` exactly (the input diffusers'
  ``CMStochasticIterativeScheduler`` gives a ``UNet2DModel``: the backbone alone is the deployable model);
* :class:`EDMDenoiser`: a diffusion model's denoiser ``D(x, sigma)`` with EDM's scalings (no offset);
* :class:`VPDenoiser`: a DDPM-family diffusers UNet queried as an EDM denoiser at any sigma;
* :class:`TrigFlowConsistencyModel`: sCM's consistency function in TrigFlow time,
  ``f(x_t, t) = cos(t) x_t + sin(t) sigma_data F(x_t / sigma_data, t)``, with the learned adaptive loss weighting
  ``w(t)`` of its training; :class:`VPTrigFlowConsistencyModel` is the same function of a VP (Stable Diffusion)
  UNet's own prediction.

The scalings come from :mod:`lcm_kit.consistency`; the backbone is a diffusers ``UNet2DModel`` or any module with
the signature ``F(sample, timestep, **conditioning)``.
"""

from __future__ import annotations

from typing import Callable

import torch
from diffusers.models.embeddings import get_timestep_embedding
from torch import nn

from .consistency import (
    SIGMA_DATA,
    SIGMA_MIN,
    append_dims,
    consistency_scalings,
    edm_scalings,
    predicted_original_sample,
    sigma_to_timestep,
    trigflow_consistency_function,
    trigflow_output_from_vp_prediction,
    vp_timestep_from_sigma,
    vp_timestep_from_trigflow_time,
)


def class_label_kwargs(class_labels) -> dict:
    """The backbone keyword arguments of a class-conditional call (none for ``class_labels=None``)."""
    return {} if class_labels is None else {"class_labels": class_labels}


def backbone_output(backbone: Callable, sample, timestep, conditioning: dict) -> torch.Tensor:
    """Call ``backbone(sample, timestep, **conditioning)`` and return its tensor (diffusers outputs unwrapped)."""
    out = backbone(sample, timestep, **conditioning)
    if isinstance(out, tuple):
        out = out[0]
    return getattr(out, "sample", out)


def batch_sigma(sigma, sample: torch.Tensor) -> torch.Tensor:
    """``sigma`` (number, scalar, per-sample or broadcast-shaped tensor) as a 1-D tensor of one sigma per sample,
    on the sample's device."""
    batch = sample.shape[0]
    if not torch.is_tensor(sigma):
        # a fill on the device, not torch.tensor(..., device=...): that one copies from the host and waits for it
        sigma = torch.full((), float(sigma), dtype=torch.float32, device=sample.device)
    sigma = sigma.to(device=sample.device, dtype=sample.dtype if sample.is_floating_point() else torch.float32)
    sigma = sigma.reshape(-1)
    if sigma.numel() == 1:
        return sigma.expand(batch)
    if sigma.numel() != batch:
        raise ValueError(f"sigma must hold 1 or batch_size={batch} values, got {sigma.numel()}.")
    return sigma


class _Preconditioned(nn.Module):
    """``c_skip x + c_out F(c_in x, c_noise(sigma))`` around a backbone; subclasses choose the scalings."""

    def __init__(
        self,
        backbone: nn.Module,
        sigma_data: float = SIGMA_DATA,
        noise_conditioning: Callable = sigma_to_timestep,
        conditioning: Callable = class_label_kwargs,
    ):
        super().__init__()
        self.backbone = backbone
        self.sigma_data = sigma_data
        self.noise_conditioning = noise_conditioning
        self.conditioning = conditioning

    def scalings(self, sigma):
        raise NotImplementedError

    def forward(self, sample: torch.Tensor, sigma, class_labels=None) -> torch.Tensor:
        sigma = batch_sigma(sigma, sample)
        c_skip, c_out, c_in = (append_dims(c, sample.ndim) for c in self.scalings(sigma))
        model_output = backbone_output(
            self.backbone, c_in * sample, self.noise_conditioning(sigma), self.conditioning(class_labels)
        )
        return c_skip * sample + c_out * model_output.to(sample.dtype)


class ConsistencyModel(_Preconditioned):
    """The consistency function f(x, sigma) with the sigma_min offset: ``f(x, sigma_min) = x`` exactly.

    ``backbone(sample, timestep, class_labels=None)`` is a diffusers ``UNet2DModel`` (optionally class-conditional
    through ``num_class_embeds``) or any module with that signature; it receives ``c_in x`` and ``250 log sigma``,
    the inputs the stock ``ConsistencyModelPipeline`` gives it, so the backbone alone is the deployable model.
    """

    def __init__(self, backbone, sigma_min: float = SIGMA_MIN, sigma_data: float = SIGMA_DATA, **kwargs):
        super().__init__(backbone, sigma_data=sigma_data, **kwargs)
        self.sigma_min = sigma_min

    def scalings(self, sigma):
        return consistency_scalings(sigma, self.sigma_data, self.sigma_min)


class EDMDenoiser(_Preconditioned):
    """A diffusion model's denoiser D(x, sigma) with EDM preconditioning (no offset) and the same time input.

    ``noise_conditioning`` maps sigma to the backbone's time input: 250 log sigma (consistency-model convention,
    default) or e.g. ``lambda s: 0.25 * torch.log(s)`` for diffusers' EDM schedulers.
    """

    def scalings(self, sigma):
        return edm_scalings(sigma, self.sigma_data)


class VPDenoiser(nn.Module):
    """A DDPM-family diffusers UNet (epsilon / v_prediction / sample) queried as an EDM denoiser D(x, sigma).

    ``x_sigma = x0 + sigma z`` is the VP sample ``x_t = sqrt(a) x_sigma`` with ``a = 1 / (1 + sigma^2)`` at the
    fractional timestep whose level is sigma (:func:`~lcm_kit.consistency.vp_timestep_from_sigma`); sigmas beyond the
    model's range are clamped to its first / last timestep. ``conditioning(class_labels)`` returns the extra UNet
    keyword arguments (``class_labels`` by default; e.g. ``encoder_hidden_states`` of class prompts for a
    text-conditioned teacher).
    """

    def __init__(
        self,
        unet: nn.Module,
        alphas_cumprod: torch.Tensor,
        prediction_type: str = "epsilon",
        conditioning: Callable = class_label_kwargs,
    ):
        super().__init__()
        self.unet = unet
        self.register_buffer("alphas_cumprod", alphas_cumprod.detach().clone().float(), persistent=False)
        self.prediction_type = prediction_type
        self.conditioning = conditioning

    @classmethod
    def from_scheduler(cls, unet, scheduler, **kwargs) -> "VPDenoiser":
        """Build from a diffusers DDPM-family scheduler (its ``alphas_cumprod`` and ``prediction_type``)."""
        if not hasattr(scheduler, "alphas_cumprod"):
            raise TypeError(
                f"scheduler must be a DDPM-family scheduler with alphas_cumprod, got {type(scheduler).__name__}."
            )
        return cls(unet, scheduler.alphas_cumprod, scheduler.config.prediction_type, **kwargs)

    def forward(self, sample: torch.Tensor, sigma, class_labels=None) -> torch.Tensor:
        sigma = batch_sigma(sigma, sample)
        timestep = vp_timestep_from_sigma(sigma.float(), self.alphas_cumprod)
        alpha = append_dims(1 / (1 + sigma.float() ** 2), sample.ndim)
        model_input = sample * alpha.sqrt()
        model_output = backbone_output(self.unet, model_input.to(sample.dtype), timestep, self.conditioning(class_labels))
        return predicted_original_sample(model_output.float(), model_input.float(), alpha, self.prediction_type).to(
            sample.dtype
        )


class AdaptiveLossWeighting(nn.Module):
    """sCM's learned weighting ``w(t)``: a linear layer on sinusoidal features of the TrigFlow time (the paper's
    choice of a tiny network on the time embedding), initialised to ``w = 0``."""

    def __init__(self, num_features: int = 128):
        super().__init__()
        self.num_features = num_features
        self.linear = nn.Linear(num_features, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        features = get_timestep_embedding(t.reshape(-1).float(), self.num_features, flip_sin_to_cos=True,
                                          downscale_freq_shift=0)
        return self.linear(features).reshape(-1)


class TrigFlowConsistencyModel(nn.Module):
    """sCM's consistency function ``f(x_t, t)`` in TrigFlow time
    (:func:`~lcm_kit.consistency.trigflow_consistency_function`).

    The backbone sees ``x_t / sigma_data`` (= the EDM input ``c_in x_sigma`` at ``sigma = sigma_data tan t``) and the
    time ``t`` (``time_conditioning`` maps t to another time input, for experiments);
    :class:`~lcm_kit.schedulers.CMMultistepScheduler` with ``parameterization="trigflow"`` samples it.
    ``loss_weighting`` (training only) is the learned ``w(t)``; it lives here so that one module (one DDP forward)
    holds every trained parameter.
    """

    def __init__(self, backbone: nn.Module, sigma_data: float = SIGMA_DATA, conditioning: Callable = class_label_kwargs,
                 loss_weighting: nn.Module | None = None, time_conditioning: Callable | None = None):
        super().__init__()
        self.backbone = backbone
        self.sigma_data = sigma_data
        self.conditioning = conditioning
        self.loss_weighting = loss_weighting
        self.time_conditioning = time_conditioning  # None: t itself (what the trigflow scheduler feeds)

    def network(self, sample: torch.Tensor, t, class_labels=None) -> torch.Tensor:
        """``F(x_t / sigma_data, t)``, the raw backbone output."""
        t = batch_sigma(t, sample)
        time_input = t if self.time_conditioning is None else self.time_conditioning(t)
        out = backbone_output(self.backbone, sample / self.sigma_data, time_input, self.conditioning(class_labels))
        return out.to(sample.dtype)

    def forward(self, sample: torch.Tensor, t, class_labels=None, return_network_output: bool = False):
        """``f(x_t, t)``; with ``return_network_output`` the pair ``(F, w(t))`` the sCM loss needs (``w = 0``
        without ``loss_weighting``)."""
        network_output = self.network(sample, t, class_labels)
        if return_network_output:
            t = batch_sigma(t, sample)
            weight = self.loss_weighting(t) if self.loss_weighting is not None else torch.zeros_like(t)
            return network_output, weight
        return trigflow_consistency_function(network_output, sample, batch_sigma(t, sample), self.sigma_data)


class VPTrigFlowConsistencyModel(TrigFlowConsistencyModel):
    """A VP (DDPM-family) diffusers UNet as sCM's TrigFlow consistency model, ``sigma_data = 1``.

    A VP point at TrigFlow time ``t`` is ``cos(t) x0 + sin(t) eps``: the UNet reads ``x_t`` itself at the fractional
    timestep of ``t`` (:func:`~lcm_kit.consistency.vp_timestep_from_trigflow_time`, differentiable in ``t`` for the
    tangent's JVP), and its epsilon / v prediction becomes ``F``
    (:func:`~lcm_kit.consistency.trigflow_output_from_vp_prediction`). ``f(x_t, t)`` is then the UNet's own x0
    prediction, so the trained weights (or LoRA) sample in stock pipelines as any x0 predictor does.
    ``conditioning(c)`` gives the UNet keyword arguments (default: ``c`` is that dict, e.g. ``encoder_hidden_states``).
    """

    def __init__(self, unet: nn.Module, alphas_cumprod: torch.Tensor, prediction_type: str = "epsilon",
                 conditioning: Callable | None = None, loss_weighting: nn.Module | None = None):
        super().__init__(unet, sigma_data=1.0, conditioning=conditioning or _unet_kwargs, loss_weighting=loss_weighting)
        self.register_buffer("alphas_cumprod", alphas_cumprod.detach().float(), persistent=False)
        self.prediction_type = prediction_type

    def network(self, sample: torch.Tensor, t, class_labels=None) -> torch.Tensor:
        t = batch_sigma(t, sample)
        timestep = vp_timestep_from_trigflow_time(t.float(), self.alphas_cumprod)
        out = backbone_output(self.backbone, sample, timestep, self.conditioning(class_labels))
        return trigflow_output_from_vp_prediction(out.to(sample.dtype), sample, t, self.prediction_type)


def _unet_kwargs(conditioning) -> dict:
    return {} if conditioning is None else dict(conditioning)
