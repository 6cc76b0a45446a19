"""Easy Consistency Tuning (ECT, Geng et al., ICLR 2025) as one callable: consistency training in EDM sigma space
that starts from a diffusion model's weights and tightens the consistency condition stage by stage.

Per sample: ``t ~ lognormal(p_mean, p_std)``, ``r = t (1 - q^-(stage+1) n(t))`` (ECT's mapping,
:func:`lcm_kit.consistency.ect_previous_sigma`), the same noise at both levels, the online model under
stop-gradient as the target (``f(x0 + r z, r)``; ``x0`` itself where ``r`` is at the boundary, which is the
diffusion loss: at stage 0 the small noise levels train exactly as the diffusion model was trained), the
pseudo-Huber distance and EDM's weight ``1 / t^2 + 1 / sigma_data^2``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ...consistency import (
    SIGMA_DATA,
    SIGMA_MAX,
    SIGMA_MIN,
    append_dims,
    consistency_distance,
    ect_previous_sigma,
    ect_stage,
    edm_loss_weight,
)
from .cm import get_rng_state, set_rng_state

ECT_LOSS_TYPES = ("pseudo_huber", "l2")


@dataclass
class ECTLossOutput:
    """``loss`` per sample (with grad) and the pair ``(t, r)`` of each sample."""

    loss: torch.Tensor
    sigma: torch.Tensor
    sigma_previous: torch.Tensor


class ECTLoss:
    """The per-sample ECT loss of a :class:`~lcm_kit.precond.ConsistencyModel` initialised from a diffusion model.

    Args:
        total_steps: the optimisation steps the stages span.
        num_stages: how many times the gap ``t - r`` shrinks by ``q`` over training (default 8).
        q, k, b: ECT's mapping ``r = t (1 - q^-(stage+1) (1 + k sigmoid(-b t)))`` (defaults 2, 8, 1).
        p_mean, p_std: the lognormal of t (iCT's -1.1, 2.0, as ECT).
        loss_type: ``"pseudo_huber"`` (ECT's ``sqrt(||d||^2 + c^2) - c``) or ``"l2"``; ``huber_c`` its c.
    """

    mode = "ect"
    uses_target_network = False

    def __init__(
        self,
        total_steps: int,
        *,
        num_stages: int = 8,
        q: float = 2.0,
        k: float = 8.0,
        b: float = 1.0,
        p_mean: float = -1.1,
        p_std: float = 2.0,
        sigma_data: float = SIGMA_DATA,
        sigma_min: float = SIGMA_MIN,
        sigma_max: float = SIGMA_MAX,
        loss_type: str = "pseudo_huber",
        huber_c: float | None = None,
    ):
        if not isinstance(total_steps, int) or total_steps < 1:
            raise ValueError(f"total_steps must be a positive int, got {total_steps!r}.")
        if not isinstance(num_stages, int) or num_stages < 1:
            raise ValueError(f"num_stages must be a positive int, got {num_stages!r}.")
        if not q > 1:
            raise ValueError(f"q must be > 1 (the gap shrinks by q each stage), got {q!r}.")
        if loss_type not in ECT_LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {ECT_LOSS_TYPES} for ECT, got {loss_type!r}.")
        if huber_c is not None and loss_type != "pseudo_huber":
            raise ValueError(f"huber_c={huber_c} only applies to loss_type='pseudo_huber', got {loss_type!r}.")
        self.total_steps, self.num_stages = total_steps, num_stages
        self.q, self.k, self.b = q, k, b
        self.p_mean, self.p_std = p_mean, p_std
        self.sigma_data, self.sigma_min, self.sigma_max = sigma_data, sigma_min, sigma_max
        self.loss_type, self.huber_c = loss_type, huber_c

    def stage(self, step: int) -> int:
        return ect_stage(step, self.total_steps, self.num_stages)

    def logs(self, step: int) -> dict:
        return {"ect_stage": self.stage(step)}

    def sample_sigma_pairs(self, step: int, batch_size: int, generator=None, device=None, dtype=torch.float32):
        """Per-sample ``(t, r)``: t lognormal, clamped to ``[sigma_min, sigma_max]``; r from ECT's mapping."""
        log_sigma = self.p_mean + self.p_std * torch.randn(batch_size, generator=generator, device=device, dtype=dtype)
        sigma = log_sigma.exp().clamp(self.sigma_min, self.sigma_max)
        return sigma, ect_previous_sigma(sigma, self.stage(step), self.q, self.k, self.b)

    def __call__(
        self,
        model: nn.Module,
        clean: torch.Tensor,
        step: int,
        target_model: nn.Module | None = None,
        class_labels: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        noise: torch.Tensor | None = None,
    ) -> ECTLossOutput:
        if target_model is not None:
            raise ValueError("ECT's target is the online model under stop-gradient; do not pass target_model.")
        sigma, sigma_previous = self.sample_sigma_pairs(step, clean.shape[0], generator, clean.device, clean.dtype)
        if noise is None:
            noise = torch.randn(clean.shape, generator=generator, device=clean.device, dtype=clean.dtype)
        x_t = clean + append_dims(sigma, clean.ndim) * noise
        # Below sigma_min the consistency function is the identity's boundary: the target is x0 (diffusion loss).
        on_trajectory = append_dims(sigma_previous > self.sigma_min, clean.ndim)
        r = sigma_previous.clamp(min=self.sigma_min)
        x_r = clean + append_dims(r, clean.ndim) * noise

        rng_state = get_rng_state(clean.device)
        online = model(x_t, sigma, class_labels)
        set_rng_state(clean.device, rng_state)
        with torch.no_grad():
            target = torch.where(on_trajectory, model(x_r, r, class_labels), clean).detach()
        per_sample = consistency_distance(online, target, self.loss_type, self.huber_c, reduce=False)
        return ECTLossOutput(loss=per_sample * edm_loss_weight(sigma, self.sigma_data).float(), sigma=sigma,
                             sigma_previous=sigma_previous)
