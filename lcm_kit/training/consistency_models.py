"""Consistency models in EDM sigma space: CD, CT and iCT (Song et al. 2023; Song & Dhariwal 2023).

A consistency model maps any point ``x_sigma = x0 + sigma z`` of a probability-flow ODE trajectory to its origin:

    f(x, sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x, 250 log sigma)

with the sigma_min offset in ``c_skip``/``c_out`` so that ``f(x, sigma_min) = x`` exactly, and the time input that
diffusers' ``CMStochasticIterativeScheduler`` feeds a ``UNet2DModel`` (so a trained backbone is a standard diffusers
folder, sampled by the stock ``ConsistencyModelPipeline``). All the formulas come from :mod:`lcm_kit.consistency`.

What lives here:

* :class:`ConsistencyModel` (f with the offset), :class:`EDMDenoiser` (a diffusion model's D, no offset) and
  :class:`VPDenoiser` (a DDPM-family diffusers UNet queried as an EDM denoiser at any sigma): small
  preconditioning wrappers around a backbone ``F(sample, timestep, class_labels=None)`` -- a diffusers
  ``UNet2DModel`` or the :class:`ToyMLP`.
* :class:`ConsistencyObjective`: the CD / CT / iCT loss as one callable with its curricula (number of
  discretisation steps N(k), target EMA mu(k), index sampling, loss weighting, distance).
* Samplers: :func:`consistency_sample` (multistep consistency sampling through
  :class:`~lcm_kit.schedulers.scheduling_cm_multistep.CMMultistepScheduler`) and :func:`edm_sample` (Euler / Heun
  ODE sampling of a diffusion model, the baseline and the CD teacher's solver).
* :func:`save_consistency_pipeline`: a trained ``UNet2DModel`` as a diffusers ``ConsistencyModelPipeline`` folder.
* A 2-D toy (Gaussian mixture data, sliced Wasserstein distance, EDM pre-training loss) used by the tests and the
  toy benchmark.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..consistency import (
    RHO,
    SIGMA_DATA,
    SIGMA_MAX,
    SIGMA_MIN,
    append_dims,
    consistency_distance,
    consistency_scalings,
    ct_num_scales,
    ct_target_ema,
    edm_scalings,
    edm_solver_step,
    ict_index_probabilities,
    ict_loss_weight,
    ict_num_scales,
    karras_sigmas,
    predicted_original_sample,
    sigma_to_timestep,
    vp_timestep_from_sigma,
)
from .loop import TrainingObjective

MODES = ("cd", "ct", "ict")
CONSISTENCY_LOSS_TYPES = ("l2", "l1", "pseudo_huber", "lpips")
INDEX_SAMPLINGS = ("uniform", "lognormal")
LOSS_WEIGHTINGS = ("uniform", "ict")

# Per-mode defaults of the papers: CD (N = 18, target EMA 0.95, Heun teacher), CT (N(k) from 2 to 150, mu0 = 0.9),
# iCT (N(k) = min(10 * 2^floor(k/K'), 1280) + 1, mu = 0, pseudo-Huber, lognormal indices, lambda = 1/dsigma).
MODE_DEFAULTS = {
    "cd": dict(loss_type="l2", index_sampling="uniform", loss_weighting="uniform", num_scales=18, ema=0.95),
    "ct": dict(loss_type="l2", index_sampling="uniform", loss_weighting="uniform", s0=2, s1=150, mu0=0.9),
    "ict": dict(loss_type="pseudo_huber", index_sampling="lognormal", loss_weighting="ict", s0=10, s1=1280),
}
MODE_OPTIONS = {
    "cd": ("teacher", "solver", "num_scales", "target_ema_decay"),
    "ct": ("s0", "s1", "mu0"),
    "ict": ("s0", "s1"),
}


# --------------------------------------------------------------------------------------------------------------
# Preconditioning wrappers
# --------------------------------------------------------------------------------------------------------------


def _class_label_kwargs(class_labels):
    return {} if class_labels is None else {"class_labels": class_labels}


def backbone_output(backbone: Callable, sample, timestep, conditioning: dict) -> torch.Tensor:
    """Call ``backbone(sample, timestep, **conditioning)`` and return its tensor (diffusers outputs unwrapped)."""
    out = backbone(sample, timestep, **conditioning)
    if isinstance(out, tuple):
        out = out[0]
    return getattr(out, "sample", out)


def batch_sigma(sigma, sample: torch.Tensor) -> torch.Tensor:
    """``sigma`` (number, scalar, per-sample or broadcast-shaped tensor) as a 1-D tensor of one sigma per sample."""
    batch = sample.shape[0]
    if not torch.is_tensor(sigma):
        sigma = torch.tensor(float(sigma))
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
        conditioning: Callable = _class_label_kwargs,
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
        conditioning: Callable = _class_label_kwargs,
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


# --------------------------------------------------------------------------------------------------------------
# EMA and RNG helpers
# --------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def ema_update_(target: nn.Module, online: nn.Module, decay: float) -> None:
    """``target <- decay * target + (1 - decay) * online`` for every parameter (decay 0 copies online)."""
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"decay must be in [0, 1], got {decay}.")
    target_params = [p for p in target.parameters()]
    online_params = [p.detach().to(t.dtype) for p, t in zip(online.parameters(), target_params)]
    if len(target_params) != len(list(online.parameters())):
        raise ValueError("target and online models must have the same parameters.")
    torch._foreach_lerp_(target_params, online_params, 1.0 - decay)


def _get_rng_state(device: torch.device):
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(device: torch.device, state) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


# --------------------------------------------------------------------------------------------------------------
# Objectives
# --------------------------------------------------------------------------------------------------------------


@dataclass
class ConsistencyLossOutput:
    """What one objective call measured (``loss`` is the scalar to backpropagate)."""

    loss: torch.Tensor
    per_sample: torch.Tensor
    sigma: torch.Tensor
    sigma_next: torch.Tensor
    num_scales: int
    target_ema_decay: float


class LPIPSDistance(nn.Module):
    """LPIPS (VGG) on images upsampled to 224x224 as in the consistency-models paper; needs the ``lpips`` package."""

    def __init__(self):
        super().__init__()
        try:
            import lpips  # noqa: PLC0415 (optional dependency)
        except ImportError as err:
            raise ImportError(
                "loss_type='lpips' needs the `lpips` package and its VGG weights (downloaded on first use, which "
                "needs network access and torchvision); it is not installed here. Install it with "
                "`pip install lpips` where you can, or use loss_type='pseudo_huber' (iCT's LPIPS-free distance)."
            ) from err
        self.net = lpips.LPIPS(net="vgg").eval().requires_grad_(False)

    def forward(self, prediction, target):
        if prediction.ndim != 4 or prediction.shape[1] != 3:
            raise ValueError(f"LPIPS needs RGB images (B, 3, H, W), got shape {tuple(prediction.shape)}.")
        resize = lambda x: nn.functional.interpolate(x.float(), size=224, mode="bilinear", align_corners=False)  # noqa: E731
        return self.net(resize(prediction), resize(target)).reshape(-1)


class ConsistencyObjective:
    """The consistency loss of CD, CT or iCT with its curricula, as one callable (like EDM's loss classes).

    One call draws, per sample, an index i of the current Karras grid ``sigma_1 < ... < sigma_N`` and noise z, and
    compares the online model at ``x_{i+1} = x0 + sigma_{i+1} z`` with the stop-gradient target at the ODE point one
    step earlier:

    * ``cd``: ``x_i`` is one ``solver`` step (Euler or Heun) of the ``teacher`` denoiser from ``x_{i+1}``;
    * ``ct`` / ``ict``: ``x_i = x0 + sigma_i z`` with the same z (Euler with the clean sample as the denoiser).

    The target is ``target_model(x_i, sigma_i)`` -- an EMA copy for CD (decay ``target_ema_decay``) and CT
    (mu(k)) -- or the online model itself under no_grad for iCT (mu = 0). Online and target passes see the same
    dropout masks (the RNG state is replayed). Keep a separate EMA for sampling in every mode.

    Args:
        mode: ``"cd"``, ``"ct"`` or ``"ict"``.
        total_steps: K, the number of optimisation steps the curricula span (CT/iCT).
        teacher: CD only: a denoiser ``teacher(x, sigma, class_labels=None) -> x0`` (:class:`EDMDenoiser`,
            :class:`VPDenoiser`, ...).
        solver: CD only: ``"euler"`` or ``"heun"`` (default).
        loss_type: ``"l2"``, ``"l1"``, ``"pseudo_huber"`` or ``"lpips"`` (mode default: l2, l2, pseudo_huber).
        huber_c: pseudo-Huber c (default 0.00054 sqrt(d) with d the data dimension).
        num_scales: CD only: the fixed N (default 18).
        s0, s1: CT / iCT curriculum bounds (defaults 2 / 150 for CT, 10 / 1280 for iCT).
        mu0: CT only: mu0 of the target EMA schedule (default 0.9).
        target_ema_decay: CD only: the fixed target EMA (default 0.95).
        index_sampling: ``"uniform"`` or ``"lognormal"`` (iCT default, ``p_mean``/``p_std``).
        loss_weighting: ``"uniform"`` or ``"ict"`` (lambda = 1 / (sigma_{i+1} - sigma_i), iCT default).
    """

    def __init__(
        self,
        mode: str = "ict",
        total_steps: int = 400_000,
        *,
        teacher: Callable | None = None,
        solver: str | None = None,
        loss_type: str | None = None,
        huber_c: float | None = None,
        num_scales: int | None = None,
        s0: int | None = None,
        s1: int | None = None,
        mu0: float | None = None,
        target_ema_decay: float | None = None,
        index_sampling: str | None = None,
        loss_weighting: str | None = None,
        p_mean: float = -1.1,
        p_std: float = 2.0,
        sigma_min: float = SIGMA_MIN,
        sigma_max: float = SIGMA_MAX,
        rho: float = RHO,
    ):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}.")
        if not isinstance(total_steps, int) or total_steps < 1:
            raise ValueError(f"total_steps must be a positive int, got {total_steps!r}.")
        defaults = MODE_DEFAULTS[mode]
        self.mode, self.total_steps = mode, total_steps
        self.sigma_min, self.sigma_max, self.rho = sigma_min, sigma_max, rho
        self.p_mean, self.p_std = p_mean, p_std

        # Options that belong to other modes are errors, never silently ignored.
        given = dict(teacher=teacher, solver=solver, num_scales=num_scales, target_ema_decay=target_ema_decay,
                     s0=s0, s1=s1, mu0=mu0)
        for name, value in given.items():
            if value is not None and name not in MODE_OPTIONS[mode]:
                users = [m for m, names in MODE_OPTIONS.items() if name in names]
                raise ValueError(f"{name}={value!r} is not used by mode={mode!r}; it applies to mode {' / '.join(users)}.")
        if mode == "cd":
            if teacher is None:
                raise ValueError("mode='cd' needs a teacher denoiser (teacher(x, sigma, class_labels) -> x0).")
            self.solver = solver or "heun"
            if self.solver not in ("euler", "heun"):
                raise ValueError(f"solver must be 'euler' or 'heun', got {self.solver!r}.")
            self.fixed_num_scales = num_scales or defaults["num_scales"]
            if self.fixed_num_scales < 2:
                raise ValueError(f"num_scales must be >= 2, got {self.fixed_num_scales}.")
            self.fixed_ema = defaults["ema"] if target_ema_decay is None else target_ema_decay
            if not 0.0 <= self.fixed_ema < 1.0:
                raise ValueError(f"target_ema_decay must be in [0, 1), got {self.fixed_ema}.")
        self.teacher = teacher
        self.s0 = s0 if s0 is not None else defaults.get("s0")
        self.s1 = s1 if s1 is not None else defaults.get("s1")
        self.mu0 = mu0 if mu0 is not None else defaults.get("mu0")

        self.loss_type = loss_type or defaults["loss_type"]
        if self.loss_type not in CONSISTENCY_LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {CONSISTENCY_LOSS_TYPES}, got {self.loss_type!r}.")
        if huber_c is not None and self.loss_type != "pseudo_huber":
            raise ValueError(f"huber_c={huber_c} only applies to loss_type='pseudo_huber', got {self.loss_type!r}.")
        self.huber_c = huber_c
        self.lpips = LPIPSDistance() if self.loss_type == "lpips" else None
        self.index_sampling = index_sampling or defaults["index_sampling"]
        if self.index_sampling not in INDEX_SAMPLINGS:
            raise ValueError(f"index_sampling must be one of {INDEX_SAMPLINGS}, got {self.index_sampling!r}.")
        self.loss_weighting = loss_weighting or defaults["loss_weighting"]
        if self.loss_weighting not in LOSS_WEIGHTINGS:
            raise ValueError(f"loss_weighting must be one of {LOSS_WEIGHTINGS}, got {self.loss_weighting!r}.")

    # ---- curricula ------------------------------------------------------------------------------------------
    @property
    def uses_target_network(self) -> bool:
        """CD and CT compare against an EMA target network; iCT against the online network (mu = 0)."""
        return self.mode != "ict"

    def num_scales(self, step: int) -> int:
        """N at optimisation step k: fixed (CD), N(k) of CT, or iCT's exponential N(k)."""
        if self.mode == "cd":
            return self.fixed_num_scales
        if self.mode == "ct":
            return ct_num_scales(min(step, self.total_steps), self.total_steps, self.s0, self.s1)
        return ict_num_scales(step, self.total_steps, self.s0, self.s1)

    def target_ema_decay(self, step: int) -> float:
        """The target network's EMA decay after step k (0 for iCT, whose target is the online network)."""
        if self.mode == "cd":
            return self.fixed_ema
        if self.mode == "ct":
            return ct_target_ema(min(step, self.total_steps), self.total_steps, self.s0, self.s1, self.mu0)
        return 0.0

    def sigmas(self, step: int) -> torch.Tensor:
        """The ascending Karras grid of N(k) noise levels used at step k (float64)."""
        return karras_sigmas(self.num_scales(step), self.sigma_min, self.sigma_max, self.rho)

    def index_probabilities(self, sigmas: torch.Tensor) -> torch.Tensor:
        """P(i) for the pair (sigma_i, sigma_{i+1}), i in [0, N-2]."""
        if self.index_sampling == "lognormal":
            return ict_index_probabilities(sigmas, self.p_mean, self.p_std)
        return torch.full((sigmas.numel() - 1,), 1.0 / (sigmas.numel() - 1), dtype=torch.float64)

    def sample_sigma_pairs(self, step: int, batch_size: int, generator=None, device=None):
        """Per-sample ``(sigma_i, sigma_{i+1})`` drawn with the mode's index distribution (float64, on ``device``)."""
        sigmas = self.sigmas(step)
        probs = self.index_probabilities(sigmas)
        gen_device = generator.device if generator is not None else torch.device("cpu")
        index = torch.multinomial(probs.to(gen_device), batch_size, replacement=True, generator=generator).cpu()
        return sigmas[index].to(device), sigmas[index + 1].to(device)

    def loss_weight(self, sigma, sigma_next):
        return ict_loss_weight(sigma, sigma_next) if self.loss_weighting == "ict" else torch.ones_like(sigma)

    # ---- the pair of ODE points ----------------------------------------------------------------------------
    @torch.no_grad()
    def previous_point(self, clean, noise, sigma, sigma_next, class_labels=None) -> torch.Tensor:
        """The ODE point at ``sigma`` one step before ``x_{i+1} = clean + sigma_next noise``.

        CD: one teacher solver step from x_{i+1}; CT/iCT: ``clean + sigma noise`` (Euler with the clean sample).
        """
        sigma_b, sigma_next_b = append_dims(sigma, clean.ndim), append_dims(sigma_next, clean.ndim)
        if self.mode != "cd":
            return clean + sigma_b * noise
        x_next = clean + sigma_next_b * noise

        def denoise(x, s):
            return self.teacher(x, s, class_labels)

        return edm_solver_step(denoise, x_next, sigma_next_b, sigma_b, self.solver)

    def distance(self, prediction, target) -> torch.Tensor:
        if self.lpips is not None:
            self.lpips.to(prediction.device)
            return self.lpips(prediction, target)
        return consistency_distance(prediction, target, self.loss_type, huber_c=self.huber_c, reduce=False)

    # ---- the loss -------------------------------------------------------------------------------------------
    def __call__(
        self,
        model: nn.Module,
        clean: torch.Tensor,
        step: int,
        target_model: nn.Module | None = None,
        class_labels: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        noise: torch.Tensor | None = None,
    ) -> ConsistencyLossOutput:
        """The loss for a batch of clean samples at optimisation step ``step``.

        ``model`` and ``target_model`` are :class:`ConsistencyModel` s (f(x, sigma, class_labels)). CD and CT need
        ``target_model`` (the EMA target); iCT must not get one (its target is ``model`` under no_grad).
        """
        if self.uses_target_network and target_model is None:
            raise ValueError(f"mode={self.mode!r} needs target_model (the EMA target network).")
        if not self.uses_target_network and target_model is not None:
            raise ValueError("mode='ict' uses the online model as its target (mu = 0); do not pass target_model.")
        sigma, sigma_next = self.sample_sigma_pairs(step, clean.shape[0], generator, clean.device)
        sigma, sigma_next = sigma.to(clean.dtype), sigma_next.to(clean.dtype)
        if noise is None:
            noise = torch.randn(clean.shape, generator=generator, device=clean.device, dtype=clean.dtype)
        x_next = clean + append_dims(sigma_next, clean.ndim) * noise
        x_prev = self.previous_point(clean, noise, sigma, sigma_next, class_labels)

        # Replay the RNG so the online and the target pass draw the same dropout masks.
        rng_state = _get_rng_state(clean.device)
        online = model(x_next, sigma_next, class_labels)
        _set_rng_state(clean.device, rng_state)
        with torch.no_grad():
            target = (target_model if target_model is not None else model)(x_prev, sigma, class_labels).detach()

        per_sample = self.distance(online, target) * self.loss_weight(sigma, sigma_next).float()
        return ConsistencyLossOutput(
            loss=per_sample.mean(),
            per_sample=per_sample.detach(),
            sigma=sigma,
            sigma_next=sigma_next,
            num_scales=self.num_scales(step),
            target_ema_decay=self.target_ema_decay(step),
        )


def edm_denoising_loss(
    denoiser: nn.Module,
    clean: torch.Tensor,
    class_labels=None,
    generator=None,
    p_mean: float = -1.2,
    p_std: float = 1.2,
    sigma_data: float = SIGMA_DATA,
) -> torch.Tensor:
    """EDM's diffusion (denoising score matching) loss: lognormal sigma, weight (sigma^2 + sd^2) / (sigma sd)^2.

    Trains the :class:`EDMDenoiser` a consistency model can start from (and distil from, in CD).
    """
    batch = clean.shape[0]
    log_sigma = p_mean + p_std * torch.randn(batch, generator=generator, device=clean.device, dtype=clean.dtype)
    sigma = log_sigma.exp()
    noise = torch.randn(clean.shape, generator=generator, device=clean.device, dtype=clean.dtype)
    denoised = denoiser(clean + append_dims(sigma, clean.ndim) * noise, sigma, class_labels)
    weight = (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2
    return (weight * consistency_distance(denoised, clean, "l2", reduce=False)).mean()


# --------------------------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------------------------


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
    conditioning: Callable = _class_label_kwargs,
) -> torch.Tensor:
    """Multistep consistency sampling (Song et al. 2023, Alg. 1) of any backbone through a CM scheduler.

    ``noise`` is standard normal; the chain starts at ``sigmas[0] * noise`` and alternates ``x0 = f(x, sigma)`` and
    ``x = x0 + sqrt(sigma_next^2 - sigma_min^2) z`` (fresh z from ``generator``). Give ``num_inference_steps``
    (default 1), a descending ``sigmas`` list, or descending ``timesteps`` indices (diffusers' convention), as the
    scheduler (:class:`~lcm_kit.schedulers.scheduling_cm_multistep.CMMultistepScheduler`) accepts them. The loop is
    the stock ``ConsistencyModelPipeline``'s, so a ``UNet2DModel`` gives the pipeline's samples.
    """
    if sum(x is not None for x in (num_inference_steps, sigmas, timesteps)) > 1:
        raise ValueError("Give only one of num_inference_steps, sigmas and timesteps.")
    if sigmas is not None:
        scheduler.set_timesteps(sigmas=sigmas, device=noise.device)
    elif timesteps is not None:
        scheduler.set_timesteps(timesteps=timesteps, device=noise.device)
    else:
        scheduler.set_timesteps(num_inference_steps or 1, device=noise.device)
    sample = noise * scheduler.sigmas[0].to(noise.device, noise.dtype)
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
    if num_steps == 1:
        grid = torch.tensor([sigma_max], dtype=torch.float64)
    else:
        grid = karras_sigmas(num_steps, sigma_min, sigma_max, rho).flip(0)
    grid = torch.cat([grid, grid.new_zeros(1)]).to(noise.device, noise.dtype)
    x = noise * grid[0]

    def denoise(sample, sigma):
        return denoiser(sample, sigma, class_labels)

    for sigma, sigma_next in zip(grid[:-1], grid[1:]):
        s, s_next = sigma.expand(x.shape[0]), sigma_next.expand(x.shape[0])
        if sigma_next == 0:
            x = denoise(x, s)
        else:
            x = edm_solver_step(denoise, x, s, s_next, solver)
    return x


def consistency_scheduler_config(
    sigma_min: float = SIGMA_MIN,
    sigma_max: float = SIGMA_MAX,
    sigma_data: float = SIGMA_DATA,
    rho: float = RHO,
    num_train_timesteps: int = 40,
    clip_denoised: bool = True,
) -> dict:
    """Config of the ``CMStochasticIterativeScheduler`` saved with a consistency model (same keys as ours)."""
    return dict(
        num_train_timesteps=num_train_timesteps,
        sigma_min=sigma_min,
        sigma_max=sigma_max,
        sigma_data=sigma_data,
        s_noise=1.0,
        rho=rho,
        clip_denoised=clip_denoised,
    )


def save_consistency_pipeline(unet, output_dir: str, **scheduler_kwargs):
    """Save a consistency-model backbone (``UNet2DModel``) as a stock diffusers ``ConsistencyModelPipeline`` folder.

    The folder holds ``unet/`` (safetensors) and ``scheduler/`` (``CMStochasticIterativeScheduler`` with the sigma
    range the model was trained with: ``scheduler_kwargs`` override :func:`consistency_scheduler_config`), so
    ``ConsistencyModelPipeline.from_pretrained(output_dir)`` samples it; class-conditional UNets
    (``num_class_embeds``) take ``class_labels``. Returns the pipeline.
    """
    from diffusers import CMStochasticIterativeScheduler, ConsistencyModelPipeline, UNet2DModel  # noqa: PLC0415

    if not isinstance(unet, UNet2DModel):
        raise TypeError(
            f"unet must be a diffusers UNet2DModel to save a ConsistencyModelPipeline, got {type(unet).__name__}."
        )
    scheduler = CMStochasticIterativeScheduler(**{**consistency_scheduler_config(), **scheduler_kwargs})
    pipeline = ConsistencyModelPipeline(unet=unet, scheduler=scheduler)
    pipeline.save_pretrained(output_dir, safe_serialization=True)
    return pipeline


# --------------------------------------------------------------------------------------------------------------
# 2-D toy: data, backbone, distance
# --------------------------------------------------------------------------------------------------------------


class ToyMLP(nn.Module):
    """A small MLP backbone ``F(sample, timestep, class_labels=None)`` for low-dimensional data.

    The timestep (250 log sigma, the UNet's input) goes through diffusers' sinusoidal embedding and a linear layer,
    like a ``UNet2DModel``'s; ``num_class_embeds`` adds a class embedding; ``dropout`` acts on hidden layers.
    """

    def __init__(
        self,
        dim: int = 2,
        hidden_dim: int = 128,
        num_layers: int = 3,
        time_embed_dim: int = 64,
        num_class_embeds: int | None = None,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.time_embed_dim = time_embed_dim
        self.time_proj = nn.Sequential(nn.Linear(time_embed_dim, hidden_dim), nn.SiLU(), nn.Linear(hidden_dim, hidden_dim))
        self.class_embedding = nn.Embedding(num_class_embeds, hidden_dim) if num_class_embeds else None
        self.input = nn.Linear(dim, hidden_dim)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.SiLU(), nn.Dropout(dropout), nn.Linear(hidden_dim, hidden_dim)) for _ in range(num_layers)
        )
        self.output = nn.Sequential(nn.SiLU(), nn.Linear(hidden_dim, dim))

    def forward(self, sample: torch.Tensor, timestep, class_labels=None) -> torch.Tensor:
        from diffusers.models.embeddings import get_timestep_embedding  # noqa: PLC0415

        timestep = torch.as_tensor(timestep, device=sample.device).reshape(-1).float()
        timestep = timestep.expand(sample.shape[0]) if timestep.numel() == 1 else timestep
        sinusoids = get_timestep_embedding(timestep, self.time_embed_dim, flip_sin_to_cos=True, downscale_freq_shift=0)
        emb = self.time_proj(sinusoids)
        if self.class_embedding is not None:
            if class_labels is None:
                raise ValueError("class_labels are required: this ToyMLP was built with num_class_embeds.")
            emb = emb + self.class_embedding(class_labels)
        h = self.input(sample) + emb
        for block in self.blocks:
            h = h + block(h) + emb
        return self.output(h)


def gaussian_mixture_2d(
    num_samples: int,
    generator: torch.Generator | None = None,
    num_modes: int = 8,
    radius: float = 0.8,
    std: float = 0.08,
):
    """``num_samples`` points of ``num_modes`` isotropic Gaussians evenly spaced on a circle; returns (x, labels)."""
    labels = torch.randint(0, num_modes, (num_samples,), generator=generator)
    angles = 2 * math.pi * labels.double() / num_modes
    means = radius * torch.stack([angles.cos(), angles.sin()], dim=1)
    points = means + std * torch.randn(num_samples, 2, generator=generator, dtype=torch.float64)
    return points.float(), labels


def sliced_wasserstein(x: torch.Tensor, y: torch.Tensor, num_projections: int = 256, generator=None) -> float:
    """Sliced 2-Wasserstein distance between two equal-sized point clouds (random unit directions, sorted 1-D)."""
    if x.shape != y.shape or x.ndim != 2:
        raise ValueError(
            f"x and y must be (n, d) point clouds of the same shape, got {tuple(x.shape)} and {tuple(y.shape)}."
        )
    directions = torch.randn(x.shape[1], num_projections, generator=generator, dtype=torch.float64)
    directions = directions / directions.norm(dim=0, keepdim=True)
    px = (x.double() @ directions).sort(dim=0).values
    py = (y.double() @ directions).sort(dim=0).values
    return (px - py).pow(2).mean().sqrt().item()


def train_toy_diffusion(
    denoiser: nn.Module,
    data_fn: Callable[[int, torch.Generator], tuple],
    num_steps: int,
    batch_size: int = 256,
    learning_rate: float = 2e-3,
    seed: int = 0,
    progress: bool = False,
) -> list[float]:
    """Fit a small :class:`EDMDenoiser` with :func:`edm_denoising_loss` on fresh batches of ``data_fn(n, gen)``."""
    from tqdm.auto import tqdm  # noqa: PLC0415

    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(denoiser.parameters(), lr=learning_rate)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, num_steps)
    losses = []
    for _ in tqdm(range(num_steps), disable=not progress, desc="diffusion"):
        clean, labels = data_fn(batch_size, generator)
        loss = edm_denoising_loss(denoiser, clean, labels if _is_conditional(denoiser) else None, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    return losses


def _is_conditional(module: nn.Module) -> bool:
    backbone = getattr(module, "backbone", module)
    return getattr(backbone, "class_embedding", None) is not None


def train_toy_consistency(
    objective: ConsistencyObjective,
    model: ConsistencyModel,
    data_fn: Callable[[int, torch.Generator], tuple],
    batch_size: int = 256,
    learning_rate: float = 1e-3,
    sampling_ema_decay: float = 0.999,
    seed: int = 0,
    progress: bool = False,
):
    """Train ``model`` for ``objective.total_steps`` steps; returns ``(sampling_ema_model, losses)``.

    The bookkeeping of the papers in a few lines: a target network updated with mu(k) for CD / CT (none for iCT) and
    a separate EMA of the online weights for sampling.
    """
    import copy  # noqa: PLC0415

    from tqdm.auto import tqdm  # noqa: PLC0415

    generator = torch.Generator().manual_seed(seed)
    target = copy.deepcopy(model).requires_grad_(False) if objective.uses_target_network else None
    sampling_ema = copy.deepcopy(model).requires_grad_(False)
    optimizer = torch.optim.RAdam(model.parameters(), lr=learning_rate)
    conditional = _is_conditional(model)
    losses = []
    for step in tqdm(range(objective.total_steps), disable=not progress, desc=f"{objective.mode}"):
        clean, labels = data_fn(batch_size, generator)
        out = objective(model, clean, step, target_model=target, class_labels=labels if conditional else None,
                        generator=generator)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
        if target is not None:
            ema_update_(target, model, objective.target_ema_decay(step))
        ema_update_(sampling_ema, model, sampling_ema_decay)
        losses.append(out.loss.item())
    return sampling_ema, losses


# --------------------------------------------------------------------------------------------------------------
# The Accelerate trainer (train_scripts/train_consistency.py)
# --------------------------------------------------------------------------------------------------------------


def add_consistency_args(parser) -> None:
    """Flags of consistency distillation / training (the loop, data and hub groups come from ``args.py``)."""
    group = parser.add_argument_group("consistency models")
    group.add_argument("--mode", type=str, required=True, choices=MODES,
                       help="cd: distil a diffusion teacher's ODE; ct: consistency training; ict: improved CT.")
    group.add_argument("--teacher", type=str, default=None,
                       help="cd only: a diffusers folder with unet/ (UNet2DModel) and scheduler/ (DDPM-family: epsilon, "
                            "v_prediction or sample; or EDM: EDMEulerScheduler / EDMDPMSolverMultistepScheduler).")
    group.add_argument("--teacher_solver", type=str, default=None, choices=("euler", "heun"),
                       help="cd only: the teacher's ODE step (default heun).")
    group.add_argument("--loss_type", type=str, default=None, choices=CONSISTENCY_LOSS_TYPES,
                       help="Default: l2 (cd, ct), pseudo_huber (ict). lpips needs the lpips package and its weights.")
    group.add_argument("--huber_c", type=float, default=None, help="pseudo-Huber c (default 0.00054 * sqrt(d)).")
    group.add_argument("--num_scales", type=int, default=None, help="cd only: N of the Karras grid (default 18).")
    group.add_argument("--target_ema_decay", type=float, default=None, help="cd only: target EMA (default 0.95).")
    group.add_argument("--s0", type=int, default=None, help="ct / ict: first N of the curriculum (2 / 10).")
    group.add_argument("--s1", type=int, default=None, help="ct / ict: last N of the curriculum (150 / 1280).")
    group.add_argument("--mu0", type=float, default=None, help="ct only: mu0 of the target EMA schedule (0.9).")
    group.add_argument("--p_mean", type=float, default=-1.1, help="Lognormal index sampling mean (ict).")
    group.add_argument("--p_std", type=float, default=2.0, help="Lognormal index sampling std (ict).")
    group.add_argument("--sigma_min", type=float, default=SIGMA_MIN)
    group.add_argument("--sigma_max", type=float, default=SIGMA_MAX)
    group.add_argument("--sigma_data", type=float, default=SIGMA_DATA)
    group.add_argument("--rho", type=float, default=RHO)
    group.add_argument("--ema_decay", type=float, default=0.9999,
                       help="EMA of the online weights kept for sampling (saved as the model), separate from the target.")
    group.add_argument("--pretrained_unet", type=str, default=None,
                       help="Initialise from this UNet2DModel (folder with config.json, or a pipeline folder with unet/), "
                            "e.g. the teacher's. Default: a new UNet2DModel from the flags below.")
    group.add_argument("--block_out_channels", type=str, default=None,
                       help="New UNet: comma-separated channels per level (default 64,128,128).")
    group.add_argument("--layers_per_block", type=int, default=None, help="New UNet: resnets per level (default 2).")
    group.add_argument("--dropout", type=float, default=None,
                       help="New UNet: dropout (default 0; iCT used 0.3 on CIFAR-10).")
    group.add_argument("--num_class_embeds", type=int, default=None,
                       help="Class-conditional: number of classes. Labels come from --caption_column (an integer "
                            "string, or one of --class_names).")
    group.add_argument("--class_names", type=str, default=None,
                       help="Comma-separated class names; caption i-th name -> label i.")
    group.add_argument("--pretrained_vae_model_name_or_path", type=str, default=None,
                       help="Train in this AutoencoderKL's latent space (latents scaled by its scaling_factor).")
    group.add_argument("--scheduler_num_train_timesteps", type=int, default=40,
                       help="Grid of the saved CMStochasticIterativeScheduler (num_inference_steps index into it).")
    group.add_argument("--validation_num_inference_steps", type=int, default=1)
    group.add_argument("--cache_dir", type=str, default=None, help="Where downloaded models and datasets are cached.")


def build_consistency_parser():
    import argparse  # noqa: PLC0415

    from .args import add_data_args, add_hub_args, add_training_args  # noqa: PLC0415

    parser = argparse.ArgumentParser(description="Consistency distillation (cd), consistency training (ct) and iCT.")
    for add in (add_training_args, add_data_args, add_hub_args, add_consistency_args):
        add(parser)
    parser.set_defaults(learning_rate=1e-4, lr_warmup_steps=0, resolution=32)
    return parser


def validate_consistency_args(args) -> None:
    if args.mode == "cd" and args.teacher is None:
        raise ValueError("--mode cd needs --teacher (a diffusers folder with unet/ and scheduler/).")
    if args.mode != "cd":
        for flag in ("teacher", "teacher_solver", "num_scales", "target_ema_decay"):
            if getattr(args, flag) is not None:
                raise ValueError(f"--{flag} only applies to --mode cd, got --mode {args.mode}.")
    if args.mode != "ct" and args.mu0 is not None:
        raise ValueError(f"--mu0 only applies to --mode ct, got --mode {args.mode}.")
    if args.mode == "cd" and (args.s0 is not None or args.s1 is not None):
        raise ValueError("--s0 / --s1 only apply to --mode ct and ict.")
    if not 0.0 <= args.ema_decay < 1.0:
        raise ValueError(f"--ema_decay must be in [0, 1), got {args.ema_decay}.")
    if args.pretrained_unet is not None:
        for flag in ("block_out_channels", "layers_per_block", "dropout"):
            if getattr(args, flag) is not None:
                raise ValueError(
                    f"--{flag} shapes a new UNet; it cannot apply to --pretrained_unet {args.pretrained_unet!r}."
                )
    if args.dropout is not None and not 0.0 <= args.dropout < 1.0:
        raise ValueError(f"--dropout must be in [0, 1), got {args.dropout}.")
    if args.validation_num_inference_steps < 1:
        raise ValueError(f"--validation_num_inference_steps must be >= 1, got {args.validation_num_inference_steps}.")
    if not 0 < args.sigma_min < args.sigma_max:
        raise ValueError(f"need 0 < --sigma_min < --sigma_max, got {args.sigma_min}, {args.sigma_max}.")
    if args.class_names is not None and args.num_class_embeds is None:
        raise ValueError("--class_names needs --num_class_embeds.")
    if args.class_names is not None and len(args.class_names.split(",")) != args.num_class_embeds:
        raise ValueError(f"--class_names has {len(args.class_names.split(','))} names but --num_class_embeds is "
                         f"{args.num_class_embeds}.")
    if args.num_class_embeds is None and args.validation_prompts:
        raise ValueError("--validation_prompts are class labels of a class-conditional model (--num_class_embeds); "
                         "an unconditional model takes none.")


def _load_unet2d(path: str, cache_dir=None):
    from diffusers import UNet2DModel  # noqa: PLC0415

    try:
        return UNet2DModel.from_pretrained(path, subfolder="unet", cache_dir=cache_dir)
    except (OSError, EnvironmentError):
        return UNet2DModel.from_pretrained(path, cache_dir=cache_dir)


def load_teacher_denoiser(path: str, cache_dir=None) -> nn.Module:
    """A diffusers folder (``unet/`` + ``scheduler/``) as an EDM denoiser D(x, sigma, class_labels).

    DDPM-family schedulers (with ``alphas_cumprod``) give a :class:`VPDenoiser`; diffusers' EDM schedulers
    (``EDMEulerScheduler``, ``EDMDPMSolverMultistepScheduler``: time input 0.25 log sigma, epsilon preconditioning)
    give an :class:`EDMDenoiser`.
    """
    from diffusers import DDPMScheduler  # noqa: PLC0415

    unet = _load_unet2d(path, cache_dir).requires_grad_(False).eval()
    config = DDPMScheduler.load_config(path, subfolder="scheduler", cache_dir=cache_dir)  # any scheduler's json
    class_name = config.get("_class_name", "")
    if class_name.startswith("EDM"):
        if config.get("prediction_type", "epsilon") != "epsilon":
            raise ValueError(f"EDM teacher scheduler with prediction_type={config['prediction_type']!r}: only 'epsilon' "
                             "(EDM's F-prediction) is supported.")
        return EDMDenoiser(unet, sigma_data=config.get("sigma_data", SIGMA_DATA),
                           noise_conditioning=lambda sigma: 0.25 * torch.log(sigma))
    if "beta_schedule" in config or "trained_betas" in config:
        scheduler = DDPMScheduler.from_config(config)
        return VPDenoiser.from_scheduler(unet, scheduler)
    raise ValueError(f"--teacher={path!r}: scheduler {class_name!r} is neither DDPM-family nor EDM.")


class ConsistencyTrainer(TrainingObjective):
    """:class:`~lcm_kit.training.loop.TrainingObjective` for CD / CT / iCT on a diffusers ``UNet2DModel``.

    Holds the online model (trained), the target network (EMA with mu(k) for CD / CT; none for iCT), the sampling
    EMA (``--ema_decay``, the saved model), the teacher (CD) and the VAE (latent space).
    """

    name = "consistency-models"

    def __init__(self, args, accelerator):
        from diffusers import UNet2DModel  # noqa: PLC0415

        from .loop import weight_dtype_for  # noqa: PLC0415

        self.args, self.accelerator, self.device = args, accelerator, accelerator.device
        self.weight_dtype = weight_dtype_for(accelerator)
        self.vae = None
        if args.pretrained_vae_model_name_or_path:
            from diffusers import AutoencoderKL  # noqa: PLC0415

            try:
                vae = AutoencoderKL.from_pretrained(args.pretrained_vae_model_name_or_path, subfolder="vae",
                                                    cache_dir=args.cache_dir)
            except (OSError, EnvironmentError):
                vae = AutoencoderKL.from_pretrained(args.pretrained_vae_model_name_or_path, cache_dir=args.cache_dir)
            self.vae = vae.requires_grad_(False).eval().to(self.device)  # fp32: SD VAEs overflow in fp16
            self.latent_scale = vae.config.scaling_factor
            self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        channels = self.vae.config.latent_channels if self.vae is not None else 3
        sample_size = args.resolution // (self.vae_scale_factor if self.vae is not None else 1)

        if args.pretrained_unet:
            unet = _load_unet2d(args.pretrained_unet, args.cache_dir)
            if unet.config.num_class_embeds != args.num_class_embeds:
                raise ValueError(f"--pretrained_unet has num_class_embeds={unet.config.num_class_embeds}, but "
                                 f"--num_class_embeds={args.num_class_embeds}.")
            if (unet.config.in_channels, unet.config.sample_size) != (channels, sample_size):
                raise ValueError(
                    f"--pretrained_unet takes {unet.config.in_channels} channels at {unet.config.sample_size}px; "
                    f"this run needs {channels} at {sample_size}px (--resolution / VAE)."
                )
        else:
            blocks = tuple(int(c) for c in (args.block_out_channels or "64,128,128").split(","))
            unet = UNet2DModel(
                sample_size=sample_size,
                in_channels=channels,
                out_channels=channels,
                block_out_channels=blocks,
                down_block_types=("DownBlock2D",) * len(blocks),
                up_block_types=("UpBlock2D",) * len(blocks),
                layers_per_block=args.layers_per_block or 2,
                norm_num_groups=min(32, blocks[0]),
                dropout=args.dropout or 0.0,
                num_class_embeds=args.num_class_embeds,
            )
        if args.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        self.unet = unet.to(self.device).train()
        self.model = ConsistencyModel(self.unet, sigma_min=args.sigma_min, sigma_data=args.sigma_data)
        self.student = self.model  # replaced by the prepared module

        teacher = None
        if args.mode == "cd":
            teacher = load_teacher_denoiser(args.teacher, args.cache_dir)
            teacher.to(self.device)
            if self.weight_dtype != torch.float32:  # the network only: the noise schedule stays fp32
                (teacher.unet if isinstance(teacher, VPDenoiser) else teacher.backbone).to(self.weight_dtype)
        self.teacher = teacher
        self.objective = ConsistencyObjective(
            args.mode,
            args.max_train_steps or 1,
            teacher=teacher,
            solver=args.teacher_solver,
            loss_type=args.loss_type,
            huber_c=args.huber_c,
            num_scales=args.num_scales,
            s0=args.s0,
            s1=args.s1,
            mu0=args.mu0,
            target_ema_decay=args.target_ema_decay,
            p_mean=args.p_mean,
            p_std=args.p_std,
            sigma_min=args.sigma_min,
            sigma_max=args.sigma_max,
            rho=args.rho,
        )
        self.target = None
        if self.objective.uses_target_network:
            self.target = copy_module(self.model)
        self.ema = copy_module(self.model)
        self.class_names = args.class_names.split(",") if args.class_names else None
        self.validation_labels()  # a bad --validation_prompts label fails now, not after training

    # ---- TrainingObjective ------------------------------------------------------------------------------------
    def trainable_modules(self):
        return [self.model]

    def set_prepared_modules(self, modules):
        (self.student,) = modules

    def trainable_parameters(self):
        return list(self.model.parameters())

    def class_labels(self, captions) -> torch.Tensor | None:
        """Class indices from captions: integer strings, or positions in ``--class_names``."""
        if self.args.num_class_embeds is None:
            return None
        labels = []
        for caption in captions:
            caption = str(caption).strip()
            if self.class_names is not None and caption in self.class_names:
                labels.append(self.class_names.index(caption))
            elif caption.lstrip("-").isdigit():
                labels.append(int(caption))
            else:
                raise ValueError(f"caption {caption!r} is not a class label: expected an integer in "
                                 f"[0, {self.args.num_class_embeds}) or one of --class_names {self.class_names}.")
            if not 0 <= labels[-1] < self.args.num_class_embeds:
                raise ValueError(f"class label {labels[-1]} (caption {caption!r}) is outside "
                                 f"[0, --num_class_embeds={self.args.num_class_embeds}).")
        return torch.tensor(labels, device=self.device, dtype=torch.long)

    @torch.no_grad()
    def encode(self, pixel_values, generator):
        if self.vae is None:
            return pixel_values
        posterior = self.vae.encode(pixel_values.float()).latent_dist
        noise = torch.randn(posterior.mean.shape, generator=generator, device=posterior.mean.device)
        return (posterior.mean + posterior.std * noise) * self.latent_scale

    def compute_loss(self, batch, step, generator):
        clean = self.encode(batch["pixel_values"].to(self.device), generator)
        labels = self.class_labels(batch["captions"])
        with self.accelerator.autocast():
            out = self.objective(self.student, clean, step, target_model=self.target, class_labels=labels,
                                 generator=generator)
        logs = {"num_scales": out.num_scales, "target_ema_decay": out.target_ema_decay}
        return out.loss, logs

    def after_optimizer_step(self, step):
        online = _unwrap_module(self.student)
        if self.target is not None:
            ema_update_(self.target, online, self.objective.target_ema_decay(step))
        ema_update_(self.ema, online, self.args.ema_decay)

    def checkpoint_state(self):
        state = {f"student.{k}": v for k, v in _unwrap_module(self.student).state_dict().items()}
        state.update({f"ema.{k}": v for k, v in self.ema.state_dict().items()})
        if self.target is not None:
            state.update({f"target.{k}": v for k, v in self.target.state_dict().items()})
        return state

    def load_checkpoint_state(self, state):
        expected = set(self.checkpoint_state())
        if set(state) != expected:
            missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
            raise ValueError(f"checkpoint does not match this run (--mode {self.args.mode}): missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}.")
        for prefix, module in (("student.", _unwrap_module(self.student)), ("ema.", self.ema), ("target.", self.target)):
            if module is not None:
                module.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})

    def validation_labels(self):
        if self.args.num_class_embeds is None:
            return None
        names = self.args.validation_prompts
        if names is None:
            return torch.arange(min(self.args.num_class_embeds, 10), device=self.device)
        return self.class_labels(names)

    @torch.no_grad()
    def generate(self, model: ConsistencyModel, num_images: int, class_labels=None, num_inference_steps=1, seed=0):
        """PIL images from ``model`` through :class:`~lcm_kit.pipelines.pipeline_consistency.CMPipeline` (decoded
        by the VAE in latent space)."""
        from ..pipelines.pipeline_consistency import CMPipeline  # noqa: PLC0415
        from ..schedulers.scheduling_cm_multistep import CMMultistepScheduler  # noqa: PLC0415

        unet = model.backbone
        pipe = CMPipeline(unet=unet, scheduler=CMMultistepScheduler(**self.scheduler_config()), vae=self.vae)
        pipe.set_progress_bar_config(disable=True)
        was_training = unet.training
        unet.eval()  # no dropout: validation must not consume the global RNG
        try:
            return pipe(batch_size=num_images, class_labels=class_labels, num_inference_steps=num_inference_steps,
                        generator=torch.Generator().manual_seed(seed)).images
        finally:
            unet.train(was_training)

    def validate(self, step):
        if self.args.validation_prompts is not None and not self.args.validation_prompts:
            return None
        labels = self.validation_labels()
        num = labels.shape[0] if labels is not None else 8
        return self.generate(self.ema, num, labels, self.args.validation_num_inference_steps, self.args.seed)

    def scheduler_config(self) -> dict:
        args = self.args
        return consistency_scheduler_config(
            sigma_min=args.sigma_min, sigma_max=args.sigma_max, sigma_data=args.sigma_data, rho=args.rho,
            num_train_timesteps=args.scheduler_num_train_timesteps,
            clip_denoised=self.vae is None,  # pixels live in [-1, 1]; latents do not
        )

    def save_final(self, output_dir):
        """``output_dir`` becomes a stock ``ConsistencyModelPipeline`` folder holding the sampling EMA
        (``unet/`` + ``scheduler/``); the online weights go to ``unet_online/`` and, in latent space, the VAE to
        ``vae/`` (decode the pipeline's ``output_type="pt"`` samples with it)."""
        from pathlib import Path  # noqa: PLC0415

        output_dir = Path(output_dir)
        save_consistency_pipeline(self.ema.backbone, str(output_dir), **self.scheduler_config())
        _unwrap_module(self.student).backbone.save_pretrained(output_dir / "unet_online", safe_serialization=True)
        written = [str(output_dir / "unet"), str(output_dir / "scheduler"), str(output_dir / "unet_online")]
        if self.vae is not None:
            self.vae.save_pretrained(output_dir / "vae", safe_serialization=True)
            written.append(str(output_dir / "vae"))
        return written


def copy_module(module: nn.Module) -> nn.Module:
    import copy  # noqa: PLC0415

    return copy.deepcopy(module).requires_grad_(False).eval()


def _unwrap_module(model):
    """The module under DDP / torch.compile wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif hasattr(model, "module") and isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        else:
            return model


def render_consistency_model_card(args, repo_id: str, result, command) -> str:
    """A Hub model card for a consistency model trained here (usage with the stock ConsistencyModelPipeline)."""
    import os  # noqa: PLC0415

    from huggingface_hub import ModelCard, ModelCardData  # noqa: PLC0415

    from . import hub  # noqa: PLC0415

    conditional = args.num_class_embeds is not None
    data = ModelCardData(library_name="diffusers", pipeline_tag="unconditional-image-generation",
                         tags=["consistency-models", "diffusers", "lcm-kit", f"consistency-{args.mode}"])
    labels = "class_labels=[0, 1, 2, 3], " if conditional else ""
    latent = ""
    if args.pretrained_vae_model_name_or_path:
        latent = ("\n# Latent-space model: lcm_kit's CMPipeline decodes with the VAE in vae/:\n"
                  "# CMPipeline.from_pretrained(repo, vae=AutoencoderKL.from_pretrained(repo, subfolder='vae'))")
    usage = f'''```python
import torch
from diffusers import ConsistencyModelPipeline

pipe = ConsistencyModelPipeline.from_pretrained("{repo_id}")
images = pipe({labels}batch_size=4, num_inference_steps=1).images          # one step
images = pipe({labels}batch_size=4, timesteps=[22, 0]).images              # two steps{latent}
```'''
    mode_text = {"cd": f"consistency distillation of `{args.teacher}`", "ct": "consistency training (no teacher)",
                 "ict": "improved consistency training (iCT, no teacher)"}[args.mode]
    sections = [
        f"# Consistency model: {repo_id}",
        f"Trained with lcm-kit by {mode_text}, {result.global_step} steps, in EDM sigma space "
        f"([{args.sigma_min}, {args.sigma_max}], sigma_data {args.sigma_data}). The saved UNet is the sampling EMA "
        f"(decay {args.ema_decay}); `unet_online/` holds the online weights.",
        "## Usage\n\n" + usage,
    ]
    if result.validation_grids:
        grid = os.path.relpath(result.validation_grids[-1], args.output_dir)
        sections.append(f"## Validation samples ({args.validation_num_inference_steps} step(s))\n\n![validation]({grid})")
    sections.append("## Training\n\n```bash\n" + hub.training_command(command) + "\n```")
    return hub.redact_text(str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n\n".join(sections) + "\n")))


def train_consistency(argv=None, hub_client=None):
    """``train_scripts/train_consistency.py``: CD / CT / iCT of a ``UNet2DModel`` through the shared Accelerate loop.

    Returns the loop's :class:`~lcm_kit.training.loop.TrainingResult`. ``hub_client``: an ``HfApi``-like client for
    ``--push_to_hub`` (tests inject a fake).
    """
    import sys  # noqa: PLC0415
    from pathlib import Path  # noqa: PLC0415

    from . import hub  # noqa: PLC0415
    from .args import validate_data_args, validate_training_args  # noqa: PLC0415
    from .data import build_dataloader_from_args, load_train_dataset_from_args  # noqa: PLC0415
    from .loop import create_accelerator, run_training  # noqa: PLC0415

    args = build_consistency_parser().parse_args(argv)
    validate_training_args(args)
    validate_data_args(args)
    validate_consistency_args(args)
    if args.max_train_steps is None:
        raise ValueError("--max_train_steps is required: the CT / iCT curricula are defined over the total step count.")
    source = load_train_dataset_from_args(args)  # the data first: a wrong column fails before any model is loaded
    accelerator = create_accelerator(args)
    trainer = ConsistencyTrainer(args, accelerator)
    dataloader = build_dataloader_from_args(args, source)
    result = run_training(args, accelerator, trainer, dataloader)
    if args.push_to_hub and accelerator.is_main_process:
        repo_id = args.hub_model_id or Path(args.output_dir).resolve().name
        command = ["train_scripts/train_consistency.py", *(sys.argv[1:] if argv is None else argv)]
        card = render_consistency_model_card(args, repo_id, result, command)
        hub.push_to_hub(args.output_dir, repo_id, token=args.hub_token, client=hub_client, model_card=card,
                        commit_message="Upload a consistency model trained with lcm-kit")
    return result
