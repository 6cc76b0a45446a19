"""Consistency distillation (CD), consistency training (CT) and improved CT (iCT) in EDM sigma space, as one
callable with its curricula: the per-sample consistency loss (Song et al. 2023; Song & Dhariwal 2023)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ...consistency import (
    RHO,
    SIGMA_MAX,
    SIGMA_MIN,
    append_dims,
    consistency_distance,
    ct_num_scales,
    ct_target_ema,
    edm_solver_step,
    ict_index_probabilities,
    ict_loss_weight,
    ict_num_scales,
    karras_sigmas,
)

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


@dataclass
class ConsistencyLossOutput:
    """What one loss call drew and measured: ``loss`` per sample (with grad), the sigma pair of each sample."""

    loss: torch.Tensor
    sigma: torch.Tensor
    sigma_next: torch.Tensor


def get_rng_state(device: torch.device):
    """The RNG state a dropout mask is drawn from (CPU, and CUDA on a CUDA device): replayed so that online and
    target passes share their masks."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(device: torch.device, state) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


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


class ConsistencyLoss:
    """The per-sample consistency loss of CD, CT or iCT with its curricula (EDM's loss-class style).

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

    def logs(self, step: int) -> dict:
        return {"num_scales": self.num_scales(step), "target_ema_decay": self.target_ema_decay(step)}

    def sigmas(self, step: int, device=None) -> torch.Tensor:
        """The ascending Karras grid of N(k) noise levels used at step k (float64, on ``device``)."""
        return karras_sigmas(self.num_scales(step), self.sigma_min, self.sigma_max, self.rho, device=device)

    def index_probabilities(self, sigmas: torch.Tensor) -> torch.Tensor:
        """P(i) for the pair (sigma_i, sigma_{i+1}), i in [0, N-2] (on the device of ``sigmas``)."""
        if self.index_sampling == "lognormal":
            return ict_index_probabilities(sigmas, self.p_mean, self.p_std)
        return torch.full((sigmas.numel() - 1,), 1.0 / (sigmas.numel() - 1), dtype=torch.float64,
                          device=sigmas.device)

    def sample_sigma_pairs(self, step: int, batch_size: int, generator=None, device=None):
        """Per-sample ``(sigma_i, sigma_{i+1})`` drawn with the mode's index distribution (float64, on ``device``).

        The grid, the probabilities and the draw live on the generator's device (``device`` without a generator),
        so a training step on an accelerator neither reads back from nor copies to the host.
        """
        draw_device = generator.device if generator is not None else torch.device(device or "cpu")
        sigmas = self.sigmas(step, device=draw_device)
        # (torch's multinomial reads its input back to validate it only when drawing one sample: batch_size 1)
        index = torch.multinomial(self.index_probabilities(sigmas), batch_size, replacement=True, generator=generator)
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
        rng_state = get_rng_state(clean.device)
        online = model(x_next, sigma_next, class_labels)
        set_rng_state(clean.device, rng_state)
        with torch.no_grad():
            target = (target_model if target_model is not None else model)(x_prev, sigma, class_labels).detach()

        per_sample = self.distance(online, target) * self.loss_weight(sigma, sigma_next).float()
        return ConsistencyLossOutput(loss=per_sample, sigma=sigma, sigma_next=sigma_next)
