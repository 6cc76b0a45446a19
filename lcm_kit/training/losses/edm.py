"""EDM's diffusion (denoising score matching) loss: what trains the denoiser a consistency model starts from and, in
CD, distils from (Karras et al. 2022)."""

from __future__ import annotations

import torch

from ...consistency import SIGMA_DATA, append_dims, consistency_distance, edm_loss_weight


class EDMDenoisingLoss:
    """Per-sample EDM loss: lognormal sigma (``p_mean``, ``p_std``), weight ``(sigma^2 + sd^2) / (sigma sd)^2`` on
    the squared error of ``denoiser(x0 + sigma z, sigma, class_labels)``."""

    def __init__(self, p_mean: float = -1.2, p_std: float = 1.2, sigma_data: float = SIGMA_DATA):
        self.p_mean, self.p_std, self.sigma_data = p_mean, p_std, sigma_data

    def __call__(self, denoiser, clean: torch.Tensor, class_labels=None, generator=None) -> torch.Tensor:
        batch = clean.shape[0]
        log_sigma = self.p_mean + self.p_std * torch.randn(batch, generator=generator, device=clean.device,
                                                           dtype=clean.dtype)
        sigma = log_sigma.exp()
        noise = torch.randn(clean.shape, generator=generator, device=clean.device, dtype=clean.dtype)
        denoised = denoiser(clean + append_dims(sigma, clean.ndim) * noise, sigma, class_labels)
        return edm_loss_weight(sigma, self.sigma_data) * consistency_distance(denoised, clean, "l2", reduce=False)
