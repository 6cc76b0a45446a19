"""PCM's adversarial consistency loss in latent space (Phased Consistency Models, arXiv 2405.18407).

Beside the phased consistency loss, PCM asks the student's phase-edge prediction to be indistinguishable, as a
distribution, from the target's. Of one distillation pair (:class:`~lcm_kit.training.losses.LCMDistillationLoss`):

* **fake**: the student's ``F_theta(x_{t_{n+k}}, t_{n+k}, s)`` (with its gradient);
* **real**: the target's ``F_theta^-(x_hat_{t_n}, t_n, s)`` (no gradient) -- the distribution the consistency loss
  converges to, not noised data: data would pull the student off the teacher's trajectories;
* both are carried by the forward process from ``s`` to a timestep ``t`` drawn uniformly in the pair's phase
  ``[s, upper edge]`` (:func:`discriminator_timesteps`, :func:`forward_diffuse`), with independent noise, and the
  discriminator reads them at ``t``;
* hinge losses (:func:`hinge_discriminator_loss`, :func:`hinge_generator_loss`), the generator's term added to the
  consistency loss with a weight (the PCM scripts use 0.1).

The discriminator is any callable ``features -> [logits]`` over the frozen teacher's features
(:mod:`lcm_kit.training.discriminator`).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from ...consistency import append_dims, vp_noise


def discriminator_timesteps(s: torch.Tensor, phase_edges: torch.Tensor, generator=None) -> torch.Tensor:
    """A timestep uniform over the integers ``[s, e]`` for each ``s``, ``e`` the next phase edge above ``s`` (the
    top of the phase the pair lies in; ``phase_edges`` ascending, as
    :func:`~lcm_kit.consistency.phase_edge_timesteps`). The PCM scripts draw from ``[s, s + T / M)``, the phase's
    nominal width; the phase itself is exact on any grid."""
    index = torch.searchsorted(phase_edges, s, right=True).clamp(max=phase_edges.shape[0] - 1)
    span = phase_edges[index] - s
    u = torch.rand(s.shape, generator=generator, device=s.device)
    return s + torch.minimum((u * (span + 1)).long(), span)


def forward_diffuse(x_s: torch.Tensor, noise: torch.Tensor, s: torch.Tensor, t: torch.Tensor,
                    alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """The VP forward process from ``s`` to ``t >= s``: ``sqrt(a_t / a_s) x_s + sqrt(1 - a_t / a_s) eps``
    (``x_s`` at ``s`` has, at ``t``, the marginal of data noised to ``t``; ``t = s`` returns ``x_s``)."""
    ratio = append_dims(alphas_cumprod[t] / alphas_cumprod[s], x_s.ndim)
    return vp_noise(x_s, noise, ratio)


def _per_sample(values: torch.Tensor) -> torch.Tensor:
    return values.float().reshape(values.shape[0], -1).mean(dim=1)


def hinge_discriminator_loss(real_logits: Sequence[torch.Tensor], fake_logits: Sequence[torch.Tensor]) -> torch.Tensor:
    """``relu(1 - D(real)) + relu(1 + D(fake))``, averaged over each head's patches and over the heads; per sample."""
    if len(real_logits) != len(fake_logits) or not real_logits:
        raise ValueError(f"real and fake logits must be equally many non-empty lists, got {len(real_logits)} and "
                         f"{len(fake_logits)}.")
    terms = [_per_sample(torch.relu(1 - r)) + _per_sample(torch.relu(1 + f)) for r, f in zip(real_logits, fake_logits)]
    return torch.stack(terms).mean(dim=0)


def hinge_generator_loss(fake_logits: Sequence[torch.Tensor]) -> torch.Tensor:
    """``relu(1 - D(fake))`` averaged like :func:`hinge_discriminator_loss`; per sample. The PCM scripts' form: it
    stops pushing a sample the discriminator already calls real by the margin (plain ``-D(fake)`` never stops)."""
    if not fake_logits:
        raise ValueError("fake_logits must be a non-empty list.")
    return torch.stack([_per_sample(torch.relu(1 - f)) for f in fake_logits]).mean(dim=0)


class AdversarialConsistencyLoss:
    """PCM's adversarial consistency loss: :meth:`noisy_pair` builds what the discriminator reads, the hinge losses
    score it; ``weight`` (lambda) scales the generator's term in the student's loss."""

    def __init__(self, weight: float = 0.1):
        if not (isinstance(weight, (int, float)) and math.isfinite(weight) and weight > 0):
            raise ValueError(f"weight must be a finite number > 0 (0 is: no adversarial loss), got {weight!r}.")
        self.weight = float(weight)

    def noisy_pair(self, prediction: torch.Tensor, target: torch.Tensor, s: torch.Tensor,
                   alphas_cumprod: torch.Tensor, phase_edges: torch.Tensor, generator=None):
        """``(fake, real, t)``: the student's prediction and the target at ``s``, each carried to ``t`` (drawn by
        :func:`discriminator_timesteps`) with its own noise; draws ``t`` then the two noises from ``generator``."""
        if prediction.shape != target.shape:
            raise ValueError(f"prediction and target must have one shape, got {tuple(prediction.shape)} and "
                             f"{tuple(target.shape)}.")
        t = discriminator_timesteps(s, phase_edges, generator)
        fake_noise = torch.randn(prediction.shape, generator=generator, device=prediction.device)
        real_noise = torch.randn(target.shape, generator=generator, device=target.device)
        fake = forward_diffuse(prediction.float(), fake_noise, s, t, alphas_cumprod)
        real = forward_diffuse(target.detach().float(), real_noise, s, t, alphas_cumprod)
        return fake, real, t

    discriminator_loss = staticmethod(hinge_discriminator_loss)
    generator_loss = staticmethod(hinge_generator_loss)
