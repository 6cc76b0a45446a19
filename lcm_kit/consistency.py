"""All consistency-model math of lcm-kit, once.

Two parameterisations live here:

* **Discrete VP time** (Stable Diffusion / LCM): a noisy latent is ``x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps`` with
  ``a_t = alphas_cumprod[t]``. The LCM boundary scalings use the timestep scaled by ``timestep_scaling``.
* **EDM sigma space** (original consistency models, CD / CT / iCT): ``x_sigma = x0 + sigma z`` with Karras
  preconditioning and the ``sigma_min`` offset that makes ``f(x, sigma_min) = x`` exactly.
* **TrigFlow** (continuous-time sCM, Lu & Song 2025): ``x_t = cos(t) x0 + sin(t) z`` with ``z ~ N(0, sigma_data^2)``,
  ``t in [0, pi/2]``: the EDM point ``x_sigma = x_t / cos(t)`` at ``sigma = sigma_data tan(t)``, and a VP point
  (``a + (1 - a) = 1``) at ``t = arctan(sqrt((1 - a) / a))`` with ``sigma_data = 1``. ECT's continuous pair
  schedule (Geng et al. 2025) lives in EDM sigma space.

The scheduler, the pipelines and every trainer call these functions; nothing else re-derives them.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import torch

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
SOLVERS = ("ddim", "euler", "heun")
LOSS_TYPES = ("l2", "l1", "huber", "pseudo_huber")
# Where a latent consistency student maps a point of the teacher's trajectory (see :func:`target_timesteps`).
TARGET_RULES = ("lcm", "pcm", "tcd")


def append_dims(x: torch.Tensor, target_ndim: int) -> torch.Tensor:
    """Append trailing singleton dims so a per-sample tensor broadcasts against a batch of images."""
    if not torch.is_tensor(x):
        return x
    return x.reshape(x.shape + (1,) * (target_ndim - x.ndim))


# --------------------------------------------------------------------------------------------------------------
# Discrete VP time (LCM)
# --------------------------------------------------------------------------------------------------------------


def lcm_boundary_scalings(timestep, timestep_scaling: float = 10.0, sigma_data: float = 0.5):
    """LCM's boundary-condition scalings ``(c_skip, c_out)`` at a discrete timestep.

    ``c_skip(0) = 1`` and ``c_out(0) = 0`` so the consistency function is the identity at t = 0. ``timestep_scaling``
    sharpens the transition (diffusers' LCMScheduler and LCM scripts use 10). Works on Python numbers and on
    tensors of any shape (the result keeps the tensor's shape; use :func:`append_dims` to broadcast).
    """
    scaled_timestep = timestep * timestep_scaling
    c_skip = sigma_data**2 / (scaled_timestep**2 + sigma_data**2)
    c_out = scaled_timestep / (scaled_timestep**2 + sigma_data**2) ** 0.5
    return c_skip, c_out


def lcm_consistency_function(model_output, sample, timesteps, alphas_cumprod, prediction_type: str = "epsilon",
                             timestep_scaling: float = 10.0):
    """LCM's parameterised consistency function ``f(x, t) = c_skip(t) x + c_out(t) x0(model_output)`` at per-sample
    long ``timesteps`` (the boundary scalings :class:`~lcm_kit.schedulers.ConsistencyScheduler` applies when
    sampling); ``f(x, 0) = x``."""
    alpha_t = append_dims(alphas_cumprod[timesteps], sample.ndim)
    pred_x0 = predicted_original_sample(model_output.float(), sample, alpha_t, prediction_type)
    c_skip, c_out = lcm_boundary_scalings(timesteps.to(torch.float32), timestep_scaling)
    return append_dims(c_skip, sample.ndim) * sample + append_dims(c_out, sample.ndim) * pred_x0


def _check_prediction_type(prediction_type: str) -> None:
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}.")


def predicted_original_sample(model_output, sample, alpha_prod_t, prediction_type: str = "epsilon"):
    """x0 from a model output under the given parameterisation (``alpha_prod_t`` broadcastable to ``sample``)."""
    _check_prediction_type(prediction_type)
    beta_prod_t = 1 - alpha_prod_t
    if prediction_type == "epsilon":
        return (sample - beta_prod_t.sqrt() * model_output) / alpha_prod_t.sqrt()
    if prediction_type == "v_prediction":
        return alpha_prod_t.sqrt() * sample - beta_prod_t.sqrt() * model_output
    return model_output


def predicted_epsilon(model_output, sample, alpha_prod_t, prediction_type: str = "epsilon"):
    """The noise eps implied by a model output under the given parameterisation."""
    _check_prediction_type(prediction_type)
    beta_prod_t = 1 - alpha_prod_t
    if prediction_type == "epsilon":
        return model_output
    if prediction_type == "v_prediction":
        return alpha_prod_t.sqrt() * model_output + beta_prod_t.sqrt() * sample
    return (sample - alpha_prod_t.sqrt() * model_output) / beta_prod_t.sqrt()


def vp_noise(x0, noise, alpha_prod_t):
    """Forward diffusion ``sqrt(a) x0 + sqrt(1 - a) eps`` (the same formula diffusers' ``add_noise`` uses)."""
    return alpha_prod_t.sqrt() * x0 + (1 - alpha_prod_t).sqrt() * noise


def vp_velocity(x0, noise, alpha_prod_t):
    """The v-prediction target ``sqrt(a) eps - sqrt(1 - a) x0``."""
    return alpha_prod_t.sqrt() * noise - (1 - alpha_prod_t).sqrt() * x0


def ddim_step(pred_x0, pred_epsilon, alpha_prod_t_prev):
    """Deterministic DDIM (eta = 0) move to the previous timestep along the predicted trajectory."""
    return alpha_prod_t_prev.sqrt() * pred_x0 + (1 - alpha_prod_t_prev).sqrt() * pred_epsilon


def dynamic_threshold(pred_x0: torch.Tensor, ratio: float = 0.995, max_value: float = 1.0) -> torch.Tensor:
    """Imagen's dynamic thresholding of an x0 prediction (Saharia et al. 2022, https://huggingface.co/papers/2205.11487).

    Per sample, ``s`` is the ``ratio`` quantile of ``|x0|`` clamped to ``[1, max_value]``; x0 is clipped to
    ``[-s, s]`` and divided by ``s`` (s = 1 is plain clipping to [-1, 1]). Computed in float32 at least (quantile
    and clamp lack half-precision CPU kernels) and returned in the input dtype; the same operations as diffusers'
    schedulers, so results match them bit for bit.
    """
    dtype = pred_x0.dtype
    flat = pred_x0.reshape(pred_x0.shape[0], -1)
    if dtype not in (torch.float32, torch.float64):
        flat = flat.float()
    s = torch.quantile(flat.abs(), ratio, dim=1).clamp(min=1, max=max_value).unsqueeze(1)
    return (torch.clamp(flat, -s, s) / s).reshape(pred_x0.shape).to(dtype)


def lcm_cfg(cond, uncond, w):
    """LCM's guidance convention ``cond + w (cond - uncond)``: w = 0 is no guidance (CFG scale = w + 1)."""
    return cond + w * (cond - uncond)


def ddim_timestep_grid(num_train_timesteps: int = 1000, num_ddim_timesteps: int = 50) -> np.ndarray:
    """The skip-step grid LCM distillation samples from: ``[k-1, 2k-1, ..., T-1]`` with k = T // N."""
    if not 1 <= num_ddim_timesteps <= num_train_timesteps:
        raise ValueError(
            f"num_ddim_timesteps must be in [1, num_train_timesteps={num_train_timesteps}], got {num_ddim_timesteps}."
        )
    step_ratio = num_train_timesteps // num_ddim_timesteps
    return (np.arange(1, num_ddim_timesteps + 1) * step_ratio).round().astype(np.int64) - 1


def vp_sigma(alpha_prod_t):
    """The EDM noise level of a VP timestep: ``sigma = sqrt((1 - a) / a)`` (x / sqrt(a) = x0 + sigma eps)."""
    return ((1 - alpha_prod_t) / alpha_prod_t).sqrt()


def vp_solver_step(
    denoise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    sample: torch.Tensor,
    timestep: torch.Tensor,
    prev_timestep: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    solver: str = "ddim",
    pred_x0: torch.Tensor | None = None,
) -> torch.Tensor:
    """One teacher ODE step from ``timestep`` to ``prev_timestep`` (per-sample long tensors, prev < t).

    ``denoise(x, t) -> x0`` is the (guided) teacher's clean-sample prediction. ``pred_x0`` may pass the
    prediction at (sample, timestep) when the caller already has it (saves one teacher call).

    * ``ddim``: the exponential-integrator step of DDIM (eta = 0).
    * ``euler``: Euler on the probability-flow ODE ``dx~/dsigma = (x~ - x0) / sigma`` in ``x~ = x / sqrt(a)``.
      For VP models this is algebraically the same move as DDIM (it is computed in sigma space).
    * ``heun``: Euler followed by Heun's second-order correction (Karras et al. 2022, Alg. 1); one extra call.
    """
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}.")
    alpha_t = append_dims(alphas_cumprod[timestep], sample.ndim)
    alpha_prev = append_dims(alphas_cumprod[prev_timestep], sample.ndim)
    if pred_x0 is None:
        pred_x0 = denoise(sample, timestep)
    if solver == "ddim":
        pred_eps = predicted_epsilon(pred_x0, sample, alpha_t, "sample")
        return ddim_step(pred_x0, pred_eps, alpha_prev)
    sigma_t, sigma_prev = vp_sigma(alpha_t), vp_sigma(alpha_prev)
    x_scaled = sample / alpha_t.sqrt()
    derivative = (x_scaled - pred_x0) / sigma_t
    x_prev_scaled = x_scaled + (sigma_prev - sigma_t) * derivative
    if solver == "heun":
        # The correction is skipped where the target is the clean end (sigma_prev ~ 0 gives no derivative).
        x_prev = x_prev_scaled * alpha_prev.sqrt()
        derivative_prev = (x_prev_scaled - denoise(x_prev, prev_timestep)) / sigma_prev.clamp(min=1e-12)
        heun = x_scaled + (sigma_prev - sigma_t) * 0.5 * (derivative + derivative_prev)
        x_prev_scaled = torch.where(sigma_prev > 1e-6, heun, x_prev_scaled)
    return x_prev_scaled * alpha_prev.sqrt()


def trajectory_map(model_output, sample, alpha_prod_t, alpha_prod_s, prediction_type: str = "epsilon",
                   x0_transform: Callable[[torch.Tensor], torch.Tensor] | None = None):
    """The map ``x_t -> x_s`` of PCM and TCD: the network's x0 and eps at ``(sample, t)`` carried to the noise level
    of ``s`` by DDIM, ``x_s = sqrt(a_s) x0 + sqrt(1 - a_s) eps`` (TCD's first-order trajectory consistency function,
    PCM's phase map). At ``a_s = a_t`` it returns ``sample``: the boundary condition needs no scalings.

    ``x0_transform`` acts on x0 only (a scheduler's clipping or thresholding; eps stays the network's)."""
    pred_x0 = predicted_original_sample(model_output, sample, alpha_prod_t, prediction_type)
    pred_eps = predicted_epsilon(model_output, sample, alpha_prod_t, prediction_type)
    if x0_transform is not None:
        pred_x0 = x0_transform(pred_x0)
    return ddim_step(pred_x0, pred_eps, alpha_prod_s)


def phase_edge_timesteps(num_phases: int, num_ddim_timesteps: int, num_train_timesteps: int = 1000) -> list[int]:
    """PCM's phase edges on the skip-step grid, ascending: ``[0, e_1, ..., e_{M-1}]`` and the top ``T - 1`` last.

    The edges above 0 are the timesteps of a ``num_phases``-step ``TCDScheduler`` on the same grid
    (``original_inference_steps=num_ddim_timesteps``): entries ``floor(m N / M)`` of the descending grid,
    so a PCM model samples with stock ``TCDScheduler(eta=0)`` at ``num_inference_steps=num_phases`` and walks exactly
    its edges. Edge 0 is the end of the trajectory (timestep 0, where TCD's last step lands)."""
    grid = ddim_timestep_grid(num_train_timesteps, num_ddim_timesteps)
    if not 1 <= num_phases <= num_ddim_timesteps:
        raise ValueError(f"num_phases must be in [1, num_ddim_timesteps={num_ddim_timesteps}], got {num_phases!r}.")
    descending = grid[::-1]
    upper = [int(descending[(m * num_ddim_timesteps) // num_phases]) for m in range(num_phases)]
    return [0] + sorted(upper)


def lower_phase_edge(timesteps: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
    """The largest edge strictly below each timestep (``edges`` ascending, ``edges[0] = 0``; t = 0 gives 0)."""
    index = torch.searchsorted(edges, timesteps, right=False)
    return edges[(index - 1).clamp(min=0)]


def target_timesteps(rule: str, start: torch.Tensor, prev: torch.Tensor, skip: int, phase_edges=None,
                     generator=None):
    """The two times of one distillation pair and the time ``s`` both are mapped to, per ``rule``:

    * ``"lcm"``: ``s = 0``, the origin (LCM; mapped with the boundary scalings, :func:`lcm_consistency_function`);
    * ``"pcm"``: ``s`` = the lower edge of ``start``'s phase, and the teacher step stops there
      (``prev = max(prev, s)``): a pair never crosses an edge;
    * ``"tcd"``: ``s`` uniform over the skip-grid points at or below ``prev`` and the end (``0``), as TCD draws
      ``m ~ U[0, n]`` for a pair ``(t_{n+k}, t_n)``.

    ``start``/``prev`` are per-sample long timesteps from :func:`lcm_kit.training.losses.sample_skip_timesteps`
    (``prev = start - skip`` or 0). Returns ``(prev, s)``; ``s`` is drawn from ``generator`` only for ``"tcd"``."""
    if rule == "lcm":
        return prev, torch.zeros_like(start)
    if rule == "pcm":
        if phase_edges is None:
            raise ValueError("rule 'pcm' needs phase_edges (see phase_edge_timesteps).")
        s = lower_phase_edge(start, phase_edges)
        return torch.maximum(prev, s), s
    if rule == "tcd":
        # prev = index * skip - 1 (or 0): the grid points <= prev are m * skip - 1 for m = 1 .. index, plus 0.
        choices = (start + 1) // skip
        u = torch.rand(start.shape, generator=generator, device=start.device)
        m = (u * choices).long().clamp(max=choices - 1)
        return prev, (m * skip - 1).clamp(min=0)
    raise ValueError(f"rule must be one of {TARGET_RULES}, got {rule!r}.")


def guidance_scale_embedding(w: torch.Tensor, embedding_dim: int = 512, dtype: torch.dtype = torch.float32):
    """Sinusoidal embedding of the guidance weight w (as in VDM / LCM); fed to ``UNet(timestep_cond=...)``."""
    if w.ndim != 1:
        raise ValueError(f"w must be a 1-D tensor of guidance weights, got shape {tuple(w.shape)}.")
    w = w * 1000.0
    half_dim = embedding_dim // 2
    # The 0-dim CPU scalar is allowed beside device tensors (and keeps diffusers' float32 rounding); the table is
    # built on w's device: a CPU one times a (B, 1) accelerator tensor is a device error.
    emb = torch.log(torch.tensor(10000.0)) / (half_dim - 1)
    emb = torch.exp(torch.arange(half_dim, dtype=dtype, device=w.device) * -emb)
    emb = w.to(dtype)[:, None] * emb[None, :]
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=1)
    if embedding_dim % 2 == 1:
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb


# --------------------------------------------------------------------------------------------------------------
# EDM sigma space (consistency models: CD, CT, iCT)
# --------------------------------------------------------------------------------------------------------------

SIGMA_MIN, SIGMA_MAX, SIGMA_DATA, RHO = 0.002, 80.0, 0.5, 7.0


def karras_sigmas(num: int, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX, rho: float = RHO,
                  device: str | torch.device | None = None):
    """``num`` Karras noise levels in **ascending** order, sigma_1 = sigma_min ... sigma_N = sigma_max (float64),
    computed on ``device`` (a training step then copies nothing from the host)."""
    if num < 2:
        raise ValueError(f"num must be >= 2 to span [sigma_min, sigma_max], got {num}.")
    ramp = torch.linspace(0, 1, num, dtype=torch.float64, device=device)
    min_inv, max_inv = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (min_inv + ramp * (max_inv - min_inv)) ** rho


def consistency_scalings(sigma, sigma_data: float = SIGMA_DATA, sigma_min: float = SIGMA_MIN):
    """Consistency-model preconditioning ``(c_skip, c_out, c_in)`` with the sigma_min offset.

    ``c_skip(sigma_min) = 1`` and ``c_out(sigma_min) = 0`` exactly, so ``f(x, sigma_min) = x``.
    """
    c_skip = sigma_data**2 / ((sigma - sigma_min) ** 2 + sigma_data**2)
    c_out = (sigma - sigma_min) * sigma_data / (sigma**2 + sigma_data**2) ** 0.5
    c_in = 1 / (sigma**2 + sigma_data**2) ** 0.5
    return c_skip, c_out, c_in


def edm_scalings(sigma, sigma_data: float = SIGMA_DATA):
    """EDM denoiser preconditioning ``(c_skip, c_out, c_in)`` without the offset (a diffusion teacher's)."""
    c_skip = sigma_data**2 / (sigma**2 + sigma_data**2)
    c_out = sigma * sigma_data / (sigma**2 + sigma_data**2) ** 0.5
    c_in = 1 / (sigma**2 + sigma_data**2) ** 0.5
    return c_skip, c_out, c_in


def sigma_to_timestep(sigma):
    """The time input diffusers' ``CMStochasticIterativeScheduler`` feeds a ``UNet2DModel``: 250 log(sigma)."""
    if torch.is_tensor(sigma):
        return 1000 * 0.25 * torch.log(sigma + 1e-44)
    return 1000 * 0.25 * np.log(np.asarray(sigma, dtype=np.float64) + 1e-44)


def vp_timestep_from_sigma(sigma: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """The fractional discrete timestep of a VP (DDPM-family) model whose noise level is ``sigma``.

    Interpolates ``log sigma`` linearly between the model's discrete levels ``vp_sigma(alphas_cumprod[t])`` (as
    k-diffusion's discrete-schedule wrappers do), clamped to ``[0, T - 1]``: a VP teacher can then be queried as an
    EDM denoiser at any sigma of a Karras grid. The clamp keeps the end segments' slope as its derivative: a time
    at the first or last level, a rounding error outside, still has the time derivative sCD's tangent needs.
    """
    log_sigmas = torch.log(vp_sigma(alphas_cumprod.double().to(sigma.device)))  # ascending in t
    log_sigma = torch.log(sigma.double())
    high = torch.searchsorted(log_sigmas, log_sigma).clamp(1, log_sigmas.numel() - 1)
    low = high - 1
    timestep = low + (log_sigma - log_sigmas[low]) / (log_sigmas[high] - log_sigmas[low])
    clamped = timestep + (timestep.clamp(0, log_sigmas.numel() - 1) - timestep).detach()
    return clamped.to(sigma.dtype)


def edm_euler_step(denoised, sample, sigma, sigma_next):
    """Euler step of the probability-flow ODE ``dx/dsigma = (x - D(x, sigma)) / sigma``."""
    return sample + (sigma_next - sigma) * (sample - denoised) / sigma


def edm_solver_step(denoise, sample, sigma, sigma_next, solver: str = "euler", denoised=None):
    """One teacher step from ``sigma`` to ``sigma_next`` (per-sample, broadcastable) with ``denoise(x, sigma)``."""
    if solver not in ("euler", "heun"):
        raise ValueError(f"solver must be 'euler' or 'heun' in sigma space, got {solver!r}.")
    sigma, sigma_next = append_dims(sigma, sample.ndim), append_dims(sigma_next, sample.ndim)
    if denoised is None:
        denoised = denoise(sample, sigma)
    x_next = edm_euler_step(denoised, sample, sigma, sigma_next)
    if solver == "heun":
        d = (sample - denoised) / sigma
        d_next = (x_next - denoise(x_next, sigma_next)) / sigma_next
        x_next = sample + (sigma_next - sigma) * 0.5 * (d + d_next)
    return x_next


def ct_num_scales(step: int, total_steps: int, s0: int = 2, s1: int = 150) -> int:
    """Original CT discretisation curriculum N(k) (Song et al. 2023, App. C)."""
    return int(math.ceil(math.sqrt(step / total_steps * ((s1 + 1) ** 2 - s0**2) + s0**2) - 1) + 1)


def ct_target_ema(step: int, total_steps: int, s0: int = 2, s1: int = 150, mu0: float = 0.9) -> float:
    """Original CT target-network EMA decay mu(k) = exp(s0 log mu0 / N(k))."""
    return math.exp(s0 * math.log(mu0) / ct_num_scales(step, total_steps, s0, s1))


def ict_num_scales(step: int, total_steps: int, s0: int = 10, s1: int = 1280) -> int:
    """iCT's exponential curriculum ``N(k) = min(s0 2^floor(k / K'), s1) + 1``, K' = floor(K / (log2(s1/s0) + 1))."""
    k_prime = max(1, math.floor(total_steps / (math.log2(s1 / s0) + 1)))
    return min(s0 * 2 ** (step // k_prime), s1) + 1


def ict_index_probabilities(sigmas: torch.Tensor, p_mean: float = -1.1, p_std: float = 2.0) -> torch.Tensor:
    """iCT's lognormal sampling of the index i in [0, N-2] (for the pair sigma_i < sigma_{i+1}), ascending sigmas."""
    log_sigmas = torch.log(sigmas.double())
    cdf = torch.erf((log_sigmas - p_mean) / (math.sqrt(2) * p_std))
    probs = cdf[1:] - cdf[:-1]
    return probs / probs.sum()


def ict_loss_weight(sigma, sigma_next):
    """iCT's lambda(sigma_i) = 1 / (sigma_{i+1} - sigma_i)."""
    return 1.0 / (sigma_next - sigma)


def pseudo_huber_c(num_dims: int) -> float:
    """iCT's pseudo-Huber constant c = 0.00054 sqrt(d) for data of d dimensions."""
    return 0.00054 * math.sqrt(num_dims)


# --------------------------------------------------------------------------------------------------------------
# TrigFlow (sCM) and ECT
# --------------------------------------------------------------------------------------------------------------


def trigflow_time_from_sigma(sigma, sigma_data: float = SIGMA_DATA):
    """TrigFlow time ``t = arctan(sigma / sigma_data)`` of the EDM noise level ``sigma`` (0 -> 0, inf -> pi/2)."""
    return torch.atan(torch.as_tensor(sigma) / sigma_data)


def sigma_from_trigflow_time(t, sigma_data: float = SIGMA_DATA):
    """EDM noise level ``sigma = sigma_data tan(t)`` of TrigFlow time ``t``."""
    return sigma_data * torch.tan(torch.as_tensor(t))


def trigflow_time_from_alphas_cumprod(alpha_prod_t):
    """TrigFlow time of a VP point ``sqrt(a) x0 + sqrt(1 - a) eps`` (``sigma_data = 1``): ``arctan(sqrt((1-a)/a))``."""
    alpha_prod_t = torch.as_tensor(alpha_prod_t)
    return torch.atan2((1 - alpha_prod_t).sqrt(), alpha_prod_t.sqrt())


def vp_timestep_from_trigflow_time(t: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """The fractional discrete timestep of a VP model at TrigFlow time ``t`` (``sigma_data = 1``)."""
    return vp_timestep_from_sigma(torch.tan(t), alphas_cumprod)


def trigflow_consistency_function(network_output, sample, t, sigma_data: float = SIGMA_DATA):
    """``f(x_t, t) = cos(t) x_t + sin(t) sigma_data F(x_t / sigma_data, t)``, so ``f(x, 0) = x`` exactly.

    The sign of ``F`` is EDM's (Lu & Song write ``- sin(t) sigma_data F``): with it this is the EDM consistency
    function without the sigma_min offset, ``c_skip x_sigma + c_out F(c_in x_sigma)`` at ``sigma = sigma_data tan t``.
    The backbone's time input is ``t`` itself (sCM's identity time transformation): EDM's ``250 log sigma`` varies so
    fast in t that the tangent ``df/dt`` is dominated by the time embedding's derivative and training diverges
    (benchmarks/consistency_results.md).
    """
    t = append_dims(t.to(sample.dtype), sample.ndim)  # a tensor on the sample's device: no host copy
    return torch.cos(t) * sample + torch.sin(t) * sigma_data * network_output


def trigflow_velocity_from_denoised(denoised, sample, t):
    """The PF-ODE velocity ``dx_t/dt = (cos(t) x_t - x0_hat) / sin(t)`` of a denoiser's ``x0_hat`` at ``x_t``
    (= ``cos(t) z - sin(t) x0`` with ``z`` the noise the denoiser implies)."""
    t = append_dims(t.to(sample.dtype), sample.ndim)  # a tensor on the sample's device: no host copy
    return (torch.cos(t) * sample - denoised) / torch.sin(t)


def trigflow_output_from_vp_prediction(model_output, sample, t, prediction_type: str = "epsilon"):
    """The TrigFlow network output ``F`` (EDM sign, ``sigma_data = 1``) of a VP model's prediction at ``x_t``.

    A VP point at TrigFlow time ``t`` is ``cos(t) x0 + sin(t) eps``; with this ``F``,
    :func:`trigflow_consistency_function` is the prediction's own x0. Per parameterisation: ``v``: ``F = -v``;
    ``epsilon``: ``F = (sin(t) x_t - eps) / cos(t)``; ``sample``: ``F = (x0 - cos(t) x_t) / sin(t)``.
    """
    _check_prediction_type(prediction_type)
    t = append_dims(t.to(sample.dtype), sample.ndim)
    if prediction_type == "v_prediction":
        return -model_output
    if prediction_type == "epsilon":
        return (torch.sin(t) * sample - model_output) / torch.cos(t)
    return (model_output - torch.cos(t) * sample) / torch.sin(t)


def scm_tangent(network_output, network_time_derivative, sample, velocity, t, sigma_data: float = SIGMA_DATA,
                warmup_ratio: float = 1.0):
    """``g = cos(t) df/dt`` of the stop-gradient consistency function along the PF-ODE (sCM, Algorithm 1):

    ``g = cos^2(t) (sigma_data F + dx_t/dt) - r cos(t) sin(t) (x_t - sigma_data dF/dt)`` with ``r`` the tangent
    warm-up ratio (0 -> 1 over the first iterations). ``network_time_derivative`` is ``cos(t) sin(t) dF/dt`` (the
    JVP with tangents ``cos(t) sin(t) (dx_t/dt / sigma_data, 1)``, finite for every t).
    """
    t = append_dims(t.to(sample.dtype), sample.ndim)  # a tensor on the sample's device: no host copy
    cos, sin = torch.cos(t), torch.sin(t)
    return cos**2 * (sigma_data * network_output + velocity) - warmup_ratio * (
        cos * sin * sample - sigma_data * network_time_derivative
    )


def normalize_tangent(tangent: torch.Tensor, c: float = 0.1) -> torch.Tensor:
    """sCM's tangent normalisation ``g / (||g|| + c)`` per sample."""
    norm = tangent.reshape(tangent.shape[0], -1).norm(dim=1)
    return tangent / append_dims(norm + c, tangent.ndim)


def ect_stage(step: int, total_steps: int, num_stages: int) -> int:
    """ECT's stage after ``step`` of ``total_steps``: the pair gap halves (``q = 2``) once per stage."""
    return min(num_stages - 1, step * num_stages // max(1, total_steps))


def ect_previous_sigma(sigma: torch.Tensor, stage: int, q: float = 2.0, k: float = 8.0, b: float = 1.0):
    """ECT's mapping ``r = t (1 - q^-(stage+1) n(t))``, ``n(t) = 1 + k sigmoid(-b t)``, clamped at 0.

    At stage 0 small noise levels map to ``r = 0``: the diffusion model's own loss; every stage divides the gap
    ``t - r`` by q, approaching the continuous-time consistency condition.
    """
    ratio = 1 - q ** (-(stage + 1)) * (1 + k * torch.sigmoid(-b * sigma))
    return (sigma * ratio).clamp(min=0)


def edm_loss_weight(sigma, sigma_data: float = SIGMA_DATA):
    """EDM's loss weight ``(sigma^2 + sigma_data^2) / (sigma sigma_data)^2`` (= SNR + 1 / sigma_data^2), which ECT
    keeps for its consistency loss."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


# --------------------------------------------------------------------------------------------------------------
# Distances
# --------------------------------------------------------------------------------------------------------------


def consistency_distance(prediction, target, loss_type: str = "l2", huber_c: float | None = None, reduce=True):
    """Distance between student and target outputs.

    * ``l2``: mean squared error; ``l1``: mean absolute error.
    * ``huber``: LCM's element-wise ``sqrt((x - y)^2 + c^2) - c`` (diffusers' LCM scripts, c = 0.001).
    * ``pseudo_huber``: iCT's per-sample ``sqrt(||x - y||^2 + c^2) - c``, c defaulting to 0.00054 sqrt(d).

    With ``reduce=False`` returns one value per sample (for per-sample loss weights).
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}.")
    diff = prediction.float() - target.float()
    flat = diff.reshape(diff.shape[0], -1)
    if loss_type == "l2":
        per_sample = flat.pow(2).mean(dim=1)
    elif loss_type == "l1":
        per_sample = flat.abs().mean(dim=1)
    elif loss_type == "huber":
        c = 0.001 if huber_c is None else huber_c
        per_sample = (torch.sqrt(flat.pow(2) + c**2) - c).mean(dim=1)
    else:
        c = pseudo_huber_c(flat.shape[1]) if huber_c is None else huber_c
        per_sample = torch.sqrt(flat.pow(2).sum(dim=1) + c**2) - c
    return per_sample.mean() if reduce else per_sample


def sample_uniform(low: float, high: float, size: Sequence[int] | int, generator=None, device=None):
    """U[low, high) samples (the guidance scale w of LCM distillation), seeded through ``generator``."""
    size = (size,) if isinstance(size, int) else tuple(size)
    return low + (high - low) * torch.rand(size, generator=generator, device=device)
